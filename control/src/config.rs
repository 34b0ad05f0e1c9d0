//! The configuration file: topology (listeners, routes, backends) and initial
//! values (weights). Parsed from YAML, then validated whole before anything is
//! bound or started. Every error names the field it is about.
//!
//! Field names are a contract with operators (see DESIGN.md); every field has a
//! doc comment and a default, and `docs/config.md` lists them all.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::bucket::BUCKETS;

/// A configuration problem: the field it concerns and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `routes[0].backends[1].weight`.
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

// === the file ===

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Data-plane listener. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// TLS on the data listener (edge gateway). Default: none, plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Runtime worker threads. `1` runs a current-thread runtime (the cheapest
    /// for a sidecar); default: the number of available cores.
    #[serde(default)]
    pub workers: Option<usize>,
    /// The admin listener (health, later metrics and the control API).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Where the user key of a request comes from.
    #[serde(default)]
    pub user_key: UserKeyConfig,
    /// Timeouts for every network wait.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Bounds on what clients may use.
    #[serde(default)]
    pub limits: Limits,
    /// Header that lets a client pick a backend by name (for QA to reach a
    /// version directly). Off by default: anyone who can send the header
    /// chooses their backend, so enable it only behind an authenticating edge.
    #[serde(default)]
    pub forced_backend_header: Option<String>,
    /// Keep the client's `x-forwarded-for` and append to it. Default `false`:
    /// the header is replaced by the peer address, since a client could
    /// otherwise claim any address. Set to `true` behind a trusted load balancer.
    #[serde(default)]
    pub trust_forwarded_for: bool,
    /// Inline measurement of every request.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Where runtime state (weights, flags changed through the API) and the
    /// audit log are kept, so a restart resumes where it was. Default none:
    /// runtime changes live in memory only and are lost on restart.
    #[serde(default)]
    pub state_dir: Option<std::path::PathBuf>,
    /// The audit log's files in `state_dir`.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Feature flags, evaluated per request (initial values; the admin API
    /// changes them at run time).
    #[serde(default)]
    pub flags: Vec<FlagConfig>,
    /// Header that carries the flags that are on for the user to the
    /// upstream (`a,b`). Default `x-feature-flags`. A client's copy is always
    /// removed first.
    #[serde(default = "default_flag_header")]
    pub flag_header: String,
    /// Where a user's groups (for `target_groups`) come from.
    #[serde(default)]
    pub user_groups: UserGroupsConfig,
    /// Routes, tried in order; the first whose match fits takes the request.
    pub routes: Vec<RouteConfig>,
    /// Fleet mode: share the runtime state with every replica naming the
    /// same etcd prefix (docs/fleet.md). Default none: standalone.
    #[serde(default)]
    pub fleet: Option<crate::fleet::config::FleetConfig>,
    /// Which failed requests are retried, and the budget that bounds them
    /// (docs/resilience.md).
    #[serde(default)]
    pub retries: crate::resilience::RetriesConfig,
    /// Passive ejection of endpoints that keep failing.
    #[serde(default)]
    pub outlier: crate::resilience::OutlierConfig,
}

/// A feature flag (DESIGN.md): evaluated per request in this order — `enabled:
/// false` turns it off for everyone; an override for the user wins; membership
/// of a target group turns it on; otherwise on iff the user's bucket (salt =
/// flag name) is below `rollout_percentage`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FlagConfig {
    /// Unique; same syntax as route names. In an API body it may be left out
    /// (the URL names the flag).
    #[serde(default)]
    pub name: String,
    /// The kill switch. Default `true`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Share of users who get the flag, percent with two decimals. Default 0.
    #[serde(default)]
    pub rollout_percentage: Weight,
    /// Groups that get the flag whatever their bucket. Default none.
    #[serde(default)]
    pub target_groups: Vec<String>,
    /// Per-user answers that win over groups and percentage. Default none.
    #[serde(default)]
    pub overrides: std::collections::BTreeMap<String, bool>,
    /// What the flag is for: shown by the API, ctl and in OFREP metadata.
    /// At most 1000 characters. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The cohort signals kept for this flag (docs/flags.md): every request
    /// on a route is counted in the flag's `on` or `off` cohort. `requests`
    /// and `errors` keep requests by status class, `latency` a latency
    /// histogram too. Default none: an unwatched flag costs nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<FlagMetric>,
}

/// Flags that may keep cohort signals (each request carries one bit per
/// watched flag).
pub const MAX_WATCHED_FLAGS: usize = 64;

/// A cohort signal a flag can keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlagMetric {
    Requests,
    Errors,
    Latency,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserGroupsConfig {
    /// Comma-separated groups header (`beta, staff`). Default `x-user-groups`.
    #[serde(default = "default_groups_header")]
    pub header: String,
    /// Honour the header. Default `false`: anyone could claim any group, so
    /// the header is removed and ignored unless an authenticating gateway in
    /// front sets it (then it is also passed upstream).
    #[serde(default)]
    pub trusted: bool,
}

impl Default for UserGroupsConfig {
    fn default() -> Self {
        Self {
            header: default_groups_header(),
            trusted: false,
        }
    }
}

/// Sends users with a flag on to a backend, ahead of the weighted split.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub when_flag: String,
    pub backend: String,
}

/// Bounds a flag's per-user overrides (each is kept in every snapshot).
pub const MAX_FLAG_OVERRIDES: usize = 10_000;

impl FlagConfig {
    /// Checks one flag; `field` is where it sits (`flags[2]`).
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        check_name(&format!("{field}.name"), &self.name)?;
        for (i, g) in self.target_groups.iter().enumerate() {
            let ok = !g.is_empty()
                && g.len() <= 128
                && g.bytes().all(|b| b.is_ascii_graphic() && b != b',');
            if !ok {
                return Err(ConfigError::new(
                    format!("{field}.target_groups[{i}]"),
                    format!("`{g}` must be 1-128 printable characters without commas"),
                ));
            }
        }
        if self.overrides.len() > MAX_FLAG_OVERRIDES {
            return Err(ConfigError::new(
                format!("{field}.overrides"),
                format!(
                    "{} overrides, at most {MAX_FLAG_OVERRIDES}",
                    self.overrides.len()
                ),
            ));
        }
        if let Some(user) = self
            .overrides
            .keys()
            .find(|u| u.is_empty() || u.len() > 256)
        {
            return Err(ConfigError::new(
                format!("{field}.overrides"),
                format!("user key `{user}` must be 1-256 bytes"),
            ));
        }
        if let Some(d) = &self.description {
            if d.chars().count() > 1000 || d.chars().any(|c| c.is_control() && c != '\n') {
                return Err(ConfigError::new(
                    format!("{field}.description"),
                    "at most 1000 characters, no control characters but newlines",
                ));
            }
        }
        for (i, m) in self.metrics.iter().enumerate() {
            if self.metrics[..i].contains(m) {
                return Err(ConfigError::new(
                    format!("{field}.metrics[{i}]"),
                    format!("{m:?} is listed twice"),
                ));
            }
        }
        Ok(())
    }

    /// Whether the flag keeps cohort signals.
    pub fn watched(&self) -> bool {
        !self.metrics.is_empty()
    }
}

/// TLS termination on the data listener. The certificate files are watched:
/// a rotated Secret is picked up without a restart (see `docs/tls.md`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chains and their keys, chosen by the SNI name against
    /// each certificate's DNS names; the first is the default.
    pub certificates: Vec<CertificateConfig>,
    /// PEM bundle of the CAs that sign client certificates. When set, every
    /// client must present a valid certificate (mutual TLS). Default none.
    #[serde(default)]
    pub client_ca: Option<std::path::PathBuf>,
    /// What a client gets when its SNI name (or lack of one) matches no
    /// certificate: `default` (the first certificate) or `reject` (the
    /// handshake fails with `unrecognized_name`). Default `default`.
    #[serde(default)]
    pub unknown_server_name: UnknownServerName,
    /// Oldest protocol version accepted: `"1.2"` or `"1.3"`. Default `"1.2"`.
    #[serde(default)]
    pub min_version: TlsVersion,
}

/// One certificate chain (leaf first) and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownServerName {
    #[default]
    Default,
    Reject,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// At most this many certificates on a listener.
pub const MAX_CERTIFICATES: usize = 256;

impl TlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.certificates.is_empty() {
            return Err(ConfigError::new(
                "tls.certificates",
                "at least one certificate is needed",
            ));
        }
        if self.certificates.len() > MAX_CERTIFICATES {
            return Err(ConfigError::new(
                "tls.certificates",
                format!(
                    "{} certificates, at most {MAX_CERTIFICATES}",
                    self.certificates.len()
                ),
            ));
        }
        let paths = self.certificates.iter().enumerate().flat_map(|(i, c)| {
            [
                (format!("tls.certificates[{i}].cert"), &c.cert),
                (format!("tls.certificates[{i}].key"), &c.key),
            ]
        });
        for (field, path) in paths.chain(
            self.client_ca
                .iter()
                .map(|p| ("tls.client_ca".to_owned(), p)),
        ) {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::new(field, "must not be empty"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Record per-request metrics and rolling windows. Default `true`. Off is
    /// only for measuring what metrics cost: rollouts need them.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Span of the in-process rolling windows (1 s resolution) that the
    /// automatic rollback and `/v1/routes/{route}/stats` read. Default `60s`;
    /// allowed 1s to 1h.
    #[serde(default = "default_stats_window")]
    pub window: Dur,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: default_stats_window(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin listener address. Default `127.0.0.1:9901`.
    #[serde(default = "default_admin_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Bearer tokens accepted on `/v1/` and `/ofrep/`, each with a name the
    /// audit log records. Default none: an open admin API, allowed only on a
    /// loopback address.
    #[serde(default)]
    pub tokens: Vec<TokenSource>,
    /// Open admin connections at most; past it, new ones are closed at once
    /// (a flood on the admin port cannot take the data plane's file
    /// descriptors). Default `256`; allowed 1 to 10000.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: usize,
    /// Time a new admin connection has to send its first request head, and
    /// every later one once started (silent connections are closed).
    /// Default `10s`.
    #[serde(default = "default_admin_header_timeout")]
    pub header_timeout: Dur,
}

fn default_admin_max_connections() -> usize {
    256
}
fn default_admin_header_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            max_connections: default_admin_max_connections(),
            header_timeout: default_admin_header_timeout(),
            listen: default_admin_listen(),
            tokens: Vec::new(),
        }
    }
}

/// Where a named admin token is read from: a file (a mounted Kubernetes
/// Secret) or an environment variable. Exactly one of `file` and `env`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSource {
    /// Who holds the token (`ci`, `oncall`); the audit log's actor.
    pub name: String,
    #[serde(default)]
    pub file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub env: Option<String>,
}

/// A token read from its source.
#[derive(Clone, PartialEq)]
pub struct Token {
    pub name: String,
    pub secret: Vec<u8>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}, <redacted>)", self.name)
    }
}

impl AdminConfig {
    /// Reads every token from its file or variable. Surrounding white space
    /// (a trailing newline in a Secret file) is not part of the token.
    pub fn resolve_tokens(&self) -> Result<Vec<Token>, ConfigError> {
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let field = format!("admin.tokens[{i}]");
                let raw = match (&t.file, &t.env) {
                    (Some(path), None) => std::fs::read(path).map_err(|e| {
                        ConfigError::new(
                            format!("{field}.file"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?,
                    (None, Some(var)) => std::env::var(var)
                        .map_err(|_| {
                            ConfigError::new(format!("{field}.env"), format!("`{var}` is not set"))
                        })?
                        .into_bytes(),
                    _ => {
                        return Err(ConfigError::new(
                            field,
                            "give exactly one of `file` and `env`",
                        ))
                    }
                };
                let secret = raw.trim_ascii().to_vec();
                if secret.len() < 16 {
                    return Err(ConfigError::new(field, "token is shorter than 16 bytes"));
                }
                Ok(Token {
                    name: t.name.clone(),
                    secret,
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserKeyConfig {
    /// Request headers that carry the user id, tried in order. Default `[x-user-id]`.
    #[serde(default = "default_key_headers")]
    pub headers: Vec<String>,
    /// Cookies that carry the user id, tried in order after the headers. Default none.
    #[serde(default)]
    pub cookies: Vec<String>,
    /// What to use when no header or cookie has a key. Default `cookie`.
    #[serde(default)]
    pub fallback: Fallback,
    /// The anonymous id cookie set by the `cookie` fallback.
    #[serde(default)]
    pub anonymous_cookie: AnonymousCookie,
}

impl Default for UserKeyConfig {
    fn default() -> Self {
        Self {
            headers: default_key_headers(),
            cookies: Vec::new(),
            fallback: Fallback::default(),
            anonymous_cookie: AnonymousCookie::default(),
        }
    }
}

/// The key of a request that names no user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Make up an anonymous id and set it as a long-lived cookie, so the
    /// anonymous user sticks to the same backend from the next request on.
    #[default]
    Cookie,
    /// The client's address (the peer, or the first `x-forwarded-for` hop
    /// when `trust_forwarded_for` is on).
    ClientIp,
    /// A fresh random key per request: no stickiness.
    Random,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnonymousCookie {
    /// Cookie name. Default `switchyard-uid`. It is also read as a key source.
    #[serde(default = "default_anon_cookie")]
    pub name: String,
    /// Cookie lifetime. Default `365d`.
    #[serde(default = "default_anon_max_age")]
    pub max_age: Dur,
    /// Add the `Secure` attribute. Default: on when the data listener
    /// terminates TLS (`tls` is set), off otherwise (browsers drop a `Secure`
    /// cookie from a plain-HTTP origin). Set `true` behind a TLS-terminating
    /// load balancer.
    #[serde(default)]
    pub secure: Option<bool>,
}

impl Default for AnonymousCookie {
    fn default() -> Self {
        Self {
            name: default_anon_cookie(),
            max_age: default_anon_max_age(),
            secure: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Opening a connection to an upstream endpoint. Default `1s`.
    #[serde(default = "default_connect")]
    pub connect: Dur,
    /// From the end of sending a request upstream (its body included) to
    /// receiving its response headers. Default `30s`. A streaming body
    /// after the headers is not cut short.
    #[serde(default = "default_request")]
    pub request: Dur,
    /// While a request body is being sent up: the longest time without any
    /// progress (no bytes from the client, or none taken by the upstream).
    /// A client that stalls gets 408 (its failure, not the backend's); an
    /// upstream that stops reading, 504. Default `60s` (nginx's
    /// `client_body_timeout`).
    #[serde(default = "default_upload_idle")]
    pub upload_idle: Dur,
    /// Idle keep-alive connections (client side: time to start the next
    /// request, HTTP/1.1 and HTTP/2; upstream side: pooled idle connections).
    /// Default `90s`.
    #[serde(default = "default_idle")]
    pub idle: Dur,
    /// An upstream response body's longest wait for its next bytes once
    /// the head arrived (nginx's `proxy_read_timeout`); past it the body is
    /// cut off and the client's connection or stream reset. Default `60s`:
    /// raise it for long polls and event streams without heartbeats.
    #[serde(default = "default_upload_idle")]
    pub response_body_idle: Dur,
    /// Time a client has to send a whole request head once its first byte
    /// arrived, and to finish a TLS handshake: slow clients (slowloris) are
    /// cut off after it. Default `10s`.
    #[serde(default = "default_request_header")]
    pub request_header: Dur,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish
    /// before the process exits anyway. Default `30s`.
    #[serde(default = "default_drain")]
    pub drain: Dur,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            request: default_request(),
            upload_idle: default_upload_idle(),
            idle: default_idle(),
            response_body_idle: default_upload_idle(),
            request_header: default_request_header(),
            drain: default_drain(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Open client connections on the data listener; past it, new connections
    /// wait in the kernel's accept queue. Default `10000`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests being proxied at once; past it, requests get 503 with
    /// `Retry-After`. Default `10000`.
    #[serde(default = "default_max_in_flight")]
    pub max_requests_in_flight: usize,
    /// Size of a request's head (request line and headers); larger gets 431.
    /// Default `32768`; allowed 1024 to 1048576.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Size of a request's body; a larger declared length gets 413 before
    /// anything is sent upstream, a longer streamed body is cut off there.
    /// Default `104857600` (100 MiB).
    #[serde(default = "default_max_request_body_bytes")]
    pub max_request_body_bytes: u64,
    /// HTTP/2 streams a client may have open at once on one connection.
    /// Default `100`; allowed 1 to 10000.
    #[serde(default = "default_http2_max_streams")]
    pub http2_max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_requests_in_flight: default_max_in_flight(),
            max_header_bytes: default_max_header_bytes(),
            max_request_body_bytes: default_max_request_body_bytes(),
            http2_max_concurrent_streams: default_http2_max_streams(),
        }
    }
}

/// The audit log in `state_dir` (`events.jsonl`, docs/security.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `events.jsonl` is rotated (renamed `events.<first seq>.jsonl`) once
    /// an append takes it past this size. Default `16777216` (16 MiB, about
    /// 40,000 events); allowed 65536 to 1073741824.
    #[serde(default = "default_audit_file_bytes")]
    pub max_file_bytes: u64,
    /// Rotated files kept; the oldest past this are deleted. Default `8`;
    /// allowed 0 to 10000.
    #[serde(default = "default_audit_keep_files")]
    pub keep_files: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: default_audit_file_bytes(),
            keep_files: default_audit_keep_files(),
        }
    }
}

fn default_audit_file_bytes() -> u64 {
    16 * 1024 * 1024
}

fn default_audit_keep_files() -> usize {
    8
}

impl AuditConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&self.max_file_bytes) {
            return Err(ConfigError::new(
                "audit.max_file_bytes",
                format!(
                    "{} is not between 65536 and 1073741824",
                    self.max_file_bytes
                ),
            ));
        }
        if self.keep_files > 10_000 {
            return Err(ConfigError::new(
                "audit.keep_files",
                format!("{} is not between 0 and 10000", self.keep_files),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Route name: unique; used in metrics, the admin API and as the default salt.
    pub name: String,
    /// Which requests this route takes. Default: every request.
    #[serde(default, rename = "match")]
    pub matches: MatchConfig,
    /// Salt of the user's bucket. Default: the route name. Two routes with the
    /// same salt put a user in the same bucket.
    #[serde(default)]
    pub salt: Option<String>,
    /// Backends in bucket order: the one being rolled out goes last, so raising
    /// its weight only adds users to it.
    pub backends: Vec<BackendConfig>,
    /// Where requests go when every endpoint of the user's backend is down
    /// or ejected: `stable` (default) or `none`.
    #[serde(default)]
    pub failover: crate::resilience::Failover,
    /// The rollout's stable backend while a rollout is active (set from the
    /// runtime state, not the file): the failover target.
    #[serde(skip)]
    pub stable: Option<String>,
    /// Flag rules, tried in order before the weighted split: the first whose
    /// flag is on for the user picks the backend. Default none.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// `*` (any), an exact host (`api.example.com`) or a suffix wildcard
    /// (`*.example.com`). Compared without port, case-insensitively. Default `*`.
    #[serde(default = "default_host")]
    pub host: String,
    /// Path prefix, matched by whole segments (`/api` takes `/api` and
    /// `/api/x`, not `/apix`). Default `/`.
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// Headers that must be present with exactly these values. Default none.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

impl Default for MatchConfig {
    fn default() -> Self {
        Self {
            host: default_host(),
            path_prefix: default_path_prefix(),
            headers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Backend name, unique within the route (`blue`, `green`, `canary`).
    pub name: String,
    /// `host:port` of each instance (`https://host:port` for TLS to it);
    /// requests are balanced across them.
    pub endpoints: Vec<String>,
    /// Share of users, in percent with up to two decimals. All weights of a
    /// route sum to exactly 100.
    pub weight: Weight,
    /// How this backend's `https://` endpoints are verified. Default: the
    /// system's CA certificates, and the endpoint's host as the name.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// Active health checks of this backend's endpoints. Default none (only
    /// passive outlier ejection).
    #[serde(default)]
    pub health_check: Option<crate::resilience::HealthCheckConfig>,
}

/// Verification of a backend's `https://` endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM bundle of the CAs to trust instead of the system's.
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    /// Name to send as SNI and to verify the certificate against, instead of
    /// the endpoint's host (needed for IP endpoints of a named service).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// An endpoint split into its scheme and `host:port`: `(true, "a:443")` for
/// `https://a:443`. Plain `host:port` and `http://host:port` are not TLS.
pub fn split_endpoint(endpoint: &str) -> (bool, &str) {
    if let Some(rest) = endpoint.strip_prefix("https://") {
        (true, rest)
    } else {
        (false, endpoint.strip_prefix("http://").unwrap_or(endpoint))
    }
}

// === value types ===

/// A weight in hundredths of a percent (basis points of 100 %): `0..=10000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Weight(u32);

impl Weight {
    pub const FULL: Weight = Weight(BUCKETS);

    /// From hundredths of a percent.
    pub fn from_basis_points(bp: u32) -> Option<Weight> {
        (bp <= BUCKETS).then_some(Weight(bp))
    }

    /// From a percentage with at most two decimals (`12.5`, `0.01`).
    pub fn from_percent(pct: f64) -> Result<Weight, String> {
        if !pct.is_finite() || !(0.0..=100.0).contains(&pct) {
            return Err(format!("{pct} is not a percentage from 0 to 100"));
        }
        let scaled = pct * 100.0;
        let bp = scaled.round();
        if (scaled - bp).abs() > 1e-6 {
            return Err(format!(
                "{pct} has more than two decimals (resolution is 0.01)"
            ));
        }
        Ok(Weight(bp as u32))
    }

    pub fn basis_points(self) -> u32 {
        self.0
    }

    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(100) {
            write!(f, "{}", self.0 / 100)
        } else {
            write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
        }
    }
}

impl serde::Serialize for Weight {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(100) {
            s.serialize_u32(self.0 / 100)
        } else {
            s.serialize_f64(self.percent())
        }
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Weight;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a percentage from 0 to 100 with at most two decimals")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Weight, E> {
                self.visit_f64(v as f64)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Weight, E> {
                self.visit_f64(v as f64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Weight, E> {
                Weight::from_percent(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A listen address: `ip:port` (`[v6]:port`); names are not resolved.
fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.trim().parse().map_err(|_| {
        de::Error::custom(format!(
            "`{text}` is not an address like 127.0.0.1:8080 or [::1]:8080"
        ))
    })
}

/// A duration written as `500ms`, `30s`, `5m`, `1h`, `365d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl serde::Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map(Dur).map_err(de::Error::custom)
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `2d` (and combinations like `1m30s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like 500ms, 30s, 5m or 1h ({e})"))
}

// === defaults ===

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn default_key_headers() -> Vec<String> {
    vec!["x-user-id".to_owned()]
}
fn default_anon_cookie() -> String {
    "switchyard-uid".to_owned()
}
fn default_anon_max_age() -> Dur {
    Dur(Duration::from_secs(365 * 24 * 3600))
}
fn default_connect() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_request() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_idle() -> Dur {
    Dur(Duration::from_secs(90))
}
fn default_upload_idle() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_request_header() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_drain() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_flag_header() -> String {
    "x-feature-flags".to_owned()
}
fn default_groups_header() -> String {
    "x-user-groups".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_stats_window() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_in_flight() -> usize {
    10_000
}
fn default_max_header_bytes() -> usize {
    32 * 1024
}
fn default_max_request_body_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_http2_max_streams() -> u32 {
    100
}
fn default_host() -> String {
    "*".to_owned()
}
fn default_path_prefix() -> String {
    "/".to_owned()
}

// === loading ===

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        Config::from_yaml(&text)
    }

    /// Parses and validates a configuration document.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let config = parse(text)?;
        config.validate()?;
        Ok(config)
    }

    /// The fields a reload cannot change in a running process (listeners,
    /// runtime, pools, state location, tokens): those that differ between
    /// `self` and `next`.
    pub fn restart_only_changes(&self, next: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, same: bool| {
            if !same {
                changed.push(name);
            }
        };
        check("listen", self.listen == next.listen);
        check("tls", self.tls == next.tls);
        check("workers", self.workers == next.workers);
        check("admin", self.admin == next.admin);
        check("timeouts", self.timeouts == next.timeouts);
        check("limits", self.limits == next.limits);
        check("metrics", self.metrics == next.metrics);
        check("state_dir", self.state_dir == next.state_dir);
        check("audit", self.audit == next.audit);
        check("fleet", self.fleet == next.fleet);
        changed
    }

    /// A route's weights by backend name, if the route exists.
    pub fn route_weights(&self, route: &str) -> Option<std::collections::BTreeMap<&str, Weight>> {
        let rc = self.routes.iter().find(|r| r.name == route)?;
        Some(
            rc.backends
                .iter()
                .map(|b| (b.name.as_str(), b.weight))
                .collect(),
        )
    }

    /// The worker count to run with.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1)
        })
    }

    /// Checks everything serde cannot: ranges, uniqueness, sums, syntax of
    /// names and addresses. The first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(w) = self.workers {
            if !(1..=1024).contains(&w) {
                return Err(ConfigError::new(
                    "workers",
                    format!("{w} is not between 1 and 1024"),
                ));
            }
        }
        // Port 0 asks the kernel for a free port, so two of them never clash.
        if self.admin.listen == self.listen && self.listen.port() != 0 {
            return Err(ConfigError::new(
                "admin.listen",
                format!("{} is also the data listener's address", self.listen),
            ));
        }
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        self.user_key.validate()?;
        if let Some(fleet) = &self.fleet {
            fleet.validate()?;
        }
        self.retries.validate()?;
        self.outlier.validate()?;
        self.timeouts.validate()?;
        self.limits.validate()?;
        self.audit.validate()?;
        let watched = self.flags.iter().filter(|f| f.watched()).count();
        if watched > MAX_WATCHED_FLAGS {
            return Err(ConfigError::new(
                "flags",
                format!("{watched} flags list `metrics`; at most {MAX_WATCHED_FLAGS} may"),
            ));
        }
        let window = self.metrics.window.0;
        if window < Duration::from_secs(1) || window > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "metrics.window",
                format!(
                    "{} is not between 1s and 1h",
                    humantime::format_duration(window)
                ),
            ));
        }
        if let Some(h) = &self.forced_backend_header {
            check_own_header_name("forced_backend_header", h)?;
        }
        if !self.admin.listen.ip().is_loopback() && self.admin.tokens.is_empty() {
            return Err(ConfigError::new(
                "admin.tokens",
                format!(
                    "admin.listen {} is not a loopback address, so at least one token is required",
                    self.admin.listen
                ),
            ));
        }
        if !(1..=10_000).contains(&self.admin.max_connections) {
            return Err(ConfigError::new(
                "admin.max_connections",
                format!("{} is not between 1 and 10000", self.admin.max_connections),
            ));
        }
        let ht = self.admin.header_timeout.0;
        if ht < Duration::from_millis(100) || ht > Duration::from_secs(600) {
            return Err(ConfigError::new(
                "admin.header_timeout",
                format!(
                    "{} is not between 100ms and 10m",
                    humantime::format_duration(ht)
                ),
            ));
        }
        let mut token_names = HashSet::new();
        for (i, t) in self.admin.tokens.iter().enumerate() {
            check_name(&format!("admin.tokens[{i}].name"), &t.name)?;
            if !token_names.insert(t.name.as_str()) {
                return Err(ConfigError::new(
                    format!("admin.tokens[{i}].name"),
                    format!("duplicate token name `{}`", t.name),
                ));
            }
        }
        let mut flag_names = HashSet::new();
        for (i, flag) in self.flags.iter().enumerate() {
            flag.validate(&format!("flags[{i}]"))?;
            if !flag_names.insert(flag.name.as_str()) {
                return Err(ConfigError::new(
                    format!("flags[{i}].name"),
                    format!("duplicate flag name `{}`", flag.name),
                ));
            }
        }
        check_own_header_name("flag_header", &self.flag_header)?;
        check_own_header_name("user_groups.header", &self.user_groups.header)?;
        if self.routes.is_empty() {
            return Err(ConfigError::new("routes", "at least one route is needed"));
        }
        for (i, route) in self.routes.iter().enumerate() {
            for (j, rule) in route.rules.iter().enumerate() {
                let field = format!("routes[{i}].rules[{j}]");
                if !self.flags.iter().any(|f| f.name == rule.when_flag) {
                    return Err(ConfigError::new(
                        format!("{field}.when_flag"),
                        format!("no flag named `{}`", rule.when_flag),
                    ));
                }
                if !route.backends.iter().any(|b| b.name == rule.backend) {
                    return Err(ConfigError::new(
                        format!("{field}.backend"),
                        format!("route `{}` has no backend `{}`", route.name, rule.backend),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let field = format!("routes[{i}]");
            route.validate(&field)?;
            if !names.insert(route.name.as_str()) {
                return Err(ConfigError::new(
                    format!("{field}.name"),
                    format!("duplicate route name `{}`", route.name),
                ));
            }
            if let Some(earlier) = self.routes[..i].iter().find(|r| r.matches == route.matches) {
                return Err(ConfigError::new(
                    format!("{field}.match"),
                    format!(
                        "route `{}` can never match: route `{}` before it has the same match",
                        route.name, earlier.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    // A configuration file is small; refusing a huge one early bounds the
    // parser's work on hostile input (the YAML parser also caps aliases).
    const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;
    if text.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::new(
            "config",
            format!(
                "file is {} bytes, more than the {MAX_CONFIG_BYTES} allowed",
                text.len()
            ),
        ));
    }
    let options = serde_saphyr::options! { with_snippet: false };
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| {
        let field = if path.is_empty() || path == "." {
            "config".to_owned()
        } else {
            path
        };
        ConfigError::new(field, one_line(&e.to_string()))
    })
}

/// Parser messages may span lines (with a source snippet); the CLI promises a
/// one-line reason.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl UserKeyConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, h) in self.headers.iter().enumerate() {
            check_header_name(&format!("user_key.headers[{i}]"), h)?;
        }
        for (i, c) in self.cookies.iter().enumerate() {
            check_cookie_name(&format!("user_key.cookies[{i}]"), c)?;
        }
        check_cookie_name(
            "user_key.anonymous_cookie.name",
            &self.anonymous_cookie.name,
        )?;
        if self.anonymous_cookie.max_age.0.as_secs() == 0 {
            return Err(ConfigError::new(
                "user_key.anonymous_cookie.max_age",
                "must be at least 1s",
            ));
        }
        Ok(())
    }
}

impl Timeouts {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, d) in [
            ("connect", self.connect),
            ("request", self.request),
            ("upload_idle", self.upload_idle),
            ("idle", self.idle),
            ("response_body_idle", self.response_body_idle),
            ("request_header", self.request_header),
            ("drain", self.drain),
        ] {
            if d.0.is_zero() {
                return Err(ConfigError::new(
                    format!("timeouts.{name}"),
                    "must be more than 0",
                ));
            }
        }
        Ok(())
    }
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                "limits.max_connections",
                "must be at least 1",
            ));
        }
        if self.max_requests_in_flight == 0 {
            return Err(ConfigError::new(
                "limits.max_requests_in_flight",
                "must be at least 1",
            ));
        }
        if !(1024..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err(ConfigError::new(
                "limits.max_header_bytes",
                format!("{} is not between 1024 and 1048576", self.max_header_bytes),
            ));
        }
        if self.max_request_body_bytes == 0 {
            return Err(ConfigError::new(
                "limits.max_request_body_bytes",
                "must be at least 1",
            ));
        }
        if !(1..=10_000).contains(&self.http2_max_concurrent_streams) {
            return Err(ConfigError::new(
                "limits.http2_max_concurrent_streams",
                format!(
                    "{} is not between 1 and 10000",
                    self.http2_max_concurrent_streams
                ),
            ));
        }
        Ok(())
    }
}

impl RouteConfig {
    /// The salt of this route's buckets.
    pub fn salt(&self) -> &str {
        self.salt.as_deref().unwrap_or(&self.name)
    }

    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        check_name(&format!("{field}.name"), &self.name)?;
        self.matches.validate(&format!("{field}.match"))?;
        if self.backends.is_empty() {
            return Err(ConfigError::new(
                format!("{field}.backends"),
                "at least one backend is needed",
            ));
        }
        let mut names = HashSet::new();
        let mut total = 0u32;
        for (i, b) in self.backends.iter().enumerate() {
            let bfield = format!("{field}.backends[{i}]");
            check_name(&format!("{bfield}.name"), &b.name)?;
            if !names.insert(b.name.as_str()) {
                return Err(ConfigError::new(
                    format!("{bfield}.name"),
                    format!(
                        "duplicate backend name `{}` in route `{}`",
                        b.name, self.name
                    ),
                ));
            }
            if b.endpoints.is_empty() {
                return Err(ConfigError::new(
                    format!("{bfield}.endpoints"),
                    "at least one endpoint is needed",
                ));
            }
            if let Some(tls) = &b.tls {
                if !b.endpoints.iter().any(|e| split_endpoint(e).0) {
                    return Err(ConfigError::new(
                        format!("{bfield}.tls"),
                        "set, but no endpoint is https://",
                    ));
                }
                if let Some(name) = &tls.server_name {
                    if !is_hostname(name) {
                        return Err(ConfigError::new(
                            format!("{bfield}.tls.server_name"),
                            format!("`{name}` is not a host name"),
                        ));
                    }
                }
                if tls.ca.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                    return Err(ConfigError::new(
                        format!("{bfield}.tls.ca"),
                        "must not be empty",
                    ));
                }
            }
            for (j, e) in b.endpoints.iter().enumerate() {
                check_endpoint(&format!("{bfield}.endpoints[{j}]"), split_endpoint(e).1)?;
            }
            if let Some(hc) = &b.health_check {
                hc.validate(&format!("{bfield}.health_check"))?;
            }
            total += b.weight.basis_points();
        }
        if total != BUCKETS {
            let weights: Vec<String> = self
                .backends
                .iter()
                .map(|b| format!("{}={}", b.name, b.weight))
                .collect();
            return Err(ConfigError::new(
                format!("{field}.backends"),
                format!(
                    "weights sum to {}, must be exactly 100 ({})",
                    Weight(total),
                    weights.join(" ")
                ),
            ));
        }
        Ok(())
    }
}

impl PartialEq for MatchConfig {
    fn eq(&self, other: &Self) -> bool {
        let headers = |m: &MatchConfig| {
            let mut v: Vec<(String, String)> = m
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect();
            v.sort();
            v
        };
        self.host.eq_ignore_ascii_case(&other.host)
            && normalized_prefix(&self.path_prefix) == normalized_prefix(&other.path_prefix)
            && headers(self) == headers(other)
    }
}

/// `/api/` and `/api` match the same requests.
pub fn normalized_prefix(prefix: &str) -> &str {
    match prefix.trim_end_matches('/') {
        "" => "/",
        p => p,
    }
}

impl MatchConfig {
    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let host = self.host.strip_prefix("*.").unwrap_or(&self.host);
        if self.host != "*" && !is_hostname(host) {
            return Err(ConfigError::new(
                format!("{field}.host"),
                format!(
                    "`{}` is not `*`, a host name or `*.` followed by a host name",
                    self.host
                ),
            ));
        }
        if !self.path_prefix.starts_with('/')
            || self.path_prefix.contains(['?', '#'])
            || self
                .path_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::new(
                format!("{field}.path_prefix"),
                format!(
                    "`{}` must start with `/` and hold only a path",
                    self.path_prefix
                ),
            ));
        }
        for (i, h) in self.headers.iter().enumerate() {
            check_header_name(&format!("{field}.headers[{i}].name"), &h.name)?;
            if http::HeaderValue::from_str(&h.value).is_err() {
                return Err(ConfigError::new(
                    format!("{field}.headers[{i}].value"),
                    "is not a valid header value",
                ));
            }
        }
        Ok(())
    }
}

// === syntax checks ===

/// Names appear in metric labels and admin URLs, so they are kept plain.
pub(crate) fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!("`{name}` must be 1-63 characters of letters, digits, `-`, `_` or `.`"),
        ))
    }
}

fn check_header_name(field: &str, name: &str) -> Result<(), ConfigError> {
    match http::HeaderName::from_bytes(name.as_bytes()) {
        Ok(_) => Ok(()),
        Err(_) => Err(ConfigError::new(
            field,
            format!("`{name}` is not a valid header name"),
        )),
    }
}

/// Hop-by-hop by definition (RFC 9110 §7.6.1), plus the obsolete
/// `Keep-Alive` and `Proxy-Connection` and the proxy authentication pair:
/// never forwarded (the proxy's header rewrite), and never a header the
/// configuration may give another role.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Besides `HOP_BY_HOP`, fields whose meaning the proxy fixes: framing and
/// `Host`, and the forwarding fields and request id the proxy writes itself.
const MANAGED_HEADERS: [&str; 6] = [
    "content-length",
    "host",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
];

/// A header the proxy reads from clients only to remove it, or sets
/// itself (the forced-backend header, the flag header, the groups header):
/// a valid name, and not one whose meaning the proxy already fixes.
fn check_own_header_name(field: &str, name: &str) -> Result<(), ConfigError> {
    check_header_name(field, name)?;
    let mut managed = HOP_BY_HOP.iter().chain(&MANAGED_HEADERS);
    if managed.any(|m| m.eq_ignore_ascii_case(name)) {
        return Err(ConfigError::new(
            field,
            format!("`{name}` is a header the proxy manages itself; choose another name"),
        ));
    }
    Ok(())
}

fn check_cookie_name(field: &str, name: &str) -> Result<(), ConfigError> {
    // RFC 6265 cookie-name is an RFC 7230 token, the same alphabet as a header name.
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if token {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!("`{name}` is not a valid cookie name"),
        ))
    }
}

fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// An endpoint is `host:port` with an IP address (`[v6]` in brackets) or a
/// DNS name, and a port from 1 to 65535.
fn check_endpoint(field: &str, endpoint: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| {
        Err(ConfigError::new(
            field,
            format!("`{endpoint}` is not host:port ({why})"),
        ))
    };
    if endpoint.parse::<SocketAddr>().is_ok() {
        return if endpoint.ends_with(":0") {
            bad("port 0")
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return bad("no port");
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return bad("port must be 1 to 65535"),
        Ok(_) => {}
    }
    let looks_numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if host.starts_with('[') || looks_numeric {
        return bad("invalid IP address");
    }
    if !is_hostname(host) {
        return bad("invalid host name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen: 127.0.0.1:8080
admin: { listen: 127.0.0.1:9901 }
user_key: { headers: [x-user-id], cookies: [uid], fallback: cookie }
timeouts: { connect: 1s, request: 30s, idle: 90s }
routes:
  - name: api
    match: { host: "*", path_prefix: / }
    backends:
      - { name: blue,   endpoints: ["127.0.0.1:18081"], weight: 90 }
      - { name: canary, endpoints: ["127.0.0.1:18083", "app.default.svc:80"], weight: 10 }
"#;

    fn err(yaml: &str) -> ConfigError {
        Config::from_yaml(yaml).expect_err("config should be rejected")
    }

    fn with(replace: &str, by: &str) -> String {
        assert!(GOOD.contains(replace), "fixture lacks {replace:?}");
        GOOD.replacen(replace, by, 1)
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::from_yaml(GOOD).unwrap();
        assert_eq!(c.routes[0].backends[0].weight.basis_points(), 9000);
        assert_eq!(c.routes[0].salt(), "api");
        assert_eq!(c.timeouts.drain.0, Duration::from_secs(30));
        assert_eq!(c.limits.max_header_bytes, 32 * 1024);
        assert_eq!(c.user_key.fallback, Fallback::Cookie);
        assert!(c.forced_backend_header.is_none());
    }

    #[test]
    fn weights_take_two_decimals_and_must_sum_to_100() {
        let ok = with("weight: 90 }", "weight: 99.99 }").replace("weight: 10 }", "weight: 0.01 }");
        let c = Config::from_yaml(&ok).unwrap();
        assert_eq!(c.routes[0].backends[1].weight.basis_points(), 1);

        let e = err(&with("weight: 90 }", "weight: 85 }"));
        assert_eq!(e.field, "routes[0].backends");
        assert!(e.reason.contains("sum to 95"), "{e}");

        let e = err(&with("weight: 90 }", "weight: 89.995 }"));
        assert_eq!(e.field, "routes[0].backends[0].weight");
        assert!(e.reason.contains("two decimals"), "{e}");

        let e = err(&with("weight: 90 }", "weight: 190 }"));
        assert!(e.reason.contains("0 to 100"), "{e}");
        let e = err(&with("weight: 90 }", "weight: -5 }"));
        assert_eq!(e.field, "routes[0].backends[0].weight");
        let e = err(&with("weight: 90 }", "weight: ninety }"));
        assert_eq!(e.field, "routes[0].backends[0].weight");
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let e = err(&with(
            "listen: 127.0.0.1:8080",
            "listen: 127.0.0.1:8080\nlisten_port: 1",
        ));
        assert!(e.reason.contains("listen_port"), "{e}");
        let e = err(&with("weight: 90 }", "weight: 90, colour: blue }"));
        assert!(
            e.field.starts_with("routes[0].backends[0]") || e.field == "routes[0].backends",
            "{e}"
        );
        assert!(e.reason.contains("colour"), "{e}");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let e = err(&with("name: canary", "name: blue"));
        assert_eq!(e.field, "routes[0].backends[1].name");
        assert!(e.reason.contains("duplicate backend"), "{e}");

        let two = format!(
            "{GOOD}  - name: api\n    match: {{ path_prefix: /x }}\n    backends: [{{ name: b, endpoints: [\"127.0.0.1:1\"], weight: 100 }}]\n"
        );
        let e = err(&two);
        assert_eq!(e.field, "routes[1].name");
        assert!(e.reason.contains("duplicate route"), "{e}");
    }

    #[test]
    fn shadowed_route_is_rejected() {
        let two = format!(
            "{GOOD}  - name: other\n    match: {{ host: \"*\", path_prefix: \"/\" }}\n    backends: [{{ name: b, endpoints: [\"127.0.0.1:1\"], weight: 100 }}]\n"
        );
        let e = err(&two);
        assert_eq!(e.field, "routes[1].match");
        assert!(e.reason.contains("never match"), "{e}");
    }

    #[test]
    fn bad_addresses_are_rejected() {
        let e = err(&with("listen: 127.0.0.1:8080", "listen: 127.0.0.1"));
        assert_eq!(e.field, "listen");
        let e = err(&with("listen: 127.0.0.1:8080", "listen: 127.0.0.1:9901"));
        assert_eq!(e.field, "admin.listen");
        for bad in [
            "127.0.0.1",
            "300.1.1.1:80",
            "host:0",
            "host:99999",
            "bad host:80",
            ":80",
            "[::1:80",
        ] {
            let e = err(&with("\"127.0.0.1:18081\"", &format!("\"{bad}\"")));
            assert_eq!(e.field, "routes[0].backends[0].endpoints[0]", "{bad}: {e}");
        }
        Config::from_yaml(&with("\"127.0.0.1:18081\"", "\"[::1]:18081\"")).unwrap();
    }

    #[test]
    fn other_fields_are_checked() {
        let cases = [
            (
                "fallback: cookie",
                "fallback: sometimes",
                "user_key.fallback",
            ),
            (
                "headers: [x-user-id]",
                "headers: [\"x user\"]",
                "user_key.headers[0]",
            ),
            (
                "cookies: [uid]",
                "cookies: [\"u;id\"]",
                "user_key.cookies[0]",
            ),
            ("connect: 1s", "connect: soon", "timeouts.connect"),
            ("connect: 1s", "connect: 0s", "timeouts.connect"),
            (
                "connect: 1s",
                "connect: 1s, request_header: 0s",
                "timeouts.request_header",
            ),
            (
                "connect: 1s",
                "connect: 1s, request_header: soon",
                "timeouts.request_header",
            ),
            (
                "path_prefix: /",
                "path_prefix: api",
                "routes[0].match.path_prefix",
            ),
            ("host: \"*\"", "host: \"exa mple\"", "routes[0].match.host"),
            ("name: api", "name: \"a/b\"", "routes[0].name"),
            (
                "endpoints: [\"127.0.0.1:18081\"]",
                "endpoints: []",
                "routes[0].backends[0].endpoints",
            ),
        ];
        for (from, to, field) in cases {
            let e = err(&with(from, to));
            assert_eq!(e.field, field, "{from} -> {to}: {e}");
        }
        let e = err(&format!("{GOOD}metrics: {{ window: 2h }}\n"));
        assert_eq!(e.field, "metrics.window");
        let e = err(&format!("{GOOD}metrics: {{ window: 500ms }}\n"));
        assert_eq!(e.field, "metrics.window");
        let e = err(&format!("{GOOD}workers: 0\n"));
        assert_eq!(e.field, "workers");
        let e = err(&format!("{GOOD}limits: {{ max_header_bytes: 10 }}\n"));
        assert_eq!(e.field, "limits.max_header_bytes");
        let e = err(&format!("{GOOD}audit: {{ max_file_bytes: 1000 }}\n"));
        assert_eq!(e.field, "audit.max_file_bytes");
        assert!(e.to_string().contains("65536"), "{e}");
        let e = err(&GOOD.replace("idle: 90s", "idle: 90s, response_body_idle: 0s"));
        assert_eq!(e.field, "timeouts.response_body_idle");
        for (flag, field) in [
            (
                "{ name: f, metrics: [latency, latency] }",
                "flags[0].metrics[1]",
            ),
            ("{ name: f, metrics: [throughput] }", "flags[0]"),
            (
                "{ name: f, description: \"a\\u0007b\" }",
                "flags[0].description",
            ),
        ] {
            let e = err(&format!("{GOOD}flags:\n  - {flag}\n"));
            assert!(e.field.starts_with(field), "{flag}: {e}");
        }
        let long = "x".repeat(1001);
        let e = err(&format!(
            "{GOOD}flags:\n  - {{ name: f, description: {long} }}\n"
        ));
        assert_eq!(e.field, "flags[0].description");
        let c = Config::from_yaml(&format!(
            "{GOOD}flags:\n  - {{ name: f, description: New checkout, metrics: [requests, latency] }}\n"
        ))
        .unwrap();
        assert!(c.flags[0].watched());
        assert_eq!(
            c.flags[0].metrics,
            [FlagMetric::Requests, FlagMetric::Latency]
        );
        let e = err(&format!("{GOOD}audit: {{ keep_files: 20000 }}\n"));
        assert_eq!(e.field, "audit.keep_files");
        let c = Config::from_yaml(GOOD).unwrap();
        assert_eq!((c.audit.max_file_bytes, c.audit.keep_files), (16 << 20, 8));
        for (extra, field) in [
            (
                "limits: { max_request_body_bytes: 0 }",
                "limits.max_request_body_bytes",
            ),
            (
                "limits: { max_request_body_bytes: -1 }",
                "limits.max_request_body_bytes",
            ),
            (
                "limits: { http2_max_concurrent_streams: 0 }",
                "limits.http2_max_concurrent_streams",
            ),
            (
                "limits: { http2_max_concurrent_streams: 20000 }",
                "limits.http2_max_concurrent_streams",
            ),
            ("tls: { certificates: [] }", "tls.certificates"),
            ("tls: {}", "tls"),
            (
                "tls: { certificates: [{ cert: a.pem }] }",
                "tls.certificates[0]",
            ),
            (
                "tls: { certificates: [{ cert: \"\", key: k.pem }] }",
                "tls.certificates[0].cert",
            ),
            (
                "tls: { certificates: [{ cert: a, key: k }], client_ca: \"\" }",
                "tls.client_ca",
            ),
            (
                "tls: { certificates: [{ cert: a, key: k }], unknown_server_name: drop }",
                "tls.unknown_server_name",
            ),
            (
                "tls: { certificates: [{ cert: a, key: k }], min_version: \"1.1\" }",
                "tls.min_version",
            ),
            (
                "tls: { certificates: [{ cert: a, key: k, pass: x }] }",
                "tls.certificates[0].pass",
            ),
        ] {
            let e = err(&format!("{GOOD}{extra}\n"));
            assert!(e.field.starts_with(field), "{extra}: {e}");
        }
        for (admin, field) in [
            ("max_connections: 0", "admin.max_connections"),
            ("max_connections: 20000", "admin.max_connections"),
            ("header_timeout: 10ms", "admin.header_timeout"),
            ("header_timeout: 1h", "admin.header_timeout"),
        ] {
            let e = err(&with(
                "admin: { listen: 127.0.0.1:9901 }",
                &format!("admin: {{ listen: 127.0.0.1:9901, {admin} }}"),
            ));
            assert_eq!(e.field, field, "{admin}: {e}");
        }
        let tls = Config::from_yaml(&format!(
            "{GOOD}tls: {{ certificates: [{{ cert: a.pem, key: a.key }}], unknown_server_name: reject, min_version: \"1.3\" }}\n"
        ))
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(tls.unknown_server_name, UnknownServerName::Reject);
        assert_eq!(tls.min_version, TlsVersion::V1_3);
        let e = err(&format!("{GOOD}forced_backend_header: \"a b\"\n"));
        assert_eq!(e.field, "forced_backend_header");
        let e = err("listen: 127.0.0.1:8080\n");
        assert!(e.reason.contains("routes"), "{e}");
        let e = err("routes: []\n");
        assert_eq!(e.field, "routes");
    }

    #[test]
    fn flags_and_rules_are_checked() {
        let flags = "flags:\n  - { name: ai-v2, rollout_percentage: 10, target_groups: [beta], overrides: { user-1: true } }\n";
        let rules = "    rules: [{ when_flag: ai-v2, backend: canary }]\n";
        let ok = format!("{flags}{GOOD}{rules}");
        let c = Config::from_yaml(&ok).unwrap();
        assert_eq!(c.routes[0].rules[0].backend, "canary");
        assert_eq!(c.flag_header, "x-feature-flags");
        assert!(!c.user_groups.trusted);

        let e = err(&format!(
            "{flags}{GOOD}    rules: [{{ when_flag: ai-v2, backend: purple }}]\n"
        ));
        assert_eq!(e.field, "routes[0].rules[0].backend");
        assert!(e.reason.contains("no backend `purple`"), "{e}");
        let e = err(&format!(
            "{flags}{GOOD}    rules: [{{ when_flag: nope, backend: canary }}]\n"
        ));
        assert_eq!(e.field, "routes[0].rules[0].when_flag");
        let e = err(&format!(
            "flags:\n  - {{ name: a, rollout_percentage: 100.5 }}\n{GOOD}"
        ));
        assert_eq!(e.field, "flags[0].rollout_percentage");
        let e = err(&format!(
            "flags:\n  - {{ name: a }}\n  - {{ name: a }}\n{GOOD}"
        ));
        assert_eq!(e.field, "flags[1].name");
        let e = err(&format!(
            "flags:\n  - {{ name: a, target_groups: [\"x,y\"] }}\n{GOOD}"
        ));
        assert_eq!(e.field, "flags[0].target_groups[0]");
        let e = err(&format!("flags:\n  - {{ name: a, colour: red }}\n{GOOD}"));
        assert!(e.reason.contains("colour"), "{e}");
        let e = err(&format!("flag_header: \"a b\"\n{GOOD}"));
        assert_eq!(e.field, "flag_header");
        for (field, yaml) in [
            ("flag_header", "flag_header: X-Request-Id"),
            (
                "forced_backend_header",
                "forced_backend_header: x-forwarded-for",
            ),
            ("user_groups.header", "user_groups: { header: connection }"),
        ] {
            let e = err(&format!("{yaml}\n{GOOD}"));
            assert_eq!(e.field, field, "{yaml}");
            assert!(e.reason.contains("manages itself"), "{e}");
        }
        let e = err(&format!(
            "user_groups: {{ header: x-g, trusted: maybe }}\n{GOOD}"
        ));
        assert_eq!(e.field, "user_groups.trusted");
    }

    #[test]
    fn weight_display_round_trips() {
        for (pct, shown) in [
            (10.0, "10"),
            (0.01, "0.01"),
            (12.5, "12.50"),
            (100.0, "100"),
        ] {
            assert_eq!(Weight::from_percent(pct).unwrap().to_string(), shown);
        }
    }

    #[test]
    fn malformed_yaml_is_one_line() {
        let e = err("routes: [\n  - { name: a\n");
        assert!(!e.to_string().contains('\n'), "{e}");
    }
}
