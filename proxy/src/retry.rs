//! Stage: send the request, and when the upstream cannot have acted on it,
//! send it again: to another endpoint of the same backend first, then to
//! the route's stable backend (`failover: stable`). Bounded by
//! `retries.attempts` per request and the route's retry budget; never after
//! any of a response reached the client (a response head ends it here).
//!
//! The canary is still judged: an attempt that failed on a backend counts
//! as that backend's upstream failure, and a request its users could only
//! get from the stable backend is recorded as the backend's failed request,
//! in its window and the rollout's analysis, while the user gets an answer.

use std::sync::Arc;

use http::request::Parts;
use http::{Response, StatusCode};
use switchyard_control::metrics::FailureReason;

use crate::forward::{Endpoint, PooledBody, SendError, UpstreamBody};
use crate::headers::Added;
use crate::pipeline::Shared;
use crate::record::Recording;
use crate::respond::ProxyError;
use crate::snapshot::{Route, Snapshot};

/// Where an attempt goes.
pub struct Target {
    pub route: usize,
    pub route_name: Arc<str>,
    pub backend: usize,
    pub endpoint: usize,
    pub via: Endpoint,
    /// Chosen by the forced-backend header: never fails over.
    pub forced: bool,
}

/// Sends until a response head arrives or nothing more may be tried;
/// returns the outcome and the recording to finish with it (the stable
/// backend's, after a failover).
pub async fn send(
    shared: &Shared,
    parts: &mut Parts,
    added: &Added,
    mut body: UpstreamBody,
    upgrade: bool,
    mut target: Target,
    mut recording: Recording,
) -> (Result<Response<PooledBody>, ProxyError>, Recording) {
    let mut tried = bit(target.endpoint);
    let mut retries = 0;
    loop {
        let sent = shared
            .upstreams
            .send(&target.via, parts, added, body, upgrade)
            .await;
        let (error, returned) = match sent {
            Ok(resp) => {
                target.via.health().succeeded();
                return (Ok(resp), recording);
            }
            Err(SendError::Sent(e)) => (e, None),
            Err(SendError::Unsent(e, b)) => (e, Some(b)),
        };
        let snapshot = shared.snapshot.load_full();
        let Some(route) = snapshot
            .routes
            .get(target.route)
            .filter(|r| r.name == target.route_name)
        else {
            return (Err(error), recording);
        };
        let reason = error.failure_reason();
        if counts_against_endpoint(&error) {
            if let Some(backend) = route.backends.get(target.backend) {
                backend.report_failure(target.endpoint, &route.name, &snapshot.outlier);
            }
        }
        let (Some(returned), Some(reason)) = (returned, reason) else {
            return (Err(error), recording);
        };
        if retries >= snapshot.retries.attempts || !withdraw(&snapshot, route) {
            return (Err(error), recording);
        }
        retries += 1;
        let backend = &route.backends[target.backend];
        if let Some((index, via)) = backend.pick_except(tried, true) {
            if let Some(stats) = &backend.stats {
                stats.attempt_failed(reason, true);
            }
            tracing::debug!(error = %error, backend = %backend.name, "retrying on another endpoint");
            tried |= bit(index);
            target.endpoint = index;
            target.via = via.clone();
            body = returned;
            continue;
        }
        match failover(route, &target) {
            Some((stable, index, via)) => {
                if let Some(stats) = &backend.stats {
                    stats.failed_over(reason);
                }
                // The backend's failure, in its window and analysis.
                recording = recording.fail_over(
                    error.status(),
                    reason,
                    route.backends[stable].stats.as_ref(),
                );
                tracing::debug!(error = %error, from = %backend.name, to = %route.backends[stable].name, "failing over");
                tried = bit(index);
                target.backend = stable;
                target.endpoint = index;
                target.via = via.clone();
                body = returned;
            }
            None => return (Err(error), recording),
        }
    }
}

/// The first target of a request to backend `backend` of `route`: a
/// healthy endpoint of it; when every one is ejected, the stable backend
/// (counting the request as the backend's failure); when that is not
/// allowed either, an ejected endpoint anyway (better a likely failure than
/// a certain one).
pub fn first(
    snapshot: &Snapshot,
    route_index: usize,
    backend: usize,
    forced: bool,
) -> Result<(Target, Recording), ProxyError> {
    let route = &snapshot.routes[route_index];
    let chosen = &route.backends[backend];
    let target = |backend: usize, (endpoint, via): (usize, &Endpoint)| Target {
        route: route_index,
        route_name: route.name.clone(),
        backend,
        endpoint,
        via: via.clone(),
        forced,
    };
    if let Some(picked) = chosen.pick() {
        return Ok((
            target(backend, picked),
            Recording::start(chosen.stats.as_ref()),
        ));
    }
    let Some(any) = chosen.pick_except(0, false) else {
        Recording::start(chosen.stats.as_ref()).finish(
            StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NoEndpoint.failure_reason(),
        );
        return Err(ProxyError::NoEndpoint);
    };
    let provisional = target(backend, any);
    if let Some((stable, index, via)) = failover(route, &provisional) {
        if let Some(stats) = &chosen.stats {
            stats.failed_over(FailureReason::Ejected);
        }
        Recording::start(chosen.stats.as_ref()).finish(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(FailureReason::Ejected),
        );
        return Ok((
            target(stable, (index, via)),
            Recording::start(route.backends[stable].stats.as_ref()),
        ));
    }
    Ok((provisional, Recording::start(chosen.stats.as_ref())))
}

/// The stable backend and one of its healthy endpoints, if `target` may
/// fail over there.
fn failover<'r>(route: &'r Route, target: &Target) -> Option<(usize, usize, &'r Endpoint)> {
    if target.forced {
        return None;
    }
    let stable = route.failover_to.filter(|&s| s != target.backend)?;
    let (index, via) = route.backends[stable].pick()?;
    Some((stable, index, via))
}

/// Failures that say something about the endpoint (not the client's).
fn counts_against_endpoint(error: &ProxyError) -> bool {
    matches!(
        error,
        ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamConnectTimeout
            | ProxyError::UpstreamTimeout
            | ProxyError::UpstreamReset(_)
    )
}

/// One retry from the route's budget, against its requests of the last
/// 10 s.
fn withdraw(snapshot: &Snapshot, route: &Route) -> bool {
    let requests: u64 = route
        .backends
        .iter()
        .filter_map(|b| b.stats.as_ref())
        .map(|s| s.requests_over(std::time::Duration::from_secs(10)))
        .sum();
    route.budget.withdraw(requests, &snapshot.retries)
}

fn bit(index: usize) -> u64 {
    if index < 64 {
        1 << index
    } else {
        0
    }
}
