//! Rolling windows of golden signals per (route, backend): request and error
//! counts and a latency histogram for each second of the last N seconds. The
//! automatic rollback judges from these.
//!
//! Recording is a handful of relaxed atomic adds: no lock, no allocation.
//! A slot is cleared lazily by the first recorder of a new second: it claims
//! the slot with a compare-and-swap on the slot's epoch, clears it, then
//! publishes the new second. Another thread recording into that second
//! meanwhile waits the few hundred stores the clear takes, so no sample is
//! lost to the reset.
//!
//! Latency histogram: log-linear over microseconds. Values below 32 µs have
//! one bucket each; above, every power of two is split into 16 equal buckets,
//! so a bucket is at most 1/16 (6.25 %) of its lower bound wide. Quantiles are
//! reported as the bucket's midpoint: within ±3.2 % of the true sample
//! (±0.5 µs below 32 µs). Values above ~134 s land in the last bucket.

use std::sync::atomic::{
    AtomicU32, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::{Duration, Instant};

/// Sub-buckets per power of two above the linear range.
const SUB: u64 = 16;
const SUB_BITS: u32 = 4;
/// Largest recorded value, in µs (2^27 ≈ 134 s); larger values are clamped.
const MAX_MICROS: u64 = (1 << 27) - 1;
/// Bucket count: 32 linear, then 16 per power of two from 2^5 to 2^26.
pub const LATENCY_BUCKETS: usize = bucket_index(MAX_MICROS) + 1;

const fn bucket_index(micros: u64) -> usize {
    let v = if micros > MAX_MICROS {
        MAX_MICROS
    } else {
        micros
    };
    if v < 2 * SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = (v >> shift) - SUB;
    (2 * SUB + (shift as u64 - 1) * SUB + sub) as usize
}

/// The inclusive lower and exclusive upper bound (µs) of bucket `index`.
fn bucket_bounds(index: usize) -> (u64, u64) {
    let i = index as u64;
    if i < 2 * SUB {
        return (i, i + 1);
    }
    let shift = (i - 2 * SUB) / SUB + 1;
    let sub = (i - 2 * SUB) % SUB;
    let low = (SUB + sub) << shift;
    (low, low + (1 << shift))
}

/// The epoch of a slot never used.
const UNUSED: u64 = u64::MAX;
/// The epoch of a slot being cleared for a new second.
const CLEARING: u64 = u64::MAX - 1;

/// One second of samples.
struct Slot {
    /// The second (since the window's origin) these counts belong to.
    epoch: AtomicU64,
    requests: AtomicU64,
    /// Responses by status class, 1xx to 5xx (a request the client left
    /// before its response counts in `requests` only).
    classes: [AtomicU64; 5],
    latency: Box<[AtomicU32]>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            epoch: AtomicU64::new(UNUSED),
            requests: AtomicU64::new(0),
            classes: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: (0..LATENCY_BUCKETS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn clear(&self) {
        self.requests.store(0, Relaxed);
        for c in &self.classes {
            c.store(0, Relaxed);
        }
        for b in self.latency.iter() {
            b.store(0, Relaxed);
        }
    }
}

/// A ring of one-second slots covering the last `len` seconds.
pub struct RollingWindow {
    origin: Instant,
    slots: Box<[Slot]>,
}

/// A request's second, status class and latency bucket (`RollingWindow::sample`).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    sec: u64,
    /// `sec`'s slot (windows with one span share it).
    slot: usize,
    class: Option<usize>,
    bucket: usize,
}

/// What a window holds over some span, read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowStats {
    /// The span read.
    pub span: Duration,
    pub requests: u64,
    /// 5xx responses, including the proxy's own 502/503/504.
    pub errors: u64,
    /// p50, p95, p99 latency; `None` without samples.
    pub p50: Option<Duration>,
    pub p95: Option<Duration>,
    pub p99: Option<Duration>,
}

impl WindowStats {
    /// Errors as a percentage of requests (0 without requests).
    pub fn error_rate_percent(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 * 100.0 / self.requests as f64
        }
    }
}

impl RollingWindow {
    /// A window over the last `span`, in whole seconds (at least 1).
    pub fn new(span: Duration, origin: Instant) -> RollingWindow {
        let len = span.as_secs().max(1) as usize;
        RollingWindow {
            origin,
            slots: (0..len).map(|_| Slot::new()).collect(),
        }
    }

    pub fn span(&self) -> Duration {
        Duration::from_secs(self.slots.len() as u64)
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_secs()
    }

    /// Records one finished request at `at`, answered with `status` (`None`:
    /// the client left before the response).
    pub fn record(&self, at: Instant, latency: Duration, status: Option<u16>) {
        self.record_sample(&self.sample(at, latency, status));
    }

    /// Where a request lands in this window (and in every window with the
    /// same origin and span): worked out once, recorded in several (a
    /// request in many flags' cohorts).
    pub fn sample(&self, at: Instant, latency: Duration, status: Option<u16>) -> Sample {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let sec = self.second(at);
        Sample {
            sec,
            slot: (sec % self.slots.len() as u64) as usize,
            class: status.map(status_class),
            bucket: bucket_index(micros),
        }
    }

    /// Records a request worked out by `sample` (by this window, or by one
    /// with the same origin and span). The slot is almost always already
    /// this second's: that path is a load and three additions, inlined.
    #[inline]
    pub fn record_sample(&self, sample: &Sample) {
        let slot = &self.slots[sample.slot];
        if slot.epoch.load(Acquire) != sample.sec && !self.claim(slot, sample.sec) {
            return;
        }
        slot.requests.fetch_add(1, Relaxed);
        if let Some(class) = sample.class {
            slot.classes[class].fetch_add(1, Relaxed);
        }
        slot.latency[sample.bucket].fetch_add(1, Relaxed);
    }

    /// Makes `slot` second `sec`'s, clearing an older second's counts;
    /// `false` when a newer second already owns it (the sample is older
    /// than the window's resolution allows keeping).
    #[cold]
    #[inline(never)]
    fn claim(&self, slot: &Slot, sec: u64) -> bool {
        let mut spins = 0u32;
        loop {
            match slot.epoch.load(Acquire) {
                seen if seen == sec => return true,
                CLEARING => {
                    // Another thread is clearing the slot, for this second
                    // or a newer one: wait for it to publish which.
                    spins += 1;
                    if spins.is_multiple_of(64) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                seen if seen != UNUSED && seen > sec => return false,
                seen => {
                    if slot
                        .epoch
                        .compare_exchange(seen, CLEARING, Acquire, Relaxed)
                        .is_ok()
                    {
                        slot.clear();
                        // Release: whoever sees the new second sees the
                        // clear before its own adds.
                        slot.epoch.store(sec, Release);
                        return true;
                    }
                }
            }
        }
    }

    /// The whole window, read at `at`.
    pub fn stats(&self, at: Instant) -> WindowStats {
        self.stats_over(at, self.span())
    }

    /// The last `span` (whole seconds, capped at the window) read at `at`:
    /// the current second and the `span - 1` before it.
    pub fn stats_over(&self, at: Instant, span: Duration) -> WindowStats {
        self.histogram_over(at, span).stats()
    }

    /// The requests of the last `span` only (cheaper than `histogram_over`).
    pub fn requests_over(&self, at: Instant, span: Duration) -> u64 {
        let now = self.second(at);
        let len = (span.as_secs().max(1) as usize).min(self.slots.len()) as u64;
        let oldest = now.saturating_sub(len - 1);
        self.slots
            .iter()
            .filter(|slot| {
                let epoch = slot.epoch.load(Acquire);
                epoch >= oldest && epoch <= now
            })
            .map(|slot| slot.requests.load(Relaxed))
            .sum()
    }

    /// The counts behind `stats_over`, mergeable with other replicas'.
    pub fn histogram_over(&self, at: Instant, span: Duration) -> Histogram {
        let now = self.second(at);
        let len = (span.as_secs().max(1) as usize).min(self.slots.len()) as u64;
        let oldest = now.saturating_sub(len - 1);
        let mut out = Histogram::empty(Duration::from_secs(len));
        for slot in self.slots.iter() {
            // `UNUSED` and `CLEARING` are above any second.
            let epoch = slot.epoch.load(Acquire);
            if epoch < oldest || epoch > now {
                continue;
            }
            out.requests += slot.requests.load(Relaxed);
            for (sum, c) in out.classes.iter_mut().zip(&slot.classes) {
                *sum += c.load(Relaxed);
            }
            for (sum, b) in out.latency.iter_mut().zip(slot.latency.iter()) {
                *sum += u64::from(b.load(Relaxed));
            }
        }
        out
    }
}

/// Request and error counts and the latency histogram over a span: what a
/// window holds, in a form that sums across replicas (fleet mode: the
/// rollout's leader merges every replica's and judges the total).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub span: Duration,
    pub requests: u64,
    /// Responses by status class, 1xx to 5xx; 5xx are the errors.
    pub classes: [u64; 5],
    /// Counts per latency bucket, `LATENCY_BUCKETS` long.
    pub latency: Vec<u64>,
}

impl Histogram {
    pub fn empty(span: Duration) -> Histogram {
        Histogram {
            span,
            requests: 0,
            classes: [0; 5],
            latency: vec![0; LATENCY_BUCKETS],
        }
    }

    /// Adds `other`'s counts (the span stays this one's).
    pub fn merge(&mut self, other: &Histogram) {
        self.requests += other.requests;
        for (sum, n) in self.classes.iter_mut().zip(&other.classes) {
            *sum += n;
        }
        for (sum, n) in self.latency.iter_mut().zip(&other.latency) {
            *sum += n;
        }
    }

    /// The non-zero latency buckets as (index, count), for the wire.
    pub fn sparse(&self) -> Vec<(u32, u64)> {
        self.latency
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i as u32, *n))
            .collect()
    }

    /// From the wire: bucket indexes out of range are refused.
    pub fn from_sparse(
        span: Duration,
        requests: u64,
        classes: [u64; 5],
        buckets: &[(u32, u64)],
    ) -> Option<Histogram> {
        let mut out = Histogram::empty(span);
        out.requests = requests;
        out.classes = classes.map(|n| n.min(requests));
        for (i, n) in buckets {
            *out.latency.get_mut(*i as usize)? += n;
        }
        Some(out)
    }

    /// 5xx responses, including the proxy's own 502/503/504.
    pub fn errors(&self) -> u64 {
        self.classes[4]
    }

    pub fn stats(&self) -> WindowStats {
        let quantile = |q: f64| quantile(&self.latency, q);
        WindowStats {
            span: self.span,
            requests: self.requests,
            errors: self.errors(),
            p50: quantile(0.50),
            p95: quantile(0.95),
            p99: quantile(0.99),
        }
    }
}

/// The index of `status`'s class in `classes`: 1xx is 0, 5xx is 4 (out of
/// range statuses clamp to the nearest class).
pub fn status_class(status: u16) -> usize {
    usize::from((status / 100).clamp(1, 5) - 1)
}

/// The `q` quantile of a bucketed distribution, as its bucket's midpoint.
fn quantile(buckets: &[u64], q: f64) -> Option<Duration> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the sample at quantile q (1-based, nearest-rank method).
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (index, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let (low, high) = bucket_bounds(index);
            let mid_nanos = (low * 1000 + high * 1000) / 2;
            return Some(Duration::from_nanos(mid_nanos));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_narrow() {
        let mut expected = 0;
        for v in 0..=200_000u64 {
            let i = bucket_index(v);
            assert!(i == expected || i == expected + 1, "gap at {v}");
            expected = i;
            let (low, high) = bucket_bounds(i);
            assert!(
                low <= v && v < high,
                "{v} outside bucket {i} [{low}, {high})"
            );
            if v >= 32 {
                assert!((high - low) * 16 <= low, "bucket {i} too wide at {v}");
            }
        }
        assert_eq!(bucket_index(u64::MAX), LATENCY_BUCKETS - 1);
        assert_eq!(LATENCY_BUCKETS, 384);
    }

    #[test]
    fn quantiles_within_documented_resolution() {
        let origin = Instant::now();
        let w = RollingWindow::new(Duration::from_secs(60), origin);
        let at = origin + Duration::from_secs(5);
        // 90 % at 10 ms, 10 % at 200 ms.
        for i in 0..1000 {
            let ms = if i % 10 == 0 { 200 } else { 10 };
            w.record(
                at,
                Duration::from_millis(ms),
                Some(if i % 50 == 0 { 500 } else { 200 }),
            );
        }
        let s = w.stats(at);
        assert_eq!(s.requests, 1000);
        assert_eq!(s.errors, 20);
        assert!((s.error_rate_percent() - 2.0).abs() < 1e-9);
        let within = |got: Option<Duration>, want_ms: f64| {
            let got = got.unwrap().as_secs_f64() * 1000.0;
            assert!(
                (got - want_ms).abs() <= want_ms * 0.032,
                "{got} ms vs {want_ms} ms"
            );
        };
        within(s.p50, 10.0);
        within(s.p95, 200.0);
        within(s.p99, 200.0);
    }

    #[test]
    fn merged_histograms_judge_the_total() {
        let origin = Instant::now();
        let at = origin + Duration::from_secs(3);
        let (a, b) = (
            RollingWindow::new(Duration::from_secs(30), origin),
            RollingWindow::new(Duration::from_secs(30), origin),
        );
        // Replica a: 95 fast requests; replica b: 5 slow ones, all errors.
        for _ in 0..95 {
            a.record(at, Duration::from_millis(2), Some(200));
        }
        for _ in 0..5 {
            b.record(at, Duration::from_millis(900), Some(503));
        }
        let mut merged = a.histogram_over(at, Duration::from_secs(30));
        let wire = b.histogram_over(at, Duration::from_secs(30));
        let wire =
            Histogram::from_sparse(wire.span, wire.requests, wire.classes, &wire.sparse()).unwrap();
        merged.merge(&wire);
        let s = merged.stats();
        assert_eq!((s.requests, s.errors), (100, 5));
        assert!((s.error_rate_percent() - 5.0).abs() < 1e-9);
        // The 95th sample is fast, the 96th slow: p95 is fast, p99 slow.
        assert!(s.p95.unwrap() < Duration::from_millis(3));
        assert!(s.p99.unwrap() > Duration::from_millis(800));
        assert_eq!(merged.classes, [0, 95, 0, 0, 5]);
        assert!(
            Histogram::from_sparse(s.span, 1, [0; 5], &[(LATENCY_BUCKETS as u32, 1)]).is_none()
        );
    }

    #[test]
    fn old_traffic_stops_counting() {
        let origin = Instant::now();
        let w = RollingWindow::new(Duration::from_secs(10), origin);
        let t0 = origin + Duration::from_secs(100);
        for _ in 0..50 {
            w.record(t0, Duration::from_millis(1), Some(500));
        }
        w.record(
            t0 + Duration::from_secs(4),
            Duration::from_millis(1),
            Some(200),
        );
        assert_eq!(w.stats(t0 + Duration::from_secs(9)).requests, 51);
        // Ten seconds on, t0's second has left the window; the later sample stays.
        let later = w.stats(t0 + Duration::from_secs(10));
        assert_eq!((later.requests, later.errors), (1, 0));
        assert_eq!(w.stats(t0 + Duration::from_secs(14)).requests, 0);
        assert_eq!(w.stats(t0 + Duration::from_secs(14)).p95, None);
        // A narrower read sees only the recent seconds.
        assert_eq!(
            w.stats_over(t0 + Duration::from_secs(5), Duration::from_secs(2))
                .requests,
            1
        );
    }

    #[test]
    fn a_reused_slot_starts_clean() {
        let origin = Instant::now();
        let w = RollingWindow::new(Duration::from_secs(3), origin);
        w.record(origin, Duration::from_millis(500), Some(500));
        // Same slot index, three seconds later.
        let later = origin + Duration::from_secs(3);
        w.record(later, Duration::from_millis(1), Some(200));
        let s = w.stats(later);
        assert_eq!((s.requests, s.errors), (1, 0));
        assert!(s.p99.unwrap() < Duration::from_millis(2));
    }

    #[test]
    fn concurrent_recording_counts_every_sample_within_a_second() {
        let origin = Instant::now();
        let w = std::sync::Arc::new(RollingWindow::new(Duration::from_secs(60), origin));
        let at = origin + Duration::from_secs(1);
        w.record(at, Duration::from_millis(1), Some(200)); // the slot's reset happens here
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        w.record(at, Duration::from_millis(3), Some(200));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(w.stats(at).requests, 40_001);
    }

    /// Every second starts with all threads racing to be its first recorder,
    /// so one of them clears the slot while the others record into it.
    #[test]
    fn no_sample_is_lost_to_the_reset_of_a_new_second() {
        const THREADS: usize = 4;
        const SECONDS: u64 = 50;
        const PER_SECOND: u64 = 200;
        let origin = Instant::now();
        let w = std::sync::Arc::new(RollingWindow::new(Duration::from_secs(60), origin));
        let start = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (w, start) = (w.clone(), start.clone());
                std::thread::spawn(move || {
                    for second in 1..=SECONDS {
                        let at = origin + Duration::from_secs(second);
                        start.wait();
                        for _ in 0..PER_SECOND {
                            w.record(at, Duration::from_millis(3), Some(200));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let last = origin + Duration::from_secs(SECONDS);
        let stats = w.stats(last);
        assert_eq!(stats.requests, THREADS as u64 * SECONDS * PER_SECOND);
    }
}
