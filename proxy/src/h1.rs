//! HTTP/1.1 to upstreams, on the wire (RFC 9112): the request head written,
//! the response head parsed, and the response body's framing decided and
//! decoded. No I/O here: `forward.rs` moves the bytes.
//!
//! Strict where a lenient reading could let two parties disagree on where a
//! message ends: chunked framing's lines end in CRLF, `Content-Length` is
//! digits only and one value, `Transfer-Encoding` other than a final
//! `chunked` reads to the close, and any doubt about a connection's framing
//! means it is not reused. (Heads are parsed by httparse, which also takes a
//! bare LF; the proxy writes every field out again itself.)

use std::mem::MaybeUninit;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

use crate::headers::{list_items, Added};

/// The largest response head read before the response counts as broken.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Header fields a response head may have at most.
const MAX_RESPONSE_HEADERS: usize = 128;

/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// The most trailer bytes read (and dropped) after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

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

// === The request head ===

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

/// Appends one chunk's size line, its data and the CRLF after it.
pub fn write_chunk(buf: &mut BytesMut, data: &[u8]) {
    use std::fmt::Write;
    if data.is_empty() {
        // A zero-size chunk would end the body.
        return;
    }
    write!(buf, "{:x}\r\n", data.len()).expect("writing to a BytesMut does not fail");
    buf.extend_from_slice(data);
    buf.extend_from_slice(b"\r\n");
}

/// The last chunk and the end of the (trailer-less) chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

// === The response head ===

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
    // Where each name and value lies in the head, so that once the head is
    // split off, values can share its bytes.
    let start = buf.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_RESPONSE_HEADERS];
    let fields = parsed.headers.len();
    for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
        let offset = |s: &[u8]| (s.as_ptr() as usize - start) as u32;
        *span = (
            offset(h.name.as_bytes()),
            h.name.len() as u32,
            offset(h.value),
            h.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    map.clear();
    map.reserve(fields);
    let mut headers = std::mem::take(map);
    let mut close = false;
    let mut lengths = Lengths::default();
    let mut transfer_encoding = false;
    for &(name_at, name_len, value_at, value_len) in &spans[..fields] {
        let name = &head[name_at as usize..(name_at + name_len) as usize];
        let name =
            HeaderName::from_bytes(name).map_err(|_| BadResponse::Head("bad header name"))?;
        let value = head.slice(value_at as usize..(value_at + value_len) as usize);
        // This hop's own connection management is used up here: a
        // `Connection` field that only says `close`, `keep-alive` or
        // `upgrade`, and `Keep-Alive`, would only be removed again before
        // the client sees the response. One that names other fields stays,
        // so that those are removed with it (headers.rs).
        if name == CONNECTION {
            let (says_close, names_fields) = connection_tokens(&value);
            close |= says_close;
            if !names_fields {
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

/// The `Content-Length` fields of a message, as they were parsed.
struct Lengths {
    fields: usize,
    /// A field with a list (`7, 7`).
    listed: bool,
    /// The one length every field and list member states; `Err` if they
    /// disagree or one is not a length.
    length: Result<Option<u64>, BadResponse>,
}

impl Default for Lengths {
    fn default() -> Self {
        Self {
            fields: 0,
            listed: false,
            length: Ok(None),
        }
    }
}

impl Lengths {
    fn add(&mut self, value: &[u8]) {
        self.fields += 1;
        self.listed |= value.contains(&b',');
        if let Ok(known) = self.length {
            self.length = add_length(known, value);
        }
    }

    /// `7, 7` or two fields of 7: the client gets one plain `Content-Length`.
    fn tidy(&self, headers: &mut HeaderMap, n: u64) {
        if self.fields > 1 || self.listed {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
}

/// `known` (the length stated so far) and the members of one more
/// `Content-Length` value: the one length they all state.
fn add_length(mut known: Option<u64>, value: &[u8]) -> Result<Option<u64>, BadResponse> {
    let text = std::str::from_utf8(value).map_err(|_| BadResponse::ContentLength)?;
    for member in text.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() || member.len() > 19 || !member.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadResponse::ContentLength);
        }
        let n: u64 = member.parse().map_err(|_| BadResponse::ContentLength)?;
        if known.is_some_and(|l| l != n) {
            return Err(BadResponse::ContentLength);
        }
        known = Some(n);
    }
    Ok(known)
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
    match lengths.length.clone()? {
        Some(n) => {
            lengths.tidy(headers, n);
            Ok((Framing::Length(n), reusable))
        }
        None => Ok((Framing::Close, false)),
    }
}

/// Whether `chunked` is the last transfer coding, and named only once.
fn chunked_is_final(headers: &HeaderMap) -> bool {
    let codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| list_items(v.as_bytes()));
    let mut chunked = 0;
    let mut last_chunked = false;
    for coding in codings {
        last_chunked = coding.eq_ignore_ascii_case(b"chunked");
        chunked += usize::from(last_chunked);
    }
    last_chunked && chunked == 1
}

/// Whether a `Connection` value says `close`, and whether it names any
/// field (a token other than `close`, `keep-alive` and `upgrade`).
fn connection_tokens(value: &[u8]) -> (bool, bool) {
    let mut close = false;
    let mut names = false;
    for token in list_items(value) {
        if token.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !token.eq_ignore_ascii_case(b"keep-alive")
            && !token.eq_ignore_ascii_case(b"upgrade")
        {
            names = true;
        }
    }
    (close, names)
}

// === The chunked body ===

/// What the decoder made of the bytes it had.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The bytes end inside framing: read more.
    NeedMore,
    /// The last chunk and the trailers have been read.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of the chunk size.
    Size,
    /// Spaces or tabs after the digits.
    SizeWhitespace,
    /// Past a `;`: extensions, up to the CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the empty line that ends them).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// A chunked-body decoder (RFC 9112 §7.1). Extensions are skipped, trailers
/// read and dropped; both are bounded.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Data bytes left in the current chunk, or its size while reading it.
    size: u64,
    digits: usize,
    /// Bytes of the current size line, or of all trailers.
    line: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: ChunkState::Size,
            size: 0,
            digits: 0,
            line: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes framing from the front of `buf` and returns the next data,
    /// which is split off `buf` without copying.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BadResponse> {
        use ChunkState::*;
        loop {
            if self.state == Done {
                return Ok(Decoded::Done);
            }
            if self.state == Data {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            let Some(&byte) = buf.first() else {
                return Ok(Decoded::NeedMore);
            };
            buf.advance(1);
            self.state = self.step(byte)?;
        }
    }

    fn step(&mut self, byte: u8) -> Result<ChunkState, BadResponse> {
        use ChunkState::*;
        let bad = BadResponse::Chunk;
        match self.state {
            Size | SizeWhitespace | Extension => {
                self.line += 1;
                if self.line > MAX_CHUNK_LINE {
                    return Err(bad("chunk-size line too long"));
                }
            }
            TrailerStart | Trailer | TrailerLf => {
                self.line += 1;
                if self.line > MAX_TRAILERS {
                    return Err(bad("trailers too large"));
                }
            }
            _ => {}
        }
        Ok(match (self.state, byte) {
            (Size, b) if b.is_ascii_hexdigit() => {
                self.digits += 1;
                if self.digits > 15 {
                    return Err(bad("chunk size too large"));
                }
                let digit = (b as char).to_digit(16).expect("a hex digit") as u64;
                self.size = self.size << 4 | digit;
                Size
            }
            (Size, _) if self.digits == 0 => return Err(bad("missing chunk size")),
            (Size | SizeWhitespace | Extension, b'\r') => SizeLf,
            (Size | SizeWhitespace, b' ' | b'\t') => SizeWhitespace,
            (Size | SizeWhitespace, b';') => Extension,
            (Size | SizeWhitespace, _) => return Err(bad("bad chunk size")),
            (Extension, b'\n') => return Err(bad("bare LF after chunk size")),
            (Extension, _) => Extension,
            (SizeLf, b'\n') if self.size == 0 => {
                self.line = 0;
                TrailerStart
            }
            (SizeLf, b'\n') => Data,
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => {
                self.digits = 0;
                self.line = 0;
                Size
            }
            (TrailerStart, b'\r') => EndLf,
            (Trailer, b'\r') => TrailerLf,
            (TrailerStart | Trailer, b'\n') => return Err(bad("bare LF in trailers")),
            (TrailerStart | Trailer, _) => Trailer,
            (TrailerLf, b'\n') => TrailerStart,
            (EndLf, b'\n') => Done,
            (SizeLf | DataCr | DataLf | TrailerLf | EndLf, _) => return Err(bad("expected CRLF")),
            (Data | Done, _) => unreachable!("handled in decode"),
        })
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

    #[test]
    fn chunks_are_written_with_their_hex_size() {
        let mut buf = BytesMut::new();
        write_chunk(&mut buf, &[b'x'; 26]);
        write_chunk(&mut buf, b"");
        buf.extend_from_slice(LAST_CHUNK);
        let mut expected = b"1a\r\n".to_vec();
        expected.extend_from_slice(&[b'x'; 26]);
        expected.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(&buf[..], expected);
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

    /// Decodes `wire` fed in pieces of `step` bytes; the data and whether it
    /// ended, or the error.
    fn decode_in_steps(wire: &[u8], step: usize) -> Result<(Vec<u8>, bool, Vec<u8>), BadResponse> {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for (i, piece) in wire.chunks(step).enumerate() {
            buf.extend_from_slice(piece);
            loop {
                match decoder.decode(&mut buf)? {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::NeedMore => break,
                    Decoded::Done => {
                        buf.extend_from_slice(&wire[((i + 1) * step).min(wire.len())..]);
                        return Ok((data, true, buf.to_vec()));
                    }
                }
            }
        }
        Ok((data, decoder.is_done(), buf.to_vec()))
    }

    #[test]
    fn chunked_bodies_decode_however_the_bytes_arrive() {
        let wire = b"5\r\nhello\r\nA \t;name=\"v\"\r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (data, done, rest) = decode_in_steps(wire, step).unwrap();
            assert_eq!(data, b"hello0123456789", "step {step}");
            assert!(done, "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}: what follows is not eaten");
        }
        let (data, done, _) = decode_in_steps(b"3\r\nab", 1).unwrap();
        assert_eq!((data.as_slice(), done), (&b"ab"[..], false));
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        for wire in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"0\r\nx: y\n\r\n",
            b"1000000000000000\r\n",
            b"-1\r\n",
            b"5 x\r\n",
            b"5;ext\nhello",
        ] {
            assert!(
                matches!(decode_in_steps(wire, 1), Err(BadResponse::Chunk(_))),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long_extension = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(decode_in_steps(long_extension.as_bytes(), 64).is_err());
        let long_trailers = format!("0\r\n{}", "t: v\r\n".repeat(MAX_TRAILERS / 6 + 1));
        assert!(decode_in_steps(long_trailers.as_bytes(), 64).is_err());
    }
}
