//! `/ui/`: the web dashboard, embedded in the binary (no CDN, nothing
//! fetched from elsewhere at run time). The page is static and open; it
//! draws from `GET /v1/watch` and acts through `/v1/` with the bearer token
//! the operator enters (kept in the tab's session storage, sent as a
//! header: no cookie, so no cross-site request can carry it).

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// Everything the page may load: itself, nothing else.
const POLICY: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub fn serve<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return file(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET only\n",
        );
    }
    match req.uri().path() {
        "/ui" => {
            let mut resp = file(
                StatusCode::MOVED_PERMANENTLY,
                "text/plain; charset=utf-8",
                "/ui/\n",
            );
            resp.headers_mut()
                .insert(header::LOCATION, header::HeaderValue::from_static("/ui/"));
            resp
        }
        "/ui/" | "/ui/index.html" => file(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        "/ui/app.js" => file(StatusCode::OK, "text/javascript; charset=utf-8", APP),
        "/ui/style.css" => file(StatusCode::OK, "text/css; charset=utf-8", STYLE),
        _ => file(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "no such file\n",
        ),
    }
}

fn file(
    status: StatusCode,
    content_type: &'static str,
    body: &'static str,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    resp
}
