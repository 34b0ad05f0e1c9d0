//! Stage: header hygiene, both ways. Hop-by-hop headers (RFC 9110 §7.6.1,
//! plus any named in `Connection`) never cross the proxy; the forwarding
//! headers are the proxy's own, so client copies cannot spoof them.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, FORWARDED, UPGRADE};
use http::{HeaderMap as Map, StatusCode};

use crate::split::{random_id, RandomId};
use switchyard_control::config::HOP_BY_HOP;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A request id from a client is kept only if it is this short and printable.
const MAX_REQUEST_ID: usize = 128;

/// `ip` as a header value (`x-forwarded-for`).
pub fn ip_header(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value")
}

/// What the request rewrite needs to know about the connection.
pub struct Forwarding<'a> {
    /// The client's address as a header value, made once per connection.
    pub peer: &'a HeaderValue,
    /// `http` or `https`.
    pub proto: &'static str,
    pub trust_forwarded_for: bool,
    /// Headers only the proxy may set (e.g. the forced-backend header).
    pub proxy_only: &'a [HeaderName],
    /// The request asks to switch protocols (`is_upgrade`, decided once by
    /// the pipeline, which also prepares the tunnel): `Upgrade` survives.
    pub upgrade: bool,
}

/// Whether this HTTP/1.1 request asks to switch protocols (WebSocket).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_has(headers, "upgrade")
}

/// Fields the proxy adds to a request. They are not inserted into the
/// request's map: the upstream head writer puts them after the client's
/// fields (where an insert would have put them too), which saves a hashed
/// insert per field and per request. The client's own copies of these
/// names are gone from the map by then.
#[derive(Debug, Default)]
pub struct Added {
    forwarded_for: Option<HeaderValue>,
    forwarded_proto: Option<HeaderValue>,
    /// Made here, written as it is: no header value (and no allocation).
    request_id: Option<RandomId>,
    /// The flag header (`flag_header`) and the flags that are on (`a,b`).
    pub flags: Option<(HeaderName, Vec<u8>)>,
}

impl Added {
    /// Each field's name and value.
    pub fn fields(&self) -> impl Iterator<Item = (&HeaderName, &[u8])> {
        [
            (&X_FORWARDED_FOR, value(&self.forwarded_for)),
            (&X_FORWARDED_PROTO, value(&self.forwarded_proto)),
            (
                &X_REQUEST_ID,
                self.request_id.as_ref().map(RandomId::as_bytes),
            ),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .chain(self.flags.as_ref().map(|(name, v)| (name, v.as_slice())))
    }
}

fn value(v: &Option<HeaderValue>) -> Option<&[u8]> {
    v.as_ref().map(HeaderValue::as_bytes)
}

/// Which of the names the request rewrite acts on a request carries, from
/// one pass over its names instead of a hashed lookup per name: most
/// requests carry none of them.
#[derive(Default)]
struct Present {
    /// A bit per entry of `HOP_BY_HOP`.
    hop_by_hop: u16,
    forwarded: bool,
    forwarded_for: bool,
    forwarded_proto: bool,
    request_id: bool,
    proxy_only: bool,
}

impl Present {
    fn of(headers: &HeaderMap, proxy_only: &[HeaderName]) -> Present {
        let mut present = Present::default();
        for name in headers.keys() {
            present.proxy_only |= proxy_only.contains(name);
            if let Some(i) = hop_by_hop_index(name) {
                present.hop_by_hop |= 1 << i;
                continue;
            }
            match name.as_str() {
                "forwarded" => present.forwarded = true,
                "x-forwarded-for" => present.forwarded_for = true,
                "x-forwarded-proto" => present.forwarded_proto = true,
                "x-request-id" => present.request_id = true,
                _ => {}
            }
        }
        present
    }
}

/// Rewrites a request's headers for the upstream hop: the map loses what
/// must not go upstream; what the proxy adds is returned.
pub fn rewrite_request(headers: &mut HeaderMap, fwd: &Forwarding<'_>) -> Added {
    let mut present = Present::of(headers, fwd.proxy_only);
    if strip_hop_by_hop(headers, present.hop_by_hop, fwd.upgrade) {
        // `Connection` named other fields, which are gone now (it may name
        // the forwarding ones).
        present = Present::of(headers, fwd.proxy_only);
    }
    if present.proxy_only {
        for name in fwd.proxy_only {
            headers.remove(name);
        }
    }

    let mut added = Added::default();
    if fwd.trust_forwarded_for {
        added.forwarded_for = Some(if present.forwarded_for {
            let joined = join_values(headers, &X_FORWARDED_FOR, fwd.peer);
            headers.remove(&X_FORWARDED_FOR);
            joined
        } else {
            fwd.peer.clone()
        });
        if !present.forwarded_proto {
            added.forwarded_proto = Some(HeaderValue::from_static(fwd.proto));
        }
    } else {
        for (there, name) in [
            (present.forwarded, &FORWARDED),
            (present.forwarded_for, &X_FORWARDED_FOR),
            (present.forwarded_proto, &X_FORWARDED_PROTO),
        ] {
            if there {
                headers.remove(name);
            }
        }
        added.forwarded_for = Some(fwd.peer.clone());
        added.forwarded_proto = Some(HeaderValue::from_static(fwd.proto));
    }

    let keep_id = present.request_id
        && headers.get(&X_REQUEST_ID).is_some_and(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID
                && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        });
    if !keep_id {
        if present.request_id {
            headers.remove(&X_REQUEST_ID);
        }
        added.request_id = Some(random_id());
    }
    added
}

/// Rewrites a response's headers for the client hop.
pub fn rewrite_response(status: StatusCode, headers: &mut HeaderMap) {
    let present = headers
        .keys()
        .filter_map(hop_by_hop_index)
        .fold(0u16, |present, i| present | 1 << i);
    strip_hop_by_hop(headers, present, status == StatusCode::SWITCHING_PROTOCOLS);
}

/// The first address in `x-forwarded-for`, if it parses.
pub fn first_forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let first = headers
        .get(&X_FORWARDED_FOR)?
        .to_str()
        .ok()?
        .split(',')
        .next()?;
    first.trim().parse().ok()
}

/// Removes hop-by-hop headers, those of `present` (a bit per entry of
/// `HOP_BY_HOP`, found in one pass over the names instead of a hashed
/// lookup per hop-by-hop name: most messages carry none of them, or only
/// `Connection`). With `keep_upgrade` (a WebSocket handshake), `Upgrade`
/// survives and `Connection: upgrade` is all that is left of `Connection`.
/// Says whether fields `Connection` named were removed besides.
fn strip_hop_by_hop(headers: &mut HeaderMap, present: u16, keep_upgrade: bool) -> bool {
    if present == 0 {
        return false;
    }
    let upgrade = keep_upgrade
        .then(|| headers.get(UPGRADE).cloned())
        .flatten();
    // Headers the sender listed in `Connection` are hop-by-hop too. The
    // usual options (`keep-alive`, `close`, `upgrade`) name nothing more to
    // remove, and are skipped without making a header name of them.
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| list_items(v.as_bytes()))
        .filter(|token| !token.eq_ignore_ascii_case(b"close") && !is_hop_by_hop_name(token))
        .filter_map(|token| HeaderName::from_bytes(token).ok())
        .collect();
    for name in &listed {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & 1 << i != 0 {
            headers.remove(*name);
        }
    }
    if let Some(protocol) = upgrade {
        headers.insert(UPGRADE, protocol);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    !listed.is_empty()
}

/// Where `name` is in `HOP_BY_HOP`, if it is hop-by-hop.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    // Header names are lowercase.
    HOP_BY_HOP.iter().position(|h| *h == name.as_str())
}

/// Whether `name`, as a client wrote it (in any case), is in `HOP_BY_HOP`.
fn is_hop_by_hop_name(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_bytes().eq_ignore_ascii_case(name))
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| list_items(v.as_bytes()))
        .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The members of a comma-separated field value (`Connection`,
/// `Transfer-Encoding`, ...), trimmed, empty ones skipped. Bytes, not text:
/// one non-ASCII member does not hide the others.
pub fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// `a, b` from every copy of `name`, then `, last`.
fn join_values(headers: &Map, name: &HeaderName, last: &HeaderValue) -> HeaderValue {
    let mut joined = Vec::new();
    for v in headers.get_all(name) {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(last.as_bytes());
    HeaderValue::from_bytes(&joined).unwrap_or_else(|_| last.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    static PEER: HeaderValue = HeaderValue::from_static("10.0.0.9");

    /// The request rewrite, with what it adds put in the map: the fields as
    /// they go upstream.
    fn rewrite(headers: &mut HeaderMap, fwd: &Forwarding<'_>) {
        let added = rewrite_request(headers, fwd);
        for (name, value) in added.fields() {
            headers.append(name, HeaderValue::from_bytes(value).unwrap());
        }
    }

    fn fwd(trust: bool) -> Forwarding<'static> {
        Forwarding {
            peer: &PEER,
            proto: "http",
            trust_forwarded_for: trust,
            proxy_only: &[],
            upgrade: false,
        }
    }

    #[test]
    fn every_hop_by_hop_header_is_removed_on_its_own_both_ways() {
        // Written out rather than taken from `HOP_BY_HOP`: this is the
        // specification the list is checked against.
        for name in [
            "connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
        ] {
            let pairs = [(name, "a"), (name, "b"), ("x-app", "kept")];
            let mut req = map(&pairs);
            rewrite(&mut req, &fwd(false));
            assert!(!req.contains_key(name), "request: {name} survived");
            assert_eq!(req["x-app"], "kept", "request with {name}");
            let mut resp = map(&pairs);
            rewrite_response(StatusCode::OK, &mut resp);
            assert!(!resp.contains_key(name), "response: {name} survived");
            assert_eq!(resp.len(), 1, "response with {name}: {resp:?}");
        }
        // `Connection` options in any case; only the one naming another
        // header adds to what is removed.
        let mut resp = map(&[
            ("connection", "Close, Keep-Alive, X-Secret, UPGRADE"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "s"),
            ("x-app", "kept"),
        ]);
        rewrite_response(StatusCode::OK, &mut resp);
        assert_eq!(resp.len(), 1, "{resp:?}");
        assert_eq!(resp["x-app"], "kept");
        // With none of them, nothing changes.
        let mut resp = map(&[("x-app", "kept"), ("content-type", "text/plain")]);
        rewrite_response(StatusCode::OK, &mut resp);
        assert_eq!(resp.len(), 2);
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "s"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("x-app", "kept"),
        ]);
        rewrite(&mut h, &fwd(false));
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone} survived");
        }
        assert!(h.contains_key("traceparent"));
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn forwarding_headers_are_the_proxys_own_unless_trusted() {
        let sent = [
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.2.3.4"),
        ];
        let mut h = map(&sent);
        rewrite(&mut h, &fwd(false));
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("forwarded"));

        let mut h = map(&sent);
        h.append("x-forwarded-for", HeaderValue::from_static("5.6.7.8"));
        rewrite(&mut h, &fwd(true));
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(first_forwarded_for(&h), Some(IpAddr::from([1, 2, 3, 4])));
    }

    #[test]
    fn forwarding_headers_named_in_connection_are_the_proxys_own_even_if_trusted() {
        let mut h = map(&[
            ("connection", "x-forwarded-proto, x-forwarded-for"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-for", "1.2.3.4"),
        ]);
        rewrite(&mut h, &fwd(true));
        assert_eq!(h["x-forwarded-proto"], "http", "{h:?}");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9", "{h:?}");
        assert_eq!(h.len(), 3, "one of each, and the request id: {h:?}");
    }

    #[test]
    fn a_proxy_only_name_is_removed_whatever_other_role_it_has() {
        let only = [X_REQUEST_ID.clone()];
        let mut h = map(&[("x-request-id", "from-the-client")]);
        rewrite(
            &mut h,
            &Forwarding {
                proxy_only: &only,
                ..fwd(false)
            },
        );
        let id = h.get_all("x-request-id").iter().collect::<Vec<_>>();
        assert_eq!(id.len(), 1, "{h:?}");
        assert_ne!(id[0], "from-the-client");
    }

    #[test]
    fn request_id_is_kept_or_generated() {
        let mut h = map(&[("x-request-id", "abc-123")]);
        rewrite(&mut h, &fwd(false));
        assert_eq!(h["x-request-id"], "abc-123");

        for bad in ["", "has space", &"x".repeat(200)] {
            let mut h = map(&[("x-request-id", bad)]);
            rewrite(&mut h, &fwd(false));
            let id = h["x-request-id"].to_str().unwrap();
            assert_eq!(id.len(), 32, "replaced {bad:?}");
        }
        let mut h = HeaderMap::new();
        rewrite(&mut h, &fwd(false));
        assert_eq!(h["x-request-id"].len(), 32);
    }

    #[test]
    fn proxy_only_headers_are_removed() {
        let forced = HeaderName::from_static("x-switchyard-backend");
        let only = [forced];
        let mut h = map(&[("x-switchyard-backend", "canary")]);
        rewrite_request(
            &mut h,
            &Forwarding {
                proxy_only: &only,
                ..fwd(false)
            },
        );
        assert!(!h.contains_key("x-switchyard-backend"));
    }

    #[test]
    fn a_non_ascii_token_does_not_hide_the_fields_connection_names() {
        let mut resp = HeaderMap::new();
        resp.append(
            CONNECTION,
            HeaderValue::from_bytes(b"x-secret, caf\xc3\xa9").unwrap(),
        );
        resp.append("x-secret", HeaderValue::from_static("s"));
        resp.append("x-kept", HeaderValue::from_static("k"));
        rewrite_response(StatusCode::OK, &mut resp);
        assert!(!resp.contains_key("x-secret"), "{resp:?}");
        assert_eq!(resp["x-kept"], "k");
    }

    #[test]
    fn upgrade_survives_as_the_only_connection_option() {
        let mut h = map(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
        ]);
        let upgrade = is_upgrade(&h);
        assert!(upgrade);
        rewrite(
            &mut h,
            &Forwarding {
                upgrade,
                ..fwd(false)
            },
        );
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");

        let mut resp = map(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "x"),
        ]);
        rewrite_response(StatusCode::SWITCHING_PROTOCOLS, &mut resp);
        assert_eq!(resp["upgrade"], "websocket");
        assert!(!resp.contains_key("keep-alive"));

        let mut resp = map(&[
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("upgrade", "h2c"),
        ]);
        rewrite_response(StatusCode::OK, &mut resp);
        assert!(resp.is_empty(), "{resp:?}");
    }
}
