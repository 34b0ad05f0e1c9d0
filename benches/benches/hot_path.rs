//! Micro-benchmarks of the per-request work the proxy adds: bucket hashing,
//! route + split + header rewrite for a typical request, recording the
//! golden signals, and the upstream client's wire format (request head
//! written, response head parsed, a chunked body decoded). Run:
//! `cargo bench -p switchyard-benches`.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use switchyard_control::bucket::bucket;
use switchyard_control::config::Config;
use switchyard_control::metrics::Metrics;
use switchyard_proxy::headers::{rewrite_request, Added, Forwarding};
use switchyard_proxy::snapshot::Snapshot;
use switchyard_proxy::{flags, route, split};

const CONFIG: &str = r#"
flags:
  - { name: new-checkout, rollout_percentage: 10 }
  - { name: dark-mode, rollout_percentage: 50, target_groups: [beta] }
  - { name: ai-v2, rollout_percentage: 5, overrides: { user-1: true } }
  - { name: kill-me, enabled: false }
  - { name: everyone, rollout_percentage: 100 }
routes:
  - name: static
    match: { path_prefix: /static }
    backends: [{ name: cdn, endpoints: ["127.0.0.1:9000"], weight: 100 }]
  - name: api
    backends:
      - { name: blue,   endpoints: ["127.0.0.1:18081"], weight: 90 }
      - { name: green,  endpoints: ["127.0.0.1:18082"], weight: 5 }
      - { name: canary, endpoints: ["127.0.0.1:18083"], weight: 5 }
"#;

fn bench(c: &mut Criterion) {
    c.bench_function("bucket(api, user-123456)", |b| {
        b.iter(|| bucket(black_box("api"), black_box(b"user-123456")))
    });

    let metrics = Metrics::new(true, std::time::Duration::from_secs(60));
    let upstreams = switchyard_proxy::forward::Upstreams::new(&Default::default());
    let snapshot = Snapshot::build(&Config::from_yaml(CONFIG).unwrap(), &metrics, &upstreams);
    let peer = IpAddr::from([127, 0, 0, 1]);
    let peer_header = switchyard_proxy::headers::ip_header(peer);
    let request = || {
        Request::get("/api/v1/courses?page=2")
            .header("host", "app.example.com")
            .header("x-user-id", "user-123456")
            .header("accept", "application/json")
            .header("user-agent", "bench/1.0")
            .body(())
            .unwrap()
            .into_parts()
            .0
    };
    c.bench_function("route+split", |b| {
        let parts = request();
        b.iter(|| {
            let route = route::find(&snapshot, &parts).unwrap();
            let user = split::user_key(&snapshot, &parts, peer);
            split::choose(&snapshot, route, &parts, &user.key, &[]).unwrap()
        })
    });
    c.bench_function("flags: evaluate 5", |b| {
        let parts = request();
        b.iter(|| {
            flags::evaluate(&snapshot, &parts, black_box(b"user-123456"))
                .on
                .len()
        })
    });
    c.bench_function("route+split+rewrite", |b| {
        b.iter_batched_ref(
            request,
            |parts| {
                let route = route::find(&snapshot, parts).unwrap();
                let chosen = {
                    let user = split::user_key(&snapshot, parts, peer);
                    split::choose(&snapshot, route, parts, &user.key, &[]).unwrap()
                };
                let added = rewrite_request(
                    &mut parts.headers,
                    &Forwarding {
                        peer: &peer_header,
                        proto: "http",
                        trust_forwarded_for: false,
                        proxy_only: &[],
                        upgrade: false,
                    },
                );
                (chosen, added)
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn record(c: &mut Criterion) {
    let metrics = Metrics::new(true, std::time::Duration::from_secs(60));
    let stats = metrics.backend("api", "canary", 10.0).unwrap();
    // What a request pays: in-flight gauge, two clock reads, counter,
    // Prometheus histogram, rolling window.
    c.bench_function("record: start+finish", |b| {
        b.iter(|| {
            let started = stats.start();
            stats.finish(black_box(started), black_box(200), None);
        })
    });
    let window = switchyard_control::window::RollingWindow::new(
        std::time::Duration::from_secs(60),
        std::time::Instant::now(),
    );
    let now = std::time::Instant::now();
    c.bench_function("record: rolling window only", |b| {
        b.iter(|| {
            window.record(
                black_box(now),
                black_box(std::time::Duration::from_micros(1234)),
                Some(200),
            )
        })
    });
    c.bench_function("clock: Instant::now", |b| b.iter(std::time::Instant::now));
}

fn upstream_wire(c: &mut Criterion) {
    use bytes::BytesMut;
    use switchyard_proxy::http1::{self as h1, ChunkedDecoder, Decoded, RequestFraming};

    let (parts, ()) = Request::get("/api/v1/courses?page=2")
        .header("host", "app.example.com")
        .header("x-user-id", "user-123456")
        .header("accept", "application/json")
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-request-id", "0123456789abcdef0123456789abcdef")
        .body(())
        .unwrap()
        .into_parts();
    let mut out = BytesMut::with_capacity(1024);
    c.bench_function("upstream: request head written", |b| {
        b.iter(|| {
            out.clear();
            h1::write_request_head(
                &mut out,
                &parts.method,
                black_box("/api/v1/courses?page=2"),
                &parts.headers,
                &Added::default(),
                RequestFraming::None,
            );
            out.len()
        })
    });

    // nginx's answer in the compare suite, give or take the date.
    let head: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 08:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n";
    let mut map = http::HeaderMap::with_capacity(16);
    c.bench_function("upstream: response head parsed", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(head));
            let parsed = h1::parse_response(&mut buf, &http::Method::GET, &mut map)
                .unwrap()
                .unwrap();
            map = parsed.headers;
            parsed.status
        })
    });

    let mut chunked = Vec::new();
    for _ in 0..16 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b'x'; 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    c.bench_function("upstream: 16 KiB chunked body decoded", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(&chunked[..]));
            let mut decoder = ChunkedDecoder::default();
            let mut total = 0;
            while let Decoded::Data(data) = decoder.decode(&mut buf).unwrap() {
                total += data.len();
            }
            total
        })
    });
}

criterion_group!(benches, bench, record, upstream_wire);
criterion_main!(benches);
