//! The request head: read by the proxy's server from the client (`parse`,
//! RFC 9112 §6.3 as a server reads it), and written by its client for the
//! upstream (`write_request_head`).

use std::mem::MaybeUninit;

use bytes::{BufMut, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Uri, Version};

use super::fields::{chunked_is_final, field, spans, ConnectionTokens, Lengths, Span};
use crate::headers::Added;

// === Read from the client ===

/// Header fields a request head may have at most (what httparse is given
/// room for; `limits.max_header_bytes` bounds the head's size).
pub const MAX_REQUEST_HEADERS: usize = 100;

/// What a client sent that cannot be read as an HTTP/1.x request, and so
/// is answered and the connection closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// 400.
    #[error("malformed request: {0}")]
    Head(&'static str),
    /// 431: larger than the limit, or more fields than `MAX_REQUEST_HEADERS`.
    #[error("request head too large")]
    HeadTooLarge,
    /// 400: `Content-Length` not one length.
    #[error("malformed request: invalid content-length")]
    ContentLength,
    /// 400: a transfer coding other than a final `chunked`, or one in an
    /// HTTP/1.0 request (RFC 9112 §6.3, 4).
    #[error("malformed request: unsupported transfer-encoding")]
    TransferEncoding,
    /// 505.
    #[error("HTTP version not supported")]
    Version,
}

/// How a request's body is delimited as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    Empty,
    Length(u64),
    Chunked,
}

/// A request head read from a client.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    /// Every field as sent (hop-by-hop ones included: `headers.rs` removes
    /// them on the way up), but a `Content-Length` that a
    /// `Transfer-Encoding` overrides.
    pub headers: HeaderMap,
    pub framing: BodyFraming,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a `100 Continue` (or
    /// the response) before sending the body.
    pub expect_continue: bool,
    /// `Connection: upgrade` with an `Upgrade` field.
    pub upgrade: bool,
}

/// Parses a request head off the front of `buf`. `Ok(None)`: more bytes are
/// needed (and fewer than `max_head` have come). A complete head is split
/// off `buf`, which keeps what follows it (the body, or a pipelined
/// request); header values share the head's bytes. The fields go into
/// `map`, cleared first, whose allocation the head takes.
pub fn parse(
    buf: &mut BytesMut,
    max_head: usize,
    map: &mut HeaderMap,
) -> Result<Option<RequestHead>, BadRequest> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_REQUEST_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err(BadRequest::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(BadRequest::HeadTooLarge),
        Err(httparse::Error::Version) => return Err(BadRequest::Version),
        Err(_) => return Err(BadRequest::Head("not an HTTP/1.x request")),
    };
    if len > max_head {
        return Err(BadRequest::HeadTooLarge);
    }
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(BadRequest::Version),
    };
    let method = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(BadRequest::Head("bad method"))?;
    let start = buf.as_ptr() as usize;
    let offset = |s: &[u8]| (s.as_ptr() as usize - start) as u32;
    let target = parsed.path.ok_or(BadRequest::Head("no target"))?;
    let target = (offset(target.as_bytes()), target.len() as u32);
    let fields = parsed.headers.len();
    let spans: [Span; MAX_REQUEST_HEADERS] = spans(parsed.headers, start);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0 as usize..(target.0 + target.1) as usize))
        .map_err(|_| BadRequest::Head("bad request target"))?;
    map.clear();
    map.reserve(fields);
    let mut headers = std::mem::take(map);
    let mut connection = ConnectionTokens::default();
    let mut lengths = Lengths::default();
    let (mut transfer_encoding, mut expect_continue, mut upgrade_field) = (false, false, false);
    for &span in &spans[..fields] {
        let (name, value) = field(&head, span);
        let name = name.ok_or(BadRequest::Head("bad header name"))?;
        if name == CONNECTION {
            connection.add(&value);
        } else if name == CONTENT_LENGTH {
            lengths.add(&value);
        } else if name == TRANSFER_ENCODING {
            transfer_encoding = true;
        } else if name == EXPECT {
            expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
        } else if name == UPGRADE {
            upgrade_field = true;
        }
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| BadRequest::Head("bad header value"))?;
        headers.append(name, value);
    }
    let mut keep_alive = match version {
        Version::HTTP_11 => !connection.close,
        _ => connection.keep_alive && !connection.close,
    };
    let framing = if transfer_encoding {
        if version == Version::HTTP_10 || !chunked_is_final(&headers) {
            return Err(BadRequest::TransferEncoding);
        }
        if lengths.fields > 0 {
            // Both framings (RFC 9112 §6.3, 3): the coding wins, the length
            // goes no further, and the connection closes after the
            // response, so that nothing after this body is read as another
            // request.
            headers.remove(CONTENT_LENGTH);
            keep_alive = false;
        }
        BodyFraming::Chunked
    } else {
        match lengths.length.map_err(|_| BadRequest::ContentLength)? {
            Some(0) | None => BodyFraming::Empty,
            Some(n) => {
                lengths.tidy(&mut headers, n);
                BodyFraming::Length(n)
            }
        }
    };
    Ok(Some(RequestHead {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
        upgrade: connection.upgrade && upgrade_field,
    }))
}

// === Written for the upstream ===

/// How the request body is delimited on its way upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no framing header (a `GET` with nothing to send).
    None,
    Length(u64),
    Chunked,
}

impl RequestFraming {
    /// The framing for a body whose exact size is `exact` when known. A body
    /// of unknown size is chunked, except on `GET` and `HEAD`, which have
    /// none (as hyper's client did: a bodiless HTTP/2 `GET` whose end came
    /// in a frame of its own would otherwise go up as a chunked `GET`, which
    /// some servers refuse). An empty body is announced only where the method
    /// is expected to carry one (RFC 9110 §8.6).
    pub fn for_body(method: &Method, exact: Option<u64>) -> Self {
        match exact {
            Some(0) if !matches!(*method, Method::POST | Method::PUT | Method::PATCH) => Self::None,
            Some(n) => Self::Length(n),
            None if matches!(*method, Method::GET | Method::HEAD) => Self::None,
            None => Self::Chunked,
        }
    }
}

/// Writes `method target HTTP/1.1`, the headers and the framing header.
/// Framing headers in `headers` are not written: the body's own framing
/// replaces them, so a client's `Content-Length` never disagrees with what
/// follows.
pub fn write_request_head(
    buf: &mut BytesMut,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    added: &Added,
    framing: RequestFraming,
) {
    // One allocation for the whole head, not one per doubling.
    let fields: usize = headers
        .iter()
        .map(|(n, v)| (n, v.as_bytes()))
        .chain(added.fields())
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    buf.reserve(method.as_str().len() + target.len() + fields + 64);
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.put_u8(b' ');
    buf.extend_from_slice(target.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    let all = headers.iter().map(|(n, v)| (n, v.as_bytes()));
    for (name, value) in all.chain(added.fields()) {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value);
        buf.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            buf.extend_from_slice(b"content-length: ");
            buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    buf.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    fn read(text: &str) -> Result<Option<RequestHead>, BadRequest> {
        parse(
            &mut BytesMut::from(text.as_bytes()),
            16 * 1024,
            &mut HeaderMap::new(),
        )
    }

    #[test]
    fn a_request_head_is_split_off_and_what_follows_stays() {
        let mut buf = BytesMut::from(
            &b"POST /a?b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET"[..],
        );
        let head = parse(&mut buf, 1024, &mut HeaderMap::new())
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.method, head.uri.to_string()),
            (Method::POST, "/a?b".into())
        );
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["host"], "x");
        assert_eq!(head.framing, BodyFraming::Length(3));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"abcGET");
        for partial in ["", "GE", "GET / HTTP/1.1\r\nHost: x\r\n"] {
            assert!(read(partial).unwrap().is_none(), "{partial:?}");
        }
    }

    #[test]
    fn request_framing_follows_rfc_9112_section_6_3() {
        let framing = |text: &str| read(text).map(|h| h.map(|h| (h.framing, h.keep_alive)));
        let ok = |f, keep| Ok(Some((f, keep)));
        use BodyFraming::*;
        assert_eq!(framing("GET / HTTP/1.1\r\n\r\n"), ok(Empty, true));
        assert_eq!(
            framing("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"),
            ok(Empty, true)
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\ncontent-length: 7, 7\r\n\r\n"),
            ok(Length(7), true)
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            ok(Chunked, true)
        );
        // Both: the coding wins and the connection closes after.
        let both =
            read("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!((both.framing, both.keep_alive), (Chunked, false));
        assert!(both.headers.get(CONTENT_LENGTH).is_none());
        // HTTP/1.0 closes unless asked to keep it.
        assert_eq!(framing("GET / HTTP/1.0\r\n\r\n"), ok(Empty, false));
        assert_eq!(
            framing("GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"),
            ok(Empty, true)
        );
        assert_eq!(
            framing("GET / HTTP/1.1\r\nconnection: close\r\n\r\n"),
            ok(Empty, false)
        );
        for (bad, why) in [
            (
                "POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\n",
                BadRequest::ContentLength,
            ),
            (
                "POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\n",
                BadRequest::ContentLength,
            ),
            (
                "POST / HTTP/1.1\r\ncontent-length: 5 5\r\n\r\n",
                BadRequest::ContentLength,
            ),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked, identity\r\n\r\n",
                BadRequest::TransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
                BadRequest::TransferEncoding,
            ),
            (
                "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
                BadRequest::TransferEncoding,
            ),
            ("GET / HTTP/2.0\r\n\r\n", BadRequest::Version),
            ("NOT HTTP AT ALL\r\n\r\n", BadRequest::Version),
        ] {
            assert_eq!(read(bad).map(|_| ()), Err(why), "{bad:?}");
        }
        assert!(matches!(
            read("GET / HTTP/1.1\r\nbad header line\r\n\r\n"),
            Err(BadRequest::Head(_))
        ));
        assert!(matches!(
            read("GET /\x01 HTTP/1.1\r\n\r\n"),
            Err(BadRequest::Head(_))
        ));
    }

    #[test]
    fn expect_upgrade_and_the_size_limit() {
        let head = read("PUT / HTTP/1.1\r\nexpect: 100-Continue\r\ncontent-length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.expect_continue);
        let head = read(
            "GET /ws HTTP/1.1\r\nconnection: keep-alive, Upgrade\r\nupgrade: websocket\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(head.upgrade);
        let head = read("GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.upgrade, "an upgrade needs both fields");
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(
            parse(
                &mut BytesMut::from(big.as_bytes()),
                1024,
                &mut HeaderMap::new()
            )
            .map(|_| ()),
            Err(BadRequest::HeadTooLarge)
        );
        assert_eq!(
            parse(
                &mut BytesMut::from(&big.as_bytes()[..1500]),
                1024,
                &mut HeaderMap::new()
            )
            .map(|_| ()),
            Err(BadRequest::HeadTooLarge),
            "a partial head over the limit"
        );
        let many: String = (0..=MAX_REQUEST_HEADERS)
            .map(|i| format!("x{i}: y\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(read(&many).map(|_| ()), Err(BadRequest::HeadTooLarge));
    }

    #[test]
    fn the_request_head_carries_the_bodys_own_framing() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("a"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let none = Added::default();
        let mut buf = BytesMut::new();
        write_request_head(
            &mut buf,
            &Method::POST,
            "/p?q",
            &headers,
            &none,
            RequestFraming::Length(5),
        );
        assert_eq!(
            &buf[..],
            b"POST /p?q HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\n"
        );
        buf.clear();
        let mut added = Added::default();
        added.flags = Some((HeaderName::from_static("x-feature-flags"), b"a,b".to_vec()));
        write_request_head(
            &mut buf,
            &Method::GET,
            "/",
            &headers,
            &added,
            RequestFraming::None,
        );
        assert_eq!(
            &buf[..],
            b"GET / HTTP/1.1\r\nhost: a\r\nx-feature-flags: a,b\r\n\r\n",
            "the proxy's fields after the client's"
        );
        buf.clear();
        write_request_head(
            &mut buf,
            &Method::PUT,
            "/",
            &HeaderMap::new(),
            &none,
            RequestFraming::Chunked,
        );
        assert_eq!(
            &buf[..],
            b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn empty_bodies_are_announced_only_where_a_body_is_expected() {
        use RequestFraming::*;
        assert_eq!(RequestFraming::for_body(&Method::GET, Some(0)), None);
        assert_eq!(RequestFraming::for_body(&Method::DELETE, Some(0)), None);
        assert_eq!(RequestFraming::for_body(&Method::POST, Some(0)), Length(0));
        assert_eq!(RequestFraming::for_body(&Method::GET, Some(3)), Length(3));
        assert_eq!(
            RequestFraming::for_body(&Method::PATCH, Option::None),
            Chunked
        );
    }
}
