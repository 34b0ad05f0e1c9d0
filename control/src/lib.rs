//! Switchyard's control plane: the configuration and state model, and the
//! admin listener. The data plane (`switchyard-proxy`) builds its routing
//! snapshots from the types defined here.

pub mod abtest;
pub mod admin;
pub mod api;
pub mod bucket;
pub mod config;
pub mod ctl;
pub mod driver;
pub mod flags;
pub mod fleet;
pub mod metrics;
pub mod ofrep;
pub mod resilience;
pub mod rollout;
pub mod store;
pub mod ui;
pub mod watch;
pub mod webhook;
pub mod window;
