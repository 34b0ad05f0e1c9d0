//! Stage: accept connections on the data listener and serve HTTP/1.1 and
//! HTTP/2 (prior knowledge) on them, bounded in number, until shutdown; then
//! drain.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use switchyard_control::config::{Limits, Timeouts};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::pipeline::{self, ConnInfo, Shared};

/// hyper will not parse with a smaller buffer than this.
pub const HYPER_MIN_BUF: usize = 8192;

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open when the drain deadline passed (0: clean).
    pub abandoned: usize,
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish (up to `timeouts.drain`) and returns.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: &Limits,
    timeouts: &Timeouts,
    shutdown: impl Future<Output = ()>,
) -> Drained {
    let builder = connection_builder(limits, timeouts);
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);

    loop {
        // At the connection limit, stop accepting: the kernel's backlog
        // holds new clients until a connection closes.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = open.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let open_gauge = shared.metrics.connection_opened();
        let conn = ConnInfo {
            peer: peer.ip(),
            peer_header: crate::headers::ip_header(peer.ip()),
            proto: "http",
        };
        let shared = shared.clone();
        let service = service_fn(move |req| {
            let (shared, conn) = (shared.clone(), conn.clone());
            async move { Ok::<_, Infallible>(pipeline::handle(&shared, conn, req).await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            drop((permit, open_gauge));
        });
    }
    drop(listener);

    tracing::info!(connections = graceful.count(), "draining");
    match tokio::time::timeout(timeouts.drain.0, graceful.shutdown()).await {
        Ok(()) => Drained { abandoned: 0 },
        Err(_) => {
            // Every open connection holds one permit.
            let abandoned = limits.max_connections - open.available_permits();
            tracing::warn!(
                abandoned,
                "drain deadline passed; closing remaining connections"
            );
            Drained { abandoned }
        }
    }
}

fn connection_builder(limits: &Limits, timeouts: &Timeouts) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Time allowed to send a request head, including the wait for the
        // next request on a kept-alive connection (and slowloris clients).
        .header_read_timeout(timeouts.idle.0)
        .max_buf_size(limits.max_header_bytes.max(HYPER_MIN_BUF))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(timeouts.idle.0 / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}
