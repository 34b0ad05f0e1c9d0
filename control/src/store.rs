//! The runtime state: the configuration file's topology and initial values,
//! with the changes made through the admin API laid over them.
//!
//! Every change goes through one path: take the write lock, check the caller's
//! `If-Match` version, apply the change to a copy, validate the whole
//! resulting configuration, persist it (temp file, fsync, rename, fsync dir),
//! append the audit event, swap the new routing snapshot in, and only then
//! answer. A change rejected at any step before the swap changes nothing.
//!
//! Overrides survive config reloads and restarts: the API's word wins over the
//! file's initial values until `--reset-state`. An override the new topology
//! cannot hold (its route or backend is gone) is dropped with an audit event.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bucket::BUCKETS;
use crate::config::{Config, ConfigError, Dur, FlagConfig, Weight};
use crate::rollout::{decide, Analysis, Decision, Phase, RolloutSpec, RolloutState, Strategy};
use std::time::Duration;

/// Builds and swaps in the data plane's routing snapshot for a configuration.
pub type Applier = Box<dyn Fn(&Config) + Send + Sync>;

/// What the API changed, by route and flag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// route → backend → weight; backends left out have weight 0.
    #[serde(default)]
    pub weights: BTreeMap<String, BTreeMap<String, Weight>>,
    /// flag → its definition, or `None` where the API deleted it.
    #[serde(default)]
    pub flags: BTreeMap<String, Option<FlagConfig>>,
    /// route → its latest rollout (active or ended: a rolled-back rollout
    /// stays rolled back until a new one starts).
    #[serde(default)]
    pub rollouts: BTreeMap<String, RolloutState>,
}

const STATE_FORMAT: u32 = 1;
const STATE_FILE: &str = "state.json";
const EVENTS_FILE: &str = "events.jsonl";
/// Events kept when there is no `state_dir`.
const MEMORY_EVENTS: usize = 10_000;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: u32,
    version: u64,
    overrides: Overrides,
}

/// One audit record (a line of `events.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// RFC 3339, UTC, seconds.
    pub time: String,
    /// A token name, `anonymous` (open loopback admin), `config-reload`,
    /// `startup` or `auto-rollback`.
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before: Value,
    pub after: Value,
    /// State version after the change.
    pub version: u64,
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state is at version {current}, not the {given} given in If-Match")]
    Stale { current: u64, given: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(ConfigError),
    /// The change conflicts with the state (a rollout already under way,
    /// a transition its phase does not allow).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Io(String),
}

/// The current effective configuration and its version.
#[derive(Debug)]
pub struct View {
    pub version: u64,
    pub config: Arc<Config>,
    /// Every route's latest rollout, with its progress.
    pub rollouts: Arc<BTreeMap<String, RolloutState>>,
}

struct Inner {
    base: Config,
    overrides: Overrides,
    version: u64,
    next_seq: u64,
}

pub struct Store {
    write: tokio::sync::Mutex<Inner>,
    view: ArcSwap<View>,
    apply: Applier,
    dir: Option<PathBuf>,
    memory_events: std::sync::Mutex<VecDeque<Event>>,
}

/// A change described for the audit log.
pub struct Change {
    pub action: &'static str,
    pub target: String,
    pub before: Value,
    pub after: Value,
}

impl Store {
    /// Loads persisted state from `base.state_dir` (if any), lays it over
    /// `base`, applies the result, and returns the store. A state file that
    /// cannot be read or parsed stops start-up with an error naming it, unless
    /// `reset` (then it is moved aside, never overwritten, and start-up
    /// continues from `base`).
    pub fn open(base: Config, reset: bool, apply: Applier) -> Result<Store, StoreError> {
        let dir = base.state_dir.clone();
        let mut startup_events = Vec::new();
        let (mut overrides, mut version, mut next_seq) = (Overrides::default(), 0, 1);
        if let Some(dir) = &dir {
            fs::create_dir_all(dir).map_err(|e| {
                StoreError::Io(format!("state_dir {}: cannot create: {e}", dir.display()))
            })?;
            next_seq = last_event_seq(&dir.join(EVENTS_FILE))? + 1;
            let path = dir.join(STATE_FILE);
            if path.exists() && reset {
                let aside = dir.join(format!("{STATE_FILE}.reset-{}", unix_now()));
                fs::rename(&path, &aside).map_err(|e| {
                    StoreError::Io(format!("{}: cannot move aside: {e}", path.display()))
                })?;
                startup_events.push(Change {
                    action: "state.reset",
                    target: "state".into(),
                    before: json!({ "moved_to": aside.display().to_string() }),
                    after: Value::Null,
                });
            } else if path.exists() {
                let state = read_state(&path)?;
                overrides = state.overrides;
                version = state.version;
            }
        }
        let (kept, dropped) = fit(&base, overrides);
        overrides = kept;
        startup_events.extend(dropped);
        let effective = overlay(&base, &overrides);
        effective.validate().map_err(StoreError::Invalid)?;
        apply(&effective);
        let store = Store {
            view: ArcSwap::from_pointee(View {
                version,
                config: Arc::new(effective),
                rollouts: Arc::new(overrides.rollouts.clone()),
            }),
            write: tokio::sync::Mutex::new(Inner {
                base,
                overrides,
                version,
                next_seq,
            }),
            apply,
            dir,
            memory_events: std::sync::Mutex::new(VecDeque::new()),
        };
        if !startup_events.is_empty() {
            let mut inner = store
                .write
                .try_lock()
                .expect("no one else holds a new store");
            if let Some(dir) = &store.dir {
                persist_blocking(dir, inner.overrides.clone(), inner.version)?;
            }
            for change in startup_events {
                let event = next_event(&mut inner, "startup", change);
                match &store.dir {
                    Some(dir) => append_event_blocking(dir, &event)?,
                    None => store.remember(event),
                }
            }
        }
        Ok(store)
    }

    /// The configuration requests are routed by now, and its version.
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// The overrides the API has made.
    pub async fn overrides(&self) -> Overrides {
        self.write.lock().await.overrides.clone()
    }

    /// Sets a route's weights (backends left out get 0).
    pub async fn set_weights(
        &self,
        actor: &str,
        if_match: Option<u64>,
        route: &str,
        weights: BTreeMap<String, Weight>,
    ) -> Result<Arc<View>, StoreError> {
        self.mutate(actor, if_match, |current, overrides| {
            let rc = current
                .routes
                .iter()
                .find(|r| r.name == route)
                .ok_or_else(|| StoreError::NotFound(format!("no route named `{route}`")))?;
            // The rollout owns the weights while it runs: a manual change would
            // be silently undone at its next step.
            if let Some(r) = overrides.rollouts.get(route).filter(|r| r.phase.active()) {
                return Err(StoreError::Conflict(format!(
                    "route `{route}` has a rollout of `{}` under way ({:?}); promote or abort it before setting weights",
                    r.spec.target, r.phase
                )));
            }
            if let Some(unknown) = weights
                .keys()
                .find(|b| !rc.backends.iter().any(|rb| &rb.name == *b))
            {
                return Err(invalid(
                    "weights",
                    format!("route `{route}` has no backend `{unknown}`"),
                ));
            }
            let total: u32 = weights.values().map(|w| w.basis_points()).sum();
            if total != BUCKETS {
                let sum = f64::from(total) / 100.0;
                return Err(invalid(
                    "weights",
                    format!("sum to {sum}, must be exactly 100"),
                ));
            }
            let before = route_weights(current, route);
            overrides.weights.insert(route.to_owned(), weights.clone());
            Ok(Change {
                action: "weights.set",
                target: format!("routes/{route}"),
                before,
                after: serde_json::to_value(&weights).expect("weights serialize"),
            })
        })
        .await
    }

    /// Creates or replaces a flag. Returns the view and whether it was new.
    pub async fn put_flag(
        &self,
        actor: &str,
        if_match: Option<u64>,
        flag: FlagConfig,
    ) -> Result<(Arc<View>, bool), StoreError> {
        flag.validate("flag").map_err(StoreError::Invalid)?;
        let mut created = false;
        let view = self
            .mutate(actor, if_match, |current, overrides| {
                let before = current.flags.iter().find(|f| f.name == flag.name);
                created = before.is_none();
                let before = before.map_or(Value::Null, |f| json!(f));
                overrides
                    .flags
                    .insert(flag.name.clone(), Some(flag.clone()));
                Ok(Change {
                    action: if created {
                        "flag.create"
                    } else {
                        "flag.replace"
                    },
                    target: format!("flags/{}", flag.name),
                    before,
                    after: json!(flag),
                })
            })
            .await?;
        Ok((view, created))
    }

    /// Applies an RFC 7386 merge patch to a flag.
    pub async fn patch_flag(
        &self,
        actor: &str,
        if_match: Option<u64>,
        name: &str,
        patch: Value,
    ) -> Result<Arc<View>, StoreError> {
        self.mutate(actor, if_match, |current, overrides| {
            let old = find_flag(current, name)?;
            let mut merged = json!(old);
            merge_patch(&mut merged, &patch);
            let mut flag: FlagConfig =
                serde_json::from_value(merged).map_err(|e| invalid("flag", e.to_string()))?;
            if flag.name != name {
                return Err(invalid(
                    "flag.name",
                    "a patch cannot rename a flag".to_owned(),
                ));
            }
            flag.name = name.to_owned();
            flag.validate("flag").map_err(StoreError::Invalid)?;
            let change = Change {
                action: "flag.patch",
                target: format!("flags/{name}"),
                before: json!(old),
                after: json!(flag),
            };
            overrides.flags.insert(name.to_owned(), Some(flag));
            Ok(change)
        })
        .await
    }

    pub async fn delete_flag(
        &self,
        actor: &str,
        if_match: Option<u64>,
        name: &str,
    ) -> Result<Arc<View>, StoreError> {
        self.mutate(actor, if_match, |current, overrides| {
            let old = find_flag(current, name)?;
            let before = json!(old);
            overrides.flags.insert(name.to_owned(), None);
            Ok(Change {
                action: "flag.delete",
                target: format!("flags/{name}"),
                before,
                after: Value::Null,
            })
        })
        .await
    }

    /// Replaces the configuration file's contents (a reload). Overrides the
    /// new topology cannot hold are dropped, each with an event. A file that
    /// loads to the running configuration changes nothing: no new version
    /// (operators' `If-Match` tags stay valid) and no event. That is the
    /// common case of SIGHUP after the file watcher already applied a change,
    /// or of a Kubernetes ConfigMap update that rewrote the same contents.
    pub async fn reload(&self, base: Config) -> Result<Arc<View>, StoreError> {
        base.validate().map_err(StoreError::Invalid)?;
        let mut inner = self.write.lock().await;
        if inner.base == base {
            return Ok(self.view());
        }
        let (kept, dropped) = fit(&base, inner.overrides.clone());
        let effective = overlay(&base, &kept);
        effective.validate().map_err(StoreError::Invalid)?;
        let version = inner.version + 1;
        self.persist(&kept, version).await?;
        let before = summary(&self.view().config);
        inner.base = base;
        inner.overrides = kept;
        inner.version = version;
        self.swap(version, effective, &inner.overrides);
        let after = summary(&self.view().config);
        self.record(
            &mut inner,
            "config-reload",
            Change {
                action: "config.reload",
                target: "config".into(),
                before,
                after,
            },
        )
        .await?;
        for change in dropped {
            self.record(&mut inner, "config-reload", change).await?;
        }
        Ok(self.view())
    }

    /// Audit events with `seq > after`, oldest first, at most `limit`.
    pub fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let Some(dir) = &self.dir else {
            let memory = self.memory_events.lock().expect("events lock");
            return Ok(memory
                .iter()
                .filter(|e| e.seq > after)
                .take(limit)
                .cloned()
                .collect());
        };
        let path = dir.join(EVENTS_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::Io(format!("{}: {e}", path.display()))),
        };
        let mut out = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
            let Ok(event) = serde_json::from_str::<Event>(&line) else {
                // A torn last line from a crash mid-append: skip it.
                continue;
            };
            if event.seq > after {
                out.push(event);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    // === the one write path ===

    async fn mutate(
        &self,
        actor: &str,
        if_match: Option<u64>,
        change: impl FnOnce(&Config, &mut Overrides) -> Result<Change, StoreError>,
    ) -> Result<Arc<View>, StoreError> {
        let mut inner = self.write.lock().await;
        if let Some(given) = if_match {
            if given != inner.version {
                return Err(StoreError::Stale {
                    current: inner.version,
                    given,
                });
            }
        }
        let current = self.view().config.clone();
        let mut next = inner.overrides.clone();
        let described = change(&current, &mut next)?;
        let effective = overlay(&inner.base, &next);
        effective.validate().map_err(StoreError::Invalid)?;
        let version = inner.version + 1;
        self.persist(&next, version).await?;
        inner.overrides = next;
        inner.version = version;
        self.swap(version, effective, &inner.overrides);
        self.record(&mut inner, actor, described).await?;
        Ok(self.view())
    }

    fn swap(&self, version: u64, effective: Config, overrides: &Overrides) {
        (self.apply)(&effective);
        self.view.store(Arc::new(View {
            version,
            config: Arc::new(effective),
            rollouts: Arc::new(overrides.rollouts.clone()),
        }));
    }

    // === rollouts ===

    /// Starts a rollout on `route` at its first step.
    pub async fn start_rollout(
        &self,
        actor: &str,
        if_match: Option<u64>,
        route: &str,
        spec: RolloutSpec,
    ) -> Result<Arc<View>, StoreError> {
        self.mutate(actor, if_match, |current, overrides| {
            spec.validate(current, route).map_err(StoreError::Invalid)?;
            if let Some(existing) = overrides.rollouts.get(route).filter(|r| r.phase.active()) {
                return Err(StoreError::Conflict(format!(
                    "route `{route}` already has a rollout of `{}` ({:?}); abort or promote it first",
                    existing.spec.target, existing.phase
                )));
            }
            let before = route_weights(current, route);
            let state = RolloutState::new(spec.clone(), now_rfc3339());
            let weights = rollout_weights(current, route, &state);
            let after = json!({ "rollout": &state, "weights": &weights });
            overrides.weights.insert(route.to_owned(), weights);
            overrides.rollouts.insert(route.to_owned(), state);
            Ok(Change { action: "rollout.start", target: format!("routes/{route}"), before, after })
        })
        .await
    }

    /// An operator's `promote`, `pause`, `resume` or `abort`.
    pub async fn rollout_action(
        &self,
        actor: &str,
        route: &str,
        action: &str,
    ) -> Result<Arc<View>, StoreError> {
        let actor_name = actor.to_owned();
        self.mutate(actor, None, |current, overrides| {
            let state = overrides
                .rollouts
                .get_mut(route)
                .ok_or_else(|| StoreError::NotFound(format!("route `{route}` has no rollout")))?;
            let before = json!({ "phase": state.phase, "step": state.step });
            let conflict = |what: &str| {
                StoreError::Conflict(format!("cannot {what} a rollout that is {:?}", state.phase))
            };
            let (phase, name) = match (action, state.phase) {
                ("pause", Phase::Progressing) => (Phase::Paused, "rollout.pause"),
                ("resume", Phase::Paused) => (Phase::Progressing, "rollout.resume"),
                ("promote", p) if p.active() => (Phase::Promoted, "rollout.promote"),
                // Blue-green keeps the old colour as standby: back in one swap.
                ("rollback", Phase::Promoted) if state.standby.is_some() => {
                    (Phase::RolledBack, "rollout.rollback")
                }
                ("rollback", p) if p.active() => (Phase::RolledBack, "rollout.rollback"),
                ("abort", p) if p.active() => (Phase::Aborted, "rollout.abort"),
                ("pause" | "resume" | "promote" | "abort" | "rollback", _) => {
                    return Err(conflict(action))
                }
                _ => {
                    return Err(StoreError::NotFound(format!(
                        "no rollout action `{action}`"
                    )))
                }
            };
            state.phase = phase;
            state.inconclusive = Dur(Duration::ZERO);
            state.consecutive_failures = 0;
            state.reason = match phase {
                Phase::Aborted => Some(format!("aborted by {actor_name}")),
                Phase::Promoted => Some(format!("promoted by {actor_name}")),
                Phase::RolledBack => Some(format!(
                    "rolled back to {} by {actor_name}",
                    state.spec.stable
                )),
                _ => None,
            };
            state.standby = standby_after(state);
            let weights = rollout_weights(current, route, state);
            let after = json!({ "phase": state.phase, "step": state.step, "weights": &weights });
            overrides.weights.insert(route.to_owned(), weights);
            Ok(Change {
                action: name,
                target: format!("routes/{route}"),
                before,
                after,
            })
        })
        .await
    }

    /// Applies one analysis of `route`'s progressing rollout. Progress within
    /// a step (held time, counters, the analysis) is persisted without a new
    /// version or an audit record; step changes, promotion, rollback and
    /// pause go through the audited write path.
    ///
    /// `gate` is the gate webhook's answer (asked by the driver when this
    /// analysis was expected to advance): an error holds the step.
    pub async fn rollout_analyzed(
        &self,
        route: &str,
        analysis: Analysis,
        gate: Result<(), String>,
    ) -> Result<RolloutOutcome, StoreError> {
        let mut inner = self.write.lock().await;
        let Some(mut state) = inner
            .overrides
            .rollouts
            .get(route)
            .filter(|r| r.phase == Phase::Progressing)
            .cloned()
        else {
            return Ok(RolloutOutcome::NotRunning);
        };
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
            let version = inner.version;
            inner.overrides.rollouts.insert(route.to_owned(), state);
            self.persist(&inner.overrides, version).await?;
            let view = self.view();
            self.view.store(Arc::new(View {
                version,
                config: view.config.clone(),
                rollouts: Arc::new(inner.overrides.rollouts.clone()),
            }));
            return Ok(RolloutOutcome::Stayed);
        }
        drop(inner);
        let analyzed_step = state.step;
        let last_step = state.spec.steps().len() - 1;
        let (actor, action, outcome) = match &decision {
            Decision::Advance if state.step < last_step => {
                state.step += 1;
                state.held = Dur(Duration::ZERO);
                state.step_entered = now_rfc3339();
                (
                    "rollout",
                    "rollout.step",
                    RolloutOutcome::Advanced(state.step),
                )
            }
            Decision::Advance => {
                state.phase = Phase::Promoted;
                state.reason = Some("every step held with passing analyses".into());
                state.standby = standby_after(&state);
                ("rollout", "rollout.promote", RolloutOutcome::Promoted)
            }
            Decision::RollBack(reason) => {
                state.phase = Phase::RolledBack;
                state.reason = Some(reason.clone());
                (
                    "auto-rollback",
                    "rollout.rollback",
                    RolloutOutcome::RolledBack(reason.clone()),
                )
            }
            Decision::Pause(reason) => {
                state.phase = Phase::Paused;
                state.reason = Some(reason.clone());
                ("rollout", "rollout.pause", RolloutOutcome::Paused)
            }
            Decision::Stay => unreachable!("handled above"),
        };
        self.mutate(actor, None, |current, overrides| {
            // An operator may have paused, aborted or promoted meanwhile.
            let still = overrides
                .rollouts
                .get(route)
                .is_some_and(|r| r.phase == Phase::Progressing && r.step == analyzed_step);
            if !still {
                return Err(StoreError::Conflict(format!(
                    "the rollout of `{route}` changed during its analysis"
                )));
            }
            let before =
                json!({ "phase": Phase::Progressing, "weights": route_weights(current, route) });
            let weights = rollout_weights(current, route, &state);
            let after = json!({
                "phase": state.phase, "step": state.step, "weights": &weights,
                "reason": &state.reason, "analysis": &state.last_analysis,
            });
            overrides.weights.insert(route.to_owned(), weights);
            overrides.rollouts.insert(route.to_owned(), state);
            Ok(Change {
                action,
                target: format!("routes/{route}"),
                before,
                after,
            })
        })
        .await?;
        Ok(outcome)
    }

    /// Writes the state file off the async runtime: an fsync must never
    /// stall the data plane sharing the runtime (with `workers: 1`, the same
    /// thread).
    async fn persist(&self, overrides: &Overrides, version: u64) -> Result<(), StoreError> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let overrides = overrides.clone();
        tokio::task::spawn_blocking(move || persist_blocking(&dir, overrides, version))
            .await
            .map_err(|e| StoreError::Io(format!("state write task failed: {e}")))?
    }

    /// Appends the audit event for `change` (off the runtime, like `persist`).
    async fn record(
        &self,
        inner: &mut Inner,
        actor: &str,
        change: Change,
    ) -> Result<(), StoreError> {
        let event = next_event(inner, actor, change);
        match self.dir.clone() {
            Some(dir) => tokio::task::spawn_blocking(move || append_event_blocking(&dir, &event))
                .await
                .map_err(|e| StoreError::Io(format!("audit append task failed: {e}")))?,
            None => {
                self.remember(event);
                Ok(())
            }
        }
    }

    fn remember(&self, event: Event) {
        let mut memory = self.memory_events.lock().expect("events lock");
        if memory.len() == MEMORY_EVENTS {
            memory.pop_front();
        }
        memory.push_back(event);
    }
}

fn next_event(inner: &mut Inner, actor: &str, change: Change) -> Event {
    let event = Event {
        seq: inner.next_seq,
        time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        actor: actor.to_owned(),
        action: change.action.to_owned(),
        target: change.target,
        before: change.before,
        after: change.after,
        version: inner.version,
    };
    inner.next_seq += 1;
    tracing::info!(seq = event.seq, actor = %event.actor, action = %event.action, target = %event.target, "change");
    event
}

fn persist_blocking(dir: &Path, overrides: Overrides, version: u64) -> Result<(), StoreError> {
    let state = StateFile {
        format: STATE_FORMAT,
        version,
        overrides,
    };
    let bytes = serde_json::to_vec_pretty(&state).expect("state serializes");
    write_atomic(dir, STATE_FILE, &bytes).map_err(|e| {
        StoreError::Io(format!(
            "{}: cannot write: {e}",
            dir.join(STATE_FILE).display()
        ))
    })
}

fn append_event_blocking(dir: &Path, event: &Event) -> Result<(), StoreError> {
    let path = dir.join(EVENTS_FILE);
    let mut line = serde_json::to_vec(event).expect("event serializes");
    line.push(b'\n');
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(&line).and_then(|()| f.sync_data()))
        .map_err(|e| {
            StoreError::Io(format!(
                "{}: change applied but audit append failed: {e}",
                path.display()
            ))
        })
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

/// Blue-green, once promoted: the old colour stays as standby.
fn standby_after(state: &RolloutState) -> Option<String> {
    (state.phase == Phase::Promoted && state.spec.strategy == Strategy::BlueGreen)
        .then(|| state.spec.stable.clone())
}

/// The route's weights with the rollout's target at its current weight: other
/// backends keep theirs, the stable backend takes the rest.
fn rollout_weights(config: &Config, route: &str, state: &RolloutState) -> BTreeMap<String, Weight> {
    let rc = config
        .routes
        .iter()
        .find(|r| r.name == route)
        .expect("rollout routes exist");
    let target = state.target_weight().basis_points();
    let others: u32 = rc
        .backends
        .iter()
        .filter(|b| b.name != state.spec.stable && b.name != state.spec.target)
        .map(|b| b.weight.basis_points())
        .sum();
    rc.backends
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
        .collect()
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The flag `name` of `config`, or the API's 404.
pub fn find_flag<'c>(config: &'c Config, name: &str) -> Result<&'c FlagConfig, StoreError> {
    config
        .flags
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| StoreError::NotFound(format!("no flag named `{name}`")))
}

fn invalid(field: &str, reason: String) -> StoreError {
    StoreError::Invalid(ConfigError::new(field, reason))
}

fn route_weights(config: &Config, route: &str) -> Value {
    config
        .route_weights(route)
        .map_or(Value::Null, |w| json!(w))
}

fn summary(config: &Config) -> Value {
    json!({
        "routes": config.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        "flags": config.flags.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
    })
}

/// `base` with `overrides` laid over it.
pub fn overlay(base: &Config, overrides: &Overrides) -> Config {
    let mut out = base.clone();
    for (route, weights) in &overrides.weights {
        if let Some(rc) = out.routes.iter_mut().find(|r| &r.name == route) {
            for b in &mut rc.backends {
                b.weight = weights.get(&b.name).copied().unwrap_or_default();
            }
        }
    }
    // A changed flag keeps its place; a new one goes last.
    for (name, flag) in &overrides.flags {
        match (out.flags.iter().position(|f| &f.name == name), flag) {
            (Some(i), Some(flag)) => out.flags[i] = flag.clone(),
            (Some(i), None) => {
                out.flags.remove(i);
            }
            (None, Some(flag)) => out.flags.push(flag.clone()),
            (None, None) => {}
        }
    }
    out
}

/// Splits `overrides` into those `base` can hold and audit records for those
/// it cannot (a route or backend that no longer exists, a sum that no longer
/// reaches 100).
fn fit(base: &Config, mut overrides: Overrides) -> (Overrides, Vec<Change>) {
    let mut dropped = Vec::new();
    overrides.weights.retain(|route, weights| {
        let why = match base.routes.iter().find(|r| &r.name == route) {
            None => Some("the route no longer exists".to_owned()),
            Some(rc) => weights
                .keys()
                .find(|b| !rc.backends.iter().any(|rb| &rb.name == *b))
                .map(|b| format!("backend `{b}` no longer exists")),
        };
        if let Some(why) = &why {
            tracing::warn!(route, reason = %why, "dropping weight override");
            dropped.push(Change {
                action: "override.dropped",
                target: format!("routes/{route}"),
                before: json!(weights),
                after: json!({ "reason": why }),
            });
        }
        why.is_none()
    });
    (overrides, dropped)
}

/// RFC 7386 JSON merge patch: objects merge recursively, `null` removes.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn read_state(path: &Path) -> Result<StateFile, StoreError> {
    let corrupt = |why: String| {
        StoreError::Io(format!(
            "state file {} is unreadable ({why}); fix or remove it, or start with --reset-state to move it aside",
            path.display()
        ))
    };
    let bytes = fs::read(path).map_err(|e| corrupt(e.to_string()))?;
    let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if state.format != STATE_FORMAT {
        return Err(corrupt(format!(
            "format {} is not {STATE_FORMAT}",
            state.format
        )));
    }
    Ok(state)
}

fn last_event_seq(path: &Path) -> Result<u64, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StoreError::Io(format!("{}: {e}", path.display()))),
    };
    let mut last = 0;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        if let Ok(event) = serde_json::from_str::<Event>(&line) {
            last = last.max(event.seq);
        }
    }
    Ok(last)
}

/// Writes `dir/name` so a crash leaves either the old or the new contents:
/// temp file, fsync, rename over, fsync the directory.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]});
        merge_patch(
            &mut doc,
            &json!({"a": null, "b": {"c": 9, "x": true}, "e": [2]}),
        );
        assert_eq!(doc, json!({"b": {"c": 9, "d": 3, "x": true}, "e": [2]}));
    }
}
