//! Progressive delivery: the rollout of a route's `target` backend judged
//! against its `stable` backend, or of a flag's `rollout_percentage` judged
//! on its `on` cohort against its `off` cohort; step by step, rolled back by
//! itself. Both are one engine: a `Plan` (the steps, the analysis, the
//! webhooks) and a `RolloutState` over it.
//!
//! This module is pure: the rollout documents, their validation, the
//! analysis of two rolling windows, and the decision each analysis leads to.
//! The store persists and applies (`store/rollouts.rs`); the driver
//! (`driver.rs`) calls it on a timer.
//!
//! A step's hold counts down only on analyses that *pass*: an inconclusive one
//! (fewer than `min_requests` in the window) never moves a rollout forward,
//! and after `inconclusive_deadline` of them in a row the rollout pauses.
//! `failure_threshold` consecutive failures roll it back.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, Dur, Weight};
use crate::webhook::Webhooks;
use crate::window::WindowStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    Canary,
    BlueGreen,
}

/// What a rollout rolls out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A route's `target` backend, against its `stable` backend.
    Route,
    /// A flag's `rollout_percentage`, its `on` cohort against its `off`.
    Flag,
}

impl Kind {
    /// The two sides an analysis compares, as reasons name them.
    pub fn sides(self) -> (&'static str, &'static str) {
        match self {
            Kind::Route => ("target", "stable"),
            Kind::Flag => ("on cohort", "off cohort"),
        }
    }

    /// `route` or `flag`, as messages name it.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Route => "route",
            Kind::Flag => "flag",
        }
    }

    /// `routes/NAME` or `flags/NAME`: the audit target, and in fleet mode
    /// the name of the rollout's leadership.
    pub fn path(self, name: &str) -> String {
        match self {
            Kind::Route => format!("routes/{name}"),
            Kind::Flag => format!("flags/{name}"),
        }
    }

    /// The leadership's name in fleet mode: a route's is the route's name
    /// (as before flag rollouts existed), a flag's `flags/NAME`.
    pub fn leader(self, name: &str) -> String {
        match self {
            Kind::Route => name.to_owned(),
            Kind::Flag => self.path(name),
        }
    }
}

/// What the engine needs of a rollout's spec, whatever it rolls out.
pub trait Plan:
    Clone + PartialEq + std::fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Where `undo` (and for a flag, a revert) goes back to, recorded when
    /// the rollout starts.
    type Start: Clone
        + PartialEq
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static;
    const KIND: Kind;
    /// The steps, defaults applied.
    fn steps(&self) -> Vec<Step>;
    fn analysis(&self) -> &AnalysisSpec;
    fn webhooks(&self) -> &Webhooks;
}

/// A step: the target's weight, and how long it must hold with passing
/// analyses before the next step. The last step needs no hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub weight: Weight,
    #[serde(default)]
    pub hold: Option<Dur>,
}

/// Thresholds and cadence of the analysis (defaults from the reference plan).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSpec {
    /// How often the windows are judged. Default `5s`.
    #[serde(default = "d_interval")]
    pub interval: Dur,
    /// The span judged, at most the metrics window. Default `30s`.
    #[serde(default = "d_window")]
    pub window: Dur,
    /// Fewer target requests in the window is inconclusive. Default 50.
    #[serde(default = "d_min_requests")]
    pub min_requests: u64,
    /// Consecutive failed analyses that roll back. Default 2.
    #[serde(default = "d_failure_threshold")]
    pub failure_threshold: u32,
    /// Absolute: target error rate above this percentage fails. Default 2.
    #[serde(default = "d_max_error_rate")]
    pub max_error_rate: f64,
    /// Absolute: target p95 above this fails. Default `5s`.
    #[serde(default = "d_max_p95")]
    pub max_p95: Dur,
    /// Relative: target error rate above this × stable's fails. Default 1.1.
    #[serde(default = "d_error_ratio")]
    pub max_error_rate_ratio: f64,
    /// Relative: target p95 above this × stable's fails. Default 1.2.
    #[serde(default = "d_p95_ratio")]
    pub max_p95_ratio: f64,
    /// Relative p95 check: the target must also be at least this much slower
    /// than stable in absolute terms, so sub-millisecond noise (0.7 ms
    /// against 0.5 ms is "1.4×") never rolls back a healthy canary.
    /// Default `10ms`.
    #[serde(default = "d_min_p95_difference")]
    pub min_p95_difference: Dur,
    /// Inconclusive this long in a row pauses the rollout. Default `10m`.
    #[serde(default = "d_inconclusive_deadline")]
    pub inconclusive_deadline: Dur,
}

fn d_interval() -> Dur {
    Dur(Duration::from_secs(5))
}
fn d_window() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_min_requests() -> u64 {
    50
}
fn d_failure_threshold() -> u32 {
    2
}
fn d_max_error_rate() -> f64 {
    2.0
}
fn d_max_p95() -> Dur {
    Dur(Duration::from_secs(5))
}
fn d_error_ratio() -> f64 {
    1.1
}
fn d_p95_ratio() -> f64 {
    1.2
}
fn d_min_p95_difference() -> Dur {
    Dur(Duration::from_millis(10))
}
fn d_inconclusive_deadline() -> Dur {
    Dur(Duration::from_secs(600))
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        Self {
            interval: d_interval(),
            window: d_window(),
            min_requests: d_min_requests(),
            failure_threshold: d_failure_threshold(),
            max_error_rate: d_max_error_rate(),
            max_p95: d_max_p95(),
            max_error_rate_ratio: d_error_ratio(),
            max_p95_ratio: d_p95_ratio(),
            min_p95_difference: d_min_p95_difference(),
            inconclusive_deadline: d_inconclusive_deadline(),
        }
    }
}

/// The body of `POST /v1/routes/{route}/rollout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    #[serde(default)]
    pub strategy: Strategy,
    pub stable: String,
    pub target: String,
    /// Default: 0.1 % 1h, 1 % 4h, 5 % 24h, 25 % 48h, 100 %.
    #[serde(default)]
    pub steps: Option<Vec<Step>>,
    #[serde(default)]
    pub analysis: AnalysisSpec,
    #[serde(default)]
    pub webhooks: Webhooks,
    /// Blue-green: how long the target holds all traffic, still analysed,
    /// before the roles swap. Default `10m`.
    #[serde(default)]
    pub validation: Option<Dur>,
}

/// The reference plan's blue-green shift: 10 % 5m, 30 % 5m, 50 % 10m, 100 %.
pub fn default_blue_green_steps() -> Vec<Step> {
    let step = |pct: f64, minutes: u64| Step {
        weight: Weight::from_percent(pct).expect("valid default"),
        hold: (minutes > 0).then(|| Dur(Duration::from_secs(minutes * 60))),
    };
    vec![step(10.0, 5), step(30.0, 5), step(50.0, 10), step(100.0, 0)]
}

/// The reference plan's canary steps.
pub fn default_canary_steps() -> Vec<Step> {
    let step = |pct: f64, hours: u64| Step {
        weight: Weight::from_percent(pct).expect("valid default"),
        hold: (hours > 0).then(|| Dur(Duration::from_secs(hours * 3600))),
    };
    vec![
        step(0.1, 1),
        step(1.0, 4),
        step(5.0, 24),
        step(25.0, 48),
        step(100.0, 0),
    ]
}

impl RolloutSpec {
    /// The steps, defaulted by strategy. For blue-green the last (100 %)
    /// step holds for the validation period before the roles swap.
    pub fn steps(&self) -> Vec<Step> {
        match self.strategy {
            Strategy::Canary => self.steps.clone().unwrap_or_else(default_canary_steps),
            Strategy::BlueGreen => {
                let mut steps = self.steps.clone().unwrap_or_else(default_blue_green_steps);
                if let Some(last) = steps.last_mut() {
                    last.hold = last.hold.or(Some(
                        self.validation.unwrap_or(Dur(Duration::from_secs(600))),
                    ));
                }
                steps
            }
        }
    }

    /// Checks the rollout against the route it is for.
    pub fn validate(&self, config: &Config, route: &str) -> Result<(), ConfigError> {
        let err = |field: &str, reason: String| Err(ConfigError::new(field, reason));
        let Some(rc) = config.routes.iter().find(|r| r.name == route) else {
            return err("route", format!("no route named `{route}`"));
        };
        let names: Vec<&str> = rc.backends.iter().map(|b| b.name.as_str()).collect();
        for (field, name) in [("stable", &self.stable), ("target", &self.target)] {
            if !names.contains(&name.as_str()) {
                return err(field, format!("route `{route}` has no backend `{name}`"));
            }
        }
        if self.stable == self.target {
            return err(
                "target",
                "the target must differ from the stable backend".into(),
            );
        }
        // Backends own consecutive bucket ranges in configured order. With the
        // target at either end and only empty (0 %) backends between it and
        // stable, raising the target's weight only moves the boundary between
        // the two: users already on the target stay, no one else moves.
        let t = names
            .iter()
            .position(|n| *n == self.target)
            .expect("checked above");
        let st = names
            .iter()
            .position(|n| *n == self.stable)
            .expect("checked above");
        let at_end = t == 0 || t + 1 == names.len();
        let between_empty = rc.backends[t.min(st) + 1..t.max(st)]
            .iter()
            .all(|b| b.weight.basis_points() == 0);
        if !at_end || !between_empty {
            return err(
                "target",
                format!(
                    "`{}` must be the route's first or last backend, with only 0 % backends between it and `{}`, so raising its weight only adds users to it (backends: {})",
                    self.target,
                    self.stable,
                    names.join(", ")
                ),
            );
        }
        if self.strategy == Strategy::Canary && self.validation.is_some() {
            return err(
                "validation",
                "only blue-green rollouts have a validation period".into(),
            );
        }
        let steps = self.steps();
        if self.strategy == Strategy::BlueGreen {
            if steps.last().map(|s| s.weight) != Some(Weight::FULL) {
                return err("steps", "a blue-green shift ends at 100".into());
            }
            if let Some(b) = rc.backends.iter().find(|b| {
                b.name != self.stable && b.name != self.target && b.weight.basis_points() > 0
            }) {
                return err(
                    "target",
                    format!(
                        "blue-green needs every user on the two colours, but `{}` has {} %",
                        b.name, b.weight
                    ),
                );
            }
        }
        validate_steps(&steps, "weight")?;
        let others: u32 = rc
            .backends
            .iter()
            .filter(|b| b.name != self.stable && b.name != self.target)
            .map(|b| b.weight.basis_points())
            .sum();
        let top = steps.last().expect("not empty").weight.basis_points();
        if others + top > Weight::FULL.basis_points() {
            return err(
                "steps",
                format!(
                    "the last step's {} % and the other backends' {} % exceed 100",
                    f64::from(top) / 100.0,
                    f64::from(others) / 100.0
                ),
            );
        }
        self.analysis.validate(config)?;
        self.webhooks
            .validate()
            .map_err(|e| ConfigError::new("webhooks", e))?;
        Ok(())
    }
}

impl Plan for RolloutSpec {
    type Start = std::collections::BTreeMap<String, Weight>;
    const KIND: Kind = Kind::Route;
    fn steps(&self) -> Vec<Step> {
        RolloutSpec::steps(self)
    }
    fn analysis(&self) -> &AnalysisSpec {
        &self.analysis
    }
    fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }
}

/// Steps of any rollout: at least one, rising, every one but the last with
/// a hold. `value` names the step's share in errors (`weight`,
/// `rollout_percentage`).
fn validate_steps(steps: &[Step], value: &str) -> Result<(), ConfigError> {
    let err = |field: String, reason: &str| Err(ConfigError::new(&field, reason.to_owned()));
    if steps.is_empty() {
        return err("steps".into(), "at least one step is needed");
    }
    for (i, pair) in steps.windows(2).enumerate() {
        if pair[1].weight <= pair[0].weight {
            return err(
                format!("steps[{}].{value}", i + 1),
                "must increase step by step",
            );
        }
    }
    for (i, s) in steps.iter().enumerate() {
        if i + 1 < steps.len() && s.hold.is_none() {
            return err(
                format!("steps[{i}].hold"),
                "every step but the last needs a hold",
            );
        }
    }
    Ok(())
}

impl AnalysisSpec {
    /// Checks the analysis against the configuration it runs under.
    pub fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let err = |field: &str, reason: String| Err(ConfigError::new(field, reason));
        if self.interval.0 < Duration::from_secs(1) {
            return err("analysis.interval", "must be at least 1s".into());
        }
        if self.window.0 < self.interval.0 || self.window.0 > config.metrics.window.0 {
            return err(
                "analysis.window",
                format!(
                    "must be between the interval and metrics.window ({})",
                    humantime::format_duration(config.metrics.window.0)
                ),
            );
        }
        if !config.metrics.enabled {
            return err("analysis", "needs metrics.enabled: true".into());
        }
        if self.failure_threshold == 0 {
            return err("analysis.failure_threshold", "must be at least 1".into());
        }
        if self.min_requests == 0 {
            return err(
                "analysis.min_requests",
                "must be at least 1: with none, an analysis without traffic would pass".into(),
            );
        }
        for (field, v) in [
            ("analysis.max_error_rate", self.max_error_rate),
            ("analysis.max_error_rate_ratio", self.max_error_rate_ratio),
            ("analysis.max_p95_ratio", self.max_p95_ratio),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return err(field, format!("{v} must be a positive number"));
            }
        }
        Ok(())
    }
}

// === flag rollouts ===

/// What a flag rollout does when the analysis fails `failure_threshold`
/// times in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Back to the percentage the flag had when the rollout started.
    #[default]
    Revert,
    /// Off for everyone (`enabled: false`), the kill switch.
    Kill,
}

/// A step of a flag rollout: the share of users with the flag on, and how
/// long it must hold with passing analyses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagStep {
    pub rollout_percentage: Weight,
    #[serde(default)]
    pub hold: Option<Dur>,
}

/// The body of `POST /v1/flags/{name}/rollout`: a guarded rollout of the
/// flag's `rollout_percentage`, its `on` cohort judged against its `off`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagRolloutSpec {
    /// Default: the canary plan's 0.1 % 1h, 1 % 4h, 5 % 24h, 25 % 48h, 100 %.
    #[serde(default)]
    pub steps: Option<Vec<FlagStep>>,
    #[serde(default)]
    pub analysis: AnalysisSpec,
    #[serde(default)]
    pub webhooks: Webhooks,
    /// Default `revert`.
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// A flag as a rollout found it: what a revert and `undo` go back to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagStart {
    pub enabled: bool,
    pub rollout_percentage: Weight,
}

impl Plan for FlagRolloutSpec {
    type Start = FlagStart;
    const KIND: Kind = Kind::Flag;
    fn steps(&self) -> Vec<Step> {
        match &self.steps {
            Some(steps) => steps
                .iter()
                .map(|s| Step {
                    weight: s.rollout_percentage,
                    hold: s.hold,
                })
                .collect(),
            None => default_canary_steps(),
        }
    }
    fn analysis(&self) -> &AnalysisSpec {
        &self.analysis
    }
    fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }
}

impl FlagRolloutSpec {
    /// Checks the rollout against the flag it is for.
    pub fn validate(&self, config: &Config, flag: &str) -> Result<(), ConfigError> {
        let Some(fc) = config.flags.iter().find(|f| f.name == flag) else {
            return Err(ConfigError::new("flag", format!("no flag named `{flag}`")));
        };
        let steps = Plan::steps(self);
        validate_steps(&steps, "rollout_percentage")?;
        let first = steps[0].weight;
        if first <= fc.rollout_percentage {
            return Err(ConfigError::new(
                "steps[0].rollout_percentage",
                format!(
                    "{first} % does not rise above the flag's current {} %: a rollout only adds users",
                    fc.rollout_percentage
                ),
            ));
        }
        self.analysis.validate(config)?;
        self.webhooks
            .validate()
            .map_err(|e| ConfigError::new("webhooks", e))
    }
}

// === state ===

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Progressing,
    Paused,
    Promoted,
    RolledBack,
    Aborted,
}

impl Phase {
    /// Still under way (a new rollout cannot start).
    pub fn active(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused)
    }
}

/// One check of an analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub check: String,
    /// The observed value (`null` when there was nothing to compare).
    pub value: Option<f64>,
    pub threshold: f64,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// The outcome of judging the windows once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub verdict: Verdict,
    pub target_requests: u64,
    pub stable_requests: u64,
    pub checks: Vec<Check>,
    /// A flag's: the on cohort's error rate against the off cohort's, and
    /// whether the difference is beyond noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate_difference: Option<crate::abtest::Difference>,
}

/// A rollout as persisted: its spec and where it is. `P` is what it rolls
/// out: a route's backend (`RolloutSpec`) or a flag (`FlagRolloutSpec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, bound = "")]
pub struct RolloutState<P: Plan = RolloutSpec> {
    pub spec: P,
    pub phase: Phase,
    pub step: usize,
    /// Hold accumulated in this step by passing analyses.
    pub held: Dur,
    pub consecutive_failures: u32,
    /// Inconclusive time in a row.
    pub inconclusive: Dur,
    pub started: String,
    pub step_entered: String,
    pub last_analysis: Option<Analysis>,
    /// Why it ended, or why it paused.
    pub reason: Option<String>,
    /// Blue-green, once promoted: the old colour, kept for instant rollback.
    #[serde(default)]
    pub standby: Option<String>,
    /// What the rollout found when it started: a route's weights, a flag's
    /// percentage; what `undo` restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<P::Start>,
}

impl<P: Plan> RolloutState<P> {
    pub fn new(spec: P, now: String) -> RolloutState<P> {
        RolloutState {
            spec,
            phase: Phase::Progressing,
            step: 0,
            held: Dur(Duration::ZERO),
            consecutive_failures: 0,
            inconclusive: Dur(Duration::ZERO),
            started: now.clone(),
            step_entered: now,
            last_analysis: None,
            reason: None,
            standby: None,
            before: None,
        }
    }

    /// The span an analysis at `now` judges: the spec's window, but only the
    /// whole seconds after the one the rollout started in. Windows count
    /// whole seconds, and the start's own second also holds what came just
    /// before the start: traffic that is not this rollout's (a canary whose
    /// failures were mended, and its rollout started, within one second of
    /// its last rollback must not be rolled back again for them). The first
    /// analysis comes an interval (at least a second) after the start, so
    /// it always has a second of its own to judge.
    pub fn analysis_span(&self, now: std::time::SystemTime) -> Duration {
        let window = self.spec.analysis().window.0;
        let Ok(started) = humantime::parse_rfc3339(&self.started) else {
            return window;
        };
        let since = now.duration_since(started).unwrap_or_default();
        window.min(Duration::from_secs(since.as_secs().max(1)))
    }

    /// The target's weight (a flag's percentage) for the current phase and
    /// step; 0 once rolled back or aborted.
    pub fn target_weight(&self) -> Weight {
        match self.phase {
            Phase::RolledBack | Phase::Aborted => Weight::default(),
            Phase::Promoted => self.spec.steps().last().expect("validated").weight,
            Phase::Progressing | Phase::Paused => self.spec.steps()[self.step].weight,
        }
    }
}

/// What one analysis leads to.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Keep going in this step (the state's counters changed).
    Stay,
    /// The hold is done: go to the next step (or promote, after the last).
    Advance,
    /// `failure_threshold` consecutive failures: roll back.
    RollBack(String),
    /// Inconclusive for too long: pause.
    Pause(String),
}

/// Judges the target's window against the stable one (for a flag, the on
/// cohort's against the off cohort's).
///
/// A flag's cohorts share every backend: only the flag tells them apart.
/// So a flag's checks fail only on what the flag's users suffer more than
/// the others: the error checks when the on cohort's error rate is above
/// the off cohort's beyond noise (one-sided two-proportion z-test, p <
/// 0.05; without an off cohort to compare, as for a route), the p95 check
/// when the on cohort is also `min_p95_difference` slower. An incident that
/// hits every user alike does not revert a flag.
pub fn analyze(
    kind: Kind,
    spec: &AnalysisSpec,
    stable: &WindowStats,
    target: &WindowStats,
) -> Analysis {
    let mut checks = Vec::new();
    let inconclusive = target.requests < spec.min_requests;
    let verdict_of = |failed: bool| if failed { Verdict::Fail } else { Verdict::Pass };
    let target_rate = target.error_rate_percent();
    let stable_rate = stable.error_rate_percent();
    let p95_ms = |s: &WindowStats| s.p95.map(|d| d.as_secs_f64() * 1000.0);
    let min_difference_ms = spec.min_p95_difference.0.as_secs_f64() * 1000.0;
    let slower_enough = match (p95_ms(target), p95_ms(stable)) {
        (Some(t), Some(s)) => t - s > min_difference_ms,
        _ => false,
    };
    let difference = crate::abtest::two_proportions(
        target.errors,
        target.requests,
        stable.errors,
        stable.requests,
    );
    let (errors_attributed, slower_attributed) = match kind {
        Kind::Route => (true, true),
        Kind::Flag => (
            difference.is_none_or(|d| d.z > 0.0 && d.p_value / 2.0 < 0.05),
            p95_ms(stable).is_none() || slower_enough,
        ),
    };

    checks.push(Check {
        check: "error_rate".into(),
        value: Some(target_rate),
        threshold: spec.max_error_rate,
        verdict: verdict_of(target_rate > spec.max_error_rate && errors_attributed),
    });
    let max_p95_ms = spec.max_p95.0.as_secs_f64() * 1000.0;
    checks.push(Check {
        check: "p95".into(),
        value: p95_ms(target),
        threshold: max_p95_ms,
        verdict: verdict_of(p95_ms(target).is_some_and(|p| p > max_p95_ms) && slower_attributed),
    });
    // Relative checks need a stable baseline with enough traffic.
    let baseline = stable.requests >= spec.min_requests;
    let ratio = |t: f64, s: f64| if s > 0.0 { Some(t / s) } else { None };
    let error_ratio = ratio(target_rate, stable_rate);
    // With a clean stable backend any target error is an infinite ratio; it
    // takes at least two target errors to call that a regression.
    let error_regressed = target_rate > spec.max_error_rate_ratio * stable_rate
        && target.errors >= 2
        && errors_attributed;
    checks.push(Check {
        check: "error_rate_ratio".into(),
        value: error_ratio,
        threshold: spec.max_error_rate_ratio,
        verdict: if baseline {
            verdict_of(error_regressed)
        } else {
            Verdict::Inconclusive
        },
    });
    let p95_ratio = match (p95_ms(target), p95_ms(stable)) {
        (Some(t), Some(s)) => ratio(t, s),
        _ => None,
    };
    checks.push(Check {
        check: "p95_ratio".into(),
        value: p95_ratio,
        threshold: spec.max_p95_ratio,
        verdict: match (baseline, p95_ratio) {
            (true, Some(r)) => verdict_of(r > spec.max_p95_ratio && slower_enough),
            _ => Verdict::Inconclusive,
        },
    });
    if inconclusive {
        for c in &mut checks {
            c.verdict = Verdict::Inconclusive;
        }
    }
    let verdict = if inconclusive {
        Verdict::Inconclusive
    } else if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        Verdict::Fail
    } else {
        Verdict::Pass
    };
    Analysis {
        verdict,
        target_requests: target.requests,
        stable_requests: stable.requests,
        checks,
        error_rate_difference: match kind {
            Kind::Route => None,
            Kind::Flag => difference,
        },
    }
}

/// The unit a check's value and threshold are in: `%` for the error rate,
/// ` ms` for p95, `×` for ratios against stable.
pub fn check_unit(check: &str) -> &'static str {
    match check {
        "error_rate" => " %",
        "p95" => " ms",
        c if c.ends_with("_ratio") => "×",
        _ => "",
    }
}

/// A failed check as a reason reads it: its value and threshold with their
/// unit (`error_rate 6.52 % > 2 %`); an error ratio against a stable
/// backend without errors (no ratio) says so with the target's rate.
fn describe_breach(c: &Check, target_rate: Option<f64>, kind: Kind) -> String {
    let unit = check_unit(&c.check);
    let (target, stable) = kind.sides();
    match (c.value, target_rate) {
        (Some(v), _) => format!("{} {v:.2}{unit} > {}{unit}", c.check, c.threshold),
        (None, Some(rate)) if c.check == "error_rate_ratio" => {
            format!("{} ({target} {rate:.2} % errors, {stable} none)", c.check)
        }
        (None, _) => c.check.clone(),
    }
}

/// Applies one analysis to a progressing rollout.
pub fn decide<P: Plan>(state: &mut RolloutState<P>, analysis: Analysis) -> Decision {
    let spec = state.spec.analysis();
    let interval = spec.interval.0;
    let decision = match analysis.verdict {
        Verdict::Fail => {
            state.consecutive_failures += 1;
            state.inconclusive = Dur(Duration::ZERO);
            if state.consecutive_failures >= spec.failure_threshold {
                let target_rate = analysis
                    .checks
                    .iter()
                    .find(|c| c.check == "error_rate")
                    .and_then(|c| c.value);
                let breaches: Vec<String> = analysis
                    .checks
                    .iter()
                    .filter(|c| c.verdict == Verdict::Fail)
                    .map(|c| describe_breach(c, target_rate, P::KIND))
                    .collect();
                let attribution = analysis.error_rate_difference.map_or(String::new(), |d| {
                    format!(
                        " (the on cohort's error rate {:+.2} points against the off cohort's, z = {:.2})",
                        d.points, d.z
                    )
                });
                Decision::RollBack(format!(
                    "{} consecutive failed analyses: {}{attribution}",
                    state.consecutive_failures,
                    breaches.join(", ")
                ))
            } else {
                Decision::Stay
            }
        }
        Verdict::Inconclusive => {
            state.inconclusive = Dur(state.inconclusive.0 + interval);
            if state.inconclusive.0 >= spec.inconclusive_deadline.0 {
                Decision::Pause(format!(
                    "inconclusive for {}: fewer than {} requests to the {} in the window",
                    humantime::format_duration(state.inconclusive.0),
                    spec.min_requests,
                    P::KIND.sides().0
                ))
            } else {
                Decision::Stay
            }
        }
        Verdict::Pass => {
            state.consecutive_failures = 0;
            state.inconclusive = Dur(Duration::ZERO);
            state.held = Dur(state.held.0 + interval);
            let steps = state.spec.steps();
            match steps[state.step].hold {
                Some(hold) if state.held.0 < hold.0 => Decision::Stay,
                _ => Decision::Advance,
            }
        }
    };
    state.last_analysis = Some(analysis);
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(requests: u64, errors: u64, p95_ms: u64) -> WindowStats {
        WindowStats {
            span: Duration::from_secs(30),
            requests,
            errors,
            p50: Some(Duration::from_millis(p95_ms / 2)),
            p95: Some(Duration::from_millis(p95_ms)),
            p99: Some(Duration::from_millis(p95_ms)),
        }
    }

    fn spec() -> AnalysisSpec {
        AnalysisSpec::default()
    }

    #[test]
    fn the_analysis_never_reaches_back_before_the_rollout_started() {
        let spec: RolloutSpec = serde_json::from_str(
            r#"{"stable":"a","target":"b","steps":[{"weight":100}],"analysis":{"window":"30s"}}"#,
        )
        .unwrap();
        let start = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let state = RolloutState::new(spec, humantime::format_rfc3339_seconds(start).to_string());
        let at = |s: u64| state.analysis_span(start + Duration::from_millis(s));
        // The start's own second also holds what came before the start: it
        // is left out once there is a second after it (the current one).
        assert_eq!(at(0), Duration::from_secs(1));
        assert_eq!(at(1_200), Duration::from_secs(1), "the current second only");
        assert_eq!(at(7_400), Duration::from_secs(7));
        assert_eq!(at(30_500), Duration::from_secs(30));
        assert_eq!(
            at(600_000),
            Duration::from_secs(30),
            "never past the window"
        );
        let unreadable = RolloutState {
            started: "yesterday".into(),
            ..state.clone()
        };
        assert_eq!(unreadable.analysis_span(start), Duration::from_secs(30));
    }

    #[test]
    fn absolute_breaches_fail() {
        let a = analyze(
            Kind::Route,
            &spec(),
            &stats(1000, 0, 10),
            &stats(100, 10, 10),
        );
        assert_eq!(a.verdict, Verdict::Fail);
        assert_eq!(a.checks[0].verdict, Verdict::Fail);
        let a = analyze(
            Kind::Route,
            &spec(),
            &stats(1000, 0, 10),
            &stats(100, 0, 6000),
        );
        assert_eq!(a.checks[1].verdict, Verdict::Fail);
    }

    #[test]
    fn regressions_against_stable_fail_below_the_absolute_limits() {
        // p95 3× stable's, far below 5 s.
        let a = analyze(
            Kind::Route,
            &spec(),
            &stats(1000, 0, 100),
            &stats(100, 0, 300),
        );
        assert_eq!(a.verdict, Verdict::Fail);
        assert_eq!(a.checks[3].verdict, Verdict::Fail);
        assert_eq!(a.checks[1].verdict, Verdict::Pass);
        // 1.5 % errors against stable's 0.5 %: under 2 %, but 3× stable.
        let a = analyze(
            Kind::Route,
            &spec(),
            &stats(1000, 5, 100),
            &stats(200, 3, 100),
        );
        assert_eq!(a.checks[2].verdict, Verdict::Fail);
        // 1.4× but only 0.2 ms slower: noise, not a regression.
        let fast = |p95_us: u64| WindowStats {
            p95: Some(Duration::from_micros(p95_us)),
            ..stats(1000, 0, 1)
        };
        let a = analyze(
            Kind::Route,
            &spec(),
            &fast(500),
            &WindowStats {
                requests: 100,
                ..fast(700)
            },
        );
        assert_eq!(a.verdict, Verdict::Pass, "{a:?}");
        // One error against a clean stable is not yet a regression.
        let a = analyze(
            Kind::Route,
            &spec(),
            &stats(1000, 0, 100),
            &stats(200, 1, 100),
        );
        assert_eq!(a.verdict, Verdict::Pass);
    }

    /// A flag's cohorts share the backends: what both suffer alike is not
    /// the flag's, what its users suffer beyond noise is.
    #[test]
    fn a_flag_fails_only_on_what_its_users_suffer_more() {
        let flag = |off: WindowStats, on: WindowStats| analyze(Kind::Flag, &spec(), &off, &on);
        // An incident that hits everyone: 6 % errors in both cohorts.
        assert_eq!(
            analyze(
                Kind::Route,
                &spec(),
                &stats(1000, 60, 10),
                &stats(500, 30, 10)
            )
            .verdict,
            Verdict::Fail,
            "a canary at 6 % fails whatever stable does"
        );
        let shared = flag(stats(1000, 60, 10), stats(500, 30, 10));
        assert_eq!(shared.verdict, Verdict::Pass, "{shared:?}");
        assert_eq!(
            shared.checks[0].value,
            Some(6.0),
            "the value is still shown"
        );
        // 4 errors in 80 against 20 in 800: 5 % against 2.5 %, within noise.
        let noise = flag(stats(800, 20, 10), stats(80, 4, 10));
        assert_eq!(noise.verdict, Verdict::Pass, "{noise:?}");
        assert!(!noise.error_rate_difference.unwrap().beyond_noise);
        // The flag breaks its users: 30 % against 0.2 %.
        let broken = flag(stats(900, 2, 10), stats(100, 30, 10));
        assert_eq!(broken.verdict, Verdict::Fail);
        assert_eq!(broken.checks[0].verdict, Verdict::Fail);
        assert_eq!(broken.checks[2].verdict, Verdict::Fail);
        // No off cohort to compare (everyone has it): judged as a route.
        assert_eq!(
            flag(stats(0, 0, 10), stats(100, 10, 10)).verdict,
            Verdict::Fail
        );
        // Slow for everyone is not the flag's; slower for its users is.
        assert_eq!(
            flag(stats(1000, 0, 6000), stats(100, 0, 6000)).verdict,
            Verdict::Pass
        );
        let slower = flag(stats(1000, 0, 5000), stats(100, 0, 6000));
        assert_eq!(slower.checks[1].verdict, Verdict::Fail, "{slower:?}");
        // The reason says how the cohorts differ.
        let mut r = rollout(&[(5.0, 60), (100.0, 0)]);
        decide(&mut r, broken.clone());
        let Decision::RollBack(reason) = decide(&mut r, broken) else {
            panic!("not rolled back")
        };
        assert!(reason.contains("+29.78 points"), "{reason}");
    }

    #[test]
    fn too_little_traffic_is_inconclusive_never_a_pass() {
        let a = analyze(Kind::Route, &spec(), &stats(1000, 0, 10), &stats(49, 0, 10));
        assert_eq!(a.verdict, Verdict::Inconclusive);
        let a = analyze(Kind::Route, &spec(), &stats(0, 0, 10), &stats(0, 0, 10));
        assert_eq!(a.verdict, Verdict::Inconclusive);
        // Even a breach on too few requests is inconclusive.
        let a = analyze(
            Kind::Route,
            &spec(),
            &stats(1000, 0, 10),
            &stats(10, 10, 10),
        );
        assert_eq!(a.verdict, Verdict::Inconclusive);
    }

    fn rollout(steps: &[(f64, u64)]) -> RolloutState {
        let spec = RolloutSpec {
            strategy: Strategy::Canary,
            stable: "blue".into(),
            target: "canary".into(),
            steps: Some(
                steps
                    .iter()
                    .map(|(w, h)| Step {
                        weight: Weight::from_percent(*w).unwrap(),
                        hold: (*h > 0).then(|| Dur(Duration::from_secs(*h))),
                    })
                    .collect(),
            ),
            analysis: AnalysisSpec {
                interval: Dur(Duration::from_secs(5)),
                ..spec()
            },
            webhooks: Webhooks::default(),
            validation: None,
        };
        RolloutState::new(spec, "now".into())
    }

    fn verdict(v: Verdict) -> Analysis {
        Analysis {
            verdict: v,
            target_requests: 100,
            stable_requests: 100,
            checks: Vec::new(),
            error_rate_difference: None,
        }
    }

    #[test]
    fn holds_count_only_passing_analyses() {
        let mut r = rollout(&[(5.0, 10), (100.0, 0)]);
        assert_eq!(
            decide(&mut r, verdict(Verdict::Inconclusive)),
            Decision::Stay
        );
        assert_eq!(
            decide(&mut r, verdict(Verdict::Inconclusive)),
            Decision::Stay
        );
        assert_eq!(r.held.0, Duration::ZERO);
        assert_eq!(decide(&mut r, verdict(Verdict::Pass)), Decision::Stay);
        assert_eq!(decide(&mut r, verdict(Verdict::Pass)), Decision::Advance);
    }

    #[test]
    fn consecutive_failures_roll_back_and_a_pass_resets_them() {
        let mut r = rollout(&[(5.0, 60), (100.0, 0)]);
        assert_eq!(decide(&mut r, verdict(Verdict::Fail)), Decision::Stay);
        assert_eq!(decide(&mut r, verdict(Verdict::Pass)), Decision::Stay);
        assert_eq!(decide(&mut r, verdict(Verdict::Fail)), Decision::Stay);
        assert!(matches!(
            decide(&mut r, verdict(Verdict::Fail)),
            Decision::RollBack(_)
        ));
    }

    #[test]
    fn a_rollback_reason_gives_each_breach_with_its_value_and_unit() {
        let mut r = rollout(&[(5.0, 60), (100.0, 0)]);
        // 6 % errors against a clean stable, p95 3× stable's and 1.5 s slower.
        let analysis = analyze(
            Kind::Route,
            &spec(),
            &stats(1000, 0, 700),
            &stats(100, 6, 2100),
        );
        decide(&mut r, analysis.clone());
        let Decision::RollBack(reason) = decide(&mut r, analysis) else {
            panic!("not rolled back");
        };
        assert_eq!(
            reason,
            "2 consecutive failed analyses: error_rate 6.00 % > 2 %, \
             error_rate_ratio (target 6.00 % errors, stable none), p95_ratio 3.00× > 1.2×"
        );
    }

    #[test]
    fn long_inconclusiveness_pauses() {
        let mut r = rollout(&[(5.0, 60), (100.0, 0)]);
        r.spec.analysis.inconclusive_deadline = Dur(Duration::from_secs(15));
        assert_eq!(
            decide(&mut r, verdict(Verdict::Inconclusive)),
            Decision::Stay
        );
        assert_eq!(
            decide(&mut r, verdict(Verdict::Inconclusive)),
            Decision::Stay
        );
        assert!(matches!(
            decide(&mut r, verdict(Verdict::Inconclusive)),
            Decision::Pause(_)
        ));
    }

    #[test]
    fn the_target_sits_at_an_end_with_only_empty_backends_before_stable() {
        let config = |weights: [u32; 3]| {
            let yaml = format!(
                "routes:\n  - name: api\n    backends:\n      - {{ name: a, endpoints: [\"127.0.0.1:1\"], weight: {} }}\n      - {{ name: b, endpoints: [\"127.0.0.1:1\"], weight: {} }}\n      - {{ name: c, endpoints: [\"127.0.0.1:1\"], weight: {} }}\n",
                weights[0], weights[1], weights[2]
            );
            Config::from_yaml(&yaml).unwrap()
        };
        let spec = |stable: &str, target: &str| RolloutSpec {
            strategy: Strategy::Canary,
            stable: stable.into(),
            target: target.into(),
            // Ends at 50 %, leaving room for a third backend's share.
            steps: Some(vec![
                Step {
                    weight: Weight::from_percent(10.0).unwrap(),
                    hold: Some(Dur(Duration::from_secs(60))),
                },
                Step {
                    weight: Weight::from_percent(50.0).unwrap(),
                    hold: None,
                },
            ]),
            analysis: AnalysisSpec::default(),
            webhooks: Webhooks::default(),
            validation: None,
        };
        assert!(spec("b", "c").validate(&config([50, 50, 0]), "api").is_ok());
        assert!(spec("b", "a").validate(&config([0, 50, 50]), "api").is_ok());
        assert!(
            spec("a", "c").validate(&config([100, 0, 0]), "api").is_ok(),
            "empty b between"
        );
        let e = spec("a", "c")
            .validate(&config([50, 50, 0]), "api")
            .unwrap_err();
        assert_eq!(e.field, "target");
        let e = spec("a", "b")
            .validate(&config([50, 0, 50]), "api")
            .unwrap_err();
        assert!(e.reason.contains("first or last"), "{e}");
    }

    #[test]
    fn default_steps_are_the_reference_plans() {
        let steps = default_canary_steps();
        let weights: Vec<String> = steps.iter().map(|s| s.weight.to_string()).collect();
        assert_eq!(weights, ["0.10", "1", "5", "25", "100"]);
        assert_eq!(steps[3].hold.unwrap().0, Duration::from_secs(48 * 3600));
        assert!(steps[4].hold.is_none());
        let bg = default_blue_green_steps();
        let weights: Vec<String> = bg.iter().map(|s| s.weight.to_string()).collect();
        assert_eq!(weights, ["10", "30", "50", "100"]);
    }
}
