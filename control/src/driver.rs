//! Runs the rollouts: every `analysis.interval`, each progressing rollout's
//! target window is judged against its stable window, and the store applies
//! the decision (hold, next step, promotion, rollback, pause).
//!
//! In fleet mode only the replica that leads a rollout drives it, on the
//! windows of every replica merged (`fleet::Fleet::merged_windows`); the
//! others follow its decisions through the shared state. Without etcd there
//! is no leader and no merged data: the rollout holds its step.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::rollout::{analyze, decide, Decision, Phase, RolloutState};
use crate::store::{RolloutOutcome, Store, StoreError};
use crate::window::WindowStats;

/// How often the driver looks for analyses that are due; the bound on how
/// late one can run.
const TICK: Duration = Duration::from_millis(100);

/// Drives every route's rollout until `shutdown` resolves.
pub async fn run(store: Arc<Store>, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When each route's rollout was last analyzed (or first seen running).
    let mut last: HashMap<String, Instant> = HashMap::new();
    let mut persist_tried = Instant::now();
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        // Decisions applied while state_dir could not be written are
        // persisted once it can be (tried every second).
        if persist_tried.elapsed() >= Duration::from_secs(1) {
            persist_tried = Instant::now();
            store.retry_persist().await;
        }
        let (failures, unpersisted) = store.persistence();
        metrics.set_persistence(failures, unpersisted);
        let view = store.view();
        for (route, state) in view.rollouts.iter() {
            let step = match state.phase {
                Phase::RolledBack | Phase::Aborted => -1,
                _ => state.step as i64,
            };
            metrics.set_rollout_step(route, step);
            if state.phase != Phase::Progressing {
                last.remove(route);
                if let Some(fleet) = store.fleet() {
                    fleet.resign(route).await;
                }
                continue;
            }
            if let Some(fleet) = store.fleet() {
                if !fleet.lead(route).await {
                    last.remove(route);
                    continue;
                }
            }
            let spec = &state.spec.analysis;
            let now = Instant::now();
            let Some(previous) = last.get(route).copied() else {
                // The first analysis comes one interval after the rollout is
                // first seen running (start, resume, or process start).
                last.insert(route.clone(), now);
                continue;
            };
            if now.duration_since(previous) < spec.interval.0 {
                continue;
            }
            last.insert(route.clone(), now);
            let Some((stable, target)) = windows(&store, &metrics, route, state).await else {
                continue;
            };
            let analysis = analyze(spec, &stable, &target);
            for c in &analysis.checks {
                metrics.analysis_check(route, &c.check, c.verdict.label());
            }
            // Ask the gate only when this analysis would move to the next step.
            let mut preview = state.clone();
            let gate = if decide(&mut preview, analysis.clone()) == Decision::Advance {
                state
                    .spec
                    .webhooks
                    .gate(&event_payload("gate", route, state))
                    .await
            } else {
                Ok(())
            };
            let outcome = store.rollout_analyzed(route, analysis, gate).await;
            let event = match &outcome {
                Ok(RolloutOutcome::RolledBack(reason)) => {
                    metrics.rolled_back(route);
                    tracing::warn!(route = %route, reason = %reason, "rolled back");
                    Some("rollback")
                }
                Ok(RolloutOutcome::Advanced(step)) => {
                    tracing::info!(route = %route, step, "rollout step");
                    Some("step")
                }
                Ok(RolloutOutcome::Promoted) => {
                    tracing::info!(route = %route, "rollout promoted");
                    Some("promote")
                }
                Ok(RolloutOutcome::Paused) => {
                    tracing::warn!(route = %route, "rollout paused: inconclusive too long");
                    Some("pause")
                }
                Ok(RolloutOutcome::Stayed | RolloutOutcome::NotRunning)
                | Err(StoreError::Conflict(_)) => None,
                Err(e) => {
                    tracing::error!(route = %route, error = %e, "rollout analysis could not be applied");
                    None
                }
            };
            if let (Some(event), Some(now)) = (event, store.view().rollouts.get(route)) {
                now.spec.webhooks.notify(event_payload(event, route, now));
            }
        }
    }
}

/// The stable and target windows the rollout of `route` is judged on: this
/// replica's, or in fleet mode every replica's merged; `None` when the
/// fleet's windows cannot be read (the step holds).
async fn windows(
    store: &Store,
    metrics: &Metrics,
    route: &str,
    state: &RolloutState,
) -> Option<(WindowStats, WindowStats)> {
    let span = state.analysis_span(std::time::SystemTime::now());
    let (stable, target) = (&state.spec.stable, &state.spec.target);
    let Some(fleet) = store.fleet() else {
        return Some((
            metrics.backend_window(route, stable, span),
            metrics.backend_window(route, target, span),
        ));
    };
    match fleet
        .merged_windows(metrics, route, &[stable, target], span)
        .await
    {
        Ok((merged, replicas)) => {
            tracing::debug!(route, replicas, "judging the fleet's merged windows");
            Some((merged[0].stats(), merged[1].stats()))
        }
        Err(e) => {
            tracing::warn!(route, error = %e, "fleet windows unreadable; the rollout holds");
            None
        }
    }
}

/// The JSON a webhook receives: which event, which route, where the rollout
/// is, and why.
pub fn event_payload(event: &str, route: &str, state: &RolloutState) -> serde_json::Value {
    serde_json::json!({
        "event": event,
        "route": route,
        "stable": state.spec.stable,
        "target": state.spec.target,
        "phase": state.phase,
        "step": state.step,
        "target_weight": state.target_weight(),
        "reason": state.reason,
        "analysis": state.last_analysis,
    })
}
