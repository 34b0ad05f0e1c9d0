//! Stage: accept connections on the data listener, terminate TLS when
//! configured, and serve HTTP/1.1 and HTTP/2 (by ALPN or prior knowledge) on
//! them, bounded in number, until shutdown; then drain.
//!
//! Slow and idle clients are bounded per connection:
//! - a new connection has `timeouts.request_header` to finish its TLS
//!   handshake and again to send its first request head;
//! - between requests, a kept-alive connection may stay silent for
//!   `timeouts.idle`; once the next request's first byte arrives, the head must
//!   be complete within `timeouts.request_header` (slowloris);
//! - an HTTP/2 connection with no request started for `timeouts.idle` gets a
//!   GOAWAY.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use switchyard_control::config::{Limits, Timeouts};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::pipeline::{self, ConnInfo, Shared};
use crate::tls::Terminator;

/// hyper will not parse with a smaller buffer than this.
pub const HYPER_MIN_BUF: usize = 8192;

/// Streams a client whose streams were reset before the proxy saw them may
/// have pending before the connection is closed (CVE-2023-44487, "rapid
/// reset").
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams the proxy may reset because of a client's protocol errors before
/// the connection is closed.
const H2_MAX_LOCAL_RESETS: usize = 1024;

/// What a client connecting past `limits.max_connections` gets (plain HTTP).
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-type: text/plain\r\ncontent-length: 40\r\nconnection: close\r\n\r\nswitchyard: too many connections, retry\n";

/// What a plain-HTTP client on the TLS listener gets.
const PLAIN_ON_TLS_RESPONSE: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 55\r\nconnection: close\r\n\r\nswitchyard: this port speaks TLS; use https:// instead\n";

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open when the drain deadline passed (0: clean).
    pub abandoned: usize,
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish (up to `timeouts.drain`) and returns.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<Arc<Terminator>>,
    limits: &Limits,
    timeouts: &Timeouts,
    shutdown: impl Future<Output = ()>,
) -> Drained {
    let template = Arc::new(connection_builder(limits, timeouts));
    let (stop, stopped) = watch::channel(false);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let clock = Clock {
        idle: timeouts.idle.0,
        header: timeouts.request_header.0,
    };
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // At the connection limit, shed: a plain-HTTP client gets a 503 it
        // can retry on, a TLS client a closed connection.
        let Ok(permit) = open.clone().try_acquire_owned() else {
            shared.metrics.connection_shed();
            if tls.is_none() {
                refuse(&stream, SHED_RESPONSE);
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let open_gauge = shared.metrics.connection_opened();
        let conn = Connection {
            shared: shared.clone(),
            template: template.clone(),
            clock,
            stopped: stopped.clone(),
            info: ConnInfo {
                peer: peer.ip(),
                peer_header: crate::headers::ip_header(peer.ip()),
                proto: if tls.is_some() { "https" } else { "http" },
            },
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            conn.run(stream, tls.as_deref()).await;
            drop((permit, open_gauge));
        });
    }
    drop(listener);

    let open_now = limits.max_connections - open.available_permits();
    tracing::info!(connections = open_now, "draining");
    let _ = stop.send(true);
    // Every open connection holds one permit: all of them back means every
    // connection has finished.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let finished = tokio::time::timeout(timeouts.drain.0, open.acquire_many(all)).await;
    match finished {
        Ok(_) => Drained { abandoned: 0 },
        Err(_) => {
            let abandoned = limits.max_connections - open.available_permits();
            tracing::warn!(
                abandoned,
                "drain deadline passed; closing remaining connections"
            );
            Drained { abandoned }
        }
    }
}

/// Answers a connection that will not be served with a canned response,
/// without waiting. What the client already sent is read first: closing a
/// socket with unread data resets it, which could destroy the response.
fn refuse(stream: &TcpStream, response: &[u8]) {
    let mut sink = [0u8; 4096];
    while matches!(stream.try_read(&mut sink), Ok(n) if n == sink.len()) {}
    let _ = stream.try_write(response);
}

/// One accepted client connection.
struct Connection {
    shared: Arc<Shared>,
    template: Arc<auto::Builder<TokioExecutor>>,
    clock: Clock,
    stopped: watch::Receiver<bool>,
    info: ConnInfo,
}

impl Connection {
    async fn run(self, stream: TcpStream, tls: Option<&Terminator>) {
        let activity = Arc::new(Activity::default());
        let io = Counted {
            inner: stream,
            activity: activity.clone(),
        };
        match tls {
            None => self.serve(io, activity).await,
            // Boxed: the handshake and a TLS stream are several KiB, which
            // every plain connection's task would otherwise carry too.
            Some(tls) => Box::pin(self.run_tls(io, activity, tls)).await,
        }
    }

    async fn run_tls(self, io: Counted, activity: Arc<Activity>, tls: &Terminator) {
        let deadline = tokio::time::Instant::now() + self.clock.header;
        // A TLS connection starts with a handshake record (0x16); a
        // plain-HTTP client on the TLS port gets told so.
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, io.inner.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] != 0x16 => {
                refuse(&io.inner, PLAIN_ON_TLS_RESPONSE);
                self.shared.metrics.tls_handshake_failed();
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                self.shared.metrics.tls_handshake_failed();
                return;
            }
        }
        let handshake = tls.acceptor().accept(io);
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(io)) => self.serve(io, activity).await,
            Ok(Err(e)) => {
                self.shared.metrics.tls_handshake_failed();
                tracing::debug!(peer = %self.info.peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                self.shared.metrics.tls_handshake_failed();
                tracing::debug!(peer = %self.info.peer, "TLS handshake timed out");
            }
        }
    }

    async fn serve<I>(mut self, io: I, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = (*self.template).clone();
        builder.http1().timer(HeadClock {
            clock: self.clock,
            activity: activity.clone(),
        });
        let (shared, info, counted) = (self.shared.clone(), self.info.clone(), activity.clone());
        let service = service_fn(move |req| {
            let (shared, info) = (shared.clone(), info.clone());
            let open = RequestGuard::enter(counted.clone());
            // Boxed per request: hyper keeps a slot for the service's future
            // for the connection's whole life, and the unboxed future is a
            // few KiB that every idle connection would hold.
            Box::pin(async move {
                let resp = pipeline::handle(&shared, info, req).await;
                drop(open);
                Ok::<_, Infallible>(resp)
            })
        });
        // On the heap: pinned on the stack, the connection would take two
        // slots in this future's state.
        let mut conn = Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
        let mut closing = false;
        loop {
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    return;
                }
                _ = self.stopped.wait_for(|stop| *stop), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = idle(&activity, self.clock.idle), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Resolves once no request was started or open on the connection for a
/// whole `idle` period (so after between `idle` and twice `idle`).
async fn idle(activity: &Activity, idle: Duration) {
    let mut seen = activity.started.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(idle).await;
        let now = activity.started.load(Ordering::Relaxed);
        if now == seen && activity.open.load(Ordering::Relaxed) == 0 {
            return;
        }
        seen = now;
    }
}

/// What a connection has done, for its timeouts.
#[derive(Debug, Default)]
struct Activity {
    /// Bytes received from the client (TLS records included).
    bytes_read: AtomicU64,
    /// Requests started on the connection.
    started: AtomicU64,
    /// Requests being handled now.
    open: AtomicUsize,
}

/// Counts a request as open until dropped.
struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    fn enter(activity: Arc<Activity>) -> Self {
        activity.started.fetch_add(1, Ordering::Relaxed);
        activity.open.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
struct Clock {
    idle: Duration,
    header: Duration,
}

/// The timer hyper's HTTP/1 server uses for its header-read timeout, which
/// hyper starts as soon as it waits for a request head, idle or not. This one
/// tells the two apart: while no byte of the next request has arrived on a
/// kept-alive connection the deadline is `idle`; from the first byte (or from
/// the start, for a connection's first request) it is `request_header`.
#[derive(Debug, Clone)]
struct HeadClock {
    clock: Clock,
    activity: Arc<Activity>,
}

impl hyper::rt::Timer for HeadClock {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let now = tokio::time::Instant::now();
        let first_request = self.activity.started.load(Ordering::Relaxed) == 0;
        let wait = if first_request {
            self.clock.header
        } else {
            self.clock.idle
        };
        Box::pin(HeadSleep {
            activity: self.activity.clone(),
            bytes_at_start: self.activity.bytes_read.load(Ordering::Relaxed),
            header: self.clock.header,
            head_started: first_request,
            sleep: Box::pin(tokio::time::sleep_until(now + wait)),
        })
    }
}

struct HeadSleep {
    activity: Arc<Activity>,
    bytes_at_start: u64,
    header: Duration,
    /// The deadline is already the header deadline.
    head_started: bool,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::rt::Sleep for HeadSleep {}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this each time the head is still incomplete after a
        // read, so the first byte of the next request is seen here.
        if !self.head_started
            && self.activity.bytes_read.load(Ordering::Relaxed) != self.bytes_at_start
        {
            self.head_started = true;
            let deadline = tokio::time::Instant::now() + self.header;
            self.sleep.as_mut().reset(deadline);
        }
        self.sleep.as_mut().poll(cx)
    }
}

/// The client socket, counting the bytes read from it.
struct Counted {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.activity.bytes_read.fetch_add(read, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn connection_builder(limits: &Limits, timeouts: &Timeouts) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Applied through `HeadClock`: `request_header` once a head has
        // started (or on a new connection), `idle` before that.
        .header_read_timeout(timeouts.request_header.0)
        .max_buf_size(limits.max_header_bytes.max(HYPER_MIN_BUF))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
        .keep_alive_interval(Some(timeouts.idle.0 / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}
