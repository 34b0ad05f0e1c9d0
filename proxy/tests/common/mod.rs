//! Real servers and clients on loopback for the end-to-end tests: hyper
//! upstreams that answer with their name (or echo what they received), the
//! proxy's own `run()` on ephemeral ports, and hyper clients.
#![allow(dead_code)]

pub mod certs;
pub mod rollouts;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard_control::config::Config;
use switchyard_proxy::listen::Drained;
use switchyard_proxy::server::{metrics_for, Listeners, Proxy, ProxyHandle, StartOptions};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

/// How a test upstream answers.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// `200` with body `<name>\n`.
    Name,
    /// `200` with every received header as `name: value` lines.
    EchoHeaders,
    /// Waits this long, then answers like `Name`.
    Delay(Duration),
    /// Answers a WebSocket-style upgrade with 101, then echoes bytes.
    UpgradeEcho,
    /// `200` with the request body as received.
    EchoBody,
    /// `500` to requests whose `x-feature-flags` carries this flag (its
    /// users), else like `Name`: a feature that breaks for those who get it.
    FailFlag(&'static str),
    /// By arrival order: every `slow_every`-th request waits `slow`, the
    /// rest `fast`; every `fail_every`-th answers 500 (0: never).
    Pattern {
        fast: Duration,
        slow: Duration,
        slow_every: usize,
        fail_every: usize,
    },
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests that have arrived (counted before any delay).
    pub arrived: Arc<AtomicUsize>,
    /// Notified on every arrival.
    pub arrival: Arc<Notify>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn start(name: &str, behaviour: Behaviour) -> Upstream {
        Self::start_at("127.0.0.1:0".parse().unwrap(), name, behaviour).await
    }

    /// As `start`, on `addr` (an endpoint that comes back on its port).
    pub async fn start_at(addr: SocketAddr, name: &str, behaviour: Behaviour) -> Upstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrived = Arc::new(AtomicUsize::new(0));
        let arrival = Arc::new(Notify::new());
        let name: Arc<str> = name.into();
        let connections = Arc::new(AtomicUsize::new(0));
        let (count, notify, accepted) = (arrived.clone(), arrival.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (name, count, notify) = (name.clone(), count.clone(), notify.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let nth = count.fetch_add(1, Ordering::SeqCst) + 1;
                        notify.notify_waiters();
                        answer(name.clone(), behaviour, nth, req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream {
            addr,
            arrived,
            arrival,
            connections,
        }
    }

    /// Resolves once at least `n` requests have arrived.
    pub async fn wait_for_arrivals(&self, n: usize) {
        loop {
            let notified = self.arrival.notified();
            if self.arrived.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    }
}

impl Behaviour {
    /// Answers at once; every `every`-th request (by arrival) gets a 500.
    pub fn failing(every: usize) -> Behaviour {
        Behaviour::Pattern {
            fast: Duration::ZERO,
            slow: Duration::ZERO,
            slow_every: 1,
            fail_every: every,
        }
    }
}

async fn answer(
    name: Arc<str>,
    behaviour: Behaviour,
    nth: usize,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = match behaviour {
        Behaviour::Pattern {
            fast,
            slow,
            slow_every,
            fail_every,
        } => {
            let wait = if nth.is_multiple_of(slow_every) {
                slow
            } else {
                fast
            };
            tokio::time::sleep(wait).await;
            if fail_every > 0 && nth.is_multiple_of(fail_every) {
                let mut resp = Response::new(Full::new(Bytes::from("failed\n")));
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                return Ok(resp);
            }
            format!("{name}\n")
        }
        Behaviour::Name => format!("{name}\n"),
        Behaviour::FailFlag(flag) => {
            let flagged = req
                .headers()
                .get("x-feature-flags")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|f| f.trim() == flag));
            if flagged {
                let mut resp = Response::new(Full::new(Bytes::from("failed\n")));
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                return Ok(resp);
            }
            format!("{name}\n")
        }
        Behaviour::Delay(d) => {
            tokio::time::sleep(d).await;
            format!("{name}\n")
        }
        Behaviour::EchoHeaders => {
            let mut out = String::new();
            for (k, v) in req.headers() {
                out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("<bin>")));
            }
            out
        }
        Behaviour::EchoBody => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            return Ok(Response::new(Full::new(body.unwrap_or_default())));
        }
        Behaviour::UpgradeEcho => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on_upgrade.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let resp = Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(Full::new(Bytes::new()))
                .unwrap();
            return Ok(resp);
        }
    };
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// A proxy running in this process on ephemeral ports.
pub struct Running {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub handle: ProxyHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Drained>,
}

impl Running {
    /// Starts the proxy with `yaml`, whose `listen` addresses are replaced
    /// by ephemeral ones.
    pub async fn start(yaml: &str) -> Running {
        let mut config = Config::from_yaml(yaml).expect("test config is valid");
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.admin.listen = "127.0.0.1:0".parse().unwrap();
        let listeners = Listeners::bind(&config).await.unwrap();
        let (addr, admin) = (listeners.data_addr(), listeners.admin_addr());
        let metrics = metrics_for(&config);
        let proxy = Proxy::new(config, metrics, StartOptions::default()).expect("proxy starts");
        let handle = proxy.handle();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(proxy.run(listeners, async move {
            let _ = stopped.await;
        }));
        Running {
            addr,
            admin,
            handle,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Starts the drain and waits for it to finish.
    pub async fn stop(mut self) -> Drained {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.task).await.unwrap()
    }
}

/// A config with one route `api` over the given `(name, addr, weight)` backends.
pub fn config(extra: &str, backends: &[(&str, SocketAddr, f64)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(n, a, w)| format!("      - {{ name: {n}, endpoints: [\"{a}\"], weight: {w} }}"))
        .collect();
    format!(
        "{extra}\nroutes:\n  - name: api\n    backends:\n{}\n",
        list.join("\n")
    )
}

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// GET `url` with `headers`; returns status, headers and body text.
pub async fn get(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, String) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Empty::new()).unwrap())
        .await
        .expect("request");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// The backend name a user reaches.
pub async fn backend_of(client: &HttpClient, proxy: &Running, user: &str) -> String {
    let (status, _, body) = get(client, &proxy.url("/"), &[("x-user-id", user)]).await;
    assert_eq!(status, StatusCode::OK, "user {user}: {body}");
    body.trim().to_owned()
}

/// Sends raw bytes on a fresh connection and returns everything read until
/// the server closes (bounded by a 10 s guard so a bug cannot hang the suite).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub type BodyClient = Client<HttpConnector, Full<Bytes>>;

pub fn body_client() -> BodyClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One admin API call: `method url` with an optional bearer token, extra
/// headers and a body; returns status, headers and body text.
pub async fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (StatusCode, http::HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    // Writes to the admin API say JSON (it refuses those that do not),
    // unless the test says otherwise.
    let writes = matches!(method, "POST" | "PUT" | "PATCH");
    if writes
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = body_client()
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .expect("admin request");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The value of `key=` in a log line.
fn log_field(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

/// Starts the real binary as `switchyard run --config PATH ARGS...`; returns
/// the child with its data and admin addresses once it logs that it serves.
pub fn spawn_run_path(
    path: &std::path::Path,
    args: &[&str],
) -> (std::process::Child, SocketAddr, SocketAddr) {
    let (child, data, admin, _) = spawn_run_logged(path, args);
    (child, data, admin)
}

/// `spawn_run_path`, with the child's later log lines on a channel.
pub fn spawn_run_logged(
    path: &std::path::Path,
    args: &[&str],
) -> (
    std::process::Child,
    SocketAddr,
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--config", path.to_str().unwrap()])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child_pid = child.id();
    let mut lines = BufReader::new(stderr).lines();
    let (data, admin) = loop {
        let line = lines
            .next()
            .expect("switchyard exited before serving")
            .unwrap();
        if let (Some(data), Some(admin)) = (log_field(&line, "data="), log_field(&line, "admin=")) {
            break (data, admin);
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe (and
    // show it with SWITCHYARD_TEST_LOGS=1, when a test needs looking into).
    let echo = std::env::var_os("SWITCHYARD_TEST_LOGS").is_some();
    let (log, logged) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if echo {
                eprintln!("[switchyard {}] {line}", child_pid);
            }
            let _ = log.send(line);
        }
    });
    (child, data, admin, logged)
}

/// The sum of the `/metrics` lines of the proxy at `admin` that start with
/// `series` (0 when there are none).
pub async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let (_, _, text) = call("GET", &format!("http://{admin}/metrics"), None, &[], "").await;
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Runs the binary with `args` (without the admin address and token of
/// the environment): exit code, stdout, stderr.
pub fn switchyard(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_remove("SWITCHYARD_ADMIN")
        .env_remove("SWITCHYARD_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
