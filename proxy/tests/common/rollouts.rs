//! What the rollout tests share: steady traffic, the admin API as JSON,
//! waiting on a rollout's status, and a webhook receiver.

// The webhook receiver is test scaffolding, not data plane: the crate's ban
// on locks does not apply to it.
#![allow(clippy::disallowed_types)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{call, client, get, Running};

/// Steady traffic from distinct users until stopped (at most 60 s and
/// 100,000 requests, so a bug cannot run it forever).
pub struct Traffic {
    stop: Arc<AtomicBool>,
    /// Requests sent, and the users of those answered other than 200.
    task: tokio::task::JoinHandle<(u64, Vec<String>)>,
}

impl Traffic {
    pub fn start(proxy: &Running) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let url = proxy.url("/");
        let task = tokio::spawn(async move {
            let c = client();
            let deadline = Instant::now() + Duration::from_secs(60);
            let (mut sent, mut failed) = (0u64, Vec::new());
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline && sent < 100_000 {
                let user = format!("user-{}", sent % 5000);
                let (status, _, _) = get(&c, &url, &[("x-user-id", &user)]).await;
                if status != 200 {
                    failed.push(user);
                }
                sent += 1;
            }
            (sent, failed)
        });
        Traffic { stop, task }
    }

    /// Stops; returns how many requests were sent.
    pub async fn stop(self) -> u64 {
        self.stop_counting_failures().await.0
    }

    /// Stops; returns how many requests were sent and the users of those
    /// answered other than 200.
    pub async fn stop_counting_failures(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

pub async fn api(proxy: &Running, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, _, text) = call(
        method,
        &format!("http://{}{path}", proxy.admin),
        None,
        &[],
        body.to_owned(),
    )
    .await;
    (
        status.as_u16(),
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

/// Polls the rollout status at `path` every 50 ms (at most 30 s) until
/// `done` holds.
pub async fn wait_rollout(proxy: &Running, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, status) = api(proxy, "GET", path, "").await;
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "rollout never reached the expected state: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A webhook receiver: records every body, answers with a settable status.
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    pub bodies: Arc<std::sync::Mutex<Vec<Value>>>,
    pub status: Arc<std::sync::atomic::AtomicU16>,
    pub got: Arc<tokio::sync::Notify>,
}

impl Receiver {
    pub async fn start(status: u16) -> Receiver {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let status = Arc::new(std::sync::atomic::AtomicU16::new(status));
        let got = Arc::new(tokio::sync::Notify::new());
        let (b, s, g) = (bodies.clone(), status.clone(), got.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (b, s, g) = (b.clone(), s.clone(), g.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (b, s, g) = (b.clone(), s.clone(), g.clone());
                            async move {
                                let bytes = req.into_body().collect().await.unwrap().to_bytes();
                                b.lock()
                                    .unwrap()
                                    .push(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
                                g.notify_waiters();
                                let mut resp = http::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::new(),
                                ));
                                *resp.status_mut() =
                                    http::StatusCode::from_u16(s.load(Ordering::SeqCst)).unwrap();
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            bodies,
            status,
            got,
        }
    }

    pub fn events(&self) -> Vec<String> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| b["event"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// Resolves once a body with `event` arrived (at most 30 s).
    pub async fn wait_for(&self, event: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let notified = self.got.notified();
            if let Some(b) = self
                .bodies
                .lock()
                .unwrap()
                .iter()
                .find(|b| b["event"] == event)
            {
                return b.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no `{event}` webhook; got {:?}",
                self.events()
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }
}
