//! Stage: record the golden signals of a request to a backend — traffic,
//! errors, latency (to response headers), saturation (in flight). Handles
//! were resolved when the snapshot was built; this touches only atomics.

use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use switchyard_control::metrics::{BackendStats, FailureReason};

/// A request being measured. Finishing it records status and latency; dropping
/// it unfinished (the client went away) records a cancellation.
pub struct Recording {
    started: Option<(Arc<BackendStats>, Instant)>,
}

impl Recording {
    /// Starts measuring; with metrics disabled (`stats` is `None`) this is free.
    pub fn start(stats: Option<&Arc<BackendStats>>) -> Recording {
        Recording {
            started: stats.map(|s| (s.clone(), s.start())),
        }
    }

    /// The response headers are going out with `status`; `failure` says why
    /// the proxy itself answered, if it did.
    pub fn finish(mut self, status: StatusCode, failure: Option<FailureReason>) {
        if let Some((stats, started)) = self.started.take() {
            stats.finish(started, status.as_u16(), failure);
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some((stats, started)) = self.started.take() {
            stats.cancelled(started);
        }
    }
}
