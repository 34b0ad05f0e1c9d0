//! The runtime state: the configuration file's topology and initial values,
//! with the changes made through the admin API laid over them.
//!
//! Every change goes through one path: take the write lock, check the caller's
//! `If-Match` version, apply the change to a copy, validate the whole
//! resulting configuration, commit it to the backend, swap the new routing
//! snapshot in, and only then answer. A change rejected at any step before
//! the commit changes nothing.
//!
//! Two backends keep the state, behind this one write path:
//! - **file** (`file.rs`, standalone): `state_dir/state.json` written
//!   atomically and `events.jsonl` appended; or memory only without a
//!   `state_dir`.
//! - **etcd** (`etcd.rs`, fleet mode): one document under `{prefix}/state`,
//!   changed by etcd transactions guarded by its revision, with the audit
//!   event in the same transaction; every replica watches the document and
//!   adopts each new revision (`adopt`). `state_dir` is a cache of the last
//!   revision seen, served when etcd cannot be reached at start.
//!
//! Overrides survive config reloads and restarts: the API's word wins over the
//! file's initial values until `--reset-state`. An override the new topology
//! cannot hold (its route or backend is gone) is dropped with an audit event
//! (standalone) or left out of this replica's routing only (fleet: another
//! replica's topology may still hold it).

mod etcd;
mod file;
mod log;
mod rollouts;

pub use rollouts::{RolloutOutcome, Subject};

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bucket::BUCKETS;
use crate::config::{Config, ConfigError, FlagConfig, Weight};
use crate::fleet::Fleet;
use crate::rollout::{FlagRolloutSpec, RolloutState};

pub(crate) use etcd::unix_millis;
pub use etcd::Document;
use etcd::{Commit, EtcdBackend};
use file::StateDir;

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
    /// flag → its latest guarded rollout.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flag_rollouts: BTreeMap<String, RolloutState<FlagRolloutSpec>>,
}

/// Events the audit log may refuse (kept in `state.json` meanwhile) before
/// admin changes are refused.
const MAX_UNLOGGED: usize = 10_000;
/// Events kept when there is no `state_dir`.
const MEMORY_EVENTS: usize = 10_000;
/// How often a write retries when another replica's write got in first.
const COMMIT_ATTEMPTS: usize = 8;

/// One audit record (a line of `events.jsonl`, a key under
/// `{prefix}/events/` in fleet mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// RFC 3339, UTC, seconds.
    pub time: String,
    /// A token name, `anonymous` (open loopback admin), `config-reload`,
    /// `startup`, `rollout` or `auto-rollback`.
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before: Value,
    pub after: Value,
    /// State version after the change.
    pub version: u64,
    /// The replica that took the change (fleet mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
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
    /// The fleet's store (etcd) cannot be reached: nothing changed.
    #[error("{0}")]
    Unavailable(String),
    /// The fleet's store refuses this replica (credentials, permissions):
    /// nothing changed, and retrying will not help.
    #[error("{0}")]
    Refused(String),
}

/// The current effective configuration and its version.
#[derive(Debug)]
pub struct View {
    pub version: u64,
    pub config: Arc<Config>,
    /// Every route's latest rollout, with its progress.
    pub rollouts: Arc<BTreeMap<String, RolloutState>>,
    /// Every flag's latest guarded rollout.
    pub flag_rollouts: Arc<BTreeMap<String, RolloutState<FlagRolloutSpec>>>,
    /// The etcd revision of the state served (fleet mode; 0 standalone).
    pub revision: i64,
    /// What the runtime state sets over the configuration file.
    pub overridden: Arc<Overridden>,
}

/// The routes whose weights and the flags that an API change or a rollout
/// set over the configuration file (edits of the file to those do not take
/// effect until they are reset).
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Overridden {
    pub routes: Vec<String>,
    pub flags: Vec<String>,
}

impl Overridden {
    fn of(overrides: &Overrides) -> Overridden {
        Overridden {
            routes: overrides.weights.keys().cloned().collect(),
            flags: overrides.flags.keys().cloned().collect(),
        }
    }
}

/// What `reset` drops.
#[derive(Debug, Clone, PartialEq)]
pub enum ResetTarget {
    All,
    Route(String),
    Flag(String),
}

struct Inner {
    base: Config,
    overrides: Overrides,
    version: u64,
    next_seq: u64,
    /// The etcd revision `overrides` was read or written at (fleet mode).
    revision: i64,
}

/// Where the state is kept.
enum Backend {
    /// Standalone, in `state_dir` (or memory only without one).
    File(Option<StateDir>),
    /// Fleet mode: etcd, with `state_dir` as a cache.
    Etcd(EtcdBackend),
}

pub struct Store {
    write: tokio::sync::Mutex<Inner>,
    view: ArcSwap<View>,
    apply: Applier,
    backend: Backend,
    memory_events: std::sync::Mutex<VecDeque<Event>>,
    /// Standalone: rollout decisions applied while `state_dir` could not be
    /// written (they never wait for the disk); persisted again by
    /// `retry_persist`. Admin writes are refused meanwhile.
    unpersisted: std::sync::atomic::AtomicBool,
    /// Audit events the log has not taken yet: in `state.json` (or, while
    /// `unpersisted`, only here), appended by `flush_log`.
    unlogged: std::sync::Mutex<Vec<Event>>,
    /// The audit log refused its last append (logged once per outage).
    log_failing: std::sync::atomic::AtomicBool,
    /// Writes of `state_dir` that failed (`switchyard_state_persist_failures_total`).
    persist_failures: std::sync::atomic::AtomicU64,
}

/// A change described for the audit log.
pub struct Change {
    pub action: &'static str,
    pub target: String,
    pub before: Value,
    pub after: Value,
}

/// The next state, as handed to a backend.
struct Next<'a> {
    overrides: &'a Overrides,
    version: u64,
    next_seq: u64,
    event: Option<&'a Event>,
    /// Fleet mode: commit only while this replica leads this route's
    /// rollout.
    fence: Option<&'a str>,
    /// A rollout's own decision or progress: standalone, applied even when
    /// `state_dir` cannot be written (a rollback must never wait for the
    /// disk), and persisted later.
    judged: bool,
}

impl Store {
    /// Loads persisted state from `base.state_dir` (if any), lays it over
    /// `base`, applies the result, and returns the store. A state file that
    /// cannot be read or parsed stops start-up with an error naming it, unless
    /// `reset` (then it is moved aside, never overwritten, and start-up
    /// continues from `base`).
    ///
    /// With `base.fleet`, the state file is the cache of the fleet's state
    /// and the store starts from it (or from `base` without one); `sync`
    /// then brings it to etcd's current revision, before the proxy serves.
    pub fn open(base: Config, reset: bool, apply: Applier) -> Result<Store, StoreError> {
        let dir = base
            .state_dir
            .as_deref()
            .map(|d| StateDir::open(d, &base.audit))
            .transpose()?;
        let mut startup_events = Vec::new();
        // Events a crash left in `state.json` before the log took them.
        let mut recovered = Vec::new();
        let (mut overrides, mut version, mut next_seq, mut revision) =
            (Overrides::default(), 0, 1, 0);
        let fleet = match &base.fleet {
            Some(config) => Some(Arc::new(Fleet::new(config).map_err(StoreError::Invalid)?)),
            None => None,
        };
        if let Some(dir) = &dir {
            let logged = match fleet {
                None => dir.log().last_seq()?,
                Some(_) => 0,
            };
            next_seq = logged + 1;
            if reset && dir.state_path().exists() {
                let aside = dir.move_aside()?;
                startup_events.push(Change {
                    action: "state.reset",
                    target: "state".into(),
                    before: json!({ "moved_to": aside.display().to_string() }),
                    after: Value::Null,
                });
            } else if let Some(state) = dir.read()? {
                match (&fleet, state.fleet) {
                    (None, _) => {
                        overrides = state.overrides;
                        version = state.version;
                        recovered = state.unlogged;
                        recovered.retain(|e| e.seq > logged);
                        if let Some(last) = recovered.last() {
                            tracing::warn!(events = recovered.len(), "audit events the log had not taken before the last stop are appended now");
                            next_seq = next_seq.max(last.seq + 1);
                        }
                    }
                    (Some(f), Some(cache)) if cache.prefix == f.prefix() => {
                        overrides = state.overrides;
                        version = state.version;
                        next_seq = cache.next_seq;
                        revision = cache.revision;
                        tracing::info!(revision, version, "starting from the cached fleet state");
                    }
                    (Some(f), cache) => tracing::warn!(
                        file = %dir.state_path().display(),
                        cached = ?cache.map(|c| c.prefix),
                        prefix = f.prefix(),
                        "the state file is not a cache of this fleet's state; not used"
                    ),
                }
            }
        }
        let (kept, dropped) = fit(&base, overrides.clone());
        if fleet.is_none() {
            overrides = kept.clone();
            startup_events.extend(dropped);
        }
        let effective = overlay(&base, &kept);
        effective.validate().map_err(StoreError::Invalid)?;
        apply(&effective);
        let backend = match fleet {
            Some(fleet) => Backend::Etcd(EtcdBackend::new(fleet, dir)),
            None => Backend::File(dir),
        };
        let store = Store {
            view: ArcSwap::from_pointee(View {
                version,
                config: Arc::new(effective),
                rollouts: Arc::new(overrides.rollouts.clone()),
                flag_rollouts: Arc::new(overrides.flag_rollouts.clone()),
                revision,
                overridden: Arc::new(Overridden::of(&overrides)),
            }),
            write: tokio::sync::Mutex::new(Inner {
                base,
                overrides,
                version,
                next_seq,
                revision,
            }),
            apply,
            backend,
            memory_events: std::sync::Mutex::new(VecDeque::new()),
            unpersisted: Default::default(),
            unlogged: Default::default(),
            log_failing: Default::default(),
            persist_failures: Default::default(),
        };
        if let Backend::File(dir) = &store.backend {
            let mut inner = store
                .write
                .try_lock()
                .expect("no one else holds a new store");
            let mut events = recovered;
            let fresh = !startup_events.is_empty();
            for change in startup_events {
                events.push(store.make_event(&inner, "startup", change, inner.version));
                inner.next_seq += 1;
            }
            match dir {
                Some(dir) if !events.is_empty() => {
                    if fresh {
                        // New events go into `state.json` with the state
                        // first (recovered ones are there already).
                        let state = file::new_state(
                            inner.version,
                            inner.overrides.clone(),
                            events.clone(),
                            None,
                        );
                        dir.write_blocking(&state)?;
                    }
                    *store.unlogged.lock().expect("unlogged lock") = events;
                    store.flush_log_blocking(dir);
                }
                Some(_) => {}
                None => events.into_iter().for_each(|e| store.remember(e)),
            }
        }
        Ok(store)
    }

    /// The fleet this store belongs to (fleet mode).
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        match &self.backend {
            Backend::Etcd(b) => Some(b.fleet()),
            Backend::File(_) => None,
        }
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
                let ended = flag_rollout_yields(overrides, &flag.name, Some(&flag), actor)?;
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
                    after: with_rollout_ended(json!(flag), ended),
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
            let ended = flag_rollout_yields(overrides, name, Some(&flag), actor)?;
            let change = Change {
                action: "flag.patch",
                target: format!("flags/{name}"),
                before: json!(old),
                after: with_rollout_ended(json!(flag), ended),
            };
            overrides.flags.insert(name.to_owned(), Some(flag));
            Ok(change)
        })
        .await
    }

    /// Drops what the runtime state sets over the configuration file: one
    /// route's weights, one flag, or everything (active rollouts excepted:
    /// a route with one is refused). Audited as `override.reset`.
    pub async fn reset(&self, actor: &str, target: ResetTarget) -> Result<Arc<View>, StoreError> {
        self.mutate(actor, None, |_, overrides| {
            let active: Vec<&String> = overrides
                .rollouts
                .iter()
                .filter(|(route, r)| {
                    r.phase.active()
                        && match &target {
                            ResetTarget::Route(name) => *route == name,
                            ResetTarget::All => true,
                            ResetTarget::Flag(_) => false,
                        }
                })
                .map(|(route, _)| route)
                .collect();
            if let Some(route) = active.first() {
                return Err(StoreError::Conflict(format!(
                    "route `{route}` has an active rollout, which sets its weights; abort or finish it first"
                )));
            }
            if let Some((flag, _)) = overrides.flag_rollouts.iter().find(|(flag, r)| {
                r.phase.active()
                    && match &target {
                        ResetTarget::Flag(name) => *flag == name,
                        ResetTarget::All => true,
                        ResetTarget::Route(_) => false,
                    }
            }) {
                return Err(StoreError::Conflict(format!(
                    "flag `{flag}` has an active rollout, which sets its percentage; abort or finish it first"
                )));
            }
            let before = json!({
                "weights": &overrides.weights,
                "flags": &overrides.flags,
            });
            let (name, dropped) = match &target {
                ResetTarget::All => {
                    let any = !overrides.weights.is_empty() || !overrides.flags.is_empty();
                    overrides.weights.clear();
                    overrides.flags.clear();
                    ("overrides".to_owned(), any)
                }
                ResetTarget::Route(route) => (
                    format!("routes/{route}"),
                    overrides.weights.remove(route).is_some(),
                ),
                ResetTarget::Flag(flag) => (
                    format!("flags/{flag}"),
                    overrides.flags.remove(flag).is_some(),
                ),
            };
            if !dropped {
                return Err(StoreError::NotFound(format!(
                    "{name}: nothing set over the configuration file to reset"
                )));
            }
            Ok(Change {
                action: "override.reset",
                target: name,
                before,
                after: json!({
                    "weights": &overrides.weights,
                    "flags": &overrides.flags,
                }),
            })
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
            flag_rollout_yields(overrides, name, None, actor)?;
            // Its ended rollout goes with it: a flag made again under this
            // name must not inherit (or `undo` to) the old one's start.
            overrides.flag_rollouts.remove(name);
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
    ///
    /// In fleet mode the file gives this replica's topology only: the
    /// fleet's state is not written, so the version stays; overrides the new
    /// topology cannot hold are left out of this replica's routing.
    pub async fn reload(&self, base: Config) -> Result<Arc<View>, StoreError> {
        base.validate().map_err(StoreError::Invalid)?;
        let mut inner = self.write.lock().await;
        if inner.base == base {
            return Ok(self.view());
        }
        if let Backend::Etcd(_) = &self.backend {
            let (kept, _) = fit(&base, inner.overrides.clone());
            let effective = overlay(&base, &kept);
            effective.validate().map_err(StoreError::Invalid)?;
            inner.base = base;
            self.swap(&inner, effective);
            return Ok(self.view());
        }
        let (kept, dropped) = fit(&base, inner.overrides.clone());
        let effective = overlay(&base, &kept);
        effective.validate().map_err(StoreError::Invalid)?;
        warn_shadowed(&inner.base, &base, &kept);
        let version = inner.version + 1;
        let reloaded = Change {
            action: "config.reload",
            target: "config".into(),
            before: summary(&self.view().config),
            after: summary(&effective),
        };
        let first_seq = inner.next_seq;
        let mut events = Vec::new();
        for change in std::iter::once(reloaded).chain(dropped) {
            events.push(self.make_event(&inner, "config-reload", change, version));
            inner.next_seq += 1;
        }
        if let Err(e) = self.record(version, &kept, events, false).await {
            inner.next_seq = first_seq;
            return Err(e);
        }
        inner.base = base;
        inner.overrides = kept;
        inner.version = version;
        self.swap(&inner, effective);
        Ok(self.view())
    }

    /// The sequence number of the newest audit event (0 for none): where
    /// a follower of the log starts. Behind the write lock, which a write
    /// holds only while it commits.
    pub async fn latest_seq(&self) -> u64 {
        self.write.lock().await.next_seq.saturating_sub(1)
    }

    /// Audit events with `seq > after`, oldest first, at most `limit`.
    pub async fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        match &self.backend {
            Backend::Etcd(etcd) => etcd.events(after, limit).await,
            Backend::File(Some(dir)) => {
                let mut events = dir.events(after, limit).await?;
                // Those still waiting for the log come after all it holds.
                let logged = events.last().map_or(after, |e| e.seq);
                let unlogged = self.unlogged.lock().expect("unlogged lock");
                let room = limit - events.len();
                events.extend(
                    unlogged
                        .iter()
                        .filter(|e| e.seq > logged)
                        .take(room)
                        .cloned(),
                );
                Ok(events)
            }
            Backend::File(None) => {
                let memory = self.memory_events.lock().expect("events lock");
                Ok(memory
                    .iter()
                    .filter(|e| e.seq > after)
                    .take(limit)
                    .cloned()
                    .collect())
            }
        }
    }

    /// Records an observation that changes no state (an endpoint ejected or
    /// readmitted) in the audit log, under the actor `health`. Standalone
    /// only: in a fleet each replica sees its own endpoints, so these stay
    /// in its log and metrics rather than the fleet's audit.
    pub async fn note(&self, action: &'static str, target: String, before: Value, after: Value) {
        if let Backend::Etcd(_) = &self.backend {
            return;
        }
        let mut inner = self.write.lock().await;
        let change = Change {
            action,
            target,
            before,
            after,
        };
        let event = self.make_event(&inner, "health", change, inner.version);
        inner.next_seq += 1;
        // An observation: kept in memory rather than refused when the disk
        // is away.
        if let Err(e) = self
            .record(inner.version, &inner.overrides, vec![event], true)
            .await
        {
            tracing::warn!(error = %e, "health event not recorded");
        }
    }

    // === the one write path ===

    /// Applies `change` to the current state and commits the result. In
    /// fleet mode another replica's write may have got in first: the store
    /// then adopts that state and runs `change` again on it (an `If-Match`
    /// that no longer holds makes that a 409).
    async fn mutate(
        &self,
        actor: &str,
        if_match: Option<u64>,
        mut change: impl FnMut(&Config, &mut Overrides) -> Result<Change, StoreError> + Send,
    ) -> Result<Arc<View>, StoreError> {
        self.mutate_fenced(actor, if_match, None, false, &mut change)
            .await
    }

    async fn mutate_fenced(
        &self,
        actor: &str,
        if_match: Option<u64>,
        fence: Option<&str>,
        judged: bool,
        change: &mut (dyn FnMut(&Config, &mut Overrides) -> Result<Change, StoreError> + Send),
    ) -> Result<Arc<View>, StoreError> {
        let mut inner = self.write.lock().await;
        if let Backend::Etcd(etcd) = &self.backend {
            // Never synced (etcd was away at start): the fleet's state, or
            // its seed, comes first. A tag newer than this replica's version
            // means it is a few milliseconds behind the fleet: catch up
            // rather than refuse the newest tag.
            let ahead = if_match.is_some_and(|given| given > inner.version);
            if inner.revision == 0 || ahead {
                etcd.sync_locked(self, &mut inner).await?;
            }
        }
        for _ in 0..COMMIT_ATTEMPTS {
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
            if next == inner.overrides {
                // A change to what already is (the same weights again, an
                // identical flag): no new version, no event.
                return Ok(self.view());
            }
            let (kept, _) = fit(&inner.base, next.clone());
            let effective = overlay(&inner.base, &kept);
            effective.validate().map_err(StoreError::Invalid)?;
            let version = inner.version + 1;
            let event = self.make_event(&inner, actor, described, version);
            let committed = self
                .commit(
                    &inner,
                    Next {
                        overrides: &next,
                        version,
                        next_seq: inner.next_seq + 1,
                        event: Some(&event),
                        fence,
                        judged,
                    },
                )
                .await?;
            match committed {
                Commit::Done(revision) => {
                    inner.overrides = next;
                    inner.version = version;
                    inner.next_seq += 1;
                    inner.revision = revision;
                    self.swap(&inner, effective);
                    return Ok(self.view());
                }
                Commit::Moved(document, revision) => {
                    self.adopt_moved(&mut inner, document, revision)
                }
            }
        }
        Err(StoreError::Conflict(format!(
            "the fleet's state kept changing under this write ({COMMIT_ATTEMPTS} attempts); try again"
        )))
    }

    /// Hands the next state to the backend.
    async fn commit(&self, inner: &Inner, next: Next<'_>) -> Result<Commit, StoreError> {
        match &self.backend {
            Backend::File(_) => {
                let events = next.event.cloned().into_iter().collect();
                self.record(next.version, next.overrides, events, next.judged)
                    .await?;
                Ok(Commit::Done(0))
            }
            Backend::Etcd(etcd) => etcd.commit(inner.revision, &next).await,
        }
    }

    /// Swaps in the routing for `effective` (when it changed) and the view
    /// of `inner`.
    fn swap(&self, inner: &Inner, effective: Config) {
        let current = self.view();
        let config = if *current.config == effective {
            current.config.clone()
        } else {
            (self.apply)(&effective);
            Arc::new(effective)
        };
        self.view.store(Arc::new(View {
            version: inner.version,
            config,
            rollouts: Arc::new(inner.overrides.rollouts.clone()),
            flag_rollouts: Arc::new(inner.overrides.flag_rollouts.clone()),
            revision: inner.revision,
            overridden: Arc::new(Overridden::of(&inner.overrides)),
        }));
    }

    /// Fleet mode: takes `document`, read from etcd at `revision`, as the
    /// state, unless this replica already has that revision or a later one.
    /// Overrides this replica's topology cannot hold are left out of its
    /// routing (and logged), not out of the fleet's state.
    fn adopt_locked(&self, inner: &mut Inner, document: Document, revision: i64) {
        if revision <= inner.revision {
            return;
        }
        let (kept, dropped) = fit(&inner.base, document.overrides.clone());
        for change in &dropped {
            tracing::warn!(target = %change.target, reason = %change.after["reason"], "fleet state has an override this replica's configuration cannot hold; not applied here");
        }
        let effective = overlay(&inner.base, &kept);
        // The fleet's state is taken whole either way: a later write of this
        // replica's must build on it, never on what it had before.
        inner.overrides = document.overrides;
        inner.version = document.version;
        inner.next_seq = document.next_seq;
        inner.revision = revision;
        match effective.validate() {
            Ok(()) => self.swap(inner, effective),
            Err(e) => {
                tracing::error!(revision, error = %e, "fleet state cannot be applied to this replica's configuration; its routing stays as it was");
                let routing = self.view().config.as_ref().clone();
                self.swap(inner, routing);
            }
        }
    }

    /// Adopts the state a failed commit read back: just read from etcd under
    /// the lock, it is the truth even at a lower revision than this replica
    /// saw (a restored etcd).
    fn adopt_moved(&self, inner: &mut Inner, document: Document, revision: i64) {
        inner.revision = 0;
        self.adopt_locked(inner, document, revision);
    }

    /// `adopt_locked` behind the write lock.
    pub(crate) async fn adopt(&self, document: Document, revision: i64) {
        let mut inner = self.write.lock().await;
        self.adopt_locked(&mut inner, document, revision);
    }

    /// The etcd revision of the state served (fleet mode).
    pub fn revision(&self) -> i64 {
        self.view().revision
    }

    /// The audit record of `change`, taking the next sequence number.
    fn make_event(&self, inner: &Inner, actor: &str, change: Change, version: u64) -> Event {
        let event = Event {
            seq: inner.next_seq,
            time: now_rfc3339(),
            actor: actor.to_owned(),
            action: change.action.to_owned(),
            target: change.target,
            before: change.before,
            after: change.after,
            version,
            replica: self.fleet().map(|f| f.replica_id.clone()),
        };
        tracing::info!(seq = event.seq, actor = %event.actor, action = %event.action, target = %event.target, "change");
        event
    }

    /// Standalone: keeps `version` and `overrides` with their audit
    /// `events` — in `state_dir`, or in memory without one. (etcd keeps a
    /// fleet's events in the commit's transaction.)
    async fn record(
        &self,
        version: u64,
        overrides: &Overrides,
        events: Vec<Event>,
        judged: bool,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Etcd(_) => Ok(()),
            Backend::File(None) => {
                events.into_iter().for_each(|e| self.remember(e));
                Ok(())
            }
            Backend::File(Some(dir)) => self.persist(dir, version, overrides, events, judged).await,
        }
    }

    /// Writes the state with `events`, and any earlier ones the audit log
    /// has not taken, in one atomic step, then appends them to the log: a
    /// crash at any point leaves a state and its events, or neither.
    ///
    /// A `judged` change (a rollout's own decision, a health observation)
    /// never waits for the disk: refused by it, it is kept in memory and
    /// `retry_persist` writes it later. Any other change is refused (503)
    /// while that is so, or while the log has refused [`MAX_UNLOGGED`]
    /// events.
    async fn persist(
        &self,
        dir: &StateDir,
        version: u64,
        overrides: &Overrides,
        events: Vec<Event>,
        judged: bool,
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut batch = self.unlogged.lock().expect("unlogged lock").clone();
        if !judged && self.unpersisted.load(Relaxed) {
            return Err(StoreError::Unavailable(format!(
                "{} cannot be written, and rollout decisions wait to be persisted; changes are refused until it can be (nothing changed)",
                dir.state_path().display()
            )));
        }
        if !judged && batch.len() >= MAX_UNLOGGED {
            return Err(StoreError::Unavailable(format!(
                "the audit log in {} cannot be appended and {} events wait for it; changes are refused until it can be (nothing changed)",
                dir.dir.display(),
                batch.len()
            )));
        }
        batch.extend(events);
        let state = file::new_state(version, overrides.clone(), batch.clone(), None);
        match dir.write(state).await {
            Ok(()) => {
                *self.unlogged.lock().expect("unlogged lock") = batch;
                if self.unpersisted.swap(false, Relaxed) {
                    tracing::warn!(version, "state persisted again: admin changes are accepted");
                }
                self.flush_log(dir).await;
                Ok(())
            }
            Err(e) => {
                self.persist_failures.fetch_add(1, Relaxed);
                if !judged {
                    return Err(StoreError::Unavailable(format!("{e} (nothing changed)")));
                }
                *self.unlogged.lock().expect("unlogged lock") = batch;
                if !self.unpersisted.swap(true, Relaxed) {
                    tracing::error!(error = %e, "state cannot be persisted: rollout decisions are applied in memory and persisted once the disk takes them; admin changes are refused until then");
                }
                Ok(())
            }
        }
    }

    /// Appends the events the audit log has not taken yet (all in
    /// `state.json` by now); those it refuses wait there for the next try.
    async fn flush_log(&self, dir: &StateDir) {
        let batch = self.unlogged.lock().expect("unlogged lock").clone();
        if batch.is_empty() {
            return;
        }
        let last = batch.last().map(|e| e.seq);
        let appended = dir.append(batch).await;
        self.logged(appended, last);
    }

    /// `flush_log` at start-up, blocking.
    fn flush_log_blocking(&self, dir: &StateDir) {
        let batch = self.unlogged.lock().expect("unlogged lock").clone();
        let last = batch.last().map(|e| e.seq);
        self.logged(dir.log().append(&batch), last);
    }

    /// Takes note of an append of the events up to `last`.
    fn logged(&self, appended: Result<(), StoreError>, last: Option<u64>) {
        use std::sync::atomic::Ordering::Relaxed;
        match appended {
            Ok(()) => {
                let last = last.unwrap_or(0);
                self.unlogged
                    .lock()
                    .expect("unlogged lock")
                    .retain(|e| e.seq > last);
                if self.log_failing.swap(false, Relaxed) {
                    tracing::warn!("audit log appended again");
                }
            }
            Err(e) => {
                self.persist_failures.fetch_add(1, Relaxed);
                if !self.log_failing.swap(true, Relaxed) {
                    tracing::error!(error = %e, "audit log cannot be appended: its events are kept in state.json until it can be");
                }
            }
        }
    }

    /// Standalone: writes what judged changes left in memory while
    /// `state_dir` could not be written, and appends what the audit log
    /// refused. Called by the driver every second; cheap when nothing waits.
    pub async fn retry_persist(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let Backend::File(Some(dir)) = &self.backend else {
            return;
        };
        let waiting = !self.unlogged.lock().expect("unlogged lock").is_empty();
        if !self.unpersisted.load(Relaxed) && !waiting {
            return;
        }
        let inner = self.write.lock().await;
        if self.unpersisted.load(Relaxed) {
            if let Err(e) = self
                .persist(dir, inner.version, &inner.overrides, Vec::new(), true)
                .await
            {
                tracing::debug!(error = %e, "state still cannot be persisted");
            }
        } else {
            self.flush_log(dir).await;
        }
    }

    /// `(failed writes of state_dir so far, decisions waiting to be
    /// persisted)`.
    pub fn persistence(&self) -> (u64, bool) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.persist_failures.load(Relaxed),
            self.unpersisted.load(Relaxed),
        )
    }

    fn remember(&self, event: Event) {
        let mut memory = self.memory_events.lock().expect("events lock");
        if memory.len() == MEMORY_EVENTS {
            memory.pop_front();
        }
        memory.push_back(event);
    }
}

/// What `switchyard check` says of the state file in `config.state_dir`
/// (none without one): its version and what of it this configuration
/// cannot hold, or why it cannot be used, naming it. Reads only.
pub fn check_state(config: &Config) -> Result<Option<String>, StoreError> {
    let Some(dir) = &config.state_dir else {
        return Ok(None);
    };
    let path = dir.join(file::STATE_FILE);
    if !path.exists() {
        return Ok(Some(format!("state: none yet in {}", dir.display())));
    }
    let state = file::read_state(&path)?;
    let role = match (&config.fleet, &state.fleet) {
        (Some(_), Some(_)) => " (the fleet state's cache)",
        (Some(_), None) => " (standalone state: not used in fleet mode)",
        (None, _) => "",
    };
    let (_, dropped) = fit(config, state.overrides);
    let mut summary = format!(
        "state: {} at version {}{role}",
        path.display(),
        state.version
    );
    if !dropped.is_empty() {
        let targets: Vec<String> = dropped.into_iter().map(|c| c.target).collect();
        summary.push_str(&format!(
            "; overrides this configuration cannot hold are dropped at start: {}",
            targets.join(", ")
        ));
    }
    Ok(Some(summary))
}

/// Logs each value the new configuration file `next` changes (from `was`)
/// that the runtime state overrides: the edit does not take effect.
fn warn_shadowed(was: &Config, next: &Config, overrides: &Overrides) {
    for route in overrides.weights.keys() {
        if was.route_weights(route) != next.route_weights(route) {
            tracing::warn!(
                route = %route,
                "the configuration file changes this route's weights, but an API change or rollout set them over the file: they stay; `switchyard ctl reset {route}` returns to the file's"
            );
        }
    }
    for flag in overrides.flags.keys() {
        let find = |c: &Config| c.flags.iter().find(|f| &f.name == flag).cloned();
        if find(was) != find(next) {
            tracing::warn!(
                flag = %flag,
                "the configuration file changes this flag, but an API change set it over the file: it stays; `switchyard ctl reset {flag}` returns to the file's"
            );
        }
    }
}

/// A write of flag `name` (`None`: its deletion) while a rollout of it is
/// under way: refused, for the rollout sets the flag's percentage, unless
/// it turns the flag off. The kill switch always works: it ends the rollout
/// as aborted, and the flag stays as written. Returns whether it ended one.
fn flag_rollout_yields(
    overrides: &mut Overrides,
    name: &str,
    written: Option<&FlagConfig>,
    actor: &str,
) -> Result<bool, StoreError> {
    let Some(rollout) = overrides
        .flag_rollouts
        .get_mut(name)
        .filter(|r| r.phase.active())
    else {
        return Ok(false);
    };
    if written.is_some_and(|f| !f.enabled) {
        rollout.phase = crate::rollout::Phase::Aborted;
        rollout.reason = Some(format!("turned off by {actor}: the rollout ended"));
        return Ok(true);
    }
    Err(StoreError::Conflict(format!(
        "flag `{name}` has a rollout under way ({:?}, step {}), which sets its percentage: abort it first, or turn the flag off (enabled: false), which ends it",
        rollout.phase,
        rollout.step + 1
    )))
}

/// A flag write's audit `after`, saying when the write ended the flag's
/// rollout (`"rollout": "aborted"`).
fn with_rollout_ended(mut after: Value, ended: bool) -> Value {
    if ended {
        after["rollout"] = json!("aborted");
    }
    after
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
    // An active rollout's stable backend is where its route fails over.
    for (route, rollout) in &overrides.rollouts {
        if let Some(rc) = out.routes.iter_mut().find(|r| &r.name == route) {
            if rollout.phase.active() {
                rc.stable = Some(rollout.spec.stable.clone());
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Phase, RolloutSpec};

    /// A route that leaves the configuration file mid-rollout: the rollout
    /// can still be ended (there are no weights left to set), and a new
    /// one started once the route is back.
    #[tokio::test]
    async fn a_rollout_whose_route_left_the_file_can_be_ended() {
        let yaml = |routes: &str| {
            format!(
                "routes:\n{routes}  - name: other\n    match: {{ path_prefix: /other }}\n    backends: [{{ name: x, endpoints: [\"127.0.0.1:1\"], weight: 100 }}]\n"
            )
        };
        let api = "  - name: api\n    backends:\n      - { name: blue, endpoints: [\"127.0.0.1:1\"], weight: 100 }\n      - { name: canary, endpoints: [\"127.0.0.1:1\"], weight: 0 }\n";
        let with_api = Config::from_yaml(&yaml(api)).unwrap();
        let store = Store::open(with_api.clone(), false, Box::new(|_| {})).unwrap();
        let spec: RolloutSpec = serde_json::from_str(
            r#"{"stable":"blue","target":"canary","steps":[{"weight":10,"hold":"1h"},{"weight":100}]}"#,
        )
        .unwrap();
        store
            .start_rollout("t", None, "api", spec.clone())
            .await
            .unwrap();
        store
            .reload(Config::from_yaml(&yaml("")).unwrap())
            .await
            .unwrap();
        let view = store
            .rollout_action::<RolloutSpec>("t", "api", "abort")
            .await
            .unwrap();
        assert_eq!(view.rollouts["api"].phase, Phase::Aborted);
        store.reload(with_api).await.unwrap();
        store.start_rollout("t", None, "api", spec).await.unwrap();
    }

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
