//! The stable bucket of a user: the one hash every replica, restart and other
//! implementation agrees on.
//!
//! `bucket = (murmur3_x86_32(salt + ":" + key, seed 0) as u64 * 10_000) >> 32`
//!
//! This is the hash Unleash and flagd use, with flagd's multiply-shift onto the
//! bucket space, so a service in another language can compute the same bucket
//! (Python: `(mmh3.hash(f"{salt}:{key}".encode(), 0, signed=False) * 10000) >> 32`).
//! Rust's `DefaultHasher` is never used: its output may change between releases
//! and `RandomState` is seeded per process, which would break stickiness.

/// Number of buckets: weights have 0.01 % resolution, so 0.01 % is one bucket.
pub const BUCKETS: u32 = 10_000;

/// The bucket (`0..BUCKETS`) of `key` under `salt`. Allocates nothing.
pub fn bucket(salt: &str, key: &[u8]) -> u32 {
    Salt::new(salt).bucket(key)
}

/// A salt hashed once: the hash state after `salt:`, so each request hashes
/// only its key. Routes and flags keep one.
#[derive(Debug, Clone)]
pub struct Salt(Murmur3);

impl Salt {
    pub fn new(salt: &str) -> Self {
        let mut h = Murmur3::new(0);
        h.write(salt.as_bytes());
        h.write(b":");
        Salt(h)
    }

    /// The bucket (`0..BUCKETS`) of `key` under this salt.
    pub fn bucket(&self, key: &[u8]) -> u32 {
        let mut h = self.0.clone();
        h.write(key);
        ((u64::from(h.finish()) * u64::from(BUCKETS)) >> 32) as u32
    }
}

/// Incremental MurmurHash3 x86_32, so `salt:key` is hashed without building the
/// joined string on the request path.
#[derive(Debug, Clone)]
pub struct Murmur3 {
    h: u32,
    tail: [u8; 4],
    tail_len: usize,
    len: usize,
}

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

fn scramble(k: u32) -> u32 {
    k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2)
}

impl Murmur3 {
    pub fn new(seed: u32) -> Self {
        Self {
            h: seed,
            tail: [0; 4],
            tail_len: 0,
            len: 0,
        }
    }

    fn block(&mut self, k: u32) {
        self.h ^= scramble(k);
        self.h = self
            .h
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
    }

    pub fn write(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len();
        if self.tail_len > 0 {
            let take = (4 - self.tail_len).min(bytes.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&bytes[..take]);
            self.tail_len += take;
            bytes = &bytes[take..];
            if self.tail_len < 4 {
                return;
            }
            self.block(u32::from_le_bytes(self.tail));
            self.tail_len = 0;
        }
        let mut chunks = bytes.chunks_exact(4);
        for chunk in &mut chunks {
            self.block(u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
        }
        let rest = chunks.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    pub fn finish(&self) -> u32 {
        let mut h = self.h;
        if self.tail_len > 0 {
            let mut k = 0u32;
            for (i, b) in self.tail[..self.tail_len].iter().enumerate() {
                k |= u32::from(*b) << (8 * i);
            }
            h ^= scramble(k);
        }
        // The reference implementation mixes in the length modulo 2^32.
        h ^= self.len as u32;
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn murmur(bytes: &[u8]) -> u32 {
        let mut h = Murmur3::new(0);
        h.write(bytes);
        h.finish()
    }

    /// Published MurmurHash3 x86_32 values (seed 0), as given by the reference
    /// implementation and Python's `mmh3.hash(..., signed=False)`.
    #[test]
    fn matches_reference_vectors() {
        let vectors: [(&str, u32); 8] = [
            ("", 0),
            ("a", 0x3c25_69b2),
            ("ab", 0x9bbf_d75f),
            ("abc", 0xb3dd_93fa),
            ("abcd", 0x43ed_676a),
            ("abcde", 0xe89b_9af6),
            ("hello", 0x248b_fa47),
            ("The quick brown fox jumps over the lazy dog", 0x2e4f_f723),
        ];
        for (input, want) in vectors {
            assert_eq!(murmur(input.as_bytes()), want, "murmur3({input:?})");
        }
    }

    #[test]
    fn incremental_writes_equal_one_write() {
        let text = b"career-selection-ai-v2:user-123 and some more bytes";
        let whole = murmur(text);
        for a in 0..text.len() {
            for b in a..text.len() {
                let mut h = Murmur3::new(0);
                h.write(&text[..a]);
                h.write(&text[a..b]);
                h.write(&text[b..]);
                assert_eq!(h.finish(), whole, "split at {a},{b}");
            }
        }
    }

    /// The published bucket vectors (also in docs/split.md): another
    /// implementation must produce exactly these.
    #[test]
    fn published_bucket_vectors() {
        assert_eq!(bucket("api", b"alice"), 897);
        assert_eq!(bucket("api", b"bob"), 9471);
        assert_eq!(bucket("api", b"user-123"), 7011);
        assert_eq!(bucket("career-selection-ai-v2", b"user-123"), 7817);
    }

    #[test]
    fn buckets_are_in_range_and_spread() {
        let mut counts = [0u32; 10];
        for i in 0..100_000 {
            let b = bucket("route", format!("user-{i}").as_bytes());
            assert!(b < BUCKETS);
            counts[(b / 1000) as usize] += 1;
        }
        for (decile, n) in counts.iter().enumerate() {
            assert!((9_000..=11_000).contains(n), "decile {decile} has {n}");
        }
    }
}
