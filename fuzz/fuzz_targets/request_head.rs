//! Arbitrary bytes as a request head: never a panic, and what is accepted
//! is consistent with itself.
#![no_main]

use bytes::BytesMut;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use switchyard_proxy::http1::request::{parse, BodyFraming};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let Ok(Some(head)) = parse(&mut buf, 16 * 1024, &mut HeaderMap::new()) else {
        return;
    };
    // The head was split off; what follows stayed, unchanged.
    assert!(data.ends_with(&buf));
    match head.framing {
        BodyFraming::Chunked => assert!(head.headers.contains_key(TRANSFER_ENCODING)),
        BodyFraming::Length(n) => {
            assert!(n > 0);
            assert!(!head.headers.contains_key(TRANSFER_ENCODING));
            let values: Vec<_> = head.headers.get_all(CONTENT_LENGTH).iter().collect();
            assert_eq!(values.len(), 1, "one Content-Length goes on");
            assert_eq!(
                values[0].to_str().ok().and_then(|v| v.parse().ok()),
                Some(n)
            );
        }
        BodyFraming::Empty => assert!(!head.headers.contains_key(TRANSFER_ENCODING)),
    }
    // The same bytes, parsed again, give the same head.
    let again = parse(&mut BytesMut::from(data), 16 * 1024, &mut HeaderMap::new())
        .expect("parsed once")
        .expect("complete once");
    assert_eq!(
        (again.method, again.uri, again.framing),
        (head.method, head.uri, head.framing)
    );
});
