//! The `/v1/` control API: authentication, request parsing, and the mapping
//! of store outcomes to HTTP. The state logic lives in `store.rs`.
//!
//! ```text
//! GET    /v1/state                        routes, weights, flags in one document
//! PUT    /v1/routes/{route}/weights       {"blue": 90, "canary": 10}
//! GET    /v1/routes/{route}/stats         rolling-window figures per backend
//! GET    /v1/flags                        every flag
//! GET|PUT|PATCH|DELETE /v1/flags/{name}   PATCH is an RFC 7386 merge patch
//! GET    /v1/flags/{name}/stats           a watched flag's cohorts, on against off
//! GET    /v1/events?after=SEQ&limit=N     the audit log, oldest first
//! GET    /v1/fleet                        replicas, leaders, the store's health
//! DELETE /v1/overrides[/routes/R|/flags/F] back to the configuration file's values
//! ```
//!
//! Errors are `{"error": {"code", "message"}}`: 400 unparseable (JSON syntax,
//! bad `If-Match`), 401 no or wrong token, 404 unknown route, flag or
//! endpoint, 405 wrong method, 409 stale `If-Match`, 413 body over 1 MiB,
//! 422 well-formed but invalid (types, unknown fields, weights not summing to
//! 100, unknown backend), 503 the fleet's store (etcd) cannot be reached
//! (nothing changed; `Retry-After`). Every state document carries
//! `ETag: "<version>"`.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, ETAG, IF_MATCH};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use crate::admin::{json_error, respond_json, Admin};
use crate::config::{Config, FlagConfig, Token, Weight};
use crate::rollout::{FlagRolloutSpec, RolloutSpec, RolloutState};
use crate::store::{find_flag, ResetTarget, StoreError, Subject, View};

/// Largest request body the API reads.
pub const MAX_BODY: usize = 1024 * 1024;

type Resp = Response<Full<Bytes>>;

/// A request the API refuses: status, machine-readable code, message.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    code: &'static str,
    message: String,
    /// `Allow` for 405s.
    allow: Option<&'static str>,
    /// `Retry-After: 1` (a 503 that will likely pass soon).
    retry_after: bool,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            allow: None,
            retry_after: false,
        }
    }

    /// 405 for an endpoint that only reads.
    pub(crate) fn get_only() -> Self {
        not_allowed("GET")
    }

    /// 503 `store_unavailable` with `Retry-After: 1`: etcd is away, likely
    /// not for long.
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: true,
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                message,
            )
        }
    }

    pub(crate) fn into_response(self) -> Resp {
        let mut resp = json_error(self.status, self.code, &self.message);
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        if self.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// Serves one request under `/v1/`.
pub async fn serve(admin: &Admin, req: Request<Incoming>) -> Resp {
    let actor = match authorize(req.headers(), &admin.tokens) {
        Ok(actor) => actor,
        Err(e) => return e.into_response(),
    };
    let path = req.uri().path().to_owned();
    let Some((template, allowed, params)) = find_endpoint(&path) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint {path}"),
        )
        .into_response();
    };
    if !allowed.split(", ").any(|m| m == req.method().as_str()) {
        return not_allowed(allowed).into_response();
    }
    let method = req.method().clone();
    let param = params.first().copied().unwrap_or_default();
    let result = match (template, method.as_str()) {
        ("/v1/state", "GET") => Ok(state(&admin.store.view(), &admin.metrics)),
        ("/v1/routes/{route}/weights", "PUT") => put_weights(admin, &actor, param, req).await,
        ("/v1/routes/{route}/stats", "GET") => {
            crate::admin::route_stats(admin, param, req.uri().query().unwrap_or("")).await
        }
        ("/v1/fleet", "GET") => Ok(fleet(admin).await),
        ("/v1/flags", "GET") => Ok(flags(&admin.store.view())),
        ("/v1/flags/{name}", "GET") => get_flag(&admin.store.view(), param),
        ("/v1/flags/{name}/stats", "GET") => flag_stats(admin, param),
        ("/v1/flags/{name}", "PUT") => put_flag(admin, &actor, param, req).await,
        ("/v1/flags/{name}", "PATCH") => patch_flag(admin, &actor, param, req).await,
        ("/v1/flags/{name}", "DELETE") => delete_flag(admin, &actor, param, req.headers()).await,
        ("/v1/events", "GET") => events(admin, req.uri().query().unwrap_or("")).await,
        ("/v1/overrides", "DELETE") => reset(admin, &actor, ResetTarget::All).await,
        ("/v1/overrides/routes/{route}", "DELETE") => {
            reset(admin, &actor, ResetTarget::Route(param.to_owned())).await
        }
        ("/v1/overrides/flags/{name}", "DELETE") => {
            reset(admin, &actor, ResetTarget::Flag(param.to_owned())).await
        }
        ("/v1/routes/{route}/rollout", "GET") => {
            rollout_status::<RolloutSpec>(&admin.store.view(), param)
        }
        ("/v1/routes/{route}/rollout", "POST") => {
            start_rollout::<RolloutSpec>(admin, &actor, param, req).await
        }
        ("/v1/routes/{route}/rollout/{action}", "POST") => {
            let action = params.get(1).copied().unwrap_or_default();
            rollout_action::<RolloutSpec>(admin, &actor, param, action).await
        }
        ("/v1/flags/{name}/rollout", "GET") => {
            rollout_status::<FlagRolloutSpec>(&admin.store.view(), param)
        }
        ("/v1/flags/{name}/rollout", "POST") => {
            start_rollout::<FlagRolloutSpec>(admin, &actor, param, req).await
        }
        ("/v1/flags/{name}/rollout/{action}", "POST") => {
            let action = params.get(1).copied().unwrap_or_default();
            rollout_action::<FlagRolloutSpec>(admin, &actor, param, action).await
        }
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{method} {template} is listed but not served"),
        )),
    };
    result.unwrap_or_else(ApiError::into_response)
}

/// Every `/v1/` endpoint: path template and allowed methods. The router
/// answers 405 with `Allow` from this table, and `docs/openapi.yaml` is
/// tested against it.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("/v1/state", "GET"),
    ("/v1/routes/{route}/weights", "PUT"),
    ("/v1/routes/{route}/stats", "GET"),
    ("/v1/flags", "GET"),
    ("/v1/flags/{name}", "GET, PUT, PATCH, DELETE"),
    ("/v1/flags/{name}/stats", "GET"),
    ("/v1/flags/{name}/rollout", "GET, POST"),
    ("/v1/flags/{name}/rollout/{action}", "POST"),
    ("/v1/routes/{route}/rollout", "GET, POST"),
    ("/v1/routes/{route}/rollout/{action}", "POST"),
    ("/v1/events", "GET"),
    ("/v1/fleet", "GET"),
    ("/v1/overrides", "DELETE"),
    ("/v1/overrides/routes/{route}", "DELETE"),
    ("/v1/overrides/flags/{name}", "DELETE"),
];

/// The endpoint `path` matches, its allowed methods and its `{…}` values.
fn find_endpoint(path: &str) -> Option<(&'static str, &'static str, Vec<&str>)> {
    let segments: Vec<&str> = path.split('/').collect();
    ENDPOINTS.iter().find_map(|(template, allowed)| {
        let parts: Vec<&str> = template.split('/').collect();
        if parts.len() != segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (part, segment) in parts.iter().zip(&segments) {
            if part.starts_with('{') && !segment.is_empty() {
                params.push(*segment);
            } else if part != segment {
                return None;
            }
        }
        Some((*template, *allowed, params))
    })
}

// === authentication ===

/// The name of the token presented, or a 401. With no tokens configured
/// (allowed only on a loopback admin address) everyone is `anonymous`.
pub(crate) fn authorize(headers: &HeaderMap, tokens: &[Token]) -> Result<String, ApiError> {
    if tokens.is_empty() {
        return Ok("anonymous".to_owned());
    }
    let unauthorized =
        |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` is `Bearer`.
    let presented = headers
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| &v[7..])
        .ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>`"))?;
    // Every token is compared, in constant time, whatever matched earlier.
    let mut found = None;
    for token in tokens {
        if constant_time_eq(presented, &token.secret) {
            found = Some(token.name.clone());
        }
    }
    found.ok_or_else(|| unauthorized("token not accepted"))
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

// === handlers ===

fn state(view: &View, metrics: &crate::metrics::Metrics) -> Resp {
    versioned(StatusCode::OK, &state_doc(view, metrics), view.version)
}

/// The `GET /v1/state` document.
pub(crate) fn state_doc(view: &View, metrics: &crate::metrics::Metrics) -> Value {
    let config = &view.config;
    let routes: Vec<Value> = config
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "match": { "host": r.matches.host, "path_prefix": r.matches.path_prefix },
                "failover": r.failover,
                "backends": r.backends.iter().map(|b| json!({
                    "name": b.name, "weight": b.weight, "endpoints": b.endpoints,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    // Observed, not state: route → backend → endpoint → healthy | ejected |
    // unhealthy, as the data plane last saw it (no version of its own).
    let health: serde_json::Map<String, Value> = config
        .routes
        .iter()
        .map(|r| {
            let backends: serde_json::Map<String, Value> = r
                .backends
                .iter()
                .map(|b| {
                    (
                        b.name.clone(),
                        json!(metrics.endpoint_states(&r.name, &b.name)),
                    )
                })
                .collect();
            (r.name.clone(), Value::Object(backends))
        })
        .collect();
    json!({
        "version": view.version,
        "routes": routes,
        "flags": config.flags,
        "rollouts": &*view.rollouts,
        "flag_rollouts": &*view.flag_rollouts,
        "overridden": &*view.overridden,
        "endpoint_health": health,
    })
}

/// `DELETE /v1/overrides[/routes/R|/flags/F]`: back to the file's values;
/// answers what is still overridden.
async fn reset(admin: &Admin, actor: &str, target: ResetTarget) -> Result<Resp, ApiError> {
    let view = admin
        .store
        .reset(actor, target)
        .await
        .map_err(store_error)?;
    Ok(versioned(
        StatusCode::OK,
        &json!({ "overridden": &*view.overridden }),
        view.version,
    ))
}

async fn put_weights(
    admin: &Admin,
    actor: &str,
    route: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let if_match = if_match(req.headers())?;
    let weights: BTreeMap<String, Weight> = read_json(req).await?;
    let view = admin
        .store
        .set_weights(actor, if_match, route, weights)
        .await
        .map_err(store_error)?;
    Ok(versioned(
        StatusCode::OK,
        &route_doc(&view.config, route),
        view.version,
    ))
}

fn route_doc(config: &Config, route: &str) -> Value {
    json!({ "route": route, "weights": config.route_weights(route).unwrap_or_default() })
}

async fn start_rollout<P: Subject + RolloutDoc>(
    admin: &Admin,
    actor: &str,
    name: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let if_match = if_match(req.headers())?;
    let spec: P = read_json(req).await?;
    let view = admin
        .store
        .start_rollout(actor, if_match, name, spec)
        .await
        .map_err(store_error)?;
    rollout_status::<P>(&view, name).map(|mut r| {
        *r.status_mut() = StatusCode::CREATED;
        r
    })
}

/// `POST …/rollout/{action}`: the store's transition, then the notify
/// webhooks.
async fn rollout_action<P: Subject + RolloutDoc>(
    admin: &Admin,
    actor: &str,
    name: &str,
    action: &str,
) -> Result<Resp, ApiError> {
    let view = admin
        .store
        .rollout_action::<P>(actor, name, action)
        .await
        .map_err(store_error)?;
    if let Some(state) = P::in_view(&view).get(name) {
        let payload = crate::driver::event_payload(action, name, state);
        state.spec.webhooks().notify(payload);
    }
    rollout_status::<P>(&view, name)
}

/// `GET /v1/routes/{route}/rollout`, `GET /v1/flags/{name}/rollout`: phase,
/// step, time in step, last analysis with each check, reason.
fn rollout_status<P: Subject + RolloutDoc>(view: &View, name: &str) -> Result<Resp, ApiError> {
    let noun = P::KIND.noun();
    if !P::exists(&view.config, name) {
        return Err(store_error(StoreError::NotFound(format!(
            "no {noun} named `{name}`"
        ))));
    }
    let Some(body) = rollout_doc::<P>(view, name) else {
        return Err(store_error(StoreError::NotFound(format!(
            "{noun} `{name}` has no rollout"
        ))));
    };
    Ok(versioned(StatusCode::OK, &body, view.version))
}

/// What a rollout's document adds for its kind.
pub(crate) trait RolloutDoc: Subject {
    fn exists(config: &Config, name: &str) -> bool;
    fn fields(view: &View, name: &str, state: &RolloutState<Self>) -> Map<String, Value>;
}

impl RolloutDoc for RolloutSpec {
    fn exists(config: &Config, route: &str) -> bool {
        config.routes.iter().any(|r| r.name == route)
    }
    fn fields(view: &View, route: &str, state: &RolloutState<Self>) -> Map<String, Value> {
        let weights = view.config.route_weights(route).unwrap_or_default();
        let Value::Object(fields) = json!({
            "route": route,
            "strategy": state.spec.strategy,
            "stable": state.spec.stable,
            "target": state.spec.target,
            "target_weight": state.target_weight(),
            "weights": weights,
            "standby": state.standby,
        }) else {
            unreachable!("an object")
        };
        fields
    }
}

impl RolloutDoc for FlagRolloutSpec {
    fn exists(config: &Config, flag: &str) -> bool {
        config.flags.iter().any(|f| f.name == flag)
    }
    fn fields(view: &View, flag: &str, state: &RolloutState<Self>) -> Map<String, Value> {
        let current = view.config.flags.iter().find(|f| f.name == flag);
        let Value::Object(fields) = json!({
            "flag": flag,
            "rollout_percentage": current.map(|f| f.rollout_percentage),
            "enabled": current.map(|f| f.enabled),
            "on_failure": state.spec.on_failure,
            "start": state.before,
            "steps": state.spec.steps.clone().unwrap_or_else(|| {
                crate::rollout::Plan::steps(&state.spec).into_iter().map(|s| crate::rollout::FlagStep {
                    rollout_percentage: s.weight,
                    hold: s.hold,
                }).collect()
            }),
        }) else {
            unreachable!("an object")
        };
        fields
    }
}

/// The `GET …/rollout` document of `name`, if it has a rollout.
pub(crate) fn rollout_doc<P: RolloutDoc>(view: &View, name: &str) -> Option<Value> {
    let state = P::in_view(view).get(name)?;
    let steps = state.spec.steps();
    let mut doc = Map::new();
    doc.extend(
        [
            ("phase", json!(state.phase)),
            ("step", json!(state.step)),
            ("steps", json!(steps)),
            ("held", json!(state.held)),
            ("hold", json!(steps.get(state.step).and_then(|s| s.hold))),
            ("step_entered", json!(state.step_entered)),
            ("started", json!(state.started)),
            ("consecutive_failures", json!(state.consecutive_failures)),
            ("inconclusive_for", json!(state.inconclusive)),
            ("last_analysis", json!(state.last_analysis)),
            ("reason", json!(state.reason)),
            ("analysis", json!(state.spec.analysis())),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    // The kind's own fields last: a flag's steps name their percentage.
    doc.extend(P::fields(view, name, state));
    Some(Value::Object(doc))
}

fn flags(view: &View) -> Resp {
    versioned(
        StatusCode::OK,
        &json!({ "flags": view.config.flags }),
        view.version,
    )
}

fn get_flag(view: &View, name: &str) -> Result<Resp, ApiError> {
    let flag = find_flag(&view.config, name).map_err(store_error)?;
    Ok(versioned(StatusCode::OK, &json!(flag), view.version))
}

/// `GET /v1/flags/{name}/stats`: a watched flag's cohorts side by side over
/// `metrics.window` (requests, errors, error rate, p50/p95/p99), and
/// whether their error rates differ beyond noise.
fn flag_stats(admin: &Admin, name: &str) -> Result<Resp, ApiError> {
    let view = admin.store.view();
    let flag = find_flag(&view.config, name).map_err(store_error)?;
    let metrics = &admin.metrics;
    if !metrics.enabled() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "metrics_disabled",
            "metrics.enabled is false in the configuration",
        ));
    }
    let span = metrics.window_span();
    let Some((off, on)) = metrics.flag_windows(name, span).filter(|_| flag.watched()) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_watched",
            format!("flag `{name}` keeps no cohort signals: give it `metrics: [requests, errors, latency]`"),
        ));
    };
    let cohort = |w: &crate::window::WindowStats| {
        let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        json!({
            "requests": w.requests,
            "errors": w.errors,
            "error_rate": w.error_rate_percent(),
            "p50_ms": ms(w.p50),
            "p95_ms": ms(w.p95),
            "p99_ms": ms(w.p99),
        })
    };
    let difference =
        crate::abtest::two_proportions(on.errors, on.requests, off.errors, off.requests);
    let body = json!({
        "flag": name,
        "metrics": flag.metrics,
        "window_seconds": span.as_secs(),
        "cohorts": { "on": cohort(&on), "off": cohort(&off) },
        "error_rate_difference": difference,
    });
    Ok(versioned(StatusCode::OK, &body, view.version))
}

async fn put_flag(
    admin: &Admin,
    actor: &str,
    name: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let if_match = if_match(req.headers())?;
    let mut flag: FlagConfig = read_json(req).await?;
    if flag.name.is_empty() {
        flag.name = name.to_owned();
    } else if flag.name != name {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("body names flag `{}` but the URL names `{name}`", flag.name),
        ));
    }
    let was = admin.store.view();
    let (view, created) = admin
        .store
        .put_flag(actor, if_match, flag)
        .await
        .map_err(store_error)?;
    notify_if_killed(&was, &view, name);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    get_flag(&view, name).map(|mut resp| {
        *resp.status_mut() = status;
        resp
    })
}

/// A flag write that turned the flag off ended its rollout: the rollout's
/// notify webhooks hear of it as an `abort`.
fn notify_if_killed(was: &View, now: &View, name: &str) {
    let active = |v: &View| v.flag_rollouts.get(name).is_some_and(|r| r.phase.active());
    if active(was) && !active(now) {
        if let Some(state) = now.flag_rollouts.get(name) {
            let payload = crate::driver::event_payload("abort", name, state);
            state.spec.webhooks.notify(payload);
        }
    }
}

async fn patch_flag(
    admin: &Admin,
    actor: &str,
    name: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let if_match = if_match(req.headers())?;
    let patch: Value = read_json(req).await?;
    if !patch.is_object() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "a merge patch is a JSON object",
        ));
    }
    let was = admin.store.view();
    let view = admin
        .store
        .patch_flag(actor, if_match, name, patch)
        .await
        .map_err(store_error)?;
    notify_if_killed(&was, &view, name);
    get_flag(&view, name)
}

async fn delete_flag(
    admin: &Admin,
    actor: &str,
    name: &str,
    headers: &HeaderMap,
) -> Result<Resp, ApiError> {
    let if_match = if_match(headers)?;
    let view = admin
        .store
        .delete_flag(actor, if_match, name)
        .await
        .map_err(store_error)?;
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp.headers_mut().insert(ETAG, etag(view.version));
    Ok(resp)
}

/// `GET /v1/fleet`: standalone, or the fleet as this replica sees it.
async fn fleet(admin: &Admin) -> Resp {
    match admin.store.fleet() {
        None => respond_json(
            StatusCode::OK,
            &json!({ "mode": "standalone", "version": admin.store.view().version }),
        ),
        Some(fleet) => respond_json(StatusCode::OK, &fleet.status(&admin.store).await),
    }
}

async fn events(admin: &Admin, query: &str) -> Result<Resp, ApiError> {
    let mut after = 0u64;
    let mut limit = 100usize;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("`{pair}` is not a valid query parameter"),
            )
        };
        match key {
            "after" => after = value.parse().map_err(|_| bad())?,
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=1000).contains(l))
                    .ok_or_else(bad)?
            }
            _ => return Err(bad()),
        }
    }
    let events = admin
        .store
        .events(after, limit)
        .await
        .map_err(store_error)?;
    let next = events.last().map(|e| e.seq);
    Ok(respond_json(
        StatusCode::OK,
        &json!({
            "events": events,
            "next_after": next,
            "latest_seq": admin.store.latest_seq().await,
        }),
    ))
}

// === plumbing ===

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Stale { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
        StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
        StoreError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
        StoreError::Invalid(c) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", c.to_string())
        }
        StoreError::Io(m) => {
            tracing::error!(error = %m, "state write failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
        }
        StoreError::Unavailable(m) => {
            tracing::warn!(error = %m, "change refused: the fleet's store is unavailable");
            ApiError::unavailable(m)
        }
        StoreError::Refused(m) => {
            tracing::error!(error = %m, "change refused: the fleet's store refuses this replica");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_refused", m)
        }
    }
}

fn not_allowed(allow: &'static str) -> ApiError {
    ApiError {
        allow: Some(allow),
        ..ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("allowed: {allow}"),
        )
    }
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header value")
}

fn versioned(status: StatusCode, body: &Value, version: u64) -> Resp {
    let mut resp = respond_json(status, body);
    resp.headers_mut().insert(ETAG, etag(version));
    resp
}

/// `If-Match: "7"` (also `7`, `W/"7"`); `*` or none means any version.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    let bare = text.trim_start_matches("W/").trim_matches('"');
    bare.parse().map(Some).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("If-Match `{text}` is not a state version like \"7\""),
        )
    })
}

/// Reads a JSON body of at most `MAX_BODY` bytes.
async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = read_body(req).await?;
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
        }
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("body is not JSON: {e}"),
        ),
    })
}

/// Reads a request body of at most `MAX_BODY` bytes (413 past it).
pub(crate) async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body is over {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("reading the body failed: {e}"),
            ))
        }
    };
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/openapi.yaml` documents exactly the routes the router serves.
    #[test]
    fn openapi_document_matches_the_router() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
        let text = std::fs::read_to_string(path).expect("docs/openapi.yaml");
        let doc: Value = serde_saphyr::from_str(&text).expect("openapi.yaml parses");
        assert_eq!(
            doc["openapi"].as_str().map(|v| v.starts_with("3.")),
            Some(true)
        );
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in ["get", "put", "post", "patch", "delete", "head", "options"] {
                if item.get(method).is_some() {
                    documented.push((path.clone(), method.to_uppercase()));
                }
            }
        }
        let mut served: Vec<(String, String)> = crate::admin::OPEN_ENDPOINTS
            .iter()
            .chain(ENDPOINTS)
            .chain(crate::admin::STREAM_ENDPOINTS)
            .chain(crate::ofrep::ENDPOINTS)
            .flat_map(|(path, methods)| {
                methods
                    .split(", ")
                    .map(move |m| (path.to_string(), m.to_owned()))
            })
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-123", b"secret-token-124"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn if_match_forms() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(IF_MATCH, HeaderValue::from_str(v).unwrap());
            if_match(&h).map_err(|e| e.status)
        };
        assert_eq!(with("\"7\""), Ok(Some(7)));
        assert_eq!(with("W/\"7\""), Ok(Some(7)));
        assert_eq!(with("7"), Ok(Some(7)));
        assert_eq!(with("*"), Ok(None));
        assert_eq!(with("\"seven\""), Err(StatusCode::BAD_REQUEST));
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
    }
}
