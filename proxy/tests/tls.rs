//! TLS termination on the data listener: ALPN, SNI, mTLS, certificate reload,
//! and the checks `switchyard check` and start-up make on the files. The
//! certificates are made in the test with rcgen; the client is rustls.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::certs::{tls_yaml, Ca, Leaf};
use common::{config, temp_dir, Behaviour, Running, Upstream};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use switchyard_control::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// What one request (without a user id) over TLS saw.
#[derive(Debug)]
struct Seen {
    set_cookie: Option<String>,
    /// The server's leaf certificate.
    cert: Vec<u8>,
    alpn: Option<Vec<u8>>,
    status: u16,
    body: String,
}

fn client_config(ca_pem: &str, alpn: &[&[u8]], identity: Option<&Leaf>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => {
            let chain = vec![CertificateDer::from(leaf.der.clone())];
            let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Connects to `addr` with SNI `name`, trusting `ca_pem`, and GETs `/`.
async fn tls_get(
    addr: std::net::SocketAddr,
    name: &str,
    client: rustls::ClientConfig,
) -> Result<Seen, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = TlsConnector::from(Arc::new(client));
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let cert = session.peer_certificates().unwrap()[0].to_vec();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let req = http::Request::get("/")
        .header("host", name)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let io = TokioIo::new(tls);
    let resp = if alpn.as_deref() == Some(b"h2") {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = format!("https://{name}/").parse().unwrap();
        send.send_request(req).await
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await
    }
    .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let set_cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Seen {
        set_cookie,
        cert,
        alpn,
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[tokio::test]
async fn serves_http1_and_h2_chosen_by_alpn_and_tells_the_upstream_it_was_https() {
    let ca = Ca::new("test CA");
    let dir = temp_dir("tls-alpn");
    let files = ca.leaf(&["a.test"], 30).write(&dir, "a");
    let blue = Upstream::start("blue", Behaviour::EchoHeaders).await;
    let proxy = Running::start(&config(
        &tls_yaml(&[files], ""),
        &[("blue", blue.addr, 100.0)],
    ))
    .await;

    for (offer, expect) in [
        (&[&b"http/1.1"[..]][..], &b"http/1.1"[..]),
        (&[&b"h2"[..], &b"http/1.1"[..]][..], &b"h2"[..]),
    ] {
        let seen = tls_get(proxy.addr, "a.test", client_config(&ca.pem, offer, None))
            .await
            .unwrap();
        assert_eq!(seen.alpn.as_deref(), Some(expect));
        assert_eq!(seen.status, 200, "{seen:?}");
        assert!(
            seen.body.contains("x-forwarded-proto: https"),
            "{}",
            seen.body
        );
        // The anonymous id cookie is `Secure` on a TLS listener.
        let cookie = seen.set_cookie.unwrap();
        assert!(cookie.ends_with("; Secure"), "{cookie}");
    }
    // Plain HTTP on the TLS port is not proxied: a 400 says to use https.
    let mut plain = TcpStream::connect(proxy.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.ends_with("use https:// instead\n"), "{reply}");
    assert_eq!(blue.arrived.load(std::sync::atomic::Ordering::SeqCst), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn sni_picks_the_certificate_and_unknown_names_get_the_default_or_are_refused() {
    let ca = Ca::new("test CA");
    let dir = temp_dir("tls-sni");
    let a = ca.leaf(&["a.test"], 30);
    let b = ca.leaf(&["*.b.test", "b.test"], 30);
    let files = [a.write(&dir, "a"), b.write(&dir, "b")];
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let client = || client_config(&ca.pem, &[b"http/1.1"], None);

    let proxy = Running::start(&config(
        &tls_yaml(&files, ""),
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    for (name, want) in [
        ("a.test", &a.der),
        ("b.test", &b.der),
        ("www.b.test", &b.der),
        ("A.TEST", &a.der),
    ] {
        let seen = tls_get(proxy.addr, name, client()).await.unwrap();
        assert_eq!(&seen.cert, want, "{name}");
        assert_eq!(seen.body, "blue\n");
    }
    // An unknown name gets the first certificate, which the client rejects
    // because it does not cover the name.
    let err = tls_get(proxy.addr, "other.test", client())
        .await
        .unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    proxy.stop().await;

    let strict = Running::start(&config(
        &tls_yaml(&files, ", unknown_server_name: reject"),
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let err = tls_get(strict.addr, "other.test", client())
        .await
        .unwrap_err();
    assert!(err.starts_with("handshake"), "{err}");
    assert!(!err.contains("not valid for name"), "{err}");
    assert_eq!(
        tls_get(strict.addr, "a.test", client()).await.unwrap().cert,
        a.der
    );
    strict.stop().await;
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let other_ca = Ca::new("someone else's CA");
    let dir = temp_dir("tls-mtls");
    let files = ca.leaf(&["a.test"], 30).write(&dir, "a");
    let ca_file = dir.join("clients.pem");
    std::fs::write(&ca_file, &client_ca.pem).unwrap();
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        &tls_yaml(&[files], &format!(", client_ca: \"{}\"", ca_file.display())),
        &[("blue", blue.addr, 100.0)],
    ))
    .await;

    let trusted = client_ca.leaf(&["client.test"], 30);
    let seen = tls_get(
        proxy.addr,
        "a.test",
        client_config(&ca.pem, &[b"http/1.1"], Some(&trusted)),
    )
    .await
    .unwrap();
    assert_eq!((seen.status, seen.body.as_str()), (200, "blue\n"));

    let stranger = other_ca.leaf(&["client.test"], 30);
    for identity in [None, Some(&stranger)] {
        let refused = tls_get(
            proxy.addr,
            "a.test",
            client_config(&ca.pem, &[b"http/1.1"], identity),
        )
        .await;
        assert!(
            refused.is_err(),
            "served without a valid client certificate"
        );
    }
    assert_eq!(
        blue.arrived.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the trusted client reached the upstream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn rotated_files_are_served_without_a_restart_and_a_bad_rotation_is_refused() {
    let ca = Ca::new("test CA");
    let dir = temp_dir("tls-reload");
    let first = ca.leaf(&["a.test"], 30);
    let files = first.write(&dir, "a");
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        &tls_yaml(std::slice::from_ref(&files), ""),
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let client = || client_config(&ca.pem, &[b"http/1.1"], None);
    assert_eq!(
        tls_get(proxy.addr, "a.test", client()).await.unwrap().cert,
        first.der
    );

    // A connection opened before the rotation keeps working after it.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let kept = TlsConnector::from(Arc::new(client()))
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut kept_send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(kept))
        .await
        .unwrap();
    tokio::spawn(conn);

    let second = ca.leaf(&["a.test"], 60);
    second.write(&dir, "a");
    let metrics = format!("http://{}/metrics", proxy.admin);
    wait_for_metric(
        &metrics,
        "switchyard_tls_reloads_total{result=\"success\"} 1",
    )
    .await;
    assert_eq!(
        tls_get(proxy.addr, "a.test", client()).await.unwrap().cert,
        second.der
    );
    let resp = kept_send
        .send_request(
            http::Request::get("/")
                .header("host", "a.test")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A key that does not match the certificate: refused, the second
    // certificate keeps serving.
    std::fs::write(&files.1, ca.leaf(&["a.test"], 30).key).unwrap();
    wait_for_metric(
        &metrics,
        "switchyard_tls_reloads_total{result=\"failure\"} 1",
    )
    .await;
    assert_eq!(
        tls_get(proxy.addr, "a.test", client()).await.unwrap().cert,
        second.der
    );
    proxy.stop().await;
}

/// Polls the admin `/metrics` until `line` appears (bounded: 20 s).
async fn wait_for_metric(url: &str, line: &str) {
    let c = common::client();
    for _ in 0..200 {
        let (_, _, body) = common::get(&c, url, &[]).await;
        if body.lines().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{line} never appeared in {url}");
}

#[test]
fn bad_files_are_refused_with_the_field_and_the_reason() {
    let ca = Ca::new("test CA");
    let dir = temp_dir("tls-check");
    let good = ca.leaf(&["a.test"], 30).write(&dir, "good");
    let expired = ca.leaf(&["a.test"], -1).write(&dir, "expired");
    let other_key = ca.leaf(&["a.test"], 30).write(&dir, "other").1;
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.join("missing.pem");
    let load = |cert: &Path, key: &Path| {
        let yaml = config(
            &tls_yaml(&[(cert.to_owned(), key.to_owned())], ""),
            &[("blue", "127.0.0.1:1".parse().unwrap(), 100.0)],
        );
        let c = Config::from_yaml(&yaml).unwrap();
        switchyard_proxy::tls::load(c.tls.as_ref().unwrap(), std::time::SystemTime::now())
            .map(|_| ())
    };

    load(&good.0, &good.1).unwrap();
    for (cert, key, field, reason) in [
        (
            &expired.0,
            &expired.1,
            "tls.certificates[0].cert",
            "expired",
        ),
        (
            &good.0,
            &other_key,
            "tls.certificates[0].key",
            "does not match",
        ),
        (
            &garbage,
            &good.1,
            "tls.certificates[0].cert",
            "no CERTIFICATE",
        ),
        (&missing, &good.1, "tls.certificates[0].cert", "cannot read"),
        (&good.0, &missing, "tls.certificates[0].key", "cannot read"),
        (
            &good.0,
            &garbage,
            "tls.certificates[0].key",
            "no usable PEM",
        ),
    ] {
        let e = load(cert, key).unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.reason.contains(reason), "{e}");
    }
}

#[test]
fn check_and_run_refuse_a_mismatched_key_with_exit_64() {
    let ca = Ca::new("test CA");
    let dir = temp_dir("tls-check-bin");
    let (cert, _) = ca.leaf(&["a.test"], 30).write(&dir, "a");
    let (_, wrong_key) = ca.leaf(&["a.test"], 30).write(&dir, "b");
    let file = dir.join("switchyard.yaml");
    std::fs::write(
        &file,
        config(
            &tls_yaml(&[(cert.clone(), wrong_key)], ""),
            &[("blue", "127.0.0.1:1".parse().unwrap(), 100.0)],
        ),
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([cmd, "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {err}");
        assert!(
            err.contains("tls.certificates[0].key") && err.contains("does not match"),
            "{cmd}: {err}"
        );
    }

    // And a good pair is reported with its names and expiry.
    let good = ca.leaf(&["a.test", "www.a.test"], 30).write(&dir, "c");
    std::fs::write(
        &file,
        config(
            &tls_yaml(&[good], ""),
            &[("blue", "127.0.0.1:1".parse().unwrap(), 100.0)],
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("[a.test, www.a.test] expires in 29 day(s)")
            || text.contains("[a.test, www.a.test] expires in 30 day(s)"),
        "{text}"
    );
}

/// An HTTPS upstream on loopback with `leaf`, answering `name`.
async fn tls_upstream(leaf: &Leaf, name: &'static str) -> std::net::SocketAddr {
    let chain = vec![CertificateDer::from(leaf.der.clone())];
    let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from(format!("{name}\n"))),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_endpoints_are_verified_against_the_configured_ca_and_name() {
    let ca = Ca::new("upstream CA");
    let stranger = Ca::new("another CA");
    let dir = temp_dir("tls-upstream");
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let good = tls_upstream(&ca.leaf(&["backend.test"], 30), "secure").await;
    let untrusted = tls_upstream(&stranger.leaf(&["backend.test"], 30), "untrusted").await;
    let yaml = format!(
        "routes:\n  - name: api\n    failover: none\n    backends:\n      - {{ name: blue, endpoints: [\"https://{good}\"], weight: 50, tls: {{ ca: \"{ca}\", server_name: backend.test }} }}\n      - {{ name: green, endpoints: [\"https://{untrusted}\"], weight: 50, tls: {{ ca: \"{ca}\", server_name: backend.test }} }}\n",
        ca = ca_file.display()
    );
    let proxy = Running::start(&yaml).await;
    let c = common::client();
    // Users land on both backends; the verified one answers, the other is a
    // 502 (certificate from an unknown CA), never served unverified. (No
    // failover, so the refusal shows.)
    let (mut ok, mut refused) = (0, 0);
    for i in 0..40 {
        let user = format!("user-{i}");
        let (status, _, body) =
            common::get(&c, &proxy.url("/"), &[("x-user-id", user.as_str())]).await;
        match status.as_u16() {
            200 => {
                assert_eq!(body, "secure\n");
                ok += 1;
            }
            502 => refused += 1,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    proxy.stop().await;

    // The wrong name is refused too.
    let wrong_name = yaml.replacen("server_name: backend.test", "server_name: other.test", 1);
    let proxy = Running::start(&wrong_name).await;
    for i in 0..20 {
        let user = format!("user-{i}");
        let (status, _, body) =
            common::get(&c, &proxy.url("/"), &[("x-user-id", user.as_str())]).await;
        assert_eq!(status.as_u16(), 502, "{body}");
    }
    proxy.stop().await;
}

#[test]
fn an_unreadable_upstream_ca_is_a_config_error() {
    let yaml = "routes:\n  - name: api\n    backends:\n      - { name: blue, endpoints: [\"https://127.0.0.1:1\"], weight: 100, tls: { ca: /nonexistent/ca.pem } }\n";
    let c = Config::from_yaml(yaml).unwrap();
    let e = switchyard_proxy::tls::check_upstreams(&c).unwrap_err();
    assert_eq!(e.field, "routes[0].backends[0].tls");
    assert!(e.reason.contains("cannot read"), "{e}");
    // `tls` without an https endpoint is refused by validation.
    let e = Config::from_yaml(&yaml.replace("https://", "")).unwrap_err();
    assert_eq!(e.field, "routes[0].backends[0].tls");
}

/// A parked TLS connection woken by bytes that never make a request (part of
/// a TLS record, one byte at a time) still ends at its idle timeout: the
/// bytes reach rustls, not hyper, so only the idle deadline bounds them.
#[tokio::test]
async fn a_tls_connection_fed_part_of_a_record_still_reaches_its_idle_timeout() {
    let ca = Ca::new("test CA");
    let dir = temp_dir("tls-trickle");
    let files = ca.leaf(&["a.test"], 30).write(&dir, "a");
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = Running::start(&config(
        &format!("{}\ntimeouts: {{ idle: 1s }}", tls_yaml(&[files], "")),
        &[("blue", blue.addr, 100.0)],
    ))
    .await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut tls = TlsConnector::from(Arc::new(client_config(&ca.pem, &[b"http/1.1"], None)))
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\nx-user-id: u\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"blue\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut chunk))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "closed before the answer");
        answer.extend_from_slice(&chunk[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    // An application-data record header announcing 16 KiB, then its body a
    // byte every 200 ms: the socket is readable five times a second for 20 s.
    let (tcp, _) = tls.get_mut();
    let trickle = [0x17u8, 0x03, 0x03, 0x40, 0x00]
        .into_iter()
        .chain(std::iter::repeat(0u8))
        .take(100);
    let mut closed = false;
    for byte in trickle {
        let mut sink = [0u8; 256];
        match tcp.try_read(&mut sink) {
            Ok(0) => closed = true,
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => closed = true,
            // A close_notify alert, or nothing yet.
            _ => {}
        }
        if closed || tcp.write_all(&[byte]).await.is_err() {
            closed = true;
            break;
        }
        // A slow client, not synchronisation.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(closed, "still open after 20 s of a trickled record");
    proxy.stop().await;
}
