//! OFREP, the OpenFeature Remote Evaluation Protocol, on the admin listener,
//! so OpenFeature SDKs can use Switchyard as their flag provider and get the
//! same answer the proxy sends upstream for the same user.
//!
//! ```text
//! POST /ofrep/v1/evaluate/flags/{key}   one flag
//! POST /ofrep/v1/evaluate/flags         every flag; ETag, If-None-Match → 304
//! ```
//!
//! Body: `{"context": {"targetingKey": "<user key>", "groups": ["beta"]}}`.
//! `targetingKey` is the proxy's user key (the `x-user-id` value, say);
//! `groups` (an array, or a comma-separated string) plays the trusted groups
//! header. Values are booleans with variants `on`/`off`. Same bearer tokens as
//! `/v1/`.

use bytes::Bytes;
use http::header::{HeaderValue, ETAG, IF_NONE_MATCH};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::admin::{respond_json, Admin};
use crate::api::{authorize, read_body};
use crate::bucket::Murmur3;
use crate::config::FlagConfig;
use crate::flags::{parse_groups, CompiledFlag};

type Resp = Response<Full<Bytes>>;

const BULK: &str = "/ofrep/v1/evaluate/flags";

/// The OFREP endpoints, for the OpenAPI check (see `api::ENDPOINTS`).
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("/ofrep/v1/evaluate/flags", "POST"),
    ("/ofrep/v1/evaluate/flags/{key}", "POST"),
];

/// Serves one request under `/ofrep/`.
pub async fn serve(admin: &Admin, req: Request<Incoming>) -> Resp {
    if let Err(e) = authorize(req.headers(), &admin.tokens) {
        return e.into_response();
    }
    let path = req.uri().path().to_owned();
    let single = path
        .strip_prefix(BULK)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|k| !k.is_empty() && !k.contains('/'));
    if path != BULK && single.is_none() {
        return respond_json(
            StatusCode::NOT_FOUND,
            &json!({ "errorCode": "GENERAL", "errorDetails": format!("no endpoint {path}") }),
        );
    }
    if req.method() != Method::POST {
        let mut resp = respond_json(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "errorCode": "GENERAL", "errorDetails": "use POST" }),
        );
        resp.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    let if_none_match = req.headers().get(IF_NONE_MATCH).cloned();
    let key = single.map(str::to_owned);
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let view = admin.store.view();
    let flags = &view.config.flags;
    match key {
        Some(key) => evaluate_one(flags, &key, &body),
        None => evaluate_all(flags, &body, if_none_match.as_ref()),
    }
}

/// What the evaluation context says about the user.
struct Context {
    key: Option<String>,
    groups: Vec<String>,
}

/// Parses `{"context": {...}}`; an error is `(errorCode, details)`.
fn context(body: &[u8]) -> Result<Context, (&'static str, String)> {
    let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ("PARSE_ERROR", format!("body is not JSON: {e}")))?
    };
    let ctx = match value.get("context") {
        None | Some(Value::Null) => {
            return Ok(Context {
                key: None,
                groups: Vec::new(),
            })
        }
        Some(Value::Object(o)) => o,
        Some(_) => return Err(("INVALID_CONTEXT", "`context` must be an object".into())),
    };
    let key = match ctx.get("targetingKey") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(("INVALID_CONTEXT", "`targetingKey` must be a string".into())),
    };
    let groups = match ctx.get("groups") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => parse_groups(s).map(str::to_owned).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|g| g.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(("INVALID_CONTEXT", "`groups` must be strings".to_owned()))?,
        Some(_) => {
            return Err((
                "INVALID_CONTEXT",
                "`groups` must be an array or a string".into(),
            ))
        }
    };
    Ok(Context { key, groups })
}

/// One flag's result, or its error as `(status, errorCode, details)`.
fn evaluate(flag: &FlagConfig, ctx: &Context) -> Result<Value, (StatusCode, &'static str, String)> {
    let compiled = CompiledFlag::new(flag);
    if ctx.key.is_none() && compiled.needs_key() {
        return Err((
            StatusCode::BAD_REQUEST,
            "TARGETING_KEY_MISSING",
            format!(
                "flag `{}` is targeted per user: give context.targetingKey",
                flag.name
            ),
        ));
    }
    let key = ctx.key.as_deref().unwrap_or("");
    let (on, reason) = compiled.evaluate(key.as_bytes(), ctx.groups.iter().map(String::as_str));
    Ok(json!({
        "key": flag.name,
        "value": on,
        "reason": reason.ofrep(),
        "variant": if on { "on" } else { "off" },
        // OFREP metadata: string, number or boolean values only.
        "metadata": match &flag.description {
            Some(d) => json!({ "description": d }),
            None => json!({}),
        },
    }))
}

fn evaluate_one(flags: &[FlagConfig], key: &str, body: &[u8]) -> Resp {
    let ctx = match context(body) {
        Ok(c) => c,
        Err((code, details)) => {
            return respond_json(
                StatusCode::BAD_REQUEST,
                &json!({ "key": key, "errorCode": code, "errorDetails": details }),
            )
        }
    };
    let Some(flag) = flags.iter().find(|f| f.name == key) else {
        return respond_json(
            StatusCode::NOT_FOUND,
            &json!({ "key": key, "errorCode": "FLAG_NOT_FOUND", "errorDetails": format!("no flag named `{key}`") }),
        );
    };
    match evaluate(flag, &ctx) {
        Ok(result) => respond_json(StatusCode::OK, &result),
        Err((status, code, details)) => respond_json(
            status,
            &json!({ "key": key, "errorCode": code, "errorDetails": details }),
        ),
    }
}

fn evaluate_all(flags: &[FlagConfig], body: &[u8], if_none_match: Option<&HeaderValue>) -> Resp {
    let ctx = match context(body) {
        Ok(c) => c,
        Err((code, details)) => {
            return respond_json(
                StatusCode::BAD_REQUEST,
                &json!({ "errorCode": code, "errorDetails": details }),
            )
        }
    };
    let results: Vec<Value> = flags
        .iter()
        .map(|f| {
            evaluate(f, &ctx).unwrap_or_else(|(_, code, details)| {
                json!({ "key": f.name, "errorCode": code, "errorDetails": details })
            })
        })
        .collect();
    let body = json!({ "flags": results });
    // The result depends on the flags and on the context, so the tag is a
    // hash of the answer itself.
    let text = body.to_string();
    let etag = HeaderValue::from_str(&format!("\"{}\"", content_hash(text.as_bytes())))
        .expect("hex is a valid header");
    if if_none_match.is_some_and(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == etag.as_bytes() || t.trim_ascii() == b"*")
    }) {
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp.headers_mut().insert(ETAG, etag);
        return resp;
    }
    let mut resp = respond_json(StatusCode::OK, &body);
    resp.headers_mut().insert(ETAG, etag);
    resp
}

/// 64 bits of MurmurHash3 (two seeds) as hex.
fn content_hash(bytes: &[u8]) -> String {
    let hash = |seed| {
        let mut h = Murmur3::new(seed);
        h.write(bytes);
        h.finish()
    };
    format!("{:08x}{:08x}", hash(0), hash(0x5bd1_e995))
}
