//! HTTP/1.1 framing on one client connection, through the paths where the
//! vendored hyper reads lazily (vendor/PATCHES.md): a head arriving in many
//! small reads, a head larger than one read, pipelined requests, a body in
//! the same segment as its head, and keep-alive after each of them.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{config, Behaviour, Running, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response read off a kept-alive connection: status, head, body.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads exactly one `content-length` framed response from `stream`,
/// keeping whatever follows it in `pending` (bounded by a 10 s guard).
async fn read_answer(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Answer {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("response head in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before a full head: {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    let status = head[9..12].parse().expect("status code");
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    while pending.len() < head_end + length {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("response body in time")
            .unwrap();
        assert!(n > 0, "closed inside the body");
        pending.extend_from_slice(&chunk[..n]);
    }
    let body = pending[head_end..head_end + length].to_vec();
    pending.drain(..head_end + length);
    Answer { status, head, body }
}

/// A proxy in front of one upstream; the upstream must outlive the test.
async fn proxy_to(behaviour: Behaviour, extra: &str) -> (Running, SocketAddr, Upstream) {
    let blue = Upstream::start("blue", behaviour).await;
    let proxy = Running::start(&config(extra, &[("blue", blue.addr, 100.0)])).await;
    let addr = proxy.addr;
    (proxy, addr, blue)
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (proxy, addr, _blue) = proxy_to(Behaviour::EchoHeaders, "").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let three: String = (1..=3)
        .map(|n| format!("GET /p HTTP/1.1\r\nhost: x\r\nx-n: {n}\r\n\r\n"))
        .collect();
    s.write_all(three.as_bytes()).await.unwrap();
    let mut pending = Vec::new();
    for n in 1..=3 {
        let a = read_answer(&mut s, &mut pending).await;
        assert_eq!(a.status, 200, "{}", a.head);
        let body = String::from_utf8_lossy(&a.body);
        assert!(body.contains(&format!("x-n: {n}\n")), "answer {n}: {body}");
    }
    // Still open for a fourth.
    s.write_all(b"GET /p HTTP/1.1\r\nhost: x\r\nx-n: 4\r\n\r\n")
        .await
        .unwrap();
    let a = read_answer(&mut s, &mut pending).await;
    assert!(String::from_utf8_lossy(&a.body).contains("x-n: 4\n"));
    proxy.stop().await;
}

#[tokio::test]
async fn a_head_arriving_in_small_pieces_is_parsed() {
    let (proxy, addr, _blue) = proxy_to(Behaviour::EchoHeaders, "").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let head = b"GET /slow HTTP/1.1\r\nhost: x\r\nx-user-id: piecemeal\r\nx-marker: whole\r\n\r\n";
    let mut pending = Vec::new();
    for round in 0..2 {
        for piece in head.chunks(7) {
            s.write_all(piece).await.unwrap();
            // A slow client, not synchronisation: the proxy must see the
            // head in separate reads.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let a = read_answer(&mut s, &mut pending).await;
        assert_eq!(a.status, 200, "round {round}: {}", a.head);
        let body = String::from_utf8_lossy(&a.body);
        assert!(body.contains("x-marker: whole\n"), "round {round}: {body}");
        assert!(
            body.contains("x-user-id: piecemeal\n"),
            "round {round}: {body}"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_head_larger_than_one_read_is_parsed_and_the_limit_still_holds() {
    let (proxy, addr, _blue) = proxy_to(
        Behaviour::EchoHeaders,
        "limits: { max_header_bytes: 65536 }",
    )
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut pending = Vec::new();
    // More than the 8 KiB a first read takes, then just under the limit,
    // on one kept-alive connection.
    for kib in [20, 63] {
        let big = "b".repeat(kib * 1024);
        let req = format!("GET /big HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\nx-after: yes\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let a = read_answer(&mut s, &mut pending).await;
        assert_eq!(a.status, 200, "{kib} KiB: {}", a.head);
        let body = String::from_utf8_lossy(&a.body);
        assert!(
            body.contains(&format!("x-big: {big}\n")),
            "{kib} KiB: the header arrived whole"
        );
        assert!(body.contains("x-after: yes\n"), "{kib} KiB");
    }

    // Past the configured limit: refused, as before.
    let huge = "h".repeat(80 * 1024);
    let mut t = TcpStream::connect(addr).await.unwrap();
    t.write_all(format!("GET /huge HTTP/1.1\r\nhost: x\r\nx-huge: {huge}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut refused = Vec::new();
    let a = read_answer(&mut t, &mut refused).await;
    assert_eq!(a.status, 431, "{}", a.head);
    proxy.stop().await;
}

#[tokio::test]
async fn bodies_arriving_with_their_heads_are_forwarded_whole_and_the_connection_kept() {
    let (proxy, addr, _blue) = proxy_to(Behaviour::EchoBody, "").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut pending = Vec::new();
    let body: Vec<u8> = (0..40_000u32)
        .map(|i| b"0123456789abcdef"[(i % 16) as usize])
        .collect();

    // Declared length, head and body in one write.
    let mut req = format!(
        "POST /len HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    s.write_all(&req).await.unwrap();
    let a = read_answer(&mut s, &mut pending).await;
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(a.body, body, "length-delimited body");

    // Chunked, in one write with a small request pipelined behind it.
    let mut req =
        b"POST /chunked HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for part in body.chunks(7000) {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req.extend_from_slice(b"POST /small HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello");
    s.write_all(&req).await.unwrap();
    let a = read_answer(&mut s, &mut pending).await;
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(a.body, body, "chunked body");
    let a = read_answer(&mut s, &mut pending).await;
    assert_eq!(
        a.body, b"hello",
        "the request pipelined behind the chunked one"
    );

    // And after all that, an ordinary request on the same connection.
    s.write_all(b"POST /last HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nend")
        .await
        .unwrap();
    let a = read_answer(&mut s, &mut pending).await;
    assert_eq!(a.body, b"end");
    proxy.stop().await;
}
