//! The real `switchyard` binary: exit codes, messages, start-up and SIGTERM.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::Duration;

use common::{client, get, spawn_run_path, Behaviour, Upstream};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn switchyard(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn check(name: &str, yaml: &str) -> Output {
    let path = temp_file(name, yaml);
    switchyard(&["check", "--config", path.to_str().unwrap()])
}

const VALID: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
routes:
  - name: api
    backends:
      - { name: blue,   endpoints: ["127.0.0.1:18081"], weight: 90 }
      - { name: canary, endpoints: ["127.0.0.1:18083"], weight: 10 }
"#;

#[test]
fn check_accepts_a_valid_config() {
    let out = check("valid.yaml", VALID);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 route(s), 2 backend(s))"));
}

#[test]
fn invalid_configs_exit_64_naming_the_problem() {
    let cases = [
        ("sum.yaml", VALID.replace("weight: 10", "weight: 5"), "routes[0].backends: weights sum to 95"),
        (
            "unknown-backend.yaml",
            format!("flags: [{{ name: ai-v2 }}]\n{VALID}    rules: [{{ when_flag: ai-v2, backend: purple }}]\n"),
            "routes[0].rules[0].backend: route `api` has no backend `purple`",
        ),
        ("duplicate-backend.yaml", VALID.replace("canary, endpoints", "blue, endpoints"), "duplicate backend name `blue`"),
        (
            "duplicate-route.yaml",
            format!("{VALID}  - name: api\n    match: {{ path_prefix: /x }}\n    backends: [{{ name: b, endpoints: [\"127.0.0.1:1\"], weight: 100 }}]\n"),
            "duplicate route name `api`",
        ),
        ("bad-address.yaml", VALID.replace("127.0.0.1:18081", "127.0.0.1"), "routes[0].backends[0].endpoints[0]"),
        ("bad-listen.yaml", VALID.replace("listen: 127.0.0.1:0\n", "listen: nowhere\n"), "listen"),
        ("unknown-field.yaml", VALID.replace("routes:", "colour: blue\nroutes:"), "colour"),
        ("not-yaml.yaml", "routes: [\n  - {".to_owned(), "switchyard: "),
    ];
    for (name, yaml, want) in cases {
        let out = check(name, &yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains(want), "{name}: {stderr:?} lacks {want:?}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{name}: not one line: {stderr:?}"
        );
    }
}

#[test]
fn missing_config_file_exits_64_naming_it() {
    let out = switchyard(&["check", "--config", "/nonexistent/switchyard.yaml"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/switchyard.yaml"));
}

#[test]
fn bad_arguments_exit_64_and_help_exits_0() {
    for args in [
        &["frobnicate"][..],
        &["run"],
        &["run", "--config"],
        &["demo", "--listen", "nowhere"],
        &[],
    ] {
        let out = switchyard(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr)
                .trim_end()
                .lines()
                .count(),
            1,
            "{args:?}"
        );
    }
    let help = switchyard(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for word in ["demo", "run", "check"] {
        assert!(text.contains(word), "{text}");
    }
}

#[test]
fn port_in_use_fails_start_up_with_nothing_left_running() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let yaml = VALID.replace(
        "listen: 127.0.0.1:0\n",
        &format!("listen: 127.0.0.1:{port}\n"),
    );
    let path = temp_file("taken.yaml", &yaml);
    let out = switchyard(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot listen on") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
}

/// Starts the binary and waits for the line announcing the data listener.
fn spawn_run(config: &str) -> (Child, SocketAddr) {
    let (child, data, _) = spawn_run_with(config, &[]);
    (child, data)
}

/// Starts `switchyard run` with `config` and extra arguments; returns the
/// child with its data and admin addresses once it serves.
fn spawn_run_with(config: &str, args: &[&str]) -> (Child, SocketAddr, SocketAddr) {
    let path = temp_file(&format!("run-{}.yaml", fastrand::u32(..)), config);
    spawn_run_path(&path, args)
}

/// SIGTERM during a burst of slow requests: every one completes with 200,
/// then the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    const IN_FLIGHT: usize = 8;
    let slow = Upstream::start("slow", Behaviour::Delay(Duration::from_millis(800))).await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nworkers: 1\ntimeouts: {{ drain: 20s }}\nroutes:\n  - name: api\n    backends: [{{ name: slow, endpoints: [\"{}\"], weight: 100 }}]\n",
        slow.addr
    );
    let (mut child, addr) = spawn_run(&yaml);

    let mut requests = tokio::task::JoinSet::new();
    for i in 0..IN_FLIGHT {
        let url = format!("http://{addr}/slow/{i}");
        requests
            .spawn(async move { get(&client(), &url, &[("x-user-id", &format!("u{i}"))]).await });
    }
    // Signal only once every request is inside the upstream.
    slow.wait_for_arrivals(IN_FLIGHT).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();

    while let Some(done) = requests.join_next().await {
        let (status, _, body) = done.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "slow\n");
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // And the listener is gone.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[test]
fn non_loopback_admin_without_a_token_is_refused() {
    let yaml = VALID.replace(
        "admin: { listen: 127.0.0.1:0 }",
        "admin: { listen: 0.0.0.0:9901 }",
    );
    let out = check("open-admin.yaml", &yaml);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin.tokens") && stderr.contains("loopback"),
        "{stderr}"
    );

    let missing = VALID.replace(
        "admin: { listen: 127.0.0.1:0 }",
        "admin: { listen: 0.0.0.0:9901, tokens: [{ name: ci, file: /nonexistent/token }] }",
    );
    let out = check("missing-token.yaml", &missing);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin.tokens[0].file"));
}

const TOKEN: &str = "restart-token-0123456789";

fn stateful_config(dir: &std::path::Path, blue: SocketAddr, canary: SocketAddr) -> String {
    weighted_config(dir, blue, canary, 100, 0)
}

fn weighted_config(
    dir: &std::path::Path,
    blue: SocketAddr,
    canary: SocketAddr,
    wb: u32,
    wc: u32,
) -> String {
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0, tokens: [{{ name: ci, file: {d}/token }}] }}\nstate_dir: {d}/state\nroutes:\n  - name: api\n    backends:\n      - {{ name: blue, endpoints: [\"{blue}\"], weight: {wb} }}\n      - {{ name: canary, endpoints: [\"{canary}\"], weight: {wc} }}\n",
        d = dir.display()
    )
}

/// The state document, without `endpoint_health` (observed, not state: a
/// restarted proxy has not looked at its endpoints yet).
async fn admin_state(admin: SocketAddr) -> serde_json::Value {
    let (status, _, body) = common::call(
        "GET",
        &format!("http://{admin}/v1/state"),
        Some(TOKEN),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut state: serde_json::Value = serde_json::from_str(&body).unwrap();
    state.as_object_mut().unwrap().remove("endpoint_health");
    state
}

/// Acknowledged changes survive SIGKILL: the restarted proxy routes and
/// reports exactly what the API last answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_state_survives_sigkill() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let dir = common::temp_dir("restart");
    let yaml = stateful_config(&dir, blue.addr, canary.addr);

    let (mut child, data, admin) = spawn_run_with(&yaml, &[]);
    let url = |path: &str| format!("http://{admin}{path}");
    let (status, _, body) = common::call(
        "PUT",
        &url("/v1/routes/api/weights"),
        Some(TOKEN),
        &[],
        r#"{"blue": 0, "canary": 100}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = common::call(
        "PUT",
        &url("/v1/flags/beta-ui"),
        Some(TOKEN),
        &[],
        r#"{"rollout_percentage": 30}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let acknowledged = admin_state(admin).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert!(tokio::net::TcpStream::connect(data).await.is_err());

    let (mut child, data, admin) = spawn_run_with(&yaml, &[]);
    assert_eq!(admin_state(admin).await, acknowledged);
    let (status, _, body) = get(
        &client(),
        &format!("http://{data}/"),
        &[("x-user-id", "alice")],
    )
    .await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "canary\n"));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[tokio::test]
async fn a_corrupt_state_file_stops_start_up_until_reset() {
    let dir = common::temp_dir("corrupt");
    let yaml = stateful_config(
        &dir,
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let state_file = dir.join("state/state.json");
    std::fs::write(&state_file, b"{ not json").unwrap();
    let config = temp_file(&format!("corrupt-{}.yaml", fastrand::u32(..)), &yaml);

    let out = switchyard(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(65));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(state_file.to_str().unwrap()) && stderr.contains("--reset-state"),
        "{stderr}"
    );
    // `check` says so too, before a deploy finds out.
    let out = switchyard(&["check", "--config", config.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(state_file.to_str().unwrap()), "{stderr}");
    assert_eq!(
        std::fs::read(&state_file).unwrap(),
        b"{ not json",
        "never silently overwritten"
    );

    let (mut child, _, admin) = spawn_run_with(&yaml, &["--reset-state"]);
    let state = admin_state(admin).await;
    assert_eq!(state["routes"][0]["backends"][0]["weight"], 100);
    let aside: Vec<_> = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.reset-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept aside");
    assert_eq!(std::fs::read(aside[0].path()).unwrap(), b"{ not json");
    let (_, _, events) = common::call(
        "GET",
        &format!("http://{admin}/v1/events"),
        Some(TOKEN),
        &[],
        "",
    )
    .await;
    assert!(events.contains("state.reset"), "{events}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// Polls `check` every 100 ms for at most 20 s: a reload runs on the
/// process's own schedule, with no signal back to the test.
async fn eventually(mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reload_applies_valid_files_and_keeps_running_on_invalid_ones() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let dir = common::temp_dir("reload");
    let yaml = stateful_config(&dir, blue.addr, canary.addr);
    let path = dir.join("switchyard.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let (mut child, data, admin) = spawn_run_path(&path, &[]);
    let pid = Pid::from_raw(child.id() as i32);

    // A valid change, then SIGHUP (the file watcher may see it first: either
    // way it must be applied).
    std::fs::write(&path, weighted_config(&dir, blue.addr, canary.addr, 0, 100)).unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    let applied =
        eventually(async || admin_state(admin).await["routes"][0]["backends"][1]["weight"] == 100)
            .await;
    assert!(applied, "reload never applied");
    let (_, _, body) = get(
        &client(),
        &format!("http://{data}/"),
        &[("x-user-id", "alice")],
    )
    .await;
    assert_eq!(body, "canary\n");
    let (_, _, events) = common::call(
        "GET",
        &format!("http://{admin}/v1/events"),
        Some(TOKEN),
        &[],
        "",
    )
    .await;
    assert!(
        events.contains(r#""actor":"config-reload""#) && events.contains("config.reload"),
        "{events}"
    );

    // The same file again: applied as a reload, but nothing changes, so no
    // new version. (This also absorbs the watcher or SIGHUP seeing the
    // change above second.)
    let before = admin_state(admin).await;
    let reloads = |metrics: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"switchyard_config_reloads_total{result="success"} "#))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (_, _, metrics) = get(&client(), &format!("http://{admin}/metrics"), &[]).await;
    let succeeded = reloads(&metrics);
    kill(pid, Signal::SIGHUP).unwrap();
    let reloaded = eventually(async || {
        let (_, _, metrics) = get(&client(), &format!("http://{admin}/metrics"), &[]).await;
        reloads(&metrics) > succeeded
    })
    .await;
    assert!(reloaded, "SIGHUP with an unchanged file was not reloaded");
    assert_eq!(
        admin_state(admin).await,
        before,
        "an unchanged file made a new version"
    );

    // An invalid file: the running config stays, the failure is counted.
    std::fs::write(&path, weighted_config(&dir, blue.addr, canary.addr, 0, 95)).unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    let counted = eventually(async || {
        let (_, _, metrics) = get(&client(), &format!("http://{admin}/metrics"), &[]).await;
        metrics.contains(r#"switchyard_config_reloads_total{result="failure"} "#)
            && !metrics.contains(r#"switchyard_config_reloads_total{result="failure"} 0"#)
    })
    .await;
    assert!(counted, "failed reload not counted");
    assert_eq!(admin_state(admin).await, before);
    let (_, _, body) = get(
        &client(),
        &format!("http://{data}/"),
        &[("x-user-id", "alice")],
    )
    .await;
    assert_eq!(body, "canary\n");

    kill(pid, Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// SIGKILL mid-rollout: the restarted proxy resumes at the same step, with
/// the hold time already earned still counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_resumes_after_sigkill_at_its_step_with_its_held_time() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let dir = common::temp_dir("rollout-restart");
    let yaml = stateful_config(&dir, blue.addr, canary.addr);
    let path = dir.join("switchyard.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let (mut child, data, admin) = spawn_run_path(&path, &[]);
    let url = |admin: SocketAddr| format!("http://{admin}/v1/routes/api/rollout");
    let spec = r#"{"stable": "blue", "target": "canary",
        "steps": [{"weight": 10, "hold": "1s"}, {"weight": 50, "hold": "1h"}, {"weight": 100}],
        "analysis": {"interval": "1s", "window": "5s", "min_requests": 5}}"#;
    let (status, _, body) = common::call("POST", &url(admin), Some(TOKEN), &[], spec).await;
    assert_eq!(status, 201, "{body}");

    // Traffic until the rollout is in step 1 with at least 2 s held.
    let status_of = |admin: SocketAddr| async move {
        let (_, _, body) = common::call("GET", &url(admin), Some(TOKEN), &[], "").await;
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let c = client();
    let mut i = 0;
    let held_secs = |s: &serde_json::Value| {
        switchyard_control::config::parse_duration(s["held"].as_str().unwrap())
            .unwrap()
            .as_secs()
    };
    let before = loop {
        for _ in 0..20 {
            get(
                &c,
                &format!("http://{data}/"),
                &[("x-user-id", &format!("u{i}"))],
            )
            .await;
            i += 1;
        }
        let s = status_of(admin).await;
        if s["step"] == 1 && held_secs(&s) >= 2 {
            break s;
        }
        assert!(i < 20_000, "rollout never reached step 1: {s}");
    };
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();

    let (mut child, _data, admin) = spawn_run_path(&path, &[]);
    let after = status_of(admin).await;
    assert_eq!(after["phase"], "progressing");
    assert_eq!(after["step"], 1);
    assert!(
        held_secs(&after) >= held_secs(&before),
        "held {} after, {} before",
        after["held"],
        before["held"]
    );
    assert_eq!(
        after["weights"],
        serde_json::json!({"blue": 50, "canary": 50})
    );

    // Rolled back, it stays rolled back across another SIGKILL.
    let (status, _, body) = common::call(
        "POST",
        &format!("{}/rollback", url(admin)),
        Some(TOKEN),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let (mut child, data, admin) = spawn_run_path(&path, &[]);
    let back = status_of(admin).await;
    assert_eq!(back["phase"], "rolled-back");
    assert_eq!(
        back["weights"],
        serde_json::json!({"blue": 100, "canary": 0})
    );
    for i in 0..50 {
        let (_, _, body) = get(
            &c,
            &format!("http://{data}/"),
            &[("x-user-id", &format!("u{i}"))],
        )
        .await;
        assert_eq!(body, "blue\n");
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// Issue 20: what the API sets over the configuration file is visible and
/// clearable. Weights set through the API are marked in `/v1/state` and
/// `ctl status`; an edit of the file's weights for that route is logged as
/// shadowed (and does not apply); `ctl reset ROUTE` goes back to the
/// file's weights without a restart, audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_are_marked_and_reset_back_to_the_file() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let dir = common::temp_dir("overrides");
    let config = temp_file(
        &format!("overrides-{}.yaml", fastrand::u32(..)),
        &stateful_config(&dir, blue.addr, canary.addr),
    );
    let (mut child, _, admin, log) = common::spawn_run_logged(&config, &[]);
    let weights = format!("http://{admin}/v1/routes/api/weights");
    let body = r#"{"blue": 70, "canary": 30}"#;
    let (status, _, text) = common::call("PUT", &weights, Some(TOKEN), &[], body).await;
    assert_eq!(status, 200, "{text}");
    let state = admin_state(admin).await;
    assert_eq!(
        state["overridden"]["routes"],
        serde_json::json!(["api"]),
        "{state}"
    );
    let ctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "ctl",
                "--admin",
                &format!("http://{admin}"),
                "--token",
                TOKEN,
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = ctl(&["status"]);
    let status_text = String::from_utf8_lossy(&out.stdout);
    assert!(
        status_text.contains("70%*") && status_text.contains("weights of api"),
        "{status_text}"
    );
    // The file's weights change: shadowed, said so, not applied.
    std::fs::write(
        &config,
        weighted_config(&dir, blue.addr, canary.addr, 50, 50),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = log
            .recv_timeout(left)
            .expect("no shadowed-weights warning within 20 s");
        if line.contains("route=api") && line.contains("set them over the file") {
            break;
        }
    }
    let state = admin_state(admin).await;
    assert_eq!(state["routes"][0]["backends"][0]["weight"], 70, "{state}");
    // Reset: the file's 50/50, nothing overridden, audited.
    let out = ctl(&["reset", "api"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = admin_state(admin).await;
    assert_eq!(state["routes"][0]["backends"][0]["weight"], 50, "{state}");
    assert_eq!(
        state["overridden"]["routes"],
        serde_json::json!([]),
        "{state}"
    );
    let out = ctl(&["reset", "api"]);
    assert_eq!(out.status.code(), Some(1), "nothing left to reset");
    let out = ctl(&["events"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("override.reset"));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 20: `switchyard inject` on the command line: a file or standard
/// input in, the injected manifests out (what changed on standard error),
/// exit 64 with the reason for a missing file or manifests it cannot use.
#[test]
fn inject_reads_a_file_or_stdin_and_refuses_bad_input() {
    use std::io::Write;
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/examples/plain-app.yaml"
    );
    let out = switchyard(&["inject", example]);
    assert_eq!(out.status.code(), Some(0));
    let injected = String::from_utf8(out.stdout).unwrap();
    assert!(injected.contains("name: switchyard") && injected.contains("targetPort: proxy-http"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Deployment shop: switchyard added"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["inject", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(injected.as_bytes())
        .unwrap();
    let again = child.wait_with_output().unwrap();
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(again.stdout).unwrap(),
        injected,
        "idempotent"
    );
    let out = switchyard(&["inject", "/nonexistent/app.yaml"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/app.yaml"));
    let bad = temp_file("inject-bad.yaml", "kind: [unclosed");
    let out = switchyard(&["inject", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not YAML"));
}
