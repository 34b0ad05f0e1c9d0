//! The admin listener: health probes, Prometheus metrics and the `/v1/`
//! control API (`api.rs`). It runs on its own listener so that the data
//! plane's limits and load never starve a kubelet probe or a scrape.
//!
//! ```text
//! GET /health/live     200 while the process runs               (open)
//! GET /health/ready    200 once listeners are bound; 503 draining (open)
//! GET /metrics         Prometheus text format                   (open)
//! /v1/...              the control API                          (bearer token)
//! /ofrep/v1/...        OpenFeature remote evaluation            (bearer token)
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::Token;
use crate::metrics::Metrics;
use crate::store::Store;

/// The open (unauthenticated) endpoints and their methods; `docs/openapi.yaml`
/// is tested against this and `api::ENDPOINTS`.
pub const OPEN_ENDPOINTS: &[(&str, &str)] = &[
    ("/health/live", "GET"),
    ("/health/ready", "GET"),
    ("/metrics", "GET"),
];

/// The streaming endpoint (behind the `/v1/` rules, served here rather
/// than by `api.rs`, whose answers are whole), documented with the rest.
pub const STREAM_ENDPOINTS: &[(&str, &str)] = &[("/v1/watch", "GET")];

/// What the health probes report.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// Ready: config loaded and every listener bound. Cleared again when the
    /// process starts draining, so the pod leaves the Service endpoints.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// What the admin endpoints read and change.
#[derive(Clone)]
pub struct Admin {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<Store>,
    /// Accepted bearer tokens; empty means an open (loopback-only) admin API.
    pub tokens: Arc<[Token]>,
    /// `admin.max_connections` and `admin.header_timeout`.
    pub max_connections: usize,
    pub header_timeout: std::time::Duration,
}

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Admin clients are operators and scrapers: a short head timeout is plenty.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(admin.header_timeout);
    let builder = Arc::new(builder);
    // Bounded like the data listener, and apart from it: a flood of
    // connections here is closed at its own limit, long before it could
    // take the file descriptors the data plane needs.
    let open = Arc::new(tokio::sync::Semaphore::new(admin.max_connections));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and similar: back off, don't spin.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::debug!("admin connection limit reached: closed");
            drop(stream);
            continue;
        };
        let admin = admin.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // hyper's head timeout starts with the first byte; a connection
            // that never sends one is closed here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(admin.header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// The admin listener's response body: whole, or a stream (`/v1/watch`).
pub type AdminBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn route(admin: &Admin, req: Request<Incoming>) -> Response<AdminBody> {
    use http_body_util::BodyExt;
    let path = req.uri().path();
    if path == STREAM_ENDPOINTS[0].0 {
        return watch(admin, &req);
    }
    if path == "/ui" || path.starts_with("/ui/") {
        return crate::ui::serve(&req).map(BodyExt::boxed);
    }
    whole(admin, req).await.map(BodyExt::boxed)
}

/// `GET /v1/watch` (docs in `watch.rs`), behind the same rules as `/v1/`.
fn watch(admin: &Admin, req: &Request<Incoming>) -> Response<AdminBody> {
    use http_body_util::BodyExt;
    let refused = |resp: Response<Full<Bytes>>| resp.map(BodyExt::boxed);
    if let Some(refusal) = browser_safe(admin, req) {
        return refused(refusal);
    }
    if req.method() != Method::GET {
        return refused(crate::api::ApiError::get_only().into_response());
    }
    if let Err(e) = crate::api::authorize(req.headers(), &admin.tokens) {
        return refused(e.into_response());
    }
    let mut resp = Response::new(crate::watch::stream(admin.clone()));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

async fn whole(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let api = path == "/v1" || path.starts_with("/v1/");
    if api || path.starts_with("/ofrep/") {
        if let Some(refused) = browser_safe(admin, &req) {
            return refused;
        }
    }
    if api {
        return crate::api::serve(admin, req).await;
    }
    if path.starts_with("/ofrep/") {
        return crate::ofrep::serve(admin, req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path {
        "/health/live" => text(StatusCode::OK, "live\n"),
        "/health/ready" if admin.health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/health/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            admin.metrics.render().into(),
        ),
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

/// What keeps a web page from steering traffic through the admin API (a
/// browser on the same machine, DNS rebinding, a request forged by an app
/// to loopback):
/// - without tokens (an open loopback admin), `Host` must name loopback
///   (`localhost`, `127.x.x.x`, `[::1]`): a rebound name is refused;
/// - an `Origin` other than the admin listener's own (`http://` + `Host`)
///   is refused: browsers send it with every cross-origin request;
/// - `POST`, `PUT` and `PATCH` must say `Content-Type: application/json`,
///   which a page can only send after a CORS preflight this API never
///   grants.
///
/// Returns the refusal, if any.
fn browser_safe(admin: &Admin, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let host = header(header::HOST);
    if admin.tokens.is_empty() && host.is_some_and(|h| !loopback_host(h)) {
        return Some(json_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "an admin API without tokens answers only requests to a loopback name or address (Host)",
        ));
    }
    if let Some(origin) = header(header::ORIGIN) {
        let own = host.is_some_and(|h| {
            origin.strip_prefix("http://") == Some(h) || origin.strip_prefix("https://") == Some(h)
        });
        if !own {
            return Some(json_error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "requests from another origin (a web page) are refused",
            ));
        }
    }
    let writes = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    let json = header(header::CONTENT_TYPE).is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    (writes && !json).then(|| {
        json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json",
        )
    })
}

/// `localhost` (or a name under it), `127.0.0.0/8` or `[::1]`, with or
/// without a port.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `GET /v1/routes/{route}/stats`: the rolling window of each backend, as
/// this replica saw it (`scope: local`, the default), or in fleet mode with
/// `?scope=fleet` every live replica's merged (`scope: fleet`: what a
/// rollout's leader judges).
pub(crate) async fn route_stats(
    admin: &Admin,
    route: &str,
    query: &str,
) -> Result<Response<Full<Bytes>>, crate::api::ApiError> {
    use crate::api::ApiError;
    let metrics = &admin.metrics;
    let fleet_scope = match query {
        "" | "scope=local" => false,
        "scope=fleet" => true,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("`{query}` is not a valid query: use scope=local or scope=fleet"),
            ))
        }
    };
    if !metrics.enabled() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "metrics_disabled",
            "metrics.enabled is false in the configuration",
        ));
    }
    let Some(backends) = metrics.route_backends(route) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route named `{route}`"),
        ));
    };
    let names: Vec<&str> = backends.iter().map(|b| &**b).collect();
    // The fleet's windows are published over the analysis window of the
    // route's rollout while one progresses (what its leader judges), else
    // over `metrics.window`.
    let span = match admin.store.view().rollouts.get(route) {
        Some(r) if fleet_scope && r.phase == crate::rollout::Phase::Progressing => {
            r.spec.analysis.window.0
        }
        _ => metrics.window_span(),
    };
    let (windows, replicas) = match (fleet_scope, admin.store.fleet()) {
        (false, _) => (
            names
                .iter()
                .map(|b| metrics.backend_histogram(route, b, span))
                .collect::<Vec<_>>(),
            1,
        ),
        (true, None) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_a_fleet",
                "scope=fleet needs fleet mode (`fleet:` in the configuration)",
            ))
        }
        (true, Some(fleet)) => fleet
            .merged_windows(
                names
                    .iter()
                    .map(|b| metrics.backend_histogram(route, b, span))
                    .collect(),
                |published| {
                    let backends = published.routes.get(route);
                    names
                        .iter()
                        .map(|b| backends.and_then(|w| w.get(*b)))
                        .collect()
                },
                span,
            )
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?,
    };
    let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let body = serde_json::json!({
        "route": route,
        "scope": if fleet_scope { "fleet" } else { "local" },
        "replicas": replicas,
        "window_seconds": span.as_secs(),
        "backends": names.iter().zip(&windows).map(|(name, w)| {
            let s = w.stats();
            let [c1, c2, c3, c4, c5] = w.classes;
            serde_json::json!({
                "backend": name,
                "requests": s.requests,
                "errors": s.errors,
                "error_rate_percent": s.error_rate_percent(),
                "status_classes": { "1xx": c1, "2xx": c2, "3xx": c3, "4xx": c4, "5xx": c5 },
                "p50_ms": ms(s.p50),
                "p95_ms": ms(s.p95),
                "p99_ms": ms(s.p99),
            })
        }).collect::<Vec<_>>(),
    });
    Ok(respond_json(StatusCode::OK, &body))
}

/// The admin API's error shape: `{"error": {"code": ..., "message": ...}}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    respond_json(
        status,
        &serde_json::json!({ "error": { "code": code, "message": message } }),
    )
}

pub(crate) fn respond_json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", body.to_string().into())
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
