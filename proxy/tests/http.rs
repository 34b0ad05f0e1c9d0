//! Protocol behaviour end to end: HTTP/2 prior knowledge, header hygiene,
//! WebSocket upgrades, route matching.

mod common;

use std::time::Duration;

use common::{client, config, get, h2_client, raw_exchange, Behaviour, Running, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn http2_prior_knowledge_is_proxied() {
    let blue = Upstream::start("blue", Behaviour::EchoHeaders).await;
    let proxy = Running::start(&config("", &[("blue", blue.addr, 100.0)])).await;
    let h2 = h2_client();
    let (status, _, body) = get(&h2, &proxy.url("/x"), &[("x-user-id", "alice")]).await;
    assert_eq!(status, 200, "{body}");
    // The HTTP/1.1 upstream gets the HTTP/2 `:authority` as Host.
    assert!(body.contains(&format!("host: {}", proxy.addr)), "{body}");
    assert!(body.contains("x-user-id: alice"), "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn headers_are_cleaned_both_ways() {
    let blue = Upstream::start("blue", Behaviour::EchoHeaders).await;
    let extra = "forced_backend_header: x-switchyard-backend";
    let proxy = Running::start(&config(extra, &[("blue", blue.addr, 100.0)])).await;
    let c = client();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, _, body) = get(
        &c,
        &proxy.url("/echo"),
        &[
            ("x-user-id", "alice"),
            ("connection", "x-hop"),
            ("x-hop", "secret"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "req-42"),
            ("traceparent", traceparent),
            ("x-switchyard-backend", "blue"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let lines: Vec<&str> = body.lines().collect();
    assert!(lines.contains(&"x-forwarded-for: 127.0.0.1"), "{body}");
    assert!(lines.contains(&"x-forwarded-proto: http"), "{body}");
    assert!(lines.contains(&"x-request-id: req-42"), "{body}");
    assert!(
        lines.contains(&format!("traceparent: {traceparent}").as_str()),
        "{body}"
    );
    for gone in ["x-hop:", "keep-alive:", "x-switchyard-backend:", "6.6.6.6"] {
        assert!(!body.contains(gone), "{gone} reached the upstream:\n{body}");
    }

    // Without a request id, one is made up.
    let (_, _, body) = get(&c, &proxy.url("/echo"), &[("x-user-id", "alice")]).await;
    let id = body
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("request id");
    assert_eq!(id.len(), 32, "{id}");
    proxy.stop().await;
}

/// An upstream answering with hop-by-hop headers: the client never sees them.
#[tokio::test]
async fn response_hop_by_hop_headers_are_stripped() {
    // A raw upstream, to send headers hyper's server would not.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = "HTTP/1.1 200 OK\r\nconnection: x-internal\r\nx-internal: 1\r\nkeep-alive: timeout=3\r\nproxy-authenticate: Basic\r\nx-app: yes\r\ncontent-length: 3\r\n\r\nok\n";
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    let proxy = Running::start(&config("", &[("blue", addr, 100.0)])).await;
    let (status, headers, body) = get(&client(), &proxy.url("/"), &[("x-user-id", "a")]).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "ok\n"));
    assert_eq!(headers["x-app"], "yes");
    for gone in ["x-internal", "keep-alive", "proxy-authenticate"] {
        assert!(!headers.contains_key(gone), "{gone} reached the client");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_upgrade_passes_through() {
    let ws = Upstream::start("ws", Behaviour::UpgradeEcho).await;
    let proxy = Running::start(&config("", &[("ws", ws.addr, 100.0)])).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut echoed = [0u8; 23];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping through the tunnel");
    proxy.stop().await;
}

#[tokio::test]
async fn routes_match_host_and_path_first_match_wins() {
    let (a, b, c) = (
        Upstream::start("a", Behaviour::Name).await,
        Upstream::start("b", Behaviour::Name).await,
        Upstream::start("c", Behaviour::Name).await,
    );
    let yaml = format!(
        r#"
routes:
  - name: admin
    match: {{ host: admin.example.com }}
    backends: [{{ name: a, endpoints: ["{}"], weight: 100 }}]
  - name: api
    match: {{ path_prefix: /api }}
    backends: [{{ name: b, endpoints: ["{}"], weight: 100 }}]
  - name: www
    match: {{ host: "*.example.com" }}
    backends: [{{ name: c, endpoints: ["{}"], weight: 100 }}]
"#,
        a.addr, b.addr, c.addr
    );
    let proxy = Running::start(&yaml).await;
    let cl = client();
    let port = proxy.addr.port();
    let at = |host: &str, path: &str| format!("http://{host}:{port}{path}");
    // hyper's client connects to the URL's host, so resolve names to loopback
    // by sending the Host header explicitly.
    let cases = [
        ("admin.example.com", "/api/x", "a"),
        ("shop.example.com", "/api/x", "b"),
        ("shop.example.com", "/apix", "c"),
        ("other.test", "/api", "b"),
    ];
    for (host, path, want) in cases {
        let (status, _, body) = get(&cl, &at("127.0.0.1", path), &[("host", host)]).await;
        assert_eq!((status.as_u16(), body.trim()), (200, want), "{host}{path}");
    }
    let (status, _, body) = get(&cl, &at("127.0.0.1", "/nothing"), &[("host", "other.test")]).await;
    assert_eq!(status, 404);
    assert!(body.contains("no route"), "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn admin_health_probes() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config("", &[("blue", blue.addr, 100.0)])).await;
    let c = client();
    let admin = proxy.admin;
    let (live, _, _) = get(&c, &format!("http://{admin}/health/live"), &[]).await;
    let (ready, _, _) = get(&c, &format!("http://{admin}/health/ready"), &[]).await;
    let (missing, _, _) = get(&c, &format!("http://{admin}/nope"), &[]).await;
    assert_eq!(
        (live.as_u16(), ready.as_u16(), missing.as_u16()),
        (200, 200, 404)
    );
    let reply = raw_exchange(
        admin,
        b"DELETE /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_kept_alive() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config("", &[("blue", blue.addr, 100.0)])).await;
    let c = client();
    for i in 0..50 {
        let (status, _, _) = get(&c, &proxy.url("/"), &[("x-user-id", &format!("u{i}"))]).await;
        assert_eq!(status, 200);
    }
    assert_eq!(blue.arrived.load(std::sync::atomic::Ordering::SeqCst), 50);
    assert_eq!(
        blue.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "50 sequential requests, one upstream connection"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn absolute_form_target_sets_the_host() {
    let blue = Upstream::start("blue", Behaviour::EchoHeaders).await;
    let proxy = Running::start(&config("", &[("blue", blue.addr, 100.0)])).await;
    let reply = raw_exchange(
        proxy.addr,
        b"GET http://shop.test/echo HTTP/1.1\r\nhost: other.test\r\nx-user-id: u\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("host: shop.test\n"), "{reply}");
    assert!(!reply.contains("other.test"), "{reply}");
    proxy.stop().await;
}

#[tokio::test]
async fn requests_are_balanced_across_a_backends_endpoints() {
    let (one, two) = (
        Upstream::start("one", Behaviour::Name).await,
        Upstream::start("two", Behaviour::Name).await,
    );
    let yaml = format!(
        "routes:\n  - name: api\n    backends: [{{ name: blue, endpoints: [\"{}\", \"{}\"], weight: 100 }}]\n",
        one.addr, two.addr
    );
    let proxy = Running::start(&yaml).await;
    let c = client();
    for _ in 0..20 {
        let (status, _, _) = get(&c, &proxy.url("/"), &[("x-user-id", "same-user")]).await;
        assert_eq!(status, 200);
    }
    let counts = (
        one.arrived.load(std::sync::atomic::Ordering::SeqCst),
        two.arrived.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert_eq!(counts, (10, 10), "round robin over two endpoints");
    proxy.stop().await;
}

/// An upstream that closes each connection right after its response,
/// without `Connection: close`, like a server whose keep-alive timeout just
/// ran out: the proxy must not answer 502 for the next request on that
/// pooled connection; it goes on a new one.
#[tokio::test]
async fn an_upstream_closing_pooled_connections_loses_no_request() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                    .await;
                // Closed at once: the proxy's pooled copy goes stale.
            });
        }
    });
    let proxy = Running::start(&config("", &[("blue", upstream, 100.0)])).await;
    let c = client();
    for i in 0..30 {
        let (status, _, body) = get(&c, &proxy.url("/"), &[("x-user-id", &format!("u{i}"))]).await;
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(body, "ok\n");
    }
    // Every request needed its own upstream connection.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 30);
    proxy.stop().await;
}
