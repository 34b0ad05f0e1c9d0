//! Runs the rollouts, of routes and of flags alike: every
//! `analysis.interval`, each progressing rollout's judged window (the
//! route's target, the flag's on cohort) is compared with its baseline (the
//! stable backend, the off cohort), and the store applies the decision
//! (hold, next step, promotion, rollback, pause).
//!
//! In fleet mode only the replica that leads a rollout drives it, on the
//! windows of every replica merged (`fleet::Fleet::merged_windows`); the
//! others follow its decisions through the shared state. Without etcd there
//! is no leader and no merged data: the rollout holds its step.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::metrics::Metrics;
use crate::rollout::{analyze, decide, Decision, Phase, RolloutState};
use crate::store::{RolloutOutcome, Store, StoreError, Subject};
use crate::window::WindowStats;

/// How often the driver looks for analyses that are due; the bound on how
/// late one can run.
const TICK: Duration = Duration::from_millis(100);

/// Drives every rollout, of routes and of flags, until `shutdown` resolves.
pub async fn run(store: Arc<Store>, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When each rollout was last analyzed (or first seen running).
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
            drive(&store, &metrics, &mut last, route, state).await;
        }
        for (flag, state) in view.flag_rollouts.iter() {
            drive(&store, &metrics, &mut last, flag, state).await;
        }
    }
}

/// One rollout's turn of the driver: its analysis when one is due (and
/// this replica leads it), and the decision applied. `last`: when each
/// rollout (by its leadership's name) was last analyzed or first seen.
async fn drive<P: Subject>(
    store: &Store,
    metrics: &Metrics,
    last: &mut HashMap<String, Instant>,
    name: &str,
    state: &RolloutState<P>,
) {
    let kind = P::KIND;
    let id = kind.leader(name);
    let step = match state.phase {
        Phase::RolledBack | Phase::Aborted => -1,
        _ => state.step as i64,
    };
    metrics.set_rollout_step(kind, name, step);
    if state.phase != Phase::Progressing {
        last.remove(&id);
        if let Some(fleet) = store.fleet() {
            fleet.resign(&id).await;
        }
        return;
    }
    if let Some(fleet) = store.fleet() {
        if !fleet.lead(&id).await {
            last.remove(&id);
            return;
        }
    }
    let spec = state.spec.analysis();
    let now = Instant::now();
    let Some(previous) = last.get(&id).copied() else {
        // The first analysis comes one interval after the rollout is first
        // seen running (start, resume, or process start).
        last.insert(id, now);
        return;
    };
    if now.duration_since(previous) < spec.interval.0 {
        return;
    }
    last.insert(id, now);
    let Some((baseline, judged)) = windows(store, metrics, name, state).await else {
        return;
    };
    let analysis = analyze(kind, spec, &baseline, &judged);
    for c in &analysis.checks {
        metrics.analysis_check(kind, name, &c.check, c.verdict.label());
    }
    // Ask the gate only when this analysis would move to the next step.
    let mut preview = state.clone();
    let gate = if decide(&mut preview, analysis.clone()) == Decision::Advance {
        state
            .spec
            .webhooks()
            .gate(&event_payload("gate", name, state))
            .await
    } else {
        Ok(())
    };
    let outcome = store.rollout_analyzed::<P>(name, analysis, gate).await;
    let noun = kind.noun();
    let event = match &outcome {
        Ok(RolloutOutcome::RolledBack(reason)) => {
            metrics.rolled_back(kind, name);
            tracing::warn!(kind = noun, name, reason = %reason, "rolled back");
            Some("rollback")
        }
        Ok(RolloutOutcome::Advanced(step)) => {
            tracing::info!(kind = noun, name, step, "rollout step");
            Some("step")
        }
        Ok(RolloutOutcome::Promoted) => {
            tracing::info!(kind = noun, name, "rollout promoted");
            Some("promote")
        }
        Ok(RolloutOutcome::Paused) => {
            tracing::warn!(kind = noun, name, "rollout paused: inconclusive too long");
            Some("pause")
        }
        Ok(RolloutOutcome::Stayed | RolloutOutcome::NotRunning) | Err(StoreError::Conflict(_)) => {
            None
        }
        Err(e) => {
            tracing::error!(kind = noun, name, error = %e, "rollout analysis could not be applied");
            None
        }
    };
    if let (Some(event), Some(now)) = (event, P::in_view(&store.view()).get(name)) {
        now.spec.webhooks().notify(event_payload(event, name, now));
    }
}

/// The two windows a rollout of `name` is judged on (baseline, judged):
/// this replica's, or in fleet mode every replica's merged; `None` when the
/// fleet's windows cannot be read (the step holds).
async fn windows<P: Subject>(
    store: &Store,
    metrics: &Metrics,
    name: &str,
    state: &RolloutState<P>,
) -> Option<(WindowStats, WindowStats)> {
    let span = state.analysis_span(std::time::SystemTime::now());
    let local = state.spec.local(metrics, name, span);
    let Some(fleet) = store.fleet() else {
        let [baseline, judged] = local.map(|h| h.stats());
        return Some((baseline, judged));
    };
    match fleet
        .merged_windows(local.into(), |w| state.spec.published(w, name).into(), span)
        .await
    {
        Ok((merged, replicas)) => {
            tracing::debug!(name, replicas, "judging the fleet's merged windows");
            Some((merged[0].stats(), merged[1].stats()))
        }
        Err(e) => {
            tracing::warn!(name, error = %e, "fleet windows unreadable; the rollout holds");
            None
        }
    }
}

/// The JSON a webhook receives: which event, what is rolled out (the
/// route and its backends, or the flag), where the rollout is, and why.
pub fn event_payload<P: Subject>(event: &str, name: &str, state: &RolloutState<P>) -> Value {
    let mut payload = P::describe(name, state);
    payload.insert("event".into(), json!(event));
    payload.insert("phase".into(), json!(state.phase));
    payload.insert("step".into(), json!(state.step));
    payload.insert("reason".into(), json!(state.reason));
    payload.insert("analysis".into(), json!(state.last_analysis));
    Value::Object(payload)
}
