//! Stage: send the request to one endpoint of the chosen backend over a pooled
//! keep-alive HTTP/1.1 connection (TLS for `https://` endpoints), and classify
//! what went wrong if it did.
//!
//! Each endpoint has its own pool of idle connections, found through the
//! endpoint itself: a request takes a connection without hashing or looking
//! anything up, and gives it back when the response body has been read to
//! its end. Pools are kept across snapshots (by endpoint and TLS setting), so
//! a weight change does not drop pooled connections.
//!
//! HTTP/1.1 is spoken here, in the request's own task: `exchange` writes the
//! request (its body as it comes) and reads the response head; the response
//! body (`PooledBody`) is read off the socket as the client takes it. The
//! wire format is `h1.rs`'s.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::task::{ready, Waker};

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes, BytesMut};
use crossbeam_queue::ArrayQueue;
use http::request::Parts;
use http::uri::{Authority, Scheme, Uri};
use http::Response;
use http_body_util::{LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use switchyard_control::config::{Timeouts, UpstreamTlsConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tokio_util::io::poll_read_buf;
use tower_service::Service;

use crate::headers::Added;
use crate::http1::{self as h1, ChunkedDecoder, Decoded, Framing, RequestFraming, ResponseHead};
use crate::respond::ProxyError;

/// A request body on its way upstream, bounded by `limits.max_request_body_bytes`.
pub type UpstreamBody = Limited<Incoming>;

/// Idle connections kept per endpoint at most; more are closed when given back.
const MAX_IDLE_PER_ENDPOINT: usize = 128;

/// One upstream instance and how to reach it.
#[derive(Clone)]
pub struct Endpoint {
    pub authority: Authority,
    pool: Arc<Pool>,
}

impl Endpoint {
    /// Its outlier state.
    pub fn health(&self) -> &crate::health::EndpointHealth {
        &self.pool.health
    }

    /// One active health check: `GET path` on a new connection (TLS for an
    /// `https://` endpoint), healthy on a 2xx or 3xx status line within
    /// `timeout` (connect included).
    pub async fn probe(&self, path: &str, timeout: Duration, timeouts: &Timeouts) -> bool {
        let pool = &self.pool;
        let check = async {
            let mut conn = pool.connect(timeouts).await.ok()?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: switchyard-health-check\r\nConnection: close\r\n\r\n",
                self.authority
            );
            conn.io.write_all(request.as_bytes()).await.ok()?;
            conn.io.flush().await.ok()?;
            let mut line = Vec::new();
            let mut buf = [0u8; 256];
            while !line.contains(&b'\n') && line.len() < 4096 {
                let n = tokio::io::AsyncReadExt::read(&mut conn.io, &mut buf)
                    .await
                    .ok()?;
                if n == 0 {
                    break;
                }
                line.extend_from_slice(&buf[..n]);
            }
            // `HTTP/1.1 204 ...`: the status's first digit.
            let status = line.split(|b| *b == b' ').nth(1)?;
            Some(matches!(status.first(), Some(b'2' | b'3')) && status.len() == 3)
        };
        matches!(tokio::time::timeout(timeout, check).await, Ok(Some(true)))
    }
}

/// Why a send failed, and whether the request may go elsewhere.
#[derive(Debug)]
pub enum SendError {
    /// The upstream cannot have acted on the request (its connection failed
    /// before any of it was written, or it is idempotent and bodiless and
    /// no response began): it may be sent again, with its body, untouched,
    /// given back.
    Unsent(ProxyError, UpstreamBody),
    /// It may have been acted on, or the failure is the client's.
    Sent(ProxyError),
}

impl SendError {
    pub fn error(&self) -> &ProxyError {
        match self {
            SendError::Unsent(e, _) | SendError::Sent(e) => e,
        }
    }

    pub fn into_error(self) -> ProxyError {
        match self {
            SendError::Unsent(e, _) | SendError::Sent(e) => e,
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.pool.connect {
            Connect::Plain(_) => "http",
            Connect::Tls(_) => "https",
            Connect::Unusable(_) => "https (unusable)",
        };
        write!(f, "{kind}://{}", self.authority)
    }
}

/// How new connections to an endpoint are made.
enum Connect {
    Plain(HttpConnector),
    Tls(HttpsConnector<HttpConnector>),
    /// TLS that could not be set up (the CA file became unreadable after
    /// the configuration was checked): every request fails with the reason.
    Unusable(Arc<str>),
}

/// One endpoint's idle connections, and its health.
struct Pool {
    /// Outlier state: kept with the pool, so across snapshots.
    health: crate::health::EndpointHealth,
    /// `scheme://authority/`: what the connector dials.
    target: Uri,
    connect: Connect,
    /// Lock-free: requests on every worker take and give back here.
    idle: ArrayQueue<Idle>,
    idle_timeout: Duration,
    /// `timeouts.response_body_idle`.
    body_idle: Duration,
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

impl Idle {
    /// Not idle past `timeout`, and nothing arrived (no close, no stray
    /// bytes) since its last response was read.
    fn usable(&mut self, timeout: Duration) -> bool {
        self.since.elapsed() <= timeout && self.conn.is_quiet()
    }
}

/// An endpoint as configured (`host:port` or `https://host:port`) and its
/// backend's TLS settings: what one pool serves.
type PoolKey = (String, Option<UpstreamTlsConfig>);

/// The upstream connection pools, shared by every route and backend.
pub struct Upstreams {
    /// Read and changed only when a snapshot is built.
    pools: ArcSwap<HashMap<PoolKey, Arc<Pool>>>,
    timeouts: Timeouts,
}

impl Upstreams {
    pub fn new(timeouts: &Timeouts) -> Self {
        Self {
            pools: ArcSwap::from_pointee(HashMap::new()),
            timeouts: timeouts.clone(),
        }
    }

    /// The endpoint `spec` (`host:port` or `https://host:port`) of a backend
    /// with TLS settings `tls`, with its pool (made on first use; kept
    /// while any snapshot still names the endpoint).
    pub fn endpoint(&self, spec: &str, tls: Option<&UpstreamTlsConfig>) -> Endpoint {
        let (secure, authority) = switchyard_control::config::split_endpoint(spec);
        let authority = Authority::try_from(authority).expect("endpoint validated as host:port");
        let tls = if secure { tls.cloned() } else { None };
        let key = (spec.to_owned(), tls);
        if let Some(pool) = self.pools.load().get(&key) {
            return Endpoint {
                authority,
                pool: pool.clone(),
            };
        }
        let pool = Arc::new(self.pool(secure, &authority, key.1.as_ref()));
        self.pools.rcu(|pools| {
            // Pools no endpoint uses any more (only this map holds them) go,
            // and their idle connections close with them.
            let mut kept: HashMap<PoolKey, Arc<Pool>> = pools
                .iter()
                .filter(|(_, p)| Arc::strong_count(p) > 1)
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect();
            kept.entry(key.clone()).or_insert_with(|| pool.clone());
            kept
        });
        let pool = self.pools.load().get(&key).cloned().unwrap_or(pool);
        Endpoint { authority, pool }
    }

    /// Closes idle connections the upstream has closed or that idled past
    /// `timeouts.idle`, and takes the buffers of those idle for a second or
    /// more (run every second by the proxy).
    pub fn sweep(&self) {
        for pool in self.pools.load().values() {
            pool.sweep();
        }
    }

    fn pool(&self, secure: bool, authority: &Authority, tls: Option<&UpstreamTlsConfig>) -> Pool {
        let scheme = if secure { Scheme::HTTPS } else { Scheme::HTTP };
        let target = Uri::builder()
            .scheme(scheme)
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("scheme, validated authority and / make a URI");
        let connect = if secure {
            self.tls_connector(tls)
        } else {
            Connect::Plain(connector(&self.timeouts))
        };
        Pool {
            health: Default::default(),
            target,
            connect,
            idle: ArrayQueue::new(MAX_IDLE_PER_ENDPOINT),
            idle_timeout: self.timeouts.idle.0,
            body_idle: self.timeouts.response_body_idle.0,
        }
    }

    fn tls_connector(&self, tls: Option<&UpstreamTlsConfig>) -> Connect {
        let config = match crate::tls::client_config(tls) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "upstream TLS unusable");
                return Connect::Unusable(e.into());
            }
        };
        let builder = HttpsConnector::<HttpConnector>::builder()
            .with_tls_config(config)
            .https_only();
        let builder = match tls.and_then(|t| t.server_name.clone()) {
            Some(name) => {
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                    ServerName::try_from(name).expect("server_name validated as a host name"),
                ))
            }
            None => builder,
        };
        Connect::Tls(
            builder
                .enable_http1()
                .wrap_connector(connector(&self.timeouts)),
        )
    }

    /// Sends the request (`parts`, the fields the proxy `added` and `body`;
    /// `upgrade`: it asks to switch
    /// protocols) to `endpoint` and waits for the response headers, at most
    /// `timeouts.request`. The response's fields go into the request's
    /// header map, which `parts` no longer holds afterwards.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        parts: &mut Parts,
        added: &Added,
        body: UpstreamBody,
        upgrade: bool,
    ) -> Result<Response<PooledBody>, SendError> {
        if !body.is_end_stream() {
            // Boxed: the upload's progress and timers are for requests with
            // a body only; a bodiless request's future stays as small as
            // it was without them.
            return Box::pin(self.send_with_body(endpoint, parts, added, body, upgrade)).await;
        }
        let request = Head::of(parts, added, upgrade, None)?;
        // Without a body there is no upload to wait for: one timer, from
        // the start (a new connection's connect included).
        let sent = endpoint.pool.send(request, body, &self.timeouts);
        match tokio::time::timeout(self.timeouts.request.0, sent).await {
            Err(_elapsed) => Err(SendError::Sent(ProxyError::UpstreamTimeout)),
            Ok(sent) => sent,
        }
    }

    /// `send` for a request with a body: `timeouts.upload_idle` bounds the
    /// upload's stalls, then `timeouts.request` the wait for the head.
    async fn send_with_body(
        &self,
        endpoint: &Endpoint,
        parts: &mut Parts,
        added: &Added,
        body: UpstreamBody,
        upgrade: bool,
    ) -> Result<Response<PooledBody>, SendError> {
        let progress = Progress::default();
        let request = Head::of(parts, added, upgrade, Some(&progress))?;
        let sent = endpoint.pool.send(request, body, &self.timeouts);
        tokio::pin!(sent);
        // While the body goes up, `upload_idle` without progress ends it;
        // once it is all sent, `request` bounds the wait for the head.
        let started = tokio::time::Instant::now();
        let timer = tokio::time::sleep_until(started + self.timeouts.upload_idle.0);
        tokio::pin!(timer);
        loop {
            let (sent_at, last) = progress.marks();
            let deadline = match sent_at {
                Some(at) => started + at + self.timeouts.request.0,
                None => started + last + self.timeouts.upload_idle.0,
            };
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                done = &mut sent => return done,
                // Progress: the deadline moves.
                _ = progress.changed.notified() => continue,
                _ = &mut timer => {
                    if progress.marks() != (sent_at, last) {
                        continue; // progress meanwhile: a later deadline
                    }
                    let error = match sent_at {
                        Some(_) => ProxyError::UpstreamTimeout,
                        // Stalled waiting for the client's body: its
                        // slowness, not the backend's.
                        None if progress.waiting_on_client() => ProxyError::DownstreamBodyTimeout,
                        None => ProxyError::UpstreamTimeout,
                    };
                    return Err(SendError::Sent(error));
                }
            }
        }
    }
}

impl Pool {
    async fn send(
        self: &Arc<Self>,
        mut request: Head<'_>,
        body: UpstreamBody,
        timeouts: &Timeouts,
    ) -> Result<Response<PooledBody>, SendError> {
        let asked_upgrade = request.upgrade;
        let mut upload = Upload::new(request.method, body);
        // A pooled connection the upstream closed just as it was taken
        // fails before anything of the request was read by anyone; then the
        // request goes once more, on a new connection.
        if let Some(conn) = self.checkout() {
            match exchange(conn, &mut request, upload, true).await {
                Ok(exchanged) => {
                    return self
                        .respond(exchanged, asked_upgrade)
                        .map_err(SendError::Sent)
                }
                Err(Failed::Unsent(e, unsent)) => {
                    tracing::debug!(error = %e, "pooled connection dropped the request; sending it once more");
                    upload = unsent.restart(request.method);
                }
                Err(Failed::Sent(e)) => return Err(SendError::Sent(e)),
            }
        }
        let conn = match self.connect(timeouts).await {
            Ok(conn) => conn,
            // Nothing was written: the request may go to another endpoint.
            Err(e) => return Err(SendError::Unsent(e, upload.body)),
        };
        match exchange(conn, &mut request, upload, false).await {
            Ok(exchanged) => self
                .respond(exchanged, asked_upgrade)
                .map_err(SendError::Sent),
            Err(Failed::Unsent(e, unsent)) => Err(SendError::Unsent(e, unsent.body)),
            Err(Failed::Sent(e)) => Err(SendError::Sent(e)),
        }
    }

    /// An idle connection that is still open and has nothing unread, oldest
    /// first (the queue is FIFO, which also spreads use over the idle
    /// connections).
    fn checkout(&self) -> Option<Box<Conn>> {
        loop {
            let mut idle = self.idle.pop()?;
            if idle.usable(self.idle_timeout) {
                return Some(idle.conn);
            }
        }
    }

    /// Closes the idle connections that are no longer usable; those idle
    /// for `KEEP_BUFFERS_IDLE` give their buffers back.
    fn sweep(&self) {
        for _ in 0..self.idle.len() {
            let Some(mut idle) = self.idle.pop() else {
                return;
            };
            if idle.since.elapsed() >= KEEP_BUFFERS_IDLE {
                idle.conn.release_buffers();
            }
            if idle.usable(self.idle_timeout) {
                // Full (requests gave connections back meanwhile): closes.
                let _ = self.idle.push(idle);
            }
        }
    }

    async fn connect(&self, timeouts: &Timeouts) -> Result<Box<Conn>, ProxyError> {
        // The connectors bound the TCP connect by `timeouts.connect`; this
        // also bounds the TLS handshake.
        let dial = async {
            match &self.connect {
                Connect::Plain(c) => c
                    .clone()
                    .call(self.target.clone())
                    .await
                    .map(|io| Either::Left(io.into_inner()))
                    .map_err(|e| connect_error(&e)),
                Connect::Tls(c) => c
                    .clone()
                    .call(self.target.clone())
                    .await
                    .map(|io| Either::Right(Box::new(TokioIo::new(io))))
                    .map_err(|e| connect_error(&*e)),
                Connect::Unusable(why) => Err(ProxyError::UpstreamConnect(why.to_string())),
            }
        };
        match tokio::time::timeout(timeouts.connect.0 * 2, dial).await {
            Ok(connected) => connected.map(|io| Box::new(Conn::new(io))),
            Err(_) => Err(ProxyError::UpstreamConnectTimeout),
        }
    }

    fn respond(
        self: &Arc<Self>,
        exchanged: Exchanged,
        asked_upgrade: bool,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let Exchanged { conn, head, upload } = exchanged;
        let upgraded = head.status == http::StatusCode::SWITCHING_PROTOCOLS;
        if upgraded && !asked_upgrade {
            return Err(ProxyError::UpstreamReset(
                "101 Switching Protocols to a request that asked for no upgrade".into(),
            ));
        }
        if upgraded && (upload.is_some() || !conn.write_buf.is_empty()) {
            // What was not sent would be lost in the tunnel.
            return Err(ProxyError::UpstreamReset(
                "101 Switching Protocols before the request was sent".into(),
            ));
        }
        let mut body = PooledBody {
            conn: Some(conn),
            pool: self.clone(),
            decoder: match head.framing {
                Framing::Empty => Decoder::Length(0),
                Framing::Length(n) => Decoder::Length(n),
                Framing::Chunked => Decoder::Chunked(ChunkedDecoder::default()),
                Framing::Close => Decoder::Close,
            },
            upload: upload.map(Box::new),
            reusable: head.reusable,
            upgraded,
            stall: None,
            stalling: false,
        };
        if !upgraded && body.decoder.is_end() {
            body.finish();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        Ok(resp)
    }

    fn put(&self, mut conn: Box<Conn>) {
        conn.idle();
        // Full: this connection closes.
        let _ = self.idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }
}

// === One connection ===

/// An upstream connection's transport: plain TCP, or TLS (boxed: a TLS
/// session is large, and most connections are plain).
type Io = Either<TcpStream, Box<TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>>>;

/// A connection to an upstream, with the bytes read and not yet used, and
/// those still to write.
struct Conn {
    io: Io,
    read_buf: BytesMut,
    /// `read_buf` was given more than `READ_SIZE` (a long head, a large
    /// body): let go of it when the connection goes back to the pool,
    /// even while still shared (its size cannot be asked then).
    read_grown: bool,
    write_buf: BytesMut,
}

/// Bytes asked of the kernel per read at least (more for a long body).
const READ_SIZE: usize = 8 * 1024;

/// At most this much of a body with a known length is read in one go.
const MAX_READ_SIZE: usize = 64 * 1024;

/// A connection back in the pool keeps a write buffer up to this size.
const KEEP_WRITE_BUF: usize = 8 * 1024;

/// A connection idle in the pool this long gives its buffers back.
const KEEP_BUFFERS_IDLE: Duration = Duration::from_secs(1);

/// Lets go of a written-out buffer whose allocation grew past
/// `KEEP_WRITE_BUF` (`capacity()` of a written-out buffer is only what is
/// left past the written bytes, so the allocation is asked instead).
fn shrink_write_buf(buf: &mut BytesMut) {
    if buf.is_empty() && buf.try_reclaim(KEEP_WRITE_BUF + 1) {
        *buf = BytesMut::new();
    }
}

/// Informational (1xx) answers read before a final one at most.
const MAX_INFORMATIONAL: usize = 16;

/// A request body frame this small is copied after the head (or the frame
/// before it), so head and body leave in one write.
const COALESCE: usize = 4 * 1024;

impl Conn {
    fn new(io: Io) -> Self {
        Self {
            io,
            read_buf: BytesMut::new(),
            read_grown: false,
            write_buf: BytesMut::new(),
        }
    }

    /// Ready for the pool: both buffers are kept for the next request (a
    /// busy connection would otherwise allocate a read buffer per response),
    /// unless a large head or body made them grow. The sweeper takes them
    /// from connections that idle on (`release_buffers`).
    fn idle(&mut self) {
        if std::mem::take(&mut self.read_grown) {
            self.read_buf = BytesMut::new();
        }
        shrink_write_buf(&mut self.write_buf);
    }

    /// Gives both buffers back to the allocator.
    fn release_buffers(&mut self) {
        self.read_buf = BytesMut::new();
        self.write_buf = BytesMut::new();
    }

    /// Whether nothing arrived (no close, no stray bytes) since the last
    /// response was read. Asks the socket only if the runtime saw it become
    /// readable, so an idle connection costs no system call here.
    fn is_quiet(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// Reads more of the response into `read_buf`: at least `READ_SIZE`
    /// bytes of room, up to `want`. `Ok(0)`: the upstream closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let want = want.clamp(READ_SIZE, MAX_READ_SIZE);
        if self.read_buf.capacity() - self.read_buf.len() < want / 2 {
            self.read_buf.reserve(want);
            self.read_grown |= self.read_buf.capacity() > READ_SIZE;
        }
        poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf)
    }

    /// Parses the next final response head, skipping 1xx ones other than
    /// 101. `saw_bytes` turns true once anything of a response has arrived.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        request: &mut Head<'_>,
        saw_bytes: &mut bool,
        informational: &mut usize,
    ) -> Poll<Result<ResponseHead, ProxyError>> {
        loop {
            if !self.read_buf.is_empty() {
                *saw_bytes = true;
                // Once a response has begun, the request will not be sent
                // again, and its header map takes the response's fields.
                match h1::parse_response(&mut self.read_buf, request.method, request.headers) {
                    Ok(Some(head))
                        if head.status.is_informational()
                            && head.status != http::StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        *informational += 1;
                        if *informational > MAX_INFORMATIONAL {
                            return Poll::Ready(Err(ProxyError::UpstreamReset(
                                "too many informational responses".into(),
                            )));
                        }
                        continue;
                    }
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(ProxyError::UpstreamReset(e.to_string()))),
                }
            }
            match ready!(self.poll_fill(cx, READ_SIZE)) {
                Ok(0) if *saw_bytes => {
                    return Poll::Ready(Err(ProxyError::UpstreamReset(
                        "upstream closed the connection in the response head".into(),
                    )))
                }
                Ok(0) => {
                    return Poll::Ready(Err(ProxyError::UpstreamReset(
                        "upstream closed the connection without a response".into(),
                    )))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(ProxyError::UpstreamReset(e.to_string()))),
            }
        }
    }
}

/// The request body on its way up, written as the client sends it.
struct Upload {
    body: UpstreamBody,
    framing: RequestFraming,
    /// Length still to come of a `Content-Length` body.
    left: u64,
    /// A large body frame being written (small ones go through `write_buf`).
    pending: Bytes,
    /// The body has ended; only what is buffered is left to write.
    ended: bool,
    /// Whether anything of the body was taken from the client yet.
    touched: bool,
}

enum UploadError {
    /// The client's body failed: the request cannot be completed.
    Body(ProxyError),
    /// Writing to the upstream failed.
    Io(io::Error),
}

impl Upload {
    fn new(method: &http::Method, body: UpstreamBody) -> Self {
        // An HTTP/2 body can end after hyper sized it: ended is length 0.
        let exact = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        let framing = RequestFraming::for_body(method, exact);
        Self {
            framing,
            // A `GET` of unknown length is polled to its end: data there is
            // refused, not dropped.
            ended: exact == Some(0),
            left: match framing {
                RequestFraming::Length(n) => n,
                _ => 0,
            },
            body,
            pending: Bytes::new(),
            touched: false,
        }
    }

    /// Takes what body frames are ready (a few KiB at most) into `out`, then
    /// writes; done when the body has ended and all of it is written.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut Io,
        out: &mut BytesMut,
        progress: Option<&Progress>,
    ) -> Poll<Result<(), UploadError>> {
        let waiting = |on_client: bool| {
            if let Some(p) = progress {
                p.waiting(on_client);
                if !on_client {
                    p.moved();
                }
            }
        };
        loop {
            while !self.ended && self.pending.is_empty() && out.len() < COALESCE {
                self.touched = true;
                match Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Pending => {
                        waiting(true);
                        break;
                    }
                    Poll::Ready(None) => {
                        waiting(false);
                        self.end(out)?
                    }
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Err(UploadError::Body(body_error(&*e))))
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        waiting(false);
                        // Trailers are not passed on (docs/decisions.md).
                        if let Ok(data) = frame.into_data() {
                            self.take(data, out)?;
                        }
                        if self.body.is_end_stream() {
                            self.end(out)?;
                        }
                    }
                }
            }
            if out.is_empty() && self.pending.is_empty() {
                // TLS holds written bytes until flushed: flush before
                // waiting for more of the body, not only at its end.
                ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(UploadError::Io)?;
                if !self.ended {
                    // The body's waker is registered: its frame was pending.
                    return Poll::Pending;
                }
                return Poll::Ready(Ok(()));
            }
            ready!(poll_write_all(io, cx, out)).map_err(UploadError::Io)?;
            ready!(poll_write_all(io, cx, &mut self.pending)).map_err(UploadError::Io)?;
        }
    }

    /// The same untouched body, to be sent again from its start.
    fn restart(self, method: &http::Method) -> Self {
        Self::new(method, self.body)
    }

    fn take(&mut self, data: Bytes, out: &mut BytesMut) -> Result<(), UploadError> {
        if self.framing == RequestFraming::Chunked {
            h1::write_chunk(out, &data);
            return Ok(());
        }
        if self.framing == RequestFraming::None && !data.is_empty() {
            return Err(UploadError::Body(ProxyError::DownstreamMalformed(
                "a GET or HEAD body of unknown length",
            )));
        }
        self.left = self.left.checked_sub(data.len() as u64).ok_or_else(|| {
            UploadError::Body(ProxyError::DownstreamBody(
                "request body longer than its content-length".into(),
            ))
        })?;
        if data.len() <= COALESCE {
            out.extend_from_slice(&data);
        } else {
            self.pending = data;
        }
        Ok(())
    }

    fn end(&mut self, out: &mut BytesMut) -> Result<(), UploadError> {
        self.ended = true;
        if self.framing == RequestFraming::Chunked {
            out.extend_from_slice(h1::LAST_CHUNK);
        } else if self.left != 0 {
            return Err(UploadError::Body(ProxyError::DownstreamBody(
                "request body shorter than its content-length".into(),
            )));
        }
        Ok(())
    }
}

fn poll_write_all<B: Buf>(io: &mut Io, cx: &mut Context<'_>, buf: &mut B) -> Poll<io::Result<()>> {
    while buf.has_remaining() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, buf.chunk()))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        buf.advance(n);
    }
    Poll::Ready(Ok(()))
}

/// What of the request the exchange writes: its head.
struct Head<'a> {
    method: &'a http::Method,
    /// Origin-form: path and query.
    target: &'a str,
    /// Taken over by the response's fields once a response begins: the
    /// response goes out in the map the request came in, not a new one.
    headers: &'a mut http::HeaderMap,
    /// Fields the proxy adds, written after `headers`.
    added: &'a Added,
    /// The request asks to switch protocols (a 101 is welcome).
    upgrade: bool,
    /// How far the upload is (for the timeouts).
    progress: Option<&'a Progress>,
}

impl<'a> Head<'a> {
    /// The head of the request in `parts` (its target in origin form).
    fn of(
        parts: &'a mut Parts,
        added: &'a Added,
        upgrade: bool,
        progress: Option<&'a Progress>,
    ) -> Result<Head<'a>, SendError> {
        Ok(Head {
            method: &parts.method,
            target: origin_form(&parts.uri).map_err(SendError::Sent)?,
            headers: &mut parts.headers,
            added,
            upgrade,
            progress,
        })
    }
}

/// An upload's progress, for `Upstreams::send`'s timeouts: times are
/// milliseconds since the send started.
#[derive(Default)]
struct Progress {
    origin: std::sync::OnceLock<Instant>,
    /// When the last body bytes moved.
    last_ms: std::sync::atomic::AtomicU64,
    /// When the whole request was sent (0: not yet; stored as ms + 1).
    sent_ms: std::sync::atomic::AtomicU64,
    /// The upload waits for the client's next body bytes.
    waiting_on_client: std::sync::atomic::AtomicBool,
    /// Woken when the marks move.
    changed: tokio::sync::Notify,
}

impl Progress {
    fn now(&self) -> u64 {
        self.origin.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    fn moved(&self) {
        self.last_ms
            .store(self.now(), std::sync::atomic::Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn sent(&self) {
        self.sent_ms
            .store(self.now() + 1, std::sync::atomic::Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn waiting(&self, on_client: bool) {
        self.waiting_on_client
            .store(on_client, std::sync::atomic::Ordering::Relaxed);
    }

    fn waiting_on_client(&self) -> bool {
        self.waiting_on_client
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// (sent at, last progress at), as durations since the start.
    fn marks(&self) -> (Option<Duration>, Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let sent = self.sent_ms.load(Relaxed);
        (
            (sent != 0).then(|| Duration::from_millis(sent - 1)),
            Duration::from_millis(self.last_ms.load(Relaxed)),
        )
    }
}

/// A request sent and its response head read.
struct Exchanged {
    conn: Box<Conn>,
    head: ResponseHead,
    /// The rest of the request body, when the response came first.
    upload: Option<Upload>,
}

enum Failed {
    /// Nothing of the request can have been acted on: it may go again, on
    /// another connection, with its body (untouched) given back.
    Unsent(ProxyError, Upload),
    Sent(ProxyError),
}

/// Writes the request on `conn` and reads the response head, writing the
/// body meanwhile: an upstream may answer before it has read all of it.
async fn exchange(
    mut conn: Box<Conn>,
    request: &mut Head<'_>,
    mut upload: Upload,
    reused: bool,
) -> Result<Exchanged, Failed> {
    h1::write_request_head(
        &mut conn.write_buf,
        request.method,
        request.target,
        request.headers,
        request.added,
        upload.framing,
    );
    // Asking again is safe only if the upstream cannot have acted on the
    // request: it saw none of it, or it is idempotent and without a body,
    // and no response began (RFC 9110 §9.2.2).
    let idempotent = request.method.is_idempotent() && upload.ended && !upload.touched;
    let mut uploaded = false;
    let mut write_failed = false;
    let mut saw_bytes = false;
    let mut informational = 0;
    let head = std::future::poll_fn(|cx| {
        if !uploaded && !write_failed {
            match upload.poll(cx, &mut conn.io, &mut conn.write_buf, request.progress) {
                Poll::Ready(Ok(())) => {
                    uploaded = true;
                    if let Some(p) = request.progress {
                        p.sent();
                    }
                }
                Poll::Ready(Err(UploadError::Body(e))) => return Poll::Ready(Err(e)),
                // The response may still be readable (a 413 sent before
                // closing): read on, and fail if there is none.
                Poll::Ready(Err(UploadError::Io(e))) => {
                    tracing::debug!(error = %e, "writing the request upstream failed");
                    write_failed = true;
                }
                Poll::Pending => {}
            }
        }
        conn.poll_head(cx, request, &mut saw_bytes, &mut informational)
    })
    .await;
    match head {
        Ok(mut head) => {
            // A connection whose request did not all go out is not reused.
            head.reusable &= !write_failed;
            Ok(Exchanged {
                conn,
                head,
                upload: (!uploaded && !write_failed).then_some(upload),
            })
        }
        // On a reused connection a failed write also counts as unsent (the
        // upstream closed it while idle); on a new one only an idempotent,
        // bodiless request may go again.
        Err(e) if !saw_bytes && !upload.touched && (idempotent || (reused && write_failed)) => {
            Err(Failed::Unsent(e, upload))
        }
        Err(e) => Err(Failed::Sent(e)),
    }
}

/// An upstream response body, read off its connection as the client takes
/// it. Read to its end, the connection goes back to the pool (if both sides
/// allow); dropped early, it closes: what is left of the response would have
/// to be read first.
pub struct PooledBody {
    /// `None` once the body has ended or failed.
    conn: Option<Box<Conn>>,
    pool: Arc<Pool>,
    decoder: Decoder,
    /// The rest of the request body, when the response came first (rare:
    /// boxed, so the body stays small to move).
    upload: Option<Box<Upload>>,
    reusable: bool,
    /// A 101: the connection is the tunnel's, taken by `take_tunnel`.
    upgraded: bool,
    /// The deadline of a wait for the upstream's next bytes
    /// (`timeouts.response_body_idle`): made the first time a read pends
    /// (most bodies arrive with their head and never need one), reset when
    /// one pends again after progress.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// `stall` is armed for the current wait.
    stalling: bool,
}

enum Decoder {
    /// Bytes left.
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Until the upstream closes.
    Close,
    /// Reading failed; the error was returned.
    Failed,
}

impl Decoder {
    fn is_end(&self) -> bool {
        matches!(self, Self::Length(0))
    }
}

/// An upgraded upstream connection and what it sent after its 101.
pub struct Tunnel {
    io: Io,
    early: BytesMut,
}

impl PooledBody {
    /// The upstream side of a 101 response's tunnel.
    pub fn take_tunnel(&mut self) -> Option<Tunnel> {
        if !self.upgraded {
            return None;
        }
        let conn = self.conn.take()?;
        Some(Tunnel {
            io: conn.io,
            early: conn.read_buf,
        })
    }

    /// The body has ended: its connection goes back to the pool if nothing
    /// about it is left over.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.reusable
            && !self.upgraded
            && self.upload.is_none()
            && conn.read_buf.is_empty()
            && conn.write_buf.is_empty()
        {
            self.pool.put(conn);
        }
    }

    fn fail(&mut self, e: impl Into<io::Error>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.conn = None;
        self.decoder = Decoder::Failed;
        Poll::Ready(Some(Err(e.into())))
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.upgraded {
            return Poll::Ready(None);
        }
        if matches!(this.decoder, Decoder::Failed) {
            // Not `None`, which would read as the body's clean end.
            return Poll::Ready(Some(Err(io::Error::other("upstream response body failed"))));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(upload) = this.upload.as_mut() {
                match upload.poll(cx, &mut conn.io, &mut conn.write_buf, None) {
                    Poll::Ready(Ok(())) => this.upload = None,
                    Poll::Ready(Err(e)) => {
                        if let UploadError::Io(e) = e {
                            tracing::debug!(error = %e, "writing the request upstream failed");
                        }
                        this.upload = None;
                        this.reusable = false;
                        conn.write_buf.clear();
                    }
                    Poll::Pending => {}
                }
            }
            let data = match &mut this.decoder {
                Decoder::Length(0) => None,
                Decoder::Length(left) if !conn.read_buf.is_empty() => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.read_buf.len());
                    *left -= n as u64;
                    Some(conn.read_buf.split_to(n).freeze())
                }
                Decoder::Close if !conn.read_buf.is_empty() => Some(conn.read_buf.split().freeze()),
                Decoder::Chunked(chunks) => match chunks.decode(&mut conn.read_buf) {
                    Ok(Decoded::Data(data)) => Some(data),
                    Ok(Decoded::Done) => None,
                    Ok(Decoded::NeedMore) => Some(Bytes::new()),
                    Err(e) => return this.fail(io::Error::new(io::ErrorKind::InvalidData, e)),
                },
                Decoder::Length(_) | Decoder::Close => Some(Bytes::new()),
                Decoder::Failed => unreachable!("returned above"),
            };
            match data {
                None => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Some(data) if !data.is_empty() => {
                    if this.decoder.is_end() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // Nothing buffered: read.
                Some(_) => {}
            }
            let want = match this.decoder {
                Decoder::Length(left) => usize::try_from(left).unwrap_or(usize::MAX),
                _ => READ_SIZE,
            };
            let filled = match conn.poll_fill(cx, want) {
                Poll::Ready(filled) => {
                    this.stalling = false;
                    filled
                }
                Poll::Pending => {
                    let idle = this.pool.body_idle;
                    if !this.stalling {
                        let deadline = tokio::time::Instant::now() + idle;
                        match this.stall.as_mut() {
                            Some(stall) => stall.as_mut().reset(deadline),
                            None => this.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                        }
                        this.stalling = true;
                    }
                    let stall = this.stall.as_mut().expect("armed above");
                    if std::future::Future::poll(stall.as_mut(), cx).is_ready() {
                        tracing::info!(
                            upstream = %this.pool.target,
                            idle_ms = idle.as_millis() as u64,
                            "upstream response body stalled; cut off"
                        );
                        return this.fail(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "upstream response body stalled",
                        ));
                    }
                    return Poll::Pending;
                }
            };
            match filled {
                Ok(0) if matches!(this.decoder, Decoder::Close) => {
                    this.reusable = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection mid-body",
                    ))
                }
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.decoder {
            Decoder::Failed => false,
            _ => self.conn.is_none() || self.upgraded || self.decoder.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(left) => SizeHint::with_exact(left),
            Decoder::Failed => SizeHint::default(),
            _ if self.is_end_stream() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Tunnel {
    /// Copies both ways between `client` and the upstream until either
    /// side closes, starting with what the upstream sent after its 101.
    pub async fn join<C>(mut self, client: &mut C) -> io::Result<(u64, u64)>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        client.write_all(&self.early).await?;
        client.flush().await?;
        self.early.clear();
        tokio::io::copy_bidirectional(client, &mut self.io).await
    }
}

fn connector(timeouts: &Timeouts) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(timeouts.connect.0));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    // The TLS connector wraps this one and asks for `https` URIs.
    connector.enforce_http(false);
    connector
}

/// The target as the upstream gets it: path and query only.
fn origin_form(uri: &Uri) -> Result<&str, ProxyError> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    if !path.starts_with('/') {
        // `OPTIONS *` and other non-path targets are not proxied.
        return Err(ProxyError::DownstreamMalformed(
            "request target is not a path",
        ));
    }
    Ok(path)
}

/// A failed connect (refused, unreachable, timed out, TLS verification).
fn connect_error(err: &(dyn StdError + 'static)) -> ProxyError {
    if io_kind(err) == Some(io::ErrorKind::TimedOut) {
        ProxyError::UpstreamConnectTimeout
    } else {
        ProxyError::UpstreamConnect(source_text(err))
    }
}

/// The client's request body failed on its way up: always the client's
/// doing (it aborted, broke the framing, or sent too much), never the
/// backend's.
fn body_error(err: &(dyn StdError + 'static)) -> ProxyError {
    if caused_by::<LengthLimitError>(err) {
        // The client's streamed body passed `limits.max_request_body_bytes`.
        return ProxyError::DownstreamBodyTooLarge;
    }
    ProxyError::DownstreamBody(source_text(err))
}

fn caused_by<E: StdError + 'static>(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}

fn io_kind(err: &(dyn StdError + 'static)) -> Option<io::ErrorKind> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        cur = e.source();
    }
    None
}

/// The innermost cause, which names what actually happened ("Connection refused").
fn source_text(err: &(dyn StdError + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str) -> Result<String, ProxyError> {
        origin_form(&uri.parse().unwrap()).map(str::to_owned)
    }

    #[test]
    fn an_idle_write_buffer_is_kept_only_if_small() {
        let mut small = BytesMut::with_capacity(1024);
        small.extend_from_slice(&[b'h'; 600]);
        small.advance(600);
        shrink_write_buf(&mut small);
        assert!(small.try_reclaim(1024), "a head-sized buffer is kept");

        let mut large = BytesMut::with_capacity(20 * 1024);
        large.extend_from_slice(&[b'h'; 20 * 1024]);
        large.advance(20 * 1024);
        assert!(
            large.capacity() < KEEP_WRITE_BUF,
            "capacity() hides the allocation"
        );
        shrink_write_buf(&mut large);
        assert_eq!(large.capacity(), 0, "a 20 KiB allocation is let go");
    }

    /// A connection pair on loopback: the proxy's end as a `Conn`, and the
    /// upstream's end.
    async fn conn_pair() -> (Box<Conn>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stream, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let conn = Box::new(Conn::new(Either::Left(stream.unwrap())));
        (conn, accepted.unwrap().0)
    }

    #[tokio::test]
    async fn a_read_buffer_grown_by_a_large_body_is_let_go_even_while_shared() {
        use tokio::io::AsyncWriteExt;
        let (mut conn, mut upstream) = conn_pair().await;
        upstream.write_all(&[b'x'; 32 * 1024]).await.unwrap();
        let mut read = 0;
        while read < 32 * 1024 {
            read += std::future::poll_fn(|cx| conn.poll_fill(cx, MAX_READ_SIZE))
                .await
                .unwrap();
        }
        // The body's bytes, still held by the client side.
        let body = conn.read_buf.split().freeze();
        conn.idle();
        assert_eq!(conn.read_buf.capacity(), 0, "a 64 KiB buffer is not kept");
        assert_eq!(body.len(), 32 * 1024);

        // A response that fits the usual buffer leaves it in place.
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .unwrap();
        std::future::poll_fn(|cx| conn.poll_fill(cx, READ_SIZE))
            .await
            .unwrap();
        let head = conn.read_buf.split().freeze();
        conn.idle();
        drop(head);
        assert!(conn.read_buf.try_reclaim(READ_SIZE), "kept for the next");
    }

    #[tokio::test]
    async fn the_sweeper_takes_the_buffers_of_connections_that_idle_on() {
        let (mut conn, _upstream) = conn_pair().await;
        let timeouts = Timeouts::default();
        let pool = Pool {
            health: Default::default(),
            target: "http://127.0.0.1:9/".parse().unwrap(),
            connect: Connect::Plain(connector(&timeouts)),
            idle: ArrayQueue::new(2),
            idle_timeout: Duration::from_secs(60),
            body_idle: Duration::from_secs(60),
        };
        conn.read_buf.reserve(READ_SIZE);
        conn.write_buf.reserve(1024);
        pool.put(conn);

        pool.sweep();
        let idle = pool.idle.pop().expect("a fresh idle connection stays");
        assert!(
            idle.conn.read_buf.capacity() >= READ_SIZE,
            "kept while fresh"
        );
        let since = Instant::now() - KEEP_BUFFERS_IDLE;
        pool.idle.push(Idle { since, ..idle }).ok().unwrap();

        pool.sweep();
        let idle = pool.idle.pop().expect("still open, still pooled");
        assert_eq!(idle.conn.read_buf.capacity(), 0, "read buffer given back");
        assert_eq!(idle.conn.write_buf.capacity(), 0, "write buffer given back");
    }

    #[test]
    fn the_upstream_gets_path_and_query_only() {
        assert_eq!(target("/a/b?c=d").unwrap(), "/a/b?c=d");
        assert_eq!(target("http://example.com:8080/a?b").unwrap(), "/a?b");
        assert_eq!(target("http://example.com").unwrap(), "/");
        assert!(matches!(
            target("*"),
            Err(ProxyError::DownstreamMalformed(_))
        ));
    }
}
