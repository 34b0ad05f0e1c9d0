//! Every way the proxy can fail a request, and the one place each becomes an
//! HTTP response. Which side was at fault is part of each variant's name:
//! `Downstream*` (the client), `Upstream*` (the backend) or ours.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use switchyard_control::metrics::{FailureReason, Unrouted};

use crate::forward::PooledBody;

/// The body of every response the proxy sends: an upstream's, streamed, or a
/// short one of the proxy's own.
pub type ProxyBody = Either<PooledBody, Full<Bytes>>;

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is not one the proxy can carry (bad URI, CONNECT, ...).
    #[error("malformed request: {0}")]
    DownstreamMalformed(&'static str),
    /// A method the proxy refuses to carry (`TRACE`: it would echo the
    /// request, credentials included, back to a page).
    #[error("method not allowed")]
    DownstreamMethodNotAllowed,
    /// The request head is larger than `limits.max_header_bytes`.
    #[error("request headers too large")]
    DownstreamHeadersTooLarge,
    /// The request body is larger than `limits.max_request_body_bytes`.
    #[error("request body too large")]
    DownstreamBodyTooLarge,
    /// The client's request body failed on its way up: the client aborted
    /// it, sent less or more than it declared, or broke its chunked framing.
    /// The upstream exchange is abandoned mid-request (the upstream never
    /// sees a complete request) and the backend is not blamed.
    #[error("request body failed: {0}")]
    DownstreamBody(String),
    /// `timeouts.request` passed while the upload still waited for the
    /// client's body: the client is too slow, not the backend.
    #[error("request body too slow")]
    DownstreamBodyTimeout,
    /// The forced-backend header names a backend the route does not have.
    #[error("forced backend is not a backend of this route")]
    DownstreamUnknownBackend,
    /// No route matches the request's host, path and headers.
    #[error("no route")]
    NoRoute,
    /// `limits.max_requests_in_flight` reached.
    #[error("overloaded")]
    Overloaded,
    /// The chosen backend has no endpoint to send to.
    #[error("no healthy endpoint")]
    NoEndpoint,
    /// The upstream refused or dropped the connection attempt.
    #[error("upstream connect failed: {0}")]
    UpstreamConnect(String),
    /// The upstream did not accept the connection within `timeouts.connect`.
    #[error("upstream connect timed out")]
    UpstreamConnectTimeout,
    /// No response headers within `timeouts.request`.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The upstream closed or reset the connection, or spoke broken HTTP.
    #[error("upstream failed: {0}")]
    UpstreamReset(String),
}

impl ProxyError {
    /// The status for this failure (DESIGN.md: 502 connect failure, 504
    /// timeout, 503 no endpoint or overload, 400 malformed, 431 too large).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::DownstreamMalformed(_)
            | Self::DownstreamUnknownBackend
            | Self::DownstreamBody(_) => StatusCode::BAD_REQUEST,
            Self::DownstreamHeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::DownstreamMethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::DownstreamBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::DownstreamBodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::Overloaded | Self::NoEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamConnect(_) | Self::UpstreamReset(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamConnectTimeout | Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The metric reason of a failure that happened before a backend was
    /// chosen (`None` for upstream failures, counted per backend).
    pub fn unrouted(&self) -> Option<Unrouted> {
        match self {
            Self::DownstreamMalformed(_) | Self::DownstreamMethodNotAllowed => {
                Some(Unrouted::Malformed)
            }
            Self::DownstreamHeadersTooLarge => Some(Unrouted::HeadersTooLarge),
            Self::DownstreamBodyTooLarge => Some(Unrouted::BodyTooLarge),
            Self::DownstreamUnknownBackend => Some(Unrouted::UnknownForcedBackend),
            Self::NoRoute => Some(Unrouted::NoRoute),
            Self::Overloaded => Some(Unrouted::Overloaded),
            _ => None,
        }
    }

    /// The `switchyard_upstream_failures_total` reason of an upstream failure.
    pub fn failure_reason(&self) -> Option<FailureReason> {
        match self {
            Self::UpstreamConnect(_) | Self::NoEndpoint => Some(FailureReason::Connect),
            Self::UpstreamConnectTimeout => Some(FailureReason::ConnectTimeout),
            Self::UpstreamTimeout => Some(FailureReason::Timeout),
            Self::UpstreamReset(_) => Some(FailureReason::Reset),
            // Only once a backend was chosen: a body refused by its declared
            // size alone is answered before that (`unrouted`).
            Self::DownstreamBody(_)
            | Self::DownstreamBodyTooLarge
            | Self::DownstreamBodyTimeout => Some(FailureReason::ClientBody),
            _ => None,
        }
    }

    /// A short body that says which failure it was; never request data, so an
    /// error page cannot reflect a client's input back.
    fn body(&self) -> &'static str {
        match self {
            Self::DownstreamMalformed(_) => "switchyard: malformed request\n",
            Self::DownstreamMethodNotAllowed => "switchyard: method not allowed\n",
            Self::DownstreamHeadersTooLarge => "switchyard: request headers too large\n",
            Self::DownstreamBodyTooLarge => "switchyard: request body too large\n",
            Self::DownstreamBody(_) => "switchyard: request body incomplete or malformed\n",
            Self::DownstreamBodyTimeout => "switchyard: request body too slow\n",
            Self::DownstreamUnknownBackend => {
                "switchyard: unknown backend in forced-backend header\n"
            }
            Self::NoRoute => "switchyard: no route for this request\n",
            Self::Overloaded => "switchyard: overloaded, retry later\n",
            Self::NoEndpoint => "switchyard: no healthy upstream endpoint\n",
            Self::UpstreamConnect(_) => "switchyard: upstream connect failed\n",
            Self::UpstreamConnectTimeout => "switchyard: upstream connect timed out\n",
            Self::UpstreamTimeout => "switchyard: upstream timed out\n",
            Self::UpstreamReset(_) => "switchyard: upstream connection failed\n",
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
            self.body().as_bytes(),
        ))));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_maps_to_its_status() {
        let cases = [
            (ProxyError::DownstreamMalformed("x"), 400),
            (ProxyError::DownstreamUnknownBackend, 400),
            (ProxyError::DownstreamHeadersTooLarge, 431),
            (ProxyError::DownstreamBodyTooLarge, 413),
            (ProxyError::NoRoute, 404),
            (ProxyError::Overloaded, 503),
            (ProxyError::NoEndpoint, 503),
            (ProxyError::UpstreamConnect("refused".into()), 502),
            (ProxyError::UpstreamReset("reset".into()), 502),
            (ProxyError::UpstreamConnectTimeout, 504),
            (ProxyError::UpstreamTimeout, 504),
        ];
        for (err, status) in cases {
            let name = format!("{err:?}");
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status, "{name}");
            assert_eq!(
                resp.headers().contains_key(RETRY_AFTER),
                status == 503,
                "{name}"
            );
        }
    }
}
