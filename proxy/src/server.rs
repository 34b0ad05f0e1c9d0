//! Wires a validated configuration to bound listeners: the data plane, the
//! admin listener and their shutdown. `main` and the tests both come in here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use std::collections::BTreeMap;

use switchyard_control::admin::{self, Admin, Health};
use switchyard_control::config::{Config, ConfigError, Token, Weight};
use switchyard_control::metrics::Metrics;
use switchyard_control::store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::forward::Upstreams;
use crate::listen::{self, Drained};
use crate::pipeline::{Admission, Shared};
use crate::snapshot::Snapshot;
use crate::tls::{self, Terminator};

/// How often the TLS certificate files are checked for changes.
pub const TLS_POLL: Duration = Duration::from_secs(2);

/// The listeners, bound before anything starts so a bad port fails start-up
/// with nothing half-running.
pub struct Listeners {
    pub data: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses in `config`.
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        Ok(Listeners {
            data: bind("listen", config.listen).await?,
            admin: bind("admin.listen", config.admin.listen).await?,
        })
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.data
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }
}

async fn bind(field: &str, addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("{field}: cannot listen on {addr}: {e}")))
}

/// Reloads the configuration at `path` on every SIGHUP, and whenever its
/// contents change (checked every `poll`: a Kubernetes ConfigMap update swaps
/// a symlink, which content comparison sees and inotify on the file may not).
/// Runs until the process ends.
/// The SIGHUP handler is installed when this is called (before the proxy
/// serves), so an early SIGHUP reloads instead of killing the process.
pub fn watch_config(
    handle: ProxyHandle,
    path: PathBuf,
    poll: Duration,
) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; reloading on file change only");
            None
        }
    };
    watch_loop(handle, path, poll, hup)
}

async fn watch_loop(
    handle: ProxyHandle,
    path: PathBuf,
    poll: Duration,
    mut hup: Option<tokio::signal::unix::Signal>,
) {
    let mut last = tokio::fs::read(&path).await.ok();
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hangup => {
                tracing::info!("SIGHUP: reloading configuration");
                last = tokio::fs::read(&path).await.ok();
                let _ = handle.reload(&path).await;
            }
            _ = tick.tick() => {
                let now = tokio::fs::read(&path).await.ok();
                if now.is_some() && now != last {
                    last = now;
                    let _ = handle.reload(&path).await;
                }
            }
        }
    }
}

/// How often idle upstream connections are looked over: a connection the
/// upstream closed is let go within this long, rather than waiting in
/// CLOSE_WAIT for the next request to find it.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

async fn sweep_upstreams(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tick.tick().await;
        shared.upstreams.sweep();
        if n % TRIM_EVERY_SWEEPS == 0 {
            // Off the runtime: the allocator walks its arenas under their
            // locks.
            let trimmed = tokio::task::spawn_blocking(|| {
                switchyard_trim::release_free_heap(TRIM_ABOVE_BYTES)
            })
            .await;
            if let Ok(Some(free)) = trimmed {
                tracing::debug!(free_mib = free >> 20, "free heap given back to the kernel");
            }
        }
    }
}

/// After a burst of requests the allocator holds what they freed; past this
/// much free, it is given back to the kernel (checked every
/// `TRIM_EVERY_SWEEPS` sweeps: 5 s).
const TRIM_ABOVE_BYTES: usize = 16 << 20;
const TRIM_EVERY_SWEEPS: u64 = 5;

/// The metrics registry `config` asks for.
pub fn metrics_for(config: &Config) -> Arc<Metrics> {
    Arc::new(Metrics::new(
        config.metrics.enabled,
        config.metrics.window.0,
    ))
}

/// Why a proxy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration (or a token file it names) is wrong: exit 64.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The persisted state cannot be used: exit 65.
    #[error("{0}")]
    State(#[from] StoreError),
}

/// Start-up choices that are not configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// Move an existing state file aside and start from the configuration.
    pub reset_state: bool,
}

/// A proxy built from a configuration, ready to run on listeners.
pub struct Proxy {
    config: Config,
    tls: Option<Arc<Terminator>>,
    shared: Arc<Shared>,
    store: Arc<Store>,
    tokens: Arc<[Token]>,
    health: Arc<Health>,
}

/// Changes a running proxy's routing the way the admin API does.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
    store: Arc<Store>,
}

impl Proxy {
    /// Reads the admin tokens, opens the runtime state in `state_dir` (laid
    /// over `config`), builds the routing snapshot and the upstream pool.
    /// `config` must have passed `Config::validate` (as `Config::load` does);
    /// `metrics` is the process's registry (see `metrics_for`).
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        options: StartOptions,
    ) -> Result<Proxy, StartError> {
        let tokens: Arc<[Token]> = config.admin.resolve_tokens()?.into();
        let tls = match &config.tls {
            None => None,
            Some(tls_config) => {
                let loaded = tls::load(tls_config, std::time::SystemTime::now())?;
                tls::publish_expiry(&metrics, &loaded.certificates);
                Some(Arc::new(Terminator::new(
                    &loaded,
                    config.timeouts.request_header.0,
                )))
            }
        };
        tls::check_upstreams(&config)?;
        let upstreams = Upstreams::new(&config.timeouts);
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::build(&config, &metrics, &upstreams)),
            upstreams,
            admission: Admission::new(config.limits.max_requests_in_flight),
            metrics,
            max_body: config.limits.max_request_body_bytes,
        });
        let target = shared.clone();
        let apply = Box::new(move |effective: &Config| {
            let snapshot = Snapshot::build(effective, &target.metrics, &target.upstreams);
            target.snapshot.store(Arc::new(snapshot));
        });
        let store = Arc::new(Store::open(config.clone(), options.reset_state, apply)?);
        Ok(Proxy {
            config,
            tls,
            shared,
            store,
            tokens,
            health: Arc::new(Health::default()),
        })
    }

    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            shared: self.shared.clone(),
            store: self.store.clone(),
        }
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Serves until `shutdown` resolves, then drains: readiness goes false,
    /// the data listener stops accepting, in-flight requests finish (up to
    /// `timeouts.drain`), and the admin listener closes last.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Drained {
        let (data_addr, admin_addr) = (listeners.data_addr(), listeners.admin_addr());
        let (admin_stop, mut admin_stopped) = watch::channel(false);
        let context = Admin {
            health: self.health.clone(),
            metrics: self.shared.metrics.clone(),
            store: self.store.clone(),
            tokens: self.tokens.clone(),
            max_connections: self.config.admin.max_connections,
            header_timeout: self.config.admin.header_timeout.0,
        };
        let (driver_stop, mut driver_stopped) = watch::channel(false);
        let driver = tokio::spawn(switchyard_control::driver::run(
            self.store.clone(),
            self.shared.metrics.clone(),
            async move {
                let _ = driver_stopped.wait_for(|stop| *stop).await;
            },
        ));
        let admin = tokio::spawn(admin::serve(listeners.admin, context, async move {
            let _ = admin_stopped.wait_for(|stop| *stop).await;
        }));
        // Fleet mode: the state is brought to etcd's before the data
        // listener accepts, so a replica started mid-rollout serves the
        // rollout's weights from its first request (bounded by etcd's
        // timeouts: without etcd it serves its cache).
        let (fleet_stop, mut fleet_stopped) = watch::channel(false);
        let (synced, initial_sync) = tokio::sync::oneshot::channel();
        let fleet = tokio::spawn(switchyard_control::fleet::run(
            self.store.clone(),
            self.shared.metrics.clone(),
            switchyard_control::fleet::Addresses {
                admin: admin_addr,
                data: data_addr,
            },
            synced,
            async move {
                let _ = fleet_stopped.wait_for(|stop| *stop).await;
            },
        ));
        let _ = initial_sync.await;
        self.health.set_ready(true);
        tracing::info!(data = %data_addr, admin = %admin_addr, "serving");

        let certificate_watch = match (&self.config.tls, &self.tls) {
            (Some(tls_config), Some(terminator)) => Some(tokio::spawn(tls::watch(
                tls_config.clone(),
                terminator.clone(),
                self.shared.metrics.clone(),
                TLS_POLL,
            ))),
            _ => None,
        };
        let sweeper = tokio::spawn(sweep_upstreams(self.shared.clone()));
        let supervisor = tokio::spawn(crate::health::supervise(
            self.shared.clone(),
            self.store.clone(),
            self.config.timeouts.clone(),
        ));
        let health = self.health.clone();
        let config = self.config;
        let drained = listen::serve(
            listeners.data,
            self.shared,
            self.tls,
            &config.limits,
            &config.timeouts,
            async move {
                shutdown.await;
                health.set_ready(false);
            },
        )
        .await;

        if let Some(watch) = certificate_watch {
            watch.abort();
        }
        sweeper.abort();
        supervisor.abort();
        let _ = driver_stop.send(true);
        let _ = driver.await;
        // Leaves the fleet (revokes the lease) after the driver stopped.
        let _ = fleet_stop.send(true);
        let _ = fleet.await;
        let _ = admin_stop.send(true);
        let _ = admin.await;
        tracing::info!(abandoned = drained.abandoned, "stopped");
        drained
    }
}

impl ProxyHandle {
    /// Sets a route's weights (percent by backend name; backends left out get
    /// 0) through the same validated, persisted, audited path as the admin
    /// API. A rejected change changes nothing.
    pub async fn set_weights(
        &self,
        route: &str,
        weights: &[(&str, f64)],
    ) -> Result<(), StoreError> {
        let mut map = BTreeMap::new();
        for (name, pct) in weights {
            let weight = Weight::from_percent(*pct)
                .map_err(|e| StoreError::Invalid(ConfigError::new(format!("weights.{name}"), e)))?;
            map.insert((*name).to_owned(), weight);
        }
        self.store
            .set_weights("handle", None, route, map)
            .await
            .map(|_| ())
    }

    /// Re-reads the configuration file and swaps it in, keeping the API's
    /// overrides. An invalid file changes nothing: the running configuration
    /// stays, the reason is logged, and `switchyard_config_reloads_total
    /// {result="failure"}` goes up.
    pub async fn reload(&self, path: &Path) -> Result<(), String> {
        let result = match Config::load(path).and_then(|c| tls::check_upstreams(&c).map(|()| c)) {
            Err(e) => Err(e.to_string()),
            Ok(next) => {
                let running = self.store.view().config.clone();
                let ignored = running.restart_only_changes(&next);
                if !ignored.is_empty() {
                    tracing::warn!(fields = ?ignored, "changed fields take effect only after a restart");
                }
                self.store
                    .reload(next)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        self.shared.metrics.config_reloaded(result.is_ok());
        match &result {
            Ok(()) => tracing::info!(file = %path.display(), "configuration reloaded"),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "configuration reload failed; the running configuration stays")
            }
        }
        result
    }

    /// The snapshot requests see now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }
}
