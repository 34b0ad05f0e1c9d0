//! Stage: send the request to one endpoint of the chosen backend over a pooled
//! keep-alive HTTP/1.1 connection, and classify what went wrong if it did.

use std::error::Error as StdError;
use std::io;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use switchyard_control::config::Timeouts;

use crate::respond::ProxyError;

/// The upstream connection pool, shared by every route and backend.
#[derive(Clone)]
pub struct Upstreams {
    client: Client<HttpConnector, Limited<Incoming>>,
    request_timeout: Duration,
}

impl Upstreams {
    pub fn new(timeouts: &Timeouts) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeouts.connect.0));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(timeouts.idle.0)
            // The Host header is the client's; the URI only picks the connection.
            .set_host(false)
            .build(connector);
        Self {
            client,
            request_timeout: timeouts.request.0,
        }
    }

    /// Sends `req` (whose URI is origin-form) to `endpoint` and waits for the
    /// response headers, at most `timeouts.request`.
    pub async fn send(
        &self,
        endpoint: &Authority,
        mut req: Request<Limited<Incoming>>,
    ) -> Result<Response<Incoming>, ProxyError> {
        *req.uri_mut() = upstream_uri(endpoint, req.uri())?;
        *req.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(self.request_timeout, self.client.request(req)).await {
            Err(_elapsed) => Err(ProxyError::UpstreamTimeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e)),
        }
    }
}

fn upstream_uri(endpoint: &Authority, uri: &Uri) -> Result<Uri, ProxyError> {
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
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(endpoint.clone());
    parts.path_and_query = Some(path);
    Uri::from_parts(parts).map_err(|_| ProxyError::DownstreamMalformed("bad request target"))
}

fn classify(err: &hyper_util::client::legacy::Error) -> ProxyError {
    if caused_by::<LengthLimitError>(err) {
        // The client's streamed body passed `limits.max_request_body_bytes`.
        return ProxyError::DownstreamBodyTooLarge;
    }
    let timed_out = io_kind(err) == Some(io::ErrorKind::TimedOut);
    if err.is_connect() {
        return if timed_out {
            ProxyError::UpstreamConnectTimeout
        } else {
            ProxyError::UpstreamConnect(source_text(err))
        };
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
