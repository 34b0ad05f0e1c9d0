//! Rollouts with automatic rollback, end to end: real upstreams that
//! misbehave on purpose, steady traffic, the driver judging live windows.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::rollouts::{api, wait_rollout, Receiver, Traffic};
use common::{call, client, get, Behaviour, Running, Upstream};
use serde_json::{json, Value};

/// Polls the route's rollout status every 50 ms (at most 30 s) until
/// `done` holds.
async fn wait_status(proxy: &Running, done: impl Fn(&Value) -> bool) -> Value {
    wait_rollout(proxy, "/v1/routes/api/rollout", done).await
}

async fn proxy_with(blue: &Upstream, canary: &Upstream) -> Running {
    let yaml = common::config(
        "metrics: { window: 60s }",
        &[("blue", blue.addr, 100.0), ("canary", canary.addr, 0.0)],
    );
    Running::start(&yaml).await
}

fn fast_rollout(steps: Value, extra: Value) -> String {
    let mut analysis =
        json!({"interval": "1s", "window": "5s", "min_requests": 20, "failure_threshold": 2});
    if let (Some(a), Some(e)) = (analysis.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    json!({"strategy": "canary", "stable": "blue", "target": "canary", "steps": steps, "analysis": analysis}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_answering_ten_percent_500s_is_rolled_back_in_bounded_time() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::failing(10)).await;
    let proxy = proxy_with(&blue, &canary).await;
    let body = fast_rollout(
        json!([{"weight": 50, "hold": "60s"}, {"weight": 100}]),
        json!({}),
    );
    let (status, started) = api(&proxy, "POST", "/v1/routes/api/rollout", &body).await;
    assert_eq!(status, 201, "{started}");
    assert_eq!(started["weights"], json!({"blue": 50, "canary": 50}));

    let traffic = Traffic::start(&proxy);
    canary.wait_for_arrivals(10).await; // the 10th canary request is the first 500
    let first_failure = Instant::now();
    let status = wait_status(&proxy, |s| s["phase"] == "rolled-back").await;
    let to_rollback = first_failure.elapsed();
    // interval × failure_threshold + one interval, plus the status poll's 50 ms
    // and scheduling slack.
    let bound = Duration::from_secs(3) + Duration::from_millis(500);
    println!("first failing request to weight 0: {to_rollback:?} (bound {bound:?})");
    assert!(to_rollback <= bound, "rollback took {to_rollback:?}");
    assert_eq!(status["weights"], json!({"blue": 100, "canary": 0}));
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("error_rate"), "{reason}");
    let checks = &status["last_analysis"]["checks"];
    assert_eq!(checks[0]["check"], "error_rate");
    assert_eq!(checks[0]["verdict"], "fail");

    // After the swap the canary gets nothing; its users are back on blue.
    let arrived = canary.arrived.load(Ordering::SeqCst);
    let sent_more = {
        let c = client();
        for i in 0..300 {
            let (s, _, b) = get(&c, &proxy.url("/"), &[("x-user-id", &format!("user-{i}"))]).await;
            assert_eq!((s.as_u16(), b.as_str()), (200, "blue\n"));
        }
        300
    };
    assert_eq!(sent_more, 300);
    traffic.stop().await;
    // Requests in flight at the swap may still land; none after the check above.
    let after = canary.arrived.load(Ordering::SeqCst);
    assert!(
        after - arrived <= 64,
        "{} canary requests after the rollback",
        after - arrived
    );

    let (_, events) = api(&proxy, "GET", "/v1/events", "").await;
    let rollback = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "rollout.rollback")
        .cloned();
    let rollback = rollback.expect("a rollback event");
    assert_eq!(rollback["actor"], "auto-rollback");
    assert!(rollback["after"]["reason"]
        .as_str()
        .unwrap()
        .contains("error_rate"));
    let (_, _, metrics) = get(&client(), &format!("http://{}/metrics", proxy.admin), &[]).await;
    assert!(
        metrics.contains(r#"switchyard_rollbacks_total{route="api"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"switchyard_rollout_step{route="api"} -1"#),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"switchyard_analysis_checks_total{check="error_rate",route="api",verdict="fail"}"#
    ));

    // It stays rolled back: a new rollout must be started deliberately.
    let (status, _) = api(&proxy, "POST", "/v1/routes/api/rollout/resume", "").await;
    assert_eq!(status, 409);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_three_times_slower_than_stable_is_rolled_back_by_the_relative_check() {
    let blue = Upstream::start("blue", Behaviour::Delay(Duration::from_millis(10))).await;
    let canary = Upstream::start("canary", Behaviour::Delay(Duration::from_millis(30))).await;
    let proxy = proxy_with(&blue, &canary).await;
    let body = fast_rollout(
        json!([{"weight": 50, "hold": "60s"}, {"weight": 100}]),
        json!({}),
    );
    assert_eq!(
        api(&proxy, "POST", "/v1/routes/api/rollout", &body).await.0,
        201
    );
    let traffic = Traffic::start(&proxy);
    let status = wait_status(&proxy, |s| s["phase"] != "progressing").await;
    traffic.stop().await;
    assert_eq!(status["phase"], "rolled-back", "{status}");
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains("p95_ratio") && !reason.contains("error_rate"),
        "{reason}"
    );
    let p95 = status["last_analysis"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "p95")
        .unwrap()
        .clone();
    assert_eq!(p95["verdict"], "pass", "under the absolute limit: {p95}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_traffic_and_too_little_traffic_never_advance() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let proxy = proxy_with(&blue, &canary).await;
    let body = fast_rollout(
        json!([{"weight": 50, "hold": "1s"}, {"weight": 100}]),
        json!({"min_requests": 1000}),
    );
    assert_eq!(
        api(&proxy, "POST", "/v1/routes/api/rollout", &body).await.0,
        201
    );

    // No traffic: three inconclusive analyses, still step 0, nothing held.
    let status = wait_status(&proxy, |s| s["inconclusive_for"] == "3s").await;
    assert_eq!(
        (status["step"].clone(), status["held"].clone()),
        (json!(0), json!("0s"))
    );
    assert_eq!(status["last_analysis"]["verdict"], "inconclusive");

    // Some traffic, but under min_requests in the window: still nothing.
    let c = client();
    for i in 0..100 {
        get(&c, &proxy.url("/"), &[("x-user-id", &format!("u{i}"))]).await;
    }
    let status = wait_status(&proxy, |s| s["inconclusive_for"] == "5s").await;
    assert_eq!(status["step"], 0);
    assert!(status["last_analysis"]["target_requests"].as_u64().unwrap() > 0);
    assert_eq!(status["phase"], "progressing");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_goes_through_every_step_to_promotion() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let proxy = proxy_with(&blue, &canary).await;
    let body = fast_rollout(
        json!([{"weight": 10, "hold": "2s"}, {"weight": 50, "hold": "2s"}, {"weight": 100}]),
        json!({"min_requests": 10}),
    );
    assert_eq!(
        api(&proxy, "POST", "/v1/routes/api/rollout", &body).await.0,
        201
    );
    let traffic = Traffic::start(&proxy);
    let status = wait_status(&proxy, |s| s["phase"] != "progressing").await;
    traffic.stop().await;
    assert_eq!(status["phase"], "promoted", "{status}");
    assert_eq!(status["weights"], json!({"blue": 0, "canary": 100}));
    let (_, events) = api(&proxy, "GET", "/v1/events", "").await;
    let actions: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "rollout.start",
            "rollout.step",
            "rollout.step",
            "rollout.promote"
        ]
    );
    assert_eq!(
        common::backend_of(&client(), &proxy, "anyone").await,
        "canary"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn rollout_api_validates_and_controls() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let proxy = proxy_with(&blue, &canary).await;
    assert_eq!(
        api(&proxy, "GET", "/v1/routes/api/rollout", "").await.0,
        404
    );
    let bad = [
        (json!({"stable": "blue", "target": "blue"}).to_string(), "must differ"),
        (json!({"stable": "blue", "target": "purple"}).to_string(), "no backend `purple`"),
(json!({"stable": "blue", "target": "canary", "strategy": "blue-green", "steps": [{"weight": 50}]}).to_string(), "ends at 100"),
        (json!({"stable": "blue", "target": "canary", "validation": "1m"}).to_string(), "only blue-green"),
        (json!({"stable": "blue", "target": "canary", "steps": [{"weight": 50, "hold": "1s"}, {"weight": 10}]}).to_string(), "increase"),
        (json!({"stable": "blue", "target": "canary", "steps": [{"weight": 50}, {"weight": 100}]}).to_string(), "needs a hold"),
        (json!({"stable": "blue", "target": "canary", "analysis": {"window": "2h"}}).to_string(), "analysis.window"),
        (json!({"stable": "blue", "target": "canary", "colour": "red"}).to_string(), "colour"),
    ];
    for (body, want) in bad {
        let (status, v) = api(&proxy, "POST", "/v1/routes/api/rollout", &body).await;
        assert_eq!(status, 422, "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(want),
            "{body}: {v}"
        );
    }
    assert_eq!(
        api(&proxy, "GET", "/v1/state", "").await.1["version"],
        0,
        "rejected starts changed nothing"
    );

    // Defaults: the reference plan's steps, starting at 0.1 %.
    let (status, v) = api(
        &proxy,
        "POST",
        "/v1/routes/api/rollout",
        r#"{"stable": "blue", "target": "canary"}"#,
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["steps"].as_array().unwrap().len(), 5);
    assert_eq!(v["weights"], json!({"blue": 99.9, "canary": 0.1}));
    assert_eq!(
        api(
            &proxy,
            "POST",
            "/v1/routes/api/rollout",
            r#"{"stable": "blue", "target": "canary"}"#
        )
        .await
        .0,
        409
    );

    let (status, v) = api(&proxy, "POST", "/v1/routes/api/rollout/pause", "").await;
    assert_eq!((status, v["phase"].clone()), (200, json!("paused")));
    assert_eq!(
        api(&proxy, "POST", "/v1/routes/api/rollout/pause", "")
            .await
            .0,
        409
    );
    let (status, v) = api(&proxy, "PUT", "/v1/routes/api/weights", r#"{"blue": 100}"#).await;
    assert_eq!(status, 409, "manual weights during a rollout: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("under way"),
        "{v}"
    );
    let (_, v) = api(&proxy, "POST", "/v1/routes/api/rollout/resume", "").await;
    assert_eq!(v["phase"], "progressing");
    let (_, v) = api(&proxy, "POST", "/v1/routes/api/rollout/promote", "").await;
    assert_eq!(
        (v["phase"].clone(), v["weights"].clone()),
        (json!("promoted"), json!({"blue": 0, "canary": 100}))
    );
    assert_eq!(
        api(&proxy, "POST", "/v1/routes/api/rollout/abort", "")
            .await
            .0,
        409
    );
    assert_eq!(
        api(&proxy, "POST", "/v1/routes/api/rollout/explode", "")
            .await
            .0,
        404
    );

    // A new rollout after the old one ended; aborting puts the target at 0.
    proxy
        .handle
        .set_weights("api", &[("blue", 100.0)])
        .await
        .unwrap();
    assert_eq!(
        api(
            &proxy,
            "POST",
            "/v1/routes/api/rollout",
            r#"{"stable": "blue", "target": "canary"}"#
        )
        .await
        .0,
        201
    );
    let (_, v) = api(&proxy, "POST", "/v1/routes/api/rollout/abort", "").await;
    assert_eq!(
        (v["phase"].clone(), v["weights"].clone()),
        (json!("aborted"), json!({"blue": 100, "canary": 0}))
    );
    assert!(v["reason"]
        .as_str()
        .unwrap()
        .contains("aborted by anonymous"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_gate_holds_the_step_and_notifications_carry_the_reason() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let gate = Receiver::start(503).await;
    let notify = Receiver::start(200).await;
    let proxy = proxy_with(&blue, &canary).await;
    let mut body: Value = serde_json::from_str(&fast_rollout(
        json!([{"weight": 10, "hold": "1s"}, {"weight": 50, "hold": "1h"}, {"weight": 100}]),
        json!({"min_requests": 10}),
    ))
    .unwrap();
    body["webhooks"] = json!({
        "gate": format!("http://{}/gate", gate.addr),
        "notify": [format!("http://{}/events", notify.addr)],
        "timeout": "1s", "retries": 0,
    });
    assert_eq!(
        api(&proxy, "POST", "/v1/routes/api/rollout", &body.to_string())
            .await
            .0,
        201
    );
    let traffic = Traffic::start(&proxy);

    // The gate says no: the hold is long done, yet the step stays.
    let held = wait_status(&proxy, |s| {
        s["reason"]
            .as_str()
            .is_some_and(|r| r.contains("gate holds"))
    })
    .await;
    assert_eq!(held["step"], 0);
    assert!(held["reason"].as_str().unwrap().contains("503"), "{held}");
    let asked = gate.wait_for("gate").await;
    assert_eq!(
        (asked["route"].clone(), asked["step"].clone()),
        (json!("api"), json!(0))
    );

    // The gate opens: the rollout moves on, and the receiver hears of it.
    gate.status.store(200, Ordering::SeqCst);
    wait_status(&proxy, |s| s["step"] == 1).await;
    let step = notify.wait_for("step").await;
    assert_eq!(
        (step["step"].clone(), step["target_weight"].clone()),
        (json!(1), json!(50))
    );

    // An operator's abort is announced too, saying who did it.
    let (status, _) = api(&proxy, "POST", "/v1/routes/api/rollout/abort", "").await;
    assert_eq!(status, 200);
    let aborted = notify.wait_for("abort").await;
    assert_eq!(aborted["phase"], "aborted");
    assert!(
        aborted["reason"].as_str().unwrap().contains("aborted by"),
        "{aborted}"
    );
    traffic.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollback_webhook_names_the_breach() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::failing(2)).await;
    let notify = Receiver::start(200).await;
    let proxy = proxy_with(&blue, &canary).await;
    let mut body: Value = serde_json::from_str(&fast_rollout(
        json!([{"weight": 50, "hold": "1h"}, {"weight": 100}]),
        json!({}),
    ))
    .unwrap();
    body["webhooks"] = json!({"notify": [format!("http://{}/events", notify.addr)]});
    assert_eq!(
        api(&proxy, "POST", "/v1/routes/api/rollout", &body.to_string())
            .await
            .0,
        201
    );
    let traffic = Traffic::start(&proxy);
    let rollback = notify.wait_for("rollback").await;
    traffic.stop().await;
    assert_eq!(rollback["phase"], "rolled-back");
    assert_eq!(rollback["target_weight"], 0);
    let reason = rollback["reason"].as_str().unwrap();
    assert!(
        reason.contains("error_rate") && reason.contains("> 2"),
        "{reason}"
    );
    assert_eq!(rollback["analysis"]["verdict"], "fail");
    proxy.stop().await;
}

#[tokio::test]
async fn webhook_urls_are_validated() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let proxy = proxy_with(&blue, &canary).await;
    for hooks in [
        json!({"gate": "https://x/gate"}),
        json!({"notify": ["not a url"]}),
        json!({"retries": 50}),
    ] {
        let body = json!({"stable": "blue", "target": "canary", "webhooks": hooks}).to_string();
        let (status, v) = api(&proxy, "POST", "/v1/routes/api/rollout", &body).await;
        assert_eq!(status, 422, "{hooks}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("webhooks"),
            "{v}"
        );
    }
    proxy.stop().await;
}

/// Blue-green with the new colour listed first: shift, validate at 100 %,
/// swap roles keeping the old colour as standby, then roll back to it in one
/// swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_shifts_validates_swaps_and_rolls_back_instantly() {
    let green = Upstream::start("green", Behaviour::Name).await;
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let yaml = common::config(
        "",
        &[("green", green.addr, 0.0), ("blue", blue.addr, 100.0)],
    );
    let proxy = Running::start(&yaml).await;
    let body = json!({
        "strategy": "blue-green", "stable": "blue", "target": "green",
        "steps": [{"weight": 50, "hold": "1s"}, {"weight": 100}],
        "validation": "2s",
        "analysis": {"interval": "1s", "window": "5s", "min_requests": 10},
    });
    let (status, started) = api(&proxy, "POST", "/v1/routes/api/rollout", &body.to_string()).await;
    assert_eq!(status, 201, "{started}");
    assert_eq!(started["weights"], json!({"green": 50, "blue": 50}));
    assert_eq!(
        started["steps"][1]["hold"], "2s",
        "the last step holds for the validation period"
    );

    // Users on green at 50 % stay on green: green owns the first buckets.
    let c = client();
    let mut on_green = Vec::new();
    for i in 0..200 {
        let user = format!("user-{i}");
        if common::backend_of(&c, &proxy, &user).await == "green" {
            on_green.push(user);
        }
    }
    assert!(!on_green.is_empty());

    let traffic = Traffic::start(&proxy);
    let at_full = wait_status(&proxy, |s| s["step"] == 1).await;
    assert_eq!(at_full["weights"], json!({"green": 100, "blue": 0}));
    for user in &on_green {
        assert_eq!(
            common::backend_of(&c, &proxy, user).await,
            "green",
            "{user} moved off green"
        );
    }
    let promoted = wait_status(&proxy, |s| s["phase"] != "progressing").await;
    traffic.stop().await;
    assert_eq!(promoted["phase"], "promoted", "{promoted}");
    assert_eq!(promoted["standby"], "blue");

    // Instant rollback to the standby colour.
    let (status, back) = api(&proxy, "POST", "/v1/routes/api/rollout/rollback", "").await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["phase"], "rolled-back");
    assert_eq!(back["weights"], json!({"green": 0, "blue": 100}));
    for user in &on_green {
        assert_eq!(common::backend_of(&c, &proxy, user).await, "blue");
    }
    assert_eq!(
        api(&proxy, "POST", "/v1/routes/api/rollout/rollback", "")
            .await
            .0,
        409
    );
    proxy.stop().await;
}

/// Sums `switchyard_analysis_checks_total` for `check`, all verdicts.
async fn analyses(proxy: &Running, check: &str) -> u64 {
    let (_, _, text) = call(
        "GET",
        &format!("http://{}/metrics", proxy.admin),
        None,
        &[],
        "",
    )
    .await;
    text.lines()
        .filter(|l| {
            l.starts_with("switchyard_analysis_checks_total{")
                && l.contains(&format!("check=\"{check}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Issue 18: a client's failure is never the backend's. POSTs that declare
/// 1,000 bytes, send 10 and close (what rolled a healthy canary back from
/// outside: `error_rate 4.261 > 2`) are counted as the clients' own
/// (`reason="client_body"`), outside the canary's window, so its rollout
/// holds through several analyses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_abandoning_their_bodies_never_roll_a_healthy_canary_back() {
    use tokio::io::AsyncWriteExt;
    let blue = Upstream::start("blue", Behaviour::EchoBody).await;
    let canary = Upstream::start("canary", Behaviour::EchoBody).await;
    let proxy = proxy_with(&blue, &canary).await;
    let body = fast_rollout(
        json!([{"weight": 50, "hold": "1h"}, {"weight": 100}]),
        json!({"min_requests": 10, "failure_threshold": 1}),
    );
    let (status, started) = api(&proxy, "POST", "/v1/routes/api/rollout", &body).await;
    assert_eq!(status, 201, "{started}");
    let traffic = Traffic::start(&proxy);
    for i in 0..150 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nx-user-id: abandoner-{i}\r\nContent-Length: 1000\r\n\r\n0123456789"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // Closed with 990 bytes still owed.
        drop(s);
    }
    // Three analyses judge windows holding the abandoned uploads.
    let deadline = Instant::now() + Duration::from_secs(30);
    while analyses(&proxy, "error_rate").await < 3 {
        assert!(Instant::now() < deadline, "no analyses");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    traffic.stop().await;
    let (_, status) = api(&proxy, "GET", "/v1/routes/api/rollout", "").await;
    assert_eq!(status["phase"], "progressing", "{status}");
    assert_eq!(status["consecutive_failures"], 0, "{status}");
    let client_body = common::metric(
        proxy.admin,
        r#"switchyard_upstream_failures_total{backend="canary",reason="client_body",route="api"}"#,
    )
    .await;
    assert!(
        client_body > 10,
        "abandoned canary uploads counted: {client_body}"
    );
    let resets = common::metric(
        proxy.admin,
        r#"switchyard_upstream_failures_total{backend="canary",reason="reset",route="api"}"#,
    )
    .await;
    assert_eq!(resets, 0, "no abandoned upload is the canary's reset");
}

/// Issue 18: a chunked body with a bad or overflowing chunk size is the
/// client's error: 400, as nginx answers, not a 502 blamed on the backend.
#[tokio::test]
async fn a_malformed_chunked_body_is_a_400() {
    let blue = Upstream::start("blue", Behaviour::EchoBody).await;
    let canary = Upstream::start("canary", Behaviour::EchoBody).await;
    let proxy = proxy_with(&blue, &canary).await;
    for size in ["zz", "ffffffffffffffffffff"] {
        let request = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n"
        );
        let answer = common::raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "chunk size {size}: {answer}"
        );
    }
    let resets = common::metric(
        proxy.admin,
        r#"switchyard_upstream_failures_total{backend="blue",reason="reset",route="api"}"#,
    )
    .await;
    assert_eq!(resets, 0);
}

/// Issue 18: a client too slow to send its body gets 408 when
/// `timeouts.upload_idle` passes without its bytes, counted as its own
/// failure (`client_body`), not as the backend's timeout.
#[tokio::test]
async fn a_client_too_slow_with_its_body_gets_408_not_the_backend_a_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Upstream::start("blue", Behaviour::EchoBody).await;
    let yaml = common::config(
        "timeouts: { upload_idle: 300ms }",
        &[("blue", blue.addr, 100.0)],
    );
    let proxy = Running::start(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0")
        .await
        .unwrap();
    // The other nine bytes never come; the answer does.
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let client_body = common::metric(
        proxy.admin,
        r#"switchyard_upstream_failures_total{backend="blue",reason="client_body",route="api"}"#,
    )
    .await;
    assert_eq!(client_body, 1);
    let timeouts = common::metric(
        proxy.admin,
        r#"switchyard_upstream_failures_total{backend="blue",reason="timeout",route="api"}"#,
    )
    .await;
    assert_eq!(timeouts, 0, "the backend is not blamed");
    proxy.stop().await;
}

/// Issue 20: `switchyard ctl rollout watch` follows a rollout until it
/// ends and says how by its exit status, so a pipeline can gate on it: 0
/// promoted, 2 rolled back, 3 aborted, 4 when `--timeout` passes first;
/// `status --watch` is the same. Out of a terminal it prints each change
/// once, without escape codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_watch_exits_with_the_outcome() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let proxy = proxy_with(&blue, &canary).await;
    let spec = fast_rollout(
        json!([{"weight": 10, "hold": "1h"}, {"weight": 100}]),
        json!({}),
    );
    let admin = format!("http://{}", proxy.admin);
    let watch = |extra: &'static [&'static str]| {
        let admin = admin.clone();
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["ctl", "--admin", &admin, "rollout"])
            .args(extra)
            .env_remove("SWITCHYARD_TOKEN")
            .kill_on_drop(true)
            .output()
    };
    for (action, code) in [("promote", 0), ("rollback", 2), ("abort", 3)] {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let (status, body) = api(&proxy, "POST", "/v1/routes/api/rollout", &spec).await;
        assert_eq!(status, 201, "{body}");
        let mut watching = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "ctl",
                "--admin",
                &admin,
                "rollout",
                "watch",
                "api",
                "--timeout",
                "60s",
            ])
            .env_remove("SWITCHYARD_TOKEN")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The watch has drawn the progressing rollout: act on it then.
        let mut stdout = tokio::io::BufReader::new(watching.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).await.unwrap();
        assert!(first.contains("(progressing)"), "{first}");
        let path = format!("/v1/routes/api/rollout/{action}");
        let (status, body) = api(&proxy, "POST", &path, "").await;
        assert_eq!(status, 200, "{action}: {body}");
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).await.unwrap();
        let exit = watching.wait().await.unwrap();
        let stdout = first + &rest;
        assert_eq!(exit.code(), Some(code), "{action}: {stdout}");
        assert!(
            !stdout.contains('\x1b'),
            "no escape codes in a pipe: {stdout}"
        );
        if action != "promote" {
            assert!(stdout.contains(&format!("rollout.{action}")), "{stdout}");
        }
    }
    // Still progressing when the timeout passes.
    let (status, _) = api(&proxy, "POST", "/v1/routes/api/rollout", &spec).await;
    assert_eq!(status, 201);
    let out = watch(&["status", "api", "--watch", "--timeout", "1s"])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("still progressing"), "{stderr}");
    // No such route: refused, 1.
    let out = watch(&["watch", "nosuch"]).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    proxy.stop().await;
}

/// Issue 20: an ended rollout, canary as blue-green, can be undone: the
/// route goes back to exactly the weights it had before (audited), and an
/// active one cannot. `ctl rollout start -f` takes any spec the API takes,
/// as YAML; a bad file is the user's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_rollout_is_undone_to_the_weights_before_it() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let proxy = Running::start(&common::config(
        "",
        &[("blue", blue.addr, 85.0), ("canary", canary.addr, 15.0)],
    ))
    .await;
    let weights = |v: &Value| (v["weights"]["blue"].clone(), v["weights"]["canary"].clone());
    let spec = fast_rollout(
        json!([{"weight": 20, "hold": "1h"}, {"weight": 100}]),
        json!({}),
    );
    for ending in ["promote", "abort", "rollback"] {
        let (status, body) = api(&proxy, "POST", "/v1/routes/api/rollout", &spec).await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = api(&proxy, "POST", "/v1/routes/api/rollout/undo", "").await;
        assert_eq!(status, 409, "undo while active: {body}");
        let path = format!("/v1/routes/api/rollout/{ending}");
        assert_eq!(api(&proxy, "POST", &path, "").await.0, 200);
        let (status, body) = api(&proxy, "POST", "/v1/routes/api/rollout/undo", "").await;
        assert_eq!(status, 200, "{ending}: {body}");
        assert_eq!(body["phase"], "rolled-back", "{body}");
        assert_eq!(weights(&body), (json!(85), json!(15)), "{ending}: {body}");
    }
    let (_, events) = api(&proxy, "GET", "/v1/events?limit=1000", "").await;
    let undos = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "rollout.undo")
        .count();
    assert_eq!(undos, 3);

    // Blue-green from a YAML file through ctl; promoted, then undone.
    let dir = common::temp_dir("spec-file");
    let file = dir.join("blue-green.yaml");
    std::fs::write(
        &file,
        "strategy: blue-green\nstable: blue\ntarget: canary\nvalidation: 1h\nanalysis: { interval: 1s, window: 5s }\n",
    )
    .unwrap();
    let admin = format!("http://{}", proxy.admin);
    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["ctl", "--admin", &admin, "rollout"])
            .args(args)
            .env_remove("SWITCHYARD_TOKEN")
            .output()
            .unwrap()
    };
    let out = ctl(&["start", "api", "-f", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("blue -> canary (progressing)"), "{stdout}");
    let (_, status) = api(&proxy, "GET", "/v1/routes/api/rollout", "").await;
    assert_eq!(status["strategy"], "blue-green", "{status}");
    assert_eq!(ctl(&["promote", "api"]).status.code(), Some(0));
    let out = ctl(&["undo", "api"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("blue=85% canary=15%"), "{stdout}");
    // A file that is not there, or not a spec: 64, nothing started.
    std::fs::write(dir.join("list.yaml"), "- a\n- b\n").unwrap();
    for bad in ["missing.yaml", "list.yaml"] {
        let out = ctl(&["start", "api", "-f", dir.join(bad).to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{bad}");
    }
    let out = ctl(&[
        "start",
        "api",
        "-f",
        file.to_str().unwrap(),
        "--stable",
        "blue",
    ]);
    assert_eq!(out.status.code(), Some(64), "-f with flags");
    let _ = std::fs::remove_dir_all(&dir);
    proxy.stop().await;
}
