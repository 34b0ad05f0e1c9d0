//! Stage: accept connections on the data listener, terminate TLS when
//! configured, and serve HTTP/1.1 and HTTP/2 (by ALPN or prior knowledge) on
//! them, bounded in number, until shutdown; then drain.
//!
//! Slow and idle clients are bounded per connection:
//! - a new connection has `timeouts.request_header` to finish its TLS
//!   handshake, and again to send the first bytes of its first request;
//! - between requests, a kept-alive connection may stay silent for
//!   `timeouts.idle`;
//! - once a request head's first bytes arrive, the head must be complete
//!   within `timeouts.request_header` (slowloris);
//! - an HTTP/2 connection with no request started for `timeouts.idle` gets a
//!   GOAWAY.
//!
//! An HTTP/1 connection between requests is *parked*: hyper hands the socket
//! back once the response is written and the next request's first read would
//! block (vendor/PATCHES.md), with none of hyper's buffers or state kept. A
//! plain connection then goes to the parking lot (`lot.rs`) and its task
//! ends; a TLS connection's task waits for readability holding only the
//! stream. The next request gets a fresh task and hyper connection object.
//! A connection parks at its first idle moment after its first request, and
//! then at its first idle moment after `PARK_AFTER` of being served, so that
//! a busy connection is not parked and woken for every request.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use switchyard_control::config::{Limits, Timeouts};
use switchyard_control::metrics::ConnectionGuard;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;

use crate::lot::{Lot, Resume};
use crate::pipeline::{self, ConnInfo, Shared};
use crate::respond::ProxyBody;
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

/// How long an HTTP/1 connection is served by one hyper connection object
/// before it parks at its next idle moment.
const PARK_AFTER: Duration = Duration::from_millis(250);

/// How every HTTP/2 connection starts (RFC 9113, section 3.4); anything
/// else is HTTP/1.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
    let protocols = Arc::new(Protocols::new(limits, timeouts));
    let (stop, stopped) = watch::channel(false);
    let lot = match &tls {
        Some(_) => None,
        None => Lot::start(timeouts.idle.0, stopped.clone())
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no parking lot; idle connections keep their tasks");
            })
            .ok(),
    };
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
            service: ProxyService {
                shared: shared.clone(),
                info: ConnInfo {
                    peer: peer.ip(),
                    peer_header: crate::headers::ip_header(peer.ip()),
                    proto: if tls.is_some() { "https" } else { "http" },
                },
                activity: None,
            },
            protocols: protocols.clone(),
            clock,
            stopped: stopped.clone(),
            lot: lot.clone(),
            _open: (permit, open_gauge),
        };
        tokio::spawn(conn.run(stream, tls.clone()));
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

/// The connection was closed by h2 itself with ENHANCE_YOUR_CALM: the
/// client reset (or made it reset) streams past the limit.
fn is_flood(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|source| source.downcast_ref::<h2::Error>())
        .is_some_and(|h2| {
            h2.is_go_away() && h2.is_library() && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
        })
}

/// Answers a connection that will not be served with a canned response,
/// without waiting. What the client already sent is read first: closing a
/// socket with unread data resets it, which could destroy the response.
fn refuse(stream: &TcpStream, response: &[u8]) {
    let mut sink = [0u8; 4096];
    while matches!(stream.try_read(&mut sink), Ok(n) if n == sink.len()) {}
    let _ = stream.try_write(response);
}

/// One accepted client connection. Its task's future is what an idle
/// keep-alive connection costs, so everything only needed while a request
/// is being served (TLS, sniffing, a hyper connection, HTTP/2) is boxed and
/// freed when done.
struct Connection {
    service: ProxyService,
    protocols: Arc<Protocols>,
    clock: Clock,
    stopped: watch::Receiver<bool>,
    /// Where idle plain-HTTP/1 connections wait (none with TLS).
    lot: Option<Lot<Connection>>,
    /// Held until the connection ends: its place under
    /// `limits.max_connections`, and the open-connections gauge.
    _open: (OwnedSemaphorePermit, ConnectionGuard),
}

impl Connection {
    async fn run(mut self, stream: TcpStream, tls: Option<Arc<Terminator>>) {
        let idle = match tls {
            None => self.serve(stream).await,
            Some(tls) => {
                Box::pin(self.run_tls(stream, &tls)).await;
                None
            }
        };
        self.park_in_lot(idle);
    }

    /// Serves a connection the lot woke up.
    async fn resumed(mut self, stream: TcpStream) {
        let idle = self.serve_h1(Sniffed::whole(stream), false).await;
        self.park_in_lot(idle);
    }

    fn park_in_lot(self, idle: Option<TcpStream>) {
        if let (Some(stream), Some(lot)) = (idle, self.lot.clone()) {
            lot.park(self, stream);
        }
    }

    async fn run_tls(&mut self, stream: TcpStream, tls: &Terminator) {
        let deadline = tokio::time::Instant::now() + self.clock.header;
        let metrics = &self.service.shared.metrics;
        // A TLS connection starts with a handshake record (0x16); a
        // plain-HTTP client on the TLS port gets told so.
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] != 0x16 => {
                refuse(&stream, PLAIN_ON_TLS_RESPONSE);
                metrics.tls_handshake_failed();
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                metrics.tls_handshake_failed();
                return;
            }
        }
        // Counts requests, so that a parked TLS connection woken by bytes
        // that make no request (a TLS record trickled in) keeps its idle
        // deadline (`serve_h1`).
        self.service.activity = Some(Arc::default());
        let handshake = tls.acceptor().accept(stream);
        let peer = self.service.info.peer;
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(io)) => {
                // A TLS stream parks in its task, never in the lot.
                let _ = self.serve(io).await;
            }
            Ok(Err(e)) => {
                metrics.tls_handshake_failed();
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                metrics.tls_handshake_failed();
                tracing::debug!(%peer, "TLS handshake timed out");
            }
        }
    }

    /// Tells HTTP/2 from HTTP/1 by the connection's first bytes, then serves
    /// it; gives back the socket of a connection to park in the lot.
    async fn serve<I: Park>(&mut self, io: I) -> Option<TcpStream> {
        let io = Box::pin(self.sniff(io)).await?;
        if io.is_h2() {
            Box::pin(self.serve_h2(io)).await;
            None
        } else {
            self.serve_h1(io, true).await
        }
    }

    /// The connection's first bytes, or `None` if the client sends nothing
    /// within `request_header`, closes first, or the proxy is draining.
    async fn sniff<I: Park>(&mut self, io: I) -> Option<Sniffed<I>> {
        let deadline = tokio::time::Instant::now() + self.clock.header;
        let peer = self.service.info.peer;
        let sniffed = tokio::select! {
            sniffed = tokio::time::timeout_at(deadline, Sniffed::read(io)) => sniffed,
            _ = self.stopped.wait_for(|stop| *stop) => return None,
        };
        match sniffed {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "client connection failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "no request before the header timeout");
                None
            }
        }
    }

    /// Serves HTTP/1 requests, parking the connection between them (at the
    /// first idle moment if `park_at_once`). Gives back the socket when the
    /// connection is to wait in the lot.
    async fn serve_h1<I: Park>(
        &mut self,
        mut io: Sniffed<I>,
        mut park_at_once: bool,
    ) -> Option<TcpStream> {
        let mut idle_until = None;
        loop {
            let started = self.requests_started();
            // Boxed: the hyper connection lives only while requests are
            // being served.
            io = Box::pin(self.h1_session(io, park_at_once)).await?;
            park_at_once = false;
            if self.lot.as_ref().is_some_and(Lot::is_open) {
                match io.into_tcp() {
                    Ok(stream) => return Some(stream),
                    Err(back) => io = back,
                }
            }
            // A wake-up that served no request does not restart the idle
            // timeout: bytes that hyper never saw (part of a TLS record)
            // would otherwise hold the connection forever.
            let served = started.is_none() || self.requests_started() != started;
            let deadline = match idle_until {
                Some(deadline) if !served => deadline,
                _ => tokio::time::Instant::now() + self.clock.idle,
            };
            idle_until = Some(deadline);
            if !self.park(&io, deadline).await {
                // Idle too long, or draining: a clean close (for TLS a
                // close_notify, which a client that stopped reading must not
                // hold up for long).
                let _ = tokio::time::timeout(self.clock.header, io.shutdown()).await;
                return None;
            }
        }
    }

    /// Serves requests on one hyper connection until it goes idle (giving the
    /// socket back) or ends.
    async fn h1_session<I: Park>(
        &mut self,
        io: Sniffed<I>,
        park_at_once: bool,
    ) -> Option<Sniffed<I>> {
        let conn = self
            .protocols
            .h1
            .serve_connection(TokioIo::new(io), self.service.clone())
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let mut closing = false;
        // Parking and unparking cost about as much as a request's own
        // handling; a connection busy enough not to stay idle for long is
        // left alone, one timer per `PARK_AFTER` instead of per request.
        let mut ripe = std::pin::pin!(tokio::time::sleep(PARK_AFTER));
        let mut park = park_at_once;
        let ended = loop {
            tokio::select! {
                ended = std::future::poll_fn(|cx| conn.as_mut().poll_until_idle(cx, park)) => break ended,
                _ = &mut ripe, if !park => park = true,
                _ = self.stopped.wait_for(|stop| *stop), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        };
        match ended {
            Ok(Some(parts)) => Some(parts.io.into_inner()),
            // Closed or upgraded.
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "client connection ended with an error");
                None
            }
        }
    }

    /// Waits, holding only the socket, until the client sends its next
    /// request (`true`), or `deadline` passes or the proxy drains.
    async fn park<I: Park>(&mut self, io: &Sniffed<I>, deadline: tokio::time::Instant) -> bool {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::select! {
            ready = std::future::poll_fn(|cx| io.poll_read_ready(cx)) => ready.is_ok(),
            _ = tokio::time::sleep_until(deadline) => false,
            _ = self.stopped.wait_for(|stop| *stop) => false,
        }
    }

    /// Requests started on the connection, where they are counted.
    fn requests_started(&self) -> Option<u64> {
        self.service
            .activity
            .as_ref()
            .map(|activity| activity.started.load(Ordering::Relaxed))
    }

    async fn serve_h2<I: Park>(&mut self, io: Sniffed<I>) {
        let activity = self.service.activity.clone().unwrap_or_default();
        let service = ProxyService {
            activity: Some(activity.clone()),
            ..self.service.clone()
        };
        let mut conn = std::pin::pin!(self
            .protocols
            .h2
            .serve_connection(TokioIo::new(io), service));
        let mut closing = false;
        loop {
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        if is_flood(&e) {
                            self.service.shared.metrics.http2_flood_closed();
                        }
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

/// The future of one request: boxed, because hyper keeps a slot for it for
/// the connection's whole life and the unboxed future is a few KiB.
type Handled = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// The service hyper calls for each request on a connection.
#[derive(Clone)]
struct ProxyService {
    shared: Arc<Shared>,
    info: ConnInfo,
    /// Counts requests, for idle timeouts (HTTP/2, HTTP/1 over TLS).
    activity: Option<Arc<Activity>>,
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Handled;

    fn call(&self, req: Request<Incoming>) -> Handled {
        let open = self.activity.clone().map(RequestGuard::enter);
        Box::pin(pipeline::handle(
            self.shared.clone(),
            self.info.clone(),
            req,
            open,
        ))
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

/// The requests a connection has had, for its idle timeout (HTTP/2, and
/// HTTP/1 over TLS).
#[derive(Debug, Default)]
struct Activity {
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

/// A client stream a parked connection can wait on without reading it.
trait Park: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// Ready once the client's socket has bytes (or an end) to read.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// The plain socket, to park in the lot; a stream with state of its own
    /// (TLS) stays as it is.
    fn into_tcp(self) -> Result<TcpStream, Self>;
}

impl Park for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn into_tcp(self) -> Result<TcpStream, Self> {
        Ok(self)
    }
}

/// A parked TLS connection has no plaintext waiting: hyper parks it only
/// after a read of it would block, which rustls answers only once the socket
/// has nothing more either.
impl Park for TlsStream<TcpStream> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().0.poll_read_ready(cx)
    }

    fn into_tcp(self) -> Result<TcpStream, Self> {
        Err(self)
    }
}

/// A client stream with the bytes read to tell its protocol put back in
/// front of it.
struct Sniffed<I> {
    inner: I,
    first: [u8; H2_PREFACE.len()],
    /// `first[at..len]` is still to be read.
    at: u8,
    len: u8,
}

impl<I: Park> Sniffed<I> {
    /// Reads until the bytes either differ from the HTTP/2 preface or are
    /// all of it; `None` if the client closed without sending anything.
    async fn read(mut inner: I) -> io::Result<Option<Self>> {
        use tokio::io::AsyncReadExt as _;
        let mut first = [0u8; H2_PREFACE.len()];
        let mut len = 0;
        while len < first.len() && first[..len] == H2_PREFACE[..len] {
            match inner.read(&mut first[len..]).await? {
                0 if len == 0 => return Ok(None),
                0 => break,
                n => len += n,
            }
        }
        Ok(Some(Self {
            inner,
            first,
            at: 0,
            // At most 24.
            len: len as u8,
        }))
    }

    /// A stream with nothing read ahead.
    fn whole(inner: I) -> Self {
        Self {
            inner,
            first: [0; H2_PREFACE.len()],
            at: 0,
            len: 0,
        }
    }

    fn is_h2(&self) -> bool {
        self.first[..usize::from(self.len)] == H2_PREFACE[..]
    }
}

impl<I: Park> Park for Sniffed<I> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.at < self.len {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_read_ready(cx)
    }

    fn into_tcp(self) -> Result<TcpStream, Self> {
        if self.at < self.len {
            return Err(self);
        }
        // Nothing read ahead is left to give back.
        self.inner.into_tcp().map_err(Self::whole)
    }
}

impl<I: Park> AsyncRead for Sniffed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.len {
            let (at, len) = (usize::from(self.at), usize::from(self.len));
            let n = buf.remaining().min(len - at);
            buf.put_slice(&self.first[at..at + n]);
            self.at += n as u8;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: Park> AsyncWrite for Sniffed<I> {
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

impl Resume for Connection {
    fn resume(self, stream: TcpStream) {
        tokio::spawn(self.resumed(stream));
    }
}

/// The HTTP/1 and HTTP/2 settings every connection is served with.
struct Protocols {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(limits: &Limits, timeouts: &Timeouts) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // From a head's first bytes; the wait for them is the idle
            // timeout's (or, for a connection's first request, the header
            // timeout's), kept while the connection is parked.
            .header_read_timeout(timeouts.request_header.0)
            .max_buf_size(limits.max_header_bytes.max(HYPER_MIN_BUF))
            .keep_alive(true)
            .park_when_idle(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
            .keep_alive_interval(Some(timeouts.idle.0 / 2))
            .keep_alive_timeout(Duration::from_secs(20));
        Self { h1, h2 }
    }
}
