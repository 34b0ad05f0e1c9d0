//! The request path, composed in one readable place. Each stage lives in its
//! own module; this file only says in which order they run and why.
//!
//! ```text
//! admit      bounded in-flight requests: past the limit, 503 + Retry-After
//! route      host, path prefix, header rules; first match wins      (route.rs)
//! flags      every flag for the user's key and groups               (flags.rs)
//! split      forced header, else flag rules, else key → bucket      (split.rs)
//! rewrite    hop-by-hop out, forwarding headers in                  (headers.rs)
//! forward    pooled HTTP/1.1 upstream, request timeout              (forward.rs)
//! respond    response hygiene, anonymous cookie; errors → status    (respond.rs)
//! ```
//!
//! All routing decisions are made under one `load()` of the snapshot, in a
//! synchronous block; the guard is dropped before the first `.await`.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{HeaderValue, HOST, SET_COOKIE};
use http::request::Parts;

use http::{Method, Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::forward::{Tunnel, Upstreams};
use crate::headers::{self, Added, Forwarding};
use crate::record::Recording;
use crate::respond::{ProxyBody, ProxyError};
use crate::retry::{self, Target};
use crate::snapshot::Snapshot;
use crate::{flags, route, split};
use switchyard_control::metrics::Metrics;

/// State every request shares.
pub struct Shared {
    /// The routing snapshot (see `snapshot.rs`).
    pub snapshot: ArcSwap<Snapshot>,
    pub upstreams: Upstreams,
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    /// `limits.max_request_body_bytes`.
    pub max_body: u64,
}

/// What the connection tells about a request.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: IpAddr,
    /// `peer` as a header value, formatted once per connection.
    pub peer_header: HeaderValue,
    /// `http` or `https`, for `x-forwarded-proto`.
    pub proto: &'static str,
}

/// Proxies one request; every failure becomes the response for its kind.
/// `open` (the connection's count of open requests) is held until the
/// response head is ready.
///
/// One `async fn` from admission to the response head, boxed as it is by
/// the connection: a nested future would be moved whole (its largest state,
/// about a kilobyte) into its caller's at every call.
pub async fn handle<G: Send>(
    shared: Arc<Shared>,
    conn: ConnInfo,
    mut req: Request<Incoming>,
    open: G,
) -> Result<Response<ProxyBody>, Infallible> {
    let _open = open;
    let shared = &*shared;
    let Some(_admitted) = shared.admission.enter() else {
        return Ok(unrouted(shared, ProxyError::Overloaded));
    };
    if req.method() == Method::CONNECT {
        return Ok(unrouted(
            shared,
            ProxyError::DownstreamMalformed("CONNECT is not proxied"),
        ));
    }
    if req.method() == Method::TRACE {
        return Ok(unrouted(shared, ProxyError::DownstreamMethodNotAllowed));
    }
    // Origin-form targets start with `/` (absolute-form has a scheme; `*`
    // is only for OPTIONS).
    let target_ok = req.uri().scheme().is_some()
        || req.uri().path().starts_with('/')
        || (req.uri().path() == "*" && req.method() == Method::OPTIONS);
    if !target_ok {
        return Ok(unrouted(
            shared,
            ProxyError::DownstreamMalformed("request target without a leading /"),
        ));
    }
    let client_upgrade = headers::is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let declared = hyper::body::Body::size_hint(req.body()).lower();
    if declared > shared.max_body {
        // Read what the client still sends (bounded), as nginx's lingering
        // close does: closing with its bytes unread would reset the
        // connection before it reads the 413.
        tokio::spawn(linger(req.into_body()));
        return Ok(unrouted(shared, ProxyError::DownstreamBodyTooLarge));
    }
    let (mut parts, body) = req.into_parts();
    let body =
        http_body_util::Limited::new(body, usize::try_from(shared.max_body).unwrap_or(usize::MAX));

    let upgrade = client_upgrade.is_some();
    let decided = {
        let snapshot = shared.snapshot.load();
        decide(&snapshot, &mut parts, conn, upgrade)
    };
    let (target, added, set_cookie, recording) = match decided {
        Ok(d) => d,
        Err(e) => return Ok(unrouted(shared, e)),
    };
    let (sent, recording) = match keep_host(&mut parts) {
        Ok(()) => retry::send(shared, &mut parts, &added, body, upgrade, target, recording).await,
        Err(e) => (Err(e), recording),
    };
    let mut resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            recording.finish(e.status(), e.failure_reason());
            tracing::debug!(error = %e, "request failed");
            return Ok(e.into_response());
        }
    };
    recording.finish(resp.status(), None);

    if let Some(upstream) = resp.body_mut().take_tunnel() {
        if let Some(client) = client_upgrade {
            tunnel(client, upstream);
        }
    }
    headers::rewrite_response(resp.status(), resp.headers_mut());
    if let Some(cookie) = set_cookie {
        resp.headers_mut().append(SET_COOKIE, cookie);
    }
    Ok(resp.map(Either::Left))
}

/// Reads and drops a refused request's body, for at most 30 s and while
/// bytes keep coming (5 s without any ends it).
async fn linger(mut body: Incoming) {
    use http_body_util::BodyExt;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let idle = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        match tokio::time::timeout_at(idle.min(deadline), body.frame()).await {
            Ok(Some(Ok(_))) => {}
            _ => return,
        }
    }
}

/// Answers a request that never reached a backend, counting why.
fn unrouted(shared: &Shared, e: ProxyError) -> Response<ProxyBody> {
    if let Some(reason) = e.unrouted() {
        shared.metrics.unrouted(reason);
    }
    e.into_response()
}

/// Route, split and rewrite under one snapshot: synchronous, so the snapshot
/// guard never lives across an `.await`.
fn decide(
    snapshot: &Snapshot,
    parts: &mut Parts,
    conn: ConnInfo,
    upgrade: bool,
) -> Result<(Target, Added, Option<HeaderValue>, Recording), ProxyError> {
    check_head_size(snapshot, parts)?;
    check_host(parts)?;
    if route::has_dot_segment(parts.uri.path()) {
        return Err(ProxyError::DownstreamMalformed("dot segment in path"));
    }
    if route::is_ambiguous(parts.uri.path()) {
        return Err(ProxyError::DownstreamMalformed(
            "empty segment or encoded unreserved character in path",
        ));
    }
    let route_index = route::find_index(snapshot, parts).ok_or(ProxyError::NoRoute)?;
    let route = &snapshot.routes[route_index];
    let user = split::user_key(snapshot, parts, conn.peer);
    let flags = flags::evaluate(snapshot, parts, &user.key);
    let chosen = split::choose(snapshot, route, parts, &user.key, &flags.on)?;
    let (set_cookie, flag_header) = (user.set_cookie, flags.header);
    let forced = snapshot
        .forced_backend_header
        .as_ref()
        .is_some_and(|h| parts.headers.contains_key(h));
    let (target, mut recording) = retry::first(snapshot, route_index, chosen, forced)?;
    if let Some(watched) = &snapshot.watched {
        recording.in_cohorts(watched, &flags.on);
    }
    let mut added = headers::rewrite_request(
        &mut parts.headers,
        &Forwarding {
            peer: &conn.peer_header,
            proto: conn.proto,
            trust_forwarded_for: snapshot.trust_forwarded_for,
            // Client copies of the flag header are among these.
            proxy_only: &snapshot.proxy_only_headers,
            upgrade,
        },
    );
    added.flags = flag_header.map(|value| (snapshot.flag_header.clone(), value));
    Ok((target, added, set_cookie, recording))
}

/// HTTP/2 requests carry the host in `:authority`; the HTTP/1.1 upstream
/// needs it as `Host`.
/// The URI authority, when there is one (HTTP/2 `:authority`, an
/// absolute-form HTTP/1.1 target), is the host the request was routed by, so
/// it replaces any `Host` header (RFC 9112 §3.2.2, RFC 9113 §8.3.1).
fn keep_host(parts: &mut Parts) -> Result<(), ProxyError> {
    if let Some(authority) = parts.uri.authority() {
        if authority.as_str().contains('@') {
            return Err(ProxyError::DownstreamMalformed(
                "user info in request target",
            ));
        }
        let value = HeaderValue::from_str(authority.as_str())
            .map_err(|_| ProxyError::DownstreamMalformed("bad authority"))?;
        parts.headers.insert(HOST, value);
    }
    Ok(())
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host` (and no authority in
/// its target), with more than one, or with one that is not a valid
/// `host[:port]` (userinfo, spaces, a bad port, nothing at all) is refused
/// with 400, never routed or forwarded.
fn check_host(parts: &Parts) -> Result<(), ProxyError> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::DownstreamMalformed("more than one Host header"));
    }
    match first {
        None if parts.version == http::Version::HTTP_11 && parts.uri.authority().is_none() => {
            Err(ProxyError::DownstreamMalformed("no Host header"))
        }
        Some(host) if !valid_host(host.as_bytes()) => {
            Err(ProxyError::DownstreamMalformed("invalid Host header"))
        }
        _ => Ok(()),
    }
}

/// `host[:port]`: a name of letters, digits, `-`, `.`, `_` (or an IPv6
/// literal in brackets) and at most a 1–65535 port.
fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value.first() {
        None => return false,
        Some(b'[') => match value.iter().position(|&b| b == b']') {
            Some(end) => (&value[..=end], &value[end + 1..]),
            None => return false,
        },
        Some(_) => match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &value[value.len()..]),
        },
    };
    let host_ok = if host[0] == b'[' {
        host.len() > 2
            && host[1..host.len() - 1]
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
    } else {
        !host.is_empty()
            && host
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    // `:` and 1 to 5 digits, 1 to 65535.
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) if (1..=5).contains(&digits.len()) => {
            let mut n = 0u32;
            for d in digits {
                if !d.is_ascii_digit() {
                    return false;
                }
                n = n * 10 + u32::from(d - b'0');
            }
            (1..=65535).contains(&n)
        }
        Some(_) => false,
    };
    host_ok && port_ok
}

/// hyper refuses heads over its 8 KiB minimum parse buffer by itself (431);
/// smaller configured limits are enforced here.
fn check_head_size(snapshot: &Snapshot, parts: &Parts) -> Result<(), ProxyError> {
    if snapshot.max_header_bytes >= crate::listen::HYPER_MIN_BUF {
        return Ok(());
    }
    let mut size = parts.method.as_str().len() + parts.uri.to_string().len() + 12;
    for (name, value) in &parts.headers {
        size += name.as_str().len() + value.len() + 4;
        if size > snapshot.max_header_bytes {
            return Err(ProxyError::DownstreamHeadersTooLarge);
        }
    }
    if size > snapshot.max_header_bytes {
        return Err(ProxyError::DownstreamHeadersTooLarge);
    }
    Ok(())
}

/// After a 101, bytes flow both ways until either side closes.
fn tunnel(client: OnUpgrade, upstream: Tunnel) {
    tokio::spawn(async move {
        let client = match client.await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        if let Err(e) = upstream.join(&mut TokioIo::new(client)).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}

// === impl Admission ===

/// Bounds the requests being proxied at once (`limits.max_requests_in_flight`).
/// A counter, not a semaphore: over the limit is refused at once, never queued.
pub struct Admission {
    in_flight: AtomicUsize,
    max: usize,
}

pub struct Admitted<'a>(&'a AtomicUsize);

impl Admission {
    pub fn new(max: usize) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            max,
        }
    }

    pub fn enter(&self) -> Option<Admitted<'_>> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Admitted(&self.in_flight))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_checked_as_rfc_9112_asks() {
        for good in [
            "a.example",
            "a.example:8080",
            "127.0.0.1:1",
            "[::1]:443",
            "[::1]",
            "x_y-z.io",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "a.example:80@evil.example",
            "a b",
            "a.example:",
            "a.example:99999",
            "a.example:0",
            "a.example:8o",
            "[::1",
            "[]",
            "a:1:2",
            "user@a",
            "a/b",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn admission_refuses_past_the_limit_and_frees_on_drop() {
        let a = Admission::new(2);
        let one = a.enter().unwrap();
        let _two = a.enter().unwrap();
        assert!(a.enter().is_none());
        assert_eq!(a.in_flight(), 2);
        drop(one);
        assert!(a.enter().is_some());
    }
}
