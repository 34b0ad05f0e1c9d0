//! HTTP/1.1 on the wire (RFC 9112), both directions, without I/O: request
//! and response heads parsed (by httparse) and written, each message's body
//! framing decided, and chunked bodies decoded and encoded. `forward.rs`
//! moves the bytes to and from upstreams.
//!
//! One policy for both directions, strict where a lenient reading could let
//! two parties disagree on where a message ends: chunked framing's lines end
//! in CRLF, `Content-Length` is digits only and one value, and any doubt
//! about a connection's framing means it is not reused. (Heads are parsed by
//! httparse, which also takes a bare LF; the proxy writes every field out
//! again itself.)

pub mod chunked;
mod fields;
#[cfg(test)]
mod props;
pub mod request;
pub mod response;

pub use chunked::{write_chunk, BadChunk, ChunkedDecoder, Decoded, LAST_CHUNK};
pub use request::{write_request_head, BadRequest, BodyFraming, RequestFraming, RequestHead};
pub use response::{parse_response, BadResponse, Framing, ResponseHead, MAX_RESPONSE_HEAD};
