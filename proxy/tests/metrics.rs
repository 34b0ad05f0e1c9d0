//! The golden signals, measured through the running proxy: Prometheus text on
//! the admin listener and the rolling windows behind `/v1/routes/{route}/stats`.

mod common;

use std::time::Duration;

use common::{client, config, get, Behaviour, Running, Upstream};

/// Sends `n` requests for distinct users, `concurrency` at a time.
async fn traffic(proxy: &Running, n: usize, concurrency: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let url = proxy.url("/");
        tasks.spawn(async move {
            let c = client();
            for i in (worker..n).step_by(concurrency) {
                get(&c, &url, &[("x-user-id", &format!("user-{i}"))]).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no sample {name_and_labels} in\n{text}"))
}

async fn scrape(proxy: &Running) -> String {
    let (status, headers, body) =
        get(&client(), &format!("http://{}/metrics", proxy.admin), &[]).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_errors_and_saturation_are_exported() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::failing(4)).await;
    let proxy = Running::start(&config(
        "",
        &[("blue", blue.addr, 50.0), ("canary", canary.addr, 50.0)],
    ))
    .await;
    traffic(&proxy, 400, 8).await;
    // Requests that never reach a backend are counted apart.
    get(&client(), &proxy.url("/../x"), &[]).await;

    let text = scrape(&proxy).await;
    let blue_n = blue.arrived.load(std::sync::atomic::Ordering::SeqCst) as f64;
    let canary_n = canary.arrived.load(std::sync::atomic::Ordering::SeqCst) as f64;
    assert_eq!(blue_n + canary_n, 400.0);
    assert_eq!(
        metric(
            &text,
            r#"switchyard_requests_total{backend="blue",code_class="2xx",route="api"}"#
        ),
        blue_n
    );
    let canary_5xx = metric(
        &text,
        r#"switchyard_requests_total{backend="canary",code_class="5xx",route="api"}"#,
    );
    let canary_2xx = metric(
        &text,
        r#"switchyard_requests_total{backend="canary",code_class="2xx",route="api"}"#,
    );
    assert_eq!(canary_5xx, (canary_n / 4.0).floor());
    assert_eq!(canary_2xx + canary_5xx, canary_n);
    assert_eq!(
        metric(
            &text,
            r#"switchyard_request_duration_seconds_count{backend="blue",route="api"}"#
        ),
        blue_n
    );
    assert_eq!(
        metric(
            &text,
            r#"switchyard_requests_in_flight{backend="canary",route="api"}"#
        ),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            r#"switchyard_backend_weight_percent{backend="canary",route="api"}"#
        ),
        50.0
    );
    assert_eq!(
        metric(
            &text,
            r#"switchyard_unrouted_requests_total{reason="malformed"}"#
        ),
        1.0
    );
    assert!(metric(&text, "process_resident_memory_bytes") > 0.0);
    assert!(text.contains("process_open_fds"));

    // A weight change shows on the next scrape.
    proxy
        .handle
        .set_weights("api", &[("blue", 90.0), ("canary", 10.0)])
        .await
        .unwrap();
    let text = scrape(&proxy).await;
    assert_eq!(
        metric(
            &text,
            r#"switchyard_backend_weight_percent{backend="canary",route="api"}"#
        ),
        10.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_failures_are_counted_by_reason() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let slow = Upstream::start("slow", Behaviour::Delay(Duration::from_secs(5))).await;
    let yaml = config(
        "timeouts: { request: 100ms }",
        &[("dead", dead, 50.0), ("slow", slow.addr, 50.0)],
    );
    let proxy = Running::start(&yaml).await;
    let c = client();
    let mut codes = Vec::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        codes.push(
            get(&c, &proxy.url("/"), &[("x-user-id", user)])
                .await
                .0
                .as_u16(),
        );
    }
    let text = scrape(&proxy).await;
    let refused = metric(
        &text,
        r#"switchyard_upstream_failures_total{backend="dead",reason="connect",route="api"}"#,
    );
    let timed_out = metric(
        &text,
        r#"switchyard_upstream_failures_total{backend="slow",reason="timeout",route="api"}"#,
    );
    assert_eq!(refused, codes.iter().filter(|c| **c == 502).count() as f64);
    assert_eq!(
        timed_out,
        codes.iter().filter(|c| **c == 504).count() as f64
    );
    assert_eq!(refused + timed_out, 6.0);
    proxy.stop().await;
}

/// 90 % of requests take 10 ms and 10 % take 200 ms; 5 % fail. The window
/// must report p95 ≈ 200 ms and a 5 % error rate, within the histogram's
/// documented ±3.2 % (plus the proxy's own small overhead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_quantiles_and_error_rate_match_the_truth() {
    let upstream = Upstream::start(
        "mixed",
        Behaviour::Pattern {
            fast: Duration::from_millis(10),
            slow: Duration::from_millis(200),
            slow_every: 10,
            fail_every: 20,
        },
    )
    .await;
    let proxy = Running::start(&config("", &[("mixed", upstream.addr, 100.0)])).await;
    // The client times every request too: the proxy's own measurement of a
    // request can only be shorter than what the client saw.
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..20 {
        let url = proxy.url("/");
        tasks.spawn(async move {
            let c = client();
            let mut seen = Vec::new();
            for i in (worker..400).step_by(20) {
                let start = std::time::Instant::now();
                get(&c, &url, &[("x-user-id", &format!("user-{i}"))]).await;
                seen.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            seen
        });
    }
    let mut client_ms = Vec::new();
    while let Some(done) = tasks.join_next().await {
        client_ms.extend(done.unwrap());
    }
    client_ms.sort_by(f64::total_cmp);
    let client_quantile = |q: f64| {
        client_ms[((q * client_ms.len() as f64).ceil() as usize).clamp(1, client_ms.len()) - 1]
    };

    let (status, _, body) = get(
        &client(),
        &format!("http://{}/v1/routes/api/stats", proxy.admin),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["window_seconds"], 60);
    let b = &stats["backends"][0];
    assert_eq!(b["backend"], "mixed");
    assert_eq!(b["requests"], 400, "{b}");
    assert_eq!(b["errors"], 20);
    assert!((b["error_rate_percent"].as_f64().unwrap() - 5.0).abs() < 1e-9);
    let p50 = b["p50_ms"].as_f64().unwrap();
    let p95 = b["p95_ms"].as_f64().unwrap();
    // Below: the upstream's sleep (it never ends early); above: what the
    // client measured. Both widened by the histogram's ±3.2 % resolution.
    let (c50, c95) = (client_quantile(0.50), client_quantile(0.95));
    assert!(
        (10.0 * 0.968..=c50 * 1.032).contains(&p50),
        "p50 {p50} ms, client saw {c50} ms"
    );
    assert!(
        (200.0 * 0.968..=c95 * 1.032).contains(&p95),
        "p95 {p95} ms, client saw {c95} ms"
    );

    let (status, _, body) = get(
        &client(),
        &format!("http://{}/v1/routes/nope/stats", proxy.admin),
        &[],
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.contains(r#""code":"not_found""#), "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn metrics_can_be_switched_off() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "metrics: { enabled: false }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    traffic(&proxy, 10, 2).await;
    let text = scrape(&proxy).await;
    assert!(!text.contains("switchyard_requests_total{"), "{text}");
    assert!(text.contains(r#"switchyard_backend_weight_percent{backend="blue",route="api"} 100"#));
    let (status, _, _) = get(
        &client(),
        &format!("http://{}/v1/routes/api/stats", proxy.admin),
        &[],
    )
    .await;
    assert_eq!(status, 409);
    proxy.stop().await;
}

/// Issue 20: docs/metrics.md lists every metric family the binary exports:
/// a proxy with flags, a rollout and traffic through it (so its labelled
/// families have series) is scraped, and each `# TYPE` family must have a
/// row in the document's tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_md_lists_every_exported_family() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::failing(3)).await;
    let proxy = Running::start(&config(
        "flags:\n  - { name: dark-mode, rollout_percentage: 50 }",
        &[("blue", blue.addr, 90.0), ("canary", canary.addr, 10.0)],
    ))
    .await;
    let spec = r#"{"stable":"blue","target":"canary","steps":[{"weight":10,"hold":"1h"},{"weight":100}],"analysis":{"interval":"1s","window":"5s"}}"#;
    let url = format!("http://{}/v1/routes/api/rollout", proxy.admin);
    assert_eq!(common::call("POST", &url, None, &[], spec).await.0, 201);
    let flag_spec = r#"{"steps":[{"rollout_percentage":60,"hold":"1h"},{"rollout_percentage":100}],"analysis":{"interval":"1s","window":"5s"}}"#;
    let url = format!("http://{}/v1/flags/dark-mode/rollout", proxy.admin);
    assert_eq!(
        common::call("POST", &url, None, &[], flag_spec).await.0,
        201
    );
    let c = client();
    // Traffic until both kinds of rollout have been analyzed (their check
    // families have series), at most 20 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut i = 0;
    let text = loop {
        for _ in 0..50 {
            get(&c, &proxy.url("/"), &[("x-user-id", &format!("u{i}"))]).await;
            i += 1;
        }
        let text = scrape(&proxy).await;
        if text.contains("switchyard_analysis_checks_total{")
            && text.contains("switchyard_flag_analysis_checks_total{")
        {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "no analyses: {text}");
    };
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    // Every backticked name in a table row's first cell.
    let documented: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split(" | ").next())
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .collect();
    let exported: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(exported.len() > 15, "{text}");
    let missing: Vec<&&str> = exported
        .iter()
        .filter(|family| !documented.contains(family))
        .collect();
    assert!(
        missing.is_empty(),
        "exported but not in docs/metrics.md: {missing:?}"
    );
    proxy.stop().await;
}
