//! The sticky weighted split, end to end: real upstreams, the proxy's `run()`
//! on ephemeral ports, a real hyper client.

mod common;

use std::collections::HashMap;

use common::{backend_of, client, config, Behaviour, Running, Upstream};
use switchyard_control::bucket::bucket;

async fn three() -> (Upstream, Upstream, Upstream) {
    (
        Upstream::start("blue", Behaviour::Name).await,
        Upstream::start("green", Behaviour::Name).await,
        Upstream::start("canary", Behaviour::Name).await,
    )
}

/// Three upstreams behind a 34/33/33 split.
async fn even_three() -> ((Upstream, Upstream, Upstream), Running) {
    let (blue, green, canary) = three().await;
    let weights = [
        ("blue", blue.addr, 34.0),
        ("green", green.addr, 33.0),
        ("canary", canary.addr, 33.0),
    ];
    let proxy = Running::start(&config("", &weights)).await;
    ((blue, green, canary), proxy)
}

/// Sends one request per user, 16 at a time; returns user → backend.
async fn assign(proxy: &Running, users: &[String]) -> HashMap<String, String> {
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in users.chunks(users.len().div_ceil(16)) {
        let chunk = chunk.to_vec();
        let url = proxy.url("/");
        tasks.spawn(async move {
            let client = client();
            let mut out = Vec::with_capacity(chunk.len());
            for user in chunk {
                let (status, _, body) = common::get(&client, &url, &[("x-user-id", &user)]).await;
                assert_eq!(status, 200, "{user}: {body}");
                out.push((user, body.trim().to_owned()));
            }
            out
        });
    }
    let mut all = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ninety_ten_split_over_20000_users_is_within_one_point() {
    let (blue, _green, canary) = three().await;
    let proxy = Running::start(&config(
        "",
        &[("blue", blue.addr, 90.0), ("canary", canary.addr, 10.0)],
    ))
    .await;
    let users: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
    let got = assign(&proxy, &users).await;
    let on_canary = got.values().filter(|b| *b == "canary").count();
    let pct = on_canary as f64 * 100.0 / users.len() as f64;
    assert!((9.0..=11.0).contains(&pct), "canary got {pct:.2}% of users");
    // And exactly the users whose bucket is in canary's range [9000, 10000).
    for (user, backend) in &got {
        let want = if bucket("api", user.as_bytes()) >= 9000 {
            "canary"
        } else {
            "blue"
        };
        assert_eq!(backend, want, "{user}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_user_always_reaches_the_same_backend() {
    let (_upstreams, proxy) = even_three().await;
    let c = client();
    for user in ["alice", "bob", "carol", "dave", "user-123"] {
        let first = backend_of(&c, &proxy, user).await;
        for _ in 0..25 {
            assert_eq!(backend_of(&c, &proxy, user).await, first, "{user} moved");
        }
    }
    proxy.stop().await;
}

/// The published vectors, through the proxy: with blue 90 / canary 10 on route
/// `api`, alice (bucket 897) and user-123 (7011) are on blue, bob (9471) on canary.
#[tokio::test]
async fn published_vectors_hold_through_the_proxy() {
    let (blue, _green, canary) = three().await;
    let proxy = Running::start(&config(
        "",
        &[("blue", blue.addr, 90.0), ("canary", canary.addr, 10.0)],
    ))
    .await;
    let c = client();
    assert_eq!(backend_of(&c, &proxy, "alice").await, "blue");
    assert_eq!(backend_of(&c, &proxy, "user-123").await, "blue");
    assert_eq!(backend_of(&c, &proxy, "bob").await, "canary");
    proxy.stop().await;
}

/// Raising the canary 5 → 25 → 100 on a live proxy never moves a user off it,
/// and the request right after the change sees the new weights (no sleep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_canary_weight_live_keeps_its_users() {
    let (blue, green, canary) = three().await;
    let yaml = config(
        "",
        &[
            ("blue", blue.addr, 90.0),
            ("green", green.addr, 5.0),
            ("canary", canary.addr, 5.0),
        ],
    );
    let proxy = Running::start(&yaml).await;
    let users: Vec<String> = (0..2_000).map(|i| format!("u{i}")).collect();

    let mut on_canary: Vec<String> = Vec::new();
    for (step, weights) in [
        [("blue", 90.0), ("green", 5.0), ("canary", 5.0)],
        [("blue", 70.0), ("green", 5.0), ("canary", 25.0)],
        [("blue", 0.0), ("green", 0.0), ("canary", 100.0)],
    ]
    .iter()
    .enumerate()
    {
        proxy.handle.set_weights("api", weights).await.unwrap();
        let got = assign(&proxy, &users).await;
        for user in &on_canary {
            assert_eq!(got[user], "canary", "step {step}: {user} left the canary");
        }
        on_canary = got
            .iter()
            .filter(|(_, b)| *b == "canary")
            .map(|(u, _)| u.clone())
            .collect();
        let share = on_canary.len() as f64 / users.len() as f64 * 100.0;
        let want = weights[2].1;
        assert!(
            (share - want).abs() <= 2.5,
            "step {step}: canary has {share:.1}%, weight {want}"
        );
    }
    assert_eq!(on_canary.len(), users.len());
    proxy.stop().await;
}

#[tokio::test]
async fn rejected_weight_change_changes_nothing() {
    let (blue, _green, canary) = three().await;
    let proxy = Running::start(&config(
        "",
        &[("blue", blue.addr, 90.0), ("canary", canary.addr, 10.0)],
    ))
    .await;
    let before: Vec<u32> = proxy.handle.snapshot().routes[0]
        .backends
        .iter()
        .map(|b| b.weight.basis_points())
        .collect();
    assert!(proxy
        .handle
        .set_weights("api", &[("blue", 50.0), ("canary", 10.0)])
        .await
        .is_err());
    assert!(proxy
        .handle
        .set_weights("api", &[("blue", 50.0), ("purple", 50.0)])
        .await
        .is_err());
    assert!(proxy
        .handle
        .set_weights("nope", &[("blue", 100.0)])
        .await
        .is_err());
    let after: Vec<u32> = proxy.handle.snapshot().routes[0]
        .backends
        .iter()
        .map(|b| b.weight.basis_points())
        .collect();
    assert_eq!(before, after);
    assert_eq!(backend_of(&client(), &proxy, "bob").await, "canary");
    proxy.stop().await;
}

#[tokio::test]
async fn anonymous_cookie_makes_users_stick() {
    let (_upstreams, proxy) = even_three().await;
    let c = client();
    for _ in 0..10 {
        let (_, headers, first) = common::get(&c, &proxy.url("/"), &[]).await;
        let set = headers["set-cookie"].to_str().unwrap();
        let pair = set.split(';').next().unwrap().to_owned();
        for _ in 0..5 {
            let (_, again_headers, again) =
                common::get(&c, &proxy.url("/"), &[("cookie", &pair)]).await;
            assert_eq!(again, first, "cookie {pair} moved");
            assert!(!again_headers.contains_key("set-cookie"));
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn forced_backend_header_reaches_a_zero_weight_backend() {
    let (blue, _green, canary) = three().await;
    let extra = "forced_backend_header: x-switchyard-backend";
    let proxy = Running::start(&config(
        extra,
        &[("blue", blue.addr, 100.0), ("canary", canary.addr, 0.0)],
    ))
    .await;
    let c = client();
    let (status, _, body) =
        common::get(&c, &proxy.url("/"), &[("x-switchyard-backend", "canary")]).await;
    assert_eq!((status.as_u16(), body.trim()), (200, "canary"));
    let (status, _, body) =
        common::get(&c, &proxy.url("/"), &[("x-switchyard-backend", "purple")]).await;
    assert_eq!(status, 400);
    assert!(body.contains("unknown backend"), "{body}");
    proxy.stop().await;
}
