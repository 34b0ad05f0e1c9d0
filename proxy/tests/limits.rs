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
async fn connection_limit_holds_new_clients_until_one_closes() {
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

    // The second connection is accepted by the kernel but not served while
    // the first stays open.
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    second.write_all(req).await.unwrap();
    let early =
        tokio::time::timeout(Duration::from_millis(300), read_response_head(&mut second)).await;
    assert!(
        early.is_err(),
        "served past the connection limit: {early:?}"
    );

    drop(first);
    let head = tokio::time::timeout(Duration::from_secs(10), read_response_head(&mut second))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_dropped_after_idle() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        "timeouts: { idle: 300ms }",
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
