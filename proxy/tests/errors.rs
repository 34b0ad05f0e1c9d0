//! Every failure the data plane maps to a status, provoked for real.

mod common;

use std::time::Duration;

use common::{client, config, get, raw_exchange, Behaviour, Running, Upstream};

#[tokio::test]
async fn upstream_down_is_502() {
    // Bind, note the port, close: nothing listens there any more.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Running::start(&config("", &[("blue", dead, 100.0)])).await;
    let (status, _, body) = get(&client(), &proxy.url("/"), &[("x-user-id", "a")]).await;
    assert_eq!(status, 502);
    assert!(body.contains("upstream connect failed"), "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_slower_than_request_timeout_is_504() {
    let slow = Upstream::start("slow", Behaviour::Delay(Duration::from_secs(5))).await;
    let proxy = Running::start(&config(
        "timeouts: { request: 200ms }",
        &[("slow", slow.addr, 100.0)],
    ))
    .await;
    let (status, _, body) = get(&client(), &proxy.url("/"), &[("x-user-id", "a")]).await;
    assert_eq!(status, 504);
    assert!(body.contains("upstream timed out"), "{body}");
    assert_eq!(slow.arrived.load(std::sync::atomic::Ordering::SeqCst), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let c = client();

    // Below hyper's 8 KiB parse buffer the proxy checks the limit itself.
    let proxy = Running::start(&config(
        "limits: { max_header_bytes: 2048 }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let big = "x".repeat(4096);
    let (status, _, body) = get(&c, &proxy.url("/"), &[("x-big", &big)]).await;
    assert_eq!(status, 431);
    assert!(body.contains("headers too large"), "{body}");
    let (status, _, _) = get(&c, &proxy.url("/"), &[("x-small", "y")]).await;
    assert_eq!(status, 200);
    proxy.stop().await;

    // Above it, hyper's parser refuses the head before it is read whole.
    let proxy = Running::start(&config(
        "limits: { max_header_bytes: 16384 }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let huge = "x".repeat(32 * 1024);
    let reply = raw_exchange(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nhost: a\r\nx-huge: {huge}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    let (status, _, _) = get(&c, &proxy.url("/"), &[("x-ok", &"y".repeat(8000))]).await;
    assert_eq!(status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config("", &[("blue", blue.addr, 100.0)])).await;
    for garbage in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nhost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked, identity\r\n\r\n",
    ] {
        let reply = raw_exchange(proxy.addr, garbage).await;
        assert!(
            reply.starts_with("HTTP/1.1 400"),
            "{:?} -> {reply:?}",
            String::from_utf8_lossy(garbage)
        );
    }
    // Dot segments could match one route's prefix and resolve elsewhere
    // upstream; user info has no place in a request target.
    for target in ["/api/../admin", "/a/%2e%2e/b", "http://user@shop.test/"] {
        let req = format!("GET {target} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
        let reply = raw_exchange(proxy.addr, req.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{target} -> {reply}");
    }
    // `OPTIONS *` is well-formed HTTP but has no path to forward.
    let reply = raw_exchange(
        proxy.addr,
        b"OPTIONS * HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("malformed request"), "{reply}");
    // A tunnel request is not a request to forward: it would reach the
    // upstream as `CONNECT /`, and a 2xx would turn the connection into a
    // tunnel.
    let reply = raw_exchange(
        proxy.addr,
        b"CONNECT shop.test:443 HTTP/1.1\r\nhost: shop.test:443\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("malformed request"), "{reply}");
    assert_eq!(
        blue.arrived.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing malformed reached the upstream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn past_the_in_flight_limit_is_503_with_retry_after() {
    let slow = Upstream::start("slow", Behaviour::Delay(Duration::from_secs(2))).await;
    let proxy = Running::start(&config(
        "limits: { max_requests_in_flight: 1 }",
        &[("slow", slow.addr, 100.0)],
    ))
    .await;
    let url = proxy.url("/");
    let first = tokio::spawn(async move { get(&client(), &url, &[("x-user-id", "a")]).await.0 });
    slow.wait_for_arrivals(1).await;
    let (status, headers, body) = get(&client(), &proxy.url("/"), &[("x-user-id", "b")]).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert!(body.contains("overloaded"), "{body}");
    assert_eq!(first.await.unwrap(), 200);
    proxy.stop().await;
}

/// RFC 9112 §6.3: with both framings, Transfer-Encoding wins, Content-Length
/// must not be forwarded, and the connection closes after the response, so
/// nothing smuggled in the body can be read as a second request.
#[tokio::test]
async fn conflicting_framing_cannot_smuggle_a_request() {
    let echo = Upstream::start("echo", Behaviour::EchoHeaders).await;
    let proxy = Running::start(&config("", &[("echo", echo.addr, 100.0)])).await;
    let smuggle = "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n";
    let reply = raw_exchange(proxy.addr, smuggle.as_bytes()).await;
    let lower = reply.to_ascii_lowercase();
    assert_eq!(
        lower.matches("http/1.1 ").count(),
        1,
        "a second response came back: {reply}"
    );
    if lower.starts_with("http/1.1 200") {
        assert!(lower.contains("connection: close"), "{reply}");
        assert!(
            !lower.contains("content-length: 4"),
            "content-length forwarded: {reply}"
        );
    } else {
        assert!(lower.starts_with("http/1.1 400"), "{reply}");
    }
    assert_eq!(
        echo.arrived.load(std::sync::atomic::Ordering::SeqCst),
        lower.starts_with("http/1.1 200") as usize
    );
    proxy.stop().await;
}
