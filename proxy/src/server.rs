//! Wires a validated configuration to bound listeners: the data plane, the
//! admin listener and their shutdown. `main` and the tests both come in here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use switchyard_control::admin::{self, Admin, Health};
use switchyard_control::config::{Config, ConfigError, Weight};
use switchyard_control::metrics::Metrics;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::forward::Upstreams;
use crate::listen::{self, Drained};
use crate::pipeline::{Admission, Shared};
use crate::snapshot::Snapshot;

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

/// The metrics registry `config` asks for.
pub fn metrics_for(config: &Config) -> Arc<Metrics> {
    Arc::new(Metrics::new(
        config.metrics.enabled,
        config.metrics.window.0,
    ))
}

/// A proxy built from a configuration, ready to run on listeners.
pub struct Proxy {
    config: Arc<ArcSwap<Config>>,
    shared: Arc<Shared>,
    health: Arc<Health>,
}

/// Changes a running proxy's routing (the admin API's way in).
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
    config: Arc<ArcSwap<Config>>,
}

impl Proxy {
    /// Builds the first routing snapshot and the upstream pool. `config` must
    /// have passed `Config::validate` (as `Config::load` does); `metrics` is
    /// the process's registry (see `metrics_for`).
    pub fn new(config: Config, metrics: Arc<Metrics>) -> Proxy {
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::build(&config, &metrics)),
            upstreams: Upstreams::new(&config.timeouts),
            admission: Admission::new(config.limits.max_requests_in_flight),
            metrics,
        });
        Proxy {
            config: Arc::new(ArcSwap::from_pointee(config)),
            shared,
            health: Arc::new(Health::default()),
        }
    }

    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            shared: self.shared.clone(),
            config: self.config.clone(),
        }
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Serves until `shutdown` resolves, then drains: readiness goes false,
    /// the data listener stops accepting, in-flight requests finish (up to
    /// `timeouts.drain`), and the admin listener closes last.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Drained {
        let (admin_stop, mut admin_stopped) = watch::channel(false);
        let context = Admin {
            health: self.health.clone(),
            metrics: self.shared.metrics.clone(),
        };
        let admin = tokio::spawn(admin::serve(listeners.admin, context, async move {
            let _ = admin_stopped.wait_for(|stop| *stop).await;
        }));
        self.health.set_ready(true);
        tracing::info!(data = %listeners.data.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving");

        let health = self.health.clone();
        let config = self.config.load_full();
        let drained = listen::serve(
            listeners.data,
            self.shared,
            &config.limits,
            &config.timeouts,
            async move {
                shutdown.await;
                health.set_ready(false);
            },
        )
        .await;

        let _ = admin_stop.send(true);
        let _ = admin.await;
        tracing::info!(abandoned = drained.abandoned, "stopped");
        drained
    }
}

impl ProxyHandle {
    /// Sets a route's weights (percent by backend name; backends left out get
    /// 0), validates the whole result, and swaps in a new snapshot. A rejected
    /// change changes nothing.
    pub fn set_weights(&self, route: &str, weights: &[(&str, f64)]) -> Result<(), ConfigError> {
        let mut next = Config::clone(&self.config.load());
        let (index, rc) = next
            .routes
            .iter_mut()
            .enumerate()
            .find(|(_, r)| r.name == route)
            .ok_or_else(|| ConfigError::new("route", format!("no route named `{route}`")))?;
        for (name, _) in weights {
            if !rc.backends.iter().any(|b| b.name == *name) {
                return Err(ConfigError::new(
                    format!("routes[{index}].backends"),
                    format!("route `{route}` has no backend `{name}`"),
                ));
            }
        }
        for backend in &mut rc.backends {
            let pct = weights
                .iter()
                .find(|(n, _)| *n == backend.name)
                .map_or(0.0, |(_, w)| *w);
            backend.weight = Weight::from_percent(pct).map_err(|e| {
                ConfigError::new(
                    format!("routes[{index}].backends.{}.weight", backend.name),
                    e,
                )
            })?;
        }
        next.validate()?;
        self.shared
            .snapshot
            .store(Arc::new(Snapshot::build(&next, &self.shared.metrics)));
        self.config.store(Arc::new(next));
        Ok(())
    }

    /// The snapshot requests see now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }
}
