//! Issue 18: no request lost when a backend dies. Real upstreams that
//! refuse, reset, hang or die; what is retried and what never is; the retry
//! budget; failover to the stable backend and back; outlier ejection; the
//! canary still judged while its users are served.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{body_client, call, client, get, Behaviour, Running, Upstream};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use switchyard_control::bucket::bucket;
use tokio::io::AsyncReadExt;

/// A port nothing listens on (bound, then let go).
fn dead_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An upstream that reads a request head, then closes without answering;
/// counts the connections.
async fn resetting() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                // Closed with the request unanswered.
            });
        }
    });
    (addr, seen)
}

/// An upstream that accepts and never answers.
async fn hanging() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

/// A route `api` over backends given as `(name, [endpoints], weight)`.
fn config(extra: &str, backends: &[(&str, Vec<SocketAddr>, f64)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(n, eps, w)| {
            let eps: Vec<String> = eps.iter().map(|a| format!("\"{a}\"")).collect();
            format!(
                "      - {{ name: {n}, endpoints: [{}], weight: {w} }}",
                eps.join(", ")
            )
        })
        .collect();
    format!(
        "metrics: {{ window: 60s }}\n{extra}\nroutes:\n  - name: api\n    backends:\n{}\n",
        list.join("\n")
    )
}

/// `n` GETs from users `user-0..n`: (status, body) of each.
async fn gets(proxy: &Running, n: usize, headers: &[(&str, &str)]) -> Vec<(u16, String)> {
    let c = client();
    let mut out = Vec::new();
    for i in 0..n {
        let user = format!("user-{i}");
        let mut h = vec![("x-user-id", user.as_str())];
        h.extend_from_slice(headers);
        let (status, _, body) = get(&c, &proxy.url("/"), &h).await;
        out.push((status.as_u16(), body.trim().to_owned()));
    }
    out
}

/// A refused endpoint: every request is retried on the live one, and after
/// five refusals in a row the dead endpoint is ejected (no more retries).
#[tokio::test]
async fn a_refused_endpoint_is_retried_elsewhere_then_ejected() {
    let live = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "",
        &[("blue", vec![dead_port(), live.addr], 100.0)],
    ))
    .await;
    let answers = gets(&proxy, 60, &[]).await;
    assert!(
        answers.iter().all(|(s, b)| *s == 200 && b == "blue"),
        "{answers:?}"
    );
    let retried = common::metric(
        proxy.admin,
        r#"switchyard_retries_total{backend="blue",reason="connect",route="api"}"#,
    )
    .await;
    assert_eq!(retried, 5, "five refusals, then ejected");
    // The ejection shows in the state (published every second).
    let dead = proxy_dead_endpoint(&proxy).await;
    assert_eq!(dead, "ejected");
    proxy.stop().await;
}

/// The state of the first endpoint of backend `blue`, once the supervisor
/// published it as something other than healthy (at most 10 s).
async fn proxy_dead_endpoint(proxy: &Running) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, text) = call(
            "GET",
            &format!("http://{}/v1/state", proxy.admin),
            None,
            &[],
            "",
        )
        .await;
        let state: Value = serde_json::from_str(&text).unwrap();
        let health = &state["endpoint_health"]["api"]["blue"];
        if let Some(first) = health
            .as_object()
            .and_then(|h| h.values().find(|v| *v != "healthy"))
        {
            return first.clone();
        }
        assert!(Instant::now() < deadline, "no endpoint ever left: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A POST whose body went up is never sent again; one refused before
/// anything was written is, body and all.
#[tokio::test]
async fn a_post_is_retried_only_when_nothing_was_sent() {
    let (reset_addr, reset_seen) = resetting().await;
    let echo = Upstream::start("echo", Behaviour::EchoBody).await;
    let post = |url: String| async move {
        let req = http::Request::post(url)
            .header("x-user-id", "u")
            .body(Full::new(bytes::Bytes::from_static(b"the whole body")))
            .unwrap();
        let resp = body_client().request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    // Reset after the request was written: 502, sent once.
    let proxy = Running::start(&config(
        "outlier: { consecutive_failures: 0 }",
        &[("blue", vec![reset_addr, echo.addr], 100.0)],
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(post(proxy.url("/")).await.0);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        reset_seen.load(Ordering::SeqCst),
        2,
        "each POST reached it once"
    );
    proxy.stop().await;
    // Refused before anything was written: retried with its body.
    let proxy = Running::start(&config(
        "",
        &[("blue", vec![dead_port(), echo.addr], 100.0)],
    ))
    .await;
    for _ in 0..4 {
        assert_eq!(post(proxy.url("/")).await, (200, "the whole body".into()));
    }
    proxy.stop().await;
}

/// An idempotent, bodiless GET reset before any response goes to another
/// endpoint; a hanging endpoint's timeout is not retried (it may have acted).
#[tokio::test]
async fn a_reset_get_is_retried_a_timeout_is_not() {
    let (reset_addr, _) = resetting().await;
    let live = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "outlier: { consecutive_failures: 0 }",
        &[("blue", vec![reset_addr, live.addr], 100.0)],
    ))
    .await;
    let answers = gets(&proxy, 10, &[]).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    assert_eq!(
        common::metric(
            proxy.admin,
            r#"switchyard_retries_total{backend="blue",reason="reset",route="api"}"#
        )
        .await,
        5
    );
    proxy.stop().await;
    let stuck = hanging().await;
    let proxy = Running::start(&config(
        "timeouts: { request: 300ms }\noutlier: { consecutive_failures: 0 }",
        &[("blue", vec![stuck, live.addr], 100.0)],
    ))
    .await;
    let answers = gets(&proxy, 4, &[]).await;
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 504).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        common::metric(
            proxy.admin,
            r#"switchyard_retries_total{backend="blue",reason="timeout""#
        )
        .await,
        0
    );
    proxy.stop().await;
}

/// With the budget spent (here: none at all), failures surface instead of
/// multiplying the load on the live endpoints.
#[tokio::test]
async fn an_exhausted_budget_stops_retries() {
    let live = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "retries: { budget_percent: 0, min_per_second: 0 }\noutlier: { consecutive_failures: 0 }",
        &[("blue", vec![dead_port(), live.addr], 100.0)],
    ))
    .await;
    let answers = gets(&proxy, 20, &[]).await;
    assert_eq!(answers.iter().filter(|(s, _)| *s == 502).count(), 10);
    assert_eq!(
        common::metric(proxy.admin, "switchyard_retries_total{").await,
        0
    );
    proxy.stop().await;
}

/// Every endpoint of the canary down: its users are served by the stable
/// backend (their assignment unchanged), the canary is charged with the
/// failures, and once it is back they return to it. A forced-backend
/// request never fails over.
#[tokio::test]
async fn a_dead_backend_fails_over_to_stable_and_its_users_come_back() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary_addr = dead_port();
    let proxy = Running::start(&config(
        "forced_backend_header: x-backend\noutlier: { base_ejection: 300ms, max_ejection: 300ms }",
        &[
            ("blue", vec![blue.addr], 50.0),
            ("canary", vec![canary_addr], 50.0),
        ],
    ))
    .await;
    let canary_users: Vec<String> = (0..200)
        .map(|i| format!("user-{i}"))
        .filter(|u| bucket("api", u.as_bytes()) >= 5000)
        .collect();
    assert!(canary_users.len() > 50);
    let c = client();
    for user in &canary_users {
        let (status, _, body) = get(&c, &proxy.url("/"), &[("x-user-id", user)]).await;
        assert_eq!((status.as_u16(), body.trim()), (200, "blue"), "{user}");
    }
    let failovers = common::metric(
        proxy.admin,
        r#"switchyard_failovers_total{backend="canary",route="api"}"#,
    )
    .await;
    assert_eq!(failovers, canary_users.len() as u64);
    let charged = common::metric(
        proxy.admin,
        r#"switchyard_requests_total{backend="canary",code_class="5xx",route="api"}"#,
    )
    .await;
    assert_eq!(
        charged,
        canary_users.len() as u64,
        "the canary is judged on them"
    );
    // QA's forced request gets the error, not blue.
    let (status, _, _) = get(&c, &proxy.url("/"), &[("x-backend", "canary")]).await;
    assert!(status.is_server_error(), "{status}");
    // The canary comes back on its port: its users return to it.
    let _canary = Upstream::start_at(canary_addr, "canary", Behaviour::Name).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, body) = get(&c, &proxy.url("/"), &[("x-user-id", &canary_users[0])]).await;
        if body.trim() == "canary" {
            break;
        }
        assert!(Instant::now() < deadline, "canary users never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for user in canary_users.iter().take(20) {
        let (_, _, body) = get(&c, &proxy.url("/"), &[("x-user-id", user)]).await;
        assert_eq!(
            body.trim(),
            "canary",
            "{user} is sticky to the canary again"
        );
    }
    proxy.stop().await;
}

/// A canary whose only endpoint dies under a rollout: its users keep
/// getting answers from stable, and the rollout is still rolled back on the
/// canary's failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_canary_is_rolled_back_while_its_users_are_served() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "",
        &[
            ("blue", vec![blue.addr], 100.0),
            ("canary", vec![dead_port()], 0.0),
        ],
    ))
    .await;
    let spec = json!({
        "strategy": "canary", "stable": "blue", "target": "canary",
        "steps": [{"weight": 50, "hold": "1h"}, {"weight": 100}],
        "analysis": {"interval": "1s", "window": "5s", "min_requests": 20, "failure_threshold": 2},
    });
    let (status, _, body) = call(
        "POST",
        &format!("http://{}/v1/routes/api/rollout", proxy.admin),
        None,
        &[],
        spec.to_string(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0u64;
    loop {
        let (status, _, body) = get(
            &c,
            &proxy.url("/"),
            &[("x-user-id", &format!("user-{sent}"))],
        )
        .await;
        assert_eq!(
            (status.as_u16(), body.trim()),
            (200, "blue"),
            "request {sent}"
        );
        sent += 1;
        if sent.is_multiple_of(50) {
            let (_, _, text) = call(
                "GET",
                &format!("http://{}/v1/routes/api/rollout", proxy.admin),
                None,
                &[],
                "",
            )
            .await;
            let rollout: Value = serde_json::from_str(&text).unwrap();
            if rollout["phase"] == "rolled-back" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "never rolled back");
    }
    assert!(sent >= 40);
    proxy.stop().await;
}

/// An upstream answering `name` on every path but `/healthz`, which answers
/// the status in the returned cell.
async fn with_health(name: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicU16>) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
    let cell = health.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let cell = cell.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let status = if req.uri().path() == "/healthz" {
                        cell.load(Ordering::SeqCst)
                    } else {
                        200
                    };
                    async move {
                        let mut resp =
                            http::Response::new(Full::new(bytes::Bytes::from(format!("{name}\n"))));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, health)
}

/// The state `/v1/state` gives endpoint `endpoint` of backend `blue`.
async fn endpoint_state(proxy: &Running, endpoint: SocketAddr) -> Value {
    let (_, _, text) = call(
        "GET",
        &format!("http://{}/v1/state", proxy.admin),
        None,
        &[],
        "",
    )
    .await;
    let state: Value = serde_json::from_str(&text).unwrap();
    state["endpoint_health"]["api"]["blue"][endpoint.to_string()].clone()
}

async fn wait_endpoint_state(proxy: &Running, endpoint: SocketAddr, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = endpoint_state(proxy, endpoint).await;
        if state == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{endpoint} is {state}, never {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Active health checks take a failing endpoint out of service and bring it
/// back once its checks pass again; the state shows in `/v1/state`, the
/// metrics and the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_an_endpoint_out_and_bring_it_back() {
    let (a, _) = with_health("a").await;
    let (b, b_health) = with_health("b").await;
    let yaml = config("", &[("blue", vec![a, b], 100.0)]).replace(
        "weight: 100 }",
        "weight: 100, health_check: { interval: 100ms, timeout: 80ms, unhealthy_threshold: 2, healthy_threshold: 2 } }",
    );
    let proxy = Running::start(&yaml).await;
    wait_endpoint_state(&proxy, b, "healthy").await;
    b_health.store(503, Ordering::SeqCst);
    wait_endpoint_state(&proxy, b, "unhealthy").await;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "ctl",
            "--admin",
            &format!("http://{}", proxy.admin),
            "status",
        ])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains(&format!("{b} (unhealthy)")), "{status}");
    let answers = gets(&proxy, 20, &[]).await;
    assert!(
        answers.iter().all(|(s, body)| *s == 200 && body == "a"),
        "{answers:?}"
    );
    let gauge =
        format!(r#"switchyard_endpoint_healthy{{backend="blue",endpoint="{b}",route="api"}}"#);
    assert_eq!(common::metric(proxy.admin, &gauge).await, 0);
    b_health.store(200, Ordering::SeqCst);
    wait_endpoint_state(&proxy, b, "healthy").await;
    let answers = gets(&proxy, 20, &[]).await;
    assert!(
        answers.iter().any(|(_, body)| body == "b"),
        "b serves again"
    );
    assert_eq!(common::metric(proxy.admin, &gauge).await, 1);
    let (_, _, events) = call(
        "GET",
        &format!("http://{}/v1/events", proxy.admin),
        None,
        &[],
        "",
    )
    .await;
    let events: Value = serde_json::from_str(&events).unwrap();
    let health: Vec<(&Value, &Value)> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "endpoint.health")
        .map(|e| (&e["before"], &e["after"]))
        .collect();
    assert_eq!(
        health,
        [
            (&json!("healthy"), &json!("unhealthy")),
            (&json!("unhealthy"), &json!("healthy"))
        ],
        "{events}"
    );
    proxy.stop().await;
}
