//! Arbitrary bytes as an upstream's response head (to a GET or a HEAD, by
//! the first byte): never a panic, and what is accepted is consistent.
#![no_main]

use bytes::BytesMut;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method};
use libfuzzer_sys::fuzz_target;
use switchyard_proxy::http1::{parse_response, Framing};

fuzz_target!(|data: &[u8]| {
    let Some((&first, data)) = data.split_first() else {
        return;
    };
    let method = if first & 1 == 0 {
        Method::GET
    } else {
        Method::HEAD
    };
    let mut buf = BytesMut::from(data);
    let Ok(Some(head)) = parse_response(&mut buf, &method, &mut HeaderMap::new()) else {
        return;
    };
    assert!(data.ends_with(&buf));
    match head.framing {
        Framing::Empty => assert!(
            method == Method::HEAD
                || head.status.is_informational()
                || head.status == 204
                || head.status == 304
        ),
        Framing::Length(n) => {
            assert!(!head.headers.contains_key(TRANSFER_ENCODING));
            let values: Vec<_> = head.headers.get_all(CONTENT_LENGTH).iter().collect();
            assert_eq!(values.len(), 1);
            assert_eq!(
                values[0].to_str().ok().and_then(|v| v.parse().ok()),
                Some(n)
            );
        }
        Framing::Chunked => assert!(!head.headers.contains_key(CONTENT_LENGTH)),
        Framing::Close => assert!(
            !head.reusable,
            "a body read to the close ends the connection"
        ),
    }
});
