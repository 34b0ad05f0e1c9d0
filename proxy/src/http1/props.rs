//! Property tests of the framing rules (proptest): whatever the values and
//! however the bytes arrive, both directions decide the same framing.

use bytes::BytesMut;
use http::HeaderMap;
use proptest::prelude::*;

use super::request::{parse, BadRequest, BodyFraming};
use super::{write_chunk, LAST_CHUNK};

fn decode(wire: &[u8], step: usize) -> Option<(Vec<u8>, bool, Vec<u8>)> {
    super::chunked::decode_in_steps(wire, step).ok()
}

fn head(fields: &str) -> Result<Option<super::RequestHead>, BadRequest> {
    let text = format!("POST / HTTP/1.1\r\nhost: a\r\n{fields}\r\n");
    parse(
        &mut BytesMut::from(text.as_bytes()),
        64 * 1024,
        &mut HeaderMap::new(),
    )
}

proptest! {
    /// Chunks written by the encoder come back whole, whatever the pieces
    /// the decoder is fed, and nothing after the body is eaten.
    #[test]
    fn chunked_bodies_round_trip(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
        step in 1usize..64,
        after in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut wire = BytesMut::new();
        for c in &chunks {
            write_chunk(&mut wire, c);
        }
        wire.extend_from_slice(LAST_CHUNK);
        wire.extend_from_slice(&after);
        let (data, done, rest) = decode(&wire, step).expect("well-formed");
        prop_assert_eq!(data, chunks.concat());
        prop_assert!(done);
        prop_assert_eq!(rest, after);
    }

    /// Any bytes: the same outcome whole or in pieces.
    #[test]
    fn the_decoder_does_not_care_how_bytes_arrive(
        wire in prop::collection::vec(any::<u8>(), 0..200),
        step in 1usize..16,
    ) {
        prop_assert_eq!(decode(&wire, wire.len().max(1)), decode(&wire, step));
    }

    /// One length, in one field, a list or several fields, is that length;
    /// two different ones are refused.
    #[test]
    fn content_length_is_one_length(n in any::<u64>().prop_filter("digits", |n| *n < 10u64.pow(19)), m in any::<u64>(), copies in 1usize..4) {
        let one = head(&format!("content-length: {n}\r\n")).unwrap().unwrap();
        let expected = if n == 0 { BodyFraming::Empty } else { BodyFraming::Length(n) };
        prop_assert_eq!(one.framing, expected);
        let listed = vec![n.to_string(); copies].join(", ");
        prop_assert_eq!(head(&format!("content-length: {listed}\r\n")).unwrap().unwrap().framing, expected);
        if m != n && m < 10u64.pow(19) {
            prop_assert_eq!(
                head(&format!("content-length: {n}\r\ncontent-length: {m}\r\n")).map(|_| ()),
                Err(BadRequest::ContentLength)
            );
        }
    }

    /// A request's transfer codings frame it as chunked exactly when
    /// `chunked` comes last and once (RFC 9112 §6.3, 4); the rest is 400.
    #[test]
    fn transfer_codings_frame_as_chunked_only_when_chunked_is_last(
        codings in prop::collection::vec(prop::sample::select(vec!["chunked", "gzip", "identity", "Chunked"]), 1..4),
        with_length in any::<bool>(),
    ) {
        let length = if with_length { "content-length: 5\r\n" } else { "" };
        let framed = head(&format!("transfer-encoding: {}\r\n{length}", codings.join(", ")));
        let chunked = codings.iter().filter(|c| c.eq_ignore_ascii_case("chunked")).count();
        let last = codings.last().is_some_and(|c| c.eq_ignore_ascii_case("chunked"));
        if last && chunked == 1 {
            let head = framed.unwrap().unwrap();
            prop_assert_eq!(head.framing, BodyFraming::Chunked);
            prop_assert_eq!(head.keep_alive, !with_length, "both framings close after");
        } else {
            prop_assert_eq!(framed.map(|_| ()), Err(BadRequest::TransferEncoding));
        }
    }

    /// A head cut anywhere before its end asks for more; whole, it parses.
    #[test]
    fn a_cut_head_asks_for_more(cut in 0usize..60) {
        let text = b"GET /path?q=1 HTTP/1.1\r\nhost: shop.test\r\nx-user-id: u\r\n\r\n";
        let cut = cut.min(text.len() - 1);
        prop_assert!(parse(&mut BytesMut::from(&text[..cut]), 1024, &mut HeaderMap::new()).unwrap().is_none());
        prop_assert!(parse(&mut BytesMut::from(&text[..]), 1024, &mut HeaderMap::new()).unwrap().is_some());
    }
}
