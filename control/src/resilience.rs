//! Configuration of what keeps requests alive when a backend fails:
//! retries and their budget, failover to the stable backend, passive
//! outlier ejection (docs/resilience.md).

use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Dur};

/// `retries:` — which failed requests are sent again, and how many.
///
/// A request is retried only when the upstream cannot have acted on it: its
/// connection failed before any of it was written (refused, reset on
/// connect, connect timeout), or it is idempotent, without a body, and the
/// connection closed before any of the response. Never after response
/// bytes reached the client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesConfig {
    /// Retries per request, at most (another endpoint of the backend first,
    /// then the route's stable backend). Default `2`; `0` turns retries off.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// The retry budget: retries per route are at most this percentage of
    /// the route's requests over the last 10 s, so a dying backend cannot
    /// multiply the load on the others. Default `20`.
    #[serde(default = "default_budget_percent")]
    pub budget_percent: f64,
    /// Retries always allowed per second whatever the traffic (a quiet route
    /// still retries). Default `10`.
    #[serde(default = "default_min_per_second")]
    pub min_per_second: u32,
}

impl Default for RetriesConfig {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            budget_percent: default_budget_percent(),
            min_per_second: default_min_per_second(),
        }
    }
}

fn default_attempts() -> u32 {
    2
}
fn default_budget_percent() -> f64 {
    20.0
}
fn default_min_per_second() -> u32 {
    10
}

impl RetriesConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.attempts > 5 {
            return Err(ConfigError::new(
                "retries.attempts",
                format!("{} is more than 5", self.attempts),
            ));
        }
        if !(0.0..=100.0).contains(&self.budget_percent) {
            return Err(ConfigError::new(
                "retries.budget_percent",
                format!("{} is not between 0 and 100", self.budget_percent),
            ));
        }
        if self.min_per_second > 10_000 {
            return Err(ConfigError::new(
                "retries.min_per_second",
                format!("{} is more than 10000", self.min_per_second),
            ));
        }
        Ok(())
    }
}

/// `outlier:` — passive ejection of failing endpoints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Connect failures, resets or timeouts in a row that eject an endpoint.
    /// Default `5`; `0` turns ejection off.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// How long a first ejection lasts; each re-ejection doubles it, up to
    /// `max_ejection`. Default `10s`.
    #[serde(default = "default_base_ejection")]
    pub base_ejection: Dur,
    /// The longest an ejection lasts. Default `5m`.
    #[serde(default = "default_max_ejection")]
    pub max_ejection: Dur,
    /// At most this percentage of a backend's endpoints are ejected at once
    /// (at least one), unless every one of them is failing. Default `50`.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_max_ejection() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_max_ejection_percent() -> u32 {
    50
}

impl OutlierConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.consecutive_failures > 1000 {
            return Err(ConfigError::new(
                "outlier.consecutive_failures",
                format!("{} is more than 1000", self.consecutive_failures),
            ));
        }
        let (base, max) = (self.base_ejection.0, self.max_ejection.0);
        if base < Duration::from_millis(100) || base > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "outlier.base_ejection",
                format!(
                    "{} is not between 100ms and 1h",
                    humantime::format_duration(base)
                ),
            ));
        }
        if max < base || max > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::new(
                "outlier.max_ejection",
                format!(
                    "{} is not between outlier.base_ejection ({}) and 24h",
                    humantime::format_duration(max),
                    humantime::format_duration(base)
                ),
            ));
        }
        if self.max_ejection_percent > 100 {
            return Err(ConfigError::new(
                "outlier.max_ejection_percent",
                format!("{} is more than 100", self.max_ejection_percent),
            ));
        }
        Ok(())
    }
}

/// `health_check:` of a backend — the source document's defaults: every
/// 10 s, 3 failures to take an endpoint out, 2 successes to bring it back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path of a `GET` each endpoint answers 2xx or 3xx while healthy.
    /// Default `/healthz`.
    #[serde(default = "default_hc_path")]
    pub path: String,
    /// Time between checks of an endpoint. Default `10s`.
    #[serde(default = "default_hc_interval")]
    pub interval: Dur,
    /// Longest wait for a check's answer (connect included). Default `2s`.
    #[serde(default = "default_hc_timeout")]
    pub timeout: Dur,
    /// Failed checks in a row that take an endpoint out. Default `3`.
    #[serde(default = "default_unhealthy")]
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that bring it back. Default `2`.
    #[serde(default = "default_healthy")]
    pub healthy_threshold: u32,
}

fn default_hc_path() -> String {
    "/healthz".to_owned()
}
fn default_hc_interval() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_hc_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_unhealthy() -> u32 {
    3
}
fn default_healthy() -> u32 {
    2
}

impl HealthCheckConfig {
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let ok_path = self.path.starts_with('/')
            && self.path.len() <= 1024
            && self.path.bytes().all(|b| b.is_ascii_graphic());
        if !ok_path {
            return Err(ConfigError::new(
                format!("{field}.path"),
                format!(
                    "`{}` must be a path starting with `/`, without spaces or control characters",
                    self.path
                ),
            ));
        }
        let (interval, timeout) = (self.interval.0, self.timeout.0);
        if interval < Duration::from_millis(100) || interval > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                format!("{field}.interval"),
                format!(
                    "{} is not between 100ms and 1h",
                    humantime::format_duration(interval)
                ),
            ));
        }
        if timeout < Duration::from_millis(10) || timeout > interval {
            return Err(ConfigError::new(
                format!("{field}.timeout"),
                format!(
                    "{} is not between 10ms and the interval ({})",
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
            ));
        }
        for (name, n) in [
            ("unhealthy_threshold", self.unhealthy_threshold),
            ("healthy_threshold", self.healthy_threshold),
        ] {
            if !(1..=100).contains(&n) {
                return Err(ConfigError::new(
                    format!("{field}.{name}"),
                    format!("{n} is not between 1 and 100"),
                ));
            }
        }
        Ok(())
    }
}

/// Per route: where a request goes when every endpoint of its user's
/// backend is down or ejected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Failover {
    /// To the stable backend: the rollout's `stable` while one is active,
    /// otherwise the route's first backend with weight above 0. The user's
    /// sticky assignment is unchanged: they come back when their backend
    /// is healthy again.
    #[default]
    Stable,
    /// Nowhere: the request gets the error.
    None,
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const ROUTES: &str = "routes:\n  - name: api\n    backends:\n      - { name: blue, endpoints: [\"127.0.0.1:1\"], weight: 100 }\n";

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::from_yaml(ROUTES).unwrap();
        assert_eq!(c.retries.attempts, 2);
        assert_eq!(c.retries.budget_percent, 20.0);
        assert_eq!(c.outlier.consecutive_failures, 5);
        assert_eq!(c.outlier.base_ejection.0.as_secs(), 10);
        assert_eq!(c.outlier.max_ejection_percent, 50);
        assert_eq!(c.routes[0].failover, super::Failover::Stable);
    }

    #[test]
    fn every_wrong_field_is_named() {
        for (extra, field) in [
            ("retries: { attempts: 6 }", "retries.attempts"),
            ("retries: { attempts: -1 }", "retries.attempts"),
            ("retries: { budget_percent: 101 }", "retries.budget_percent"),
            (
                "retries: { min_per_second: 20000 }",
                "retries.min_per_second",
            ),
            ("retries: { tries: 2 }", "retries"),
            (
                "outlier: { consecutive_failures: 5000 }",
                "outlier.consecutive_failures",
            ),
            ("outlier: { base_ejection: 10ms }", "outlier.base_ejection"),
            (
                "outlier: { base_ejection: 1m, max_ejection: 10s }",
                "outlier.max_ejection",
            ),
            (
                "outlier: { max_ejection_percent: 150 }",
                "outlier.max_ejection_percent",
            ),
        ] {
            let e = Config::from_yaml(&format!("{extra}\n{ROUTES}")).expect_err(extra);
            assert!(e.field.starts_with(field), "{extra}: {e}");
        }
        let e = Config::from_yaml(&ROUTES.replace(
            "  - name: api\n",
            "  - name: api\n    failover: somewhere\n",
        ))
        .expect_err("failover");
        assert!(e.field.contains("failover"), "{e}");
        for (hc, field) in [
            ("{ path: healthz }", "health_check.path"),
            ("{ path: \"/a b\" }", "health_check.path"),
            ("{ interval: 10ms }", "health_check.interval"),
            ("{ interval: 1s, timeout: 2s }", "health_check.timeout"),
            (
                "{ unhealthy_threshold: 0 }",
                "health_check.unhealthy_threshold",
            ),
            (
                "{ healthy_threshold: 101 }",
                "health_check.healthy_threshold",
            ),
            ("{ every: 1s }", "health_check"),
        ] {
            let yaml = ROUTES.replace(
                "weight: 100 }",
                &format!("weight: 100, health_check: {hc} }}"),
            );
            let e = Config::from_yaml(&yaml).expect_err(hc);
            assert!(e.field.contains(field), "{hc}: {e}");
        }
        let ok = ROUTES.replace("weight: 100 }", "weight: 100, health_check: {} }");
        let hc = Config::from_yaml(&ok).unwrap().routes[0].backends[0]
            .health_check
            .clone()
            .unwrap();
        assert_eq!(
            (
                hc.path.as_str(),
                hc.interval.0.as_secs(),
                hc.timeout.0.as_secs()
            ),
            ("/healthz", 10, 2)
        );
        assert_eq!((hc.unhealthy_threshold, hc.healthy_threshold), (3, 2));
    }
}
