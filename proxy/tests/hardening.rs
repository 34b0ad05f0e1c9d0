//! Issue 19: fail safe when the client, the admin port or the disk
//! misbehaves.

mod common;

use common::{raw_exchange, Behaviour, Running, Upstream};
use nix::sys::signal::Signal;

/// Sends `signal` to a spawned proxy and waits for it to exit.
fn signal(child: &mut std::process::Child, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
    child.wait().unwrap();
}

/// RFC 9112 §3.2: a missing (HTTP/1.1), empty, duplicated or malformed Host
/// is a 400, never routed or forwarded; nginx answers the same.
#[tokio::test]
async fn bad_host_headers_are_refused_and_never_forwarded() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let yaml = format!(
        "routes:\n  - name: a\n    match: {{ host: a.example }}\n    backends:\n      - {{ name: blue, endpoints: [\"{}\"], weight: 100 }}\n  - name: any\n    backends:\n      - {{ name: blue, endpoints: [\"{}\"], weight: 100 }}\n",
        blue.addr, blue.addr
    );
    let proxy = Running::start(&yaml).await;
    for (head, why) in [
        ("GET / HTTP/1.1\r\n", "no Host"),
        (
            "GET / HTTP/1.1\r\nHost: a.example\r\nHost: evil.example\r\n",
            "two Hosts",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a.example:80@evil.example\r\n",
            "userinfo",
        ),
        ("GET / HTTP/1.1\r\nHost: \r\n", "empty"),
        ("GET / HTTP/1.1\r\nHost: a example\r\n", "a space"),
        ("GET / HTTP/1.1\r\nHost: a.example:99999\r\n", "a bad port"),
    ] {
        let answer = raw_exchange(
            proxy.addr,
            format!("{head}Connection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{why}: {answer}");
    }
    assert_eq!(
        blue.arrived.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "none was forwarded"
    );
    // HTTP/1.0 may go without Host; a good one is routed.
    let answer = raw_exchange(proxy.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
        "{answer}"
    );
    let answer = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a.example:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    proxy.stop().await;
}

/// The token-less loopback admin API is not open to web pages: a rebound
/// `Host` (DNS rebinding), a foreign `Origin`, or a write that is not
/// `application/json` (what a page can send without a CORS preflight) are
/// refused, and nothing changes. Its own origin and JSON still work; the
/// open endpoints stay open.
#[tokio::test]
async fn the_open_admin_api_refuses_what_a_web_page_could_send() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let proxy = Running::start(&common::config(
        "",
        &[("blue", blue.addr, 100.0), ("canary", canary.addr, 0.0)],
    ))
    .await;
    let url = |path: &str| format!("http://{}{path}", proxy.admin);
    let weights = r#"{"blue": 0, "canary": 100}"#;
    for (headers, status, code) in [
        (vec![("host", "rebind.evil.example:9901")], 403, "forbidden"),
        (vec![("origin", "http://evil.example")], 403, "forbidden"),
        (vec![("origin", "null")], 403, "forbidden"),
        (
            vec![("content-type", "text/plain")],
            415,
            "unsupported_media_type",
        ),
        (
            vec![("content-type", "application/x-www-form-urlencoded")],
            415,
            "unsupported_media_type",
        ),
    ] {
        let (got, _, body) = common::call(
            "PUT",
            &url("/v1/routes/api/weights"),
            None,
            &headers,
            weights,
        )
        .await;
        assert_eq!(got, status, "{headers:?}: {body}");
        assert!(body.contains(code), "{body}");
    }
    // A rollout action forged by a page as a "simple" POST.
    let (got, _, _) = common::call(
        "POST",
        &url("/v1/routes/api/rollout"),
        None,
        &[
            ("content-type", "text/plain"),
            ("origin", "http://evil.example"),
        ],
        r#"{"stable":"blue","target":"canary"}"#,
    )
    .await;
    assert_eq!(got, 403);
    let (_, _, state) = common::call("GET", &url("/v1/state"), None, &[], "").await;
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["version"], 0, "nothing changed");
    // Its own origin, with JSON: fine.
    let own = format!("http://{}", proxy.admin);
    let (got, _, body) = common::call(
        "PUT",
        &url("/v1/routes/api/weights"),
        None,
        &[
            ("origin", own.as_str()),
            ("content-type", "application/json; charset=utf-8"),
        ],
        weights,
    )
    .await;
    assert_eq!(got, 200, "{body}");
    let (got, _, _) = common::call(
        "GET",
        &url("/metrics"),
        None,
        &[("origin", "http://evil.example")],
        "",
    )
    .await;
    assert_eq!(got, 200, "the open endpoints stay open");
    proxy.stop().await;
}

/// Each listener is bounded apart from the other: a flood of silent
/// connections on the admin port is capped at `admin.max_connections` and
/// closed after `admin.header_timeout`, while the data plane keeps
/// serving; a flood on the data port leaves the admin API answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_listener_does_not_stop_the_other() {
    use tokio::io::AsyncReadExt;
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&common::config(
        "admin: { listen: 127.0.0.1:9901, max_connections: 20, header_timeout: 300ms }\nlimits: { max_connections: 20 }\ntimeouts: { request_header: 300ms }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let c = common::client();
    // 200 silent connections to the admin port.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(tokio::net::TcpStream::connect(proxy.admin).await.unwrap());
    }
    for i in 0..20 {
        let (status, _, _) =
            common::get(&c, &proxy.url("/"), &[("x-user-id", &format!("u{i}"))]).await;
        assert_eq!(status, 200, "the data plane serves through the admin flood");
    }
    // Every one of them is closed by the proxy: past the limit at once,
    // the rest after the header timeout.
    for (i, s) in silent.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let closed =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut byte)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "silent admin connection {i} still open"
        );
    }
    let (status, _, _) = common::call(
        "GET",
        &format!("http://{}/health/live", proxy.admin),
        None,
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200);
    // The reverse: the data port's limit full of silent connections.
    let mut data_flood = Vec::new();
    for _ in 0..40 {
        data_flood.push(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    }
    let (status, _, _) = common::call(
        "GET",
        &format!("http://{}/metrics", proxy.admin),
        None,
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200, "the admin API answers through the data flood");
    drop(data_flood);
    proxy.stop().await;
}

/// Issue 19, 1: a `state_dir` that cannot be written never switches
/// auto-rollback off. The rollback is applied in memory at once; the
/// metrics say decisions wait for the disk, readiness stays 200, admin
/// changes get 503; once the disk is back the state and the rollback's
/// audit event are persisted and admin changes are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_never_waits_for_the_disk() {
    let dir = common::temp_dir("full-disk");
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::failing(1)).await;
    let proxy = Running::start(&common::config(
        &format!("state_dir: {}", dir.display()),
        &[("blue", blue.addr, 100.0), ("canary", canary.addr, 0.0)],
    ))
    .await;
    let admin = |path: &str| format!("http://{}{path}", proxy.admin);
    let spec = r#"{"stable":"blue","target":"canary","steps":[{"weight":50,"hold":"1h"},{"weight":100}],
        "analysis":{"interval":"1s","window":"5s","min_requests":10,"failure_threshold":2}}"#;
    let (status, _, body) =
        common::call("POST", &admin("/v1/routes/api/rollout"), None, &[], spec).await;
    assert_eq!(status, 201, "{body}");
    // The disk breaks: the state file's temp file cannot be made.
    std::fs::create_dir(dir.join("state.json.tmp")).unwrap();
    let c = common::client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut sent = 0;
    let rollout = loop {
        common::get(&c, &proxy.url("/"), &[("x-user-id", &format!("u{sent}"))]).await;
        sent += 1;
        if sent % 20 == 0 {
            let (_, _, body) =
                common::call("GET", &admin("/v1/routes/api/rollout"), None, &[], "").await;
            let rollout: serde_json::Value = serde_json::from_str(&body).unwrap();
            if rollout["phase"] == "rolled-back" {
                break rollout;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never rolled back without a disk"
        );
    };
    assert!(
        rollout["reason"].as_str().unwrap().contains("error_rate"),
        "{rollout}"
    );
    assert_eq!(
        common::metric(proxy.admin, "switchyard_state_unpersisted ").await,
        1
    );
    assert!(common::metric(proxy.admin, "switchyard_state_persist_failures_total ").await > 0);
    let (ready, _, _) = common::call("GET", &admin("/health/ready"), None, &[], "").await;
    assert_eq!(ready, 200);
    let weights = r#"{"blue": 90, "canary": 10}"#;
    let (status, _, body) =
        common::call("PUT", &admin("/v1/routes/api/weights"), None, &[], weights).await;
    assert_eq!(status, 503, "{body}");
    let on_disk = std::fs::read_to_string(dir.join("state.json")).unwrap();
    assert!(
        on_disk.contains("progressing"),
        "not yet persisted: {on_disk}"
    );
    // The disk is back.
    std::fs::remove_dir(dir.join("state.json.tmp")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::metric(proxy.admin, "switchyard_state_unpersisted ").await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "never persisted again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let on_disk = std::fs::read_to_string(dir.join("state.json")).unwrap();
    assert!(on_disk.contains("rolled-back"), "{on_disk}");
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    assert!(events.contains("rollout.rollback"), "{events}");
    assert!(!dir.join("state.json.tmp").exists());
    let (status, _, body) =
        common::call("PUT", &admin("/v1/routes/api/weights"), None, &[], weights).await;
    assert_eq!(status, 200, "{body}");
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 19, 7: `TRACE` is refused (405), a request target without a
/// leading `/` is a 400, neither forwarded.
#[tokio::test]
async fn trace_and_targets_without_a_slash_are_refused() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&common::config("", &[("blue", blue.addr, 100.0)])).await;
    let answer = raw_exchange(
        proxy.addr,
        b"TRACE / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    let answer = raw_exchange(
        proxy.addr,
        b"GET foo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(blue.arrived.load(std::sync::atomic::Ordering::SeqCst), 0);
    proxy.stop().await;
}

/// Issue 19, 7: the bearer scheme is case-insensitive; a change to what
/// already is makes no new version and no event.
#[tokio::test]
async fn bearer_in_any_case_and_no_op_writes_change_nothing() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let dir = common::temp_dir("bearer");
    let token = "a-token-of-sixteen-bytes-or-more";
    std::fs::write(dir.join("token"), token).unwrap();
    let proxy = Running::start(&common::config(
        &format!(
            "admin: {{ listen: 127.0.0.1:9901, tokens: [{{ name: ci, file: \"{}\" }}] }}",
            dir.join("token").display()
        ),
        &[("blue", blue.addr, 100.0), ("canary", canary.addr, 0.0)],
    ))
    .await;
    let url = format!("http://{}/v1/routes/api/weights", proxy.admin);
    let lower = format!("bearer {token}");
    let weights = r#"{"blue": 50, "canary": 50}"#;
    let mut versions = Vec::new();
    for _ in 0..2 {
        let (status, headers, body) = common::call(
            "PUT",
            &url,
            None,
            &[("authorization", lower.as_str())],
            weights,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        versions.push(headers["etag"].to_str().unwrap().to_owned());
    }
    assert_eq!(
        versions,
        ["\"1\"", "\"1\""],
        "the same weights again: no new version"
    );
    let (_, _, events) = common::call(
        "GET",
        &format!("http://{}/v1/events", proxy.admin),
        None,
        &[("authorization", lower.as_str())],
        "",
    )
    .await;
    assert_eq!(events.matches("weights.set").count(), 1, "{events}");
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 19, 7: `//echo/x` and `/%65cho/x` are refused (400) rather than
/// routed differently from how an upstream would read them.
#[tokio::test]
async fn ambiguous_paths_are_refused() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&common::config("", &[("blue", blue.addr, 100.0)])).await;
    for path in ["//echo/x", "/echo//x", "/%65cho/x"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
    }
    assert_eq!(blue.arrived.load(std::sync::atomic::Ordering::SeqCst), 0);
    let answer = raw_exchange(
        proxy.addr,
        b"GET /a%20b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    proxy.stop().await;
}

/// Issue 19, 7: a body declared over `limits.max_request_body_bytes` gets
/// its 413 and the client can finish sending and read it (the proxy reads
/// the rest, bounded, as nginx does), rather than a reset mid-upload.
#[tokio::test]
async fn an_oversized_upload_reads_its_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Upstream::start("blue", Behaviour::EchoBody).await;
    let proxy = Running::start(&common::config(
        "limits: { max_request_body_bytes: 1048576 }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let size = 4 * 1024 * 1024;
    s.write_all(format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..size / chunk.len() {
        s.write_all(&chunk).await.expect("the whole body goes out");
    }
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut answer))
        .await
        .expect("an answer")
        .expect("read, not reset");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(blue.arrived.load(std::sync::atomic::Ordering::SeqCst), 0);
    proxy.stop().await;
}

/// Issue 19, 2: `timeouts.request` starts once the request is sent: an
/// upload that keeps moving may take longer (nginx's behaviour), and only
/// `timeouts.upload_idle` without progress ends it.
#[tokio::test]
async fn a_slow_but_steady_upload_is_not_cut_by_the_request_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Upstream::start("blue", Behaviour::EchoBody).await;
    let proxy = Running::start(&common::config(
        "timeouts: { request: 300ms, upload_idle: 2s }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // Six bytes over about 1.2 s: four times the request timeout.
    for byte in b"steady" {
        s.write_all(&[*byte]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_end(&mut answer),
    )
    .await
    .expect("an answer")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("steady"), "{answer}");
    proxy.stop().await;
}

/// A standalone proxy on `dir` (token-less loopback admin), backends blue
/// and canary; the config file's path.
fn stateful(dir: &std::path::Path, blue: std::net::SocketAddr) -> std::path::PathBuf {
    let path = dir.join("switchyard.yaml");
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nstate_dir: {d}/state\nroutes:\n  - name: api\n    backends:\n      - {{ name: blue, endpoints: [\"{blue}\"], weight: 100 }}\n      - {{ name: canary, endpoints: [\"{blue}\"], weight: 0 }}\n",
        d = dir.display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Every audit event from the start, through the admin API.
async fn all_events(admin: std::net::SocketAddr) -> Vec<serde_json::Value> {
    let mut events = Vec::new();
    loop {
        let after = events
            .last()
            .map_or(0, |e: &serde_json::Value| e["seq"].as_u64().unwrap());
        let url = format!("http://{admin}/v1/events?after={after}&limit=1000");
        let (status, _, body) = common::call("GET", &url, None, &[], "").await;
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        let page = page["events"].as_array().unwrap().clone();
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}

/// Issue 19, 6: the state and its audit event are one durable step. Killed
/// with SIGKILL in the middle of a burst of writes, many times over, the
/// proxy restarts with an event for every version it reached, one each, in
/// an unbroken sequence, and every acknowledged change among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_audit_stay_in_step_through_kill_9() {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;

    let dir = common::temp_dir("kill-9");
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let config = stateful(&dir, blue.addr);
    let mut acknowledged = Vec::<u64>::new();
    for round in 0..16u64 {
        let (mut child, _, admin) = common::spawn_run_path(&config, &[]);
        let answered = Arc::new(AtomicU64::new(0));
        let (kill_now, killed) = tokio::sync::watch::channel(false);
        let kill_after = fastrand::u64(5..60);
        let writers: Vec<_> = (0..4u64)
            .map(|writer| {
                let (answered, kill_now) = (answered.clone(), kill_now.clone());
                tokio::spawn(async move {
                    let mut acknowledged = Vec::new();
                    let url = format!("http://{admin}/v1/routes/api/weights");
                    let c = common::body_client();
                    for i in 0.. {
                        let canary = (round * 7 + writer * 13 + i) % 101;
                        let body = format!(r#"{{"blue": {}, "canary": {canary}}}"#, 100 - canary);
                        let req = http::Request::put(&url)
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                            .unwrap();
                        // The connection dies with the process: that answer
                        // never came, so it is not acknowledged.
                        let Ok(resp) = c.request(req).await else {
                            return acknowledged;
                        };
                        if resp.status() == 200 {
                            let tag = resp.headers()["etag"].to_str().unwrap().trim_matches('"');
                            acknowledged.push(tag.parse::<u64>().unwrap());
                        }
                        if answered.fetch_add(1, Relaxed) + 1 == kill_after {
                            let _ = kill_now.send(true);
                        }
                    }
                    acknowledged
                })
            })
            .collect();
        let mut killed = killed;
        killed.wait_for(|k| *k).await.unwrap();
        signal(&mut child, Signal::SIGKILL);
        for w in writers {
            acknowledged.extend(w.await.unwrap());
        }
    }
    let (mut child, _, admin) = common::spawn_run_path(&config, &[]);
    let (_, headers, _) =
        common::call("GET", &format!("http://{admin}/v1/state"), None, &[], "").await;
    let version: u64 = headers["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .parse()
        .unwrap();
    let events = all_events(admin).await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "an unbroken sequence"
    );
    let versions: Vec<u64> = events
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(
        versions,
        (1..=version).collect::<Vec<_>>(),
        "one event per version, none past the state's"
    );
    assert!(version > 8, "the rounds made changes: {version}");
    for v in &acknowledged {
        assert!(
            versions.contains(v),
            "acknowledged version {v} has its event"
        );
    }
    signal(&mut child, Signal::SIGTERM);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 19, 6: a change is applied only with its audit record. With the
/// audit log on `/dev/full` a weights change is still recorded, in
/// `state.json` with the state, and listed by `/v1/events`; the failures
/// are counted; once the log takes appends again the event lands in it, in
/// sequence, and nothing waits any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_that_cannot_be_written_loses_no_record() {
    let dir = common::temp_dir("audit-full");
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let config = stateful(&dir, blue.addr);
    let (mut child, _, admin) = common::spawn_run_path(&config, &[]);
    let weights = format!("http://{admin}/v1/routes/api/weights");
    let put = |canary: u32| {
        let body = format!(r#"{{"blue": {}, "canary": {canary}}}"#, 100 - canary);
        common::call("PUT", &weights, None, &[], body)
    };
    assert_eq!(put(10).await.0, 200);
    let log = dir.join("state/events.jsonl");
    let aside = dir.join("state/events.aside");
    std::fs::rename(&log, &aside).unwrap();
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    let (status, _, body) = put(20).await;
    assert_eq!(status, 200, "recorded with the state: {body}");
    let state = std::fs::read_to_string(dir.join("state/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["unlogged"][0]["version"], 2, "{state}");
    assert_eq!(state["unlogged"][0]["after"]["canary"], 20, "{state}");
    let events = all_events(admin).await;
    assert_eq!(events.last().unwrap()["version"], 2, "{events:?}");
    // Counted (the driver publishes the count every second).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::metric(admin, "switchyard_state_persist_failures_total ").await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "failures never counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The log is writable again: the driver appends what waited.
    std::fs::remove_file(&log).unwrap();
    std::fs::rename(&aside, &log).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(&log).unwrap().lines().count() < 2 {
        assert!(std::time::Instant::now() < deadline, "never appended");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(put(30).await.0, 200);
    // `state.json` carries only the last change's event (written with it,
    // before the log took it): nothing else waits.
    let state = std::fs::read_to_string(dir.join("state/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let waiting = state["unlogged"].as_array().unwrap();
    assert_eq!(
        (waiting.len(), &waiting[0]["version"]),
        (1, &3.into()),
        "{state}"
    );
    let logged: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["version"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(logged, vec![1, 2, 3]);
    signal(&mut child, Signal::SIGTERM);
    let (mut child, _, admin) = common::spawn_run_path(&config, &[]);
    let versions: Vec<u64> = all_events(admin)
        .await
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2, 3]);
    signal(&mut child, Signal::SIGTERM);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 19, 6: the crash the kill -9 test can only hope to hit, made on
/// purpose: `state.json` written with its event, the append to the log torn
/// half-way. The restarted proxy cuts the torn line off and appends the
/// event from `state.json`: the log is whole and in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_state_and_log_is_repaired_at_start() {
    let dir = common::temp_dir("torn-log");
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let config = stateful(&dir, blue.addr);
    let (mut child, _, admin) = common::spawn_run_path(&config, &[]);
    let weights = |admin| format!("http://{admin}/v1/routes/api/weights");
    for canary in [10, 20] {
        let body = format!(r#"{{"blue": {}, "canary": {canary}}}"#, 100 - canary);
        assert_eq!(
            common::call("PUT", &weights(admin), None, &[], body)
                .await
                .0,
            200
        );
    }
    signal(&mut child, Signal::SIGKILL);
    // Undo the last append half-way: as if the crash came mid-write.
    let log = dir.join("state/events.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let first = text.lines().next().unwrap();
    std::fs::write(
        &log,
        format!("{first}\n{}", &text[first.len() + 1..first.len() + 30]),
    )
    .unwrap();
    let (mut child, _, admin) = common::spawn_run_path(&config, &[]);
    let events = all_events(admin).await;
    let versions: Vec<u64> = events
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2], "{events:?}");
    assert_eq!(events[1]["after"]["canary"], 20);
    let body = r#"{"blue": 70, "canary": 30}"#;
    assert_eq!(
        common::call("PUT", &weights(admin), None, &[], body)
            .await
            .0,
        200
    );
    signal(&mut child, Signal::SIGKILL);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line whole"))
        .collect();
    let seqs: Vec<u64> = lines.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An upstream on loopback that answers every request with a head declaring
/// `len` bytes, then sends `chunks` (each after `gap`), then holds the
/// connection open without a byte more.
async fn dribbling_upstream(
    len: usize,
    chunks: Vec<&'static [u8]>,
    gap: std::time::Duration,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let chunks = chunks.clone();
            tokio::spawn(async move {
                let mut buf = [0; 4096];
                let _ = sock.read(&mut buf).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for chunk in chunks {
                    tokio::time::sleep(gap).await;
                    if sock.write_all(chunk).await.is_err() {
                        return;
                    }
                }
                // Hold the connection until the proxy closes it.
                let _ = sock.read(&mut buf).await;
            });
        }
    });
    addr
}

/// Issue 19, 7: an upstream body that stalls after its head is cut off
/// after `timeouts.response_body_idle` (the client's connection closes
/// instead of hanging), while a body that keeps coming, however slowly,
/// is not.
#[tokio::test]
async fn a_stalled_response_body_is_cut_off_a_slow_one_is_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stalled = dribbling_upstream(100, vec![b"0123456789"], Default::default()).await;
    let slow = dribbling_upstream(
        10,
        vec![b"01", b"23", b"45", b"67", b"89"],
        std::time::Duration::from_millis(300),
    )
    .await;
    let yaml = format!(
        "timeouts: {{ response_body_idle: 700ms }}\nroutes:\n  - name: stalled\n    match: {{ path_prefix: /stalled }}\n    backends: [{{ name: s, endpoints: [\"{stalled}\"], weight: 100 }}]\n  - name: slow\n    backends: [{{ name: d, endpoints: [\"{slow}\"], weight: 100 }}]\n"
    );
    let proxy = Running::start(&yaml).await;
    let exchange = |path: &'static str| async move {
        let mut sock = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n");
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        // Bounded: a proxy without the timeout would hold this forever.
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            sock.read_to_end(&mut got),
        )
        .await;
        (read.is_ok(), String::from_utf8_lossy(&got).into_owned())
    };
    let (closed, got) = exchange("/stalled").await;
    assert!(closed, "the stalled body was never cut off: {got}");
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("0123456789"),
        "{got}"
    );
    let mut sock = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    sock.write_all(b"GET /slow HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = String::new();
    sock.read_to_string(&mut got).await.unwrap();
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("\r\n\r\n0123456789"),
        "{got}"
    );
    proxy.stop().await;
}
