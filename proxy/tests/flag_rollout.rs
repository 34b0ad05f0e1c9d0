//! Issue 21: guarded flag rollouts, end to end. A real upstream breaks for
//! the users who get the flag (`Behaviour::FailFlag`), steady traffic comes
//! from distinct users, and the driver judges the flag's `on` cohort
//! against its `off` cohort on the same engine as route rollouts.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::rollouts::{api, wait_rollout, Receiver, Traffic};
use common::{client, get, Behaviour, Running, Upstream};
use serde_json::{json, Value};
use switchyard_control::bucket::bucket;

const ROLLOUT: &str = "/v1/flags/new-ui/rollout";

/// A proxy in front of `upstream` with the flag `new-ui` at `percentage`
/// (watched by no signal: the rollout gives it its cohorts).
async fn proxy_with_flag(upstream: &Upstream, percentage: f64) -> Running {
    let yaml = format!(
        "metrics: {{ window: 60s }}\nretries: {{ attempts: 0 }}\nflags:\n  - {{ name: new-ui, rollout_percentage: {percentage} }}\nroutes:\n  - name: api\n    backends: [{{ name: app, endpoints: [\"{}\"], weight: 100 }}]\n",
        upstream.addr
    );
    Running::start(&yaml).await
}

/// A rollout body with fast analyses (1 s interval, 5 s window, 20
/// requests, two failures roll back) and `extra` over it.
fn fast_flag_rollout(steps: Value, extra: Value) -> String {
    let mut spec = json!({
        "steps": steps,
        "analysis": {"interval": "1s", "window": "5s", "min_requests": 20, "failure_threshold": 2},
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    spec.to_string()
}

async fn wait_flag(proxy: &Running, done: impl Fn(&Value) -> bool) -> Value {
    wait_rollout(proxy, ROLLOUT, done).await
}

/// Whether `user` has the flag at `percentage` (the bucket rule, salted
/// with the flag's name).
fn on_at(user: &str, percentage: f64) -> bool {
    f64::from(bucket("new-ui", user.as_bytes())) < percentage * 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_that_breaks_its_users_is_reverted_in_bounded_time() {
    let upstream = Upstream::start("app", Behaviour::FailFlag("new-ui")).await;
    let proxy = proxy_with_flag(&upstream, 0.0).await;
    let hooks = Receiver::start(200).await;
    let traffic = Traffic::start(&proxy);
    let body = fast_flag_rollout(
        json!([{"rollout_percentage": 20, "hold": "60s"}, {"rollout_percentage": 100}]),
        json!({"webhooks": {"notify": [format!("http://{}/n", hooks.addr)]}}),
    );
    let (status, started) = api(&proxy, "POST", ROLLOUT, &body).await;
    let began = Instant::now();
    assert_eq!(status, 201, "{started}");
    assert_eq!(started["rollout_percentage"], 20, "{started}");
    assert_eq!(started["start"]["rollout_percentage"], 0, "{started}");

    let status = wait_flag(&proxy, |s| s["phase"] == "rolled-back").await;
    let to_revert = began.elapsed();
    // The flag's users fail from the first request after the start:
    // interval × failure_threshold + one interval, plus the status poll's
    // 50 ms and scheduling slack.
    let bound = Duration::from_secs(3) + Duration::from_millis(500);
    println!("rollout start to revert: {to_revert:?} (bound {bound:?})");
    assert!(to_revert <= bound, "revert took {to_revert:?}");
    assert_eq!(status["rollout_percentage"], 0, "{status}");
    assert_eq!(status["enabled"], true, "reverted, not killed: {status}");
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("error_rate"), "{reason}");
    assert_eq!(status["last_analysis"]["checks"][0]["verdict"], "fail");

    // Back at 0 %: nobody gets the flag, nobody fails.
    let c = client();
    for i in 0..200 {
        let (s, _, _) = get(&c, &proxy.url("/"), &[("x-user-id", &format!("user-{i}"))]).await;
        assert_eq!(s, 200);
    }
    // Only the flag's users ever saw an error: none outside the 20 %.
    let (sent, failed) = traffic.stop_counting_failures().await;
    let failed: BTreeSet<String> = failed.into_iter().collect();
    assert!(!failed.is_empty() && sent > 40, "{sent} sent, {failed:?}");
    let outside: Vec<&String> = failed.iter().filter(|u| !on_at(u, 20.0)).collect();
    assert!(
        outside.is_empty(),
        "users outside the cohort failed: {outside:?}"
    );

    // Audited with the breach, counted, and told to the webhook.
    let (_, events) = api(&proxy, "GET", "/v1/events", "").await;
    let rollback = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "rollout.rollback")
        .cloned()
        .expect("a rollback event");
    assert_eq!(rollback["target"], "flags/new-ui");
    assert_eq!(rollback["actor"], "auto-rollback");
    assert_eq!(rollback["before"]["rollout_percentage"], 20);
    assert_eq!(rollback["after"]["rollout_percentage"], 0);
    assert!(rollback["after"]["reason"]
        .as_str()
        .unwrap()
        .contains("error_rate"));
    let admin = proxy.admin;
    assert_eq!(
        common::metric(admin, r#"switchyard_flag_rollbacks_total{flag="new-ui"}"#).await,
        1
    );
    let (_, _, metrics) = get(&c, &format!("http://{admin}/metrics"), &[]).await;
    assert!(
        metrics.contains(r#"switchyard_flag_rollout_step{flag="new-ui"} -1"#),
        "{metrics}"
    );
    let told = hooks.wait_for("rollback").await;
    assert_eq!(told["flag"], "new-ui", "{told}");
    assert!(told["reason"].as_str().unwrap().contains("error_rate"));

    // It stays reverted: a new rollout must be started deliberately.
    let (status, _) = api(&proxy, "POST", &format!("{ROLLOUT}/resume"), "").await;
    assert_eq!(status, 409);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_kill_turns_the_flag_off_for_everyone() {
    let upstream = Upstream::start("app", Behaviour::FailFlag("new-ui")).await;
    let proxy = proxy_with_flag(&upstream, 5.0).await;
    let traffic = Traffic::start(&proxy);
    let hooks = Receiver::start(200).await;
    let body = fast_flag_rollout(
        json!([{"rollout_percentage": 30, "hold": "60s"}, {"rollout_percentage": 100}]),
        json!({"on_failure": "kill", "webhooks": {"notify": [format!("http://{}/n", hooks.addr)]}}),
    );
    let (status, started) = api(&proxy, "POST", ROLLOUT, &body).await;
    assert_eq!(status, 201, "{started}");
    let status = wait_flag(&proxy, |s| s["phase"] == "rolled-back").await;
    traffic.stop().await;
    assert_eq!(status["enabled"], false, "{status}");
    let told = hooks.wait_for("rollback").await;
    assert_eq!(
        told["rollout_percentage"], 5,
        "where the flag went back to: {told}"
    );
    let (_, flag) = api(&proxy, "GET", "/v1/flags/new-ui", "").await;
    assert_eq!(flag["enabled"], false, "{flag}");
    // Killed: even the 5 % who had it before the rollout are off.
    let c = client();
    for i in 0..200 {
        let (s, _, _) = get(&c, &proxy.url("/"), &[("x-user-id", &format!("user-{i}"))]).await;
        assert_eq!(s, 200);
    }
    // `undo` gives the flag back as the rollout found it.
    let (status, undone) = api(&proxy, "POST", &format!("{ROLLOUT}/undo"), "").await;
    assert_eq!(status, 200, "{undone}");
    let (_, flag) = api(&proxy, "GET", "/v1/flags/new-ui", "").await;
    assert_eq!(
        (flag["enabled"].clone(), flag["rollout_percentage"].clone()),
        (json!(true), json!(5)),
        "{flag}"
    );
    proxy.stop().await;
}

/// A healthy flag walks every step to 100 %, and raising the percentage
/// only ever adds users: whoever had the flag at a step keeps it at the
/// next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_flag_walks_every_step_to_everyone_and_its_users_keep_it() {
    let echo = Upstream::start("echo", Behaviour::EchoHeaders).await;
    let proxy = proxy_with_flag(&echo, 0.0).await;
    let body = fast_flag_rollout(
        json!([
            {"rollout_percentage": 10, "hold": "2s"},
            {"rollout_percentage": 40, "hold": "2s"},
            {"rollout_percentage": 100}
        ]),
        json!({}),
    );
    let traffic = Traffic::start(&proxy);
    let (status, started) = api(&proxy, "POST", ROLLOUT, &body).await;
    assert_eq!(status, 201, "{started}");
    let users: Vec<String> = (0..300).map(|i| format!("sticky-{i}")).collect();
    let c = client();
    let holders = |step_users: Vec<String>| step_users.into_iter().collect::<BTreeSet<_>>();
    let mut seen: Vec<(u64, BTreeSet<String>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, s) = api(&proxy, "GET", ROLLOUT, "").await;
        let step = s["step"].as_u64().unwrap();
        let mut on = Vec::new();
        for u in &users {
            let (_, _, echoed) = get(&c, &proxy.url("/"), &[("x-user-id", u)]).await;
            if echoed.contains("x-feature-flags: new-ui") {
                on.push(u.clone());
            }
        }
        if seen.last().is_none_or(|(last, _)| *last != step) {
            seen.push((step, holders(on)));
        }
        if s["phase"] == "promoted" {
            break;
        }
        assert_eq!(s["phase"], "progressing", "{s}");
        assert!(Instant::now() < deadline, "never promoted: {s}");
    }
    traffic.stop().await;
    let (_, done) = api(&proxy, "GET", ROLLOUT, "").await;
    assert_eq!(done["rollout_percentage"], 100, "{done}");
    assert!(
        seen.len() >= 2,
        "saw steps {:?}",
        seen.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    for pair in seen.windows(2) {
        let (earlier, later) = (&pair[0].1, &pair[1].1);
        let lost: Vec<&String> = earlier.difference(later).collect();
        assert!(lost.is_empty(), "users lost the flag as it rose: {lost:?}");
    }
    assert_eq!(seen.last().unwrap().1.len(), users.len(), "100 %: everyone");
    let (_, events) = api(&proxy, "GET", "/v1/events", "").await;
    let actions: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"] == "flags/new-ui")
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
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_traffic_never_advances_a_flag() {
    let upstream = Upstream::start("app", Behaviour::Name).await;
    let proxy = proxy_with_flag(&upstream, 0.0).await;
    let body = fast_flag_rollout(
        json!([{"rollout_percentage": 50, "hold": "1s"}, {"rollout_percentage": 100}]),
        json!({}),
    );
    let (status, _) = api(&proxy, "POST", ROLLOUT, &body).await;
    assert_eq!(status, 201);
    // A trickle: fewer than min_requests (20) in the on cohort per window.
    let c = client();
    let admin = proxy.admin;
    let inconclusive = r#"switchyard_flag_analysis_checks_total{check="error_rate",flag="new-ui",verdict="inconclusive"}"#;
    let mut i = 0;
    while common::metric(admin, inconclusive).await < 4 {
        get(&c, &proxy.url("/"), &[("x-user-id", &format!("u{i}"))]).await;
        i += 1;
        assert!(i < 400, "no inconclusive analyses");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, s) = api(&proxy, "GET", ROLLOUT, "").await;
    assert_eq!(
        (s["phase"].clone(), s["step"].clone()),
        (json!("progressing"), json!(0)),
        "{s}"
    );
    assert_eq!(s["held"], "0s", "{s}");
    assert_eq!(s["last_analysis"]["verdict"], "inconclusive", "{s}");
    proxy.stop().await;
}

/// What the API refuses, and how a flag under rollout may be written: only
/// turned off (which ends the rollout); the operator's actions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_rollouts_are_validated_and_controlled() {
    let upstream = Upstream::start("app", Behaviour::Name).await;
    let proxy = proxy_with_flag(&upstream, 10.0).await;
    let steps = json!([{"rollout_percentage": 20, "hold": "1h"}, {"rollout_percentage": 100}]);
    let refused = [
        (
            json!({"steps": [{"rollout_percentage": 5, "hold": "1h"}, {"rollout_percentage": 100}]}),
            422,
            "rise above",
        ),
        (json!({"steps": steps, "typo": 1}), 422, "typo"),
        (
            json!({"steps": steps, "on_failure": "explode"}),
            422,
            "explode",
        ),
        (
            json!({"steps": [{"rollout_percentage": 50, "hold": "1h"}, {"rollout_percentage": 20}]}),
            422,
            "increase",
        ),
        (
            json!({"steps": [{"rollout_percentage": 20}, {"rollout_percentage": 100}]}),
            422,
            "hold",
        ),
        (
            json!({"steps": steps, "analysis": {"interval": "0s"}}),
            422,
            "interval",
        ),
        (json!({"steps": [{"weight": 20}]}), 422, "weight"),
        (
            json!({"steps": steps, "analysis": {"min_requests": 0}}),
            422,
            "min_requests",
        ),
    ];
    for (body, code, says) in refused {
        let (status, answer) = api(&proxy, "POST", ROLLOUT, &body.to_string()).await;
        assert_eq!(status, code, "{body}: {answer}");
        assert!(answer.to_string().contains(says), "{body}: {answer}");
    }
    let (status, answer) = api(&proxy, "POST", ROLLOUT, r#"{"steps": [}"#).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.to_string().contains("not JSON"), "{answer}");
    let (status, _) = api(
        &proxy,
        "POST",
        "/v1/flags/nope/rollout",
        &json!({"steps": steps}).to_string(),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = api(&proxy, "GET", ROLLOUT, "").await;
    assert_eq!(status, 404, "no rollout yet");
    let (_, state) = api(&proxy, "GET", "/v1/state", "").await;
    assert!(
        state["flag_rollouts"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "refusals changed nothing: {state}"
    );

    // Without steps: the default plan's above the flag's 10 %.
    let (status, defaulted) = api(&proxy, "POST", ROLLOUT, "{}").await;
    assert_eq!(status, 201, "{defaulted}");
    let percentages: Vec<&Value> = defaulted["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["rollout_percentage"])
        .collect();
    assert_eq!(percentages, [&json!(25), &json!(100)], "{defaulted}");
    let (status, _) = api(&proxy, "POST", &format!("{ROLLOUT}/abort"), "").await;
    assert_eq!(status, 200);

    let hooks = Receiver::start(200).await;
    let body =
        json!({"steps": steps, "webhooks": {"notify": [format!("http://{}/n", hooks.addr)]}})
            .to_string();
    let (status, started) = api(&proxy, "POST", ROLLOUT, &body).await;
    assert_eq!(status, 201, "{started}");
    let (_, flag) = api(&proxy, "GET", "/v1/flags/new-ui", "").await;
    assert_eq!(flag["rollout_percentage"], 20);
    assert_eq!(
        flag["metrics"],
        json!(["requests", "errors", "latency"]),
        "watched for the rollout"
    );
    let (status, _) = api(&proxy, "POST", ROLLOUT, &body).await;
    assert_eq!(status, 409, "one rollout at a time");

    // The rollout owns the percentage: other writes wait, a kill does not.
    let (status, answer) = api(
        &proxy,
        "PATCH",
        "/v1/flags/new-ui",
        r#"{"rollout_percentage": 50}"#,
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.to_string().contains("turn the flag off"), "{answer}");
    let (status, _) = api(&proxy, "DELETE", "/v1/flags/new-ui", "").await;
    assert_eq!(status, 409);
    let (status, _) = api(&proxy, "DELETE", "/v1/overrides/flags/new-ui", "").await;
    assert_eq!(status, 409);

    for (action, phase) in [
        ("pause", "paused"),
        ("resume", "progressing"),
        ("promote", "promoted"),
    ] {
        let (status, s) = api(&proxy, "POST", &format!("{ROLLOUT}/{action}"), "").await;
        assert_eq!(status, 200, "{action}: {s}");
        assert_eq!(s["phase"], phase, "{action}: {s}");
    }
    let (_, flag) = api(&proxy, "GET", "/v1/flags/new-ui", "").await;
    assert_eq!(flag["rollout_percentage"], 100, "promoted to the last step");
    let (status, _) = api(&proxy, "POST", &format!("{ROLLOUT}/pause"), "").await;
    assert_eq!(status, 409, "an ended rollout does not pause");
    let (status, _) = api(&proxy, "POST", &format!("{ROLLOUT}/explode"), "").await;
    assert_eq!(status, 404);

    // A new one, ended by the kill switch.
    let (status, _) = api(
        &proxy,
        "PATCH",
        "/v1/flags/new-ui",
        r#"{"rollout_percentage": 10}"#,
    )
    .await;
    assert_eq!(status, 200, "an ended rollout lets the flag be written");
    let (status, _) = api(&proxy, "POST", ROLLOUT, &body).await;
    assert_eq!(status, 201);
    let (status, answer) = api(&proxy, "PATCH", "/v1/flags/new-ui", r#"{"enabled": false}"#).await;
    assert_eq!(status, 200, "the kill switch always works: {answer}");
    let (_, s) = api(&proxy, "GET", ROLLOUT, "").await;
    assert_eq!(s["phase"], "aborted", "{s}");
    assert!(s["reason"].as_str().unwrap().contains("turned off"), "{s}");
    assert_eq!(s["enabled"], false);
    // Audited and told as the end of the rollout.
    let told = hooks.wait_for("abort").await;
    assert_eq!(told["flag"], "new-ui", "{told}");
    let (_, events) = api(&proxy, "GET", "/v1/events", "").await;
    let patched = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|e| e["action"] == "flag.patch")
        .cloned()
        .unwrap();
    assert_eq!(patched["after"]["rollout"], "aborted", "{patched}");
    // A flag that is off cannot start a rollout: 409 (its state, not the
    // request, is what is wrong).
    let (status, answer) = api(
        &proxy,
        "POST",
        ROLLOUT,
        &json!({"steps": [{"rollout_percentage": 90}]}).to_string(),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.to_string().contains("enabled: false"), "{answer}");

    // ctl drives the same API.
    let (status, _) = api(&proxy, "PATCH", "/v1/flags/new-ui", r#"{"enabled": true}"#).await;
    assert_eq!(status, 200);
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "ctl",
                "--admin",
                &format!("http://{}", proxy.admin),
                "flag",
                "rollout",
            ])
            .args(args)
            .env_remove("SWITCHYARD_TOKEN")
            .env_remove("SWITCHYARD_ADMIN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = ctl(&[
        "start",
        "new-ui",
        "--steps",
        "30:1h,100",
        "--on-failure",
        "kill",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("flag new-ui") && out.contains("[30%"), "{out}");
    let (code, out, _) = ctl(&["status", "new-ui"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("on failure: kill") && out.contains("progressing"),
        "{out}"
    );
    let (code, out, err) = ctl(&["abort", "new-ui"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("aborted"), "{out}");
    let (_, flag) = api(&proxy, "GET", "/v1/flags/new-ui", "").await;
    // Where this rollout started: the percentage the killed one had left.
    assert_eq!(
        flag["rollout_percentage"], 20,
        "aborted: back where it started"
    );
    let (code, _, err) = ctl(&["start", "new-ui", "--steps", "5:1h,100"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("rise above"), "{err}");
    let (code, _, err) = ctl(&["start", "new-ui", "--steps", "abc"]);
    assert_eq!(code, Some(64), "{err}");
    // A deleted flag takes its ended rollout with it: one made again under
    // its name starts clean.
    let (status, _) = api(&proxy, "DELETE", "/v1/flags/new-ui", "").await;
    assert_eq!(status, 204);
    let (_, state) = api(&proxy, "GET", "/v1/state", "").await;
    assert!(state["flag_rollouts"].get("new-ui").is_none(), "{state}");
    proxy.stop().await;
}

/// A flag rollout persists like a route's: SIGKILL mid-rollout and the
/// restarted proxy resumes it at its step, with the flag at that step's
/// percentage and its hold kept; it then goes on to promotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_rollout_resumes_after_sigkill_and_finishes() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let upstream = Upstream::start("app", Behaviour::Name).await;
    let dir = common::temp_dir("flag-rollout-restart");
    let path = dir.join("switchyard.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nstate_dir: {d}/state\nflags:\n  - {{ name: new-ui, rollout_percentage: 0 }}\nroutes:\n  - name: api\n    backends: [{{ name: app, endpoints: [\"{a}\"], weight: 100 }}]\n",
            d = dir.display(),
            a = upstream.addr
        ),
    )
    .unwrap();
    let (mut child, data, admin) = common::spawn_run_path(&path, &[]);
    let url = |admin: std::net::SocketAddr| format!("http://{admin}{ROLLOUT}");
    let status_of = |admin: std::net::SocketAddr| async move {
        let (_, _, body) = common::call("GET", &url(admin), None, &[], "").await;
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let spec = fast_flag_rollout(
        json!([
            {"rollout_percentage": 10, "hold": "1s"},
            {"rollout_percentage": 50, "hold": "3s"},
            {"rollout_percentage": 100}
        ]),
        json!({"analysis": {"interval": "1s", "window": "5s", "min_requests": 5}}),
    );
    let (status, _, body) = common::call("POST", &url(admin), None, &[], spec).await;
    assert_eq!(status, 201, "{body}");
    let c = client();
    let send = |data: std::net::SocketAddr, from: usize| {
        let c = c.clone();
        async move {
            for i in from..from + 40 {
                get(
                    &c,
                    &format!("http://{data}/"),
                    &[("x-user-id", &format!("u{i}"))],
                )
                .await;
            }
        }
    };
    // Traffic until step 1 (50 %) has held a second.
    let mut sent = 0;
    let before = loop {
        send(data, sent).await;
        sent += 40;
        let s = status_of(admin).await;
        if s["step"] == 1 && s["held"] != "0s" {
            break s;
        }
        assert!(sent < 40_000, "never reached step 1: {s}");
    };
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();

    let (mut child, data, admin) = common::spawn_run_path(&path, &[]);
    let after = status_of(admin).await;
    assert_eq!(
        (after["phase"].clone(), after["step"].clone()),
        (json!("progressing"), json!(1)),
        "{after}"
    );
    assert_eq!(after["rollout_percentage"], 50, "{after}");
    assert!(
        after["held"] != "0s",
        "held {} before, {} after",
        before["held"],
        after["held"]
    );
    // It goes on where it was, to everyone.
    loop {
        send(data, sent).await;
        sent += 40;
        let s = status_of(admin).await;
        if s["phase"] == "promoted" {
            assert_eq!(s["rollout_percentage"], 100);
            break;
        }
        assert_eq!(s["phase"], "progressing", "{s}");
        assert!(sent < 40_000, "never promoted: {s}");
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
