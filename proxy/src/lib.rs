//! Switchyard's data plane. The request path, stage by stage (see
//! `docs/request-lifecycle.md` and `pipeline.rs`): `listen` → `route` →
//! `flags` → `split` → `headers` → `forward` → `respond`, with `record` measuring.

pub mod cli;
pub mod demo;
pub mod flags;
pub mod forward;
pub mod headers;
pub mod health;
pub mod http1;
pub mod inject;
pub mod listen;
pub mod lot;
pub mod pipeline;
pub mod record;
pub mod respond;
pub mod retry;
pub mod route;
pub mod server;
pub mod snapshot;
pub mod split;
pub mod tls;
