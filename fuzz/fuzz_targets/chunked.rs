//! Arbitrary bytes as a chunked body, fed in pieces whose size the first
//! byte picks: never a panic, never more data out than in, and the same
//! outcome however the bytes arrive.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchyard_proxy::http1::{ChunkedDecoder, Decoded};

/// The data, whether the body ended, and whether it was refused.
fn decode(wire: &[u8], step: usize) -> (Vec<u8>, bool, bool) {
    let mut decoder = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    for piece in wire.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(d)) => data.extend_from_slice(&d),
                Ok(Decoded::NeedMore) => break,
                Ok(Decoded::Done) => return (data, true, false),
                Err(_) => return (data, false, true),
            }
        }
    }
    (data, false, false)
}

fuzz_target!(|input: &[u8]| {
    let Some((&step, wire)) = input.split_first() else {
        return;
    };
    let whole = decode(wire, wire.len());
    let pieces = decode(wire, usize::from(step % 16) + 1);
    assert!(whole.0.len() <= wire.len());
    assert_eq!(whole, pieces, "the outcome depends on how the bytes arrive");
});
