//! Bounds: connection limit, idle/slow clients, drain deadline, readiness
//! during drain.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{client, config, get, Behaviour, Running, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn read_response_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn connections_past_the_limit_are_shed_with_503_until_one_closes() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "limits: { max_connections: 1 }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let req = b"GET / HTTP/1.1\r\nhost: a\r\nx-user-id: u\r\n\r\n";

    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    first.write_all(req).await.unwrap();
    assert!(read_response_head(&mut first)
        .await
        .starts_with("HTTP/1.1 200"));

    // A second connection while the first is open: 503 with Retry-After,
    // then closed, without reaching the upstream.
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    let mut shed = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut shed)).await;
    let shed = String::from_utf8_lossy(&shed);
    assert!(shed.starts_with("HTTP/1.1 503"), "{shed}");
    assert!(shed.contains("retry-after: 1"), "{shed}");
    assert_eq!(blue.arrived.load(Ordering::SeqCst), 1);
    let metrics = get(&client(), &format!("http://{}/metrics", proxy.admin), &[])
        .await
        .2;
    assert!(
        metrics.contains("switchyard_connections_shed_total 1"),
        "{metrics}"
    );

    // Once the first closes, new connections are served again.
    drop(first);
    let mut served = false;
    for _ in 0..100 {
        let mut next = TcpStream::connect(proxy.addr).await.unwrap();
        let _ = next.write_all(req).await;
        if read_response_head(&mut next)
            .await
            .starts_with("HTTP/1.1 200")
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served,
        "never served again after the first connection closed"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off_at_the_header_timeout() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "timeouts: { request_header: 300ms, idle: 60s }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nx-slow")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "slow client still connected after 10 s");
    let reply = String::from_utf8_lossy(&rest);
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
        "{reply}"
    );
    assert_eq!(blue.arrived.load(Ordering::SeqCst), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn slowloris_is_cut_off_while_normal_clients_keep_being_served() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "timeouts: { request_header: 1s, idle: 60s }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let addr = proxy.addr;
    // One header byte every 100 ms: never a complete head, always active.
    let dribbler = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = b"GET / HTTP/1.1\r\nhost: a\r\nx-pad: ".iter().copied();
        let forever = head.chain(std::iter::repeat(b'a')).take(600);
        let started = std::time::Instant::now();
        for byte in forever {
            if s.write_all(&[byte]).await.is_err() {
                return (true, started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (false, started.elapsed())
    });
    let c = client();
    let mut served = 0;
    while !dribbler.is_finished() && served < 2000 {
        let (status, _, body) = get(&c, &proxy.url("/"), &[("x-user-id", "u")]).await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "blue\n"));
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (cut, after) = dribbler.await.unwrap();
    assert!(cut, "the dribbling client was never cut off ({after:?})");
    assert!(served > 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_may_idle_longer_than_the_header_timeout() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "timeouts: { request_header: 200ms, idle: 30s }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let req = b"GET / HTTP/1.1\r\nhost: a\r\nx-user-id: u\r\n\r\n";
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(req).await.unwrap();
        let head = read_response_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut body = [0u8; 5];
        s.read_exact(&mut body).await.unwrap();
        // Silent for five header timeouts: the idle timeout applies, not
        // the header one.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(blue.arrived.load(Ordering::SeqCst), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout_on_http1_and_http2() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "timeouts: { idle: 300ms }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    // HTTP/1.1: after one request, the silent connection is closed. So it
    // is after a request asking for an upgrade that the upstream declined
    // (h2c, as `curl --http2` asks, answered with a 200).
    let upgrade = "connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n";
    for extra in ["", upgrade] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!("GET / HTTP/1.1\r\nhost: a\r\nx-user-id: u\r\n{extra}\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all)).await;
        assert!(closed.is_ok(), "idle HTTP/1.1 connection kept open: {head}");
        let all = String::from_utf8_lossy(&all);
        assert!(all.starts_with("HTTP/1.1 200"), "{all}");
        assert!(all.ends_with("blue\n"), "{all}");
    }

    // HTTP/2: the connection ends (GOAWAY) once no stream was opened for idle.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let (resp, _) = h2
        .send_request(
            http::Request::get(proxy.url("/"))
                .header("x-user-id", "u")
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection kept open");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_http2_stream_resets_gets_the_connection_closed() {
    let blue = Upstream::start("blue", Behaviour::Delay(Duration::from_millis(50))).await;
    let proxy = Running::start(&config("", &[("blue", blue.addr, 100.0)])).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    const FLOOD: usize = 100_000;
    let mut sent = 0;
    for _ in 0..FLOOD {
        let Ok(mut ready) = h2.clone().ready().await else {
            break;
        };
        let req = http::Request::get(proxy.url("/"))
            .header("x-user-id", "u")
            .body(())
            .unwrap();
        let Ok((_, mut stream)) = ready.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        // Let the connection task write the frames as they are made.
        tokio::task::yield_now().await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the server kept the flooding connection open")
        .unwrap();
    // The server ends it: GOAWAY(ENHANCE_YOUR_CALM), seen by the client as
    // that reason or as the closed socket if it was still writing.
    let err = ended.expect_err("the connection ended cleanly");
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "after {sent}: {err:?}"
    );
    assert!(sent < FLOOD, "all {sent} resets were accepted");
    // Counted (and logged at most every 10 s, not once per connection).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while common::metric(proxy.admin, "switchyard_http2_flood_closed_total").await != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each request the proxy did start is bounded by the stream limit, and
    // other clients are still served.
    assert!(blue.arrived.load(Ordering::SeqCst) < FLOOD);
    let (status, _, _) = get(&client(), &proxy.url("/"), &[("x-user-id", "u")]).await;
    assert_eq!(status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn request_bodies_over_the_limit_get_413_declared_or_streamed() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "limits: { max_request_body_bytes: 1000 }",
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let send = |head: String, body: Vec<u8>| async move {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let _ = s.write_all(&body).await;
        read_response_head(&mut s).await
    };
    let post = "POST / HTTP/1.1\r\nhost: a\r\nx-user-id: u\r\n";
    // Exactly at the limit: accepted.
    let head = send(
        format!("{post}content-length: 1000\r\n\r\n"),
        vec![b'a'; 1000],
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let before = blue.arrived.load(Ordering::SeqCst);
    // Declared too large: refused before the upstream sees anything.
    let head = send(
        format!("{post}content-length: 1001\r\n\r\n"),
        vec![b'a'; 1001],
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(blue.arrived.load(Ordering::SeqCst), before);
    // Streamed (chunked) past the limit: 413 too.
    let mut chunked = Vec::new();
    for _ in 0..3 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'a'; 0x200]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = send(format!("{post}transfer-encoding: chunked\r\n\r\n"), chunked).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let metrics = get(&client(), &format!("http://{}/metrics", proxy.admin), &[])
        .await
        .2;
    assert!(
        metrics.contains("switchyard_unrouted_requests_total{reason=\"body_too_large\"} 1"),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn drain_deadline_cuts_requests_that_outlive_it() {
    let slow = Upstream::start("slow", Behaviour::Delay(Duration::from_secs(30))).await;
    let proxy = Running::start(&config(
        "timeouts: { drain: 200ms }",
        &[("slow", slow.addr, 100.0)],
    ))
    .await;
    let url = proxy.url("/");
    let stuck = tokio::spawn(async move {
        let c = client();
        c.request(
            http::Request::get(url)
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
    });
    slow.wait_for_arrivals(1).await;
    let drained = proxy.stop().await;
    assert_eq!(drained.abandoned, 1);
    stuck.abort();
}

#[tokio::test]
async fn readiness_drops_while_draining_and_in_flight_requests_finish() {
    let slow = Upstream::start("slow", Behaviour::Delay(Duration::from_millis(1500))).await;
    let proxy = Running::start(&config(
        "timeouts: { drain: 20s }",
        &[("slow", slow.addr, 100.0)],
    ))
    .await;
    let admin = format!("http://{}/health/ready", proxy.admin);
    let c = client();
    assert_eq!(get(&c, &admin, &[]).await.0, 200);

    let url = proxy.url("/");
    let in_flight = tokio::spawn(async move { get(&client(), &url, &[("x-user-id", "u")]).await });
    slow.wait_for_arrivals(1).await;
    let stopping = tokio::spawn(proxy.stop());

    // The admin listener stays up during the drain and reports not ready.
    let mut status = 200;
    for _ in 0..500 {
        status = get(&client(), &admin, &[]).await.0.as_u16();
        if status == 503 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(status, 503, "readiness never dropped");
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "slow\n"));
    assert_eq!(stopping.await.unwrap().abandoned, 0);
}
