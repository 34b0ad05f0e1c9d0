//! `switchyard demo`: everything in one process, no files needed — three demo
//! upstreams (each answers with its name), the proxy and an open loopback
//! admin listener, with the split of `demo.yaml` and a canary rollout of
//! `canary` against `blue` under way (it advances as traffic passes analysis).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

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

/// Where the demo listens.
#[derive(Debug, Clone, Copy)]
pub struct DemoAddrs {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

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
    print_banner(&config, &listeners, &upstreams);
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

fn print_banner(config: &Config, listeners: &Listeners, upstreams: &[String]) {
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
    println!("Ctrl-C stops it.");
}

/// A demo upstream: answers every request with its name.
async fn serve_name(listener: TcpListener, name: String) {
    let body = Bytes::from(format!("{name}\n"));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let body = body.clone();
                async move {
                    let mut resp = Response::new(Full::new(body));
                    *resp.status_mut() = StatusCode::OK;
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
