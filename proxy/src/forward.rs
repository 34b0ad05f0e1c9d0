//! Stage: send the request to one endpoint of the chosen backend over a pooled
//! keep-alive HTTP/1.1 connection (TLS for `https://` endpoints), and classify
//! what went wrong if it did.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_rustls::HttpsConnector;
use rustls::pki_types::ServerName;
use switchyard_control::config::UpstreamTlsConfig;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use switchyard_control::config::Timeouts;

use crate::respond::ProxyError;

/// A request body on its way upstream, bounded by `limits.max_request_body_bytes`.
pub type UpstreamBody = Limited<Incoming>;
type TlsClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// One upstream instance and how to reach it.
#[derive(Clone)]
pub struct Endpoint {
    pub authority: Authority,
    pub transport: Transport,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.transport {
            Transport::Plain => "http",
            Transport::Tls(_) => "https",
            Transport::Unusable(_) => "https (unusable)",
        };
        write!(f, "{kind}://{}", self.authority)
    }
}

#[derive(Clone)]
pub enum Transport {
    Plain,
    /// The pooled TLS client of the backend's verification settings.
    Tls(Arc<TlsClient>),
    /// TLS that could not be set up (the CA file became unreadable after
    /// the configuration was checked): every request fails with the reason.
    Unusable(Arc<str>),
}

/// The upstream connection pools, shared by every route and backend: one for
/// plain HTTP, one per distinct TLS verification setting.
pub struct Upstreams {
    client: Client<HttpConnector, UpstreamBody>,
    tls: ArcSwap<HashMap<Option<UpstreamTlsConfig>, Arc<TlsClient>>>,
    timeouts: Timeouts,
}

impl Upstreams {
    pub fn new(timeouts: &Timeouts) -> Self {
        Self {
            client: pool(timeouts).build(connector(timeouts)),
            tls: ArcSwap::from_pointee(HashMap::new()),
            timeouts: timeouts.clone(),
        }
    }

    /// The endpoint `spec` (`host:port` or `https://host:port`) of a backend
    /// with TLS settings `tls`. TLS clients are kept across snapshots, so a
    /// weight change does not drop pooled connections.
    pub fn endpoint(&self, spec: &str, tls: Option<&UpstreamTlsConfig>) -> Endpoint {
        let (secure, authority) = switchyard_control::config::split_endpoint(spec);
        let authority = Authority::try_from(authority).expect("endpoint validated as host:port");
        let transport = if secure {
            self.tls_client(tls)
        } else {
            Transport::Plain
        };
        Endpoint {
            authority,
            transport,
        }
    }

    fn tls_client(&self, tls: Option<&UpstreamTlsConfig>) -> Transport {
        let key = tls.cloned();
        if let Some(client) = self.tls.load().get(&key) {
            return Transport::Tls(client.clone());
        }
        let config = match crate::tls::client_config(tls) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "upstream TLS unusable");
                return Transport::Unusable(e.into());
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
        let connector = builder
            .enable_http1()
            .wrap_connector(connector(&self.timeouts));
        let client = Arc::new(pool(&self.timeouts).build(connector));
        self.tls.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.entry(key.clone()).or_insert_with(|| client.clone());
            map
        });
        Transport::Tls(client)
    }

    /// Sends `req` (whose URI is origin-form) to `endpoint` and waits for the
    /// response headers, at most `timeouts.request`.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let timeout = self.timeouts.request.0;
        *req.version_mut() = Version::HTTP_11;
        let sent = match &endpoint.transport {
            Transport::Plain => {
                *req.uri_mut() = upstream_uri(Scheme::HTTP, &endpoint.authority, req.uri())?;
                tokio::time::timeout(timeout, self.client.request(req)).await
            }
            Transport::Tls(client) => {
                *req.uri_mut() = upstream_uri(Scheme::HTTPS, &endpoint.authority, req.uri())?;
                tokio::time::timeout(timeout, client.request(req)).await
            }
            Transport::Unusable(why) => return Err(ProxyError::UpstreamConnect(why.to_string())),
        };
        match sent {
            Err(_elapsed) => Err(ProxyError::UpstreamTimeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e)),
        }
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

fn pool(timeouts: &Timeouts) -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.idle.0)
        // The Host header is the client's; the URI only picks the connection.
        .set_host(false);
    builder
}

fn upstream_uri(scheme: Scheme, endpoint: &Authority, uri: &Uri) -> Result<Uri, ProxyError> {
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
    parts.scheme = Some(scheme);
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
