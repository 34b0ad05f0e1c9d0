//! A small etcd v3 client over etcd's JSON gateway (`/v3/kv/*`, `/v3/lease/*`,
//! `/v3/watch`), on the hyper client the rest of the binary already uses.
//!
//! Why the gateway rather than gRPC: every maintained Rust etcd client runs
//! `tonic-build` at build time, which needs `protoc`, and `cargo test` must
//! build with Rust alone (docs/decisions.md). The gateway is etcd's own,
//! served on the client port, at `/v3/` from etcd 3.4 on (3.3 only has
//! `/v3beta/`), and carries the same messages as JSON: keys and values in
//! base64, 64-bit integers as strings.
//!
//! Endpoints are tried in turn, each client starting at a random one so a
//! fleet's watches spread over the members: a member that cannot be reached
//! or answers 5xx moves the client to the next one for this and later
//! requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use super::config::EtcdConfig;
use crate::config::ConfigError;

/// Why an etcd request did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// No member answered (refused, timed out, no quorum).
    #[error("etcd unreachable: {0}")]
    Unavailable(String),
    /// A member answered with an error.
    #[error("etcd refused the request: {0}")]
    Refused(String),
    /// The watch's start revision was compacted away: reload, then watch.
    #[error("revision {0} was compacted")]
    Compacted(i64),
}

/// One key and its value, as etcd keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A guard of a transaction.
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key was last written at this revision (0: it does not exist).
    ModRevision(String, i64),
    /// The key holds exactly this value.
    Value(String, Vec<u8>),
    /// The key is bound to this lease.
    Lease(String, i64),
}

/// A request inside a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete(String),
    /// Every key from the first to the second, excluded.
    DeleteRange(String, String),
    Get(String),
    /// The key's revisions without its value.
    Revisions(String),
}

/// What a transaction did.
#[derive(Debug, Clone)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// The keys read by `Op::Get` requests of the branch taken.
    pub kvs: Vec<Kv>,
}

/// One watch message: the events at one revision or more.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub kv: Kv,
    pub deleted: bool,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The client. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<Uri>,
    /// The member tried first.
    current: AtomicUsize,
    http: HttpClient,
    request_timeout: Duration,
    credentials: Option<(String, String)>,
    /// The auth token, when etcd's authentication is on.
    token: tokio::sync::Mutex<Option<String>>,
}

impl Etcd {
    /// A client for `config`. Reads the TLS and password files (errors name
    /// the field); makes no connection.
    pub fn new(config: &EtcdConfig) -> Result<Etcd, ConfigError> {
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| e.parse::<Uri>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::new("fleet.etcd.endpoints", e.to_string()))?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.dial_timeout.0));
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = tls_config(config)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let credentials = match (&config.username, &config.password_file) {
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(file).map_err(|e| {
                    ConfigError::new(
                        "fleet.etcd.password_file",
                        format!("{}: cannot read it: {e}", file.display()),
                    )
                })?;
                Some((
                    user.clone(),
                    password.trim_end_matches(['\r', '\n']).to_owned(),
                ))
            }
            _ => None,
        };
        Ok(Etcd {
            inner: Arc::new(Inner {
                current: AtomicUsize::new(random_index(endpoints.len())),
                endpoints,
                http,
                request_timeout: config.request_timeout.0,
                credentials,
                token: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The member the client uses now.
    pub fn endpoint(&self) -> String {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.endpoints.len();
        self.inner.endpoints[i].to_string()
    }

    // === key-value ===

    /// The key `key`, and the store's revision.
    pub async fn get(&self, key: &str) -> Result<(Option<Kv>, i64), EtcdError> {
        let body = json!({ "key": B64.encode(key) });
        let answer = self.call("/v3/kv/range", &body).await?;
        let kvs = kvs(&answer["kvs"])?;
        Ok((kvs.into_iter().next(), revision(&answer)))
    }

    /// Every key under `prefix` (at most `limit`, 0 for all, from `from` on
    /// when given), and the store's revision.
    pub async fn range(
        &self,
        prefix: &str,
        from: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Kv>, i64), EtcdError> {
        let body = json!({
            "key": B64.encode(from.unwrap_or(prefix)),
            "range_end": B64.encode(prefix_end(prefix)),
            "limit": limit.to_string(),
        });
        let answer = self.call("/v3/kv/range", &body).await?;
        Ok((kvs(&answer["kvs"])?, revision(&answer)))
    }

    /// How many keys are under `prefix`.
    pub async fn count(&self, prefix: &str) -> Result<u64, EtcdError> {
        let body = json!({
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "count_only": true,
        });
        let answer = self.call("/v3/kv/range", &body).await?;
        Ok(int(&answer["count"]).unwrap_or(0) as u64)
    }

    /// Puts `value` at `key`, bound to `lease` (0: none).
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let answer = self.call("/v3/kv/put", &put(key, value, lease)).await?;
        Ok(revision(&answer))
    }

    /// Runs `success` if every compare holds, else `failure`, atomically.
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResult, EtcdError> {
        let compare: Vec<Value> = compare
            .iter()
            .map(|c| match c {
                Compare::ModRevision(key, rev) => json!({
                    "target": "MOD", "result": "EQUAL", "key": B64.encode(key),
                    "mod_revision": rev.to_string(),
                }),
                Compare::Value(key, value) => json!({
                    "target": "VALUE", "result": "EQUAL", "key": B64.encode(key),
                    "value": B64.encode(value),
                }),
                Compare::Lease(key, lease) => json!({
                    "target": "LEASE", "result": "EQUAL", "key": B64.encode(key),
                    "lease": lease.to_string(),
                }),
            })
            .collect();
        let ops = |ops: &[Op]| -> Vec<Value> {
            ops.iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => {
                        json!({ "request_put": put(key, value, *lease) })
                    }
                    Op::Delete(key) => {
                        json!({ "request_delete_range": { "key": B64.encode(key) } })
                    }
                    Op::DeleteRange(from, to) => json!({ "request_delete_range": {
                        "key": B64.encode(from), "range_end": B64.encode(to),
                    }}),
                    Op::Get(key) => json!({ "request_range": { "key": B64.encode(key) } }),
                    Op::Revisions(key) => json!({ "request_range": {
                        "key": B64.encode(key), "keys_only": true,
                    }}),
                })
                .collect()
        };
        let body = json!({ "compare": compare, "success": ops(success), "failure": ops(failure) });
        let answer = self.call("/v3/kv/txn", &body).await?;
        let mut found = Vec::new();
        if let Some(responses) = answer["responses"].as_array() {
            for r in responses {
                found.extend(kvs(&r["response_range"]["kvs"])?);
            }
        }
        Ok(TxnResult {
            succeeded: answer["succeeded"].as_bool().unwrap_or(false),
            revision: revision(&answer),
            kvs: found,
        })
    }

    // === leases ===

    /// A new lease of `ttl` (whole seconds, at least 1); its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let secs = ttl.as_secs().max(1);
        let answer = self
            .call("/v3/lease/grant", &json!({ "TTL": secs.to_string() }))
            .await?;
        int(&answer["ID"]).ok_or_else(|| EtcdError::Refused(format!("lease grant: {answer}")))
    }

    /// Renews `lease`; `false` if it has expired (its keys are gone).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        let answer = self
            .call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))
            .await?;
        // A stream of one answer; an expired lease answers without a TTL.
        Ok(int(&answer["result"]["TTL"]).unwrap_or(0) > 0)
    }

    /// Ends `lease` at once, deleting its keys.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() }))
            .await
            .map(|_| ())
    }

    // === watch ===

    /// Watches `key` (or every key under it with `prefix`) from `revision`
    /// on. The stream ends when the connection does.
    pub async fn watch(&self, key: &str, prefix: bool, revision: i64) -> Result<Watch, EtcdError> {
        let mut create = json!({ "key": B64.encode(key), "start_revision": revision.to_string() });
        if prefix {
            create["range_end"] = json!(B64.encode(prefix_end(key)));
        }
        let body = json!({ "create_request": create });
        let endpoint = self.inner.current.load(Ordering::Relaxed);
        // Only the creation is bounded: the stream then lives as long as
        // there is something to say (the fleet checks it is not behind).
        let created = tokio::time::timeout(self.inner.request_timeout, async {
            let token = self.token(endpoint).await?;
            self.send(endpoint, "/v3/watch", &body, token, true).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(EtcdError::Unavailable(format!(
                "{} did not start the watch within {}",
                self.inner.endpoints[endpoint],
                humantime::format_duration(self.inner.request_timeout)
            )))
        });
        let resp = match created {
            Ok(resp) if resp.status() == StatusCode::OK => resp,
            Ok(resp) => {
                self.next_endpoint(endpoint);
                return Err(EtcdError::Unavailable(format!(
                    "watch answered {}",
                    resp.status()
                )));
            }
            Err(e) => {
                self.next_endpoint(endpoint);
                return Err(e);
            }
        };
        Ok(Watch {
            body: resp.into_body(),
            buffer: BytesMut::new(),
        })
    }

    // === transport ===

    /// POSTs `body` to `path`, trying each member once, starting with the
    /// current one; the answer's JSON.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let count = self.inner.endpoints.len();
        let first = self.inner.current.load(Ordering::Relaxed);
        let mut last = EtcdError::Unavailable("no endpoint".into());
        for attempt in 0..count {
            let endpoint = (first + attempt) % count;
            let mut result = self.ask(endpoint, path, body).await;
            if matches!(&result, Err(EtcdError::Refused(why)) if why.contains("invalid auth token"))
            {
                // The token expired: a fresh one, from the same member.
                *self.inner.token.lock().await = None;
                result = self.ask(endpoint, path, body).await;
            }
            match result {
                Ok(answer) => {
                    if attempt > 0 {
                        self.inner.current.store(endpoint, Ordering::Relaxed);
                    }
                    return Ok(answer);
                }
                Err(e @ EtcdError::Refused(_)) => return Err(e),
                Err(e) => last = e,
            }
            self.next_endpoint(endpoint);
        }
        Err(last)
    }

    /// One request to one member, within `request_timeout`.
    async fn ask(&self, endpoint: usize, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let asked = tokio::time::timeout(self.inner.request_timeout, async {
            let token = self.token(endpoint).await?;
            let (status, answer) = self.exchange(endpoint, path, body, token).await?;
            if status.is_success() {
                Ok(answer)
            } else {
                Err(gateway_error(status, &answer))
            }
        })
        .await;
        asked.unwrap_or_else(|_| {
            Err(EtcdError::Unavailable(format!(
                "{} gave no answer within {}",
                self.inner.endpoints[endpoint],
                humantime::format_duration(self.inner.request_timeout)
            )))
        })
    }

    fn next_endpoint(&self, failed: usize) {
        let next = (failed + 1) % self.inner.endpoints.len();
        let _ =
            self.inner
                .current
                .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    async fn send(
        &self,
        endpoint: usize,
        path: &str,
        body: &Value,
        token: Option<String>,
        require_leader: bool,
    ) -> Result<http::Response<Incoming>, EtcdError> {
        let base = &self.inner.endpoints[endpoint];
        let uri = format!(
            "{}://{}{path}",
            base.scheme_str().unwrap_or("http"),
            base.authority().map_or("", |a| a.as_str())
        );
        let mut req = Request::post(&uri).header("content-type", "application/json");
        if let Some(token) = token {
            req = req.header("authorization", token);
        }
        if require_leader {
            // gRPC metadata `hasleader` through the gateway: a member cut
            // off from its cluster ends the watch instead of keeping it open
            // with nothing to say, so the replica moves to another member.
            req = req.header("grpc-metadata-hasleader", "true");
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| EtcdError::Refused(e.to_string()))?;
        self.inner
            .http
            .request(req)
            .await
            .map_err(|e| EtcdError::Unavailable(format!("{base}: {}", error_chain(&e))))
    }

    /// POSTs `body` to `path` on `endpoint`: the status and the answer.
    async fn exchange(
        &self,
        endpoint: usize,
        path: &str,
        body: &Value,
        token: Option<String>,
    ) -> Result<(StatusCode, Value), EtcdError> {
        let resp = self.send(endpoint, path, body, token, false).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| EtcdError::Unavailable(e.to_string()))?
            .to_bytes();
        let answer = serde_json::from_slice(&bytes)
            .map_err(|e| EtcdError::Unavailable(format!("{path}: not JSON ({e})")))?;
        Ok((status, answer))
    }

    /// The auth token, fetched on first use when a user is configured.
    async fn token(&self, endpoint: usize) -> Result<Option<String>, EtcdError> {
        let Some((user, password)) = &self.inner.credentials else {
            return Ok(None);
        };
        let mut token = self.inner.token.lock().await;
        if token.is_none() {
            let credentials = json!({ "name": user, "password": password });
            let (status, answer) = self
                .exchange(endpoint, "/v3/auth/authenticate", &credentials, None)
                .await?;
            if !status.is_success() {
                return Err(gateway_error(status, &answer));
            }
            *token = answer["token"].as_str().map(str::to_owned);
        }
        Ok(token.clone())
    }
}

/// A watch's messages, in revision order.
pub struct Watch {
    body: Incoming,
    buffer: BytesMut,
}

impl Watch {
    /// The next batch of events (empty for the creation and progress
    /// messages) with the revision it brings the watcher to; `Ok(None)` when
    /// the stream ended.
    pub async fn next(&mut self) -> Result<Option<(Vec<WatchEvent>, i64)>, EtcdError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line = self.buffer.split_to(end + 1);
                let line = &line[..end];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return parse_watch(line).map(Some);
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(EtcdError::Unavailable(format!("watch: {e}"))),
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buffer.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                    // A line longer than any state document etcd could
                    // hold (1.5 MiB by default, base64) is not a watch.
                    if self.buffer.len() > 8 * 1024 * 1024 {
                        return Err(EtcdError::Unavailable("watch message too long".into()));
                    }
                }
            }
        }
    }
}

fn parse_watch(line: &[u8]) -> Result<(Vec<WatchEvent>, i64), EtcdError> {
    let message: Value = serde_json::from_slice(line)
        .map_err(|e| EtcdError::Unavailable(format!("watch message not JSON: {e}")))?;
    if !message["error"].is_null() {
        return Err(EtcdError::Unavailable(format!(
            "watch: {}",
            message["error"]
        )));
    }
    let result = &message["result"];
    if let Some(compacted) = int(&result["compact_revision"]).filter(|r| *r > 0) {
        return Err(EtcdError::Compacted(compacted));
    }
    if result["canceled"].as_bool() == Some(true) {
        return Err(EtcdError::Unavailable(format!(
            "watch canceled: {}",
            result["cancel_reason"]
        )));
    }
    let mut events = Vec::new();
    if let Some(list) = result["events"].as_array() {
        for e in list {
            events.push(WatchEvent {
                kv: kv(&e["kv"])?,
                deleted: e["type"].as_str() == Some("DELETE"),
            });
        }
    }
    Ok((events, revision(result)))
}

// === JSON helpers ===

fn put(key: &str, value: &[u8], lease: i64) -> Value {
    let mut put = json!({ "key": B64.encode(key), "value": B64.encode(value) });
    if lease != 0 {
        put["lease"] = json!(lease.to_string());
    }
    put
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &str) -> String {
    // Prefixes are validated ASCII without control characters, so bumping the
    // last byte stays within ASCII.
    let mut bytes = prefix.as_bytes().to_vec();
    if let Some(last) = bytes.last_mut() {
        *last += 1;
    }
    String::from_utf8(bytes).expect("ASCII prefix")
}

/// A 64-bit integer the gateway wrote as a string (or a number).
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn revision(answer: &Value) -> i64 {
    int(&answer["header"]["revision"]).unwrap_or(0)
}

fn kvs(list: &Value) -> Result<Vec<Kv>, EtcdError> {
    match list.as_array() {
        None => Ok(Vec::new()),
        Some(list) => list.iter().map(kv).collect(),
    }
}

fn kv(v: &Value) -> Result<Kv, EtcdError> {
    let decode = |field: &str| -> Result<Vec<u8>, EtcdError> {
        match v[field].as_str() {
            None => Ok(Vec::new()),
            Some(s) => B64
                .decode(s)
                .map_err(|e| EtcdError::Unavailable(format!("etcd {field} not base64: {e}"))),
        }
    };
    Ok(Kv {
        key: String::from_utf8_lossy(&decode("key")?).into_owned(),
        value: decode("value")?,
        create_revision: int(&v["create_revision"]).unwrap_or(0),
        mod_revision: int(&v["mod_revision"]).unwrap_or(0),
        lease: int(&v["lease"]).unwrap_or(0),
    })
}

fn gateway_error(status: StatusCode, answer: &Value) -> EtcdError {
    let message = answer["message"]
        .as_str()
        .or_else(|| answer["error"].as_str())
        .unwrap_or("no message")
        .to_owned();
    // No leader, no quorum, timeouts, too busy: the cluster cannot serve
    // right now, another member or a later try may.
    let transient = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || message.contains("too many requests")
        || message.contains("no leader")
        || message.contains("timed out")
        || message.contains("unavailable");
    if transient {
        EtcdError::Unavailable(format!("{} {message}", status.as_u16()))
    } else {
        EtcdError::Refused(format!("{} {message}", status.as_u16()))
    }
}

/// A random index below `n`, from the standard library's per-process random
/// hash keys (no random-number crate for one choice).
fn random_index(n: usize) -> usize {
    use std::hash::BuildHasher;
    (std::collections::hash_map::RandomState::new().hash_one(std::process::id()) as usize)
        % n.max(1)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn tls_config(config: &EtcdConfig) -> Result<rustls::ClientConfig, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = config.tls.as_ref();
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            ConfigError::new(field, format!("{}: cannot read it: {e}", path.display()))
        })
    };
    let mut roots = rustls::RootCertStore::empty();
    match tls.and_then(|t| t.ca.as_deref()) {
        Some(path) => {
            let pem = read("fleet.etcd.tls.ca", path)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    ConfigError::new("fleet.etcd.tls.ca", format!("{}: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    ConfigError::new("fleet.etcd.tls.ca", format!("{}: {e}", path.display()))
                })?;
            }
            if roots.is_empty() {
                return Err(ConfigError::new(
                    "fleet.etcd.tls.ca",
                    format!("{}: no CERTIFICATE block in it", path.display()),
                ));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new("fleet.etcd.tls", e.to_string()))?
        .with_root_certificates(roots);
    match tls.and_then(|t| t.cert.as_deref().zip(t.key.as_deref())) {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(&read("fleet.etcd.tls.cert", cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    ConfigError::new("fleet.etcd.tls.cert", format!("{}: {e}", cert.display()))
                })?;
            let key =
                PrivateKeyDer::from_pem_slice(&read("fleet.etcd.tls.key", key)?).map_err(|e| {
                    ConfigError::new("fleet.etcd.tls.key", format!("{}: {e}", key.display()))
                })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ConfigError::new("fleet.etcd.tls", e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/switchyard/prod/"), "/switchyard/prod0");
        assert_eq!(prefix_end("/a"), "/b");
    }

    #[test]
    fn watch_messages_parse() {
        let line = br#"{"result":{"header":{"revision":"4"},"events":[{"type":"DELETE","kv":{"key":"L3gvc3RhdGU=","mod_revision":"4"}},{"kv":{"key":"L3g=","value":"aGk=","mod_revision":"3","create_revision":"2"}}]}}"#;
        let (events, rev) = parse_watch(line).unwrap();
        assert_eq!(rev, 4);
        assert!(events[0].deleted);
        assert_eq!(events[0].kv.key, "/x/state");
        assert!(!events[1].deleted);
        assert_eq!(events[1].kv.value, b"hi");
        assert_eq!(events[1].kv.create_revision, 2);
        let compacted = br#"{"result":{"header":{},"canceled":true,"compact_revision":"4"}}"#;
        assert!(matches!(
            parse_watch(compacted),
            Err(EtcdError::Compacted(4))
        ));
        assert!(parse_watch(b"{not json").is_err());
    }

    #[test]
    fn gateway_errors_sort_transient_from_refused() {
        let no_leader = json!({"error": "etcdserver: no leader", "code": 14, "message": "etcdserver: no leader"});
        assert!(matches!(
            gateway_error(StatusCode::SERVICE_UNAVAILABLE, &no_leader),
            EtcdError::Unavailable(_)
        ));
        let denied = json!({"message": "etcdserver: permission denied", "code": 7});
        assert!(matches!(
            gateway_error(StatusCode::FORBIDDEN, &denied),
            EtcdError::Refused(_)
        ));
    }
}
