//! The etcd backend (fleet mode). Keys under the fleet's prefix `P`:
//!
//! ```text
//! P/state              the state document (this file's `Document`)
//! P/events/<seq>       one audit event per key, seq zero-padded to 20 digits
//! P/replicas/<id>      membership, bound to the replica's lease  (fleet/mod.rs)
//! P/windows/<id>       published traffic windows, lease-bound    (fleet/mod.rs)
//! P/leaders/<route>    who drives the route's rollout, lease-bound (fleet/mod.rs)
//! ```
//!
//! A write is one transaction: if `P/state` is still at the revision this
//! replica last saw (and, for a rollout's own progress, `P/leaders/<route>`
//! still names this replica), put the new document and its event; otherwise
//! read the document that got in first, so the write path can run the change
//! again on it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::file::{self, FleetCache, StateDir};
use super::{Event, Inner, Next, Overrides, Store, StoreError};
use crate::fleet::etcd::{Compare, EtcdError, Kv, Op};
use crate::fleet::Fleet;

/// Audit events kept in etcd; older ones are deleted as new ones come.
const EVENTS_KEPT: u64 = 10_000;

/// The fleet's state, as stored at `P/state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// The state's version: `ETag` and `If-Match` of the admin API. Goes up
    /// by one with each audited change, fleet-wide.
    pub version: u64,
    /// The next audit event's sequence number.
    pub next_seq: u64,
    pub overrides: Overrides,
    /// Unix milliseconds of the write, by the writer's clock (propagation
    /// lag is measured against it).
    #[serde(default)]
    pub written_at_ms: u64,
    /// The replica that wrote it.
    #[serde(default)]
    pub written_by: String,
}

/// What a commit did.
pub(super) enum Commit {
    /// Written, at this revision.
    Done(i64),
    /// Another write got in first: the state it left, at its revision.
    Moved(Document, i64),
}

pub(super) struct EtcdBackend {
    fleet: Arc<Fleet>,
    cache: Option<StateDir>,
    /// The revision last written to the cache: writes run in tasks of their
    /// own, and an older one finishing last must not win.
    cached: Arc<tokio::sync::Mutex<i64>>,
}

impl EtcdBackend {
    pub fn new(fleet: Arc<Fleet>, cache: Option<StateDir>) -> EtcdBackend {
        EtcdBackend {
            fleet,
            cache,
            cached: Arc::new(tokio::sync::Mutex::new(0)),
        }
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Commits `next` if the state is still at `revision`.
    pub async fn commit(&self, revision: i64, next: &Next<'_>) -> Result<Commit, StoreError> {
        let fleet = &self.fleet;
        let state_key = fleet.key("state");
        let document = Document {
            version: next.version,
            next_seq: next.next_seq,
            overrides: next.overrides.clone(),
            written_at_ms: unix_millis(),
            written_by: fleet.replica_id.clone(),
        };
        let mut compare = vec![Compare::ModRevision(state_key.clone(), revision)];
        if let Some(route) = next.fence {
            compare.extend(fleet.fence(route));
        }
        let mut success = vec![Op::Put {
            key: state_key.clone(),
            value: serde_json::to_vec(&document).expect("document serializes"),
            lease: 0,
        }];
        if let Some(event) = next.event {
            success.push(Op::Put {
                key: event_key(fleet, event.seq),
                value: serde_json::to_vec(event).expect("event serializes"),
                lease: 0,
            });
            if event.seq > EVENTS_KEPT {
                success.push(Op::DeleteRange(
                    fleet.key("events/"),
                    event_key(fleet, event.seq - EVENTS_KEPT + 1),
                ));
            }
        }
        // On failure: the state that got in first, and whatever holds this
        // write's audit sequence number (this very write, if an earlier
        // attempt through another member landed after all).
        let mut failure = vec![Op::Get(state_key.clone())];
        if let Some(event) = next.event {
            failure.push(Op::Get(event_key(fleet, event.seq)));
        }
        let result = fleet
            .etcd
            .txn(&compare, &success, &failure)
            .await
            .map_err(|e| match e {
                EtcdError::Unavailable(_) => StoreError::Unavailable(format!(
                    "the fleet's store is unavailable: {e}. If etcd was only slow the change may \
                     still be committed: check the version (GET /v1/state) before retrying, or \
                     retry with If-Match"
                )),
                e => unavailable(e),
            })?;
        if result.succeeded {
            fleet.applied(result.revision, Some(document.written_at_ms));
            self.cache(&document, result.revision);
            return Ok(Commit::Done(result.revision));
        }
        let found_state = result.kvs.iter().find(|kv| kv.key == state_key);
        // The client tries the next member when one gives no answer in
        // time: the first may have committed this very write, possibly with
        // other writes after it. Its audit event says so.
        let landed = next.event.and_then(|event| {
            let key = event_key(fleet, event.seq);
            let kv = result.kvs.iter().find(|kv| kv.key == key)?;
            let found: Event = serde_json::from_slice(&kv.value).ok()?;
            (found == *event).then_some(kv.mod_revision)
        });
        if let Some(at) = landed {
            fleet.applied(at, Some(document.written_at_ms));
            return Ok(Commit::Done(at));
        }
        match (found_state, next.fence) {
            (Some(kv), _) if kv.mod_revision != revision => {
                let (found, at) = decode(kv)?;
                // The same, for a write without an event (rollout progress)
                // with nothing after it.
                let ours = found.written_by == fleet.replica_id
                    && found.version == document.version
                    && found.next_seq == document.next_seq
                    && found.overrides == document.overrides;
                if ours {
                    fleet.applied(at, Some(found.written_at_ms));
                    self.cache(&found, at);
                    return Ok(Commit::Done(at));
                }
                Ok(Commit::Moved(found, at))
            }
            (None, _) => Err(StoreError::Unavailable(format!(
                "{state_key} is missing from etcd; restart a replica to seed it again"
            ))),
            // The state is where it was: the fence failed.
            (Some(_), Some(route)) => {
                fleet.lost_lead(route);
                Err(StoreError::Conflict(format!(
                    "this replica no longer leads the rollout of `{route}`"
                )))
            }
            (Some(_), None) => Err(StoreError::Unavailable(format!(
                "the write to {state_key} failed its check without a newer state; try again"
            ))),
        }
    }

    /// `Store::sync` with the write lock held.
    pub(super) async fn sync_locked(
        &self,
        store: &Store,
        inner: &mut Inner,
    ) -> Result<i64, StoreError> {
        let fleet = &self.fleet;
        let state_key = fleet.key("state");
        let (found, header) = fleet.etcd.get(&state_key).await.map_err(unavailable)?;
        let (document, revision) = match found {
            Some(kv) => decode(&kv)?,
            None => {
                let seed = Document {
                    version: inner.version,
                    next_seq: inner.next_seq,
                    overrides: seed(&inner.base, &inner.overrides),
                    written_at_ms: unix_millis(),
                    written_by: fleet.replica_id.clone(),
                };
                let result = fleet
                    .etcd
                    .txn(
                        &[Compare::ModRevision(state_key.clone(), 0)],
                        &[Op::Put {
                            key: state_key.clone(),
                            value: serde_json::to_vec(&seed).expect("document serializes"),
                            lease: 0,
                        }],
                        &[Op::Get(state_key.clone())],
                    )
                    .await
                    .map_err(unavailable)?;
                if result.succeeded {
                    tracing::info!(
                        prefix = fleet.prefix(),
                        revision = result.revision,
                        "seeded the fleet's state from this replica"
                    );
                    (seed, result.revision)
                } else {
                    let kv = result.kvs.first().ok_or_else(|| {
                        StoreError::Unavailable(format!("{state_key} vanished while seeding"))
                    })?;
                    decode(kv)?
                }
            }
        };
        // Whatever revision this replica saw before: a restored or reseeded
        // etcd may be at a lower one, and what was just read is the truth
        // (for the cache too).
        *self.cached.lock().await = 0;
        self.cache(&document, revision);
        inner.revision = 0;
        store.adopt_locked(inner, document, revision);
        // A read, not a propagation: no lag to report.
        fleet.applied(inner.revision, None);
        Ok(header.max(revision))
    }

    /// Audit events with `seq > after`, oldest first, at most `limit`.
    pub async fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let fleet = &self.fleet;
        let from = event_key(fleet, after + 1);
        let (kvs, _) = fleet
            .etcd
            .range(&fleet.key("events/"), Some(&from), limit)
            .await
            .map_err(unavailable)?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// Writes the cache in `state_dir`, off the runtime; a failure is
    /// logged (the cache serves only a start without etcd).
    fn cache(&self, document: &Document, revision: i64) {
        let Some(dir) = self.cache.clone() else {
            return;
        };
        let state = file::new_state(
            document.version,
            document.overrides.clone(),
            Vec::new(),
            Some(FleetCache {
                prefix: self.fleet.prefix().to_owned(),
                revision,
                next_seq: document.next_seq,
            }),
        );
        let cached = self.cached.clone();
        tokio::spawn(async move {
            let mut last = cached.lock().await;
            if revision <= *last {
                return;
            }
            match dir.write(state).await {
                Ok(()) => *last = revision,
                Err(e) => tracing::warn!(error = %e, "fleet state cache not written"),
            }
        });
    }
}

impl Store {
    /// Fleet mode: brings the store to etcd's current state, seeding etcd
    /// with this replica's state (its cache, else its configuration's
    /// weights and flags) when the prefix holds none. Returns the revision
    /// to watch from. Does nothing standalone.
    pub async fn sync(&self) -> Result<i64, StoreError> {
        let super::Backend::Etcd(backend) = &self.backend else {
            return Ok(0);
        };
        // Held across the reads: a write of this replica's landing between
        // the read and the adoption would otherwise be undone by it.
        let mut inner = self.write.lock().await;
        backend.sync_locked(self, &mut inner).await
    }

    /// Fleet mode: applies a watched change of `P/state`.
    pub(crate) async fn watched(&self, kv: &Kv) {
        let super::Backend::Etcd(backend) = &self.backend else {
            return;
        };
        match decode(kv) {
            Ok((document, revision)) => {
                let written_at = document.written_at_ms;
                backend.cache(&document, revision);
                self.adopt(document, revision).await;
                backend.fleet.applied(self.revision(), Some(written_at));
            }
            Err(e) => tracing::error!(error = %e, "fleet state not applied"),
        }
    }
}

/// The state a fleet starts from: every route's weights and every flag of
/// `base` made explicit, so that after seeding etcd is the truth for them
/// whatever a replica's own file says; what `overrides` holds wins.
fn seed(base: &crate::config::Config, overrides: &Overrides) -> Overrides {
    let mut seeded = overrides.clone();
    for route in &base.routes {
        seeded.weights.entry(route.name.clone()).or_insert_with(|| {
            route
                .backends
                .iter()
                .map(|b| (b.name.clone(), b.weight))
                .collect()
        });
    }
    for flag in &base.flags {
        seeded
            .flags
            .entry(flag.name.clone())
            .or_insert_with(|| Some(flag.clone()));
    }
    seeded
}

fn decode(kv: &Kv) -> Result<(Document, i64), StoreError> {
    serde_json::from_slice(&kv.value)
        .map(|d| (d, kv.mod_revision))
        .map_err(|e| {
            StoreError::Io(format!(
                "{} in etcd is not a Switchyard state document: {e}",
                kv.key
            ))
        })
}

fn event_key(fleet: &Fleet, seq: u64) -> String {
    fleet.key(&format!("events/{seq:020}"))
}

/// An etcd failure as the write path reports it: a refusal (credentials,
/// permissions, size) is not something a retry mends.
pub(crate) fn unavailable(e: EtcdError) -> StoreError {
    match e {
        EtcdError::Refused(why) => {
            StoreError::Refused(format!("the fleet's store refused this replica: {why}"))
        }
        e => StoreError::Unavailable(format!("the fleet's store is unavailable: {e}")),
    }
}

pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
