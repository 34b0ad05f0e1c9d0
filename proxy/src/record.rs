//! Stage: record the golden signals of a request to a backend — traffic,
//! errors, latency (to response headers), saturation (in flight) — and, for
//! each watched flag, in the flag's `on` or `off` cohort. Handles were
//! resolved when the snapshot was built; this touches only atomics.

use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use switchyard_control::metrics::{BackendStats, CohortSample, FailureReason};

use crate::snapshot::Watched;

/// A request being measured. Finishing it records status and latency; dropping
/// it unfinished (the client went away) records a cancellation.
pub struct Recording {
    started: Option<(Arc<BackendStats>, Instant)>,
    /// The watched flags this request counts in, if any.
    cohorts: Option<Cohorts>,
}

/// A request's place in the watched flags' cohorts.
struct Cohorts {
    /// The snapshot's watched flags (one reference count, no allocation).
    watched: Watched,
    /// Bit `i`: `watched[i]` was on for the user.
    on: u64,
    /// When the request began: a failover keeps it, so the cohort sees the
    /// whole wait.
    started: Instant,
}

impl Recording {
    /// Starts measuring; with metrics disabled (`stats` is `None`) this is free.
    pub fn start(stats: Option<&Arc<BackendStats>>) -> Recording {
        Recording {
            started: stats.map(|s| (s.clone(), s.start())),
            cohorts: None,
        }
    }

    /// Counts the request in the cohorts of `watched` (the snapshot's),
    /// by `on` (every flag's value, as evaluated).
    pub fn in_cohorts(&mut self, watched: &Watched, on: &[bool]) {
        let mut bits = 0u64;
        for (i, (flag, _)) in watched.iter().enumerate() {
            if on.get(*flag).copied().unwrap_or(false) {
                bits |= 1 << i;
            }
        }
        self.cohorts = Some(Cohorts {
            watched: watched.clone(),
            on: bits,
            started: self
                .started
                .as_ref()
                .map_or_else(Instant::now, |(_, at)| *at),
        });
    }

    /// The response headers are going out with `status`; `failure` says why
    /// the proxy itself answered, if it did.
    pub fn finish(mut self, status: StatusCode, failure: Option<FailureReason>) {
        if self.started.is_none() && self.cohorts.is_none() {
            return; // metrics off: nothing to read the clock for
        }
        // One clock read for the backend and the cohorts, and (unless the
        // request failed over) one latency and window sample.
        let now = Instant::now();
        let status = status.as_u16();
        let mut recorded = None;
        if let Some((stats, started)) = self.started.take() {
            recorded = stats
                .finish_at(now, started, status, failure)
                .map(|sampled| (started, sampled));
        }
        if let Some(cohorts) = self.cohorts.take() {
            // The client's failure says nothing of the flag either.
            if let (true, Some((_, first))) = (
                failure != Some(FailureReason::ClientBody),
                cohorts.watched.first(),
            ) {
                let sample = match recorded {
                    Some((started, (latency, window))) if started == cohorts.started => {
                        CohortSample::of(window, latency, status)
                    }
                    _ => first.sample(now, now.saturating_duration_since(cohorts.started), status),
                };
                for (i, (_, flag)) in cohorts.watched.iter().enumerate() {
                    flag.record(cohorts.on & (1 << i) != 0, &sample);
                }
            }
        }
    }

    /// The request failed on this backend with `status` and `reason` and
    /// goes on to `next` (failover): the backend's failure is recorded, the
    /// request's cohorts go with it.
    pub fn fail_over(
        mut self,
        status: StatusCode,
        reason: FailureReason,
        next: Option<&Arc<BackendStats>>,
    ) -> Recording {
        let cohorts = self.cohorts.take();
        self.finish(status, Some(reason));
        let mut next = Recording::start(next);
        next.cohorts = cohorts;
        next
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some((stats, started)) = self.started.take() {
            stats.cancelled(started);
        }
    }
}
