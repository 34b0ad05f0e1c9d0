//! Stage: match the request to a route (host, path prefix, header rules);
//! the first route that fits wins.

use http::header::HOST;
use http::request::Parts;

use crate::snapshot::{HostMatch, Route, Snapshot};

/// The request's host without port: the URI authority (HTTP/2 `:authority`,
/// or an absolute-form HTTP/1.1 target, which RFC 9112 says wins), else the
/// `Host` header.
pub fn request_host(parts: &Parts) -> Option<&str> {
    if let Some(host) = parts.uri.host() {
        return Some(host);
    }
    let value = parts.headers.get(HOST)?.to_str().ok()?;
    Some(strip_port(value))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port → v6
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// The first route whose match fits the request.
pub fn find<'s>(snapshot: &'s Snapshot, parts: &Parts) -> Option<&'s Route> {
    find_index(snapshot, parts).map(|i| &snapshot.routes[i])
}

/// As `find`, the route's index.
pub fn find_index(snapshot: &Snapshot, parts: &Parts) -> Option<usize> {
    let host = request_host(parts);
    let path = parts.uri.path();
    snapshot.routes.iter().position(|route| {
        host_matches(&route.host, host)
            && path_matches(&route.path_prefix, path)
            && route
                .headers
                .iter()
                .all(|(name, value)| parts.headers.get_all(name).iter().any(|v| v == value))
    })
}

fn host_matches(rule: &HostMatch, host: Option<&str>) -> bool {
    match (rule, host) {
        (HostMatch::Any, _) => true,
        (HostMatch::Exact(want), Some(host)) => host.eq_ignore_ascii_case(want),
        (HostMatch::Suffix(suffix), Some(host)) => {
            host.len() > suffix.len()
                && host.is_char_boundary(host.len() - suffix.len())
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        (_, None) => false,
    }
}

/// Whether `path` has a `.` or `..` segment (also percent-encoded). Such a
/// path could match one route's prefix here and resolve to another path at
/// the upstream (`/api/../admin`), so it is refused rather than forwarded.
/// Clients normalize paths before sending; browsers always do.
/// A path a proxy and its upstream could read differently, refused (400)
/// like dot segments rather than guessed at: an empty segment (`//echo`,
/// which nginx merges and an upstream may not) or a percent-encoded
/// unreserved character (`/%65cho` is `/echo` to many upstreams, not to the
/// route match).
pub fn is_ambiguous(path: &str) -> bool {
    // One pass over the bytes, no searcher to set up: most paths are short
    // and have neither.
    let bytes = path.as_bytes();
    let mut previous = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'/' && previous == b'/' {
            return true;
        }
        if b == b'%' && encoded_unreserved(bytes.get(i + 1..i + 3)) {
            return true;
        }
        previous = b;
    }
    false
}

/// Two hex digits naming an unreserved character (RFC 3986 §2.3).
fn encoded_unreserved(hex: Option<&[u8]>) -> bool {
    let digit = |h: u8| (h as char).to_digit(16);
    let Some(&[a, b]) = hex else {
        return false;
    };
    let (Some(a), Some(b)) = (digit(a), digit(b)) else {
        return false;
    };
    let c = (a * 16 + b) as u8;
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

pub fn has_dot_segment(path: &str) -> bool {
    if !path.contains('.') && !path.contains('%') {
        return false;
    }
    path.split('/').any(|segment| {
        let mut dots = 0;
        let mut rest = segment.as_bytes();
        while !rest.is_empty() {
            if rest[0] == b'.' {
                rest = &rest[1..];
            } else if rest.len() >= 3
                && rest[0] == b'%'
                && rest[1] == b'2'
                && rest[2].eq_ignore_ascii_case(&b'e')
            {
                rest = &rest[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    })
}

/// Segment-wise prefix match (as Gateway API's `PathPrefix`): `/api` takes
/// `/api` and `/api/x` but not `/apix`.
fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_paths_are_found() {
        for bad in [
            "//echo/x",
            "/echo//x",
            "/%65cho/x",
            "/a%2Db",
            "/%7e",
            "/a/%2E",
        ] {
            assert!(is_ambiguous(bad), "{bad}");
        }
        for good in ["/echo/x", "/", "/a%20b", "/a%2Fb", "/%e2%82%ac", "/a?x=//y"] {
            assert!(!is_ambiguous(good.split('?').next().unwrap()), "{good}");
        }
    }
    use http::Request;
    use switchyard_control::config::Config;
    use switchyard_control::metrics::Metrics;

    fn test_metrics() -> Metrics {
        Metrics::new(false, std::time::Duration::from_secs(60))
    }

    fn snapshot() -> Snapshot {
        let yaml = r#"
routes:
  - name: admin-host
    match: { host: admin.example.com }
    backends: [{ name: a, endpoints: ["127.0.0.1:1"], weight: 100 }]
  - name: wild
    match: { host: "*.example.com", path_prefix: /api/ }
    backends: [{ name: a, endpoints: ["127.0.0.1:1"], weight: 100 }]
  - name: staging
    match: { path_prefix: /api, headers: [{ name: x-env, value: staging }] }
    backends: [{ name: a, endpoints: ["127.0.0.1:1"], weight: 100 }]
  - name: api
    match: { path_prefix: /api }
    backends: [{ name: a, endpoints: ["127.0.0.1:1"], weight: 100 }]
"#;
        Snapshot::build(
            &Config::from_yaml(yaml).unwrap(),
            &test_metrics(),
            &crate::forward::Upstreams::new(&Default::default()),
        )
    }

    fn route_of(s: &Snapshot, req: Request<()>) -> Option<String> {
        let (parts, _) = req.into_parts();
        find(s, &parts).map(|r| r.name.to_string())
    }

    fn get(host: &str, path: &str) -> Request<()> {
        Request::get(path).header(HOST, host).body(()).unwrap()
    }

    #[test]
    fn first_matching_route_wins() {
        let s = snapshot();
        assert_eq!(
            route_of(&s, get("ADMIN.example.com:8080", "/x")).as_deref(),
            Some("admin-host")
        );
        assert_eq!(
            route_of(&s, get("app.example.com", "/api/v1")).as_deref(),
            Some("wild")
        );
        assert_eq!(
            route_of(&s, get("app.example.com", "/api")).as_deref(),
            Some("wild")
        );
        // `*.example.com` does not take the bare domain.
        assert_eq!(
            route_of(&s, get("example.com", "/api")).as_deref(),
            Some("api")
        );
        let staged = Request::get("/api/x")
            .header(HOST, "other")
            .header("x-env", "staging");
        assert_eq!(
            route_of(&s, staged.body(()).unwrap()).as_deref(),
            Some("staging")
        );
        assert_eq!(route_of(&s, get("other", "/api/x")).as_deref(), Some("api"));
    }

    #[test]
    fn prefix_matches_whole_segments() {
        let s = snapshot();
        assert_eq!(route_of(&s, get("other", "/apix")), None);
        assert_eq!(route_of(&s, get("other", "/")), None);
        assert!(path_matches("/", "/anything"));
    }

    #[test]
    fn absolute_form_authority_wins_over_host_header() {
        let s = snapshot();
        let req = Request::get("http://admin.example.com/x")
            .header(HOST, "other")
            .body(())
            .unwrap();
        assert_eq!(route_of(&s, req).as_deref(), Some("admin-host"));
    }

    #[test]
    fn dot_segments_are_found() {
        for bad in [
            "/api/../admin",
            "/./x",
            "/a/..",
            "/a/%2e%2E/b",
            "/a/.%2e",
            "/..",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for ok in [
            "/",
            "/a.b/c",
            "/...",
            "/a/.well-known/x",
            "/v1.2/%20",
            "/file.tar.gz",
        ] {
            assert!(!has_dot_segment(ok), "{ok}");
        }
    }

    #[test]
    fn strips_ports_from_hosts() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
