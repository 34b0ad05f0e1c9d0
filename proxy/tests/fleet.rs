//! Fleet mode end to end: a real 3-member etcd cluster on loopback and
//! several `switchyard run` processes sharing its state. Each test skips with
//! a printed reason when `etcd` is not installed, unless
//! SWITCHYARD_REQUIRE_EXTERNAL=1 (set by `.ci/run`, which installs
//! Debian's `etcd-server`).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{call, client, get, temp_dir, Behaviour, Upstream};
use serde_json::{json, Value};
use switchyard_control::bucket::bucket;

// === an etcd cluster ===

/// The `etcd` binary, or `None` after printing why the test is skipped.
fn etcd_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("SWITCHYARD_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("etcd is required (SWITCHYARD_REQUIRE_EXTERNAL=1) but not installed");
        }
        eprintln!("SKIPPED: etcd is not installed (`.ci/run` installs Debian's etcd-server)");
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Member {
    args: Vec<String>,
    client: u16,
    child: Option<Child>,
}

/// A 3-member etcd cluster on loopback; killed on drop.
struct Cluster {
    binary: PathBuf,
    members: Vec<Member>,
    /// Held for its removal when the cluster is dropped.
    _dir: Scratch,
}

/// A test's scratch directory, removed when the test ends: etcd
/// preallocates 120 MB of write-ahead log per member, and every test would
/// otherwise leave its cluster's behind.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        Scratch(temp_dir(tag))
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Cluster {
    /// Starts a cluster, trying again with new ports (up to three times)
    /// when it does not become healthy: ports picked free can be taken by
    /// another test's processes before etcd binds them.
    async fn start() -> Option<Cluster> {
        let binary = etcd_binary()?;
        for attempt in 1..=3 {
            let mut cluster = Cluster::configure(binary.clone());
            for i in 0..3 {
                cluster.start_member(i);
            }
            if cluster.healthy_within(Duration::from_secs(20)).await {
                return Some(cluster);
            }
            eprintln!("etcd cluster not healthy in 20 s (attempt {attempt}); starting another");
            for i in 0..3 {
                cluster.kill_member(i);
            }
        }
        panic!("etcd cluster not healthy in three attempts");
    }

    /// Three members on fresh loopback ports, not started.
    fn configure(binary: PathBuf) -> Cluster {
        let dir = Scratch::new("etcd");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("switchyard-test-{}", fastrand::u64(..));
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let args = vec![
                    format!("--name=m{i}"),
                    format!("--data-dir={}", dir.join(format!("m{i}")).display()),
                    format!("--listen-client-urls=http://127.0.0.1:{client}"),
                    format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                    format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                    format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                    format!("--initial-cluster={}", initial.join(",")),
                    "--initial-cluster-state=new".to_owned(),
                    format!("--initial-cluster-token={token}"),
                    // Loopback: elect in well under a second.
                    "--heartbeat-interval=50".to_owned(),
                    "--election-timeout=500".to_owned(),
                    "--logger=zap".to_owned(),
                    "--log-level=error".to_owned(),
                ];
                Member {
                    args,
                    client: *client,
                    child: None,
                }
            })
            .collect();
        Cluster {
            binary,
            members,
            _dir: dir,
        }
    }

    fn start_member(&mut self, i: usize) {
        let child = Command::new(&self.binary)
            .args(&self.members[i].args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        self.members[i].child = Some(child);
    }

    fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to member `i` (SIGSTOP: silent, its connections
    /// open; SIGCONT: back).
    fn signal(&self, i: usize, signal: nix::sys::signal::Signal) {
        let child = self.members[i].child.as_ref().expect("member running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// Waits (at most 30 s) until a write through the gateway succeeds.
    async fn wait_healthy(&self) {
        assert!(
            self.healthy_within(Duration::from_secs(30)).await,
            "etcd cluster not healthy in 30 s"
        );
    }

    /// Whether a write through the gateway succeeds within `limit`.
    async fn healthy_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            for endpoint in self.endpoints() {
                let (status, _, _) = try_call(
                    "POST",
                    &format!("{endpoint}/v3/kv/put"),
                    r#"{"key":"aGVhbHRo","value":"b2s="}"#,
                )
                .await;
                if status == Some(200) {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Before the scratch directory (a field, dropped after this).
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}

/// An HTTP call that may fail to connect: the status, or `None`.
async fn try_call(method: &str, url: &str, body: &str) -> (Option<u16>, http::HeaderMap, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap();
    let client = common::body_client();
    match tokio::time::timeout(Duration::from_secs(15), client.request(req)).await {
        Ok(Ok(resp)) => {
            use http_body_util::BodyExt;
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (
                Some(parts.status.as_u16()),
                parts.headers,
                String::from_utf8_lossy(&bytes).into_owned(),
            )
        }
        _ => (None, http::HeaderMap::new(), String::new()),
    }
}

// === replicas ===

/// A `switchyard run` process in the fleet; killed on drop.
struct Replica {
    id: String,
    child: Child,
    data: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
}

impl Replica {
    fn start(id: &str, config: &str, dir: &Path) -> Replica {
        let path = dir.join(format!("{id}.yaml"));
        std::fs::write(&path, config).unwrap();
        let (child, data, admin) = common::spawn_run_path(&path, &[]);
        Replica {
            id: id.to_owned(),
            child,
            data,
            admin,
            config: path,
        }
    }

    /// Starts again from the same config file (and state_dir).
    fn restart(&mut self) {
        self.kill();
        let (child, data, admin) = common::spawn_run_path(&self.config, &[]);
        self.child = child;
        self.data = data;
        self.admin = admin;
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.data)
    }

    async fn json(&self, path: &str) -> Value {
        let (status, _, body) = call("GET", &self.admin_url(path), None, &[], "").await;
        assert_eq!(status, 200, "GET {path} on {}: {body}", self.id);
        serde_json::from_str(&body).unwrap()
    }

    async fn version(&self) -> u64 {
        self.json("/v1/state").await["version"].as_u64().unwrap()
    }

    async fn rollout(&self) -> Value {
        self.json("/v1/routes/api/rollout").await
    }

    /// The backend user `user` reaches through this replica.
    async fn backend_of(&self, user: &str) -> String {
        let (status, _, body) = get(&client(), &self.url("/"), &[("x-user-id", user)]).await;
        assert_eq!(status, 200, "user {user} on {}: {body}", self.id);
        body.trim().to_owned()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fleet replica's configuration: route `api` over blue and canary.
fn replica_config(
    id: &str,
    cluster: &Cluster,
    prefix: &str,
    dir: &Path,
    blue: SocketAddr,
    canary: SocketAddr,
    blue_weight: f64,
) -> String {
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let state_dir = dir.join(format!("state-{id}"));
    format!(
        r#"listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
state_dir: {state}
fleet:
  etcd:
    endpoints: [{endpoints}]
    prefix: {prefix}
    request_timeout: 1s
    dial_timeout: 300ms
  replica_id: {id}
  lease_ttl: 2s
  publish_interval: 200ms
routes:
  - name: api
    backends:
      - {{ name: blue, endpoints: ["{blue}"], weight: {blue_weight} }}
      - {{ name: canary, endpoints: ["{canary}"], weight: {canary_weight} }}
"#,
        state = state_dir.display(),
        endpoints = endpoints.join(", "),
        canary_weight = 100.0 - blue_weight,
    )
}

/// A fleet of `n` replicas over one cluster, with its upstreams.
struct Fleet {
    cluster: Cluster,
    replicas: Vec<Replica>,
    blue: Upstream,
    canary: Upstream,
    prefix: String,
    dir: Scratch,
}

impl Fleet {
    async fn start(n: usize, canary: Behaviour) -> Option<Fleet> {
        let cluster = Cluster::start().await?;
        let blue = Upstream::start("blue", Behaviour::Name).await;
        let canary = Upstream::start("canary", canary).await;
        let dir = Scratch::new("fleet");
        let prefix = format!("/switchyard/test-{}", fastrand::u32(..));
        let mut fleet = Fleet {
            cluster,
            replicas: Vec::new(),
            blue,
            canary,
            prefix,
            dir,
        };
        for i in 1..=n {
            fleet.add(&format!("r{i}"), 100.0);
        }
        Some(fleet)
    }

    /// Starts one more replica whose own file says blue has `blue_weight`.
    fn add(&mut self, id: &str, blue_weight: f64) -> &Replica {
        let config = replica_config(
            id,
            &self.cluster,
            &self.prefix,
            &self.dir,
            self.blue.addr,
            self.canary.addr,
            blue_weight,
        );
        self.replicas.push(Replica::start(id, &config, &self.dir));
        self.replicas.last().unwrap()
    }

    /// Waits (at most 10 s) until every running replica serves `version`.
    async fn converge(&self, version: u64) {
        self.converge_within(version, Duration::from_secs(10)).await
    }

    async fn converge_within(&self, version: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        for r in &self.replicas {
            loop {
                let seen = r.version().await;
                if seen >= version {
                    assert_eq!(seen, version, "{} went past {version}", r.id);
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} still at version {seen}, not {version}",
                    r.id
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Users on each side of a split of route `api` with blue at `blue_percent`.
fn users_split(blue_percent: u32, n: usize) -> (Vec<String>, Vec<String>) {
    let cut = blue_percent * 100;
    let (mut blue, mut canary) = (Vec::new(), Vec::new());
    for i in 0.. {
        let user = format!("user-{i}");
        if bucket("api", user.as_bytes()) < cut {
            if blue.len() < n {
                blue.push(user);
            }
        } else if canary.len() < n {
            canary.push(user);
        }
        if blue.len() == n && canary.len() == n {
            break;
        }
    }
    (blue, canary)
}

async fn put(replica: &Replica, path: &str, body: Value) -> (u16, String) {
    let (status, _, text) = call(
        if path.ends_with("/weights") {
            "PUT"
        } else {
            "POST"
        },
        &replica.admin_url(path),
        None,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await;
    (status.as_u16(), text)
}

// === the tests ===

/// Issue 17, 1: a weight change through replica 1 is served by replicas 2
/// and 3, each user reaching the same backend whichever replica answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_through_one_replica_is_served_by_every_replica() {
    let Some(fleet) = Fleet::start(3, Behaviour::Name).await else {
        return;
    };
    let (blue_users, canary_users) = users_split(70, 20);
    // Before: everyone on blue, on every replica.
    for r in &fleet.replicas {
        for user in canary_users.iter().take(5) {
            assert_eq!(r.backend_of(user).await, "blue");
        }
    }
    let (status, body) = put(
        &fleet.replicas[0],
        "/v1/routes/api/weights",
        json!({"blue": 70, "canary": 30}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let version = fleet.replicas[0].version().await;
    fleet.converge(version).await;
    for r in &fleet.replicas {
        for user in &blue_users {
            assert_eq!(r.backend_of(user).await, "blue", "{user} on {}", r.id);
        }
        for user in &canary_users {
            assert_eq!(r.backend_of(user).await, "canary", "{user} on {}", r.id);
        }
    }
    // The audit log, read through another replica, names who took it.
    let events = fleet.replicas[2].json("/v1/events").await;
    let change = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "weights.set")
        .expect("the weight change is audited");
    assert_eq!(change["replica"], "r1");
    assert_eq!(change["actor"], "anonymous");
    // Every replica is listed, with the revision it serves.
    let status = fleet.replicas[1].json("/v1/fleet").await;
    assert_eq!(status["mode"], "fleet");
    assert_eq!(status["store"]["up"], true);
    let ids: Vec<&str> = status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["r1", "r2", "r3"], "{status}");
    // The same through `switchyard ctl fleet`.
    let out = ctl(&fleet.replicas[0], &["fleet"]);
    assert!(out.contains("store: etcd") && out.contains(": up"), "{out}");
    for id in ["r1", "r2", "r3"] {
        assert!(out.contains(id), "{id} missing: {out}");
    }
    let out = ctl(&fleet.replicas[0], &["events"]);
    assert!(out.contains("anonymous@r1"), "{out}");
    // The fleet's metrics: the store is up, every replica is counted and
    // serves the revision it says.
    // (The replica count is taken at each publication: wait for one that
    // saw all three.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, _, metrics) = call(
            "GET",
            &fleet.replicas[1].admin_url("/metrics"),
            None,
            &[],
            "",
        )
        .await;
        if metrics.contains("switchyard_fleet_replicas 3") || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(metrics.contains("switchyard_fleet_store_up 1"), "{metrics}");
    assert!(metrics.contains("switchyard_fleet_replicas 3"), "{metrics}");
    let revision = status["replica"]["revision"].as_i64().unwrap();
    assert!(
        metrics.contains(&format!("switchyard_fleet_revision_applied {revision}")),
        "{metrics}"
    );
}

/// `switchyard ctl --admin <replica> ARGS...`: its stdout (it must succeed).
fn ctl(replica: &Replica, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["ctl", "--admin", &replica.admin_url("")])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Issue 17: `If-Match` is the fleet's version: of two writers holding the
/// same version through different replicas, one wins and one gets 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_through_two_replicas_one_gets_409() {
    let Some(fleet) = Fleet::start(2, Behaviour::Name).await else {
        return;
    };
    let version = fleet.replicas[0].version().await;
    fleet.converge(version).await;
    let tag = format!("\"{version}\"");
    let write = |r: &Replica, blue: u32| {
        let url = r.admin_url("/v1/routes/api/weights");
        let tag = tag.clone();
        async move {
            call(
                "PUT",
                &url,
                None,
                &[("content-type", "application/json"), ("if-match", &tag)],
                json!({"blue": blue, "canary": 100 - blue}).to_string(),
            )
            .await
            .0
            .as_u16()
        }
    };
    let (a, b) = tokio::join!(write(&fleet.replicas[0], 60), write(&fleet.replicas[1], 40));
    let mut statuses = [a, b];
    statuses.sort();
    assert_eq!(statuses, [200, 409]);
    fleet.converge(version + 1).await;
}

/// Issue 17, 2: a replica started mid-rollout serves the current step's
/// weights on its first requests, whatever its own file says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_mid_rollout_serves_the_current_step() {
    let Some(mut fleet) = Fleet::start(3, Behaviour::Name).await else {
        return;
    };
    let spec = json!({
        "strategy": "canary", "stable": "blue", "target": "canary",
        "steps": [{"weight": 30, "hold": "1h"}, {"weight": 100}],
        "analysis": {"interval": "1s", "window": "10s", "min_requests": 1000000},
    });
    let (status, body) = put(&fleet.replicas[1], "/v1/routes/api/rollout", spec).await;
    assert_eq!(status, 201, "{body}");
    let (blue_users, canary_users) = users_split(70, 15);
    // Its own file says canary 0 %.
    let late = fleet.add("r4", 100.0);
    // First requests, no waiting: the current step's split.
    for user in &canary_users {
        assert_eq!(late.backend_of(user).await, "canary", "{user}");
    }
    for user in &blue_users {
        assert_eq!(late.backend_of(user).await, "blue", "{user}");
    }
    let rollout = late.rollout().await;
    assert_eq!(rollout["phase"], "progressing");
    assert_eq!(rollout["weights"]["canary"], 30.0);
}

/// Issue 17, 3: a faulty canary is rolled back fleet-wide, judged on the
/// merged windows: `min_requests` is more than any one replica's canary
/// traffic and less than the fleet's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_merged_traffic_rolls_a_faulty_canary_back() {
    let Some(fleet) = Fleet::start(3, Behaviour::failing(1)).await else {
        return;
    };
    // The rollout first (an analysis never counts traffic from before it
    // started), at 50 %; then the traffic.
    let spec = json!({
        "strategy": "canary", "stable": "blue", "target": "canary",
        "steps": [{"weight": 50, "hold": "1h"}, {"weight": 100}],
        "analysis": {"interval": "1s", "window": "30s", "min_requests": 50,
                      "failure_threshold": 1},
    });
    let (status, body) = put(&fleet.replicas[0], "/v1/routes/api/rollout", spec).await;
    assert_eq!(status, 201, "{body}");
    fleet.converge(fleet.replicas[0].version().await).await;
    // 30 canary users per replica: no replica alone reaches 50, the fleet's
    // 90 does.
    past_start_second(&fleet.replicas[0].rollout().await).await;
    let (blue_users, canary_users) = users_split(50, 30);
    let client = client();
    for r in &fleet.replicas {
        for user in canary_users.iter().chain(&blue_users) {
            let _ = get(&client, &r.url("/"), &[("x-user-id", user)]).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let rollout = loop {
        let rollout = fleet.replicas[2].rollout().await;
        if rollout["phase"] == "rolled-back" {
            break rollout;
        }
        assert!(
            Instant::now() < deadline,
            "not rolled back in 20 s: {rollout}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Judged on more than one replica's canary traffic (30 each): merged.
    let analysis = &rollout["last_analysis"];
    let judged = analysis["target_requests"].as_u64().unwrap();
    assert!((50..=90).contains(&judged), "{rollout}");
    assert!(
        rollout["reason"].as_str().unwrap().contains("error_rate"),
        "{rollout}"
    );
    // The stats say what they cover: this replica's 30 canary requests, or
    // the fleet's 90.
    let local = fleet.replicas[0].json("/v1/routes/api/stats").await;
    assert_eq!(local["scope"], "local");
    assert_eq!(local["backends"][1]["requests"], 30, "{local}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let merged = fleet.replicas[0]
            .json("/v1/routes/api/stats?scope=fleet")
            .await;
        assert_eq!(merged["scope"], "fleet");
        if merged["replicas"] == 3 && merged["backends"][1]["requests"] == 90 {
            break;
        }
        assert!(Instant::now() < deadline, "fleet stats: {merged}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = ctl(&fleet.replicas[0], &["stats", "api", "--fleet"]);
    assert!(out.contains("3 replica(s) merged"), "{out}");
    // Every replica serves blue to the canary's users again.
    fleet.converge(fleet.replicas[2].version().await).await;
    for r in &fleet.replicas {
        assert_eq!(r.backend_of(&canary_users[0]).await, "blue");
    }
    // One rollback, audited once.
    let events = fleet.replicas[1].json("/v1/events").await;
    let rollbacks = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "rollout.rollback")
        .count();
    assert_eq!(rollbacks, 1, "{events}");
}

/// Issue 21: a guarded flag rollout is fleet-wide like a route's. Every
/// replica publishes the flag's cohorts; the leader judges them merged
/// (`min_requests` is more than any one replica's on-cohort traffic and
/// less than the fleet's) and reverts the flag for every replica, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_merged_cohorts_revert_a_faulty_flag() {
    let Some(mut fleet) = Fleet::start(0, Behaviour::FailFlag("new-ui")).await else {
        return;
    };
    // All users on `canary`, which fails the flag's users.
    for i in 1..=3 {
        fleet.add(&format!("r{i}"), 0.0);
    }
    let flag = json!({"name": "new-ui", "rollout_percentage": 0});
    let (status, body) = put_flag(&fleet.replicas[0], &flag).await;
    assert_eq!(status, 201, "{body}");
    let spec = json!({
        "steps": [{"rollout_percentage": 50, "hold": "1h"}, {"rollout_percentage": 100}],
        "analysis": {"interval": "1s", "window": "30s", "min_requests": 50, "failure_threshold": 1},
    });
    let (status, body) = put(&fleet.replicas[1], "/v1/flags/new-ui/rollout", spec).await;
    assert_eq!(status, 201, "{body}");
    fleet.converge(fleet.replicas[1].version().await).await;
    past_start_second(&fleet.replicas[0].json("/v1/flags/new-ui/rollout").await).await;
    // 30 flag users and 30 others per replica: no replica alone has 50 in
    // the on cohort, the fleet's 90 are.
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0.. {
        let user = format!("user-{i}");
        match bucket("new-ui", user.as_bytes()) < 5000 {
            true if on.len() < 30 => on.push(user),
            false if off.len() < 30 => off.push(user),
            _ => {}
        }
        if on.len() == 30 && off.len() == 30 {
            break;
        }
    }
    let client = client();
    for r in &fleet.replicas {
        for user in on.iter().chain(&off) {
            let _ = get(&client, &r.url("/"), &[("x-user-id", user)]).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let rollout = loop {
        let rollout = fleet.replicas[2].json("/v1/flags/new-ui/rollout").await;
        if rollout["phase"] == "rolled-back" {
            break rollout;
        }
        assert!(Instant::now() < deadline, "not reverted in 20 s: {rollout}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let judged = rollout["last_analysis"]["target_requests"]
        .as_u64()
        .unwrap();
    assert!((50..=90).contains(&judged), "judged merged: {rollout}");
    // Every replica serves the flag to nobody again.
    fleet.converge(fleet.replicas[2].version().await).await;
    for r in &fleet.replicas {
        let (status, _, _) = get(&client, &r.url("/"), &[("x-user-id", &on[0])]).await;
        assert_eq!(status, 200, "{} still gives {} the flag", r.id, on[0]);
    }
    let events = fleet.replicas[0].json("/v1/events").await;
    let rollbacks: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "rollout.rollback")
        .collect();
    assert_eq!(rollbacks.len(), 1, "{events}");
    assert_eq!(rollbacks[0]["target"], "flags/new-ui");
}

/// Waits until the wall clock is past the second `rollout` started in: an
/// analysis judges only the whole seconds after it (that second also holds
/// traffic from before the start), so one-off traffic must come later.
async fn past_start_second(rollout: &Value) {
    let started = humantime::parse_rfc3339(rollout["started"].as_str().unwrap()).unwrap();
    let after = started + Duration::from_secs(1);
    if let Ok(wait) = after.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
}

/// Sends requests through every replica until `stop`, counting answers
/// other than 200 (and connections that failed).
fn traffic(
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicU64>, Arc<AtomicU64>) {
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (s, f) = (sent.clone(), failed.clone());
    let task = tokio::spawn(async move {
        let client = client();
        // Bounded: at most 100,000 requests or 120 s.
        let deadline = Instant::now() + Duration::from_secs(120);
        for i in 0..100_000u64 {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let addr = addrs[(i as usize) % addrs.len()];
            let user = format!("user-{}", i % 500);
            let req = http::Request::get(format!("http://{addr}/"))
                .header("x-user-id", &user)
                .body(http_body_util::Empty::new())
                .unwrap();
            s.fetch_add(1, Ordering::Relaxed);
            match client.request(req).await {
                Ok(resp) if resp.status() == 200 => {}
                _ => {
                    f.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    (task, sent, failed)
}

/// Issue 17, 4: the leading replica is SIGKILLed mid-rollout; another takes
/// over within the lease TTL plus an interval and the rollout completes,
/// each step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_rollout_another_completes_it_each_step_once() {
    let Some(mut fleet) = Fleet::start(3, Behaviour::Name).await else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let addrs = fleet.replicas.iter().map(|r| r.data).collect();
    let (load, _, _) = traffic(addrs, stop.clone());
    let spec = json!({
        "strategy": "canary", "stable": "blue", "target": "canary",
        "steps": [{"weight": 10, "hold": "2s"}, {"weight": 20, "hold": "2s"},
                  {"weight": 30, "hold": "2s"}, {"weight": 100}],
        "analysis": {"interval": "1s", "window": "5s", "min_requests": 5},
    });
    let (status, body) = put(&fleet.replicas[0], "/v1/routes/api/rollout", spec).await;
    assert_eq!(status, 201, "{body}");
    // Wait for step 1, then kill whoever leads.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rollout = fleet.replicas[0].rollout().await;
        if rollout["step"].as_u64() >= Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "no step 1 in 30 s: {rollout}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leaders = fleet.replicas[0].json("/v1/fleet").await["leaders"].clone();
    let leader = leaders["api"].as_str().expect("a leader").to_owned();
    let index = fleet.replicas.iter().position(|r| r.id == leader).unwrap();
    fleet.replicas[index].kill();
    let killed_at = Instant::now();
    let killed = fleet.replicas.remove(index);
    drop(killed);
    let survivor = &fleet.replicas[0];
    // Another replica takes over once the dead one's lease (2 s) expires.
    loop {
        let leaders = survivor.json("/v1/fleet").await["leaders"].clone();
        if leaders["api"].as_str().is_some_and(|l| l != leader) {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "no new leader 20 s after the kill: {leaders}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "takeover {:?} after the leader was killed",
        killed_at.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let rollout = survivor.rollout().await;
        if rollout["phase"] == "promoted" {
            break;
        }
        assert_eq!(rollout["phase"], "progressing", "{rollout}");
        assert!(Instant::now() < deadline, "not promoted in 40 s: {rollout}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let events = survivor.json("/v1/events?limit=1000").await;
    let events = events["events"].as_array().unwrap();
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["action"] == "rollout.step")
        .map(|e| e["after"]["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3], "each step once: {events:?}");
    let promotions: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "rollout.promote")
        .collect();
    assert_eq!(promotions.len(), 1);
    // Some step after the kill was taken by another replica.
    let deciders: std::collections::BTreeSet<&str> = events
        .iter()
        .filter(|e| e["action"] == "rollout.step" || e["action"] == "rollout.promote")
        .map(|e| e["replica"].as_str().unwrap())
        .collect();
    assert!(
        deciders.iter().any(|d| *d != leader),
        "only {leader} decided: {deciders:?}"
    );
}

/// Issue 17, 5: two of three etcd members killed under load, a rollout
/// under way: no request fails, writes answer 503, the rollout holds its
/// step (no leader, no decision); members back: writes succeed, the rollout
/// carries on to promotion, and every replica converges on one version and
/// revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_under_load_costs_no_request_and_writes_503() {
    let Some(mut fleet) = Fleet::start(3, Behaviour::Name).await else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let addrs = fleet.replicas.iter().map(|r| r.data).collect();
    let (load, sent, failed) = traffic(addrs, stop.clone());
    // Short holds: without the outage it would move a step every second or two.
    let steps: Vec<Value> = [10, 20, 30, 40, 50, 60]
        .iter()
        .map(|w| json!({"weight": w, "hold": "1s"}))
        .chain([json!({"weight": 100})])
        .collect();
    let spec = json!({
        "strategy": "canary", "stable": "blue", "target": "canary", "steps": steps,
        "analysis": {"interval": "1s", "window": "5s", "min_requests": 3},
    });
    let (status, body) = put(&fleet.replicas[0], "/v1/routes/api/rollout", spec).await;
    assert_eq!(status, 201, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // (r3 may not have the rollout yet: a 404 until it does.)
        let (_, _, body) = call(
            "GET",
            &fleet.replicas[2].admin_url("/v1/routes/api/rollout"),
            None,
            &[],
            "",
        )
        .await;
        let rollout: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if rollout["step"].as_u64() >= Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the rollout never moved: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.cluster.kill_member(0);
    fleet.cluster.kill_member(1);
    let flag = json!({"name": "quorum", "enabled": true, "rollout_percentage": 100});
    let (status, body) = put_flag(&fleet.replicas[2], &flag).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store_unavailable"), "{body}");
    // The rollout holds: watched for 4 s after any decision in flight has
    // had its 1.5 s to fail.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = fleet.replicas[2].rollout().await;
    let observed = Instant::now();
    while observed.elapsed() < Duration::from_secs(4) {
        for r in &fleet.replicas {
            let now = r.rollout().await;
            assert_eq!(
                (&now["step"], &now["phase"]),
                (&held["step"], &held["phase"]),
                "{} moved without etcd",
                r.id
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing changed anywhere, and every replica stays ready.
    for r in &fleet.replicas {
        let (status, _, _) = call("GET", &r.admin_url("/v1/flags/quorum"), None, &[], "").await;
        assert_eq!(status, 404, "{}", r.id);
        let (ready, _, _) = call("GET", &r.admin_url("/health/ready"), None, &[], "").await;
        assert_eq!(ready, 200, "{} stays ready", r.id);
    }
    fleet.cluster.start_member(0);
    fleet.cluster.start_member(1);
    fleet.cluster.wait_healthy().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = put_flag(&fleet.replicas[2], &flag).await;
        if status == 200 || status == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes still failing: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The rollout resumes where it held, and completes.
    let deadline = Instant::now() + Duration::from_secs(40);
    for r in &fleet.replicas {
        loop {
            let rollout = r.rollout().await;
            if rollout["phase"] == "promoted" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: not promoted: {rollout}",
                r.id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let version = fleet.replicas[2].version().await;
    fleet.converge(version).await;
    // One version is one etcd revision: every replica names the same.
    let mut revisions = Vec::new();
    for r in &fleet.replicas {
        revisions.push(
            r.json("/v1/fleet").await["replica"]["revision"]
                .as_i64()
                .unwrap(),
        );
    }
    assert!(
        revisions.iter().all(|r| *r == revisions[0] && *r > 0),
        "{revisions:?}"
    );
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(sent.load(Ordering::Relaxed) > 100);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed data-plane requests"
    );
}

async fn put_flag(replica: &Replica, flag: &Value) -> (u16, String) {
    let name = flag["name"].as_str().unwrap();
    let (status, _, body) = call(
        "PUT",
        &replica.admin_url(&format!("/v1/flags/{name}")),
        None,
        &[("content-type", "application/json")],
        flag.to_string(),
    )
    .await;
    (status.as_u16(), body)
}

/// Issue 17, 6: etcd fully down and a replica restarted: it serves the
/// state it cached, and says the store is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_without_etcd_serves_its_cache() {
    let Some(mut fleet) = Fleet::start(1, Behaviour::Name).await else {
        return;
    };
    let (status, body) = put(
        &fleet.replicas[0],
        "/v1/routes/api/weights",
        json!({"blue": 0, "canary": 100}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let version = fleet.replicas[0].version().await;
    // The cache is written just after the change is served: wait for it.
    let cache = fleet.dir.join("state-r1").join("state.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cached: Option<Value> = std::fs::read(&cache)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if cached.is_some_and(|c| c["version"] == version) {
            break;
        }
        assert!(Instant::now() < deadline, "no cache of version {version}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..3 {
        fleet.cluster.kill_member(i);
    }
    fleet.replicas[0].restart();
    let r = &fleet.replicas[0];
    assert_eq!(r.backend_of("anyone").await, "canary");
    assert_eq!(r.version().await, version);
    let (status, _, _) = call("GET", &r.admin_url("/health/ready"), None, &[], "").await;
    assert_eq!(status, 200);
    let status = r.json("/v1/fleet").await;
    assert_eq!(status["store"]["up"], false, "{status}");
    let (status, body) = put(r, "/v1/routes/api/weights", json!({"blue": 100})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(r.backend_of("anyone").await, "canary");
}

/// `switchyard check` says where the state lives and who wins; a wrong
/// fleet field exits 64 naming it. (No etcd needed: nothing connects.)
#[test]
fn check_says_etcd_is_the_truth_and_names_wrong_fields() {
    let dir = Scratch::new("fleet-check");
    let path = dir.join("fleet.yaml");
    let base = "routes:\n  - name: api\n    backends:\n      - { name: blue, endpoints: [\"127.0.0.1:1\"], weight: 100 }\n";
    std::fs::write(
        &path,
        format!("{base}fleet:\n  etcd: {{ endpoints: [\"http://127.0.0.1:1\"], prefix: /switchyard/x }}\n  replica_id: r9\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("fleet: replica `r9`, state in etcd under /switchyard/x")
            && stdout.contains("after that etcd is the truth"),
        "{stdout}"
    );
    std::fs::write(
        &path,
        format!(
            "{base}fleet:\n  etcd: {{ endpoints: [\"http://127.0.0.1:1\"], prefix: switchyard }}\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fleet.etcd.prefix"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// A standalone proxy says so, and exports no fleet metrics for an alert
/// to misread.
#[tokio::test]
async fn a_standalone_proxy_has_no_fleet() {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let proxy = common::Running::start(&common::config("", &[("blue", blue.addr, 100.0)])).await;
    let (status, _, body) = call(
        "GET",
        &format!("http://{}/v1/fleet", proxy.admin),
        None,
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["mode"], "standalone");
    let (_, _, metrics) = call(
        "GET",
        &format!("http://{}/metrics", proxy.admin),
        None,
        &[],
        "",
    )
    .await;
    assert!(metrics.contains("switchyard_requests_total"));
    assert!(!metrics.contains("switchyard_fleet_"), "{metrics}");
    let (status, _, body) = call(
        "GET",
        &format!("http://{}/v1/routes/api/stats?scope=fleet", proxy.admin),
        None,
        &[],
        "",
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("not_a_fleet"), "{body}");
    let (status, _, body) = call(
        "GET",
        &format!(
            "http://{}/v1/routes/api/stats?scope=everywhere",
            proxy.admin
        ),
        None,
        &[],
        "",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    proxy.stop().await;
}

/// Kills the child on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TLS between replicas and etcd: a member that requires client
/// certificates, a replica with the fleet's CA and its client certificate;
/// a replica without a client certificate is refused and writes 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reaches_etcd_over_mutual_tls() {
    let Some(etcd) = etcd_binary() else {
        return;
    };
    let dir = Scratch::new("etcd-tls");
    let ca = common::certs::Ca::new("switchyard etcd test CA");
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (server_crt, server_key) = ca
        .leaf(&["127.0.0.1", "localhost"], 30)
        .write(&dir, "server");
    let (client_crt, client_key) = ca.leaf(&["r1"], 30).write(&dir, "client");
    let (client, peer) = (free_port(), free_port());
    let _member = Killed(
        Command::new(etcd)
            .args([
                "--name=tls".to_owned(),
                format!("--data-dir={}", dir.join("member").display()),
                format!("--listen-client-urls=https://127.0.0.1:{client}"),
                format!("--advertise-client-urls=https://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster=tls=http://127.0.0.1:{peer}"),
                format!("--cert-file={}", server_crt.display()),
                format!("--key-file={}", server_key.display()),
                format!("--trusted-ca-file={}", ca_file.display()),
                "--client-cert-auth".to_owned(),
                "--logger=zap".to_owned(),
                "--log-level=error".to_owned(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts"),
    );
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let config = |id: &str, tls: &str| {
        format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nfleet:\n  etcd: {{ endpoints: [\"https://127.0.0.1:{client}\"], prefix: /switchyard/tls, {tls} }}\n  replica_id: {id}\nroutes:\n  - name: api\n    backends:\n      - {{ name: blue, endpoints: [\"{}\"], weight: 100 }}\n",
            blue.addr
        )
    };
    let trusted = Replica::start(
        "r1",
        &config(
            "r1",
            &format!(
                "tls: {{ ca: \"{}\", cert: \"{}\", key: \"{}\" }}",
                ca_file.display(),
                client_crt.display(),
                client_key.display()
            ),
        ),
        &dir,
    );
    // etcd may still be starting: the replica resyncs by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = trusted.json("/v1/fleet").await;
        if status["store"]["up"] == true
            && status["replicas"].as_array().is_some_and(|r| !r.is_empty())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reached etcd over TLS: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = put(&trusted, "/v1/routes/api/weights", json!({"blue": 100})).await;
    assert_eq!(status, 200, "{body}");
    let anonymous = Replica::start(
        "r2",
        &config("r2", &format!("tls: {{ ca: \"{}\" }}", ca_file.display())),
        &dir,
    );
    let (status, body) = put(&anonymous, "/v1/routes/api/weights", json!({"blue": 100})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(anonymous.json("/v1/fleet").await["store"]["up"], false);
    // It still serves.
    assert_eq!(anonymous.backend_of("someone").await, "blue");
}

/// etcd's own authentication: a replica with the user's password file
/// writes; one with a wrong password is refused, keeps serving and says
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_authenticates_to_etcd_with_a_password_file() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let endpoint = cluster.endpoints()[0].clone();
    for (path, body) in [
        ("/v3/auth/role/add", r#"{"name":"root"}"#),
        (
            "/v3/auth/user/add",
            r#"{"name":"root","password":"s3cret"}"#,
        ),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/enable", "{}"),
    ] {
        let (status, _, text) = try_call("POST", &format!("{endpoint}{path}"), body).await;
        assert_eq!(status, Some(200), "{path}: {text}");
    }
    let dir = Scratch::new("etcd-auth");
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let config = |id: &str, password: &str| {
        let file = dir.join(format!("{id}.password"));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nfleet:\n  etcd: {{ endpoints: [\"{endpoint}\"], prefix: /switchyard/auth, username: root, password_file: \"{}\" }}\n  replica_id: {id}\nroutes:\n  - name: api\n    backends:\n      - {{ name: blue, endpoints: [\"{}\"], weight: 100 }}\n",
            file.display(),
            blue.addr
        )
    };
    let good = Replica::start("r1", &config("r1", "s3cret"), &dir);
    let (status, body) = put(&good, "/v1/routes/api/weights", json!({"blue": 100})).await;
    assert_eq!(status, 200, "{body}");
    let bad = Replica::start("r2", &config("r2", "wrong"), &dir);
    let (status, body) = put(&bad, "/v1/routes/api/weights", json!({"blue": 100})).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("authentication failed"), "{body}");
    assert_eq!(bad.backend_of("someone").await, "blue");
}

/// A member that goes silent without closing its connections (a frozen VM):
/// a replica whose watch hangs on it sees that etcd's state is ahead of what
/// it serves and watches through another member. Each member is silenced in
/// turn, so every replica's watch member is silenced once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_member_leaves_no_replica_behind() {
    use nix::sys::signal::Signal;
    let Some(fleet) = Fleet::start(3, Behaviour::Name).await else {
        return;
    };
    for member in 0..3 {
        fleet.cluster.signal(member, Signal::SIGSTOP);
        let blue = 40 + member as u32 * 10;
        let writer = &fleet.replicas[member];
        // A write while the silenced member was etcd's leader may meet the
        // election (a 503 that says so): a later one goes through (on a
        // loaded CI machine the election can take several seconds).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = put(
                writer,
                "/v1/routes/api/weights",
                json!({"blue": blue, "canary": 100 - blue}),
            )
            .await;
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "member {member} silent: {body}");
            assert!(Instant::now() < deadline, "member {member} silent: {body}");
        }
        let version = writer.version().await;
        // Noticed within two publications once a publication gets through
        // (a request to the silent member costs request_timeout first).
        fleet
            .converge_within(version, Duration::from_secs(20))
            .await;
        fleet.cluster.signal(member, Signal::SIGCONT);
    }
}

/// A replica frozen while the fleet's state moves on and etcd compacts the
/// history its watch still needs (a pod paused, a node under memory
/// pressure): when it wakes, its lease is gone and its watch is stalled or
/// ended by the compaction; it reloads, serves the current state and joins
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_frozen_past_a_compaction_catches_up() {
    use nix::sys::signal::{kill, Signal};
    let Some(fleet) = Fleet::start(2, Behaviour::Name).await else {
        return;
    };
    // A large state (a flag with 9,000 long-named overrides, some 500 KB)
    // makes each change's watch event large.
    let overrides: serde_json::Map<String, Value> = (0..9_000)
        .map(|i| {
            (
                format!("a-rather-long-user-identifier-of-someone-{i:06}"),
                json!(i % 2 == 0),
            )
        })
        .collect();
    let flag =
        json!({"name": "big", "enabled": true, "rollout_percentage": 0, "overrides": overrides});
    let (status, body) = put_flag(&fleet.replicas[0], &flag).await;
    assert!(status == 200 || status == 201, "{body}");
    let frozen = nix::unistd::Pid::from_raw(fleet.replicas[1].child.id() as i32);
    kill(frozen, Signal::SIGSTOP).unwrap();
    // Far more than etcd and the sockets between buffer for a watcher that
    // does not read: etcd gives up on it and, after the compaction, can only
    // tell it that its history is gone.
    for i in 0..40u32 {
        let blue = 40 + i % 20;
        let (status, body) = put(
            &fleet.replicas[0],
            "/v1/routes/api/weights",
            json!({"blue": blue, "canary": 100 - blue}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let version = fleet.replicas[0].version().await;
    let endpoint = &fleet.cluster.endpoints()[0];
    let (_, _, head) = try_call(
        "POST",
        &format!("{endpoint}/v3/kv/range"),
        r#"{"key":"aGVhbHRo"}"#,
    )
    .await;
    let revision = serde_json::from_str::<Value>(&head).unwrap()["header"]["revision"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _, body) = try_call(
        "POST",
        &format!("{endpoint}/v3/kv/compaction"),
        &format!(r#"{{"revision":"{revision}","physical":true}}"#),
    )
    .await;
    assert_eq!(status, Some(200), "{body}");
    kill(frozen, Signal::SIGCONT).unwrap();
    fleet.converge(version).await;
    // And it takes part again: its membership is back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = fleet.replicas[0].json("/v1/fleet").await;
        let ids: Vec<&str> = status["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str())
            .collect();
        if ids == ["r1", "r2"] {
            break;
        }
        assert!(Instant::now() < deadline, "r2 not back: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
