//! `GET /v1/watch`: the state, every route's live figures and new audit
//! events, as Server-Sent Events (`text/event-stream`), one `snapshot`
//! event at once and then every second, until the client goes. What the web
//! dashboard (`/ui/`) draws from; any SSE client can follow it (with the
//! bearer token in `Authorization`, as for the rest of `/v1/`).
//!
//! Each event's `data` is one JSON object:
//! `{"state": <GET /v1/state>, "rollouts": {route: <GET
//! /v1/routes/{route}/rollout>}, "flag_rollouts": {flag: <GET
//! /v1/flags/{name}/rollout>}, "stats": {route: {backend: {requests,
//! errors, rate, error_rate, p50_ms, p95_ms, p99_ms}}}, "events": [new audit
//! events since the last snapshot], "window_seconds": N}`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use serde_json::{json, Value};

use crate::admin::{Admin, AdminBody};
use crate::rollout::{FlagRolloutSpec, RolloutSpec};

/// How often a snapshot is sent.
const EVERY: Duration = Duration::from_secs(1);
/// Audit events sent with one snapshot at most (the rest follow).
const EVENTS_PER_SNAPSHOT: usize = 200;

/// The stream for one client: a task builds snapshots into a small
/// channel, and stops when the client (the body) is gone.
pub fn stream(admin: Admin) -> AdminBody {
    let (send, receive) = tokio::sync::mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The newest audit event already shown; the first snapshot sends
        // the last events before it (a dashboard opens with some history).
        let mut after = None;
        loop {
            tick.tick().await;
            let event = snapshot(&admin, &mut after).await;
            let frame = format!("event: snapshot\ndata: {event}\n\n");
            if send.send(Bytes::from(frame)).await.is_err() {
                return;
            }
        }
    });
    Channel(receive).boxed()
}

struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for Channel {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|next| next.map(|b| Ok(Frame::data(b))))
    }
}

/// One snapshot; advances `after` past the events it carries.
async fn snapshot(admin: &Admin, after: &mut Option<u64>) -> Value {
    let view = admin.store.view();
    let metrics = &admin.metrics;
    let span = metrics.window_span();
    let mut stats = BTreeMap::new();
    if metrics.enabled() {
        for route in &view.config.routes {
            let backends: BTreeMap<&str, Value> = route
                .backends
                .iter()
                .map(|b| {
                    let w = metrics.backend_window(&route.name, &b.name, span);
                    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
                    let figures = json!({
                        "requests": w.requests,
                        "errors": w.errors,
                        "rate": w.requests as f64 / span.as_secs_f64(),
                        "error_rate": w.error_rate_percent(),
                        "p50_ms": ms(w.p50),
                        "p95_ms": ms(w.p95),
                        "p99_ms": ms(w.p99),
                    });
                    (b.name.as_str(), figures)
                })
                .collect();
            stats.insert(route.name.as_str(), backends);
        }
    }
    let events = new_events(admin, after).await;
    let rollouts: BTreeMap<&str, Value> = view
        .config
        .routes
        .iter()
        .filter_map(|r| {
            let doc = crate::api::rollout_doc::<RolloutSpec>(&view, &r.name)?;
            Some((r.name.as_str(), doc))
        })
        .collect();
    let flag_rollouts: BTreeMap<&str, Value> = view
        .flag_rollouts
        .keys()
        .filter_map(|f| {
            Some((
                f.as_str(),
                crate::api::rollout_doc::<FlagRolloutSpec>(&view, f)?,
            ))
        })
        .collect();
    json!({
        "state": crate::api::state_doc(&view, metrics),
        "rollouts": rollouts,
        "flag_rollouts": flag_rollouts,
        "stats": stats,
        "window_seconds": span.as_secs(),
        "events": events,
    })
}

/// Audit events after `after` (on the first snapshot, the last 20).
async fn new_events(admin: &Admin, after: &mut Option<u64>) -> Vec<Value> {
    let mut from = match after {
        Some(seq) => *seq,
        None => admin.store.latest_seq().await.saturating_sub(20),
    };
    let events = admin
        .store
        .events(from, EVENTS_PER_SNAPSHOT)
        .await
        .unwrap_or_default();
    if let Some(last) = events.last() {
        from = last.seq;
    }
    *after = Some(from);
    events
        .into_iter()
        .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
        .collect()
}
