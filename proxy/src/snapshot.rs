//! The routing snapshot: everything a request needs to be routed, split and
//! rewritten, pre-parsed and immutable. It lives behind one `ArcSwap`; a
//! request `load()`s it once, the control plane builds a new one off the
//! request path and `store()`s it. Nothing in here is locked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::forward::{Endpoint, Upstreams};
use crate::health::RetryBudget;
use http::header::HeaderValue;
use http::HeaderName;
use switchyard_control::bucket::{Salt, BUCKETS};
use switchyard_control::config::{normalized_prefix, Config, Fallback, RouteConfig, Weight};
use switchyard_control::flags::CompiledFlag;
use switchyard_control::metrics::{BackendStats, FlagCohorts, FlagCounters, Metrics};
use switchyard_control::resilience::{Failover, HealthCheckConfig, OutlierConfig, RetriesConfig};

/// The whole routing state at one moment.
#[derive(Debug)]
pub struct Snapshot {
    pub routes: Box<[Route]>,
    pub user_key: UserKeySources,
    /// Client-chosen backend, for QA (`forced_backend_header`).
    pub forced_backend_header: Option<HeaderName>,
    /// Headers only the proxy sets; client copies are removed before forwarding.
    pub proxy_only_headers: Box<[HeaderName]>,
    /// Feature flags in configured order, with their evaluation counters.
    pub flags: Box<[Flag]>,
    /// The watched flags (index in `flags`, cohorts), at most 64: every
    /// request counts in the `on` or `off` cohort of each.
    pub watched: Option<Watched>,
    /// Carries the flags that are on to the upstream.
    pub flag_header: HeaderName,
    /// The groups header, when trusted (otherwise it is in `proxy_only_headers`).
    pub groups_header: Option<HeaderName>,
    pub trust_forwarded_for: bool,
    /// Enforced by the proxy itself only below hyper's 8 KiB parse buffer.
    pub max_header_bytes: usize,
    /// What is retried and how much (`retries:`).
    pub retries: RetriesConfig,
    /// When endpoints are ejected (`outlier:`).
    pub outlier: OutlierConfig,
}

/// The watched flags: index in `Snapshot::flags`, and their cohorts.
pub type Watched = Arc<[(usize, Arc<FlagCohorts>)]>;

#[derive(Debug)]
pub struct UserKeySources {
    pub headers: Box<[HeaderName]>,
    /// Configured cookies, then the anonymous cookie.
    pub cookies: Box<[Box<str>]>,
    pub fallback: Fallback,
    /// `name=` prefix and `; Path=/; Max-Age=...` suffix of the anonymous
    /// cookie, so setting one is a single concatenation.
    pub anon_cookie_name: Box<str>,
    pub anon_cookie_attrs: Box<str>,
}

#[derive(Debug)]
pub struct Flag {
    pub flag: CompiledFlag,
    pub counters: Option<FlagCounters>,
}

/// A route rule resolved to indices: flag in `Snapshot::flags`, backend in
/// `Route::backends`.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub flag: usize,
    pub backend: usize,
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub host: HostMatch,
    /// Normalized: no trailing `/` unless it is `/` itself.
    pub path_prefix: Box<str>,
    pub headers: Box<[(HeaderName, HeaderValue)]>,
    pub salt: Salt,
    pub backends: Box<[Backend]>,
    /// Flag rules, tried before the weighted split.
    pub rules: Box<[Rule]>,
    /// Where requests go when every endpoint of their backend is down or
    /// ejected (`failover: stable`): the rollout's stable backend, else the
    /// first backend with weight above 0. `None` with `failover: none`.
    pub failover_to: Option<usize>,
    /// Bounds this route's retries. Starts afresh with each snapshot.
    pub budget: RetryBudget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lower-case host.
    Exact(Box<str>),
    /// Lower-case suffix including the leading dot: `*.example.com` → `.example.com`.
    Suffix(Box<str>),
}

#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub weight: Weight,
    /// Exclusive upper bound of this backend's bucket range; the range starts
    /// where the previous backend's ends.
    pub bucket_end: u32,
    pub endpoints: Box<[Endpoint]>,
    /// Each endpoint as configured (`host:port`, `https://host:port`).
    pub specs: Box<[Arc<str>]>,
    /// Active health checks of the endpoints (`health_check:`).
    pub health_check: Option<HealthCheckConfig>,
    /// Metric handles and rolling window; `None` with metrics disabled.
    pub stats: Option<Arc<BackendStats>>,
    /// Round-robin cursor over `endpoints`.
    next: AtomicUsize,
}

impl Backend {
    /// The next endpoint not ejected, round robin, with its index; `None`
    /// when every endpoint is ejected (or there is none).
    pub fn pick(&self) -> Option<(usize, &Endpoint)> {
        self.pick_except(0, true)
    }

    /// As `pick`, skipping the endpoints in `tried` (a bit per index).
    pub fn pick_except(&self, tried: u64, healthy: bool) -> Option<(usize, &Endpoint)> {
        let n = self.endpoints.len();
        let start = match n {
            0 => return None,
            1 => 0,
            // A retry does not move the cursor: the next request's first
            // pick stays where round robin would have put it.
            n if tried != 0 => self.next.load(Ordering::Relaxed) % n,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        let skip = |i: usize| i < 64 && tried & (1 << i) != 0;
        // Healthy endpoints are never flagged: one load each, no clock.
        let flagged = healthy && self.endpoints.iter().any(|e| e.health().flagged());
        let now = if flagged { crate::health::now_ms() } else { 0 };
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| !skip(i) && (!flagged || self.endpoints[i].health().available(now)))
            .map(|i| (i, &self.endpoints[i]))
    }

    /// A connect failure, reset or timeout on endpoint `index`: counted for
    /// outlier ejection; logs an ejection.
    pub fn report_failure(&self, index: usize, route: &str, outlier: &OutlierConfig) {
        let healths: Vec<&crate::health::EndpointHealth> =
            self.endpoints.iter().map(|e| e.health()).collect();
        if let Some(length) = crate::health::report_failure(&healths, index, outlier) {
            tracing::warn!(
                route,
                backend = %self.name,
                endpoint = ?self.endpoints[index],
                seconds = length.as_secs_f64(),
                "endpoint ejected after consecutive failures"
            );
        }
    }
}

impl Route {
    /// The backend that owns `bucket`: backends own consecutive ranges in
    /// configured order, so the last one's range is a suffix of the space and
    /// raising its weight only adds buckets to it.
    pub fn backend_for_bucket(&self, bucket: u32) -> usize {
        debug_assert!(bucket < BUCKETS);
        self.backends
            .iter()
            .position(|b| bucket < b.bucket_end)
            .unwrap_or(self.backends.len() - 1)
    }

    pub fn backend_named(&self, name: &[u8]) -> Option<usize> {
        self.backends.iter().position(|b| b.name.as_bytes() == name)
    }
}

// === building ===

impl Snapshot {
    /// Builds a snapshot from a validated configuration, resolving every
    /// backend's metric handles in `metrics`.
    pub fn build(config: &Config, metrics: &Metrics, upstreams: &Upstreams) -> Snapshot {
        let uk = &config.user_key;
        let mut cookies: Vec<Box<str>> = uk.cookies.iter().map(|c| c.as_str().into()).collect();
        if !uk.cookies.contains(&uk.anonymous_cookie.name) {
            cookies.push(uk.anonymous_cookie.name.as_str().into());
        }
        let attrs = format!(
            "; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
            uk.anonymous_cookie.max_age.0.as_secs(),
            if uk.anonymous_cookie.secure.unwrap_or(config.tls.is_some()) {
                "; Secure"
            } else {
                ""
            }
        );
        Snapshot {
            routes: config
                .routes
                .iter()
                .map(|r| build_route(r, config, metrics, upstreams))
                .collect(),
            user_key: UserKeySources {
                headers: uk.headers.iter().map(|h| header_name(h)).collect(),
                cookies: cookies.into(),
                fallback: uk.fallback,
                anon_cookie_name: uk.anonymous_cookie.name.as_str().into(),
                anon_cookie_attrs: attrs.into(),
            },
            forced_backend_header: config.forced_backend_header.as_deref().map(header_name),
            proxy_only_headers: config
                .forced_backend_header
                .iter()
                .chain([&config.flag_header])
                .chain((!config.user_groups.trusted).then_some(&config.user_groups.header))
                .map(|h| header_name(h))
                .collect(),
            flags: config
                .flags
                .iter()
                .map(|f| Flag {
                    flag: CompiledFlag::new(f),
                    counters: metrics.flag(&f.name),
                })
                .collect(),
            watched: {
                let watched: Vec<(usize, Arc<FlagCohorts>)> = config
                    .flags
                    .iter()
                    .enumerate()
                    .filter_map(|(i, f)| Some((i, metrics.flag_cohorts(f)?)))
                    .collect();
                (!watched.is_empty()).then(|| watched.into())
            },
            flag_header: header_name(&config.flag_header),
            groups_header: config
                .user_groups
                .trusted
                .then(|| header_name(&config.user_groups.header)),
            trust_forwarded_for: config.trust_forwarded_for,
            max_header_bytes: config.limits.max_header_bytes,
            retries: config.retries.clone(),
            outlier: config.outlier.clone(),
        }
    }

    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| &*r.name == name)
    }
}

fn build_route(
    rc: &RouteConfig,
    config: &Config,
    metrics: &Metrics,
    upstreams: &Upstreams,
) -> Route {
    let mut end = 0;
    let backends = rc
        .backends
        .iter()
        .map(|b| {
            end += b.weight.basis_points();
            Backend {
                name: b.name.as_str().into(),
                weight: b.weight,
                bucket_end: end,
                endpoints: b
                    .endpoints
                    .iter()
                    .map(|e| upstreams.endpoint(e, b.tls.as_ref()))
                    .collect(),
                specs: b.endpoints.iter().map(|e| e.as_str().into()).collect(),
                health_check: b.health_check.clone(),
                stats: metrics.backend(&rc.name, &b.name, b.weight.percent()),
                next: AtomicUsize::new(0),
            }
        })
        .collect();
    let host = rc.matches.host.to_ascii_lowercase();
    Route {
        name: rc.name.as_str().into(),
        host: if host == "*" {
            HostMatch::Any
        } else if let Some(suffix) = host.strip_prefix('*') {
            HostMatch::Suffix(suffix.into())
        } else {
            HostMatch::Exact(host.into())
        },
        path_prefix: normalized_prefix(&rc.matches.path_prefix).into(),
        headers: rc
            .matches
            .headers
            .iter()
            .map(|h| {
                let value = HeaderValue::from_str(&h.value).expect("header value validated");
                (header_name(&h.name), value)
            })
            .collect(),
        salt: Salt::new(rc.salt()),
        backends,
        rules: rc
            .rules
            .iter()
            .map(|rule| Rule {
                flag: config
                    .flags
                    .iter()
                    .position(|f| f.name == rule.when_flag)
                    .expect("rule flag validated"),
                backend: rc
                    .backends
                    .iter()
                    .position(|b| b.name == rule.backend)
                    .expect("rule backend validated"),
            })
            .collect(),
        failover_to: match rc.failover {
            Failover::None => None,
            Failover::Stable => rc
                .stable
                .as_ref()
                .and_then(|s| rc.backends.iter().position(|b| &b.name == s))
                .or_else(|| rc.backends.iter().position(|b| b.weight.basis_points() > 0)),
        },
        budget: RetryBudget::default(),
    }
}

fn header_name(name: &str) -> HeaderName {
    HeaderName::from_bytes(name.as_bytes()).expect("header name validated")
}
