//! Stage: find the user key, then pick the backend — the forced-backend header
//! if allowed, else the sticky weighted split by the user's bucket.

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{HeaderValue, COOKIE};
use http::request::Parts;
use switchyard_control::config::Fallback;

use crate::headers::first_forwarded_for;
use crate::respond::ProxyError;
use crate::snapshot::{Route, Snapshot};

/// Whom a request belongs to: the key that picks its bucket and its flags.
#[derive(Debug)]
pub struct UserKey<'r> {
    pub key: Cow<'r, [u8]>,
    /// `Set-Cookie` for a newly made anonymous id (the `cookie` fallback).
    pub set_cookie: Option<HeaderValue>,
}

/// The request's user key: configured headers, then cookies, then the
/// fallback (an anonymous id set as a cookie, the client address, or a
/// random id for this request alone).
pub fn user_key<'r>(snapshot: &Snapshot, parts: &'r Parts, peer: IpAddr) -> UserKey<'r> {
    if let Some(key) = find_key(snapshot, parts) {
        return UserKey {
            key: Cow::Borrowed(key),
            set_cookie: None,
        };
    }
    match snapshot.user_key.fallback {
        Fallback::Cookie => {
            let id = random_id();
            let cookie = format!(
                "{}={}{}",
                snapshot.user_key.anon_cookie_name,
                id.as_str(),
                snapshot.user_key.anon_cookie_attrs
            );
            UserKey {
                key: Cow::Owned(id.as_bytes().to_vec()),
                set_cookie: HeaderValue::try_from(cookie).ok(),
            }
        }
        Fallback::ClientIp => {
            let ip = match snapshot.trust_forwarded_for {
                true => first_forwarded_for(&parts.headers).unwrap_or(peer),
                false => peer,
            };
            UserKey {
                key: Cow::Owned(ip.to_string().into_bytes()),
                set_cookie: None,
            }
        }
        Fallback::Random => UserKey {
            key: Cow::Owned(random_id().as_bytes().to_vec()),
            set_cookie: None,
        },
    }
}

/// Picks the backend (an index into `route.backends`): the forced-backend
/// header if configured and sent; else the first rule whose flag is on
/// (`flag_on` is indexed like `snapshot.flags`); else the user's bucket.
pub fn choose(
    snapshot: &Snapshot,
    route: &Route,
    parts: &Parts,
    key: &[u8],
    flag_on: &[bool],
) -> Result<usize, ProxyError> {
    if let Some(name) = &snapshot.forced_backend_header {
        if let Some(forced) = parts.headers.get(name) {
            return route
                .backend_named(forced.as_bytes())
                .ok_or(ProxyError::DownstreamUnknownBackend);
        }
    }
    if let Some(rule) = route
        .rules
        .iter()
        .find(|r| flag_on.get(r.flag).copied().unwrap_or(false))
    {
        return Ok(rule.backend);
    }
    Ok(route.backend_for_bucket(route.salt.bucket(key)))
}

/// The user key from the configured headers, then cookies (the anonymous
/// cookie last). Empty values do not count.
pub fn find_key<'r>(snapshot: &Snapshot, parts: &'r Parts) -> Option<&'r [u8]> {
    let sources = &snapshot.user_key;
    for name in sources.headers.iter() {
        if let Some(v) = parts.headers.get(name) {
            let v = trim(v.as_bytes());
            if !v.is_empty() {
                return Some(v);
            }
        }
    }
    if sources.cookies.is_empty() {
        return None;
    }
    sources
        .cookies
        .iter()
        .find_map(|name| cookie(parts, name.as_bytes()))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'r>(parts: &'r Parts, name: &[u8]) -> Option<&'r [u8]> {
    parts.headers.get_all(COOKIE).iter().find_map(|header| {
        header.as_bytes().split(|b| *b == b';').find_map(|pair| {
            let pair = trim(pair);
            let eq = pair.iter().position(|b| *b == b'=')?;
            let value = trim(&pair[eq + 1..]);
            let value = value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value);
            (trim(&pair[..eq]) == name && !value.is_empty()).then_some(value)
        })
    })
}

fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// 128 random bits as 32 lower-case hex digits (an anonymous id or a request id).
#[derive(Debug)]
pub struct RandomId([u8; 32]);

impl RandomId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

pub fn random_id() -> RandomId {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut out = [0u8; 32];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = HEX[((bits >> (4 * i)) & 0xf) as usize];
    }
    RandomId(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;
    use http::Request;
    use switchyard_control::bucket::{bucket, BUCKETS};
    use switchyard_control::config::Config;
    use switchyard_control::metrics::Metrics;

    fn test_metrics() -> Metrics {
        Metrics::new(false, std::time::Duration::from_secs(60))
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn snapshot(extra: &str, weights: &[f64]) -> Snapshot {
        let backends: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{{ name: b{i}, endpoints: [\"127.0.0.1:1\"], weight: {w} }}"))
            .collect();
        let yaml = format!(
            "{extra}\nroutes:\n  - name: api\n    backends: [{}]\n",
            backends.join(", ")
        );
        Snapshot::build(
            &Config::from_yaml(&yaml).unwrap(),
            &test_metrics(),
            &crate::forward::Upstreams::new(&Default::default()),
        )
    }

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut req = Request::get("/");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    struct Picked {
        backend: usize,
        set_cookie: Option<HeaderValue>,
    }

    fn pick(s: &Snapshot, headers: &[(&str, &str)]) -> Picked {
        pick_from(s, headers, PEER).unwrap()
    }

    fn pick_from(
        s: &Snapshot,
        headers: &[(&str, &str)],
        peer: IpAddr,
    ) -> Result<Picked, ProxyError> {
        let p = parts(headers);
        let user = user_key(s, &p, peer);
        let backend = choose(s, &s.routes[0], &p, &user.key, &[])?;
        Ok(Picked {
            backend,
            set_cookie: user.set_cookie,
        })
    }

    #[test]
    fn key_sources_in_order() {
        let s = snapshot(
            "user_key: { headers: [x-user-id, x-account], cookies: [uid, sid] }",
            &[100.0],
        );
        let key = |h: &[(&str, &str)]| {
            find_key(&s, &parts(h)).map(|k| String::from_utf8(k.to_vec()).unwrap())
        };
        assert_eq!(
            key(&[("x-account", "acc"), ("x-user-id", "u1")]).as_deref(),
            Some("u1")
        );
        assert_eq!(
            key(&[("x-user-id", "  "), ("x-account", "acc")]).as_deref(),
            Some("acc")
        );
        assert_eq!(
            key(&[("cookie", "a=1; sid=s9; uid=\"u7\""), ("x-user-id", "")]).as_deref(),
            Some("u7")
        );
        assert_eq!(
            key(&[("cookie", "a=1"), ("cookie", "sid=s9")]).as_deref(),
            Some("s9")
        );
        assert_eq!(
            key(&[("cookie", "switchyard-uid=anon1")]).as_deref(),
            Some("anon1")
        );
        assert_eq!(key(&[("cookie", "xuid=nope; uid=")]), None);
    }

    #[test]
    fn cookie_fallback_sets_an_id_that_then_sticks() {
        let s = snapshot("", &[50.0, 50.0]);
        let first = pick(&s, &[]);
        let set = first
            .set_cookie
            .expect("anonymous cookie set")
            .to_str()
            .unwrap()
            .to_owned();
        assert!(set.starts_with("switchyard-uid="), "{set}");
        assert!(
            set.contains("Max-Age=31536000") && set.contains("HttpOnly"),
            "{set}"
        );
        let pair = set.split(';').next().unwrap().to_owned();
        for _ in 0..20 {
            let again = pick(&s, &[("cookie", &pair)]);
            assert!(again.set_cookie.is_none());
            assert_eq!(again.backend, first.backend);
        }
    }

    #[test]
    fn client_ip_fallback_is_sticky_per_address() {
        let s = snapshot("user_key: { fallback: client-ip }", &[50.0, 50.0]);
        let route = &s.routes[0];
        let by_ip = |ip: [u8; 4]| pick_from(&s, &[], IpAddr::from(ip)).unwrap().backend;
        let want = bucket("api", b"10.1.2.3");
        assert_eq!(by_ip([10, 1, 2, 3]), route.backend_for_bucket(want));
        assert!(pick(&s, &[]).set_cookie.is_none());
    }

    #[test]
    fn random_fallback_spreads_and_sets_nothing() {
        let s = snapshot("user_key: { fallback: random }", &[50.0, 50.0]);
        let hits: usize = (0..2000).map(|_| pick(&s, &[]).backend).sum();
        assert!((800..=1200).contains(&hits), "{hits} of 2000 on b1");
    }

    #[test]
    fn forced_backend_header_only_when_configured() {
        let off = snapshot("", &[100.0, 0.0]);
        assert_eq!(
            pick(&off, &[("x-switchyard-backend", "b1"), ("x-user-id", "u")]).backend,
            0
        );
        let on = snapshot("forced_backend_header: x-switchyard-backend", &[100.0, 0.0]);
        assert_eq!(
            pick(&on, &[("x-switchyard-backend", "b1"), ("x-user-id", "u")]).backend,
            1
        );
        let err = pick_from(&on, &[("x-switchyard-backend", "nope")], PEER);
        assert!(matches!(err, Err(ProxyError::DownstreamUnknownBackend)));
    }

    #[test]
    fn zero_weight_backends_get_no_one() {
        let s = snapshot("", &[0.0, 100.0, 0.0]);
        for i in 0..500 {
            assert_eq!(pick(&s, &[("x-user-id", &format!("u{i}"))]).backend, 1);
        }
    }

    /// The core stickiness promise: raising the last backend's weight, however
    /// the other weights move, never takes a user off it. Checked over many
    /// users and pseudo-random weight sequences (a fixed seed keeps it
    /// reproducible).
    #[test]
    fn raising_last_weight_never_moves_its_users_off() {
        let mut rng = fastrand::Rng::with_seed(7);
        let users: Vec<String> = (0..3000).map(|i| format!("user-{i}")).collect();
        for _ in 0..40 {
            let mut last_bp = 0u32;
            let mut on_last: Vec<bool> = vec![false; users.len()];
            for _ in 0..6 {
                last_bp = rng.u32(last_bp..=BUCKETS);
                let first_bp = rng.u32(0..=BUCKETS - last_bp);
                let weights = [
                    f64::from(first_bp) / 100.0,
                    f64::from(BUCKETS - last_bp - first_bp) / 100.0,
                    f64::from(last_bp) / 100.0,
                ];
                let s = snapshot("", &weights);
                for (u, was_on) in users.iter().zip(on_last.iter_mut()) {
                    let now_on = pick(&s, &[("x-user-id", u)]).backend == 2;
                    assert!(
                        now_on || !*was_on,
                        "{u} left the last backend at weights {weights:?}"
                    );
                    *was_on = now_on;
                }
            }
        }
    }

    #[test]
    fn random_ids_are_hex_and_distinct() {
        let a = random_id();
        let b = random_id();
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(a.as_str(), b.as_str());
    }
}
