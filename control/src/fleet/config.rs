//! The `fleet:` block of the configuration file: where the fleet's shared
//! state lives (etcd) and who this replica is.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Dur};

/// Fleet mode: the runtime state (weights, flags, rollouts, audit) lives in
/// etcd under `etcd.prefix`, shared by every replica that names the same
/// prefix. Without this block a replica is standalone (state in `state_dir`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The etcd cluster.
    pub etcd: EtcdConfig,
    /// This replica's name in the fleet (membership, leadership, audit).
    /// Default: `$POD_NAME`, then the host name.
    #[serde(default)]
    pub replica_id: Option<String>,
    /// TTL of this replica's etcd lease, which holds its membership, its
    /// published windows and any rollout it leads. A replica that dies is
    /// gone from the fleet, and its rollouts are taken over, within this
    /// long. Default `5s`, between `2s` and `60s`.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: Dur,
    /// How often this replica publishes its traffic windows and its
    /// membership record, and looks at its lease. Default `1s`; at most a
    /// third of `lease_ttl`.
    #[serde(default = "default_publish_interval")]
    pub publish_interval: Dur,
}

/// How to reach etcd (v3 API, through its JSON gateway: see
/// docs/decisions.md).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the cluster's members, `http://` or `https://`; tried
    /// in turn when one fails.
    pub endpoints: Vec<String>,
    /// Every key of this fleet lives under it. Two fleets (two services, or
    /// prod and staging) sharing one etcd use two prefixes.
    pub prefix: String,
    /// TLS to etcd: the CA that signed its certificate (default: the
    /// system's) and this replica's client certificate (for
    /// `--client-cert-auth`).
    #[serde(default)]
    pub tls: Option<EtcdTlsConfig>,
    /// etcd user (etcd's own authentication); needs `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password of `username`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Longest wait for a connection to a member. Default `1s`.
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout: Dur,
    /// Longest wait for any one etcd request. Default `2s`.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Dur,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_lease_ttl() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_publish_interval() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_dial_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_request_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}

impl FleetConfig {
    /// This replica's id: `replica_id`, else `$POD_NAME`, else the host name.
    pub fn replica_id(&self) -> String {
        if let Some(id) = &self.replica_id {
            return id.clone();
        }
        if let Ok(pod) = std::env::var("POD_NAME") {
            if !pod.is_empty() {
                return pod;
            }
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("replica-{}", std::process::id()))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let etcd = &self.etcd;
        if etcd.endpoints.is_empty() {
            return Err(ConfigError::new(
                "fleet.etcd.endpoints",
                "at least one etcd endpoint is needed",
            ));
        }
        for (i, e) in etcd.endpoints.iter().enumerate() {
            let field = format!("fleet.etcd.endpoints[{i}]");
            let uri: http::Uri = e
                .parse()
                .map_err(|err| ConfigError::new(&field, format!("`{e}` is not a URL: {err}")))?;
            let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
            if !scheme_ok || uri.host().is_none() {
                return Err(ConfigError::new(
                    field,
                    format!("`{e}` must be http://HOST:PORT or https://HOST:PORT"),
                ));
            }
            if uri.path() != "/" && !uri.path().is_empty() {
                return Err(ConfigError::new(
                    field,
                    format!("`{e}` has a path; give the member's client URL only"),
                ));
            }
            if uri.scheme_str() == Some("http") && etcd.tls.is_some() {
                return Err(ConfigError::new(
                    field,
                    format!("`{e}` is plain http but fleet.etcd.tls is set; use https://"),
                ));
            }
        }
        let prefix = &etcd.prefix;
        if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') {
            return Err(ConfigError::new(
                "fleet.etcd.prefix",
                format!("`{prefix}` must start with `/`, not end with one, and name something (e.g. /switchyard/prod)"),
            ));
        }
        if prefix.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(ConfigError::new(
                "fleet.etcd.prefix",
                "must not hold spaces or control characters",
            ));
        }
        match (&etcd.username, &etcd.password_file) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "fleet.etcd.password_file",
                    "username is set, so password_file is needed",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "fleet.etcd.username",
                    "password_file is set, so username is needed",
                ))
            }
            _ => {}
        }
        if let Some(tls) = &etcd.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                return Err(ConfigError::new(
                    "fleet.etcd.tls",
                    "cert and key go together: set both or neither",
                ));
            }
        }
        let within = |field: &str, d: Duration, low: Duration, high: Duration| {
            if d < low || d > high {
                Err(ConfigError::new(
                    field,
                    format!(
                        "{} is not between {} and {}",
                        humantime::format_duration(d),
                        humantime::format_duration(low),
                        humantime::format_duration(high)
                    ),
                ))
            } else {
                Ok(())
            }
        };
        let ms = Duration::from_millis;
        within(
            "fleet.etcd.dial_timeout",
            etcd.dial_timeout.0,
            ms(50),
            ms(60_000),
        )?;
        within(
            "fleet.etcd.request_timeout",
            etcd.request_timeout.0,
            ms(100),
            ms(60_000),
        )?;
        within("fleet.lease_ttl", self.lease_ttl.0, ms(2_000), ms(60_000))?;
        within(
            "fleet.publish_interval",
            self.publish_interval.0,
            ms(100),
            ms(60_000),
        )?;
        // The lease is renewed on publication ticks once a third of its TTL
        // has passed: a longer interval could let a live replica's lease
        // (its membership, windows and leaderships) expire.
        if self.publish_interval.0 * 3 > self.lease_ttl.0 {
            return Err(ConfigError::new(
                "fleet.publish_interval",
                format!(
                    "{} is more than a third of fleet.lease_ttl ({}); a live replica's lease could expire between renewals",
                    humantime::format_duration(self.publish_interval.0),
                    humantime::format_duration(self.lease_ttl.0)
                ),
            ));
        }
        if let Some(id) = &self.replica_id {
            crate::config::check_name("fleet.replica_id", id)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    const ROUTES: &str = "routes:\n  - name: api\n    backends:\n      - { name: blue, endpoints: [\"127.0.0.1:1\"], weight: 100 }\n";

    fn load(fleet: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(&format!("{ROUTES}fleet:\n{fleet}"))
    }

    const GOOD: &str =
        "  etcd: { endpoints: [\"http://127.0.0.1:2379\"], prefix: /switchyard/prod }\n";

    #[test]
    fn a_minimal_fleet_block_takes_the_defaults() {
        let fleet = load(GOOD).unwrap().fleet.unwrap();
        assert_eq!(fleet.lease_ttl.0.as_secs(), 5);
        assert_eq!(fleet.publish_interval.0.as_secs(), 1);
        assert_eq!(fleet.etcd.dial_timeout.0.as_secs(), 1);
        assert_eq!(fleet.etcd.request_timeout.0.as_secs(), 2);
        assert!(fleet.replica_id.is_none());
        // Without `replica_id`, some non-empty name is found.
        assert!(!fleet.replica_id().is_empty());
    }

    #[test]
    fn every_wrong_field_is_named() {
        let etcd = |inner: &str| format!("  etcd: {{ {inner} }}\n");
        let ok_endpoints = "endpoints: [\"http://127.0.0.1:2379\"]";
        for (block, field) in [
            (etcd("endpoints: [], prefix: /a"), "fleet.etcd.endpoints"),
            (
                etcd("endpoints: [\"not a url\"], prefix: /a"),
                "fleet.etcd.endpoints[0]",
            ),
            (
                etcd("endpoints: [\"ftp://h:1\"], prefix: /a"),
                "fleet.etcd.endpoints[0]",
            ),
            (
                etcd("endpoints: [\"127.0.0.1:2379\"], prefix: /a"),
                "fleet.etcd.endpoints[0]",
            ),
            (
                etcd("endpoints: [\"http://h:1/v3\"], prefix: /a"),
                "fleet.etcd.endpoints[0]",
            ),
            (
                etcd("endpoints: [\"http://h:1\"], prefix: /a, tls: { ca: ca.pem }"),
                "fleet.etcd.endpoints[0]",
            ),
            (
                etcd(&format!("{ok_endpoints}, prefix: a")),
                "fleet.etcd.prefix",
            ),
            (
                etcd(&format!("{ok_endpoints}, prefix: /")),
                "fleet.etcd.prefix",
            ),
            (
                etcd(&format!("{ok_endpoints}, prefix: /a/")),
                "fleet.etcd.prefix",
            ),
            (
                etcd(&format!("{ok_endpoints}, prefix: \"/a b\"")),
                "fleet.etcd.prefix",
            ),
            (
                etcd(&format!("{ok_endpoints}, prefix: /a, username: u")),
                "fleet.etcd.password_file",
            ),
            (
                etcd(&format!("{ok_endpoints}, prefix: /a, password_file: p")),
                "fleet.etcd.username",
            ),
            (
                etcd("endpoints: [\"https://h:1\"], prefix: /a, tls: { cert: c.pem }"),
                "fleet.etcd.tls",
            ),
            (
                etcd(&format!("{ok_endpoints}, prefix: /a, dial_timeout: 0s")),
                "fleet.etcd.dial_timeout",
            ),
            (
                etcd(&format!("{ok_endpoints}, prefix: /a, request_timeout: 2m")),
                "fleet.etcd.request_timeout",
            ),
            (
                etcd(&format!(
                    "{ok_endpoints}, prefix: /a, request_timeout: soon"
                )),
                "fleet.etcd.request_timeout",
            ),
            (format!("{GOOD}  lease_ttl: 1s\n"), "fleet.lease_ttl"),
            (
                format!("{GOOD}  publish_interval: 50ms\n"),
                "fleet.publish_interval",
            ),
            (
                format!("{GOOD}  lease_ttl: 3s\n  publish_interval: 1500ms\n"),
                "fleet.publish_interval",
            ),
            (format!("{GOOD}  replica_id: \"a/b\"\n"), "fleet.replica_id"),
            (format!("{GOOD}  replicas: 3\n"), "fleet"),
            ("  prefix: /a\n".to_owned(), "fleet"),
        ] {
            let e = load(&block).expect_err(&block);
            assert!(
                e.field.starts_with(field),
                "{block}: got {e}, expected the field {field}"
            );
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn unreadable_files_are_refused_when_the_client_is_built() {
        let fleet = load(
            "  etcd: { endpoints: [\"https://127.0.0.1:2379\"], prefix: /a, tls: { ca: /nonexistent/ca.pem } }\n",
        )
        .unwrap()
        .fleet
        .unwrap();
        let e = crate::fleet::Fleet::new(&fleet).err().expect("no CA file");
        assert_eq!(e.field, "fleet.etcd.tls.ca");
        let fleet = load(&GOOD.replace(
            "prod }",
            "prod, username: u, password_file: /nonexistent/pw }",
        ))
        .unwrap()
        .fleet
        .unwrap();
        let e = crate::fleet::Fleet::new(&fleet)
            .err()
            .expect("no password file");
        assert_eq!(e.field, "fleet.etcd.password_file");
    }
}
