//! The response head, from the upstream's side of the proxy: parsed, its
//! hop-by-hop fields used up, and its body's framing decided (RFC 9112
//! §6.3, as a client reads it).

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};

use super::fields::{
    chunked_is_final, field, spans, ConnectionTokens, InvalidLength, Lengths, Span,
};
use super::BadChunk;

/// The largest response head read before the response counts as broken.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Header fields a response head may have at most.
const MAX_RESPONSE_HEADERS: usize = 128;

/// What the upstream sent that cannot be read as HTTP/1.1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    #[error("malformed response head: {0}")]
    Head(&'static str),
    #[error("response head larger than {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid content-length")]
    ContentLength,
    #[error("transfer-encoding in an HTTP/1.0 response")]
    TransferEncodingInHttp10,
    #[error("malformed chunked body: {0}")]
    Chunk(&'static str),
}

impl From<BadChunk> for BadResponse {
    fn from(e: BadChunk) -> Self {
        BadResponse::Chunk(e.0)
    }
}

impl From<InvalidLength> for BadResponse {
    fn from(_: InvalidLength) -> Self {
        BadResponse::ContentLength
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body, whatever the headers say (`HEAD`, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Read until the upstream closes; the connection is not reused.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection may carry another request after this one.
    pub reusable: bool,
}

/// Parses a response head off the front of `buf`. `Ok(None)`: more bytes
/// are needed. A complete head is split off `buf`, which keeps what follows
/// it; header values share the head's bytes rather than copying them. The
/// fields go into `map`, cleared first, whose allocation the head takes.
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
    map: &mut HeaderMap,
) -> Result<Option<ResponseHead>, BadResponse> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(BadResponse::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(BadResponse::Head("too many headers")),
        Err(_) => return Err(BadResponse::Head("not HTTP/1.x")),
    };
    if len > MAX_RESPONSE_HEAD {
        return Err(BadResponse::HeadTooLarge);
    }
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(BadResponse::Head("bad status code"))?;
    let fields = parsed.headers.len();
    let spans: [Span; MAX_RESPONSE_HEADERS] = spans(parsed.headers, buf.as_ptr() as usize);
    let head = buf.split_to(len).freeze();
    map.clear();
    map.reserve(fields);
    let mut headers = std::mem::take(map);
    let mut close = false;
    let mut lengths = Lengths::default();
    let mut transfer_encoding = false;
    for &span in &spans[..fields] {
        let (name, value) = field(&head, span);
        let name = name.ok_or(BadResponse::Head("bad header name"))?;
        // This hop's own connection management is used up here: a
        // `Connection` field that only says `close`, `keep-alive` or
        // `upgrade`, and `Keep-Alive`, would only be removed again before
        // the client sees the response. One that names other fields stays,
        // so that those are removed with it (headers.rs).
        if name == CONNECTION {
            let tokens = ConnectionTokens::of(&value);
            close |= tokens.close;
            if !tokens.names_fields {
                continue;
            }
        } else if name == CONTENT_LENGTH {
            lengths.add(&value);
        } else if name == TRANSFER_ENCODING {
            transfer_encoding = true;
        } else if name.as_str() == "keep-alive" {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| BadResponse::Head("bad header value"))?;
        headers.append(name, value);
    }
    let message = Message {
        version,
        close,
        lengths,
        transfer_encoding,
    };
    let (framing, reusable) = response_framing(method, status, message, &mut headers)?;
    Ok(Some(ResponseHead {
        status,
        headers,
        framing,
        reusable,
    }))
}

/// What the framing of a response depends on besides its method and
/// status, noted while its fields are parsed (so that the framing needs no
/// lookups in the map).
struct Message {
    version: Version,
    /// `Connection: close`.
    close: bool,
    lengths: Lengths,
    transfer_encoding: bool,
}

/// RFC 9112 §6.3, from the client's side. `Content-Length` is removed when
/// `Transfer-Encoding` overrides it, so it is never passed on.
fn response_framing(
    method: &Method,
    status: StatusCode,
    message: Message,
    headers: &mut HeaderMap,
) -> Result<(Framing, bool), BadResponse> {
    let Message {
        version,
        close,
        lengths,
        transfer_encoding,
    } = message;
    let mut reusable = version == Version::HTTP_11 && !close;
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        // The length only informs here; a readable one is tidied all the same.
        if let Ok(Some(n)) = lengths.length {
            lengths.tidy(headers, n);
        }
        return Ok((Framing::Empty, reusable));
    }
    if transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(BadResponse::TransferEncodingInHttp10);
        }
        if lengths.fields > 0 {
            // Both framings: a sign of an intermediary that disagrees.
            headers.remove(CONTENT_LENGTH);
            reusable = false;
        }
        return Ok(if chunked_is_final(headers) {
            (Framing::Chunked, reusable)
        } else {
            (Framing::Close, false)
        });
    }
    match lengths.length? {
        Some(n) => {
            lengths.tidy(headers, n);
            Ok((Framing::Length(n), reusable))
        }
        None => Ok((Framing::Close, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, method: &Method) -> Result<Option<ResponseHead>, BadResponse> {
        parse_response(
            &mut BytesMut::from(text.as_bytes()),
            method,
            &mut HeaderMap::new(),
        )
    }

    fn framing(text: &str) -> Result<(Framing, bool), BadResponse> {
        head(text, &Method::GET).map(|h| {
            let h = h.expect("a complete head");
            (h.framing, h.reusable)
        })
    }

    #[test]
    fn a_head_is_split_off_and_what_follows_stays() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\nx-a: c\r\n\r\nabcHTTP";
        let mut partial = BytesMut::from(&wire[..40]);
        assert!(
            parse_response(&mut partial, &Method::GET, &mut HeaderMap::new())
                .unwrap()
                .is_none()
        );
        assert_eq!(partial.len(), 40, "a partial head stays in the buffer");
        let mut buf = BytesMut::from(&wire[..]);
        let mut map = HeaderMap::new();
        map.insert("x-request", HeaderValue::from_static("gone"));
        let h = parse_response(&mut buf, &Method::GET, &mut map)
            .unwrap()
            .unwrap();
        assert!(
            !h.headers.contains_key("x-request"),
            "the map is cleared first"
        );
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Length(3));
        assert!(h.reusable);
        let xa: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(xa, ["b", "c"]);
        assert_eq!(&buf[..], b"abcHTTP");
    }

    #[test]
    fn a_partial_head_asks_for_more_until_the_bound() {
        assert!(head("HTTP/1.1 200 OK\r\nA: b\r\n", &Method::GET)
            .unwrap()
            .is_none());
        let long = format!("HTTP/1.1 200 OK\r\nA: {}", "b".repeat(MAX_RESPONSE_HEAD));
        assert_eq!(
            head(&long, &Method::GET).unwrap_err(),
            BadResponse::HeadTooLarge
        );
        let many: String = (0..=MAX_RESPONSE_HEADERS)
            .map(|i| format!("h{i}: v\r\n"))
            .collect();
        let many = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(
            head(&many, &Method::GET),
            Err(BadResponse::Head(_))
        ));
        for broken in [
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nA b: c\r\n\r\n",
            "HTTP/1.1 200 OK\r\nA: b\0c\r\n\r\n",
            "SSH-2.0-OpenSSH_9.2\r\n\r\n",
        ] {
            assert!(
                matches!(head(broken, &Method::GET), Err(BadResponse::Head(_))),
                "{broken:?}"
            );
        }
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        use Framing::*;
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n"),
            Ok((Length(7), true))
        );
        let repeated = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\ncontent-length: 7\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((repeated.framing, repeated.reusable), (Length(7), true));
        let lengths: Vec<_> = repeated.headers.get_all(CONTENT_LENGTH).iter().collect();
        assert_eq!(lengths, ["7"], "one plain value is passed on");
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
            Ok((Chunked, true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n"),
            Ok((Chunked, true))
        );
        // Not chunked last, or chunked twice: only the close ends it.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n"),
            Ok((Close, false))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n"),
            Ok((Close, false))
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), Ok((Close, false)));
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 1\r\n\r\n"
            ),
            Ok((Length(1), false))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
            Ok((Length(1), false))
        );
        for empty in [
            "204 No Content",
            "304 Not Modified",
            "100 Continue",
            "103 Early Hints",
        ] {
            assert_eq!(
                framing(&format!("HTTP/1.1 {empty}\r\ncontent-length: 9\r\n\r\n")),
                Ok((Empty, true)),
                "{empty}"
            );
        }
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Empty);
        assert_eq!(
            h.headers[CONTENT_LENGTH], "9",
            "a HEAD answer keeps its length"
        );
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 9, 9\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        let lengths: Vec<_> = h.headers.get_all(CONTENT_LENGTH).iter().collect();
        assert_eq!(lengths, ["9"]);
    }

    #[test]
    fn this_hops_connection_fields_are_used_up_unless_they_name_others() {
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nconnection: Close\r\ncontent-length: 0\r\nx-a: b\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(!h.reusable, "close in any Connection field counts");
        assert!(!h.headers.contains_key(CONNECTION));
        assert!(!h.headers.contains_key("keep-alive"));
        assert_eq!(h.headers["x-a"], "b");
        let h = head(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, x-secret\r\nx-secret: s\r\ncontent-length: 0\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(h.reusable);
        assert_eq!(
            h.headers[CONNECTION], "keep-alive, x-secret",
            "kept, so that the field it names is removed with it"
        );

        // One field says close, another names a field: both take effect.
        let mut h = head(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nx-secret: s\r\nConnection: X-Secret\r\ncontent-length: 0\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(!h.reusable);
        crate::headers::rewrite_response(h.status, &mut h.headers);
        assert!(h.headers.get("x-secret").is_none(), "{:?}", h.headers);
        assert!(h.headers.get(CONNECTION).is_none());
    }

    #[test]
    fn both_framings_read_chunked_drop_the_length_and_close_after() {
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Chunked, false));
        assert!(!h.headers.contains_key(CONTENT_LENGTH));
    }

    #[test]
    fn a_bad_or_ambiguous_length_is_refused() {
        for cl in [
            "",
            "-1",
            "+1",
            "1 2",
            "0x10",
            "1, 2",
            "99999999999999999999",
            "١",
        ] {
            assert_eq!(
                framing(&format!("HTTP/1.1 200 OK\r\ncontent-length: {cl}\r\n\r\n")),
                Err(BadResponse::ContentLength),
                "{cl:?}"
            );
        }
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"),
            Err(BadResponse::ContentLength)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
            Err(BadResponse::TransferEncodingInHttp10)
        );
    }
}
