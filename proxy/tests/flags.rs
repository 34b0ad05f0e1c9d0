//! Feature flags end to end: what the upstream receives, what clients cannot
//! spoof, flag rules, OFREP, and agreement across processes and restarts.

mod common;

use std::collections::BTreeSet;

use common::{call, client, get, spawn_run_path, temp_dir, Behaviour, Running, Upstream};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use switchyard_control::bucket::bucket;

const TOKEN: &str = "flags-token-0123456789";

const FLAGS: &str = r#"
flags:
  - { name: everyone, rollout_percentage: 100, description: "on for all: a release switch", metrics: [requests] }
  - { name: killed, enabled: false, rollout_percentage: 100, overrides: { user-1: true } }
  - { name: vip, rollout_percentage: 0, overrides: { user-1: true } }
  - { name: beta-ui, rollout_percentage: 0, target_groups: [beta] }
  - { name: ten-percent, rollout_percentage: 10 }
"#;

/// The flag header the upstream saw, as a set of names (None if absent).
fn seen_flags(echo: &str) -> Option<BTreeSet<String>> {
    echo.lines()
        .find_map(|l| {
            l.strip_prefix("x-feature-flags: ")
                .or(l.strip_prefix("x-feature-flags:"))
        })
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn on_ten_percent(user: &str) -> bool {
    bucket("ten-percent", user.as_bytes()) < 1000
}

async fn echo_proxy(extra: &str) -> (Running, Upstream) {
    let echo = Upstream::start("echo", Behaviour::EchoHeaders).await;
    let yaml = format!(
        "{FLAGS}{extra}\nroutes:\n  - name: api\n    backends: [{{ name: echo, endpoints: [\"{}\"], weight: 100 }}]\n",
        echo.addr
    );
    (Running::start(&yaml).await, echo)
}

#[tokio::test]
async fn the_upstream_gets_the_flags_that_are_on_and_nothing_a_client_sends() {
    let (proxy, _echo) = echo_proxy("user_groups: { header: x-user-groups, trusted: true }").await;
    let c = client();
    let (_, _, body) = get(
        &c,
        &proxy.url("/"),
        &[
            ("x-user-id", "user-1"),
            ("x-user-groups", "staff, beta"),
            ("x-feature-flags", "killed,forged"),
        ],
    )
    .await;
    let mut want = set(&["everyone", "vip", "beta-ui"]);
    if on_ten_percent("user-1") {
        want.insert("ten-percent".into());
    }
    assert_eq!(seen_flags(&body), Some(want), "{body}");
    assert!(
        !body.contains("forged"),
        "a client's flag header reached the upstream:\n{body}"
    );
    // A trusted groups header is passed on.
    assert!(body.contains("x-user-groups: staff, beta"), "{body}");

    // Another user, no groups: only the percentage flags.
    let (_, _, body) = get(&c, &proxy.url("/"), &[("x-user-id", "user-2")]).await;
    let mut want = set(&["everyone"]);
    if on_ten_percent("user-2") {
        want.insert("ten-percent".into());
    }
    assert_eq!(seen_flags(&body), Some(want), "{body}");

    // Multiple client copies are all removed.
    let (_, _, body) = get(
        &c,
        &proxy.url("/"),
        &[
            ("x-user-id", "user-2"),
            ("x-feature-flags", "a"),
            ("x-feature-flags", "b"),
        ],
    )
    .await;
    assert_eq!(body.matches("x-feature-flags").count(), 1, "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn an_untrusted_groups_header_is_ignored_and_stripped() {
    let (proxy, _echo) = echo_proxy("").await;
    let (_, _, body) = get(
        &client(),
        &proxy.url("/"),
        &[("x-user-id", "user-2"), ("x-user-groups", "beta")],
    )
    .await;
    let flags = seen_flags(&body).unwrap();
    assert!(
        !flags.contains("beta-ui"),
        "an untrusted group turned a flag on: {flags:?}"
    );
    assert!(!body.contains("x-user-groups"), "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn without_flags_no_flag_header_goes_upstream() {
    let echo = Upstream::start("echo", Behaviour::EchoHeaders).await;
    let proxy = Running::start(&common::config("", &[("echo", echo.addr, 100.0)])).await;
    let (_, _, body) = get(
        &client(),
        &proxy.url("/"),
        &[("x-user-id", "u"), ("x-feature-flags", "forged")],
    )
    .await;
    assert_eq!(seen_flags(&body), None, "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_when_flag_rule_sends_flag_on_users_to_its_backend() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let yaml = format!(
        r#"
flags:
  - {{ name: career-selection-ai-v2, rollout_percentage: 10, overrides: {{ user-123: true, user-7: false }} }}
routes:
  - name: api
    backends:
      - {{ name: blue, endpoints: ["{}"], weight: 100 }}
      - {{ name: canary, endpoints: ["{}"], weight: 0 }}
    rules:
      - {{ when_flag: career-selection-ai-v2, backend: canary }}
"#,
        blue.addr, canary.addr
    );
    let proxy = Running::start(&yaml).await;
    let c = client();
    assert_eq!(common::backend_of(&c, &proxy, "user-123").await, "canary");
    assert_eq!(common::backend_of(&c, &proxy, "user-7").await, "blue");
    let mut on_canary = 0;
    for i in 0..400 {
        let user = format!("u{i}");
        let want = if bucket("career-selection-ai-v2", user.as_bytes()) < 1000 {
            "canary"
        } else {
            "blue"
        };
        let got = common::backend_of(&c, &proxy, &user).await;
        assert_eq!(got, want, "{user}");
        on_canary += usize::from(got == "canary");
    }
    assert!(
        (20..=60).contains(&on_canary),
        "{on_canary} of 400 users on the flag's backend"
    );

    // Switching the flag off through the API moves them back at once.
    let admin = format!("http://{}/v1/flags/career-selection-ai-v2", proxy.admin);
    let (status, _, body) = call("PATCH", &admin, None, &[], r#"{"enabled": false}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(common::backend_of(&c, &proxy, "user-123").await, "blue");
    // A flag a rule uses cannot be deleted out from under it.
    let (status, _, body) = call("DELETE", &admin, None, &[], "").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("when_flag"), "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn flag_evaluations_are_counted() {
    let (proxy, _echo) = echo_proxy("").await;
    for i in 0..20 {
        get(
            &client(),
            &proxy.url("/"),
            &[("x-user-id", &format!("user-{i}"))],
        )
        .await;
    }
    let (_, _, metrics) = get(&client(), &format!("http://{}/metrics", proxy.admin), &[]).await;
    assert!(
        metrics.contains(r#"switchyard_flag_evaluations_total{flag="everyone",result="on"} 20"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"switchyard_flag_evaluations_total{flag="killed",result="off"} 20"#),
        "{metrics}"
    );
    let ten_on = (0..20)
        .filter(|i| on_ten_percent(&format!("user-{i}")))
        .count();
    assert!(metrics.contains(&format!(
        r#"switchyard_flag_evaluations_total{{flag="ten-percent",result="on"}} {ten_on}"#
    )));
    proxy.stop().await;
}

async fn ofrep(
    admin: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, http::HeaderMap, Value) {
    let (status, headers, text) = call(
        "POST",
        &format!("http://{admin}/ofrep/v1/evaluate/flags{path}"),
        token,
        headers,
        body.to_owned(),
    )
    .await;
    (
        status.as_u16(),
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn ofrep_evaluates_like_the_proxy() {
    let dir = temp_dir("ofrep");
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let (proxy, _echo) = echo_proxy(&format!(
        "admin: {{ tokens: [{{ name: sdk, file: {}/token }}] }}\nuser_groups: {{ trusted: true }}",
        dir.display()
    ))
    .await;
    let admin = proxy.admin;
    let t = Some(TOKEN);

    let (status, _, v) = ofrep(
        admin,
        "/vip",
        t,
        &[],
        r#"{"context": {"targetingKey": "user-1"}}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"key": "vip", "value": true, "reason": "TARGETING_MATCH", "variant": "on", "metadata": {}})
    );
    let (_, _, v) = ofrep(
        admin,
        "/killed",
        t,
        &[],
        r#"{"context": {"targetingKey": "user-1"}}"#,
    )
    .await;
    assert_eq!(
        (v["value"].clone(), v["reason"].clone()),
        (json!(false), json!("DISABLED"))
    );
    let (_, _, v) = ofrep(admin, "/everyone", t, &[], r#"{}"#).await;
    assert_eq!(
        (v["value"].clone(), v["reason"].clone()),
        (json!(true), json!("STATIC"))
    );
    // The description travels as OFREP metadata.
    assert_eq!(
        v["metadata"],
        json!({"description": "on for all: a release switch"})
    );
    let (_, _, v) = ofrep(
        admin,
        "/beta-ui",
        t,
        &[],
        r#"{"context": {"targetingKey": "x", "groups": ["beta"]}}"#,
    )
    .await;
    assert_eq!(v["reason"], "TARGETING_MATCH");
    let (_, _, v) = ofrep(
        admin,
        "/ten-percent",
        t,
        &[],
        r#"{"context": {"targetingKey": "user-2"}}"#,
    )
    .await;
    assert_eq!(
        (v["value"].clone(), v["reason"].clone()),
        (json!(on_ten_percent("user-2")), json!("SPLIT"))
    );

    // Errors, in OFREP's shape.
    let cases = [
        (
            "/nope",
            r#"{"context": {"targetingKey": "u"}}"#,
            404,
            "FLAG_NOT_FOUND",
        ),
        (
            "/ten-percent",
            r#"{"context": {}}"#,
            400,
            "TARGETING_KEY_MISSING",
        ),
        (
            "/ten-percent",
            r#"{"context": {"targetingKey": 5}}"#,
            400,
            "INVALID_CONTEXT",
        ),
        (
            "/ten-percent",
            r#"{"context": "user"}"#,
            400,
            "INVALID_CONTEXT",
        ),
        (
            "/ten-percent",
            r#"{"context": {"targetingKey": "u", "groups": [1]}}"#,
            400,
            "INVALID_CONTEXT",
        ),
        ("/ten-percent", r#"{"context": "#, 400, "PARSE_ERROR"),
        (
            "",
            r#"{"context": {"targetingKey": 5}}"#,
            400,
            "INVALID_CONTEXT",
        ),
    ];
    for (path, body, want_status, code) in cases {
        let (status, _, v) = ofrep(admin, path, t, &[], body).await;
        assert_eq!(
            (status, v["errorCode"].as_str()),
            (want_status, Some(code)),
            "{path} {body}: {v}"
        );
    }
    assert_eq!(ofrep(admin, "/vip", None, &[], "{}").await.0, 401);
    assert_eq!(
        ofrep(admin, "", Some("wrong-token-0123456789"), &[], "{}")
            .await
            .0,
        401
    );

    // Bulk: the same answers the proxy sends upstream, for many users.
    let c = client();
    for i in 0..100 {
        let user = format!("user-{i}");
        let body = json!({"context": {"targetingKey": user, "groups": "beta"}}).to_string();
        let (status, _, v) = ofrep(admin, "", t, &[], &body).await;
        assert_eq!(status, 200);
        let by_ofrep: BTreeSet<String> = v["flags"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["value"] == json!(true))
            .map(|f| f["key"].as_str().unwrap().to_owned())
            .collect();
        let (_, _, echo) = get(
            &c,
            &proxy.url("/"),
            &[("x-user-id", &user), ("x-user-groups", "beta")],
        )
        .await;
        assert_eq!(seen_flags(&echo).unwrap(), by_ofrep, "{user}");
    }

    // ETag and If-None-Match.
    let body = r#"{"context": {"targetingKey": "user-1"}}"#;
    let (status, headers, _) = ofrep(admin, "", t, &[], body).await;
    assert_eq!(status, 200);
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let (status, _, _) = ofrep(admin, "", t, &[("if-none-match", &etag)], body).await;
    assert_eq!(status, 304);
    let (status, _, _) = ofrep(
        admin,
        "",
        t,
        &[("if-none-match", &etag)],
        r#"{"context": {"targetingKey": "user-2"}}"#,
    )
    .await;
    assert_eq!(status, 200, "another user's answer is not the cached one");
    let flag = format!("http://{admin}/v1/flags/vip");
    let (status, _, _) = call("PATCH", &flag, t, &[], r#"{"enabled": false}"#).await;
    assert_eq!(status, 200);
    let (status, _, _) = ofrep(admin, "", t, &[("if-none-match", &etag)], body).await;
    assert_eq!(status, 200, "a changed flag changes the tag");
    proxy.stop().await;
}

/// The flags a user gets from a proxy process, through an echo upstream.
async fn flags_of(data: std::net::SocketAddr, users: &[String]) -> Vec<BTreeSet<String>> {
    let c = client();
    let mut out = Vec::new();
    for user in users {
        let (_, _, body) = get(&c, &format!("http://{data}/"), &[("x-user-id", user)]).await;
        out.push(seen_flags(&body).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_and_a_restart_agree_on_every_user() {
    let echo = Upstream::start("echo", Behaviour::EchoHeaders).await;
    let dir = temp_dir("flag-procs");
    let yaml = format!(
        "{FLAGS}listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nroutes:\n  - name: api\n    backends: [{{ name: echo, endpoints: [\"{}\"], weight: 100 }}]\n",
        echo.addr
    );
    let path = dir.join("switchyard.yaml");
    std::fs::write(&path, yaml).unwrap();
    let users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();

    let (mut a, data_a, _) = spawn_run_path(&path, &[]);
    let (mut b, data_b, _) = spawn_run_path(&path, &[]);
    let from_a = flags_of(data_a, &users).await;
    assert_eq!(
        flags_of(data_b, &users).await,
        from_a,
        "two processes disagree"
    );
    let on = from_a.iter().filter(|f| f.contains("ten-percent")).count();
    assert!(
        (15..=45).contains(&on),
        "{on} of 300 users have the 10% flag"
    );

    kill(Pid::from_raw(a.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(a.wait().unwrap().code(), Some(0));
    let (mut again, data_again, _) = spawn_run_path(&path, &[]);
    assert_eq!(
        flags_of(data_again, &users).await,
        from_a,
        "a restart changed answers"
    );
    for child in [&mut b, &mut again] {
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0));
    }
}

/// Issue 21: a watched flag's requests are counted in its `on` or `off`
/// cohort by status class (and latency when asked); an unwatched flag has
/// no series. The upstream fails exactly the flag's users: the `on` cohort
/// holds every 5xx, the `off` cohort none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_flags_cohorts_are_counted_apart() {
    let upstream = Upstream::start("app", Behaviour::FailFlag("new-ui")).await;
    let upstream = upstream.addr;
    let yaml = format!(
        "flags:\n  - {{ name: new-ui, rollout_percentage: 50, metrics: [requests, errors, latency] }}\n  - {{ name: quiet, rollout_percentage: 50 }}\nretries: {{ attempts: 0 }}\nroutes:\n  - name: api\n    backends: [{{ name: app, endpoints: [\"{upstream}\"], weight: 100 }}]\n"
    );
    let proxy = Running::start(&yaml).await;
    let c = client();
    let mut answered = std::collections::BTreeMap::new();
    for i in 0..200 {
        let (status, _, _) = get(&c, &proxy.url("/"), &[("x-user-id", &format!("u{i}"))]).await;
        *answered.entry(status.as_u16()).or_insert(0u64) += 1;
    }
    let on = answered.get(&500).copied().unwrap_or(0);
    let off = answered.get(&200).copied().unwrap_or(0);
    assert!(on > 50 && off > 50 && on + off == 200, "{answered:?}");
    let admin = proxy.admin;
    let metric = |cls: &str, variant: &str| {
        let series = format!(
            "switchyard_flag_requests_total{{code_class=\"{cls}\",flag=\"new-ui\",variant=\"{variant}\"}}"
        );
        async move { common::metric(admin, &series).await }
    };
    assert_eq!(metric("5xx", "on").await, on);
    assert_eq!(metric("2xx", "off").await, off);
    assert_eq!(metric("2xx", "on").await, 0);
    assert_eq!(metric("5xx", "off").await, 0);
    let (_, _, text) = get(&c, &format!("http://{}/metrics", proxy.admin), &[]).await;
    assert!(
        !text.contains("flag=\"quiet\",variant"),
        "an unwatched flag has no cohorts"
    );
    assert!(
        text.contains(
            "switchyard_flag_request_duration_seconds_count{flag=\"new-ui\",variant=\"on\"}"
        ),
        "latency is kept"
    );
    let counted = |series: &'static str| common::metric(admin, series);
    assert_eq!(
        counted("switchyard_flag_request_duration_seconds_count{flag=\"new-ui\",variant=\"on\"}")
            .await,
        on
    );
    assert_eq!(
        counted(
            "switchyard_flag_request_duration_seconds_bucket{flag=\"new-ui\",variant=\"off\",le=\"+Inf\"}"
        )
        .await,
        off
    );
    // Side by side: every error in the on cohort, beyond noise.
    let stats_url = |flag: &str| format!("http://{}/v1/flags/{flag}/stats", proxy.admin);
    let (status, _, body) = call("GET", &stats_url("new-ui"), None, &[], "").await;
    assert_eq!(status, 200, "{body}");
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["cohorts"]["on"]["requests"], on, "{stats}");
    assert_eq!(stats["cohorts"]["on"]["error_rate"], 100.0, "{stats}");
    assert_eq!(stats["cohorts"]["off"]["errors"], 0, "{stats}");
    assert!(stats["cohorts"]["on"]["p95_ms"].is_number(), "{stats}");
    assert_eq!(
        stats["error_rate_difference"]["beyond_noise"], true,
        "{stats}"
    );
    let (status, _, body) = call("GET", &stats_url("quiet"), None, &[], "").await;
    assert_eq!(status, 409, "not watched: {body}");
    assert!(body.contains("metrics"), "{body}");
    let (status, _, _) = call("GET", &stats_url("nope"), None, &[], "").await;
    assert_eq!(status, 404);
    let admin = format!("http://{}", proxy.admin);
    let (_, table, _) = common::switchyard(&["ctl", "--admin", &admin, "flag", "stats", "new-ui"]);
    assert!(
        table.contains("COHORT") && table.contains("100.00 %") && table.contains("beyond noise"),
        "{table}"
    );
    proxy.stop().await;
}
