//! Chunked transfer coding (RFC 9112 §7.1): a decoder that never copies
//! data, and the encoder's pieces.

use bytes::{Buf, Bytes, BytesMut};

/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// The most trailer bytes read (and dropped) after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// Broken chunked framing, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub struct BadChunk(pub &'static str);

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
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BadChunk> {
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

    fn step(&mut self, byte: u8) -> Result<ChunkState, BadChunk> {
        use ChunkState::*;
        let bad = BadChunk;
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

#[cfg(test)]
/// Decodes `wire` fed in pieces of `step` bytes: the data, whether it
/// ended, and what was left after it; or the error.
pub(super) fn decode_in_steps(
    wire: &[u8],
    step: usize,
) -> Result<(Vec<u8>, bool, Vec<u8>), BadChunk> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
                matches!(decode_in_steps(wire, 1), Err(BadChunk(_))),
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
