//! Fleet mode: many replicas behave as one proxy, with etcd as the shared
//! store (docs/fleet.md).
//!
//! - The state (weights, flags, rollouts, audit) is one document in etcd,
//!   written by transactions and watched by every replica (`store/etcd.rs`).
//! - Each replica holds one lease (`fleet.lease_ttl`). Bound to it: its
//!   membership record and its published traffic windows (refreshed every
//!   `fleet.publish_interval`), and the leader key of any rollout it drives.
//!   A replica that dies drops out of all three when its lease expires.
//! - Each progressing rollout is driven by one replica: the one whose
//!   lease-bound key `P/leaders/<route>` was created first. It judges the
//!   merged windows of every replica, and its writes are fenced on that key.
//! - The data plane never waits for etcd: it serves the last state applied.
//!
//! This module may use the store, the metrics and the etcd client; the data
//! plane knows nothing of it.

pub mod config;
pub mod etcd;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use self::config::FleetConfig;
use self::etcd::{Compare, Etcd, EtcdError, Op};
use crate::config::ConfigError;
use crate::metrics::Metrics;
use crate::rollout::Phase;
use crate::store::Store;
use crate::window::Histogram;

/// How often a replica that does not lead a rollout tries to take it over.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(500);
/// Longest pause between attempts to reach etcd again.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One replica's view of its fleet.
pub struct Fleet {
    pub etcd: Etcd,
    pub config: FleetConfig,
    pub replica_id: String,
    prefix: String,
    /// This replica's lease; 0 while it has none.
    lease: AtomicI64,
    /// Whether etcd answered the last request.
    up: AtomicBool,
    /// The revision served, and when it was committed (Unix ms) and applied.
    revision: AtomicI64,
    written_at_ms: AtomicU64,
    applied_at_ms: AtomicU64,
    /// Rollouts this replica campaigned for: whether it leads, and when that
    /// was last confirmed.
    leads: Mutex<HashMap<String, (bool, Instant)>>,
    metrics: OnceLock<Arc<Metrics>>,
    /// Tells the watch loop to drop its watch and read the state again: the
    /// membership loop saw etcd's state ahead of what this replica serves
    /// for longer than the watch should take (a member that went silent
    /// without closing the connection).
    rewatch: tokio::sync::Notify,
}

/// A replica's membership record (`P/replicas/<id>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub admin: String,
    pub data: String,
    pub version: u64,
    pub revision: i64,
    /// When the revision was applied here (Unix ms).
    pub applied_at_ms: u64,
    /// When this record was written (Unix ms).
    pub seen_at_ms: u64,
    pub leads: Vec<String>,
}

/// One replica's published traffic (`P/windows/<id>`): every route's
/// backends, over the analysis window of the route's rollout while one
/// progresses, else over `metrics.window`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Windows {
    pub replica: String,
    pub at_ms: u64,
    /// route → backend → window.
    pub routes: BTreeMap<String, BTreeMap<String, WireWindow>>,
    /// Watched flag → its cohorts' windows, off then on.
    #[serde(default)]
    pub flags: BTreeMap<String, [WireWindow; 2]>,
}

/// A window on the wire: counts and the non-zero latency buckets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireWindow {
    pub span_s: u64,
    pub requests: u64,
    /// Responses by status class, 1xx to 5xx.
    pub classes: [u64; 5],
    pub latency: Vec<(u32, u64)>,
}

/// A window as published.
fn wire(h: &Histogram) -> WireWindow {
    WireWindow {
        span_s: h.span.as_secs(),
        requests: h.requests,
        classes: h.classes,
        latency: h.sparse(),
    }
}

impl Fleet {
    /// Reads the TLS and password files; makes no connection.
    pub fn new(config: &FleetConfig) -> Result<Fleet, ConfigError> {
        let replica_id = config.replica_id();
        crate::config::check_name("fleet.replica_id", &replica_id).map_err(|e| {
            ConfigError::new(
                e.field,
                format!(
                    "{} (from $POD_NAME or the host name; set fleet.replica_id)",
                    e.reason
                ),
            )
        })?;
        Ok(Fleet {
            etcd: Etcd::new(&config.etcd)?,
            config: config.clone(),
            replica_id,
            prefix: config.etcd.prefix.clone(),
            lease: AtomicI64::new(0),
            up: AtomicBool::new(false),
            revision: AtomicI64::new(0),
            written_at_ms: AtomicU64::new(0),
            applied_at_ms: AtomicU64::new(0),
            leads: Mutex::new(HashMap::new()),
            metrics: OnceLock::new(),
            rewatch: tokio::sync::Notify::new(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `P/<suffix>`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.prefix)
    }

    pub fn leader_key(&self, route: &str) -> String {
        self.key(&format!("leaders/{route}"))
    }

    /// The guards of a write that only `route`'s leader may make: the
    /// leader key names this replica and is bound to its current lease (a
    /// second process with this replica's id has another lease).
    pub(crate) fn fence(&self, route: &str) -> [Compare; 2] {
        let key = self.leader_key(route);
        [
            Compare::Value(key.clone(), self.replica_id.as_bytes().to_vec()),
            Compare::Lease(key, self.lease.load(Ordering::Relaxed)),
        ]
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                tracing::info!(endpoint = %self.etcd.endpoint(), "fleet store reachable");
            } else {
                tracing::error!("fleet store (etcd) unreachable: serving the last state applied; writes answer 503 and rollouts hold");
            }
        }
        if let Some(m) = self.fleet_metrics() {
            m.store_up.set(i64::from(up));
        }
    }

    /// etcd failed the watch loop: marks it down and waits `backoff`, which
    /// doubles up to `MAX_BACKOFF`.
    async fn unreachable(&self, backoff: &mut Duration, error: &(dyn std::fmt::Display + Sync)) {
        self.set_up(false);
        tracing::debug!(error = %error, "fleet state not followed; trying again");
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    }

    fn fleet_metrics(&self) -> Option<&crate::metrics::FleetMetrics> {
        self.metrics.get().and_then(|m| m.fleet())
    }

    /// Notes that the state at `revision` is now served; `written_at_ms`:
    /// when it was committed, for a change that propagated (not for a state
    /// read at start or resync, which may be hours old).
    pub(crate) fn applied(&self, revision: i64, written_at_ms: Option<u64>) {
        let now = crate::store::unix_millis();
        self.revision.store(revision, Ordering::Relaxed);
        self.applied_at_ms.store(now, Ordering::Relaxed);
        self.set_up(true);
        if let Some(m) = self.fleet_metrics() {
            m.revision.set(revision);
        }
        if let Some(written) = written_at_ms {
            self.written_at_ms.store(written, Ordering::Relaxed);
            if let Some(m) = self.fleet_metrics() {
                m.watch_lag.set(now.saturating_sub(written) as f64 / 1000.0);
            }
        }
    }

    // === leadership ===

    /// Whether this replica drives `route`'s rollout, campaigning for it
    /// when no replica does. Confirmed with etcd at most every third of the
    /// lease TTL while leading, every `CAMPAIGN_EVERY` while not.
    pub async fn lead(&self, route: &str) -> bool {
        let lease = self.lease.load(Ordering::Relaxed);
        if lease == 0 {
            self.set_lead(route, false);
            return false;
        }
        if let Some((leading, checked)) = self.leads.lock().expect("leads lock").get(route) {
            let fresh = if *leading {
                self.config.lease_ttl.0 / 3
            } else {
                CAMPAIGN_EVERY
            };
            if checked.elapsed() < fresh {
                return *leading;
            }
        }
        let key = self.leader_key(route);
        let ours = |kv: &etcd::Kv| kv.value == self.replica_id.as_bytes() && kv.lease == lease;
        // A read first: a transaction with a put goes through etcd's log
        // even when its compare fails, and most replicas, most of the time,
        // only need to see that someone else leads.
        let leading = match self.etcd.get(&key).await {
            Ok((Some(kv), _)) => ours(&kv),
            Ok((None, _)) => {
                let result = self
                    .etcd
                    .txn(
                        &[Compare::ModRevision(key.clone(), 0)],
                        &[Op::Put {
                            key: key.clone(),
                            value: self.replica_id.as_bytes().to_vec(),
                            lease,
                        }],
                        &[Op::Get(key)],
                    )
                    .await;
                match result {
                    Ok(r) => r.succeeded || r.kvs.first().is_some_and(ours),
                    Err(e) => self.not_confirmed(route, &e),
                }
            }
            Err(e) => self.not_confirmed(route, &e),
        };
        self.set_lead(route, leading);
        leading
    }

    /// Leadership could not be read or taken: `false`, and etcd is marked
    /// down when it did not answer (a refusal, such as a lease that expired
    /// a moment ago, is not an outage).
    fn not_confirmed(&self, route: &str, e: &EtcdError) -> bool {
        if matches!(e, EtcdError::Unavailable(_)) {
            self.set_up(false);
        }
        tracing::debug!(error = %e, route, "leadership not confirmed");
        false
    }

    fn set_lead(&self, route: &str, leading: bool) {
        let before = self
            .leads
            .lock()
            .expect("leads lock")
            .insert(route.to_owned(), (leading, Instant::now()))
            .is_some_and(|(was, _)| was);
        if before != leading {
            if leading {
                tracing::info!(route, replica = %self.replica_id, "leading the rollout");
            } else {
                tracing::info!(route, replica = %self.replica_id, "not leading the rollout");
            }
        }
        if let Some(m) = self.fleet_metrics() {
            m.leader.with_label_values(&[route]).set(i64::from(leading));
        }
    }

    /// Whether another live replica publishes under this replica's id (two
    /// replicas with one id would overwrite each other's windows and share
    /// leaderships): said loudly once. `false` until etcd answered.
    async fn check_unique(&self, lease: i64) -> bool {
        match self
            .etcd
            .get(&self.key(&format!("replicas/{}", self.replica_id)))
            .await
        {
            Ok((Some(kv), _)) if kv.lease != lease => {
                tracing::error!(replica = %self.replica_id, "another live replica uses this fleet.replica_id (or this one restarted within fleet.lease_ttl); give every replica its own (default: $POD_NAME)");
                true
            }
            Ok(_) => true,
            Err(_) => false,
        }
    }

    /// `lease` is gone (its keys with it): a new one is granted at the next
    /// publication, and the leaderships bound to the old one are over.
    fn lease_expired(&self, lease: i64) {
        tracing::warn!(
            lease,
            "this replica's lease expired: its leaderships passed on"
        );
        self.lease.store(0, Ordering::Relaxed);
        for route in self.leading() {
            self.set_lead(&route, false);
        }
    }

    /// A fenced write found another leader (or none).
    pub(crate) fn lost_lead(&self, route: &str) {
        self.set_lead(route, false);
    }

    /// Routes whose rollout this replica leads, as last confirmed.
    pub fn leading(&self) -> Vec<String> {
        self.leads
            .lock()
            .expect("leads lock")
            .iter()
            .filter(|(_, (leading, _))| *leading)
            .map(|(route, _)| route.clone())
            .collect()
    }

    /// Gives up `route`'s leadership (its rollout no longer progresses).
    pub async fn resign(&self, route: &str) {
        let was = self
            .leads
            .lock()
            .expect("leads lock")
            .remove(route)
            .is_some_and(|(leading, _)| leading);
        if !was {
            return;
        }
        let key = self.leader_key(route);
        let _ = self
            .etcd
            .txn(
                &[Compare::Value(
                    key.clone(),
                    self.replica_id.as_bytes().to_vec(),
                )],
                &[Op::Delete(key)],
                &[],
            )
            .await;
        if let Some(m) = self.fleet_metrics() {
            m.leader.with_label_values(&[route]).set(0);
        }
    }

    // === windows ===

    /// The fleet's traffic over `span` on the sides of a rollout: this
    /// replica's own windows now (`local`), plus every other live
    /// replica's last publication of them (`pick`). Also returns how many
    /// replicas contributed.
    pub async fn merged_windows(
        &self,
        local: Vec<Histogram>,
        pick: impl for<'w> Fn(&'w Windows) -> Vec<Option<&'w WireWindow>>,
        span: Duration,
    ) -> Result<(Vec<Histogram>, usize), EtcdError> {
        let (kvs, _) = self.etcd.range(&self.key("windows/"), None, 0).await?;
        let mut merged = local;
        let mut replicas = 1;
        for kv in kvs {
            let Ok(published) = serde_json::from_slice::<Windows>(&kv.value) else {
                tracing::warn!(key = %kv.key, "unreadable published window ignored");
                continue;
            };
            if published.replica == self.replica_id {
                continue;
            }
            let mut counted = false;
            for (sum, window) in merged.iter_mut().zip(pick(&published)) {
                // A replica that has not yet seen the rollout publishes over
                // another span: left out rather than miscounted. A second
                // apart is the same span (early in a rollout the span grows
                // by the second, and replicas publish between analyses).
                let Some(w) = window.filter(|w| w.span_s.abs_diff(span.as_secs()) <= 1) else {
                    continue;
                };
                match Histogram::from_sparse(span, w.requests, w.classes, &w.latency) {
                    Some(h) => {
                        sum.merge(&h);
                        counted = true;
                    }
                    None => {
                        tracing::warn!(replica = %published.replica, "published window with a bucket out of range ignored")
                    }
                }
            }
            replicas += usize::from(counted);
        }
        Ok((merged, replicas))
    }

    /// This replica's windows: every route's backends, over the analysis
    /// span of the route's rollout while one progresses (what its leader
    /// merges), else over `metrics.window`.
    fn windows(&self, store: &Store, metrics: &Metrics) -> Windows {
        let view = store.view();
        let mut routes = BTreeMap::new();
        let now = std::time::SystemTime::now();
        for route in &view.config.routes {
            let span = match view.rollouts.get(&route.name) {
                // As the leader asks for it (replicas whose clocks disagree
                // by a second at a boundary are left out of that analysis).
                Some(r) if r.phase == Phase::Progressing => r.analysis_span(now),
                _ => metrics.window_span(),
            };
            let backends = route
                .backends
                .iter()
                .map(|b| {
                    let h = metrics.backend_histogram(&route.name, &b.name, span);
                    (b.name.clone(), wire(&h))
                })
                .collect();
            routes.insert(route.name.clone(), backends);
        }
        // Watched flags' cohorts, over the span of the flag's rollout while
        // one progresses.
        let mut flags = BTreeMap::new();
        for flag in metrics.watched_flags() {
            let span = match view.flag_rollouts.get(&*flag) {
                Some(r) if r.phase == Phase::Progressing => r.analysis_span(now),
                _ => metrics.window_span(),
            };
            if let Some(cohorts) = metrics.flag_histograms(&flag, span) {
                flags.insert(flag.to_string(), cohorts.map(|h| wire(&h)));
            }
        }
        Windows {
            replica: self.replica_id.clone(),
            at_ms: crate::store::unix_millis(),
            routes,
            flags,
        }
    }

    // === status ===

    /// `GET /v1/fleet`: this replica, the store's health, every live
    /// replica and each rollout's leader. A store that cannot be reached
    /// leaves the fleet-wide parts `null` with the reason.
    pub async fn status(&self, store: &Store) -> Value {
        let view = store.view();
        let this = json!({
            "id": self.replica_id,
            "version": view.version,
            "revision": self.revision.load(Ordering::Relaxed),
            "written_at_ms": self.written_at_ms.load(Ordering::Relaxed),
            "applied_at_ms": self.applied_at_ms.load(Ordering::Relaxed),
            "leads": self.leading(),
        });
        let (replicas_key, leaders_key) = (self.key("replicas/"), self.key("leaders/"));
        let both = async {
            tokio::join!(
                self.etcd.range(&replicas_key, None, 0),
                self.etcd.range(&leaders_key, None, 0)
            )
        };
        let limit = self.config.etcd.request_timeout.0 + self.config.etcd.dial_timeout.0;
        let (replicas, leaders) = tokio::time::timeout(limit, both).await.unwrap_or_else(|_| {
            let late = || Err(EtcdError::Unavailable("no answer in time".into()));
            (late(), late())
        });
        let (replicas, leaders, error) = match (replicas, leaders) {
            (Ok((replicas, _)), Ok((leaders, _))) => {
                let replicas: Vec<Value> = replicas
                    .iter()
                    .filter_map(|kv| serde_json::from_slice::<Member>(&kv.value).ok())
                    .map(|m| json!(m))
                    .collect();
                let leaders: BTreeMap<String, String> = leaders
                    .iter()
                    .filter_map(|kv| {
                        let route = kv.key.strip_prefix(&self.key("leaders/"))?;
                        Some((
                            route.to_owned(),
                            String::from_utf8_lossy(&kv.value).into_owned(),
                        ))
                    })
                    .collect();
                (json!(replicas), json!(leaders), Value::Null)
            }
            (Err(e), _) | (_, Err(e)) => (Value::Null, Value::Null, json!(e.to_string())),
        };
        json!({
            "mode": "fleet",
            "replica": this,
            "store": {
                "kind": "etcd",
                "endpoint": self.etcd.endpoint(),
                "prefix": self.prefix,
                "up": error.is_null(),
                "error": error,
            },
            "replicas": replicas,
            "leaders": leaders,
        })
    }
}

// === the replica's background work ===

/// Where this replica can be reached (for its membership record).
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub admin: SocketAddr,
    pub data: SocketAddr,
}

/// `addr` as other replicas and operators reach it: a wildcard listener
/// (`0.0.0.0`, `[::]`) is named by `$POD_IP` when Kubernetes gives it.
fn advertised(addr: SocketAddr) -> String {
    match std::env::var("POD_IP") {
        Ok(ip) if addr.ip().is_unspecified() && ip.parse::<std::net::IpAddr>().is_ok() => {
            SocketAddr::new(ip.parse().expect("checked"), addr.port()).to_string()
        }
        _ => addr.to_string(),
    }
}

/// Joins the fleet: brings the store to etcd's state (waiting at most the
/// dial and request timeouts: a fleet whose etcd is down still starts, on
/// its cache), then keeps it there and keeps this replica's lease,
/// membership and windows alive until `shutdown`. Leaves (revokes the lease,
/// so its leaderships pass on at once) on the way out. Does nothing
/// standalone.
pub async fn run(
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    addresses: Addresses,
    ready: tokio::sync::oneshot::Sender<()>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let Some(fleet) = store.fleet().cloned() else {
        let _ = ready.send(());
        return;
    };
    metrics.enable_fleet();
    let _ = fleet.metrics.set(metrics.clone());
    fleet.set_up(false);
    let first = fleet.config.etcd.dial_timeout.0 + fleet.config.etcd.request_timeout.0;
    let synced = match tokio::time::timeout(first, store.sync()).await {
        Ok(Ok(revision)) => Some(revision),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "fleet state not loaded at start: serving the cached state");
            None
        }
        Err(_) => {
            tracing::error!("etcd gave no answer at start: serving the cached state");
            None
        }
    };
    let _ = ready.send(());
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => {}
        _ = watch(&store, &fleet, synced) => {}
        _ = membership(&store, &fleet, &metrics, addresses) => {}
    }
    let lease = fleet.lease.swap(0, Ordering::Relaxed);
    if lease != 0 {
        let _ = tokio::time::timeout(
            fleet.config.etcd.request_timeout.0,
            fleet.etcd.revoke(lease),
        )
        .await;
    }
}

/// Watches `P/state` from the revision after `synced`, applying each change;
/// after a dropped watch or a compaction, reloads and watches again.
async fn watch(store: &Store, fleet: &Fleet, mut synced: Option<i64>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let from = match synced.take() {
            Some(revision) => revision,
            None => match store.sync().await {
                Ok(revision) => revision,
                Err(e) => {
                    fleet.unreachable(&mut backoff, &e).await;
                    continue;
                }
            },
        };
        let mut stream = match fleet.etcd.watch(&fleet.key("state"), false, from + 1).await {
            Ok(stream) => stream,
            Err(e) => {
                fleet.unreachable(&mut backoff, &e).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = fleet.rewatch.notified() => {
                    tracing::warn!("fleet watch fell behind etcd's state; watching again");
                    break;
                }
            };
            match next {
                Ok(Some((events, _))) => {
                    // The stream works: the next failure starts a new backoff.
                    backoff = Duration::from_millis(100);
                    for event in events {
                        if event.deleted {
                            tracing::error!(key = %event.kv.key, "the fleet's state was deleted from etcd; serving the last state (a restarted replica seeds it again)");
                        } else {
                            store.watched(&event.kv).await;
                        }
                    }
                }
                Ok(None) => {
                    tracing::warn!("fleet watch ended; reloading");
                    break;
                }
                Err(EtcdError::Compacted(revision)) => {
                    tracing::warn!(revision, "fleet watch fell behind a compaction; reloading");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fleet watch failed; reloading");
                    break;
                }
            }
        }
        // A watch that ends at once, again and again, must not turn into a
        // loop of full reads.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Keeps the lease alive and publishes the membership record and windows
/// every `publish_interval`.
async fn membership(store: &Store, fleet: &Fleet, metrics: &Metrics, addresses: Addresses) {
    let ttl = fleet.config.lease_ttl.0;
    let mut tick = tokio::time::interval(fleet.config.publish_interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewed = Instant::now();
    let mut checked_id = false;
    // A revision of the state seen in etcd but not yet served, and when.
    let mut unserved: Option<(i64, Instant)> = None;
    loop {
        tick.tick().await;
        let mut lease = fleet.lease.load(Ordering::Relaxed);
        if lease == 0 {
            match fleet.etcd.grant(ttl).await {
                Ok(id) => {
                    lease = id;
                    renewed = Instant::now();
                    fleet.lease.store(id, Ordering::Relaxed);
                }
                Err(e) => {
                    fleet.set_up(false);
                    tracing::debug!(error = %e, "no lease");
                    continue;
                }
            }
        } else if renewed.elapsed() >= ttl / 3 {
            match fleet.etcd.keep_alive(lease).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    fleet.lease_expired(lease);
                    continue;
                }
                Err(e) => {
                    fleet.set_up(false);
                    tracing::debug!(error = %e, "lease not renewed");
                    if renewed.elapsed() >= ttl {
                        for route in fleet.leading() {
                            fleet.set_lead(&route, false);
                        }
                    }
                    continue;
                }
            }
        }
        let member = Member {
            id: fleet.replica_id.clone(),
            admin: advertised(addresses.admin),
            data: advertised(addresses.data),
            version: store.view().version,
            revision: fleet.revision.load(Ordering::Relaxed),
            applied_at_ms: fleet.applied_at_ms.load(Ordering::Relaxed),
            seen_at_ms: crate::store::unix_millis(),
            leads: fleet.leading(),
        };
        let windows = fleet.windows(store, metrics);
        if !checked_id {
            checked_id = fleet.check_unique(lease).await;
        }
        let put = |suffix: &str, value: Vec<u8>| Op::Put {
            key: fleet.key(&format!("{suffix}/{}", fleet.replica_id)),
            value,
            lease,
        };
        let published = fleet
            .etcd
            .txn(
                &[],
                &[
                    put("replicas", serde_json::to_vec(&member).expect("serializes")),
                    put("windows", serde_json::to_vec(&windows).expect("serializes")),
                    Op::Revisions(fleet.key("state")),
                ],
                &[],
            )
            .await;
        match published {
            Ok(result) => {
                fleet.set_up(true);
                // The watch brings a change within milliseconds: one still
                // not served two intervals after it was seen in etcd means
                // the watch is not working.
                let served = fleet.revision.load(Ordering::Relaxed);
                let latest = result.kvs.first().map_or(0, |kv| kv.mod_revision);
                unserved = match unserved {
                    Some((revision, _)) if served >= revision => None,
                    Some((_, since)) if since.elapsed() >= 2 * fleet.config.publish_interval.0 => {
                        fleet.rewatch.notify_one();
                        None
                    }
                    Some(pending) => Some(pending),
                    None if latest > served => Some((latest, Instant::now())),
                    None => None,
                };
            }
            Err(EtcdError::Refused(why)) if why.contains("lease not found") => {
                fleet.lease_expired(lease);
            }
            Err(e) => {
                if matches!(e, EtcdError::Unavailable(_)) {
                    fleet.set_up(false);
                }
                tracing::debug!(error = %e, "membership not published");
            }
        }
        if let Some(m) = fleet.fleet_metrics() {
            if let Ok(count) = fleet.etcd.count(&fleet.key("replicas/")).await {
                m.replicas.set(count as i64);
            }
        }
    }
}
