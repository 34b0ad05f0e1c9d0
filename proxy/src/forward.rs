//! Stage: send the request to one endpoint of the chosen backend over a pooled
//! keep-alive HTTP/1.1 connection (TLS for `https://` endpoints), and classify
//! what went wrong if it did.
//!
//! Each endpoint has its own pool of idle connections, found through the
//! endpoint itself: a request takes a connection without hashing or looking
//! anything up, and gives it back when the response body has been read to
//! its end. Pools are kept across snapshots (by endpoint and TLS setting), so
//! a weight change does not drop pooled connections.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::ServerName;
use switchyard_control::config::{Timeouts, UpstreamTlsConfig};
use tower_service::Service;

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

/// One endpoint's idle connections.
struct Pool {
    /// `scheme://authority/`: what the connector dials.
    target: Uri,
    connect: Connect,
    /// Lock-free: requests on every worker take and give back here.
    idle: ArrayQueue<Idle>,
    idle_timeout: Duration,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
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
            target,
            connect,
            idle: ArrayQueue::new(MAX_IDLE_PER_ENDPOINT),
            idle_timeout: self.timeouts.idle.0,
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

    /// Sends `req` (whose URI is origin-form) to `endpoint` and waits for the
    /// response headers, at most `timeouts.request`.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, ProxyError> {
        *req.version_mut() = Version::HTTP_11;
        *req.uri_mut() = origin_form(req.uri())?;
        let pool = &endpoint.pool;
        match tokio::time::timeout(self.timeouts.request.0, pool.send(req, &self.timeouts)).await {
            Err(_elapsed) => Err(ProxyError::UpstreamTimeout),
            Ok(sent) => sent,
        }
    }
}

impl Pool {
    async fn send(
        self: &Arc<Self>,
        req: Request<UpstreamBody>,
        timeouts: &Timeouts,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let mut req = req;
        // A pooled connection the upstream closed just as it was taken
        // fails before the request is written; then the request goes on a
        // new connection (it was not sent, so this is safe for any method).
        while let Some(mut sender) = self.checkout().await {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.pooled(resp, sender)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(classify(e.error())),
                },
            }
        }
        let mut sender = self.connect(timeouts).await?;
        match sender.send_request(req).await {
            Ok(resp) => Ok(self.pooled(resp, sender)),
            Err(e) => Err(classify(&e)),
        }
    }

    /// An idle connection that is still open and ready, oldest first (the
    /// queue is FIFO, which also spreads use over the idle connections).
    async fn checkout(&self) -> Option<SendRequest<UpstreamBody>> {
        loop {
            let Idle { mut sender, since } = self.idle.pop()?;
            if sender.is_closed() || since.elapsed() > self.idle_timeout {
                continue;
            }
            // Given back as soon as its last response ended; hyper may not
            // have marked it ready yet.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self, timeouts: &Timeouts) -> Result<SendRequest<UpstreamBody>, ProxyError> {
        // The connectors bound the TCP connect by `timeouts.connect`; this
        // also bounds the TLS handshake.
        let dial = async {
            match &self.connect {
                Connect::Plain(c) => {
                    let io = c
                        .clone()
                        .call(self.target.clone())
                        .await
                        .map_err(|e| connect_error(&e))?;
                    handshake(io).await.map_err(|e| classify(&e))
                }
                Connect::Tls(c) => {
                    let io = c
                        .clone()
                        .call(self.target.clone())
                        .await
                        .map_err(|e| connect_error(&*e))?;
                    handshake(io).await.map_err(|e| classify(&e))
                }
                Connect::Unusable(why) => Err(ProxyError::UpstreamConnect(why.to_string())),
            }
        };
        match tokio::time::timeout(timeouts.connect.0 * 2, dial).await {
            Ok(connected) => connected,
            Err(_) => Err(ProxyError::UpstreamConnectTimeout),
        }
    }

    fn pooled(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<UpstreamBody>,
    ) -> Response<PooledBody> {
        let (parts, inner) = resp.into_parts();
        let mut body = PooledBody {
            inner,
            give_back: Some((self.clone(), sender)),
        };
        if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
            // The connection now carries the tunnel: never back to the pool.
            body.give_back = None;
        } else if body.inner.is_end_stream() {
            body.release();
        }
        Response::from_parts(parts, body)
    }

    fn put(&self, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        // Full: this connection closes.
        let _ = self.idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }
}

/// HTTP/1.1 over `io`, with the connection driven (upgrades included) by
/// its own task.
async fn handshake<I>(io: I) -> Result<SendRequest<UpstreamBody>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new().handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// An upstream response body that gives its connection back to the pool
/// once read to its end. Dropped early, the connection closes instead: what
/// is left of the response would have to be read first.
pub struct PooledBody {
    inner: Incoming,
    give_back: Option<(Arc<Pool>, SendRequest<UpstreamBody>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((pool, sender)) = self.give_back.take() {
            pool.put(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Err(_))) => self.give_back = None,
            _ if self.inner.is_end_stream() => self.release(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
fn origin_form(uri: &Uri) -> Result<Uri, ProxyError> {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if !path.as_str().starts_with('/') {
        // `OPTIONS *` and other non-path targets are not proxied.
        return Err(ProxyError::DownstreamMalformed(
            "request target is not a path",
        ));
    }
    Uri::from_parts({
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(path);
        parts
    })
    .map_err(|_| ProxyError::DownstreamMalformed("bad request target"))
}

/// A failed connect (refused, unreachable, timed out, TLS verification).
fn connect_error(err: &(dyn StdError + 'static)) -> ProxyError {
    if io_kind(err) == Some(io::ErrorKind::TimedOut) {
        ProxyError::UpstreamConnectTimeout
    } else {
        ProxyError::UpstreamConnect(source_text(err))
    }
}

/// A failure after the connection was made.
fn classify(err: &hyper::Error) -> ProxyError {
    if caused_by::<LengthLimitError>(err) {
        // The client's streamed body passed `limits.max_request_body_bytes`.
        return ProxyError::DownstreamBodyTooLarge;
    }
    ProxyError::UpstreamReset(source_text(err))
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
        origin_form(&uri.parse().unwrap()).map(|u| u.to_string())
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
