//! Rollouts in the store: starting one, an operator's actions, and applying
//! an analysis's decision. One engine for both kinds: what differs between
//! a route's rollout and a flag's (where it lives in the state, what it
//! sets, what it is judged on) is the `Subject` each spec implements.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{
    find_flag, now_rfc3339, route_weights, Change, Commit, Next, Overrides, Store, StoreError,
    View, COMMIT_ATTEMPTS,
};
use crate::config::{Config, Dur, FlagMetric, Weight};
use crate::fleet::{Windows, WireWindow};
use crate::metrics::Metrics;
use crate::rollout::{
    decide, Analysis, Decision, FlagRolloutSpec, OnFailure, Phase, Plan, RolloutSpec, RolloutState,
    Strategy,
};
use crate::window::Histogram;

/// Why a subject's setting is being worked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// As the rollout's phase and step call for.
    Follow,
    /// The analysis failed `failure_threshold` times: as `Follow`, and a
    /// flag with `on_failure: kill` is turned off.
    Breach,
    /// Back to what the rollout found when it started.
    Undo,
}

/// What a rollout rolls out, as the store and the driver see it.
pub trait Subject: Plan {
    fn rollouts(overrides: &Overrides) -> &BTreeMap<String, RolloutState<Self>>;
    fn rollouts_mut(overrides: &mut Overrides) -> &mut BTreeMap<String, RolloutState<Self>>;
    fn in_view(view: &View) -> &BTreeMap<String, RolloutState<Self>>;
    /// Checks the spec against the subject `name` of `config` (404 when
    /// there is no such subject).
    fn check(&self, config: &Config, name: &str) -> Result<(), StoreError>;
    /// What the rollout finds when it starts (what `undo` restores).
    fn found(config: &Config, name: &str) -> Option<Self::Start>;
    /// The subject's setting as the audit records it.
    fn setting(config: &Config, name: &str) -> Map<String, Value>;
    /// Sets `overrides` as `state` calls for; returns the new setting.
    fn apply(
        config: &Config,
        name: &str,
        state: &RolloutState<Self>,
        how: Apply,
        overrides: &mut Overrides,
    ) -> Result<Map<String, Value>, StoreError>;
    /// Fills in what the spec leaves to the subject's state (before it is
    /// checked).
    fn prepare(&mut self, _config: &Config, _name: &str) {}
    /// The reason an operator's `rollback` records.
    fn rolled_back_by(state: &RolloutState<Self>, actor: &str) -> String;
    /// Blue-green, once promoted: the old colour, kept as standby.
    fn standby(_state: &RolloutState<Self>) -> Option<String> {
        None
    }
    /// The two sides' traffic on this replica over `span`: (baseline, judged).
    fn local(&self, metrics: &Metrics, name: &str, span: Duration) -> [Histogram; 2];
    /// The two sides in another replica's publication, where it has them.
    fn published<'w>(&self, windows: &'w Windows, name: &str) -> [Option<&'w WireWindow>; 2];
    /// What a webhook is told about the subject beyond the rollout's phase.
    fn describe(name: &str, state: &RolloutState<Self>) -> Map<String, Value>;
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("built as an object"),
    }
}

impl Subject for RolloutSpec {
    fn rollouts(overrides: &Overrides) -> &BTreeMap<String, RolloutState<Self>> {
        &overrides.rollouts
    }
    fn rollouts_mut(overrides: &mut Overrides) -> &mut BTreeMap<String, RolloutState<Self>> {
        &mut overrides.rollouts
    }
    fn in_view(view: &View) -> &BTreeMap<String, RolloutState<Self>> {
        &view.rollouts
    }
    fn check(&self, config: &Config, route: &str) -> Result<(), StoreError> {
        if !config.routes.iter().any(|r| r.name == route) {
            return Err(StoreError::NotFound(format!("no route named `{route}`")));
        }
        self.validate(config, route).map_err(StoreError::Invalid)
    }
    fn found(config: &Config, route: &str) -> Option<Self::Start> {
        config.route_weights(route).map(|weights| {
            weights
                .into_iter()
                .map(|(b, w)| (b.to_owned(), w))
                .collect()
        })
    }
    fn setting(config: &Config, route: &str) -> Map<String, Value> {
        object(json!({ "weights": route_weights(config, route) }))
    }
    fn apply(
        config: &Config,
        route: &str,
        state: &RolloutState<Self>,
        how: Apply,
        overrides: &mut Overrides,
    ) -> Result<Map<String, Value>, StoreError> {
        if !config.routes.iter().any(|r| r.name == route) {
            // The route left the configuration file mid-rollout: there are
            // no weights to set, and the rollout can still be ended.
            return Ok(Map::new());
        }
        let weights = match how {
            Apply::Undo => undo_weights(config, route, state)?,
            Apply::Follow | Apply::Breach => rollout_weights(config, route, state)?,
        };
        let setting = object(json!({ "weights": &weights }));
        overrides.weights.insert(route.to_owned(), weights);
        Ok(setting)
    }
    fn rolled_back_by(state: &RolloutState<Self>, actor: &str) -> String {
        format!("rolled back to {} by {actor}", state.spec.stable)
    }
    fn standby(state: &RolloutState<Self>) -> Option<String> {
        (state.phase == Phase::Promoted && state.spec.strategy == Strategy::BlueGreen)
            .then(|| state.spec.stable.clone())
    }
    fn local(&self, metrics: &Metrics, route: &str, span: Duration) -> [Histogram; 2] {
        [&self.stable, &self.target].map(|b| metrics.backend_histogram(route, b, span))
    }
    fn published<'w>(&self, windows: &'w Windows, route: &str) -> [Option<&'w WireWindow>; 2] {
        let backends = windows.routes.get(route);
        [&self.stable, &self.target].map(|b| backends.and_then(|w| w.get(b)))
    }
    fn describe(route: &str, state: &RolloutState<Self>) -> Map<String, Value> {
        object(json!({
            "route": route,
            "stable": state.spec.stable,
            "target": state.spec.target,
            "target_weight": state.target_weight(),
        }))
    }
}

impl Subject for FlagRolloutSpec {
    fn rollouts(overrides: &Overrides) -> &BTreeMap<String, RolloutState<Self>> {
        &overrides.flag_rollouts
    }
    fn rollouts_mut(overrides: &mut Overrides) -> &mut BTreeMap<String, RolloutState<Self>> {
        &mut overrides.flag_rollouts
    }
    fn in_view(view: &View) -> &BTreeMap<String, RolloutState<Self>> {
        &view.flag_rollouts
    }
    fn check(&self, config: &Config, name: &str) -> Result<(), StoreError> {
        if !find_flag(config, name)?.enabled {
            return Err(StoreError::Conflict(format!(
                "flag `{name}` is off for everyone (enabled: false): turn it on at its current percentage first"
            )));
        }
        self.validate(config, name).map_err(StoreError::Invalid)
    }
    /// Without steps, the default plan's above the flag's percentage (a
    /// flag at 3 % starts at 5 %).
    fn prepare(&mut self, config: &Config, name: &str) {
        let Ok(flag) = find_flag(config, name) else {
            return;
        };
        if self.steps.is_none() {
            self.steps = Some(
                crate::rollout::default_canary_steps()
                    .into_iter()
                    .filter(|s| s.weight > flag.rollout_percentage)
                    .map(|s| crate::rollout::FlagStep {
                        rollout_percentage: s.weight,
                        hold: s.hold,
                    })
                    .collect(),
            );
        }
    }
    fn found(config: &Config, name: &str) -> Option<Self::Start> {
        let flag = find_flag(config, name).ok()?;
        Some(crate::rollout::FlagStart {
            enabled: flag.enabled,
            rollout_percentage: flag.rollout_percentage,
        })
    }
    fn setting(config: &Config, name: &str) -> Map<String, Value> {
        match find_flag(config, name) {
            Ok(f) => {
                object(json!({ "enabled": f.enabled, "rollout_percentage": f.rollout_percentage }))
            }
            Err(_) => Map::new(),
        }
    }
    /// The flag's percentage follows the step; a revert goes back to the
    /// starting percentage, a kill turns the flag off. A flag watched by no
    /// signal is made to keep them all: the analysis needs its cohorts.
    fn apply(
        config: &Config,
        name: &str,
        state: &RolloutState<Self>,
        how: Apply,
        overrides: &mut Overrides,
    ) -> Result<Map<String, Value>, StoreError> {
        let mut flag = find_flag(config, name)?.clone();
        let start = state.before.ok_or_else(|| {
            StoreError::Conflict(format!(
                "the rollout of flag `{name}` has no starting percentage recorded"
            ))
        })?;
        match (how, state.phase) {
            (Apply::Undo, _) | (_, Phase::RolledBack | Phase::Aborted) => {
                flag.enabled = start.enabled;
                flag.rollout_percentage = start.rollout_percentage;
            }
            (Apply::Follow | Apply::Breach, _) => {
                flag.rollout_percentage = state.target_weight();
            }
        }
        if how == Apply::Breach && state.spec.on_failure == OnFailure::Kill {
            flag.enabled = false;
        }
        if flag.metrics.is_empty() {
            flag.metrics = vec![
                FlagMetric::Requests,
                FlagMetric::Errors,
                FlagMetric::Latency,
            ];
        }
        let setting = object(json!({
            "enabled": flag.enabled,
            "rollout_percentage": flag.rollout_percentage,
        }));
        overrides.flags.insert(name.to_owned(), Some(flag));
        Ok(setting)
    }
    fn rolled_back_by(state: &RolloutState<Self>, actor: &str) -> String {
        let start = state.before.map_or(0.0, |s| s.rollout_percentage.percent());
        format!("rolled back to {start} % by {actor}")
    }
    fn local(&self, metrics: &Metrics, name: &str, span: Duration) -> [Histogram; 2] {
        metrics
            .flag_histograms(name, span)
            .unwrap_or_else(|| [Histogram::empty(span), Histogram::empty(span)])
    }
    fn published<'w>(&self, windows: &'w Windows, name: &str) -> [Option<&'w WireWindow>; 2] {
        match windows.flags.get(name) {
            Some([off, on]) => [Some(off), Some(on)],
            None => [None, None],
        }
    }
    fn describe(name: &str, state: &RolloutState<Self>) -> Map<String, Value> {
        // What the flag is at: the step's, or once reverted (or aborted)
        // the percentage it started from.
        let percentage = match (state.phase, state.before) {
            (Phase::RolledBack | Phase::Aborted, Some(start)) => start.rollout_percentage,
            _ => state.target_weight(),
        };
        object(json!({
            "flag": name,
            "rollout_percentage": percentage,
            "on_failure": state.spec.on_failure,
        }))
    }
}

/// What an analysis did to a rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum RolloutOutcome {
    NotRunning,
    Stayed,
    Advanced(usize),
    Promoted,
    RolledBack(String),
    Paused,
}

/// `what` with the subject's setting after it, as one audit object.
fn with_setting(mut what: Map<String, Value>, setting: Map<String, Value>) -> Value {
    what.extend(setting);
    Value::Object(what)
}

impl Store {
    /// Starts a rollout of `name` at its first step.
    pub async fn start_rollout<P: Subject>(
        &self,
        actor: &str,
        if_match: Option<u64>,
        name: &str,
        spec: P,
    ) -> Result<Arc<View>, StoreError> {
        let kind = P::KIND;
        self.mutate(actor, if_match, |current, overrides| {
            if let Some(existing) = P::rollouts(overrides)
                .get(name)
                .filter(|r| r.phase.active())
            {
                return Err(StoreError::Conflict(format!(
                    "{} `{name}` already has a rollout ({:?}); abort or promote it first",
                    kind.noun(),
                    existing.phase
                )));
            }
            let mut spec = spec.clone();
            spec.prepare(current, name);
            spec.check(current, name)?;
            let before = Value::Object(P::setting(current, name));
            let mut state = RolloutState::new(spec, now_rfc3339());
            state.before = P::found(current, name);
            let setting = P::apply(current, name, &state, Apply::Follow, overrides)?;
            let after = with_setting(object(json!({ "rollout": &state })), setting);
            P::rollouts_mut(overrides).insert(name.to_owned(), state);
            Ok(Change {
                action: "rollout.start",
                target: kind.path(name),
                before,
                after,
            })
        })
        .await
    }

    /// An operator's `promote`, `pause`, `resume`, `abort`, `rollback`, or
    /// `undo` (an ended rollout: back to what it found when it started).
    pub async fn rollout_action<P: Subject>(
        &self,
        actor: &str,
        name: &str,
        action: &str,
    ) -> Result<Arc<View>, StoreError> {
        let kind = P::KIND;
        let actor_name = actor.to_owned();
        self.mutate(actor, None, |current, overrides| {
            let mut state = P::rollouts(overrides).get(name).cloned().ok_or_else(|| {
                StoreError::NotFound(format!("{} `{name}` has no rollout", kind.noun()))
            })?;
            let before = json!({ "phase": state.phase, "step": state.step });
            let conflict = |what: &str| {
                StoreError::Conflict(format!("cannot {what} a rollout that is {:?}", state.phase))
            };
            let (phase, action_name) = match (action, state.phase) {
                ("pause", Phase::Progressing) => (Phase::Paused, "rollout.pause"),
                ("resume", Phase::Paused) => (Phase::Progressing, "rollout.resume"),
                ("promote", p) if p.active() => (Phase::Promoted, "rollout.promote"),
                // Blue-green keeps the old colour as standby: back in one swap.
                ("rollback", Phase::Promoted) if state.standby.is_some() => {
                    (Phase::RolledBack, "rollout.rollback")
                }
                ("rollback", p) if p.active() => (Phase::RolledBack, "rollout.rollback"),
                ("abort", p) if p.active() => (Phase::Aborted, "rollout.abort"),
                ("undo", p) if !p.active() => (Phase::RolledBack, "rollout.undo"),
                ("undo", _) => {
                    return Err(StoreError::Conflict(format!(
                        "cannot undo a rollout that is {:?}: abort or roll it back",
                        state.phase
                    )))
                }
                ("pause" | "resume" | "promote" | "abort" | "rollback", _) => {
                    return Err(conflict(action))
                }
                _ => {
                    return Err(StoreError::NotFound(format!(
                        "no rollout action `{action}`"
                    )))
                }
            };
            let undo = action_name == "rollout.undo";
            state.phase = phase;
            state.inconclusive = Dur(Duration::ZERO);
            state.consecutive_failures = 0;
            state.reason = match phase {
                Phase::Aborted => Some(format!("aborted by {actor_name}")),
                Phase::Promoted => Some(format!("promoted by {actor_name}")),
                Phase::RolledBack if undo => Some(format!(
                    "undone by {actor_name}: back to the setting before the rollout"
                )),
                Phase::RolledBack => Some(P::rolled_back_by(&state, &actor_name)),
                _ => None,
            };
            state.standby = P::standby(&state);
            let how = if undo { Apply::Undo } else { Apply::Follow };
            let setting = P::apply(current, name, &state, how, overrides)?;
            let after = with_setting(
                object(json!({ "phase": state.phase, "step": state.step })),
                setting,
            );
            P::rollouts_mut(overrides).insert(name.to_owned(), state);
            Ok(Change {
                action: action_name,
                target: kind.path(name),
                before,
                after,
            })
        })
        .await
    }

    /// Applies one analysis of `name`'s progressing rollout. Progress within
    /// a step (held time, counters, the analysis) is persisted without a new
    /// version or an audit record; step changes, promotion, rollback and
    /// pause go through the audited write path.
    ///
    /// `gate` is the gate webhook's answer (asked by the driver when this
    /// analysis was expected to advance): an error holds the step.
    ///
    /// In fleet mode the result is committed only while this replica still
    /// leads the rollout (the transaction checks the leader key), so a
    /// replica that lost its lease cannot move a rollout another now drives.
    pub async fn rollout_analyzed<P: Subject>(
        &self,
        name: &str,
        analysis: Analysis,
        gate: Result<(), String>,
    ) -> Result<RolloutOutcome, StoreError> {
        let kind = P::KIND;
        let leader = kind.leader(name);
        let fence = self.fleet().map(|_| leader.as_str());
        let mut inner = self.write.lock().await;
        let Some(analyzed) = P::rollouts(&inner.overrides)
            .get(name)
            .filter(|r| r.phase == Phase::Progressing)
            .cloned()
        else {
            return Ok(RolloutOutcome::NotRunning);
        };
        let changed = || {
            StoreError::Conflict(format!(
                "the rollout of {} `{name}` changed during its analysis",
                kind.noun()
            ))
        };
        let mut state = analyzed.clone();
        let mut decision = decide(&mut state, analysis);
        if decision == Decision::Advance {
            match gate {
                Ok(()) => state.reason = None,
                Err(why) => {
                    state.reason = Some(format!("gate holds the step: {why}"));
                    decision = Decision::Stay;
                }
            }
        }
        if decision == Decision::Stay {
            // Progress is written without a version or an event. Another
            // write landing first (a flag, another rollout) only means
            // writing it again on the newer state; a change to this rollout
            // since it was analyzed means the analysis is void.
            for _ in 0..COMMIT_ATTEMPTS {
                let mut next = inner.overrides.clone();
                P::rollouts_mut(&mut next).insert(name.to_owned(), state.clone());
                let committed = self
                    .commit(
                        &inner,
                        Next {
                            overrides: &next,
                            version: inner.version,
                            next_seq: inner.next_seq,
                            event: None,
                            fence,
                            judged: true,
                        },
                    )
                    .await?;
                match committed {
                    Commit::Done(revision) => {
                        inner.overrides = next;
                        inner.revision = revision;
                        let effective = self.view().config.as_ref().clone();
                        self.swap(&inner, effective);
                        return Ok(RolloutOutcome::Stayed);
                    }
                    Commit::Moved(document, revision) => {
                        self.adopt_moved(&mut inner, document, revision);
                        match P::rollouts(&inner.overrides).get(name) {
                            // An earlier attempt landed after all.
                            Some(now) if *now == state => return Ok(RolloutOutcome::Stayed),
                            Some(now) if *now == analyzed => continue,
                            _ => break,
                        }
                    }
                }
            }
            return Err(changed());
        }
        drop(inner);
        let last_step = state.spec.steps().len() - 1;
        let (actor, action, how, outcome) = match &decision {
            Decision::Advance if state.step < last_step => {
                state.step += 1;
                state.held = Dur(Duration::ZERO);
                state.step_entered = now_rfc3339();
                (
                    "rollout",
                    "rollout.step",
                    Apply::Follow,
                    RolloutOutcome::Advanced(state.step),
                )
            }
            Decision::Advance => {
                state.phase = Phase::Promoted;
                state.reason = Some("every step held with passing analyses".into());
                state.standby = P::standby(&state);
                (
                    "rollout",
                    "rollout.promote",
                    Apply::Follow,
                    RolloutOutcome::Promoted,
                )
            }
            Decision::RollBack(reason) => {
                state.phase = Phase::RolledBack;
                state.reason = Some(reason.clone());
                (
                    "auto-rollback",
                    "rollout.rollback",
                    Apply::Breach,
                    RolloutOutcome::RolledBack(reason.clone()),
                )
            }
            Decision::Pause(reason) => {
                state.phase = Phase::Paused;
                state.reason = Some(reason.clone());
                (
                    "rollout",
                    "rollout.pause",
                    Apply::Follow,
                    RolloutOutcome::Paused,
                )
            }
            Decision::Stay => unreachable!("handled above"),
        };
        let decided = self
            .mutate_fenced(actor, None, fence, true, &mut |current, overrides| {
                // An operator may have paused, aborted, promoted or replaced
                // the rollout meanwhile: the decision holds only for the very
                // state it was made on.
                if P::rollouts(overrides).get(name) != Some(&analyzed) {
                    return Err(changed());
                }
                let before = with_setting(
                    object(json!({ "phase": Phase::Progressing })),
                    P::setting(current, name),
                );
                let setting = P::apply(current, name, &state, how, overrides)?;
                let after = with_setting(
                    object(json!({
                        "phase": state.phase, "step": state.step,
                        "reason": &state.reason, "analysis": &state.last_analysis,
                    })),
                    setting,
                );
                P::rollouts_mut(overrides).insert(name.to_owned(), state.clone());
                Ok(Change {
                    action,
                    target: kind.path(name),
                    before,
                    after,
                })
            })
            .await;
        match decided {
            Ok(_) => Ok(outcome),
            // An earlier attempt through another member landed after all
            // (and was recognised no more): the decision stands.
            Err(StoreError::Conflict(_)) if P::in_view(&self.view()).get(name) == Some(&state) => {
                Ok(outcome)
            }
            Err(e) => Err(e),
        }
    }
}

/// The weights `state` recorded when it started, if the route still has
/// exactly those backends.
fn undo_weights(
    config: &Config,
    route: &str,
    state: &RolloutState,
) -> Result<BTreeMap<String, Weight>, StoreError> {
    let Some(before) = &state.before else {
        return Err(StoreError::Conflict(
            "this rollout started before Switchyard recorded the weights to undo to; set the weights instead".into(),
        ));
    };
    let now: Vec<&str> = config
        .route_weights(route)
        .map(|w| w.into_keys().collect())
        .unwrap_or_default();
    if !now.iter().copied().eq(before.keys().map(String::as_str)) {
        return Err(StoreError::Conflict(format!(
            "the route's backends changed since the rollout started ({} then, {} now); set the weights instead",
            before.keys().cloned().collect::<Vec<_>>().join(", "),
            now.join(", ")
        )));
    }
    Ok(before.clone())
}

/// The route's weights with the rollout's target at its current weight: other
/// backends keep theirs, the stable backend takes the rest.
fn rollout_weights(
    config: &Config,
    route: &str,
    state: &RolloutState,
) -> Result<BTreeMap<String, Weight>, StoreError> {
    let rc = config
        .routes
        .iter()
        .find(|r| r.name == route)
        .ok_or_else(|| StoreError::NotFound(format!("no route named `{route}`")))?;
    let target = state.target_weight().basis_points();
    let others: u32 = rc
        .backends
        .iter()
        .filter(|b| b.name != state.spec.stable && b.name != state.spec.target)
        .map(|b| b.weight.basis_points())
        .sum();
    Ok(rc
        .backends
        .iter()
        .map(|b| {
            let w = if b.name == state.spec.target {
                target
            } else if b.name == state.spec.stable {
                Weight::FULL.basis_points().saturating_sub(others + target)
            } else {
                b.weight.basis_points()
            };
            (
                b.name.clone(),
                Weight::from_basis_points(w).expect("at most 100 %"),
            )
        })
        .collect())
}
