//! The `/v1/` control API against a running proxy: auth, every endpoint's
//! happy path, invalid changes that must change nothing, optimistic
//! concurrency, the audit log, and that the data plane follows at once.

mod common;

use std::path::PathBuf;

use common::{call, client, get, temp_dir, Behaviour, Running, Upstream};
use serde_json::{json, Value};

const CI_TOKEN: &str = "ci-token-0123456789abcdef";
const ONCALL_TOKEN: &str = "oncall-token-0123456789abcdef";

struct Setup {
    proxy: Running,
    _upstreams: (Upstream, Upstream),
    state_dir: PathBuf,
}

impl Setup {
    async fn new() -> Setup {
        let blue = Upstream::start("blue", Behaviour::Name).await;
        let canary = Upstream::start("canary", Behaviour::Name).await;
        let dir = temp_dir("api");
        std::fs::write(dir.join("ci"), format!("{CI_TOKEN}\n")).unwrap();
        std::fs::write(dir.join("oncall"), ONCALL_TOKEN).unwrap();
        let yaml = format!(
            r#"
admin:
  tokens:
    - {{ name: ci, file: {dir}/ci }}
    - {{ name: oncall, file: {dir}/oncall }}
state_dir: {dir}/state
flags:
  - {{ name: new-checkout, enabled: true, rollout_percentage: 10, target_groups: [beta], overrides: {{ user-123: true }} }}
routes:
  - name: api
    backends:
      - {{ name: blue,   endpoints: ["{}"], weight: 100 }}
      - {{ name: canary, endpoints: ["{}"], weight: 0 }}
"#,
            blue.addr,
            canary.addr,
            dir = dir.display()
        );
        let proxy = Running::start(&yaml).await;
        Setup {
            proxy,
            _upstreams: (blue, canary),
            state_dir: dir.join("state"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy.admin)
    }

    async fn call(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        self.call_with(method, path, &[], body).await
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, Value) {
        let (status, _, text) = call(
            method,
            &self.url(path),
            Some(CI_TOKEN),
            headers,
            body.to_owned(),
        )
        .await;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status.as_u16(), value)
    }

    /// The state document, without `endpoint_health` (observed endpoint
    /// health, which moves on its own).
    async fn state(&self) -> Value {
        let (status, mut state) = self.call("GET", "/v1/state", "").await;
        assert_eq!(status, 200);
        state.as_object_mut().unwrap().remove("endpoint_health");
        state
    }

    async fn backend_of(&self, user: &str) -> String {
        common::backend_of(&client(), &self.proxy, user).await
    }
}

#[tokio::test]
async fn weights_change_and_the_next_request_follows() {
    let s = Setup::new().await;
    let state = s.state().await;
    assert_eq!(state["version"], 0);
    assert_eq!(
        state["routes"][0]["backends"][1],
        json!({"name": "canary", "weight": 0, "endpoints": [s._upstreams.1.addr.to_string()]})
    );
    assert_eq!(s.backend_of("alice").await, "blue");

    let (status, headers, body) = call(
        "PUT",
        &s.url("/v1/routes/api/weights"),
        Some(CI_TOKEN),
        &[],
        r#"{"blue": 0, "canary": 100}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["etag"], "\"1\"");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"route": "api", "weights": {"blue": 0, "canary": 100}})
    );
    // No sleep: the swap happened before the API answered.
    assert_eq!(s.backend_of("alice").await, "canary");

    // Decimals and left-out backends (weight 0).
    let (status, body) = s
        .call(
            "PUT",
            "/v1/routes/api/weights",
            r#"{"blue": 99.99, "canary": 0.01}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["weights"], json!({"blue": 99.99, "canary": 0.01}));
    let (status, body) = s
        .call("PUT", "/v1/routes/api/weights", r#"{"blue": 100}"#)
        .await;
    assert_eq!(
        (status, &body["weights"]),
        (200, &json!({"blue": 100, "canary": 0}))
    );
    assert_eq!(s.state().await["version"], 3);
}

#[tokio::test]
async fn v1_needs_a_valid_token_and_health_and_metrics_do_not() {
    let s = Setup::new().await;
    for (token, why) in [
        (None, "missing"),
        (Some("wrong-token-0123456789"), "wrong"),
        (Some(""), "empty"),
    ] {
        let (status, headers, body) = call("GET", &s.url("/v1/state"), token, &[], "").await;
        assert_eq!(status, 401, "{why}: {body}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert!(body.contains(r#""code":"unauthorized""#), "{body}");
        let (status, _, _) = call(
            "PUT",
            &s.url("/v1/routes/api/weights"),
            token,
            &[],
            r#"{"canary": 100}"#,
        )
        .await;
        assert_eq!(status, 401);
    }
    // A token with a different case or a suffix is not the token.
    let (status, _, _) = call(
        "GET",
        &s.url("/v1/state"),
        Some(&CI_TOKEN.to_uppercase()),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = call(
        "GET",
        &s.url("/v1/state"),
        Some(&format!("{CI_TOKEN}x")),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        s.state().await["version"],
        0,
        "unauthenticated writes changed nothing"
    );
    assert_eq!(s.backend_of("alice").await, "blue");

    for open in ["/health/live", "/health/ready", "/metrics"] {
        let (status, _, _) = get(&client(), &s.url(open), &[]).await;
        assert_eq!(status, 200, "{open}");
    }
    // Both named tokens work, and the audit log says who did what.
    let (status, _, _) = call(
        "PUT",
        &s.url("/v1/routes/api/weights"),
        Some(ONCALL_TOKEN),
        &[],
        r#"{"blue": 90, "canary": 10}"#,
    )
    .await;
    assert_eq!(status, 200);
    let (_, events) = s.call("GET", "/v1/events", "").await;
    assert_eq!(events["events"][0]["actor"], "oncall");
}

#[tokio::test]
async fn invalid_changes_are_rejected_and_change_nothing() {
    let s = Setup::new().await;
    let before = s.state().await;
    let ten_mb = format!(
        r#"{{"blue": 100, "x": "{}"}}"#,
        "a".repeat(10 * 1024 * 1024)
    );
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "PUT",
            "/v1/routes/api/weights",
            r#"{"blue": "ninety", "canary": 10}"#.into(),
            422,
            "invalid",
        ),
        (
            "PUT",
            "/v1/routes/api/weights",
            r#"{"blue": 90, "canary": 9}"#.into(),
            422,
            "sum to 99",
        ),
        (
            "PUT",
            "/v1/routes/api/weights",
            r#"{"blue": 90, "purple": 10}"#.into(),
            422,
            "no backend `purple`",
        ),
        (
            "PUT",
            "/v1/routes/api/weights",
            r#"{"blue": 89.999, "canary": 10.001}"#.into(),
            422,
            "two decimals",
        ),
        (
            "PUT",
            "/v1/routes/api/weights",
            r#"{"blue": -10, "canary": 110}"#.into(),
            422,
            "0 to 100",
        ),
        (
            "PUT",
            "/v1/routes/api/weights",
            r#"{"blue": 90, "canary": 10"#.into(),
            400,
            "not JSON",
        ),
        (
            "PUT",
            "/v1/routes/api/weights",
            "[90, 10]".into(),
            422,
            "invalid",
        ),
        ("PUT", "/v1/routes/api/weights", "".into(), 400, "not JSON"),
        ("PUT", "/v1/routes/api/weights", ten_mb, 413, "too_large"),
        (
            "PUT",
            "/v1/routes/nope/weights",
            r#"{"blue": 100}"#.into(),
            404,
            "no route named `nope`",
        ),
        (
            "PUT",
            "/v1/flags/new-checkout",
            r#"{"rollout_percentage": 150}"#.into(),
            422,
            "0 to 100",
        ),
        (
            "PUT",
            "/v1/flags/new-checkout",
            r#"{"enabled": true, "colour": "red"}"#.into(),
            422,
            "unknown field `colour`",
        ),
        (
            "PUT",
            "/v1/flags/new-checkout",
            r#"{"enabled": "yes"}"#.into(),
            422,
            "invalid",
        ),
        (
            "PUT",
            "/v1/flags/new-checkout",
            r#"{"name": "other"}"#.into(),
            422,
            "URL names `new-checkout`",
        ),
        (
            "PUT",
            "/v1/flags/bad%20name",
            r#"{}"#.into(),
            422,
            "must be 1-63",
        ),
        (
            "PUT",
            "/v1/flags/new-checkout",
            r#"{"target_groups": ["a,b"]}"#.into(),
            422,
            "without commas",
        ),
        (
            "PATCH",
            "/v1/flags/new-checkout",
            r#"{"rollout_percentage": "ten"}"#.into(),
            422,
            "invalid",
        ),
        (
            "PATCH",
            "/v1/flags/new-checkout",
            r#"{"name": "renamed"}"#.into(),
            422,
            "cannot rename",
        ),
        (
            "PATCH",
            "/v1/flags/new-checkout",
            "[]".into(),
            422,
            "JSON object",
        ),
        (
            "PATCH",
            "/v1/flags/missing",
            r#"{"enabled": false}"#.into(),
            404,
            "no flag named",
        ),
        (
            "DELETE",
            "/v1/flags/missing",
            "".into(),
            404,
            "no flag named",
        ),
        (
            "POST",
            "/v1/routes/api/weights",
            r#"{"blue": 100}"#.into(),
            405,
            "allowed: PUT",
        ),
        ("GET", "/v1/nothing", "".into(), 404, "no endpoint"),
    ];
    for (method, path, body, want_status, want_text) in cases {
        let (status, _, text) = call(method, &s.url(path), Some(CI_TOKEN), &[], body).await;
        assert_eq!(status.as_u16(), want_status, "{method} {path}: {text}");
        assert!(
            text.contains(want_text),
            "{method} {path}: {text:?} lacks {want_text:?}"
        );
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert!(
            parsed["error"]["code"].is_string() && parsed["error"]["message"].is_string(),
            "{text}"
        );
    }
    assert_eq!(
        s.state().await,
        before,
        "a rejected change changed the state"
    );
    assert_eq!(s.backend_of("alice").await, "blue");
    let (_, events) = s.call("GET", "/v1/events", "").await;
    assert_eq!(
        events["events"],
        json!([]),
        "rejected changes left audit records"
    );
}

#[tokio::test]
async fn flags_crud() {
    let s = Setup::new().await;
    let (status, body) = s.call("GET", "/v1/flags/new-checkout", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"name": "new-checkout", "enabled": true, "rollout_percentage": 10, "target_groups": ["beta"], "overrides": {"user-123": true}})
    );

    let (status, body) = s
        .call(
            "PUT",
            "/v1/flags/dark-mode",
            r#"{"rollout_percentage": 12.5}"#,
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body,
        json!({"name": "dark-mode", "enabled": true, "rollout_percentage": 12.5, "target_groups": [], "overrides": {}})
    );
    let (status, _) = s
        .call(
            "PUT",
            "/v1/flags/dark-mode",
            r#"{"name": "dark-mode", "enabled": false}"#,
        )
        .await;
    assert_eq!(status, 200, "replacing is not creating");

    let (status, body) = s
        .call(
            "PATCH",
            "/v1/flags/new-checkout",
            r#"{"overrides": {"user-123": null, "user-9": false}, "rollout_percentage": 25}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["overrides"], json!({"user-9": false}));
    assert_eq!(body["rollout_percentage"], 25);
    assert_eq!(
        body["target_groups"],
        json!(["beta"]),
        "untouched fields stay"
    );

    let (_, list) = s.call("GET", "/v1/flags", "").await;
    let names: Vec<&str> = list["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["new-checkout", "dark-mode"]);

    let (status, body) = s.call("DELETE", "/v1/flags/new-checkout", "").await;
    assert_eq!((status, body), (204, Value::Null));
    assert_eq!(s.call("GET", "/v1/flags/new-checkout", "").await.0, 404);
    assert_eq!(s.call("DELETE", "/v1/flags/new-checkout", "").await.0, 404);
    assert_eq!(s.state().await["flags"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_with_the_same_version_exactly_one_wins() {
    let s = Setup::new().await;
    let (_, headers, _) = call("GET", &s.url("/v1/state"), Some(CI_TOKEN), &[], "").await;
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let url = s.url("/v1/routes/api/weights");
    let if_match = [("if-match", etag.as_str())];
    let (a, b) = tokio::join!(
        call(
            "PUT",
            &url,
            Some(CI_TOKEN),
            &if_match,
            r#"{"blue": 90, "canary": 10}"#
        ),
        call(
            "PUT",
            &url,
            Some(ONCALL_TOKEN),
            &if_match,
            r#"{"blue": 50, "canary": 50}"#
        ),
    );
    let mut statuses = [a.0.as_u16(), b.0.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");
    let loser = if a.0 == 409 { &a.2 } else { &b.2 };
    assert!(loser.contains(r#""code":"conflict""#), "{loser}");
    let state = s.state().await;
    assert_eq!(state["version"], 1);
    let winner_canary = if a.0 == 200 { 10 } else { 50 };
    assert_eq!(state["routes"][0]["backends"][1]["weight"], winner_canary);

    // A write against the current version goes through; `*` means any.
    let (status, _) = s
        .call_with(
            "PUT",
            "/v1/routes/api/weights",
            &[("if-match", "\"1\"")],
            r#"{"blue": 100}"#,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .call_with(
            "DELETE",
            "/v1/flags/new-checkout",
            &[("if-match", "\"1\"")],
            "",
        )
        .await;
    assert_eq!(status, 409, "stale");
    let (status, _) = s
        .call_with("DELETE", "/v1/flags/new-checkout", &[("if-match", "*")], "")
        .await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn every_change_is_audited_and_paged() {
    let s = Setup::new().await;
    s.call(
        "PUT",
        "/v1/routes/api/weights",
        r#"{"blue": 95, "canary": 5}"#,
    )
    .await;
    s.call("PATCH", "/v1/flags/new-checkout", r#"{"enabled": false}"#)
        .await;
    s.call("DELETE", "/v1/flags/new-checkout", "").await;

    let (status, page) = s.call("GET", "/v1/events?limit=2", "").await;
    assert_eq!(status, 200);
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["action"], "weights.set");
    assert_eq!(events[0]["actor"], "ci");
    assert_eq!(events[0]["target"], "routes/api");
    assert_eq!(events[0]["before"], json!({"blue": 100, "canary": 0}));
    assert_eq!(events[0]["after"], json!({"blue": 95, "canary": 5}));
    assert_eq!(events[1]["action"], "flag.patch");
    assert_eq!(events[1]["before"]["enabled"], true);
    assert_eq!(events[1]["after"]["enabled"], false);
    assert!(events[0]["time"].as_str().unwrap().ends_with('Z'));

    let next = page["next_after"].as_u64().unwrap();
    let (_, rest) = s.call("GET", &format!("/v1/events?after={next}"), "").await;
    let rest = rest["events"].as_array().unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["action"], "flag.delete");
    assert_eq!(rest[0]["version"], 3);

    // The log on disk is the same records, one JSON object per line.
    let lines = std::fs::read_to_string(s.state_dir.join("events.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    assert_eq!(s.call("GET", "/v1/events?limit=0", "").await.0, 400);
    assert_eq!(s.call("GET", "/v1/events?after=x", "").await.0, 400);
}

/// `switchyard ctl` against the running proxy: the same API, as tables or JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_drives_every_endpoint() {
    let s = Setup::new().await;
    let token_file = s.state_dir.parent().unwrap().join("ci");
    let admin = format!("http://{}", s.proxy.admin);
    let ctl = |args: &[&str]| {
        let token_file = token_file.to_str().unwrap();
        let mut all = vec!["ctl", "--admin", &admin, "--token-file", token_file];
        all.extend_from_slice(args);
        common::switchyard(&all)
    };

    let (code, out, err) = ctl(&["status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("ROUTE") && out.contains("canary") && out.contains("new-checkout"),
        "{out}"
    );

    let (code, out, err) = ctl(&["weights", "set", "api", "blue=75", "canary=25"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "route api: blue=75% canary=25%\n");
    let (code, _, err) = ctl(&["weights", "set", "api", "blue=75"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("422") && err.contains("sum to 75"), "{err}");
    let (code, _, err) = ctl(&["weights", "set", "api", "blue=100", "--if-match", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("409"), "{err}");
    let (code, _, err) = ctl(&["weights", "set", "api", "blue:100"]);
    assert_eq!(code, Some(64), "{err}");

    let (code, out, err) = ctl(&[
        "flag",
        "set",
        "dark-mode",
        "--rollout",
        "5",
        "--groups",
        "beta,staff",
        "--override",
        "alice=true",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("dark-mode") && out.contains("5%") && out.contains("beta,staff"),
        "{out}"
    );
    let (code, out, _) = ctl(&[
        "--json",
        "flag",
        "set",
        "dark-mode",
        "--enabled",
        "false",
        "--override",
        "alice=clear",
    ]);
    assert_eq!(code, Some(0));
    let flag: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (flag["enabled"].clone(), flag["overrides"].clone()),
        (json!(false), json!({}))
    );
    let (code, out, _) = ctl(&["flag", "list"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("new-checkout") && out.contains("dark-mode"),
        "{out}"
    );
    assert_eq!(ctl(&["flag", "delete", "dark-mode"]).0, Some(0));
    let (code, _, err) = ctl(&["flag", "get", "dark-mode"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("404"), "{err}");

    get(&client(), &s.proxy.url("/"), &[("x-user-id", "alice")]).await;
    let (code, out, _) = ctl(&["stats", "api"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("P95 MS"), "{out}");

    let (code, out, _) = ctl(&["events"]);
    assert_eq!(code, Some(0));
    for action in ["weights.set", "flag.create", "flag.patch", "flag.delete"] {
        assert!(out.contains(action), "{action} missing from\n{out}");
    }
    let (code, out, _) = ctl(&["--json", "events", "--limit", "1"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["events"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let (code, out, err) = ctl(&[
        "rollout",
        "start",
        "api",
        "--stable",
        "blue",
        "--target",
        "canary",
        "--steps",
        "10:1m,100",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("step 1/2 at 10%") && out.contains("progressing"),
        "{out}"
    );
    let (code, out, _) = ctl(&["rollout", "status", "api"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("blue -> canary"), "{out}");
    let (code, _, err) = ctl(&[
        "rollout", "start", "api", "--stable", "blue", "--target", "canary",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("409"), "{err}");
    let (code, out, _) = ctl(&["rollout", "abort", "api"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("aborted") && out.contains("canary=0%"),
        "{out}"
    );
    let (code, _, err) = ctl(&[
        "rollout", "start", "api", "--stable", "blue", "--target", "canary", "--steps", "ten",
    ]);
    assert_eq!(code, Some(64), "{err}");

    // Without a token: refused, and says so.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["ctl", "--admin", &admin, "status"])
        .env_remove("SWITCHYARD_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("--token-file"), "{err}");

    // Out-of-range percentages are the user's error (64), named in their
    // terms, and nothing is sent.
    let (code, _, err) = ctl(&["flag", "set", "x", "--rollout", "150"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("--rollout must be a percentage from 0 to 100") && !err.contains("column"),
        "{err}"
    );
    let (code, _, err) = ctl(&["flag", "set", "x", "--rollout", "12.345"]);
    assert_eq!(code, Some(64), "{err}");
    let (code, _, err) = ctl(&["weights", "set", "api", "blue=120", "canary=-20"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("the weight of `blue`"), "{err}");
    let (code, _, err) = ctl(&["flag", "get", "x"]);
    assert_eq!(code, Some(1), "never created: {err}");
    // A description, set and shown.
    let (code, out, err) = ctl(&["flag", "set", "x", "--description", "the new checkout"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("DESCRIPTION") && out.contains("the new checkout"),
        "{out}"
    );
}

/// `switchyard ctl` says what is wrong in the user's terms before and
/// around the API: an admin address without a scheme (with the fix), an
/// https one, a proxy that is not there (with where to look), a mistyped
/// subcommand (with the suggestion), its exit codes in `--help`, and shell
/// completions.
#[test]
fn ctl_errors_say_what_to_do() {
    let run = common::switchyard;
    let (code, _, err) = run(&["ctl", "--admin", "127.0.0.1:9901", "status"]);
    assert_eq!(code, Some(64));
    assert!(
        err.contains("did you mean `http://127.0.0.1:9901`"),
        "{err}"
    );
    let (code, _, err) = run(&["ctl", "--admin", "https://127.0.0.1:9901", "status"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("plain HTTP"), "{err}");
    let (code, _, err) = run(&["ctl", "--admin", "http://127.0.0.1:9901/v1", "status"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("http://HOST:PORT"), "{err}");
    // A port nothing listens on (bound, then let go).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("http://127.0.0.1:{port}");
    let (code, _, err) = run(&["ctl", "--admin", &admin, "status"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("connection refused") && err.contains("SWITCHYARD_ADMIN"),
        "{err}"
    );
    let (code, _, err) = run(&["ctl", "stauts"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("tip:") && err.contains("'status'"), "{err}");
    let (code, out, _) = run(&["ctl", "--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("Exit status: 0 done, 1 refused"), "{out}");
    let (code, out, _) = run(&["completions", "bash"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("_switchyard()") && out.contains("rollout"),
        "{out}"
    );
    let (code, _, err) = run(&["completions", "tcsh"]);
    assert_eq!(code, Some(64), "{err}");
}

/// Every documented operation is served (neither 404 nor 405), and every
/// other method on a documented path is a 405 that names the allowed ones.
#[tokio::test]
async fn the_openapi_document_describes_the_running_router() {
    let s = Setup::new().await;
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml"))
            .unwrap();
    let doc: Value = serde_saphyr::from_str(&text).unwrap();
    let methods = ["GET", "PUT", "POST", "PATCH", "DELETE"];
    for (template, item) in doc["paths"].as_object().unwrap() {
        let path = template
            .replace("{route}", "api")
            .replace("{name}", "new-checkout")
            .replace("{key}", "new-checkout")
            .replace("{action}", "pause");
        for method in methods {
            let documented = item.get(method.to_lowercase().as_str()).is_some();
            // A stream never ends: the watch test reads it.
            let streams = item[method.to_lowercase().as_str()]["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_some();
            if streams {
                continue;
            }
            let body = if method == "PUT" && path.contains("weights") {
                r#"{"blue": 100}"#
            } else {
                "{}"
            };
            let (status, headers, text) =
                call(method, &s.url(&path), Some(CI_TOKEN), &[], body.to_owned()).await;
            if documented {
                // A 404 about a missing resource is fine; one about a missing endpoint is not.
                let unrouted = status == 405 || (status == 404 && text.contains("no endpoint"));
                assert!(
                    !unrouted,
                    "{method} {path} is documented but answered {status}: {text}"
                );
            } else {
                assert_eq!(
                    status, 405,
                    "{method} {path} is not documented but answered {status}: {text}"
                );
                if path.starts_with("/v1/") {
                    assert!(headers.contains_key("allow"), "{method} {path}");
                }
            }
        }
    }
}

/// Issue 20: docs/openapi.yaml's rollout spec has exactly the fields the
/// server takes (the spec, its analysis and webhooks, every optional field
/// set and serialised), and its list of audit actions names every action
/// the proxy writes (each `"<area>.<verb>"` literal in its source).
#[test]
fn openapi_matches_the_rollout_spec_and_audit_actions() {
    use std::collections::BTreeSet;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let text = std::fs::read_to_string(format!("{root}/docs/openapi.yaml")).unwrap();
    let doc: Value = serde_saphyr::from_str(&text).unwrap();
    let schema = &doc["components"]["schemas"]["RolloutSpec"];
    let keys = |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
    let spec: switchyard_control::rollout::RolloutSpec = serde_json::from_value(json!({
        "strategy": "blue-green", "stable": "a", "target": "b", "validation": "1m",
        "steps": [{"weight": 100}],
        "webhooks": {"gate": "http://127.0.0.1:1/gate", "notify": ["http://127.0.0.1:1/n"]}
    }))
    .unwrap();
    let served = serde_json::to_value(&spec).unwrap();
    // A property's schema, through its `$ref` when it has one.
    let resolve = |v: &Value| -> Value {
        match v["$ref"].as_str() {
            Some(r) => doc["components"]["schemas"][r.rsplit('/').next().unwrap()].clone(),
            None => v.clone(),
        }
    };
    assert_eq!(keys(&schema["properties"]), keys(&served));
    for part in ["analysis", "webhooks"] {
        assert_eq!(
            keys(&resolve(&schema["properties"][part])["properties"]),
            keys(&served[part]),
            "{part}"
        );
    }
    let flag_schema = &doc["components"]["schemas"]["FlagRolloutSpec"];
    let flag_spec: switchyard_control::rollout::FlagRolloutSpec = serde_json::from_value(json!({
        "steps": [{"rollout_percentage": 100}], "on_failure": "kill",
        "webhooks": {"gate": "http://127.0.0.1:1/gate", "notify": ["http://127.0.0.1:1/n"]}
    }))
    .unwrap();
    let flag_served = serde_json::to_value(&flag_spec).unwrap();
    assert_eq!(keys(&flag_schema["properties"]), keys(&flag_served));
    for part in ["analysis", "webhooks"] {
        assert_eq!(
            keys(&resolve(&flag_schema["properties"][part])["properties"]),
            keys(&flag_served[part]),
            "flag {part}"
        );
    }
    let listed = doc["components"]["schemas"]["Event"]["properties"]["action"]["description"]
        .as_str()
        .unwrap();
    let listed: BTreeSet<&str> = listed.split(", ").collect();
    let mut written = BTreeSet::new();
    let mut sources = vec![
        std::path::PathBuf::from(format!("{root}/control/src")),
        std::path::PathBuf::from(format!("{root}/proxy/src")),
    ];
    while let Some(dir) = sources.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources.push(path);
                continue;
            }
            let code = std::fs::read_to_string(&path).unwrap();
            for literal in code.split('"').skip(1).step_by(2) {
                let Some((area, verb)) = literal.split_once('.') else {
                    continue;
                };
                let areas = [
                    "weights", "flag", "config", "state", "override", "endpoint", "rollout",
                ];
                let verb_ok = !verb.is_empty() && verb.chars().all(|c| c.is_ascii_lowercase());
                // A field in an error and a file name, not actions.
                let not_actions = ["flag.name", "state.json"];
                if areas.contains(&area) && verb_ok && !not_actions.contains(&literal) {
                    written.insert(literal.to_owned());
                }
            }
        }
    }
    let written: BTreeSet<&str> = written.iter().map(String::as_str).collect();
    assert!(written.len() >= 15, "{written:?}");
    assert_eq!(listed, written);
}

/// Issue 20: `GET /v1/watch` streams `snapshot` events (the state, each
/// route's live figures and rollout, new audit events) behind the same
/// rules as `/v1/`, and `/ui/` serves the dashboard with a policy that lets
/// it load nothing from elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_stream_and_the_dashboard_are_served() {
    use http_body_util::BodyExt;
    let s = Setup::new().await;
    let admin = s.proxy.admin;
    let (status, _, _) = call("GET", &format!("http://{admin}/v1/watch"), None, &[], "").await;
    assert_eq!(status, 401, "the token is needed");
    let (status, headers, _) = call(
        "POST",
        &format!("http://{admin}/v1/watch"),
        Some(CI_TOKEN),
        &[],
        "",
    )
    .await;
    assert_eq!(
        (status.as_u16(), headers["allow"].to_str().unwrap()),
        (405, "GET")
    );
    let req = http::Request::get(format!("http://{admin}/v1/watch"))
        .header("authorization", format!("Bearer {CI_TOKEN}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = common::body_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut text = String::new();
    // Two snapshots, a second apart (bounded by the test harness's timeout).
    while text.matches("\n\n").count() < 2 {
        let frame = body.frame().await.expect("the stream goes on").unwrap();
        text.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
    }
    let first = text.split("\n\n").next().unwrap();
    assert!(first.starts_with("event: snapshot\ndata: "), "{first}");
    let snapshot: Value = serde_json::from_str(&first["event: snapshot\ndata: ".len()..]).unwrap();
    assert_eq!(snapshot["state"]["routes"][0]["name"], "api", "{snapshot}");
    assert!(
        snapshot["stats"]["api"]["blue"]["requests"].is_u64(),
        "{snapshot}"
    );
    assert!(snapshot["events"].is_array(), "{snapshot}");
    drop(body);

    let (status, headers, page) = call("GET", &format!("http://{admin}/ui/"), None, &[], "").await;
    assert_eq!(status, 200);
    assert!(page.contains("/ui/app.js"), "{page}");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("default-src 'self'") && policy.contains("frame-ancestors 'none'"));
    for (path, status) in [
        ("/ui/app.js", 200),
        ("/ui/style.css", 200),
        ("/ui/nope.js", 404),
        ("/ui", 301),
    ] {
        let (got, _, _) = call("GET", &format!("http://{admin}{path}"), None, &[], "").await;
        assert_eq!(got.as_u16(), status, "{path}");
    }
}
