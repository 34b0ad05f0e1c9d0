//! Against real third-party parts: curl as the client of the running demo
//! and of the TLS listener, h2load over TLS, nginx as an origin behind the
//! proxy, Prometheus scraping `/metrics`, headless Chromium on a hostile
//! page against the admin API. Each test skips with a printed reason
//! when its tool is missing, unless SWITCHYARD_REQUIRE_EXTERNAL=1 (set by
//! `.ci/run`, which installs them), where a missing tool fails the test.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, config, get, Running};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The path of `tool`, or `None` after printing why the test is skipped.
fn require(tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("SWITCHYARD_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("{tool} is required (SWITCHYARD_REQUIRE_EXTERNAL=1) but not installed");
        }
        eprintln!("SKIPPED: {tool} is not installed (`.ci/run` installs it)");
    }
    found
}

/// Kills the child on drop so a failed assertion leaves nothing running.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Demo {
    child: Guard,
    proxy: SocketAddr,
    admin: SocketAddr,
}

fn start_demo() -> Demo {
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut find = |prefix: &str| -> SocketAddr {
        loop {
            let line = lines.next().expect("demo exited early").unwrap();
            if let Some(addr) = line.trim().strip_prefix(prefix) {
                return addr.parse().unwrap();
            }
        }
    };
    let proxy = find("proxy listening on ");
    let admin = find("admin listening on ");
    std::thread::spawn(move || for _ in lines {});
    Demo {
        child: Guard(child),
        proxy,
        admin,
    }
}

fn curl(curl: &Path, args: &[&str]) -> String {
    let out = Command::new(curl)
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn curl_against_the_running_demo() {
    let Some(curl_bin) = require("curl") else {
        return;
    };
    let demo = start_demo();
    let url = format!("http://{}/", demo.proxy);

    let alice = curl(&curl_bin, &["-H", "x-user-id: alice", &url]);
    assert!(
        ["blue\n", "green\n", "canary\n"].contains(&alice.as_str()),
        "{alice:?}"
    );
    for _ in 0..5 {
        assert_eq!(curl(&curl_bin, &["-H", "x-user-id: alice", &url]), alice);
        assert_eq!(
            curl(
                &curl_bin,
                &["--http2-prior-knowledge", "-H", "x-user-id: alice", &url]
            ),
            alice
        );
    }
    assert_eq!(
        curl(&curl_bin, &["-H", "x-switchyard-backend: canary", &url]),
        "canary\n"
    );

    // Anonymous users: curl's cookie jar keeps the id the proxy set.
    let jar = std::env::temp_dir().join(format!("switchyard-jar-{}", std::process::id()));
    let jar = jar.to_str().unwrap();
    let head = curl(&curl_bin, &["-i", "-c", jar, &url]);
    assert!(
        head.to_ascii_lowercase()
            .contains("set-cookie: switchyard-uid="),
        "{head}"
    );
    let first = curl(&curl_bin, &["-b", jar, &url]);
    for _ in 0..5 {
        assert_eq!(curl(&curl_bin, &["-b", jar, &url]), first);
    }

    let mut seen = std::collections::HashSet::new();
    for i in 0..200 {
        seen.insert(curl(
            &curl_bin,
            &["-H", &format!("x-user-id: user-{i}"), &url],
        ));
    }
    // The demo splits blue 90 / green 0 / canary 10 (a rollout of canary is under way).
    let want: std::collections::HashSet<String> = ["blue\n", "canary\n"].map(String::from).into();
    assert_eq!(seen, want, "200 users reached {seen:?}");
    assert_eq!(
        curl(&curl_bin, &["-H", "x-switchyard-backend: green", &url]),
        "green\n"
    );
    let status = curl(
        &curl_bin,
        &[&format!("http://{}/v1/routes/demo/rollout", demo.admin)],
    );
    assert!(status.contains(r#""phase":"progressing""#), "{status}");

    assert_eq!(
        curl(&curl_bin, &[&format!("http://{}/health/ready", demo.admin)]),
        "ready\n"
    );

    let mut child = demo.child;
    kill(Pid::from_raw(child.0.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
}

/// An nginx origin on a free loopback port, serving a fixed answer that
/// echoes what the proxy forwarded, and a 1 MiB file.
struct Nginx {
    _child: Guard,
    addr: SocketAddr,
    big: Vec<u8>,
}

fn start_nginx(nginx: &Path) -> Nginx {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-nginx-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("www/big.bin"), &big).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen 127.0.0.1:{port};\n    root {d}/www;\n\
         location = / {{ default_type text/plain; return 200 \"nginx xff=$http_x_forwarded_for proto=$http_x_forwarded_proto rid=$http_x_request_id host=$host\\n\"; }}\n\
         location /big.bin {{ }}\n  }}\n}}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(nginx)
        .args([
            "-p",
            dir.to_str().unwrap(),
            "-c",
            conf_path.to_str().unwrap(),
        ])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let child = Guard(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // nginx says nothing when it is ready; its port accepting is the signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not start; see {d}/error.log"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx {
        _child: child,
        addr,
        big,
    }
}

#[tokio::test]
async fn nginx_as_origin_behind_the_proxy() {
    let Some(nginx_bin) = require("nginx") else {
        return;
    };
    let nginx = start_nginx(&nginx_bin);
    let proxy = Running::start(&config("", &[("origin", nginx.addr, 100.0)])).await;
    let c = client();

    let (status, _, body) = get(
        &c,
        &proxy.url("/"),
        &[
            ("x-user-id", "alice"),
            ("x-request-id", "rid-7"),
            ("host", "shop.test"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        "nginx xff=127.0.0.1 proto=http rid=rid-7 host=shop.test\n"
    );

    // A 1 MiB body streams through intact, many times over pooled connections.
    for _ in 0..20 {
        let (status, headers, _) = get(&c, &proxy.url("/big.bin"), &[("x-user-id", "bob")]).await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-length"], "1048576");
    }
    let resp = c
        .request(
            http::Request::get(proxy.url("/big.bin"))
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(bytes[..] == nginx.big[..], "body changed in transit");

    let (status, _, _) = get(&c, &proxy.url("/missing"), &[]).await;
    assert_eq!(status, 404, "nginx's own 404 passes through");
    proxy.stop().await;
}

/// A Prometheus server on a free loopback port scraping `target` every second.
struct Prometheus {
    _child: Guard,
    addr: SocketAddr,
}

fn start_prometheus(bin: &Path, target: SocketAddr) -> Prometheus {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-prom-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: switchyard\n    static_configs: [{{ targets: [\"{target}\"] }}]\n"
    );
    std::fs::write(dir.join("prometheus.yml"), conf).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Prometheus {
        _child: Guard(child),
        addr,
    }
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query; returns backend → value for a vector result.
async fn query(prom: &Prometheus, promql: &str) -> std::collections::HashMap<String, f64> {
    let url = format!("http://{}/api/v1/query?query={}", prom.addr, encode(promql));
    let (status, _, body) = get(&client(), &url, &[]).await;
    assert_eq!(status, 200, "{promql}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let backend = r["metric"]["backend"].as_str().unwrap_or("").to_owned();
            (backend, r["value"][1].as_str().unwrap().parse().unwrap())
        })
        .collect()
}

/// Polls `check` every 200 ms for at most `limit`: Prometheus scrapes on its
/// own clock and offers no signal when a scrape lands.
async fn eventually<T>(limit: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_golden_signals() {
    let Some(prom_bin) = require("prometheus") else {
        return;
    };
    let blue =
        common::Upstream::start("blue", common::Behaviour::Delay(Duration::from_millis(10))).await;
    let canary = common::Upstream::start(
        "canary",
        common::Behaviour::Delay(Duration::from_millis(200)),
    )
    .await;
    let proxy = Running::start(&config(
        "",
        &[("blue", blue.addr, 50.0), ("canary", canary.addr, 50.0)],
    ))
    .await;
    let prom = start_prometheus(&prom_bin, proxy.admin);
    let up = eventually(Duration::from_secs(60), async || {
        let url = format!("http://{}/-/ready", prom.addr);
        let ready = client()
            .request(
                http::Request::get(url)
                    .body(http_body_util::Empty::new())
                    .unwrap(),
            )
            .await
            .is_ok_and(|r| r.status() == 200);
        if !ready {
            return None;
        }
        query(&prom, r#"up{job="switchyard"}"#)
            .await
            .values()
            .next()
            .filter(|v| **v == 1.0)
            .copied()
    })
    .await;
    assert_eq!(up, Some(1.0), "Prometheus never scraped the proxy");

    // About three seconds of traffic, so several scrapes see it grow.
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..10 {
        let url = proxy.url("/");
        tasks.spawn(async move {
            let c = client();
            for i in (worker..300).step_by(10) {
                let (status, _, _) = get(&c, &url, &[("x-user-id", &format!("user-{i}"))]).await;
                assert_eq!(status, 200);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let want_blue = blue.arrived.load(std::sync::atomic::Ordering::SeqCst) as f64;
    let want_canary = canary.arrived.load(std::sync::atomic::Ordering::SeqCst) as f64;
    assert_eq!(want_blue + want_canary, 300.0);

    let totals = eventually(Duration::from_secs(30), async || {
        let t = query(&prom, "sum by (backend) (switchyard_requests_total)").await;
        (t.get("blue") == Some(&want_blue) && t.get("canary") == Some(&want_canary)).then_some(t)
    })
    .await;
    assert!(
        totals.is_some(),
        "Prometheus never saw blue={want_blue} canary={want_canary}"
    );

    let p95 = query(
        &prom,
        "histogram_quantile(0.95, sum by (le, backend) (rate(switchyard_request_duration_seconds_bucket[1m])))",
    )
    .await;
    // All blue samples sit in the (10 ms, 25 ms] bucket, all canary ones in
    // (100 ms, 250 ms]; histogram_quantile interpolates inside the bucket.
    let (b, c) = (p95["blue"], p95["canary"]);
    assert!(b > 0.010 && b <= 0.025, "blue p95 {b}");
    assert!(c > 0.100 && c <= 0.250, "canary p95 {c}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_h2load_over_tls_with_alpn() {
    let (Some(curl_bin), Some(h2load)) = (require("curl"), require("h2load")) else {
        return;
    };
    let ca = common::certs::Ca::new("external test CA");
    let dir = common::temp_dir("external-tls");
    let files = ca.leaf(&["a.test"], 30).write(&dir, "a");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let blue = common::Upstream::start("blue", common::Behaviour::Name).await;
    let proxy = Running::start(&config(
        &common::certs::tls_yaml(&[files], ""),
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let port = proxy.addr.port();
    let url = format!("https://a.test:{port}/");
    let resolve = format!("a.test:{port}:127.0.0.1");
    let (curl_bin, ca_path) = (curl_bin.clone(), ca_file.to_str().unwrap().to_owned());
    let outputs = tokio::task::spawn_blocking(move || {
        ["--http1.1", "--http2"].map(|version| {
            curl(
                &curl_bin,
                &[
                    version,
                    "--cacert",
                    &ca_path,
                    "--resolve",
                    &resolve,
                    "-H",
                    "x-user-id: u1",
                    "-w",
                    "%{http_code} %{http_version}",
                    &url,
                ],
            )
        })
    })
    .await
    .unwrap();
    assert_eq!(outputs[0], "blue\n200 1.1");
    assert_eq!(outputs[1], "blue\n200 2");

    // h2load negotiates h2 by ALPN and every request succeeds.
    let target = format!("https://127.0.0.1:{port}/");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(h2load)
            .args([
                "-n",
                "2000",
                "-c",
                "4",
                "-m",
                "10",
                "-H",
                "x-user-id: u1",
                &target,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Application protocol: h2"), "{text}");
    assert!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    assert!(text.contains("status codes: 2000 2xx"), "{text}");
    proxy.stop().await;
}

/// The attacker's page for the Chromium test: every way a page on another
/// origin could try to steer the admin API, each sent to the witness too.
const ATTACK_PAGE: &str = r#"<!doctype html><html><body><pre id="out">pending</pre><script>
const spec = JSON.stringify({stable: 'blue', target: 'canary', steps: [{weight: 100}]});
const weights = JSON.stringify({blue: 0, canary: 100});
async function attempt(url, init) {
  try { const r = await fetch(url, init); return r.type === 'opaque' ? 'opaque' : r.status; }
  catch (e) { return 'blocked'; }
}
async function both(path, init) {
  await attempt('WITNESS' + path, init);
  return attempt('ADMIN' + path, init);
}
(async () => {
  const out = {};
  out.text_post = await both('/v1/routes/api/rollout', {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'}, body: spec});
  out.form_post = await both('/v1/routes/api/rollout', {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: spec});
  out.json_put = await both('/v1/routes/api/weights', {method: 'PUT', headers: {'Content-Type': 'application/json'}, body: weights});
  out.read_state = await attempt('ADMIN/v1/state', {});
  out.rebound_post = await attempt('REBOUND/v1/routes/api/rollout', {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'}, body: spec});
  document.getElementById('out').textContent = JSON.stringify(out);
})();
</script></body></html>"#;

/// Serves `page` to every request on a loopback port.
async fn serve_page(page: String) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let page = page.clone();
            tokio::spawn(async move {
                let mut buf = [0; 4096];
                let _ = sock.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    page.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(page.as_bytes()).await;
            });
        }
    });
    addr
}

/// Issue 19, 4: a real browser (headless Chromium) on a page of another
/// origin cannot steer traffic through the token-less loopback admin API:
/// not with a `text/plain` or form POST (sent without a preflight: the
/// witness server receives them), not with a JSON PUT (its preflight is
/// never granted), not through a DNS-rebound name; nor can it read the
/// state. Nothing changes: same version, no rollout, no audit event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_in_chromium_cannot_steer_the_open_admin_api() {
    use common::{Behaviour, Upstream};
    let Some(chromium) = require("chromium") else {
        return;
    };
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "",
        &[("blue", blue.addr, 100.0), ("canary", canary.addr, 0.0)],
    ))
    .await;
    let witness = Upstream::start("witness", Behaviour::Name).await;
    let page = ATTACK_PAGE
        .replace("WITNESS", &format!("http://{}", witness.addr))
        .replace("ADMIN", &format!("http://{}", proxy.admin))
        .replace(
            "REBOUND",
            &format!("http://rebound.evil.example:{}", proxy.admin.port()),
        );
    let page = serve_page(page).await;
    let state = |path: &'static str| {
        let url = format!("http://{}{path}", proxy.admin);
        async move { common::call("GET", &url, None, &[], "").await }
    };
    let (_, before, _) = state("/v1/state").await;
    let profile = common::temp_dir("chromium");
    let run = tokio::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--host-resolver-rules=MAP rebound.evil.example 127.0.0.1",
            "--virtual-time-budget=10000",
            &format!("--user-data-dir={}", profile.display()),
            "--dump-dom",
            &format!("http://{page}/"),
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("chromium finished within 120 s")
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout);
    let results = dom
        .split("<pre id=\"out\">")
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .unwrap_or_else(|| panic!("no results in the page: {dom}"));
    let results: serde_json::Value = serde_json::from_str(&results.replace("&quot;", "\""))
        .unwrap_or_else(|e| panic!("{e}: {results}"));
    eprintln!("what the page saw: {results}");
    // The browser did send them: two simple POSTs and one preflight reached
    // the witness.
    assert!(
        witness.arrived.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "{results}"
    );
    assert_eq!(results["json_put"], "blocked", "{results}");
    assert_eq!(results["read_state"], "blocked", "{results}");
    // Nothing changed.
    let (_, after, _) = state("/v1/state").await;
    assert_eq!(
        before["etag"], after["etag"],
        "the state's version moved: {results}"
    );
    let (status, _, body) = state("/v1/routes/api/rollout").await;
    assert_eq!(status, 404, "a rollout was started: {body}");
    let (_, _, events) = state("/v1/events").await;
    assert!(events.contains("\"events\":[]"), "{events}");
    let c = client();
    for user in 0..20 {
        let backend = common::backend_of(&c, &proxy, &format!("u{user}")).await;
        assert_eq!(backend, "blue", "user u{user}");
    }
}

/// The README's tour: its shell blocks, in order.
fn readme_tour() -> Vec<Vec<String>> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let tour = readme
        .split("\n## A short tour")
        .nth(1)
        .expect("README has a tour")
        .split("\n## ")
        .next()
        .unwrap()
        // What follows is for the reader's own services, not the demo.
        .split("\nFor your own services")
        .next()
        .unwrap();
    tour.split("```sh\n")
        .skip(1)
        .map(|block| {
            block
                .split("```")
                .next()
                .unwrap()
                .lines()
                .map(str::to_owned)
                .filter(|l| !l.trim().is_empty())
                .collect()
        })
        .collect()
}

/// Issue 20: the README's tour works as written, top to bottom, against a
/// demo (on ephemeral ports, put in place of 8080 and 9901), with
/// `switchyard` on the `PATH` as the install line puts it: the split is
/// sticky, breaking the canary rolls the rollout back by itself, and the
/// second rollout is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_works_as_written() {
    if require("curl").is_none() {
        return;
    }
    let blocks = readme_tour();
    let install = &blocks[0];
    assert!(
        install[0].starts_with("cargo install --path proxy --locked"),
        "{install:?}"
    );
    assert!(install[1].starts_with("switchyard demo"), "{install:?}");
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    assert!(
        manifest.contains("name = \"switchyard\""),
        "the install line builds `switchyard`"
    );
    let demo = start_demo();
    let bin_dir = common::temp_dir("readme-bin");
    std::os::unix::fs::symlink(BIN, bin_dir.join("switchyard")).unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut outputs = Vec::new();
    for line in blocks[1..].iter().flatten() {
        let command = line
            .replace("127.0.0.1:8080", &demo.proxy.to_string())
            .replace("127.0.0.1:9901", &demo.admin.to_string());
        let run = tokio::process::Command::new("bash")
            .args(["-c", &command])
            .env("PATH", &path)
            .env("SWITCHYARD_ADMIN", format!("http://{}", demo.admin))
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output();
        // Bounded: the `until` lines wait for the rollout.
        let out = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .unwrap_or_else(|_| panic!("`{line}` did not finish within 120 s"))
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        // A line may say how it ends: `# ... exits 2 ...`.
        let expected = line
            .split_once('#')
            .and_then(|(_, comment)| comment.split("exits ").nth(1))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<i32>().ok())
            .unwrap_or(0);
        assert_eq!(
            out.status.code(),
            Some(expected),
            "`{line}`: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("$ {line}\n{stdout}");
        outputs.push((line.clone(), stdout));
    }
    let output = |starts: &str| -> Vec<&str> {
        outputs
            .iter()
            .filter(|(line, _)| line.starts_with(starts))
            .map(|(_, out)| out.as_str())
            .collect()
    };
    let alice = output("curl -s -H 'x-user-id: alice'");
    assert!(["blue\n", "canary\n"].contains(&alice[0]), "{alice:?}");
    assert_eq!(alice.last().unwrap(), &"canary\n", "promoted at last");
    assert!(output("for u in")[0].contains("blue"));
    assert!(output("switchyard ctl events")[0].contains("rollout.rollback"));
    let watched = output("switchyard ctl rollout watch demo");
    assert!(
        watched[0].contains("rolled-back") && watched[0].contains("error_rate"),
        "{watched:?}"
    );
    assert!(watched[1].contains("promoted"), "{watched:?}");
    let flag = output("switchyard ctl flag rollout watch new-search");
    assert!(
        flag[0].contains("rolled-back") && flag[0].contains("error_rate"),
        "{flag:?}"
    );
    assert!(flag[1].contains("promoted"), "{flag:?}");
    let stats = output("switchyard ctl flag stats new-search");
    assert!(stats[0].contains("beyond noise"), "{stats:?}");
    let _ = std::fs::remove_dir_all(&bin_dir);
    drop(demo);
}
