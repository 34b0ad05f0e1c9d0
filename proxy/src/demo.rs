//! `switchyard demo`: everything in one process, no files needed — three demo
//! upstreams (each answers with its name), the proxy and an open loopback
//! admin listener, with the split of `demo.yaml` and a canary rollout of
//! `canary` against `blue` under way. The demo sends gentle traffic of its
//! own (`--traffic-rate`, 0 turns it off) so the rollout advances without
//! help, and its upstreams take a fault: `POST /demo/fail?percent=N` to one
//! (through the proxy, forcing the backend) makes it fail that share of its
//! requests, so a newcomer can watch an automatic rollback.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use switchyard_control::config::Config;
use tokio::net::TcpListener;

use switchyard_control::rollout::RolloutSpec;

use crate::listen::Drained;
use crate::server::{metrics_for, Listeners, Proxy, StartOptions};

/// The embedded demo configuration.
pub const DEMO_CONFIG: &str = include_str!("demo.yaml");

/// The rollout the demo starts: short holds, so a few hundred requests walk
/// it through its steps.
pub const DEMO_ROLLOUT: &str = r#"{"strategy": "canary", "stable": "blue", "target": "canary",
  "steps": [{"weight": 10, "hold": "20s"}, {"weight": 25, "hold": "20s"}, {"weight": 50, "hold": "20s"}, {"weight": 100}],
  "analysis": {"interval": "5s", "window": "30s", "min_requests": 20}}"#;

/// Where the demo listens, and how much traffic it sends itself.
#[derive(Debug, Clone, Copy)]
pub struct DemoAddrs {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Requests per second the demo sends through its own proxy; 0: none.
    pub traffic_rate: u32,
}

/// Distinct users the demo's own traffic cycles through.
const DEMO_USERS: u64 = 500;

/// Starts the upstreams, binds the proxy, prints what to try, and runs until
/// `shutdown`.
pub async fn run(addrs: DemoAddrs, shutdown: impl Future<Output = ()>) -> std::io::Result<Drained> {
    let mut config = Config::from_yaml(DEMO_CONFIG).expect("the embedded demo config is valid");
    config.listen = addrs.listen;
    config.admin.listen = addrs.admin;
    let mut upstreams = Vec::new();
    for backend in &mut config.routes[0].backends {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        backend.endpoints = vec![addr.to_string()];
        upstreams.push(format!("{} on {addr}", backend.name));
        tokio::spawn(serve_name(listener, backend.name.clone()));
    }
    config.validate().map_err(std::io::Error::other)?;

    let listeners = Listeners::bind(&config).await?;
    print_banner(&config, &listeners, &upstreams, addrs.traffic_rate);
    if addrs.traffic_rate > 0 {
        tokio::spawn(send_traffic(listeners.data_addr(), addrs.traffic_rate));
    }
    let metrics = metrics_for(&config);
    let proxy =
        Proxy::new(config, metrics, StartOptions::default()).map_err(std::io::Error::other)?;
    let spec: RolloutSpec =
        serde_json::from_str(DEMO_ROLLOUT).expect("the embedded demo rollout is valid");
    proxy
        .store()
        .start_rollout("demo", None, "demo", spec)
        .await
        .map_err(std::io::Error::other)?;
    Ok(proxy.run(listeners, shutdown).await)
}

fn print_banner(config: &Config, listeners: &Listeners, upstreams: &[String], rate: u32) {
    let proxy = listeners.data_addr();
    let admin = listeners.admin_addr();
    let split: Vec<String> = config.routes[0]
        .backends
        .iter()
        .map(|b| format!("{} {}%", b.name, b.weight))
        .collect();
    println!(
        "switchyard demo: route `demo` splits users {}",
        split.join(" / ")
    );
    println!("  upstreams: {}", upstreams.join(", "));
    println!("  proxy listening on {proxy}");
    println!("  admin listening on {admin}");
    if rate > 0 {
        println!("  sending {rate} requests/s of its own (users demo-0 to demo-{}) so the rollout advances; --traffic-rate 0 stops that", DEMO_USERS - 1);
    }
    println!();
    println!("Try:");
    println!(
        "  curl -s -H 'x-user-id: alice' http://{proxy}/          # the same backend every time"
    );
    println!("  for u in $(seq 1 100); do curl -s -H \"x-user-id: user-$u\" http://{proxy}/; done | sort | uniq -c");
    println!("  curl -s -H 'x-switchyard-backend: canary' http://{proxy}/   # QA: force a backend");
    println!("  curl -si http://{proxy}/ | grep -i set-cookie          # anonymous users get a sticky id");
    println!("  curl -s -H 'content-type: application/json' http://{admin}/ofrep/v1/evaluate/flags -d '{{\"context\":{{\"targetingKey\":\"alice\"}}}}'");
    println!("  switchyard ctl --admin http://{admin} rollout status demo   # the running canary rollout");
    println!("  switchyard ctl --admin http://{admin} status");
    println!("  curl -s http://{admin}/metrics | grep switchyard_requests_total");
    println!("Break the canary (half its answers become 500s) and watch the rollout roll back by itself:");
    println!(
        "  curl -s -X POST -H 'x-switchyard-backend: canary' 'http://{proxy}/demo/fail?percent=50'"
    );
    println!(
        "  switchyard ctl --admin http://{admin} rollout watch demo   # exits 2 once rolled back"
    );
    println!("Ctrl-C stops it.");
}

/// A demo upstream: answers every request with its name, except the
/// share its fault says to fail (500). `POST /demo/fail?percent=N` sets
/// that share (0 mends it).
async fn serve_name(listener: TcpListener, name: String) {
    let failing = Arc::new(AtomicU32::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (name, failing) = (name.clone(), failing.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let answer = answer(&name, &failing, &req);
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// What a demo upstream answers `req`.
fn answer<B>(name: &str, failing: &AtomicU32, req: &http::Request<B>) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, text: String| {
        let mut resp = Response::new(Full::new(Bytes::from(text)));
        *resp.status_mut() = status;
        resp
    };
    if req.uri().path() == "/demo/fail" {
        if req.method() != http::Method::POST {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST /demo/fail?percent=N (0 to 100)\n".into(),
            );
        }
        let percent = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("percent=")))
            .and_then(|p| p.parse::<u32>().ok())
            .filter(|p| *p <= 100);
        return match percent {
            Some(p) => {
                failing.store(p, Ordering::Relaxed);
                respond(
                    StatusCode::OK,
                    format!("{name} now fails {p}% of its requests\n"),
                )
            }
            None => respond(
                StatusCode::BAD_REQUEST,
                "percent must be a whole number from 0 to 100: POST /demo/fail?percent=50\n".into(),
            ),
        };
    }
    let percent = failing.load(Ordering::Relaxed);
    if percent > 0 && fastrand::u32(0..100) < percent {
        return respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{name} failed (demo fault, {percent}%)\n"),
        );
    }
    respond(StatusCode::OK, format!("{name}\n"))
}

/// The demo's own traffic: `rate` requests a second through the proxy at
/// `proxy`, from users cycling through `DEMO_USERS` ids, on one keep-alive
/// connection (made again when it breaks).
async fn send_traffic(proxy: SocketAddr, rate: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sender = None;
    for n in 0u64.. {
        tick.tick().await;
        if sender.is_none() {
            sender = connect(proxy).await;
        }
        let Some(send) = sender.as_mut() else {
            continue;
        };
        let req = http::Request::get("/")
            .header(http::header::HOST, "demo")
            .header("x-user-id", format!("demo-{}", n % DEMO_USERS))
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("a valid request");
        match send.send_request(req).await {
            Ok(resp) => {
                // Read to the end so the connection is reused.
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            }
            Err(_) => sender = None,
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>;

async fn connect(proxy: SocketAddr) -> Option<Sender> {
    let stream = tokio::net::TcpStream::connect(proxy).await.ok()?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(send)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_fault_is_set_checked_and_applied() {
        let failing = AtomicU32::new(0);
        let call = |method: &str, uri: &str| {
            let req = http::Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .unwrap();
            answer("canary", &failing, &req).status()
        };
        assert_eq!(call("GET", "/"), StatusCode::OK);
        assert_eq!(
            call("GET", "/demo/fail?percent=50"),
            StatusCode::METHOD_NOT_ALLOWED
        );
        for bad in ["", "?percent=101", "?percent=-1", "?percent=half", "?pct=5"] {
            let uri = format!("/demo/fail{bad}");
            assert_eq!(call("POST", &uri), StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(
            failing.load(Ordering::Relaxed),
            0,
            "bad input changed nothing"
        );
        assert_eq!(call("POST", "/demo/fail?percent=100"), StatusCode::OK);
        assert!((0..50).all(|_| call("GET", "/x") == StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(call("POST", "/demo/fail?percent=0"), StatusCode::OK);
        assert!((0..50).all(|_| call("GET", "/x") == StatusCode::OK));
    }

    #[test]
    fn embedded_config_is_valid() {
        let c = Config::from_yaml(DEMO_CONFIG).unwrap();
        let names: Vec<&str> = c.routes[0]
            .backends
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        assert_eq!(names, ["blue", "green", "canary"]);
        assert_eq!(c.routes[0].name, "demo");
        let spec: RolloutSpec = serde_json::from_str(DEMO_ROLLOUT).unwrap();
        spec.validate(&c, "demo").unwrap();
    }
}
