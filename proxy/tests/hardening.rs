//! Issue 19: fail safe when the client, the admin port or the disk
//! misbehaves. (So far: Host discipline.)

mod common;

use common::{raw_exchange, Behaviour, Running, Upstream};

/// RFC 9112 §3.2: a missing (HTTP/1.1), empty, duplicated or malformed Host
/// is a 400, never routed or forwarded; nginx answers the same.
#[tokio::test]
async fn bad_host_headers_are_refused_and_never_forwarded() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let yaml = format!(
        "routes:\n  - name: a\n    match: {{ host: a.example }}\n    backends:\n      - {{ name: blue, endpoints: [\"{}\"], weight: 100 }}\n  - name: any\n    backends:\n      - {{ name: blue, endpoints: [\"{}\"], weight: 100 }}\n",
        blue.addr, blue.addr
    );
    let proxy = Running::start(&yaml).await;
    for (head, why) in [
        ("GET / HTTP/1.1\r\n", "no Host"),
        (
            "GET / HTTP/1.1\r\nHost: a.example\r\nHost: evil.example\r\n",
            "two Hosts",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a.example:80@evil.example\r\n",
            "userinfo",
        ),
        ("GET / HTTP/1.1\r\nHost: \r\n", "empty"),
        ("GET / HTTP/1.1\r\nHost: a example\r\n", "a space"),
        ("GET / HTTP/1.1\r\nHost: a.example:99999\r\n", "a bad port"),
    ] {
        let answer = raw_exchange(
            proxy.addr,
            format!("{head}Connection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{why}: {answer}");
    }
    assert_eq!(
        blue.arrived.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "none was forwarded"
    );
    // HTTP/1.0 may go without Host; a good one is routed.
    let answer = raw_exchange(proxy.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
        "{answer}"
    );
    let answer = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a.example:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    proxy.stop().await;
}
