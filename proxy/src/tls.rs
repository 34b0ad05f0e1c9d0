//! Stage: TLS termination on the data listener (edge gateway).
//!
//! Certificates are chosen by the SNI name against each certificate's DNS
//! names (exact, then `*.` wildcard), the first certificate being the default.
//! TLS 1.2 and 1.3 only; ALPN offers `h2` and `http/1.1`. Optional client
//! certificates against a CA bundle (mTLS). The files are checked when loaded
//! (readable, key matches certificate, valid now) and watched: a changed file
//! is loaded and swapped in for new handshakes; a bad one keeps the old
//! configuration serving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use switchyard_control::config::{
    split_endpoint, Config, ConfigError, TlsConfig, TlsVersion, UnknownServerName,
    UpstreamTlsConfig,
};
use switchyard_control::metrics::Metrics;

/// One serving certificate as loaded: what `check` prints and the expiry
/// metric publishes.
#[derive(Debug, Clone)]
pub struct CertificateInfo {
    pub file: PathBuf,
    /// DNS names (SAN) the certificate is chosen for.
    pub names: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
}

/// A checked TLS configuration, ready for handshakes.
pub struct Loaded {
    pub server: Arc<ServerConfig>,
    pub certificates: Vec<CertificateInfo>,
}

/// Reads and checks every file `config` names and builds the server
/// configuration. Errors name the field and say what is wrong.
pub fn load(config: &TlsConfig, now: SystemTime) -> Result<Loaded, ConfigError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let now_secs = unix_secs(now);
    let mut resolver = SniResolver {
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        default: None,
    };
    let mut certificates = Vec::with_capacity(config.certificates.len());
    for (i, c) in config.certificates.iter().enumerate() {
        let field = format!("tls.certificates[{i}]");
        let (key, info) = load_pair(&field, &c.cert, &c.key, &provider, now_secs)?;
        let key = Arc::new(key);
        for name in &info.names {
            // The first certificate naming a host wins, as in the file's order.
            match name.strip_prefix("*.") {
                Some(parent) => resolver.wildcard.entry(parent.to_owned()),
                None => resolver.exact.entry(name.clone()),
            }
            .or_insert_with(|| key.clone());
        }
        if i == 0 && config.unknown_server_name == UnknownServerName::Default {
            resolver.default = Some(key);
        }
        certificates.push(info);
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| ConfigError::new("tls.min_version", e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = load_roots("tls.client_ca", path)?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| ConfigError::new("tls.client_ca", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless resumption: returning clients skip the full handshake.
    server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| ConfigError::new("tls", format!("session tickets: {e}")))?;
    Ok(Loaded {
        server: Arc::new(server),
        certificates,
    })
}

fn load_pair(
    field: &str,
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
    now: i64,
) -> Result<(CertifiedKey, CertificateInfo), ConfigError> {
    let cert_field = format!("{field}.cert");
    let key_field = format!("{field}.key");
    let pem = read(&cert_field, cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_file(&cert_field, cert_path, &format!("not PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(bad_file(
            &cert_field,
            cert_path,
            "no CERTIFICATE block in it",
        ));
    };
    let info = inspect(leaf, cert_path, now).map_err(|e| bad_file(&cert_field, cert_path, &e))?;
    if info.not_after < now {
        return Err(bad_file(
            &cert_field,
            cert_path,
            &format!("the certificate expired at {}", utc(info.not_after)),
        ));
    }
    let key_pem = read(&key_field, key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        bad_file(
            &key_field,
            key_path,
            &format!("no usable PEM private key in it: {e}"),
        )
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad_file(&key_field, key_path, &format!("unsupported key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| {
        bad_file(
            &key_field,
            key_path,
            &format!(
                "the key does not match the certificate in {}",
                cert_path.display()
            ),
        )
    })?;
    Ok((certified, info))
}

/// Names and validity period of a leaf certificate.
fn inspect(leaf: &CertificateDer<'_>, file: &Path, now: i64) -> Result<CertificateInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let validity = cert.validity();
    let not_before = validity.not_before.timestamp();
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("bad subjectAltName: {e}")),
    };
    if not_before > now + 300 {
        return Err(format!(
            "the certificate is valid only from {}",
            utc(not_before)
        ));
    }
    Ok(CertificateInfo {
        file: file.to_owned(),
        names,
        not_after: validity.not_after.timestamp(),
    })
}

fn load_roots(field: &str, path: &Path) -> Result<RootCertStore, ConfigError> {
    let pem = read(field, path)?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad_file(field, path, &format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad_file(field, path, &format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad_file(field, path, "no CERTIFICATE block in it"));
    }
    Ok(roots)
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| bad_file(field, path, &format!("cannot read it: {e}")))
}

fn bad_file(field: &str, path: &Path, reason: &str) -> ConfigError {
    ConfigError::new(field, format!("{}: {reason}", path.display()))
}

/// `t` in Unix seconds (0 before the epoch).
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn utc(unix: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(unix)
        .map_or_else(|_| format!("{unix} (Unix time)"), |t| t.to_string())
}

// === upstream TLS ===

/// The client configuration for a backend's `https://` endpoints: its CA
/// bundle or the system's certificates (the connector adds ALPN `http/1.1`).
pub fn client_config(tls: Option<&UpstreamTlsConfig>) -> Result<rustls::ClientConfig, String> {
    let roots = match tls.and_then(|t| t.ca.as_deref()) {
        Some(path) => load_roots("tls.ca", path).map_err(|e| e.reason)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none installed".to_owned(), ToString::to_string);
        return Err(format!(
            "no system CA certificates ({why}); install them (ca-certificates) or set `tls.ca`"
        ));
    }
    Ok(roots)
}

/// Checks that every backend with `https://` endpoints can build its TLS
/// client (its CA file is readable and holds certificates).
pub fn check_upstreams(config: &Config) -> Result<(), ConfigError> {
    for (i, route) in config.routes.iter().enumerate() {
        for (j, b) in route.backends.iter().enumerate() {
            if b.endpoints.iter().any(|e| split_endpoint(e).0) {
                client_config(b.tls.as_ref())
                    .map_err(|e| ConfigError::new(format!("routes[{i}].backends[{j}].tls"), e))?;
            }
        }
    }
    Ok(())
}

/// Picks the certificate for a ClientHello's SNI name.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// `None` with `unknown_server_name: reject`.
    default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        self.exact
            .get(&name)
            .or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent)
            })
            .or(self.default.as_ref())
            .cloned()
    }
}

/// The server configuration new handshakes use; swapped on reload.
pub struct Terminator {
    current: ArcSwap<ServerConfig>,
    pub handshake_timeout: Duration,
}

impl Terminator {
    pub fn new(loaded: &Loaded, handshake_timeout: Duration) -> Self {
        Self {
            current: ArcSwap::new(loaded.server.clone()),
            handshake_timeout,
        }
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// Watches the certificate, key and CA files of `config` every `poll` and,
/// when any changed, loads them whole and swaps them in. A file that fails
/// to load leaves the running certificates serving: the reason is logged and
/// `switchyard_tls_reloads_total{result="failure"}` goes up. Runs until the
/// process ends.
pub async fn watch(
    config: TlsConfig,
    terminator: Arc<Terminator>,
    metrics: Arc<Metrics>,
    poll: Duration,
) {
    let mut last = contents(&config);
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = contents(&config);
        if now == last {
            continue;
        }
        last = now;
        let c = config.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&c, SystemTime::now()))
            .await
            .expect("certificate loading does not panic");
        match loaded {
            Ok(loaded) => {
                terminator.current.store(loaded.server.clone());
                publish_expiry(&metrics, &loaded.certificates);
                metrics.tls_reloaded(true);
                tracing::info!(
                    certificates = loaded.certificates.len(),
                    "TLS certificates reloaded"
                );
            }
            Err(e) => {
                metrics.tls_reloaded(false);
                tracing::error!(error = %e, "TLS certificate reload failed; the running certificates stay");
            }
        }
    }
}

/// Sets `switchyard_tls_certificate_expiry_timestamp_seconds`.
pub fn publish_expiry(metrics: &Metrics, certs: &[CertificateInfo]) {
    let files: Vec<(String, i64)> = certs
        .iter()
        .map(|c| (c.file.display().to_string(), c.not_after))
        .collect();
    metrics.set_certificate_expiry(files.iter().map(|(f, t)| (f.as_str(), *t)));
}

/// Every watched file's bytes (a missing file reads as empty, so its
/// reappearance is a change).
fn contents(config: &TlsConfig) -> Vec<Vec<u8>> {
    config
        .certificates
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .chain(config.client_ca.iter())
        .map(|p| std::fs::read(p).unwrap_or_default())
        .collect()
}
