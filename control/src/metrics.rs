//! The golden signals, as Prometheus metrics and rolling windows.
//!
//! One `Metrics` is built at start-up (by `main`, or a test) and passed down:
//! no global registry. When a routing snapshot is built, every (route,
//! backend) gets its `BackendStats`: label values resolved once, so a request
//! only touches atomics. Labels come from configuration only, never from
//! request data, so cardinality is bounded by the config.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::rollout::Kind;
use crate::window::{self, RollingWindow, WindowStats};

/// Latency buckets (seconds): sub-millisecond to 10 s, including the 2 s and
/// 5 s alert and rollback thresholds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Why an upstream exchange failed (`switchyard_upstream_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Connection refused or unreachable.
    Connect,
    /// No connection within `timeouts.connect`.
    ConnectTimeout,
    /// No response headers within `timeouts.request`.
    Timeout,
    /// Connection closed or reset, or broken HTTP, before the response headers.
    Reset,
    /// The client went away before the response headers.
    Cancelled,
    /// The client's request body failed on its way up (aborted, incomplete,
    /// malformed, too large): the client's fault, never the backend's. The
    /// request counts in no window, error rate or analysis.
    ClientBody,
    /// Every endpoint of the backend was ejected or down: the request went
    /// to the stable backend instead, and counts as this backend's failure.
    Ejected,
}

impl FailureReason {
    pub const ALL: [FailureReason; 7] = [
        FailureReason::Connect,
        FailureReason::ConnectTimeout,
        FailureReason::Timeout,
        FailureReason::Reset,
        FailureReason::Cancelled,
        FailureReason::ClientBody,
        FailureReason::Ejected,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailureReason::Connect => "connect",
            FailureReason::ConnectTimeout => "connect_timeout",
            FailureReason::Timeout => "timeout",
            FailureReason::Reset => "reset",
            FailureReason::Cancelled => "cancelled",
            FailureReason::ClientBody => "client_body",
            FailureReason::Ejected => "ejected",
        }
    }
}

/// Why a request was answered before a backend was chosen
/// (`switchyard_unrouted_requests_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    NoRoute,
    Malformed,
    HeadersTooLarge,
    BodyTooLarge,
    Overloaded,
    UnknownForcedBackend,
}

impl Unrouted {
    const ALL: [Unrouted; 6] = [
        Unrouted::NoRoute,
        Unrouted::Malformed,
        Unrouted::HeadersTooLarge,
        Unrouted::BodyTooLarge,
        Unrouted::Overloaded,
        Unrouted::UnknownForcedBackend,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Unrouted::NoRoute => "no_route",
            Unrouted::Malformed => "malformed",
            Unrouted::HeadersTooLarge => "headers_too_large",
            Unrouted::BodyTooLarge => "body_too_large",
            Unrouted::Overloaded => "overloaded",
            Unrouted::UnknownForcedBackend => "unknown_forced_backend",
        }
    }
}

const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The metric families and every backend's pre-resolved handles.
pub struct Metrics {
    registry: Registry,
    enabled: bool,
    window: Duration,
    origin: Instant,
    requests: IntCounterVec,
    duration: HistogramVec,
    failures: IntCounterVec,
    retries: IntCounterVec,
    failovers: IntCounterVec,
    in_flight: IntGaugeVec,
    weight: prometheus::GaugeVec,
    connections: IntGauge,
    unrouted: Box<[IntCounter]>,
    reloads: IntCounterVec,
    flags: IntCounterVec,
    /// Per kind of rollout (`Kind::Route`, then `Kind::Flag`).
    rollout_step: [IntGaugeVec; 2],
    rollbacks: [IntCounterVec; 2],
    checks: [IntCounterVec; 2],
    tls_reloads: IntCounterVec,
    tls_handshake_failures: IntCounter,
    connections_shed: IntCounter,
    /// `switchyard_http2_flood_closed_total`.
    http2_flood_closed: IntCounter,
    tls_expiry: prometheus::GaugeVec,
    backends: ArcSwap<Vec<Arc<BackendStats>>>,
    /// `switchyard_flag_requests_total{flag,variant,code_class}`.
    flag_requests: IntCounterVec,
    /// Watched flags' cohorts, kept across snapshots; also read by the
    /// `switchyard_flag_request_duration_seconds` collector.
    cohorts: Arc<ArcSwap<Vec<Arc<FlagCohorts>>>>,
    /// Registered when the replica runs in a fleet (`enable_fleet`).
    fleet: std::sync::OnceLock<FleetMetrics>,
    /// `switchyard_endpoint_healthy{route,backend,endpoint}`.
    endpoint_healthy: IntGaugeVec,
    /// `switchyard_state_persist_failures_total`.
    persist_failures: IntCounter,
    /// `switchyard_state_unpersisted`: 1 while rollout decisions wait for
    /// `state_dir` to be writable.
    unpersisted: IntGauge,
    /// (route, backend) → endpoint → `healthy` | `ejected` | `unhealthy`,
    /// as last seen by the data plane's health supervisor.
    endpoint_states: ArcSwap<EndpointStates>,
}

/// (route, backend) → endpoint → its state's label.
pub type EndpointStates =
    std::collections::BTreeMap<(String, String), std::collections::BTreeMap<String, &'static str>>;

/// The fleet families: only a fleet replica has them, so a standalone
/// proxy exports no `store_up 0` for an alert to misread.
pub struct FleetMetrics {
    /// `switchyard_fleet_revision_applied`: the etcd revision served.
    pub revision: IntGauge,
    /// `switchyard_fleet_store_up`: 1 while etcd answers.
    pub store_up: IntGauge,
    /// `switchyard_fleet_leader{route}`: 1 where this replica drives the
    /// route's rollout.
    pub leader: IntGaugeVec,
    /// `switchyard_fleet_watch_lag_seconds`: from the last applied change's
    /// commit (its writer's clock) to this replica serving it.
    pub watch_lag: prometheus::Gauge,
    /// `switchyard_fleet_replicas`: replicas with a live membership lease.
    pub replicas: IntGauge,
}

/// `switchyard_flag_evaluations_total{flag, result="on"|"off"}` of one flag.
#[derive(Debug, Clone)]
pub struct FlagCounters {
    on: IntCounter,
    off: IntCounter,
}

impl FlagCounters {
    pub fn count(&self, on: bool) {
        if on {
            self.on.inc()
        } else {
            self.off.inc()
        }
    }
}

/// Pre-resolved handles for one (route, backend).
pub struct BackendStats {
    pub route: Arc<str>,
    pub backend: Arc<str>,
    requests: [IntCounter; 5],
    duration: Histogram,
    failures: [IntCounter; 7],
    /// `switchyard_retries_total{reason}`: attempts sent again after a
    /// failure on this backend.
    retries: [IntCounter; 7],
    /// `switchyard_failovers_total`: requests of this backend's users served
    /// by the stable backend.
    failovers: IntCounter,
    in_flight: IntGauge,
    window: RollingWindow,
}

/// A watched flag's two cohorts: the requests of users for whom it was off,
/// and of those for whom it was on.
pub struct FlagCohorts {
    pub flag: Arc<str>,
    off: Cohort,
    on: Cohort,
}

struct Cohort {
    requests: [IntCounter; 5],
    duration: Option<LatencyBuckets>,
    window: RollingWindow,
}

/// A cohort's latency histogram (`DURATION_BUCKETS`, then +Inf), counted
/// here and served by `CohortLatency` at scrape time: the bucket is found
/// once per request for all its flags, and each flag adds two relaxed
/// increments.
#[derive(Default)]
struct LatencyBuckets {
    counts: [std::sync::atomic::AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: std::sync::atomic::AtomicU64,
}

/// `switchyard_flag_request_duration_seconds`, from every watched flag's
/// `LatencyBuckets`.
struct CohortLatency {
    desc: prometheus::core::Desc,
    cohorts: Arc<ArcSwap<Vec<Arc<FlagCohorts>>>>,
}

impl prometheus::core::Collector for CohortLatency {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto::{Bucket, LabelPair, Metric, MetricFamily, MetricType};
        use std::sync::atomic::Ordering::Relaxed;
        let mut metrics = Vec::new();
        for flag in self.cohorts.load().iter() {
            for (variant, cohort) in [("off", &flag.off), ("on", &flag.on)] {
                let Some(latency) = &cohort.duration else {
                    continue;
                };
                let mut cumulative = 0;
                let mut buckets = Vec::with_capacity(DURATION_BUCKETS.len());
                for (bound, count) in DURATION_BUCKETS.iter().zip(&latency.counts) {
                    cumulative += count.load(Relaxed);
                    let mut b = Bucket::default();
                    b.set_upper_bound(*bound);
                    b.set_cumulative_count(cumulative);
                    buckets.push(b);
                }
                let total = cumulative + latency.counts[DURATION_BUCKETS.len()].load(Relaxed);
                let mut histogram = prometheus::proto::Histogram::default();
                histogram.set_bucket(buckets);
                histogram.set_sample_count(total);
                histogram.set_sample_sum(latency.sum_nanos.load(Relaxed) as f64 / 1e9);
                let label = |name: &str, value: &str| {
                    let mut l = LabelPair::default();
                    l.set_name(name.into());
                    l.set_value(value.into());
                    l
                };
                let mut metric =
                    Metric::from_label(vec![label("flag", &flag.flag), label("variant", variant)]);
                metric.set_histogram(histogram);
                metrics.push(metric);
            }
        }
        if metrics.is_empty() {
            // As a labelled family without series: not exported.
            return Vec::new();
        }
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(metrics);
        vec![family]
    }
}

/// A request as every watched flag's cohorts count it, worked out once.
pub struct CohortSample {
    window: window::Sample,
    class: usize,
    /// Index in `DURATION_BUCKETS` (its length: +Inf).
    bucket: usize,
    nanos: u64,
}

impl CohortSample {
    /// A request whose window sample is already worked out (by its
    /// backend's window: every window shares the metrics' origin and span).
    pub fn of(window: window::Sample, latency: Duration, status: u16) -> CohortSample {
        CohortSample {
            window,
            class: window::status_class(status),
            bucket: DURATION_BUCKETS.partition_point(|upper| *upper < latency.as_secs_f64()),
            nanos: u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX),
        }
    }
}

impl FlagCohorts {
    /// Works out a request answered with `status` after `latency`, at `now`
    /// (the same for every flag: their windows share an origin and span).
    pub fn sample(&self, now: Instant, latency: Duration, status: u16) -> CohortSample {
        CohortSample::of(
            self.on.window.sample(now, latency, Some(status)),
            latency,
            status,
        )
    }

    /// Counts the request in the `on` (or off) cohort.
    pub fn record(&self, on: bool, sample: &CohortSample) {
        let cohort = if on { &self.on } else { &self.off };
        cohort.requests[sample.class].inc();
        if let Some(latency) = &cohort.duration {
            use std::sync::atomic::Ordering::Relaxed;
            latency.counts[sample.bucket].fetch_add(1, Relaxed);
            latency.sum_nanos.fetch_add(sample.nanos, Relaxed);
        }
        cohort.window.record_sample(&sample.window);
    }
}

impl std::fmt::Debug for FlagCohorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlagCohorts")
            .field("flag", &self.flag)
            .finish()
    }
}

/// Per-backend window figures, as the admin API and the analysis read them.
#[derive(Debug, Clone)]
pub struct BackendWindow {
    pub backend: Arc<str>,
    pub stats: WindowStats,
}

impl Metrics {
    /// Registers every family in a fresh registry. With `enabled: false`
    /// nothing is recorded per request (the families still exist, at 0).
    pub fn new(enabled: bool, window: Duration) -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "switchyard_requests_total",
                "Requests answered, by route, backend and status class.",
            ),
            &["route", "backend", "code_class"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_request_duration_seconds",
                "Time from receiving a request to sending its response headers.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route", "backend"],
        )
        .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "switchyard_upstream_failures_total",
                "Upstream exchanges that failed, by reason.",
            ),
            &["route", "backend", "reason"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "switchyard_retries_total",
                "Requests sent again after a failure on this backend, by the failure's reason.",
            ),
            &["route", "backend", "reason"],
        )
        .expect("valid metric");
        let failovers = IntCounterVec::new(
            Opts::new(
                "switchyard_failovers_total",
                "Requests of this backend's users served by the route's stable backend instead.",
            ),
            &["route", "backend"],
        )
        .expect("valid metric");
        let endpoint_healthy = IntGaugeVec::new(
            Opts::new(
                "switchyard_endpoint_healthy",
                "1 while the endpoint takes requests; 0 while ejected or failing its health checks.",
            ),
            &["route", "backend", "endpoint"],
        )
        .expect("valid metric");
        let persist_failures = IntCounter::new(
            "switchyard_state_persist_failures_total",
            "Writes of the state or audit log in state_dir that failed (a full or broken disk).",
        )
        .expect("valid metric");
        let unpersisted = IntGauge::new(
            "switchyard_state_unpersisted",
            "1 while rollout decisions applied in memory wait for state_dir to be writable (admin changes are refused meanwhile).",
        )
        .expect("valid metric");
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "switchyard_requests_in_flight",
                "Requests waiting for their response headers.",
            ),
            &["route", "backend"],
        )
        .expect("valid metric");
        let weight = prometheus::GaugeVec::new(
            Opts::new(
                "switchyard_backend_weight_percent",
                "Current share of users per backend, in percent.",
            ),
            &["route", "backend"],
        )
        .expect("valid metric");
        let connections = IntGaugeVec::new(
            Opts::new(
                "switchyard_connections_open",
                "Open client connections, by listener.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let unrouted_vec = IntCounterVec::new(
            Opts::new(
                "switchyard_unrouted_requests_total",
                "Requests answered before a backend was chosen, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "switchyard_config_reloads_total",
                "Configuration reloads (SIGHUP or file change), by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        let flags = IntCounterVec::new(
            Opts::new(
                "switchyard_flag_evaluations_total",
                "Feature-flag evaluations in the proxy, by flag and result.",
            ),
            &["flag", "result"],
        )
        .expect("valid metric");
        let flag_requests = IntCounterVec::new(
            Opts::new(
                "switchyard_flag_requests_total",
                "Responses sent on a watched flag's routes, by the flag's cohort (variant on or off) and status class.",
            ),
            &["flag", "variant", "code_class"],
        )
        .expect("valid metric");
        let cohorts: Arc<ArcSwap<Vec<Arc<FlagCohorts>>>> = Arc::default();
        let flag_duration = CohortLatency {
            desc: prometheus::core::Desc::new(
                "switchyard_flag_request_duration_seconds".into(),
                "Time to response headers on a watched flag's routes, by the flag's cohort (flags watching latency).".into(),
                vec!["flag".into(), "variant".into()],
                Default::default(),
            )
            .expect("valid metric"),
            cohorts: cohorts.clone(),
        };
        let rollout_metrics = |subject: &str, label: &str| {
            // `switchyard_rollout_step`, `switchyard_flag_rollout_step`, ...
            let prefix = if subject == "route" { "" } else { "flag_" };
            let step = IntGaugeVec::new(
                Opts::new(
                    format!("switchyard_{prefix}rollout_step"),
                    format!("Current step of a {subject}'s rollout (0-based); -1 after a rollback or abort."),
                ),
                &[label],
            )
            .expect("valid metric");
            let rollbacks = IntCounterVec::new(
                Opts::new(
                    format!("switchyard_{prefix}rollbacks_total"),
                    format!("Automatic rollbacks, by {subject}."),
                ),
                &[label],
            )
            .expect("valid metric");
            let checks = IntCounterVec::new(
                Opts::new(
                    format!("switchyard_{prefix}analysis_checks_total"),
                    format!("Rollout analysis checks, by {subject}, check and verdict."),
                ),
                &[label, "check", "verdict"],
            )
            .expect("valid metric");
            (step, rollbacks, checks)
        };
        let (route_step, route_rollbacks, route_checks) = rollout_metrics("route", "route");
        let (flag_step, flag_rollbacks, flag_checks) = rollout_metrics("flag", "flag");
        let rollout_step = [route_step, flag_step];
        let rollbacks = [route_rollbacks, flag_rollbacks];
        let checks = [route_checks, flag_checks];
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "switchyard_tls_reloads_total",
                "Reloads of changed TLS certificate files, by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let tls_handshake_failures = IntCounter::new(
            "switchyard_tls_handshake_failures_total",
            "TLS handshakes on the data listener that failed or timed out.",
        )
        .expect("valid metric");
        let http2_flood_closed = IntCounter::new(
            "switchyard_http2_flood_closed_total",
            "HTTP/2 client connections closed with ENHANCE_YOUR_CALM for resetting streams past the limit (rapid reset, CVE-2023-44487).",
        )
        .expect("valid metric");
        let connections_shed = IntCounter::new(
            "switchyard_connections_shed_total",
            "Client connections closed at once because limits.max_connections were open.",
        )
        .expect("valid metric");
        let tls_expiry = prometheus::GaugeVec::new(
            Opts::new(
                "switchyard_tls_certificate_expiry_timestamp_seconds",
                "When each serving certificate expires (Unix time), by certificate file.",
            ),
            &["certificate"],
        )
        .expect("valid metric");
        let unrouted = Unrouted::ALL
            .iter()
            .map(|r| unrouted_vec.with_label_values(&[r.label()]))
            .collect();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(failures.clone()),
            Box::new(retries.clone()),
            Box::new(failovers.clone()),
            Box::new(endpoint_healthy.clone()),
            Box::new(persist_failures.clone()),
            Box::new(unpersisted.clone()),
            Box::new(in_flight.clone()),
            Box::new(weight.clone()),
            Box::new(connections.clone()),
            Box::new(unrouted_vec),
            Box::new(reloads.clone()),
            Box::new(flags.clone()),
            Box::new(flag_requests.clone()),
            Box::new(flag_duration),
            Box::new(rollout_step[0].clone()),
            Box::new(rollbacks[0].clone()),
            Box::new(checks[0].clone()),
            Box::new(rollout_step[1].clone()),
            Box::new(rollbacks[1].clone()),
            Box::new(checks[1].clone()),
            Box::new(tls_reloads.clone()),
            Box::new(tls_handshake_failures.clone()),
            Box::new(connections_shed.clone()),
            Box::new(http2_flood_closed.clone()),
            Box::new(tls_expiry.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics register once");
        Metrics {
            registry,
            enabled,
            window,
            origin: Instant::now(),
            requests,
            duration,
            failures,
            retries,
            failovers,
            in_flight,
            weight,
            connections: connections.with_label_values(&["data"]),
            unrouted,
            reloads,
            flags,
            flag_requests,
            cohorts,
            rollout_step,
            rollbacks,
            checks,
            tls_reloads,
            tls_handshake_failures,
            connections_shed,
            http2_flood_closed,
            tls_expiry,
            backends: ArcSwap::from_pointee(Vec::new()),
            fleet: std::sync::OnceLock::new(),
            endpoint_healthy,
            persist_failures,
            unpersisted,
            endpoint_states: ArcSwap::from_pointee(EndpointStates::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The handles of (route, backend), made on first use and kept across
    /// snapshot rebuilds so counters and windows carry on. Also sets the
    /// backend's weight gauge. `None` when metrics are disabled.
    pub fn backend(
        &self,
        route: &str,
        backend: &str,
        weight_percent: f64,
    ) -> Option<Arc<BackendStats>> {
        self.weight
            .with_label_values(&[route, backend])
            .set(weight_percent);
        if !self.enabled {
            return None;
        }
        if let Some(found) = self.find(route, backend) {
            return Some(found);
        }
        let stats = Arc::new(BackendStats {
            route: route.into(),
            backend: backend.into(),
            requests: CODE_CLASSES.map(|c| self.requests.with_label_values(&[route, backend, c])),
            duration: self.duration.with_label_values(&[route, backend]),
            retries: FailureReason::ALL
                .map(|r| self.retries.with_label_values(&[route, backend, r.label()])),
            failovers: self.failovers.with_label_values(&[route, backend]),
            failures: FailureReason::ALL.map(|r| {
                self.failures
                    .with_label_values(&[route, backend, r.label()])
            }),
            in_flight: self.in_flight.with_label_values(&[route, backend]),
            window: RollingWindow::new(self.window, self.origin),
        });
        self.backends.rcu(|list| {
            let mut next = Vec::clone(list);
            if !next
                .iter()
                .any(|b| &*b.route == route && &*b.backend == backend)
            {
                next.push(stats.clone());
            }
            next
        });
        self.find(route, backend)
    }

    /// The cohorts of `flag` when it is watched (its `metrics` name any
    /// signal) and metrics are on; made once and kept across snapshots (a
    /// changed list of signals makes them anew).
    pub fn flag_cohorts(&self, flag: &crate::config::FlagConfig) -> Option<Arc<FlagCohorts>> {
        use crate::config::FlagMetric;
        if !self.enabled || !flag.watched() {
            return None;
        }
        let latency = flag.metrics.contains(&FlagMetric::Latency);
        if let Some(found) = self
            .cohorts
            .load()
            .iter()
            .find(|c| *c.flag == *flag.name && c.on.duration.is_some() == latency)
        {
            return Some(found.clone());
        }
        let cohort = |variant: &str| Cohort {
            requests: CODE_CLASSES.map(|c| {
                self.flag_requests
                    .with_label_values(&[&flag.name, variant, c])
            }),
            duration: latency.then(LatencyBuckets::default),
            window: RollingWindow::new(self.window, self.origin),
        };
        let made = Arc::new(FlagCohorts {
            flag: flag.name.as_str().into(),
            off: cohort("off"),
            on: cohort("on"),
        });
        self.cohorts.rcu(|list| {
            let mut list: Vec<_> = list
                .iter()
                .filter(|c| *c.flag != *flag.name)
                .cloned()
                .collect();
            list.push(made.clone());
            list
        });
        Some(made)
    }

    /// The window of `flag`'s cohorts (off, on) over the last `span`, if it
    /// is watched.
    pub fn flag_windows(&self, flag: &str, span: Duration) -> Option<(WindowStats, WindowStats)> {
        let [off, on] = self.flag_histograms(flag, span)?;
        Some((off.stats(), on.stats()))
    }

    /// The counts behind `flag_windows` (off, on), mergeable across
    /// replicas; `None` when the flag is not watched.
    pub fn flag_histograms(&self, flag: &str, span: Duration) -> Option<[window::Histogram; 2]> {
        let cohorts = self.cohorts.load();
        let c = cohorts.iter().find(|c| &*c.flag == flag)?;
        let now = Instant::now();
        Some([
            c.off.window.histogram_over(now, span),
            c.on.window.histogram_over(now, span),
        ])
    }

    /// The names of the watched flags.
    pub fn watched_flags(&self) -> Vec<Arc<str>> {
        self.cohorts.load().iter().map(|c| c.flag.clone()).collect()
    }

    fn find(&self, route: &str, backend: &str) -> Option<Arc<BackendStats>> {
        self.backends
            .load()
            .iter()
            .find(|b| &*b.route == route && &*b.backend == backend)
            .cloned()
    }

    /// The backends of `route` with stats (in the order they were first
    /// configured); `None` if the route has none.
    pub fn route_backends(&self, route: &str) -> Option<Vec<Arc<str>>> {
        let list: Vec<Arc<str>> = self
            .backends
            .load()
            .iter()
            .filter(|b| &*b.route == route)
            .map(|b| b.backend.clone())
            .collect();
        (!list.is_empty()).then_some(list)
    }

    /// Window figures for each backend of `route` (in the order they were
    /// first configured), read now; `None` if the route has no stats.
    pub fn route_window(&self, route: &str) -> Option<Vec<BackendWindow>> {
        let now = Instant::now();
        let list: Vec<BackendWindow> = self
            .backends
            .load()
            .iter()
            .filter(|b| &*b.route == route)
            .map(|b| BackendWindow {
                backend: b.backend.clone(),
                stats: b.window.stats(now),
            })
            .collect();
        (!list.is_empty()).then_some(list)
    }

    pub fn window_span(&self) -> Duration {
        self.window
    }

    /// Counts a request answered before a backend was chosen.
    pub fn unrouted(&self, reason: Unrouted) {
        let index = Unrouted::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("listed");
        self.unrouted[index].inc();
    }

    /// The evaluation counters of flag `name` (`None` with metrics disabled).
    pub fn flag(&self, name: &str) -> Option<FlagCounters> {
        self.enabled.then(|| FlagCounters {
            on: self.flags.with_label_values(&[name, "on"]),
            off: self.flags.with_label_values(&[name, "off"]),
        })
    }

    /// The window of (route, backend) over the last `span`, read now.
    pub fn backend_window(&self, route: &str, backend: &str, span: Duration) -> WindowStats {
        match self.find(route, backend) {
            Some(b) => b.window.stats_over(Instant::now(), span),
            None => WindowStats {
                span,
                requests: 0,
                errors: 0,
                p50: None,
                p95: None,
                p99: None,
            },
        }
    }

    /// The counts behind `backend_window`, mergeable across replicas.
    pub fn backend_histogram(
        &self,
        route: &str,
        backend: &str,
        span: Duration,
    ) -> window::Histogram {
        match self.find(route, backend) {
            Some(b) => b.window.histogram_over(Instant::now(), span),
            None => window::Histogram::empty(span),
        }
    }

    /// `switchyard_rollout_step{route}` or `switchyard_flag_rollout_step{flag}`.
    pub fn set_rollout_step(&self, kind: Kind, name: &str, step: i64) {
        self.rollout_step[kind as usize]
            .with_label_values(&[name])
            .set(step);
    }

    /// `switchyard_rollbacks_total{route}` or `switchyard_flag_rollbacks_total{flag}`.
    pub fn rolled_back(&self, kind: Kind, name: &str) {
        self.rollbacks[kind as usize]
            .with_label_values(&[name])
            .inc();
    }

    pub fn analysis_check(&self, kind: Kind, name: &str, check: &str, verdict: &str) {
        self.checks[kind as usize]
            .with_label_values(&[name, check, verdict])
            .inc();
    }

    /// Counts a configuration reload.
    pub fn config_reloaded(&self, ok: bool) {
        self.reloads.with_label_values(&[result_label(ok)]).inc();
    }

    /// Counts a reload of changed TLS certificate files.
    pub fn tls_reloaded(&self, ok: bool) {
        self.tls_reloads
            .with_label_values(&[result_label(ok)])
            .inc();
    }

    /// Counts a connection shed at `limits.max_connections`.
    pub fn connection_shed(&self) {
        self.connections_shed.inc();
    }

    /// Counts an HTTP/2 connection closed for a stream-reset flood; logs a
    /// warning at most every 10 s, with how many since the last one (a
    /// flood of such connections must not become a flood of log lines).
    pub fn http2_flood_closed(&self) {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        static LAST_WARNED: AtomicU64 = AtomicU64::new(0);
        static WARNED_AT_COUNT: AtomicU64 = AtomicU64::new(0);
        self.http2_flood_closed.inc();
        let now = unix_seconds();
        let last = LAST_WARNED.load(Relaxed);
        if now >= last + 10
            && LAST_WARNED
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            let total = self.http2_flood_closed.get();
            let since = total - WARNED_AT_COUNT.swap(total, Relaxed);
            tracing::warn!(
                connections = since,
                total,
                "HTTP/2 connections closed for resetting streams past the limit (rapid reset); next report in 10 s at the earliest"
            );
        }
    }

    /// Counts a failed or timed-out TLS handshake.
    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Publishes the expiry (Unix seconds) of every serving certificate,
    /// replacing what was there.
    pub fn set_certificate_expiry<'a>(&self, certs: impl IntoIterator<Item = (&'a str, i64)>) {
        self.tls_expiry.reset();
        for (file, not_after) in certs {
            self.tls_expiry
                .with_label_values(&[file])
                .set(not_after as f64);
        }
    }

    /// Counts an open client connection until the guard drops.
    pub fn connection_opened(&self) -> ConnectionGuard {
        self.connections.inc();
        ConnectionGuard(self.connections.clone())
    }

    /// Publishes every endpoint's state (gauges and `/v1/state`), replacing
    /// what was there (endpoints no longer configured drop out).
    pub fn set_endpoint_states(&self, states: EndpointStates) {
        if **self.endpoint_states.load() == states {
            return;
        }
        self.endpoint_healthy.reset();
        for ((route, backend), endpoints) in &states {
            for (endpoint, state) in endpoints {
                self.endpoint_healthy
                    .with_label_values(&[route, backend, endpoint])
                    .set(i64::from(*state == "healthy"));
            }
        }
        self.endpoint_states.store(Arc::new(states));
    }

    /// The endpoints of (route, backend) and their states, as last published.
    pub fn endpoint_states(
        &self,
        route: &str,
        backend: &str,
    ) -> Option<std::collections::BTreeMap<String, &'static str>> {
        self.endpoint_states
            .load()
            .get(&(route.to_owned(), backend.to_owned()))
            .cloned()
    }

    /// The store's persistence: `failures` so far (the counter catches up),
    /// and whether decisions wait for the disk.
    pub fn set_persistence(&self, failures: u64, unpersisted: bool) {
        let seen = self.persist_failures.get();
        if failures > seen {
            self.persist_failures.inc_by(failures - seen);
        }
        self.unpersisted.set(i64::from(unpersisted));
    }

    /// Registers the fleet families (once) and returns them.
    pub fn enable_fleet(&self) -> &FleetMetrics {
        self.fleet.get_or_init(|| {
            let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
            let fleet = FleetMetrics {
                revision: gauge(
                    "switchyard_fleet_revision_applied",
                    "The etcd revision of the fleet state this replica serves.",
                ),
                store_up: gauge(
                    "switchyard_fleet_store_up",
                    "1 while the fleet's etcd answers this replica, else 0.",
                ),
                leader: IntGaugeVec::new(
                    Opts::new(
                        "switchyard_fleet_leader",
                        "1 where this replica leads (judges and drives) the route's rollout.",
                    ),
                    &["route"],
                )
                .expect("valid metric"),
                watch_lag: prometheus::Gauge::new(
                    "switchyard_fleet_watch_lag_seconds",
                    "From the commit of the last applied state change to this replica serving it.",
                )
                .expect("valid metric"),
                replicas: gauge(
                    "switchyard_fleet_replicas",
                    "Replicas of the fleet with a live membership lease, as last seen.",
                ),
            };
            for c in [
                Box::new(fleet.revision.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(fleet.store_up.clone()),
                Box::new(fleet.leader.clone()),
                Box::new(fleet.watch_lag.clone()),
                Box::new(fleet.replicas.clone()),
            ] {
                self.registry
                    .register(c)
                    .expect("fleet metrics register once");
            }
            fleet
        })
    }

    /// The fleet families, if registered.
    pub fn fleet(&self) -> Option<&FleetMetrics> {
        self.fleet.get()
    }

    /// Everything, in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to memory does not fail");
        String::from_utf8(out).expect("text format is UTF-8")
    }
}

/// The `result` label of a reload counter.
fn result_label(ok: bool) -> &'static str {
    if ok {
        "success"
    } else {
        "failure"
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Decrements `switchyard_connections_open` when the connection ends.
pub struct ConnectionGuard(IntGauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// === impl BackendStats ===

impl std::fmt::Debug for BackendStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendStats")
            .field("route", &self.route)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl BackendStats {
    /// A request to this backend begins.
    pub fn start(&self) -> Instant {
        self.in_flight.inc();
        Instant::now()
    }

    /// The request that began at `started` got response headers with
    /// `status` (possibly the proxy's own 502/504, with the `failure` that
    /// caused it).
    pub fn finish(&self, started: Instant, status: u16, failure: Option<FailureReason>) {
        self.finish_at(Instant::now(), started, status, failure);
    }

    /// As `finish`, with the clock already read (`now`); returns where the request landed in the
    /// window (`None`: a client's failure, kept out of it), for the
    /// request's cohorts to count it without working it out again.
    pub fn finish_at(
        &self,
        now: Instant,
        started: Instant,
        status: u16,
        failure: Option<FailureReason>,
    ) -> Option<(Duration, window::Sample)> {
        let latency = now.saturating_duration_since(started);
        self.in_flight.dec();
        self.requests[window::status_class(status)].inc();
        if failure == Some(FailureReason::ClientBody) {
            // The client's failure: a response was sent (its class counts),
            // but neither its latency nor its status says anything of the
            // backend, so the window and the analysis never see it.
            self.failures[FailureReason::ClientBody as usize].inc();
            return None;
        }
        self.duration.observe(latency.as_secs_f64());
        if let Some(reason) = failure {
            self.failures[reason as usize].inc();
        }
        let sample = self.window.sample(now, latency, Some(status));
        self.window.record_sample(&sample);
        Some((latency, sample))
    }

    /// The client left before the response headers: no response was sent,
    /// so no status is counted; the wait still counts as latency, so a
    /// backend that hangs until clients give up shows it.
    pub fn cancelled(&self, started: Instant) {
        let now = Instant::now();
        let latency = now.saturating_duration_since(started);
        self.in_flight.dec();
        self.duration.observe(latency.as_secs_f64());
        self.failures[FailureReason::Cancelled as usize].inc();
        self.window.record(now, latency, None);
    }

    /// An attempt on this backend failed with `reason` and the request goes
    /// on elsewhere (`retried`: sent again; else it failed over, counted by
    /// `failed_over`). The final outcome is recorded by `finish`.
    pub fn attempt_failed(&self, reason: FailureReason, retried: bool) {
        self.failures[reason as usize].inc();
        if retried {
            self.retries[reason as usize].inc();
        }
    }

    /// One of this backend's users, whose attempt here failed with `reason`
    /// (or found every endpoint ejected), goes to the stable backend. The
    /// failure itself is recorded by `finish`.
    pub fn failed_over(&self, reason: FailureReason) {
        self.retries[reason as usize].inc();
        self.failovers.inc();
    }

    /// Requests recorded in the last `span` (the retry budget's base).
    pub fn requests_over(&self, span: std::time::Duration) -> u64 {
        self.window.requests_over(Instant::now(), span)
    }

    /// The window read now.
    pub fn window(&self) -> WindowStats {
        self.window.stats(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_shared_across_rebuilds_and_render() {
        let m = Metrics::new(true, Duration::from_secs(60));
        let a = m.backend("api", "blue", 90.0).unwrap();
        let again = m.backend("api", "blue", 80.0).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let t = a.start();
        a.finish(t, 200, None);
        let t = a.start();
        a.finish(t, 502, Some(FailureReason::Connect));
        m.unrouted(Unrouted::NoRoute);
        let _conn = m.connection_opened();
        let text = m.render();
        for line in [
            r#"switchyard_requests_total{backend="blue",code_class="2xx",route="api"} 1"#,
            r#"switchyard_requests_total{backend="blue",code_class="5xx",route="api"} 1"#,
            r#"switchyard_upstream_failures_total{backend="blue",reason="connect",route="api"} 1"#,
            r#"switchyard_backend_weight_percent{backend="blue",route="api"} 80"#,
            r#"switchyard_requests_in_flight{backend="blue",route="api"} 0"#,
            r#"switchyard_connections_open{listener="data"} 1"#,
            r#"switchyard_unrouted_requests_total{reason="no_route"} 1"#,
            r#"switchyard_request_duration_seconds_bucket{backend="blue",route="api",le="2"} 2"#,
            r#"switchyard_request_duration_seconds_bucket{backend="blue",route="api",le="5"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        let w = m.route_window("api").unwrap();
        assert_eq!((w[0].stats.requests, w[0].stats.errors), (2, 1));
        assert!(m.route_window("nope").is_none());
    }

    #[test]
    fn disabled_metrics_record_nothing_per_request() {
        let m = Metrics::new(false, Duration::from_secs(60));
        assert!(m.backend("api", "blue", 100.0).is_none());
        assert!(m.route_window("api").is_none());
        assert!(m.render().contains("switchyard_backend_weight_percent"));
    }
}
