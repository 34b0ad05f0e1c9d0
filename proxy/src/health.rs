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

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_control::config::Timeouts;
use switchyard_control::metrics::EndpointStates;
use switchyard_control::resilience::{HealthCheckConfig, OutlierConfig, RetriesConfig};
use switchyard_control::store::Store;

use crate::forward::Endpoint;
use crate::pipeline::Shared;

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
    /// Taken out by active health checks (`health_check:`) until they pass
    /// again.
    checked_out: AtomicBool,
}

impl EndpointHealth {
    /// Whether any ejection was ever recorded and not cleared: the fast
    /// path's one load.
    pub fn flagged(&self) -> bool {
        self.ejected.load(Relaxed) || self.checked_out.load(Relaxed)
    }

    /// Takes requests at `now`.
    pub fn available(&self, now: u64) -> bool {
        !self.checked_out.load(Relaxed)
            && (!self.ejected.load(Relaxed) || now >= self.until_ms.load(Relaxed))
    }

    /// What the admin API and the metrics say of it at `now`.
    pub fn state(&self, now: u64) -> EndpointState {
        if self.checked_out.load(Relaxed) {
            EndpointState::Unhealthy
        } else if !self.available(now) {
            EndpointState::Ejected
        } else {
            EndpointState::Healthy
        }
    }

    /// The active checks' verdict: `false` takes it out, `true` brings it
    /// back.
    pub fn set_checked(&self, healthy: bool) {
        self.checked_out.store(!healthy, Relaxed);
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

/// An endpoint as reported: `healthy`, `ejected` (passively, for a while)
/// or `unhealthy` (its active checks fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    Healthy,
    Ejected,
    Unhealthy,
}

impl EndpointState {
    pub fn label(self) -> &'static str {
        match self {
            EndpointState::Healthy => "healthy",
            EndpointState::Ejected => "ejected",
            EndpointState::Unhealthy => "unhealthy",
        }
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

// === the supervisor ===

/// How often endpoint states are published and checks reconciled.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);

/// Runs until the process ends: every second, starts the health checks the
/// current snapshot asks for (and stops those it no longer does), publishes
/// every endpoint's state (`switchyard_endpoint_healthy`, `/v1/state`), and
/// records each change of state in the log and the audit log.
pub async fn supervise(shared: Arc<Shared>, store: Arc<Store>, timeouts: Timeouts) {
    let mut checks = Checks::default();
    let mut last: EndpointStates = EndpointStates::new();
    // What the last round saw, flat: a round that finds the same snapshot
    // and the same states does nothing more (it runs every second, also
    // on a proxy busy with requests).
    let mut seen: Option<(Arc<crate::snapshot::Snapshot>, Vec<EndpointState>)> = None;
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = shared.snapshot.load_full();
        let now = now_ms();
        let flat: Vec<EndpointState> = snapshot
            .routes
            .iter()
            .flat_map(|r| r.backends.iter())
            .flat_map(|b| b.endpoints.iter())
            .map(|e| e.health().state(now))
            .collect();
        // (Held, the last snapshot's address cannot be reused by a new one.)
        if seen
            .as_ref()
            .is_some_and(|(s, f)| Arc::ptr_eq(s, &snapshot) && *f == flat)
        {
            continue;
        }
        seen = Some((snapshot.clone(), flat));
        let mut wanted = HashMap::new();
        let mut states = EndpointStates::new();
        for route in snapshot.routes.iter() {
            for backend in route.backends.iter() {
                let mut endpoints = std::collections::BTreeMap::new();
                for (endpoint, spec) in backend.endpoints.iter().zip(backend.specs.iter()) {
                    endpoints.insert(spec.to_string(), endpoint.health().state(now).label());
                    if let Some(hc) = &backend.health_check {
                        wanted.insert((spec.clone(), hc.clone()), endpoint.clone());
                    }
                }
                states.insert(
                    (route.name.to_string(), backend.name.to_string()),
                    endpoints,
                );
            }
        }
        checks.0.retain(|key, (task, endpoint)| {
            let keep = wanted.contains_key(key);
            if !keep {
                // No longer checked (so: no longer out by its checks).
                task.abort();
                endpoint.health().set_checked(true);
            }
            keep
        });
        for (key, endpoint) in wanted {
            checks.0.entry(key.clone()).or_insert_with(|| {
                let task = tokio::spawn(check(endpoint.clone(), key.0, key.1, timeouts.clone()));
                (task, endpoint)
            });
        }
        for ((route, backend), endpoints) in &states {
            for (endpoint, state) in endpoints {
                let before = last
                    .get(&(route.clone(), backend.clone()))
                    .and_then(|e| e.get(endpoint))
                    .copied()
                    .unwrap_or("healthy");
                if before != *state {
                    tracing::warn!(route = %route, backend = %backend, endpoint = %endpoint, from = before, to = state, "endpoint health changed");
                    store
                        .note(
                            "endpoint.health",
                            format!("routes/{route}/backends/{backend}/endpoints/{endpoint}"),
                            serde_json::json!(before),
                            serde_json::json!(state),
                        )
                        .await;
                }
            }
        }
        shared.metrics.set_endpoint_states(states.clone());
        last = states;
    }
}

/// The running checks, by endpoint and settings; stopped when the
/// supervisor is.
#[derive(Default)]
#[allow(clippy::type_complexity)]
struct Checks(HashMap<(Arc<str>, HealthCheckConfig), (tokio::task::JoinHandle<()>, Endpoint)>);

impl Drop for Checks {
    fn drop(&mut self) {
        for (task, _) in self.0.values() {
            task.abort();
        }
    }
}

/// Checks `endpoint` every `hc.interval`: `unhealthy_threshold` failures in
/// a row take it out of service, `healthy_threshold` passes bring it back.
async fn check(endpoint: Endpoint, spec: Arc<str>, hc: HealthCheckConfig, timeouts: Timeouts) {
    let mut tick = tokio::time::interval(hc.interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut healthy = true;
    loop {
        tick.tick().await;
        if endpoint.probe(&hc.path, hc.timeout.0, &timeouts).await {
            (passed, failed) = (passed.saturating_add(1), 0);
            if !healthy && passed >= hc.healthy_threshold {
                healthy = true;
                endpoint.health().set_checked(true);
                tracing::info!(endpoint = %spec, "health checks pass again");
            }
        } else {
            (passed, failed) = (0, failed.saturating_add(1));
            if healthy && failed >= hc.unhealthy_threshold {
                healthy = false;
                endpoint.health().set_checked(false);
                tracing::warn!(endpoint = %spec, path = %hc.path, "health checks fail: out of service");
            }
        }
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
