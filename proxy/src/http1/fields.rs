//! What both directions read the same way in a message's fields: the
//! `Content-Length` fields, the `Transfer-Encoding` list, the `Connection`
//! tokens.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::headers::list_items;

/// A field's name and value as offsets into its head: name at, name
/// length, value at, value length.
pub(crate) type Span = (u32, u32, u32, u32);

/// Where each of `fields` (parsed from the head at `start`) lies in it, so
/// that once the head is split off, the values can share its bytes.
pub(crate) fn spans<const N: usize>(fields: &[httparse::Header<'_>], start: usize) -> [Span; N] {
    let mut spans = [(0, 0, 0, 0); N];
    let offset = |s: &[u8]| (s.as_ptr() as usize - start) as u32;
    for (span, h) in spans.iter_mut().zip(fields) {
        *span = (
            offset(h.name.as_bytes()),
            h.name.len() as u32,
            offset(h.value),
            h.value.len() as u32,
        );
    }
    spans
}

/// The field at `span` of `head`: its name (`None` if not a valid one) and
/// its value, sharing the head's bytes.
pub(crate) fn field(head: &Bytes, span: Span) -> (Option<HeaderName>, Bytes) {
    let (name_at, name_len, value_at, value_len) = span;
    let name = HeaderName::from_bytes(&head[name_at as usize..(name_at + name_len) as usize]).ok();
    (
        name,
        head.slice(value_at as usize..(value_at + value_len) as usize),
    )
}

/// A `Content-Length` that is not one length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidLength;

/// The `Content-Length` fields of a message, as they were parsed.
pub(crate) struct Lengths {
    pub fields: usize,
    /// A field with a list (`7, 7`).
    pub listed: bool,
    /// The one length every field and list member states; `Err` if they
    /// disagree or one is not a length.
    pub length: Result<Option<u64>, InvalidLength>,
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
    pub fn add(&mut self, value: &[u8]) {
        self.fields += 1;
        self.listed |= value.contains(&b',');
        if let Ok(known) = self.length {
            self.length = add_length(known, value);
        }
    }

    /// `7, 7` or two fields of 7: the client gets one plain `Content-Length`.
    pub fn tidy(&self, headers: &mut HeaderMap, n: u64) {
        if self.fields > 1 || self.listed {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
}

/// `known` (the length stated so far) and the members of one more
/// `Content-Length` value: the one length they all state.
fn add_length(mut known: Option<u64>, value: &[u8]) -> Result<Option<u64>, InvalidLength> {
    let text = std::str::from_utf8(value).map_err(|_| InvalidLength)?;
    for member in text.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() || member.len() > 19 || !member.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidLength);
        }
        let n: u64 = member.parse().map_err(|_| InvalidLength)?;
        if known.is_some_and(|l| l != n) {
            return Err(InvalidLength);
        }
        known = Some(n);
    }
    Ok(known)
}

/// Whether `chunked` is the last transfer coding, and named only once.
pub(crate) fn chunked_is_final(headers: &HeaderMap) -> bool {
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

/// What a `Connection` field says.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionTokens {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// It names a field (a token other than `close`, `keep-alive` and
    /// `upgrade`): that field is this hop's too.
    pub names_fields: bool,
}

impl ConnectionTokens {
    /// Adds the tokens of one `Connection` value.
    pub fn add(&mut self, value: &[u8]) {
        for token in list_items(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else {
                self.names_fields = true;
            }
        }
    }

    pub fn of(value: &[u8]) -> ConnectionTokens {
        let mut tokens = ConnectionTokens::default();
        tokens.add(value);
        tokens
    }
}
