//! `switchyard demo`: everything in one process, no files needed — three demo
//! upstreams (each answers with its name), the proxy and an open loopback
//! admin listener, with the split of `demo.yaml` and a canary rollout of
//! `canary` against `blue` under way. The demo sends gentle traffic of its
//! own (`--traffic-rate`, 0 turns it off) so the rollout advances without
//! help, and its upstreams take a fault: `POST /demo/fail?percent=N` to one
//! (through the proxy, forcing the backend) makes it fail that share of its
//! requests, so a newcomer can watch an automatic rollback.
//!
//! It also runs a guarded rollout of the flag `new-search` (10 %, 25 %, then
//! 50 % for ten minutes, then everyone), and `POST
//! /demo/fail?flag=new-search&percent=N` makes every upstream fail that
//! share of the requests of the flag's users: the rollout reverts the flag.

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

use arc_swap::ArcSwapOption;
use switchyard_control::rollout::{FlagRolloutSpec, RolloutSpec};

use crate::listen::Drained;
use crate::server::{metrics_for, Listeners, Proxy, StartOptions};

/// The embedded demo configuration.
pub const DEMO_CONFIG: &str = include_str!("demo.yaml");

/// The rollout the demo starts: short holds, so a few hundred requests walk
/// it through its steps.
pub const DEMO_ROLLOUT: &str = r#"{"strategy": "canary", "stable": "blue", "target": "canary",
  "steps": [{"weight": 10, "hold": "20s"}, {"weight": 25, "hold": "20s"}, {"weight": 50, "hold": "20s"}, {"weight": 100}],
  "analysis": {"interval": "5s", "window": "30s", "min_requests": 20}}"#;

/// The guarded flag rollout the demo starts: it stays at 50 % for ten
/// minutes, time to break the feature and watch the flag revert.
pub const DEMO_FLAG_ROLLOUT: &str = r#"{"steps": [{"rollout_percentage": 10, "hold": "30s"},
    {"rollout_percentage": 25, "hold": "30s"}, {"rollout_percentage": 50, "hold": "10m"},
    {"rollout_percentage": 100}],
  "analysis": {"interval": "5s", "window": "30s", "min_requests": 20}}"#;

/// The flag the demo rolls out.
pub const DEMO_FLAG: &str = "new-search";

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
    let flag_fault = Arc::new(FlagFault::default());
    for backend in &mut config.routes[0].backends {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        backend.endpoints = vec![addr.to_string()];
        upstreams.push(format!("{} on {addr}", backend.name));
        let faults = Arc::new(Faults {
            own: AtomicU32::new(0),
            flag: flag_fault.clone(),
        });
        tokio::spawn(serve_name(listener, backend.name.clone(), faults));
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
    let flag_spec: FlagRolloutSpec =
        serde_json::from_str(DEMO_FLAG_ROLLOUT).expect("the embedded flag rollout is valid");
    proxy
        .store()
        .start_rollout("demo", None, DEMO_FLAG, flag_spec)
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
    println!("A guarded rollout of the flag `{DEMO_FLAG}` runs too; break the feature for its users and watch the flag revert:");
    println!("  curl -s -X POST 'http://{proxy}/demo/fail?flag={DEMO_FLAG}&percent=100'");
    println!(
        "  switchyard ctl --admin http://{admin} flag rollout watch {DEMO_FLAG}   # exits 2 once reverted"
    );
    println!("Ctrl-C stops it.");
}

/// A demo upstream's faults: its own share of 500s, and the fault all
/// demo upstreams share for one flag's users.
struct Faults {
    own: AtomicU32,
    flag: Arc<FlagFault>,
}

/// The flag whose users' requests fail (by `x-feature-flags`), and what
/// share of them.
#[derive(Default)]
struct FlagFault(ArcSwapOption<(String, u32)>);

/// A demo upstream: answers every request with its name, except the
/// shares its faults say to fail (500). `POST /demo/fail?percent=N` sets
/// this upstream's share, `…?flag=F&percent=N` every upstream's share of
/// flag `F`'s users (0 mends either).
async fn serve_name(listener: TcpListener, name: String, faults: Arc<Faults>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (name, faults) = (name.clone(), faults.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let answer = answer(&name, &faults, &req);
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

const FAIL_USAGE: &str = "POST /demo/fail?percent=N, or /demo/fail?flag=NAME&percent=N for a flag's users (N from 0 to 100)\n";

/// What a demo upstream answers `req`.
fn answer<B>(name: &str, faults: &Faults, req: &http::Request<B>) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, text: String| {
        let mut resp = Response::new(Full::new(Bytes::from(text)));
        *resp.status_mut() = status;
        resp
    };
    if req.uri().path() == "/demo/fail" {
        if req.method() != http::Method::POST {
            return respond(StatusCode::METHOD_NOT_ALLOWED, FAIL_USAGE.into());
        }
        let param = |key: &str| {
            req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
            })
        };
        let percent = param("percent")
            .and_then(|p| p.parse::<u32>().ok())
            .filter(|p| *p <= 100);
        let flag = param("flag");
        let flag_ok = flag.is_none_or(|f| {
            !f.is_empty()
                && f.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        });
        return match (percent, flag) {
            (Some(p), None) => {
                faults.own.store(p, Ordering::Relaxed);
                respond(
                    StatusCode::OK,
                    format!("{name} now fails {p}% of its requests\n"),
                )
            }
            (Some(p), Some(f)) if flag_ok => {
                faults
                    .flag
                    .0
                    .store((p > 0).then(|| Arc::new((f.to_owned(), p))));
                respond(
                    StatusCode::OK,
                    format!(
                        "every demo upstream now fails {p}% of the requests of `{f}`'s users\n"
                    ),
                )
            }
            _ => respond(StatusCode::BAD_REQUEST, FAIL_USAGE.into()),
        };
    }
    let percent = match faults.flag.0.load().as_deref() {
        Some((flag, p)) if carries(req, flag) => *p,
        _ => faults.own.load(Ordering::Relaxed),
    };
    if percent > 0 && fastrand::u32(0..100) < percent {
        return respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{name} failed (demo fault, {percent}%)\n"),
        );
    }
    respond(StatusCode::OK, format!("{name}\n"))
}

/// Whether the proxy said `flag` is on for `req`'s user.
fn carries<B>(req: &http::Request<B>, flag: &str) -> bool {
    req.headers()
        .get_all("x-feature-flags")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|f| f.trim() == flag)
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
        let faults = Faults {
            own: AtomicU32::new(0),
            flag: Arc::default(),
        };
        let failing = &faults.own;
        let call = |method: &str, uri: &str| {
            let req = http::Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .unwrap();
            answer("canary", &faults, &req).status()
        };
        assert_eq!(call("GET", "/"), StatusCode::OK);
        assert_eq!(
            call("GET", "/demo/fail?percent=50"),
            StatusCode::METHOD_NOT_ALLOWED
        );
        for bad in [
            "",
            "?percent=101",
            "?percent=-1",
            "?percent=half",
            "?pct=5",
            "?flag=new-search",
            "?flag=&percent=5",
            "?flag=New%20UI&percent=5",
        ] {
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
        // A flag's fault fails only its users.
        let flagged = |flags: &str| {
            let req = http::Request::get("/x")
                .header("x-feature-flags", flags)
                .body(())
                .unwrap();
            answer("blue", &faults, &req).status()
        };
        assert_eq!(
            call("POST", "/demo/fail?flag=new-search&percent=100"),
            StatusCode::OK
        );
        assert!((0..50).all(|_| flagged("a,new-search") == StatusCode::INTERNAL_SERVER_ERROR));
        assert!((0..50).all(|_| flagged("new-searcher") == StatusCode::OK));
        assert!((0..50).all(|_| call("GET", "/x") == StatusCode::OK));
        assert_eq!(
            call("POST", "/demo/fail?percent=0&flag=new-search"),
            StatusCode::OK
        );
        assert!((0..50).all(|_| flagged("new-search") == StatusCode::OK));
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
        let flag: FlagRolloutSpec = serde_json::from_str(DEMO_FLAG_ROLLOUT).unwrap();
        flag.validate(&c, DEMO_FLAG).unwrap();
    }
}
