//! The proxy's own HTTP/1.1 client (`h1.rs`, `forward.rs`) against
//! upstreams that write their answers byte by byte: every response framing
//! of RFC 9112 §6.3, broken and hostile answers, request bodies on their way
//! up, the connection reuse that follows from each, and the one retry.

// The scripted upstream's request log is test scaffolding, not data plane:
// the crate's ban on locks does not apply to it.
#![allow(clippy::disallowed_types)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as it reached the upstream: its head as text, and its body
/// (de-chunked) with the framing it came in.
#[derive(Debug, Clone)]
struct Received {
    head: String,
    body: Vec<u8>,
    chunked: bool,
}

/// What the upstream does after reading a request.
enum Answer {
    /// Writes these bytes and reads the next request.
    Write(Vec<u8>),
    /// Writes these bytes and closes.
    WriteAndClose(Vec<u8>),
    /// Closes without a word.
    Close,
    /// Waits at the barrier, then writes these bytes.
    AfterBarrier(Arc<tokio::sync::Barrier>, Vec<u8>),
    /// Writes each piece in a segment of its own (a short pause between).
    Pieces(Vec<Vec<u8>>),
}

type Script = dyn Fn(usize, &Received) -> Answer + Send + Sync;

/// An upstream that parses requests itself and answers from a script, given
/// the request's number (from 1, over all connections) and the request.
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl RawUpstream {
    async fn start(script: impl Fn(usize, &Received) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let (accepted, log) = (connections.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, script.clone(), log.clone()));
            }
        });
        Self {
            addr,
            connections,
            received,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn serve(mut stream: TcpStream, script: Arc<Script>, log: Arc<Mutex<Vec<Received>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let nth = {
            let mut log = log.lock().unwrap();
            log.push(request.clone());
            log.len()
        };
        match script(nth, &request) {
            Answer::Write(bytes) => {
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Answer::WriteAndClose(bytes) => {
                let _ = stream.write_all(&bytes).await;
                return;
            }
            Answer::Close => return,
            Answer::AfterBarrier(barrier, bytes) => {
                barrier.wait().await;
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Answer::Pieces(pieces) => {
                for piece in pieces {
                    if stream.write_all(&piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
}

/// One request off `stream` (strictly framed: what the proxy sends must be
/// exactly right), or `None` at a close.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Received> {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        fill(stream, buf).await?;
    };
    let head = String::from_utf8(buf.drain(..end).collect()).unwrap();
    let lower = head.to_ascii_lowercase();
    let chunked = lower.contains("\r\ntransfer-encoding: chunked\r\n");
    let mut body = Vec::new();
    if chunked {
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                fill(stream, buf).await?;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16)
                .expect("the proxy writes bare hex chunk sizes");
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                fill(stream, buf).await?;
            }
            assert_eq!(&buf[size..size + 2], b"\r\n", "chunk data ends with CRLF");
            body.extend(buf.drain(..size));
            buf.drain(..2);
            if size == 0 {
                break;
            }
        }
    } else if let Some(len) = header(&lower, "content-length") {
        let len: usize = len.parse().unwrap();
        while buf.len() < len {
            fill(stream, buf).await?;
        }
        body.extend(buf.drain(..len));
    }
    Some(Received {
        head,
        body,
        chunked,
    })
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The value of `name` in a lowercased head.
fn header<'a>(lower_head: &'a str, name: &str) -> Option<&'a str> {
    lower_head
        .split("\r\n")
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn proxy_to(upstream: &RawUpstream) -> Running {
    Running::start(&config("", &[("raw", upstream.addr, 100.0)])).await
}

/// GET `path`: the status and body, or the error reading the body.
async fn fetch(proxy: &Running, method: &str, path: &str) -> (StatusCode, Result<String, String>) {
    let req = Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .header("x-user-id", "u1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // Bounded: a framing bug shows as a hang, which must fail, not stall.
    tokio::time::timeout(Duration::from_secs(30), async {
        let resp = body_client().request(req).await.expect("response head");
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .map_err(|e| e.to_string());
        (status, body)
    })
    .await
    .expect("an answer within 30 s")
}

#[tokio::test]
async fn chunked_answers_arrive_whole_and_keep_the_connection() {
    let upstream = RawUpstream::start(|nth, _| {
        let mut wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        wire.extend_from_slice(format!("5;ext=\"a b\"\r\nreply\r\n3 \r\n #{nth}\r\n").as_bytes());
        wire.extend_from_slice(b"0\r\nx-checksum: 1\r\n\r\n");
        Answer::Write(wire)
    })
    .await;
    let proxy = proxy_to(&upstream).await;
    for nth in 1..=3 {
        let (status, body) = fetch(&proxy, "GET", "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), format!("reply #{nth}"));
    }
    assert_eq!(
        upstream.connections(),
        1,
        "one connection carried all three"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_answer_without_a_length_is_read_to_the_close() {
    let upstream = RawUpstream::start(|nth, _| {
        Answer::WriteAndClose(format!("HTTP/1.1 200 OK\r\n\r\nuntil the close #{nth}").into_bytes())
    })
    .await;
    let proxy = proxy_to(&upstream).await;
    for nth in 1..=2 {
        let (status, body) = fetch(&proxy, "GET", "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), format!("until the close #{nth}"));
    }
    assert_eq!(upstream.connections(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body_whatever_their_length_says() {
    let upstream = RawUpstream::start(|_, req| {
        let answer = match req.head.split(' ').nth(1).unwrap() {
            "/head" => "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
            "/204" => "HTTP/1.1 204 No Content\r\ncontent-length: 100\r\n\r\n",
            "/304" => "HTTP/1.1 304 Not Modified\r\ncontent-length: 100\r\n\r\n",
            _ => return Answer::Write(ok("after")),
        };
        Answer::Write(answer.as_bytes().to_vec())
    })
    .await;
    let proxy = proxy_to(&upstream).await;
    let (status, body) = fetch(&proxy, "HEAD", "/head").await;
    assert_eq!((status, body.unwrap().as_str()), (StatusCode::OK, ""));
    let (status, body) = fetch(&proxy, "GET", "/204").await;
    assert_eq!(
        (status, body.unwrap().as_str()),
        (StatusCode::NO_CONTENT, "")
    );
    let (status, body) = fetch(&proxy, "GET", "/304").await;
    assert_eq!(
        (status, body.unwrap().as_str()),
        (StatusCode::NOT_MODIFIED, "")
    );
    // Had the proxy waited for 100 body bytes, this would hang or be wrong.
    let (status, body) = fetch(&proxy, "GET", "/next").await;
    assert_eq!((status, body.unwrap().as_str()), (StatusCode::OK, "after"));
    assert_eq!(upstream.connections(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn informational_answers_before_the_final_one_are_skipped() {
    let upstream = RawUpstream::start(|_, _| {
        let mut wire =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"
                .to_vec();
        wire.extend_from_slice(&ok("final"));
        Answer::Write(wire)
    })
    .await;
    let proxy = proxy_to(&upstream).await;
    for _ in 0..2 {
        let (status, body) = fetch(&proxy, "GET", "/").await;
        assert_eq!((status, body.unwrap().as_str()), (StatusCode::OK, "final"));
    }
    assert_eq!(upstream.connections(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn broken_answers_are_502_and_their_connections_dropped() {
    let broken: Vec<(&str, Vec<u8>)> = vec![
        (
            "two lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab".to_vec(),
        ),
        (
            "a signed length",
            b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\na".to_vec(),
        ),
        (
            "chunked in HTTP/1.0",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()),
        (
            "a bad header",
            b"HTTP/1.1 200 OK\r\nbad header: x\r\n\r\n".to_vec(),
        ),
        (
            "a head too large",
            format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "b".repeat(70_000)).into_bytes(),
        ),
        (
            "a 101 nobody asked for",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"
                .to_vec(),
        ),
    ];
    let answers = Arc::new(broken);
    let script = answers.clone();
    let upstream =
        RawUpstream::start(move |nth, _| Answer::Write(script[(nth - 1) % script.len()].1.clone()))
            .await;
    let proxy = proxy_to(&upstream).await;
    for (what, _) in answers.iter() {
        let (status, body) = fetch(&proxy, "GET", "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{what}: {body:?}");
    }
    assert_eq!(
        upstream.connections(),
        answers.len(),
        "a connection that spoke broken HTTP is never used again"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_body_cut_short_or_broken_fails_the_clients_response() {
    let upstream = RawUpstream::start(|nth, _| match nth {
        1 => Answer::WriteAndClose(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..".to_vec(),
        ),
        2 => Answer::WriteAndClose(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec(),
        ),
        3 => Answer::Write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n".to_vec(),
        ),
        _ => Answer::Write(ok("whole")),
    })
    .await;
    let proxy = proxy_to(&upstream).await;
    for what in ["cut length", "cut chunks", "broken chunk"] {
        // The head may or may not have left before the body failed; either
        // way the client must not get what looks like a whole response.
        let req = Request::get(proxy.url("/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(resp) = body_client().request(req).await {
            assert_eq!(resp.status(), StatusCode::OK, "{what}");
            let body = resp.into_body().collect().await;
            assert!(body.is_err(), "{what}: the client must see the failure");
        }
    }
    let (status, body) = fetch(&proxy, "GET", "/").await;
    assert_eq!((status, body.unwrap().as_str()), (StatusCode::OK, "whole"));
    assert_eq!(upstream.connections(), 4);
    proxy.stop().await;
}

/// RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, which is not
/// passed on, and the connection closes after the response.
#[tokio::test]
async fn an_answer_with_both_framings_is_read_chunked_and_its_connection_closed() {
    let upstream = RawUpstream::start(|_, _| {
        Answer::Write(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n6\r\nsix ok\r\n0\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    let proxy = proxy_to(&upstream).await;
    for _ in 0..2 {
        let req = Request::get(proxy.url("/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = body_client().request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_ne!(
            resp.headers().get("content-length").map(|v| v.as_bytes()),
            Some(&b"3"[..])
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"six ok");
    }
    assert_eq!(upstream.connections(), 2);
    proxy.stop().await;
}

/// An upstream that sends more than one response to one request must not
/// have the extra one read as the answer to the next request.
#[tokio::test]
async fn bytes_after_an_answer_keep_its_connection_out_of_the_pool() {
    let upstream = RawUpstream::start(|nth, _| {
        let mut wire = ok(&format!("answer #{nth}"));
        if nth == 1 {
            wire.extend_from_slice(&ok("smuggled"));
        }
        Answer::Write(wire)
    })
    .await;
    let proxy = proxy_to(&upstream).await;
    for nth in 1..=2 {
        let (status, body) = fetch(&proxy, "GET", "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), format!("answer #{nth}"));
    }
    assert_eq!(upstream.connections(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn request_bodies_go_up_with_a_framing_of_the_proxys_own() {
    let upstream =
        RawUpstream::start(|_, req| Answer::Write(ok(&req.body.len().to_string()))).await;
    let proxy = proxy_to(&upstream).await;

    let (status, body) = fetch(&proxy, "GET", "/").await;
    assert_eq!((status, body.unwrap().as_str()), (StatusCode::OK, "0"));

    let sized = Request::post(proxy.url("/"))
        .body(Full::new(Bytes::from(vec![b'x'; 10_000])))
        .unwrap();
    let resp = body_client().request(sized).await.unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "10000"
    );

    // A body of unknown length, in pieces: chunked on the way up.
    let pieces = (0..5).map(|i| Bytes::from(vec![b'a' + i; 3000])).collect();
    let streamed = Request::put(proxy.url("/")).body(Pieces(pieces)).unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client.request(streamed).await.unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "15000"
    );

    let received = upstream.received();
    assert_eq!(received.len(), 3);
    let heads: Vec<String> = received
        .iter()
        .map(|r| r.head.to_ascii_lowercase())
        .collect();
    assert!(
        !heads[0].contains("content-length") && !received[0].chunked,
        "{}",
        heads[0]
    );
    assert!(
        heads[1].contains("\r\ncontent-length: 10000\r\n"),
        "{}",
        heads[1]
    );
    assert!(received[2].chunked, "{}", heads[2]);
    assert!(!heads[2].contains("content-length"), "{}", heads[2]);
    let expected: Vec<u8> = (0..5).flat_map(|i| vec![b'a' + i; 3000]).collect();
    assert_eq!(received[2].body, expected);
    assert_eq!(upstream.connections(), 1);
    proxy.stop().await;
}

/// A request body of unknown length, in pieces.
struct Pieces(std::collections::VecDeque<Bytes>);

impl hyper::body::Body for Pieces {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|piece| Ok(Frame::data(piece))))
    }
}

/// A request body fed by the test, piece by piece.
struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Fed {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|p| Ok(Frame::data(p))))
    }
}

/// The upstream answers a POST as soon as its head is in, while the client
/// is still sending the body: the answer reaches the client, and the
/// connection, whose request never ended, is not used again.
#[tokio::test]
async fn an_answer_before_the_body_was_sent_reaches_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while find(&buf, b"\r\n\r\n").is_none() {
                    if fill(&mut stream, &mut buf).await.is_none() {
                        return;
                    }
                }
                if !buf.starts_with(b"POST ") {
                    let _ = stream.write_all(&ok("next")).await;
                    return;
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo long",
                    )
                    .await;
                // Reads on, as a server draining the body would; never
                // answers a second request on this connection.
                while fill(&mut stream, &mut buf).await.is_some() {}
            });
        }
    });
    let proxy = Running::start(&config("", &[("early", addr, 100.0)])).await;
    let (feed, fed) = tokio::sync::mpsc::channel(4);
    feed.send(Bytes::from(vec![b'x'; 1000])).await.unwrap();
    let req = Request::post(proxy.url("/")).body(Fed(fed)).unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("the early answer, while the body is still open")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "too long"
    );
    drop(feed);
    let (status, body) = fetch(&proxy, "GET", "/").await;
    assert_eq!((status, body.unwrap().as_str()), (StatusCode::OK, "next"));
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    proxy.stop().await;
}

/// HTTP/2 requests whose end comes in an empty DATA frame of its own, after
/// the headers: the upstream gets complete HTTP/1.1 requests (a `GET` with
/// no body at all), and the connection stays usable.
#[tokio::test]
async fn http2_requests_ended_by_a_frame_of_their_own_go_up_complete() {
    let upstream =
        RawUpstream::start(|_, req| Answer::Write(ok(&req.body.len().to_string()))).await;
    let proxy = proxy_to(&upstream).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    // The end on the headers themselves, without a length: no body.
    for method in ["POST", "DELETE"] {
        let mut h2 = h2.clone().ready().await.unwrap();
        let req = Request::builder()
            .method(method)
            .uri(proxy.url("/"))
            .body(())
            .unwrap();
        let (resp, _) = h2.send_request(req, true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(30), resp)
            .await
            .expect("an answer within 30 s")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{method}");
    }
    for method in ["GET", "POST", "GET"] {
        let mut h2 = h2.clone().ready().await.unwrap();
        let req = Request::builder()
            .method(method)
            .uri(proxy.url("/"))
            .header("x-user-id", "u1")
            .body(())
            .unwrap();
        let (resp, mut stream) = h2.send_request(req, false).unwrap();
        stream.send_data(Bytes::new(), true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(30), resp)
            .await
            .expect("an answer within 30 s")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{method}");
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while let Some(data) = body.data().await {
            text.extend_from_slice(&data.unwrap());
        }
        assert_eq!(text, b"0", "{method}");
    }
    let received = upstream.received();
    assert_eq!(received.len(), 5);
    for r in &received {
        let head = r.head.to_ascii_lowercase();
        if head.starts_with("get ") {
            assert!(!r.chunked && !head.contains("content-length"), "{head}");
        }
    }
    assert_eq!(upstream.connections(), 1, "every request was whole");
    proxy.stop().await;
}

/// A pooled connection the upstream drops just as the next request goes out
/// (a keep-alive timeout running out): an idempotent request without a
/// body goes again on a new connection; anything else is a 502, never sent
/// twice (RFC 9110 §9.2.2).
#[tokio::test]
async fn only_idempotent_requests_are_sent_again_after_a_pooled_connection_drops() {
    let upstream = RawUpstream::start(|nth, _| match nth {
        // The first request on each connection is answered; the second is
        // read and then the connection closes without an answer.
        1 | 3 | 5 => Answer::Write(ok("first")),
        2 | 4 => Answer::Close,
        _ => Answer::Write(ok("again")),
    })
    .await;
    let proxy = proxy_to(&upstream).await;

    let (status, body) = fetch(&proxy, "GET", "/").await;
    assert_eq!((status, body.unwrap().as_str()), (StatusCode::OK, "first"));
    // Sent on the pooled connection, dropped (request 2), sent again on a
    // new one (request 3).
    let (status, body) = fetch(&proxy, "GET", "/").await;
    assert_eq!((status, body.unwrap().as_str()), (StatusCode::OK, "first"));
    assert_eq!(upstream.connections(), 2);

    // Request 4: a POST on the pooled connection, dropped: not sent again.
    let req = Request::post(proxy.url("/"))
        .body(Full::new(Bytes::from_static(b"once")))
        .unwrap();
    let resp = body_client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let posts = upstream
        .received()
        .iter()
        .filter(|r| r.head.starts_with("POST "))
        .count();
    assert_eq!(posts, 1, "the POST reached the upstream once");
    assert_eq!(upstream.connections(), 2);
    proxy.stop().await;
}

/// What the upstream sends right behind its 101, in the same segment,
/// belongs to the tunnel.
#[tokio::test]
async fn bytes_right_after_a_101_reach_the_client() {
    let upstream = RawUpstream::start(|_, _| {
        Answer::Write(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nhello from upstream"
                .to_vec(),
        )
    })
    .await;
    let proxy = proxy_to(&upstream).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while find(&got, b"hello from upstream").is_none() {
            if fill(&mut client, &mut got).await.is_none() {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(read.is_ok(), "timed out: {text}");
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.ends_with("\r\n\r\nhello from upstream"), "{text}");
    proxy.stop().await;
}

/// An upstream that closes an idle keep-alive connection (its keep-alive
/// timeout ran out) sees the proxy close its side too, without another
/// request coming to find it: no socket is left in CLOSE_WAIT.
#[tokio::test]
async fn an_idle_connection_the_upstream_closes_is_let_go() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        read_request(&mut stream, &mut buf).await.unwrap();
        stream.write_all(&ok("once")).await.unwrap();
        // Half-close, as a server's keep-alive timeout does, and wait for
        // the proxy's side to close.
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
        let _ = closed_tx.send(read.is_ok());
    });
    let proxy = Running::start(&config("", &[("closing", addr, 100.0)])).await;
    let (status, body) = fetch(&proxy, "GET", "/").await;
    assert_eq!((status, body.unwrap().as_str()), (StatusCode::OK, "once"));
    assert!(
        closed_rx.await.unwrap(),
        "the proxy kept the upstream's closed connection open"
    );
    proxy.stop().await;
}

/// The one retry is one: with two pooled connections, a request dropped by
/// the first goes to a new connection, not to the second pooled one.
#[tokio::test]
async fn a_dropped_request_is_sent_again_once_on_a_new_connection() {
    let both = Arc::new(tokio::sync::Barrier::new(2));
    let upstream = RawUpstream::start(move |nth, _| match nth {
        // Held until both arrived: two connections in the pool.
        1 | 2 => Answer::AfterBarrier(both.clone(), ok("pooled")),
        3 => Answer::Close,
        _ => Answer::Write(ok("again")),
    })
    .await;
    let proxy = proxy_to(&upstream).await;
    let (a, b) = tokio::join!(fetch(&proxy, "GET", "/"), fetch(&proxy, "GET", "/"));
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK));
    assert_eq!(upstream.connections(), 2);
    let (status, body) = fetch(&proxy, "GET", "/").await;
    assert_eq!((status, body.unwrap().as_str()), (StatusCode::OK, "again"));
    assert_eq!(
        upstream.connections(),
        3,
        "sent again on a new connection, not on the other pooled one"
    );
    proxy.stop().await;
}

/// Informational answers are bounded: an upstream sending them without end
/// (each in its own segment) gets a 502, not a request held until its
/// timeout.
#[tokio::test]
async fn endless_informational_answers_are_a_502() {
    let upstream = RawUpstream::start(|_, _| {
        let mut pieces = vec![b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(); 17];
        pieces.push(ok("too late"));
        Answer::Pieces(pieces)
    })
    .await;
    let proxy = proxy_to(&upstream).await;
    let (status, _) = fetch(&proxy, "GET", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    proxy.stop().await;
}

/// A 101 that arrives before the request that asked to upgrade was sent
/// whole (its body is still coming) cannot start a tunnel: the bytes still
/// to come belong to the request, not to the new protocol. The client gets
/// a 502. The same upstream's 101 to the same request sent whole starts
/// the tunnel.
#[tokio::test]
async fn a_101_before_the_request_was_sent_whole_is_a_502() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while find(&buf, b"\r\n\r\n").is_none() {
                    if fill(&mut stream, &mut buf).await.is_none() {
                        return;
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
                    )
                    .await;
                while fill(&mut stream, &mut buf).await.is_some() {}
            });
        }
    });
    let proxy = Running::start(&config("", &[("early", addr, 100.0)])).await;
    /// The head of the answer to an upgrade request with these body bytes
    /// of the 10 it announces.
    async fn head(proxy: SocketAddr, body: &[u8]) -> String {
        let mut client = TcpStream::connect(proxy).await.unwrap();
        let mut request = b"POST / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: echo\r\ncontent-length: 10\r\n\r\n".to_vec();
        request.extend_from_slice(body);
        client.write_all(&request).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while find(&got, b"\r\n\r\n").is_none() {
                if fill(&mut client, &mut got).await.is_none() {
                    break;
                }
            }
        })
        .await;
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(read.is_ok(), "timed out: {text}");
        text
    }
    let whole = head(proxy.addr, b"ten bytes!").await;
    assert!(whole.starts_with("HTTP/1.1 101"), "{whole}");
    let half = head(proxy.addr, b"half!").await;
    assert!(half.starts_with("HTTP/1.1 502"), "{half}");
    proxy.stop().await;
}
