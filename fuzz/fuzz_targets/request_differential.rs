//! Our request head parser against hyper's server for the same bytes: where
//! both accept the first request, they must agree on its method, target,
//! version and how its body is delimited (a disagreement on framing is
//! what request smuggling is made of). Where only one accepts, nothing is
//! asserted: ours is stricter on purpose (docs/fuzzing.md).
#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::Body as _;
use libfuzzer_sys::fuzz_target;
use switchyard_proxy::http1::request::{parse, BodyFraming};
use tokio::io::AsyncWriteExt;

/// What hyper made of the first request: method, target, version, and its
/// body's exact length (`None`: chunked).
type Seen = (http::Method, String, http::Version, Option<u64>);

fn hyper_reads(data: &[u8]) -> Option<Seen> {
    let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let slot = seen.clone();
    runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let slot = slot.clone();
                async move {
                    let mut slot = slot.lock().expect("not poisoned");
                    if slot.is_none() {
                        let exact = req.body().size_hint().exact();
                        let chunked = req.headers().get(http::header::TRANSFER_ENCODING).is_some();
                        *slot = Some((
                            req.method().clone(),
                            req.uri().to_string(),
                            req.version(),
                            if chunked {
                                None
                            } else {
                                Some(exact.unwrap_or(0))
                            },
                        ));
                    }
                    Ok::<_, Infallible>(http::Response::new(http_body_util::Empty::<Bytes>::new()))
                }
            });
        let mut client = client;
        let bytes = data.to_vec();
        let writer = async move {
            let _ = client.write_all(&bytes).await;
            let _ = client.shutdown().await;
            // Keep reading so hyper's writes never block.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
        };
        let serve = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let _ = tokio::join!(writer, serve);
    });
    let seen = seen.lock().expect("not poisoned").clone();
    seen
}

fuzz_target!(|data: &[u8]| {
    let Ok(Some(ours)) = parse(&mut BytesMut::from(data), 16 * 1024, &mut HeaderMap::new()) else {
        return;
    };
    let Some((method, target, version, length)) = hyper_reads(data) else {
        return;
    };
    assert_eq!(ours.method, method, "method");
    assert_eq!(ours.uri.to_string(), target, "target");
    assert_eq!(ours.version, version, "version");
    let ours_length = match ours.framing {
        BodyFraming::Empty => Some(0),
        BodyFraming::Length(n) => Some(n),
        BodyFraming::Chunked => None,
    };
    assert_eq!(ours_length, length, "body framing");
});
