//! Endpoint health as the data plane sees it: passive outlier ejection (an
//! endpoint failing `outlier.consecutive_failures` times in a row gets no
//! requests for a while) and the per-route retry budget.
//!
//! Health lives with the endpoint's connection pool, so it survives snapshot
//! rebuilds (a rollout's weight changes). Everything is atomics: a healthy
//! request reads one counter and writes nothing.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use switchyard_control::resilience::{OutlierConfig, RetriesConfig};

/// Milliseconds since the first use (a monotonic clock for ejections).
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One endpoint's outlier state.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    /// Failures in a row (connect, reset, timeout); a success clears it.
    consecutive: AtomicU32,
    /// Ejected, until `until_ms` (then it gets requests again, and one more
    /// run of failures ejects it for twice as long).
    ejected: AtomicBool,
    until_ms: AtomicU64,
    /// Ejections so far: each doubles the next one's length.
    ejections: AtomicU32,
}

impl EndpointHealth {
    /// Whether any ejection was ever recorded and not cleared: the fast
    /// path's one load.
    pub fn flagged(&self) -> bool {
        self.ejected.load(Relaxed)
    }

    /// Takes requests at `now`.
    pub fn available(&self, now: u64) -> bool {
        !self.ejected.load(Relaxed) || now >= self.until_ms.load(Relaxed)
    }

    /// A response came back: the run of failures ends, and an endpoint back
    /// from an ejection is healthy again.
    pub fn succeeded(&self) {
        if self.consecutive.load(Relaxed) != 0 {
            self.consecutive.store(0, Relaxed);
        }
        if self.ejected.load(Relaxed) {
            self.ejected.store(false, Relaxed);
        }
    }

    /// A connect failure, reset or timeout: the run's new length.
    fn failed(&self) -> u32 {
        self.consecutive.fetch_add(1, Relaxed) + 1
    }

    /// Ejects for `base × 2^ejections`, at most `max`; how long.
    fn eject(&self, now: u64, config: &OutlierConfig) -> Duration {
        let n = self.ejections.fetch_add(1, Relaxed).min(20);
        let length = config
            .base_ejection
            .0
            .saturating_mul(1 << n)
            .min(config.max_ejection.0);
        self.until_ms
            .store(now + length.as_millis() as u64, Relaxed);
        self.ejected.store(true, Relaxed);
        self.consecutive.store(0, Relaxed);
        length
    }
}

/// Counts a failed attempt on endpoint `index` of `endpoints` (all of one
/// backend, by their health), ejecting it after `consecutive_failures` in a
/// row unless that would take more than `max_ejection_percent` of the
/// backend's endpoints out while some of them still work. Returns the
/// ejection's length when it ejected.
pub fn report_failure(
    healths: &[&EndpointHealth],
    index: usize,
    config: &OutlierConfig,
) -> Option<Duration> {
    let health = healths.get(index)?;
    let run = health.failed();
    if config.consecutive_failures == 0 || run < config.consecutive_failures {
        return None;
    }
    let now = now_ms();
    if !health.available(now) {
        return None;
    }
    let out = healths.iter().filter(|h| !h.available(now)).count();
    let allowed = (healths.len() * config.max_ejection_percent as usize / 100).max(1);
    let all_failing = healths.iter().enumerate().all(|(i, h)| {
        i == index
            || !h.available(now)
            || h.consecutive.load(Relaxed) >= config.consecutive_failures
    });
    (out < allowed || all_failing).then(|| health.eject(now, config))
}

/// Bounds a route's retries to `budget_percent` of its requests over the
/// last 10 s (at least `min_per_second` a second), Linkerd/Envoy style.
#[derive(Debug, Default)]
pub struct RetryBudget {
    /// (second, retries in it) for the last 10 seconds.
    slots: [(AtomicU64, AtomicU64); 10],
}

impl RetryBudget {
    /// Takes one retry from the budget if it has one; `requests` is the
    /// route's requests over the last 10 s.
    pub fn withdraw(&self, requests: u64, config: &RetriesConfig) -> bool {
        let second = now_ms() / 1000;
        let spent: u64 = self
            .slots
            .iter()
            .filter(|(s, _)| {
                let s = s.load(Relaxed);
                s + 10 > second && s <= second
            })
            .map(|(_, n)| n.load(Relaxed))
            .sum();
        let allowed = (requests as f64 * config.budget_percent / 100.0) as u64;
        if spent >= allowed.max(u64::from(config.min_per_second) * 10) {
            return false;
        }
        let (s, n) = &self.slots[(second % 10) as usize];
        // A slot of an older second is taken over; a race here can lose a
        // count, which only makes the budget a little more generous.
        if s.swap(second, Relaxed) != second {
            n.store(0, Relaxed);
        }
        n.fetch_add(1, Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(threshold: u32, percent: u32) -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: threshold,
            max_ejection_percent: percent,
            ..OutlierConfig::default()
        }
    }

    #[test]
    fn an_endpoint_is_ejected_after_its_run_of_failures_and_readmitted_on_success() {
        let hs: Vec<EndpointHealth> = (0..4).map(|_| EndpointHealth::default()).collect();
        let refs: Vec<&EndpointHealth> = hs.iter().collect();
        let c = config(3, 50);
        assert_eq!(report_failure(&refs, 0, &c), None);
        assert_eq!(report_failure(&refs, 0, &c), None);
        let length = report_failure(&refs, 0, &c).expect("third failure ejects");
        assert_eq!(length, Duration::from_secs(10));
        assert!(!hs[0].available(now_ms()));
        assert!(
            hs[0].available(now_ms() + 10_001),
            "back after the ejection"
        );
        // Ejected again after it came back: twice as long.
        hs[0].until_ms.store(0, Relaxed);
        for _ in 0..2 {
            assert_eq!(report_failure(&refs, 0, &c), None);
        }
        assert_eq!(report_failure(&refs, 0, &c), Some(Duration::from_secs(20)));
        hs[0].succeeded();
        assert!(hs[0].available(now_ms()));
        assert!(!hs[0].flagged());
    }

    #[test]
    fn at_most_the_percentage_is_ejected_unless_all_fail() {
        let hs: Vec<EndpointHealth> = (0..2).map(|_| EndpointHealth::default()).collect();
        let refs: Vec<&EndpointHealth> = hs.iter().collect();
        let c = config(2, 50);
        report_failure(&refs, 0, &c);
        assert!(report_failure(&refs, 0, &c).is_some(), "1 of 2 is 50 %");
        // The second one fails once: not all failing, 50 % already out.
        assert!(report_failure(&refs, 1, &c).is_none());
        // Its run reaches the threshold: every endpoint fails, so it goes too.
        assert!(report_failure(&refs, 1, &c).is_some());
        assert!(!hs[1].available(now_ms()));
    }

    #[test]
    fn the_budget_allows_its_share_and_the_minimum() {
        let b = RetryBudget::default();
        let c = RetriesConfig {
            attempts: 2,
            budget_percent: 20.0,
            min_per_second: 1,
        };
        // 1,000 requests in 10 s: 200 retries.
        let taken = (0..500).filter(|_| b.withdraw(1000, &c)).count();
        assert_eq!(taken, 200);
        // No traffic: the minimum, 1/s over 10 s.
        let quiet = RetryBudget::default();
        assert_eq!((0..50).filter(|_| quiet.withdraw(0, &c)).count(), 10);
        let none = RetriesConfig {
            budget_percent: 0.0,
            min_per_second: 0,
            ..c
        };
        assert!(!RetryBudget::default().withdraw(1000, &none));
    }
}
