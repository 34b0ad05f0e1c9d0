//! HTTP/1.1 framing on one client connection, through the paths where the
//! vendored hyper reads lazily (vendor/PATCHES.md): a head arriving in many
//! small reads, a head larger than one read, pipelined requests, a body in
//! the same segment as its head, and keep-alive after each of them. Also the
//! connection's life around them: the first bytes read to tell HTTP/2 from
//! HTTP/1, and the parking of an idle connection between requests.

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

/// Longer than the proxy's `PARK_AFTER` (250 ms): a connection left idle this
/// long has been parked, holding only its socket.
const PARKED: Duration = Duration::from_millis(600);

#[tokio::test]
async fn a_parked_connection_serves_pipelined_requests_and_parks_again() {
    let (proxy, addr, blue) = proxy_to(Behaviour::EchoHeaders, "").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut pending = Vec::new();
    let mut next = 0;
    for round in 0..3 {
        // Idle long enough to park (a client pausing, not synchronisation:
        // the answers below are what is checked).
        tokio::time::sleep(PARKED).await;
        let two: String = (0..2)
            .map(|i| format!("GET /p HTTP/1.1\r\nhost: x\r\nx-n: {}\r\n\r\n", next + i))
            .collect();
        s.write_all(two.as_bytes()).await.unwrap();
        for i in 0..2 {
            let a = read_answer(&mut s, &mut pending).await;
            assert_eq!(a.status, 200, "round {round}: {}", a.head);
            let body = String::from_utf8_lossy(&a.body);
            assert!(
                body.contains(&format!("x-n: {}\n", next + i)),
                "round {round}: {body}"
            );
        }
        next += 2;
    }
    assert_eq!(blue.arrived.load(std::sync::atomic::Ordering::SeqCst), 6);
    proxy.stop().await;
}

#[tokio::test]
async fn a_parked_connection_is_closed_cleanly_when_the_proxy_drains() {
    let (proxy, addr, _blue) = proxy_to(Behaviour::Name, "timeouts: { idle: 60s }").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-user-id: u\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    assert_eq!(read_answer(&mut s, &mut pending).await.status, 200);
    tokio::time::sleep(PARKED).await;
    // The drain does not wait out the minute of idle timeout: the parked
    // connection is closed (an end of stream, not a reset) and counted done.
    let drained = proxy.stop().await;
    assert_eq!(drained.abandoned, 0);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?} {rest:?}");
}

#[tokio::test]
async fn the_first_bytes_tell_http2_from_http1_however_they_arrive() {
    let (proxy, addr, _blue) = proxy_to(Behaviour::Name, "").await;
    // HTTP/1 requests whose method starts like the HTTP/2 preface ("PRI"),
    // one byte per write.
    for method in ["POST", "PUT", "PATCH"] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let head =
            format!("{method} / HTTP/1.1\r\nhost: x\r\nx-user-id: u\r\ncontent-length: 0\r\n\r\n");
        for byte in head.as_bytes() {
            s.write_all(&[*byte]).await.unwrap();
            // A slow client, not synchronisation.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let a = read_answer(&mut s, &mut Vec::new()).await;
        assert_eq!(a.status, 200, "{method}: {}", a.head);
        assert_eq!(a.body, b"blue\n");
    }
    // The HTTP/2 preface in small pieces, then a request on it.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for piece in preface.chunks(5) {
        tcp.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The h2 client sends the preface itself; this one has been sent, so
    // the client is given a stream that skips it.
    let (h2, conn) = h2::client::Builder::new()
        .handshake::<_, bytes::Bytes>(SkipPreface::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::get(format!("http://{addr}/"))
        .header("x-user-id", "u")
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_sends_nothing_or_a_broken_preface_is_let_go() {
    let (proxy, addr, _blue) =
        proxy_to(Behaviour::Name, "timeouts: { request_header: 300ms }").await;
    // Silent: closed once the header timeout passes.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Most of the HTTP/2 preface, then silence: the same.
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for s in [&mut silent, &mut partial] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(_))), "still open: {read:?}");
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }
    // Connecting and closing at once leaves the proxy serving.
    drop(TcpStream::connect(addr).await.unwrap());
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-user-id: u\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s, &mut Vec::new()).await.status, 200);
    proxy.stop().await;
}

/// A stream whose first 24 bytes written (the HTTP/2 client's preface) are
/// dropped, because the test already sent them by hand.
struct SkipPreface {
    inner: TcpStream,
    skip: usize,
}

impl SkipPreface {
    fn new(inner: TcpStream) -> Self {
        Self { inner, skip: 24 }
    }
}

impl tokio::io::AsyncRead for SkipPreface {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SkipPreface {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            self.skip -= n;
            return std::task::Poll::Ready(Ok(n));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parked_connections_wake_together_and_are_all_served() {
    // More than the parking lot takes from epoll in one batch (256).
    const CONNECTIONS: usize = 400;
    // The burst opens many upstream connections at once: room for the test
    // upstream's accept backlog to overflow and a SYN to be retried.
    let (proxy, addr, blue) = proxy_to(Behaviour::Name, "timeouts: { connect: 10s }").await;
    let request = b"GET / HTTP/1.1\r\nhost: x\r\nx-user-id: u\r\n\r\n";
    let mut conns = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        assert_eq!(read_answer(&mut s, &mut Vec::new()).await.status, 200);
        conns.push(s);
    }
    tokio::time::sleep(PARKED).await;
    // Every parked socket becomes readable at about the same time.
    for s in &mut conns {
        s.write_all(request).await.unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let a = read_answer(s, &mut Vec::new()).await;
        assert_eq!(
            (a.status, a.body.as_slice()),
            (200, &b"blue\n"[..]),
            "connection {i}"
        );
    }
    assert_eq!(
        blue.arrived.load(std::sync::atomic::Ordering::SeqCst),
        2 * CONNECTIONS
    );
    proxy.stop().await;
}
