//! The Kubernetes manifests (`manifests/`) against the proxy they deploy:
//! every shipped config passes `switchyard check` (a TLS config with a
//! certificate made here in place of its Secret); every metric, label and
//! label value the alerts and the dashboard use is one a running proxy
//! exports; and the rendered Deployments' ports, probes, token variables,
//! `state_dir` volume and stop timing match their config and the admin
//! listener's real endpoints, and the edge gateway's TLS port and Secret
//! match its TLS listener. The fleet overlays' configs are their standalone
//! overlays' plus `fleet:`, and what that block names (etcd members, client
//! certificate, replica id) is what the rendered objects provide.
//!
//! Rendering needs `kubectl` (its built-in kustomize): `SWITCHYARD_KUBECTL`
//! or `kubectl` on the PATH. Without it that test prints `SKIPPED: ...` and
//! passes, unless `SWITCHYARD_REQUIRE_KUBECTL=1` (set by `.ci/manifests`,
//! which installs a pinned kubectl).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::certs::{tls_yaml, Ca};
use common::{call, client, get, Behaviour, Running, Upstream};
use serde_json::{json, Value};
use switchyard_control::admin::OPEN_ENDPOINTS;
use switchyard_control::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
/// A stand-in for the admin token Secret: long enough for `check`.
const TOKEN: &str = "manifests-test-token-0123456789abcdef";
/// Where the edge gateway mounts its TLS Secret (`kubernetes.io/tls`:
/// `tls.crt`, `tls.key`) and its config reads them. Not on this machine:
/// `with_test_certificate` puts a certificate made here in its place.
const TLS_DIR: &str = "/etc/switchyard/tls/";
/// Where components/fleet mounts the etcd client Secret (`ca.crt`,
/// `tls.crt`, `tls.key`) and `fleet.etcd.tls` reads it. Not on this machine:
/// `with_test_etcd_certificate` puts files made here in its place.
const ETCD_TLS_DIR: &str = "/etc/switchyard/etcd/";
/// Each standalone overlay and its fleet variant: the same config, plus
/// `fleet:` in the fleet one.
const FLEET_OVERLAYS: &[(&str, &str)] = &[
    ("overlays/sidecar", "overlays/sidecar-fleet"),
    ("overlays/edge-gateway", "overlays/edge-gateway-fleet"),
];
/// Labels Prometheus adds from the scraped pod (PodMonitor), not exported by
/// the proxy itself.
const TARGET_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "container",
    "endpoint",
    "job",
    "instance",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the proxy crate is in the workspace")
        .to_owned()
}

fn manifests() -> PathBuf {
    repo().join("manifests")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML stream, empty ones left out.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{what}: not YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn yaml_file(path: &Path) -> Value {
    let mut docs = yaml_docs(&read(path), &path.display().to_string());
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

fn array_at<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// `switchyard check --config PATH` with `envs` set (and nothing inherited
/// that could name a token). `POD_NAME` is set as components/fleet sets it
/// in a pod: a fleet config's replica id, which would otherwise be this
/// machine's host name.
fn check(path: &Path, envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["check", "--config"]).arg(path);
    cmd.env_remove("SWITCHYARD_ADMIN_TOKEN");
    cmd.env("POD_NAME", "switchyard-manifests-test-0");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run switchyard check")
}

/// `text`, the config `config` was parsed from, ready for `switchyard check`
/// here: the TLS files it names under [`TLS_DIR`] point into `dir` instead,
/// where a certificate made now (rcgen) is written as `tls.crt` and
/// `tls.key`, the keys of a `kubernetes.io/tls` Secret. So a config naming
/// any other file still fails the check. Without `tls`, `text` as it is.
fn with_test_certificate(text: &str, config: &Config, dir: &Path) -> String {
    if config.tls.is_none() {
        return text.to_owned();
    }
    Ca::new("manifests test CA")
        .leaf(&["switchyard.example.com"], 90)
        .write(dir, "tls");
    let rewritten = text.replace(TLS_DIR, &format!("{}/", dir.display()));
    let tls = Config::from_yaml(&rewritten)
        .expect("the rewritten config is valid")
        .tls
        .unwrap();
    for c in &tls.certificates {
        assert!(
            c.cert.starts_with(dir) && c.key.starts_with(dir),
            "{c:?}: TLS files outside {TLS_DIR}, where the Secret is mounted"
        );
    }
    rewritten
}

/// `text` ready for `switchyard check` here, if it is a fleet config whose
/// etcd client files are under [`ETCD_TLS_DIR`]: they point into
/// `dir/etcd` instead, where a CA (`ca.crt`) and a client certificate it
/// signed (`tls.crt`, `tls.key`) made now are written, the keys of the
/// Secret `switchyard-etcd-tls`. Otherwise `text` as it is. (Text, not
/// `Config`, so that it stays independent of how `check` treats them.)
fn with_test_etcd_certificate(text: &str, dir: &Path) -> String {
    if !text.contains(ETCD_TLS_DIR) {
        return text.to_owned();
    }
    let etcd = dir.join("etcd");
    std::fs::create_dir_all(&etcd).unwrap();
    let ca = Ca::new("manifests etcd test CA");
    std::fs::write(etcd.join("ca.crt"), &ca.pem).unwrap();
    // Not the edge certificate's name: `check` output naming it stays the
    // edge gateway's.
    ca.leaf(&["switchyard-etcd-client.test"], 90)
        .write(&etcd, "tls");
    text.replace(ETCD_TLS_DIR, &format!("{}/", etcd.display()))
}

/// The config files that kustomizations put into the `switchyard-config`
/// ConfigMap, found through every kustomization.yaml under manifests/.
fn shipped_configs() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![manifests()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
                let k = yaml_file(&path);
                for generator in array_at(&k, "/configMapGenerator") {
                    if generator["name"] == "switchyard-config" {
                        for file in array_at(generator, "/files") {
                            let file = file.as_str().unwrap();
                            // `key=path` or just `path`.
                            let file = file.split_once('=').map_or(file, |(_, p)| p);
                            found.push(dir.join(file));
                        }
                    }
                }
            }
        }
    }
    found.sort();
    found
}

// === configs ===

#[test]
fn every_shipped_config_passes_switchyard_check() {
    let configs = shipped_configs();
    let names: Vec<String> = configs
        .iter()
        .map(|p| p.strip_prefix(manifests()).unwrap().display().to_string())
        .collect();
    for expected in [
        "base/switchyard.yaml",
        "overlays/sidecar/switchyard.yaml",
        "overlays/edge-gateway/switchyard.yaml",
        "overlays/sidecar-fleet/switchyard.yaml",
        "overlays/edge-gateway-fleet/switchyard.yaml",
    ] {
        assert!(
            names.contains(&expected.to_owned()),
            "switchyard-config generator for {expected} not found: {names:?}"
        );
    }
    let mut with_tls = 0;
    for path in &configs {
        let config = Config::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let token_vars: Vec<&str> = config
            .admin
            .tokens
            .iter()
            .filter_map(|t| t.env.as_deref())
            .collect();
        let envs: Vec<(&str, &str)> = token_vars.iter().map(|v| (*v, TOKEN)).collect();
        // A copy, with test certificates where the TLS Secrets would be.
        let dir = common::temp_dir("manifests");
        let checked = dir.join(path.file_name().unwrap());
        let text = with_test_certificate(&read(path), &config, &dir);
        std::fs::write(&checked, with_test_etcd_certificate(&text, &dir)).unwrap();
        let out = check(&checked, &envs);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(": ok ("),
            "{}: {stdout}{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // `check` read and verified the certificate: it names its expiry.
        assert_eq!(
            stdout.contains("tls.crt: [switchyard.example.com] expires in"),
            config.tls.is_some(),
            "{}: {stdout}",
            path.display()
        );

        // In a pod the admin listener must take the kubelet's probes and
        // Prometheus' scrapes, so it is not on loopback, so it has a token:
        // and `check` really reads it.
        assert!(
            !config.admin.listen.ip().is_loopback() && !token_vars.is_empty(),
            "{}: admin {} with token variables {token_vars:?}",
            path.display(),
            config.admin.listen
        );
        let out = check(&checked, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{}: {stderr}", path.display());
        assert!(stderr.contains("admin.tokens[0].env"), "{stderr}");

        // And without the TLS Secret's files (as here, outside a pod), the
        // shipped TLS config fails the check on them (the etcd client
        // files, if any, are the test's, so only the TLS ones are missing).
        if let Some(tls) = &config.tls {
            with_tls += 1;
            if !tls.certificates[0].cert.exists() {
                let unrewritten = dir.join(format!(
                    "without-tls-{}",
                    checked.file_name().unwrap().to_string_lossy()
                ));
                std::fs::write(&unrewritten, with_test_etcd_certificate(&read(path), &dir))
                    .unwrap();
                let out = check(&unrewritten, &envs);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(64), "{}: {stderr}", path.display());
                assert!(stderr.contains("tls.certificates[0]"), "{stderr}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    assert!(with_tls > 0, "no shipped config terminates TLS");
}

/// Each fleet overlay's config is its standalone overlay's plus `fleet:`
/// (so the two never drift apart), and its `fleet:` block is the shape the
/// manifests rely on: TLS to etcd from the mounted client Secret, the
/// replica id left to `$POD_NAME`, a prefix of its own.
#[test]
fn fleet_configs_are_their_standalone_configs_plus_fleet() {
    let mut prefixes = BTreeSet::new();
    for (standalone, fleet) in FLEET_OVERLAYS {
        let plain = yaml_file(&manifests().join(standalone).join("switchyard.yaml"));
        let mut with_fleet = yaml_file(&manifests().join(fleet).join("switchyard.yaml"));
        assert!(
            plain.get("fleet").is_none(),
            "{standalone}: `fleet:` in a standalone config"
        );
        let block = with_fleet
            .as_object_mut()
            .and_then(|m| m.remove("fleet"))
            .unwrap_or_else(|| panic!("{fleet}: no `fleet:` block"));
        assert_eq!(
            with_fleet, plain,
            "{fleet}/switchyard.yaml is not {standalone}/switchyard.yaml plus `fleet:`"
        );
        // The cache for a start without etcd.
        assert!(
            plain.get("state_dir").is_some(),
            "{standalone}: no state_dir"
        );

        assert!(
            block.get("replica_id").is_none(),
            "{fleet}: replica_id set; each pod is named by $POD_NAME"
        );
        let endpoints = array_at(&block, "/etcd/endpoints");
        assert!(!endpoints.is_empty(), "{fleet}: no etcd endpoints");
        for e in endpoints {
            assert!(
                e.as_str().is_some_and(|e| e.starts_with("https://")),
                "{fleet}: etcd endpoint {e} is not TLS"
            );
        }
        for (field, file) in [("ca", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key")] {
            assert_eq!(
                str_at(&block, &format!("/etcd/tls/{field}")),
                format!("{ETCD_TLS_DIR}{file}"),
                "{fleet}: fleet.etcd.tls.{field} is not the mounted Secret's `{file}`"
            );
        }
        let prefix = str_at(&block, "/etcd/prefix");
        assert!(
            prefix.starts_with("/switchyard/"),
            "{fleet}: prefix {prefix}"
        );
        assert!(
            prefixes.insert(prefix.to_owned()),
            "{fleet}: prefix {prefix} shared with another fleet"
        );
    }
}

#[test]
fn the_dockerfile_matches_the_workspace_and_the_container() {
    let dockerfile = read(&repo().join("Dockerfile"));
    let cargo = read(&repo().join("Cargo.toml"));
    let rust_version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("workspace rust-version")
        .trim_matches('"');
    assert!(
        dockerfile.contains(&format!("ARG RUST_VERSION={rust_version}\n")),
        "the Dockerfile's Rust is not the workspace's rust-version {rust_version}"
    );

    let patch = yaml_file(&manifests().join("components/switchyard/container.yaml"));
    let container = array_at(&patch, "/spec/template/spec/containers")
        .iter()
        .find(|c| c["name"] == "switchyard")
        .expect("the switchyard container");
    // The image's default command is what the manifests run.
    let args: Vec<String> = array_at(container, "/args")
        .iter()
        .map(|a| format!("{a}"))
        .collect();
    assert!(
        dockerfile.contains(&format!("CMD [{}]", args.join(", "))),
        "Dockerfile CMD differs from the container's args {args:?}"
    );
    // `runAsNonRoot` needs a numeric non-root USER in the image.
    let uid = container["securityContext"]["runAsUser"].as_u64().unwrap();
    assert_ne!(uid, 0);
    assert!(dockerfile.contains(&format!("\nUSER {uid}:")), "USER {uid}");
    for port in array_at(container, "/ports") {
        let number = port["containerPort"].as_u64().unwrap();
        assert!(
            dockerfile.lines().any(|l| l.starts_with("EXPOSE ")
                && l.split_whitespace().any(|w| w == number.to_string())),
            "port {number} not EXPOSEd"
        );
    }
}

// === metrics: alerts, dashboard, autoscaler ===

/// One scrape, parsed: family types and every sample's labels.
struct Exposition {
    /// Family name → type (`counter`, `gauge`, `histogram`, ...).
    families: BTreeMap<String, String>,
    /// Sample name (`x_bucket` for a histogram's buckets) → label sets.
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut families = BTreeMap::new();
        let mut samples: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                families.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') && !line.is_empty() {
                let end = line.find(['{', ' ']).expect("sample line");
                let name = &line[..end];
                let labels = if line[end..].starts_with('{') {
                    let (matchers, _) = parse_matchers(&line[end + 1..]);
                    matchers.into_iter().map(|m| (m.label, m.value)).collect()
                } else {
                    BTreeMap::new()
                };
                samples.entry(name.to_owned()).or_default().push(labels);
            }
        }
        Exposition { families, samples }
    }

    /// The names a query can use: a histogram's `_bucket`, `_sum` and
    /// `_count`, every other family's own name.
    fn queryable(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (family, kind) in &self.families {
            match kind.as_str() {
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{family}{suffix}"));
                    }
                }
                "summary" => {
                    names.insert(family.clone());
                    names.insert(format!("{family}_sum"));
                    names.insert(format!("{family}_count"));
                }
                _ => {
                    names.insert(family.clone());
                }
            }
        }
        names
    }

    fn label_names(&self, sample: &str) -> BTreeSet<&str> {
        self.samples
            .get(sample)
            .into_iter()
            .flatten()
            .flat_map(|labels| labels.keys().map(String::as_str))
            .collect()
    }

    fn has_value(&self, sample: &str, label: &str, value: &str) -> bool {
        self.samples
            .get(sample)
            .into_iter()
            .flatten()
            .any(|labels| labels.get(label).is_some_and(|v| v == value))
    }
}

#[derive(Debug)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

/// Parses `a="x", b=~"y"}` (after the `{`); returns the matchers and the
/// rest after the `}`.
fn parse_matchers(text: &str) -> (Vec<Matcher>, &str) {
    let mut matchers = Vec::new();
    let mut rest = text.trim_start();
    loop {
        rest = rest.trim_start_matches([',', ' ', '\n']);
        if let Some(after) = rest.strip_prefix('}') {
            return (matchers, after);
        }
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .expect("label name");
        let label = rest[..name_end].to_owned();
        rest = rest[name_end..].trim_start();
        let op_end = rest.find('"').expect("quoted label value");
        let op = rest[..op_end].trim().to_owned();
        rest = &rest[op_end + 1..];
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let close = loop {
            match chars.next().expect("closing quote") {
                (_, '\\') => value.push(chars.next().expect("escaped char").1),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        rest = &rest[close + 1..];
        matchers.push(Matcher { label, op, value });
    }
}

/// A `switchyard_*` metric named in a query, with the matchers written
/// right after it.
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<Matcher>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `switchyard_[a-z0-9_]+` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("switchyard_") {
        let start = from + i;
        let len = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(text.len() - start);
        if !text[..start].ends_with(is_ident) {
            names.insert(text[start..start + len].to_owned());
        }
        from = start + len;
    }
    names
}

fn selectors(expr: &str) -> Vec<Selector> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(i) = expr[from..].find("switchyard_") {
        let start = from + i;
        let len = expr[start..]
            .find(|c: char| !is_ident(c))
            .unwrap_or(expr.len() - start);
        from = start + len;
        if expr[..start].ends_with(is_ident) {
            continue;
        }
        let metric = expr[start..from].to_owned();
        let matchers = match expr[from..].strip_prefix('{') {
            Some(rest) => parse_matchers(rest).0,
            None => Vec::new(),
        };
        found.push(Selector { metric, matchers });
    }
    found
}

/// Labels named in `by (...)`, `without (...)`, `on (...)`,
/// `ignoring (...)` and `group_left/right (...)` clauses.
fn grouping_labels(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for keyword in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let mut from = 0;
        while let Some(i) = expr[from..].find(keyword) {
            let start = from + i;
            from = start + keyword.len();
            if expr[..start].ends_with(is_ident) || expr[from..].starts_with(is_ident) {
                continue;
            }
            if let Some(list) = expr[from..].trim_start().strip_prefix('(') {
                let list = &list[..list.find(')').expect("closing paren")];
                labels.extend(
                    list.split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned),
                );
            }
        }
    }
    labels
}

/// Every query string in a Grafana dashboard: panel targets, template
/// variables, annotations.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// A proxy that has served traffic, rolled a failing canary back and
/// refused a config reload: every switchyard family has samples.
async fn exercised_proxy_metrics() -> String {
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let canary = Upstream::start("canary", Behaviour::failing(1)).await;
    let yaml = common::config(
        "",
        &[("blue", blue.addr, 100.0), ("canary", canary.addr, 0.0)],
    );
    let proxy = Running::start(&yaml).await;
    let admin = format!("http://{}", proxy.admin);
    let rollout = json!({
        "strategy": "canary", "stable": "blue", "target": "canary",
        "steps": [{"weight": 50, "hold": "60s"}, {"weight": 100}],
        "analysis": {"interval": "1s", "window": "5s", "min_requests": 5, "failure_threshold": 1},
    });
    let (status, _, body) = call(
        "POST",
        &format!("{admin}/v1/routes/api/rollout"),
        None,
        &[],
        rollout.to_string(),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // Traffic until the analysis rolls the failing canary back (bounded).
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut user = 0;
    loop {
        for _ in 0..20 {
            user += 1;
            get(
                &c,
                &proxy.url("/"),
                &[("x-user-id", &format!("user-{user}"))],
            )
            .await;
        }
        let (_, _, status) = get(&c, &format!("{admin}/v1/routes/api/rollout"), &[]).await;
        let status: Value = serde_json::from_str(&status).unwrap();
        if status["phase"] == "rolled-back" {
            break;
        }
        assert!(Instant::now() < deadline, "no rollback: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dir = common::temp_dir("manifests");
    std::fs::write(dir.join("bad.yaml"), "routes: []\n").unwrap();
    assert!(proxy.handle.reload(&dir.join("bad.yaml")).await.is_err());
    std::fs::remove_dir_all(&dir).unwrap();

    let (status, _, text) = get(&c, &format!("{admin}/metrics"), &[]).await;
    assert_eq!(status, 200);
    proxy.stop().await;
    text
}

/// A proxy terminating TLS, like the edge gateway, that has refused plain
/// HTTP on its TLS port (a failed handshake), loaded a rotated certificate
/// and refused a key that does not match: every TLS family has samples.
async fn exercised_tls_proxy_metrics() -> String {
    let ca = Ca::new("manifests test CA");
    let dir = common::temp_dir("manifests-tls");
    let name = "switchyard.example.com";
    let files = ca.leaf(&[name], 30).write(&dir, "tls");
    let blue = Upstream::start("blue", Behaviour::Name).await;
    let yaml = common::config(
        &tls_yaml(std::slice::from_ref(&files), ""),
        &[("blue", blue.addr, 100.0)],
    );
    let proxy = Running::start(&yaml).await;
    let answer = common::raw_exchange(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nhost: {name}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let metrics = format!("http://{}/metrics", proxy.admin);
    ca.leaf(&[name], 60).write(&dir, "tls");
    wait_for_sample(&metrics, "switchyard_tls_reloads_total{result=\"success\"}").await;
    std::fs::write(&files.1, ca.leaf(&[name], 30).key).unwrap();
    wait_for_sample(&metrics, "switchyard_tls_reloads_total{result=\"failure\"}").await;

    let (status, _, text) = get(&client(), &metrics, &[]).await;
    assert_eq!(status, 200);
    proxy.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
    text
}

/// Polls `url` (an admin `/metrics`) until `sample` (name and labels) is at
/// least 1; bounded: 20 s, the certificate files are polled every 2 s.
async fn wait_for_sample(url: &str, sample: &str) {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, body) = get(&c, url, &[]).await;
        let value = body.lines().find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        });
        if value.is_some_and(|v| v >= 1.0) {
            return;
        }
        assert!(Instant::now() < deadline, "no {sample} in:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_dashboard_and_autoscaler_use_only_exported_metrics() {
    // A plain proxy for the traffic and rollout families, a TLS one (the
    // edge gateway's setup) for the TLS families; one scrape of both.
    let (plain, tls) = tokio::join!(exercised_proxy_metrics(), exercised_tls_proxy_metrics());
    let scrape = Exposition::parse(&format!("{plain}\n{tls}"));
    let exported = scrape.queryable();

    let monitoring = manifests().join("components/monitoring");
    let rule_text = read(&monitoring.join("prometheusrule.yaml"));
    let dashboard_text = read(&monitoring.join("switchyard-dashboard.json"));
    let rule = yaml_file(&monitoring.join("prometheusrule.yaml"));
    let dashboard: Value = serde_json::from_str(&dashboard_text).expect("dashboard JSON");

    // Every metric name written anywhere in either file.
    let mut used = metric_names(&rule_text);
    used.extend(metric_names(&dashboard_text));
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "not exported by the proxy: {unknown:?}\nexported: {exported:?}"
    );
    for needed in [
        "switchyard_requests_total",
        "switchyard_request_duration_seconds_bucket",
        "switchyard_rollbacks_total",
        "switchyard_config_reloads_total",
        "switchyard_backend_weight_percent",
        "switchyard_rollout_step",
        "switchyard_tls_certificate_expiry_timestamp_seconds",
        "switchyard_tls_reloads_total",
        "switchyard_tls_handshake_failures_total",
    ] {
        assert!(used.contains(needed), "{needed} is used by neither");
    }

    // Labels and label values in every query.
    let mut queries: Vec<String> = Vec::new();
    let alerts: BTreeMap<String, Value> = array_at(&rule, "/spec/groups")
        .iter()
        .flat_map(|g| array_at(g, "/rules"))
        .filter_map(|r| Some((r["alert"].as_str()?.to_owned(), r.clone())))
        .collect();
    queries.extend(alerts.values().map(|r| str_at(r, "/expr").to_owned()));
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() > 10, "{queries:?}");
    for query in &queries {
        let found = selectors(query);
        let mut known: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
        for s in &found {
            let labels = scrape.label_names(&s.metric);
            for m in &s.matchers {
                assert!(
                    labels.contains(m.label.as_str()) || TARGET_LABELS.contains(&&*m.label),
                    "{}: no label `{}` (it has {labels:?}) in {query}",
                    s.metric,
                    m.label
                );
                if m.op == "=" && !m.value.contains('$') {
                    assert!(
                        scrape.has_value(&s.metric, &m.label, &m.value),
                        "{}: no sample with {}=\"{}\" in {query}",
                        s.metric,
                        m.label,
                        m.value
                    );
                }
            }
            known.extend(labels);
        }
        for label in grouping_labels(query) {
            assert!(
                known.contains(label.as_str()),
                "grouping label `{label}` is on no metric of {query}"
            );
        }
    }

    // The issue's thresholds, and the 2 s one is a bucket boundary.
    let alert = |name: &str| {
        alerts
            .get(name)
            .unwrap_or_else(|| panic!("no alert {name} in {:?}", alerts.keys()))
    };
    let errors = alert("SwitchyardHighErrorRate");
    assert!(str_at(errors, "/expr").contains("code_class=\"5xx\""));
    assert!(str_at(errors, "/expr").trim_end().ends_with("> 0.01"));
    assert_eq!(errors["for"], "5m");
    let latency = alert("SwitchyardHighLatencyP95");
    assert!(str_at(latency, "/expr").contains("histogram_quantile(0.95"));
    assert!(str_at(latency, "/expr").trim_end().ends_with("> 2"));
    assert_eq!(latency["for"], "5m");
    assert!(scrape.has_value("switchyard_request_duration_seconds_bucket", "le", "2"));
    assert!(str_at(alert("SwitchyardRollback"), "/expr").contains("switchyard_rollbacks_total"));
    assert!(str_at(alert("SwitchyardConfigReloadFailed"), "/expr")
        .contains("switchyard_config_reloads_total{result=\"failure\"}"));
    // Certificates: 14 days before expiry, and a refused rotation.
    let expiry = str_at(alert("SwitchyardCertificateExpiringSoon"), "/expr");
    assert!(expiry.contains("switchyard_tls_certificate_expiry_timestamp_seconds"));
    assert!(
        expiry.trim_end().ends_with("- time() < 14 * 86400"),
        "{expiry}"
    );
    assert!(str_at(alert("SwitchyardTLSReloadFailed"), "/expr")
        .contains("switchyard_tls_reloads_total{result=\"failure\"}"));

    // The HPA's per-pod metric is the adapter's rate of an exported counter.
    let edge = manifests().join("overlays/edge-gateway");
    let hpa = yaml_file(&edge.join("hpa.yaml"));
    let adapter = yaml_file(&edge.join("prometheus-adapter-rules.yaml"));
    let pods_metrics: Vec<&str> = array_at(&hpa, "/spec/metrics")
        .iter()
        .filter(|m| m["type"] == "Pods")
        .map(|m| str_at(m, "/pods/metric/name"))
        .collect();
    assert_eq!(pods_metrics, ["switchyard_requests_per_second"]);
    for name in pods_metrics {
        let served = array_at(&adapter, "/rules/custom").iter().any(|rule| {
            let series = str_at(rule, "/seriesQuery");
            let counter = &series[..series.find('{').unwrap_or(series.len())];
            str_at(rule, "/name/matches") == "^(.*)_total$"
                && str_at(rule, "/name/as") == "${1}_per_second"
                && exported.contains(counter)
                && scrape.families.get(counter).is_some_and(|t| t == "counter")
                && counter
                    .strip_suffix("_total")
                    .map(|c| format!("{c}_per_second"))
                    == Some(name.to_owned())
        });
        assert!(
            served,
            "no adapter rule serves {name} from an exported counter"
        );
    }
}

// === rendered overlays ===

/// kubectl to render with, or why there is none.
fn kubectl() -> Result<String, String> {
    let kubectl = std::env::var("SWITCHYARD_KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
    match Command::new(&kubectl)
        .args(["version", "--client", "-o", "json"])
        .output()
    {
        Ok(out) if out.status.success() => Ok(kubectl),
        Ok(out) => Err(format!(
            "`{kubectl} version --client` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("cannot run `{kubectl}`: {e}")),
    }
}

fn render(kubectl: &str, dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(
        &String::from_utf8(out.stdout).unwrap(),
        &dir.display().to_string(),
    )
}

/// `selector` (a `matchLabels`-style map) selects a pod with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// A container port by name or number: its number, if the container has it.
fn port_number(container: &Value, port: &Value) -> Option<u64> {
    array_at(container, "/ports")
        .iter()
        .find(|p| match port {
            Value::String(name) => p["name"] == name.as_str(),
            _ => p["containerPort"] == *port,
        })
        .and_then(|p| p["containerPort"].as_u64())
}

fn cpu_cores(quantity: &str) -> f64 {
    match quantity.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().unwrap() / 1000.0,
        None => quantity.parse().unwrap(),
    }
}

fn sleep_seconds(container: &Value) -> u64 {
    container
        .pointer("/lifecycle/preStop/sleep/seconds")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Checks one Deployment that carries the switchyard container against the
/// config in its ConfigMap and the other objects of its overlay; returns
/// that config.
fn check_workload(overlay: &str, deployment: &Value, objects: &[Value], monitored: bool) -> Config {
    let name = str_at(deployment, "/metadata/name");
    let what = format!("{overlay}: Deployment {name}");
    let pod = &deployment["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    let spec = &pod["spec"];
    let containers = array_at(spec, "/containers");
    let proxy = containers
        .iter()
        .find(|c| c["name"] == "switchyard")
        .unwrap();

    // The config: `run --config PATH`, PATH in a mounted ConfigMap.
    let args: Vec<&str> = array_at(proxy, "/args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let [_, _, config_path] = args[..] else {
        panic!("{what}: args {args:?}")
    };
    assert_eq!(args[..2], ["run", "--config"], "{what}");
    let (dir, file) = config_path.rsplit_once('/').unwrap();
    let mount = array_at(proxy, "/volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {dir}"));
    assert!(
        mount.get("subPath").is_none(),
        "{what}: a subPath mount never sees ConfigMap updates (no reload)"
    );
    let volume = array_at(spec, "/volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let map_name = str_at(volume, "/configMap/name");
    let map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == map_name)
        .unwrap_or_else(|| panic!("{what}: no ConfigMap {map_name}"));
    let text = str_at(map, &format!("/data/{file}"));
    let config = Config::from_yaml(text).unwrap_or_else(|e| panic!("{what}: {e}"));

    // The real check on the rendered text, with the tokens the container
    // passes in: every `admin.tokens[].env` comes from a Secret.
    let env = array_at(proxy, "/env");
    let mut envs = Vec::new();
    for token in &config.admin.tokens {
        let var = token.env.as_deref().expect("tokens come from variables");
        let entry = env
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("{what}: token variable {var} not set"));
        assert!(
            entry.pointer("/valueFrom/secretKeyRef/name").is_some(),
            "{what}: {var} is not from a Secret"
        );
        envs.push((var, TOKEN));
    }
    // TLS files come from a Secret in the pod: a certificate made here
    // stands in for it (check_edge ties the config's paths to the mount),
    // and the same for the etcd client files of a fleet (check_fleet).
    let dir = common::temp_dir("manifests");
    let rewritten = with_test_certificate(text, &config, &dir);
    std::fs::write(dir.join(file), with_test_etcd_certificate(&rewritten, &dir)).unwrap();
    let out = check(&dir.join(file), &envs);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Ports: the config's listeners, on every address of the pod. The data
    // port is named for what it speaks: `proxy-https` on a TLS listener,
    // with no `proxy-http` beside it, and the other way round.
    let (data_name, not_served) = match config.tls {
        Some(_) => ("proxy-https", "proxy-http"),
        None => ("proxy-http", "proxy-https"),
    };
    let data_port = port_number(proxy, &json!(data_name));
    let admin_port = port_number(proxy, &json!("proxy-admin"));
    assert_eq!(
        port_number(proxy, &json!(not_served)),
        None,
        "{what}: a {not_served} port beside {data_name}"
    );
    assert_eq!(data_port, Some(u64::from(config.listen.port())), "{what}");
    assert_eq!(
        admin_port,
        Some(u64::from(config.admin.listen.port())),
        "{what}"
    );
    assert!(
        config.listen.ip().is_unspecified(),
        "{what}: {}",
        config.listen
    );
    assert!(config.admin.listen.ip().is_unspecified(), "{what}");

    // Probes: the admin listener's open health endpoints.
    let open: Vec<&str> = OPEN_ENDPOINTS.iter().map(|(path, _)| *path).collect();
    for (probe, path) in [
        ("livenessProbe", "/health/live"),
        ("readinessProbe", "/health/ready"),
    ] {
        let get = &proxy[probe]["httpGet"];
        assert_eq!(get["path"], path, "{what}: {probe}");
        assert!(open.contains(&path), "{path} is not an open admin endpoint");
        assert_eq!(
            port_number(proxy, &get["port"]),
            admin_port,
            "{what}: {probe}"
        );
    }

    // state_dir on a writable volume.
    let state_dir = config.state_dir.as_ref().expect("state_dir");
    let state = array_at(proxy, "/volumeMounts")
        .iter()
        .find(|m| Path::new(str_at(m, "/mountPath")) == state_dir)
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {}", state_dir.display()));
    assert_ne!(state["readOnly"], true, "{what}");
    let state_volume = array_at(spec, "/volumes")
        .iter()
        .find(|v| v["name"] == state["name"])
        .unwrap();
    assert!(
        state_volume.get("emptyDir").is_some()
            || state_volume.get("persistentVolumeClaim").is_some(),
        "{what}: {state_volume}"
    );

    // Hardening.
    let sc = &proxy["securityContext"];
    let pod_sc = &spec["securityContext"];
    assert!(
        sc["runAsNonRoot"] == true || pod_sc["runAsNonRoot"] == true,
        "{what}"
    );
    let uid = sc["runAsUser"].as_u64().or(pod_sc["runAsUser"].as_u64());
    assert!(uid.is_some_and(|u| u != 0), "{what}: runAsUser {uid:?}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert!(
        array_at(sc, "/capabilities/drop").contains(&json!("ALL")),
        "{what}"
    );

    // Stopping: endpoints go (preStop), then the drain, all inside the
    // grace period; the application outlives the proxy's drain.
    let pre_stop = sleep_seconds(proxy);
    let drain = config.timeouts.drain.0.as_secs();
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    assert!(pre_stop >= 5, "{what}: preStop sleep {pre_stop}");
    assert!(
        grace >= pre_stop + drain + 5,
        "{what}: grace {grace}s < preStop {pre_stop}s + drain {drain}s + 5s"
    );
    for app in containers.iter().filter(|c| c["name"] != "switchyard") {
        assert!(
            sleep_seconds(app) >= pre_stop + drain && grace >= sleep_seconds(app) + 5,
            "{what}: container {} stops before the proxy has drained",
            app["name"]
        );
    }

    // Resources: requests and limits, and room for every worker thread.
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                proxy["resources"][kind][resource].is_string(),
                "{what}: resources.{kind}.{resource}"
            );
        }
    }
    let workers = config.workers.expect("workers is set deliberately") as f64;
    let cpu_limit = cpu_cores(str_at(proxy, "/resources/limits/cpu"));
    assert!(
        cpu_limit >= workers,
        "{what}: cpu limit {cpu_limit} < {workers} workers"
    );

    // Services that select the pod send clients to the proxy (or operators
    // to the admin port), never around it; only ClusterIP ones expose admin.
    let services: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Service" && selects(&o["spec"]["selector"], pod_labels))
        .collect();
    assert!(!services.is_empty(), "{what}: no Service");
    let mut to_data = false;
    for service in services {
        let exposed = matches!(
            service["spec"]["type"].as_str(),
            Some("LoadBalancer" | "NodePort")
        );
        for port in array_at(service, "/spec/ports") {
            let target = port_number(proxy, &port["targetPort"]);
            assert!(
                target == data_port || (target == admin_port && !exposed),
                "{what}: Service {} port {port} bypasses the proxy",
                service["metadata"]["name"]
            );
            to_data |= target == data_port;
        }
    }
    assert!(to_data, "{what}: no Service targets the proxy port");

    // Scraped by a PodMonitor on the admin port's open /metrics.
    if !monitored {
        return config;
    }
    let scraped = objects.iter().any(|o| {
        o["kind"] == "PodMonitor"
            && selects(&o["spec"]["selector"]["matchLabels"], pod_labels)
            && array_at(o, "/spec/podMetricsEndpoints").iter().any(|e| {
                port_number(proxy, &e["port"]) == admin_port
                    && e["path"] == "/metrics"
                    && open.contains(&"/metrics")
            })
    });
    assert!(scraped, "{what}: no PodMonitor scrapes the admin port");
    config
}

/// kubectl, or `None` after printing why the test is skipped.
fn kubectl_or_skip() -> Option<String> {
    match kubectl() {
        Ok(k) => Some(k),
        Err(why) if std::env::var("SWITCHYARD_REQUIRE_KUBECTL").is_ok_and(|v| v == "1") => {
            panic!("SWITCHYARD_REQUIRE_KUBECTL=1 but {why}")
        }
        Err(why) => {
            println!("SKIPPED: {why}; set SWITCHYARD_KUBECTL to render the manifests");
            None
        }
    }
}

#[test]
fn rendered_overlays_match_the_proxy() {
    let Some(kubectl) = kubectl_or_skip() else {
        return;
    };
    let mut seen = 0;
    for overlay in [
        "overlays/sidecar",
        "overlays/edge-gateway",
        "overlays/sidecar-fleet",
        "overlays/edge-gateway-fleet",
        "base",
    ] {
        let objects = render(&kubectl, &manifests().join(overlay));
        let fleet = FLEET_OVERLAYS.iter().any(|(_, f)| *f == overlay);
        for deployment in objects.iter().filter(|o| o["kind"] == "Deployment") {
            let has_proxy = array_at(deployment, "/spec/template/spec/containers")
                .iter()
                .any(|c| c["name"] == "switchyard");
            if has_proxy {
                // base has no monitoring component; the overlays do.
                let config = check_workload(overlay, deployment, &objects, overlay != "base");
                if overlay.starts_with("overlays/edge-gateway") {
                    check_edge(&objects, &config);
                }
                if fleet {
                    check_fleet(overlay, deployment, &objects);
                }
                seen += 1;
            }
        }
        // Only the fleet overlays run etcd.
        assert_eq!(
            objects.iter().any(|o| o["kind"] == "StatefulSet"),
            fleet,
            "{overlay}: an etcd StatefulSet in a standalone overlay, or none in a fleet one"
        );
        if overlay.starts_with("overlays/sidecar") {
            let app = objects
                .iter()
                .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "example-app")
                .expect("the example application");
            let names: Vec<&Value> = array_at(app, "/spec/template/spec/containers")
                .iter()
                .map(|c| &c["name"])
                .collect();
            assert_eq!(names.len(), 2, "the app and its sidecar: {names:?}");
        }
    }
    assert_eq!(
        seen, 5,
        "sidecar, edge gateway (each standalone and fleet) and base each run the proxy"
    );
}

/// The edge gateway terminates TLS on the port its Service and NetworkPolicy
/// open, with the certificate from its Secret; its availability objects
/// point at its pods.
fn check_edge(objects: &[Value], config: &Config) {
    let find = |kind: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("edge gateway: no {kind}"))
    };
    let deployment = find("Deployment");
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    let proxy = array_at(pod, "/spec/containers")
        .iter()
        .find(|c| c["name"] == "switchyard")
        .unwrap();

    // TLS in the proxy: the container's TLS port is the TLS listener's, and
    // the LoadBalancer Service sends 443 there and nowhere else.
    let tls = config
        .tls
        .as_ref()
        .expect("the edge gateway's config terminates TLS");
    let data_port = port_number(proxy, &json!("proxy-https"));
    assert_eq!(
        data_port,
        Some(u64::from(config.listen.port())),
        "the TLS container port is not the TLS listener's"
    );
    let balancer = objects
        .iter()
        .find(|o| o["kind"] == "Service" && o["spec"]["type"] == "LoadBalancer")
        .expect("edge gateway: no LoadBalancer Service");
    let ports = array_at(balancer, "/spec/ports");
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0]["port"], 443);
    assert_eq!(port_number(proxy, &ports[0]["targetPort"]), data_port);
    // Idle keep-alive connections outlive a cloud load balancer's (60 s).
    assert!(
        config.timeouts.idle.0 > Duration::from_secs(60),
        "timeouts.idle {:?}",
        config.timeouts.idle.0
    );

    let hpa = find("HorizontalPodAutoscaler");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    let metrics: Vec<&Value> = array_at(hpa, "/spec/metrics").iter().collect();
    assert!(metrics.iter().any(|m| m["resource"]["name"] == "cpu"));
    assert!(metrics.iter().any(|m| m["type"] == "Pods"));
    // The HPA owns the replica count: `kubectl apply` must not reset it.
    assert!(
        deployment["spec"].get("replicas").is_none(),
        "replicas set beside an HPA"
    );

    // The gateway's own, among those of etcd in the fleet overlay.
    let for_pods = |kind: &str, selector: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o.pointer(selector).is_some_and(|s| selects(s, labels)))
            .unwrap_or_else(|| panic!("edge gateway: no {kind} selects its pods"))
    };
    let pdb = for_pods("PodDisruptionBudget", "/spec/selector/matchLabels");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels));

    let anti = &pod["spec"]["affinity"]["podAntiAffinity"];
    assert!(!anti.is_null(), "no pod anti-affinity");
    let spread = array_at(pod, "/spec/topologySpreadConstraints");
    assert!(spread
        .iter()
        .any(|s| s["topologyKey"] == "topology.kubernetes.io/zone"
            && selects(&s["labelSelector"]["matchLabels"], labels)));

    // The admin port only from selected namespaces; the data port open.
    let policy = for_pods("NetworkPolicy", "/spec/podSelector/matchLabels");
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        labels
    ));
    let admin_port = port_number(proxy, &json!("proxy-admin"));
    let mut admin_rules = 0;
    let mut data_open = false;
    for rule in array_at(policy, "/spec/ingress") {
        let from = array_at(rule, "/from");
        for port in array_at(rule, "/ports") {
            let number = port_number(proxy, &port["port"]);
            assert!(number.is_some(), "policy port {port} is not the proxy's");
            if number == admin_port {
                admin_rules += 1;
                assert!(
                    !from.is_empty() && from.iter().all(|f| f.get("namespaceSelector").is_some()),
                    "admin port open beyond namespaces: {rule}"
                );
            }
            data_open |= number == data_port && from.is_empty();
        }
    }
    assert_eq!(admin_rules, 1);
    assert!(data_open, "the data port is not open to clients");

    // The TLS Secret, mounted read-only where the config reads its
    // `kubernetes.io/tls` keys, and required: no pod starts without it.
    let mount_path = TLS_DIR.trim_end_matches('/');
    let mount = array_at(proxy, "/volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == mount_path)
        .expect("TLS mount");
    assert_eq!(mount["readOnly"], true);
    let volume = array_at(pod, "/spec/volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(volume["secret"]["secretName"].is_string());
    assert_ne!(
        volume["secret"]["optional"], true,
        "an optional TLS Secret lets pods start without their certificate"
    );
    let files: Vec<(PathBuf, PathBuf)> = tls
        .certificates
        .iter()
        .map(|c| (c.cert.clone(), c.key.clone()))
        .collect();
    assert_eq!(
        files,
        [(
            Path::new(mount_path).join("tls.crt"),
            Path::new(mount_path).join("tls.key")
        )]
    );
}

/// The text of the config file the `switchyard` container of `deployment`
/// runs with (`run --config DIR/FILE`, DIR a mounted ConfigMap), parsed.
fn mounted_config(deployment: &Value, objects: &[Value]) -> Value {
    let spec = &deployment["spec"]["template"]["spec"];
    let proxy = array_at(spec, "/containers")
        .iter()
        .find(|c| c["name"] == "switchyard")
        .unwrap();
    let path = array_at(proxy, "/args")
        .last()
        .and_then(Value::as_str)
        .expect("the config path");
    let (dir, file) = path.rsplit_once('/').unwrap();
    let mount = array_at(proxy, "/volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap();
    let volume = array_at(spec, "/volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let map_name = str_at(volume, "/configMap/name");
    let map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == map_name)
        .unwrap();
    let mut docs = yaml_docs(str_at(map, &format!("/data/{file}")), map_name);
    assert_eq!(docs.len(), 1, "{map_name}: one document expected");
    docs.remove(0)
}

/// A fleet overlay: the proxy's `fleet:` block names the etcd members the
/// overlay runs, by their stable names, on their TLS client port; the
/// proxy has its replica id and the client certificate where the config
/// reads it; etcd requires client certificates, keeps quorum through
/// disruptions, and admits only the proxies and its peers.
fn check_fleet(overlay: &str, deployment: &Value, objects: &[Value]) {
    let what = format!("{overlay}: Deployment {}", deployment["metadata"]["name"]);
    let pod = &deployment["spec"]["template"];
    let proxy_labels = &pod["metadata"]["labels"];
    let proxy = array_at(pod, "/spec/containers")
        .iter()
        .find(|c| c["name"] == "switchyard")
        .unwrap();
    let config = mounted_config(deployment, objects);
    let fleet = &config["fleet"];
    assert!(fleet.is_object(), "{what}: no `fleet:` in its config");

    // The replica id: left to $POD_NAME, which the downward API sets; the
    // pod's address beside it.
    assert!(fleet.get("replica_id").is_none(), "{what}: replica_id set");
    let env = array_at(proxy, "/env");
    for (var, field) in [("POD_NAME", "metadata.name"), ("POD_IP", "status.podIP")] {
        let entry = env
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("{what}: no {var}"));
        assert_eq!(
            entry.pointer("/valueFrom/fieldRef/fieldPath"),
            Some(&json!(field)),
            "{what}: {var}"
        );
    }

    // The client certificate: the files of a required Secret, mounted
    // read-only where `fleet.etcd.tls` reads them.
    let mount_path = ETCD_TLS_DIR.trim_end_matches('/');
    let mount = array_at(proxy, "/volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == mount_path)
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {mount_path}"));
    assert_eq!(mount["readOnly"], true, "{what}");
    let volume = array_at(pod, "/spec/volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let client_secret = str_at(volume, "/secret/secretName");
    assert_ne!(
        volume["secret"]["optional"], true,
        "{what}: an optional etcd Secret lets pods start outside the fleet"
    );
    for (field, file) in [("ca", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key")] {
        assert_eq!(
            str_at(fleet, &format!("/etcd/tls/{field}")),
            format!("{mount_path}/{file}"),
            "{what}: fleet.etcd.tls.{field}"
        );
    }

    // The etcd members: a StatefulSet, named through its headless Service.
    let sts = objects
        .iter()
        .find(|o| {
            o["kind"] == "StatefulSet"
                && array_at(o, "/spec/template/spec/containers")
                    .iter()
                    .any(|c| c["name"] == "etcd")
        })
        .unwrap_or_else(|| panic!("{overlay}: no etcd StatefulSet"));
    let sts_name = str_at(sts, "/metadata/name");
    let members = sts["spec"]["replicas"].as_u64().expect("etcd replicas");
    assert!(
        members >= 3 && members % 2 == 1,
        "{overlay}: {members} etcd members"
    );
    let etcd_pod = &sts["spec"]["template"];
    let etcd_labels = &etcd_pod["metadata"]["labels"];
    assert!(
        !selects(proxy_labels, etcd_labels) && !selects(etcd_labels, proxy_labels),
        "{overlay}: etcd and the proxies share their labels"
    );
    let etcd = array_at(etcd_pod, "/spec/containers")
        .iter()
        .find(|c| c["name"] == "etcd")
        .unwrap();
    let client_port = port_number(etcd, &json!("client")).expect("etcd client port");
    let peer_port = port_number(etcd, &json!("peer")).expect("etcd peer port");
    let headless_name = str_at(sts, "/spec/serviceName");
    let headless = objects
        .iter()
        .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == headless_name)
        .unwrap_or_else(|| panic!("{overlay}: no Service {headless_name}"));
    assert_eq!(
        headless["spec"]["clusterIP"], "None",
        "{overlay}: {headless_name}"
    );
    // Members must resolve each other before any of them is ready.
    assert_eq!(
        headless["spec"]["publishNotReadyAddresses"], true,
        "{overlay}: {headless_name}"
    );
    assert!(selects(&headless["spec"]["selector"], etcd_labels));
    assert!(array_at(headless, "/spec/ports")
        .iter()
        .any(|p| port_number(etcd, &p["targetPort"]) == Some(client_port)));
    let names: Vec<String> = (0..members)
        .map(|i| format!("{sts_name}-{i}.{headless_name}"))
        .collect();
    let expected: Vec<Value> = names
        .iter()
        .map(|n| json!(format!("https://{n}:{client_port}")))
        .collect();
    assert_eq!(
        array_at(fleet, "/etcd/endpoints"),
        expected.as_slice(),
        "{what}: fleet.etcd.endpoints are not the members"
    );

    // etcd: TLS for clients and peers, client certificates required, the
    // cluster of exactly these members, its data on a claimed volume.
    let args: Vec<&str> = array_at(etcd, "/args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("{overlay}: etcd has no --{name}"))
    };
    assert_eq!(flag("client-cert-auth"), "true");
    assert_eq!(flag("peer-client-cert-auth"), "true");
    assert!(flag("listen-client-urls").starts_with("https://"));
    assert!(flag("listen-peer-urls").starts_with("https://"));
    let cluster: Vec<String> = (0..members)
        .map(|i| format!("{sts_name}-{i}=https://{}:{peer_port}", names[i as usize]))
        .collect();
    assert_eq!(flag("initial-cluster"), cluster.join(","));
    assert_eq!(
        sts["spec"]["podManagementPolicy"], "Parallel",
        "{overlay}: members started one by one never reach quorum"
    );
    let data_dir = flag("data-dir");
    let claims: Vec<&Value> = array_at(sts, "/spec/volumeClaimTemplates")
        .iter()
        .map(|c| &c["metadata"]["name"])
        .collect();
    assert!(
        array_at(etcd, "/volumeMounts").iter().any(|m| {
            data_dir.starts_with(str_at(m, "/mountPath")) && claims.contains(&&m["name"])
        }),
        "{overlay}: etcd's data directory {data_dir} is not on a claimed volume"
    );
    // The members' key is theirs: the proxies get a client certificate.
    let etcd_secrets: Vec<&str> = array_at(etcd_pod, "/spec/volumes")
        .iter()
        .filter_map(|v| v.pointer("/secret/secretName").and_then(Value::as_str))
        .collect();
    assert!(
        !etcd_secrets.is_empty(),
        "{overlay}: etcd mounts no TLS Secret"
    );
    assert!(
        !etcd_secrets.contains(&client_secret),
        "{overlay}: the proxies mount the members' Secret {client_secret}"
    );
    // Probes: the kubelet has no client certificate, so not the client port.
    for probe in ["livenessProbe", "readinessProbe"] {
        let port = port_number(etcd, &etcd[probe]["httpGet"]["port"]);
        assert!(port.is_some(), "{overlay}: etcd {probe}");
        assert_ne!(port, Some(client_port), "{overlay}: etcd {probe}");
    }
    // Hardening and sizing.
    let sc = &etcd["securityContext"];
    let pod_sc = &etcd_pod["spec"]["securityContext"];
    assert!(
        sc["runAsNonRoot"] == true || pod_sc["runAsNonRoot"] == true,
        "{overlay}"
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{overlay}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{overlay}");
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                etcd["resources"][kind][resource].is_string(),
                "{overlay}: etcd resources.{kind}.{resource}"
            );
        }
    }
    let image = str_at(etcd, "/image");
    assert!(
        image
            .rsplit_once(':')
            .is_some_and(|(_, tag)| tag != "latest" && !tag.contains('/')),
        "{overlay}: etcd image {image} is not pinned"
    );

    // Quorum through voluntary disruptions: at most the members beyond a
    // majority may be down.
    let pdb = objects
        .iter()
        .find(|o| {
            o["kind"] == "PodDisruptionBudget"
                && selects(&o["spec"]["selector"]["matchLabels"], etcd_labels)
        })
        .unwrap_or_else(|| panic!("{overlay}: no PodDisruptionBudget for etcd"));
    let max_unavailable = pdb["spec"]["maxUnavailable"]
        .as_u64()
        .expect("maxUnavailable");
    assert!(
        (1..=members - (members / 2 + 1)).contains(&max_unavailable),
        "{overlay}: etcd maxUnavailable {max_unavailable} of {members}"
    );

    // Only the proxies reach the client port, only members the peer port.
    let policy = objects
        .iter()
        .find(|o| {
            o["kind"] == "NetworkPolicy"
                && selects(&o["spec"]["podSelector"]["matchLabels"], etcd_labels)
        })
        .unwrap_or_else(|| panic!("{overlay}: no NetworkPolicy for etcd"));
    assert!(array_at(policy, "/spec/policyTypes").contains(&json!("Ingress")));
    let (mut proxies_in, mut peers_in) = (false, false);
    for rule in array_at(policy, "/spec/ingress") {
        let from = array_at(rule, "/from");
        let ports: Vec<Option<u64>> = array_at(rule, "/ports")
            .iter()
            .map(|p| port_number(etcd, &p["port"]))
            .collect();
        assert!(
            !ports.is_empty() && !from.is_empty(),
            "{overlay}: etcd open on every port or to every pod: {rule}"
        );
        let from_selects = |labels: &Value| {
            from.iter().all(|f| {
                f.get("ipBlock").is_none() && selects(&f["podSelector"]["matchLabels"], labels)
            })
        };
        if ports.contains(&Some(client_port)) {
            assert!(
                from_selects(proxy_labels),
                "{overlay}: etcd client port: {rule}"
            );
            proxies_in = true;
        }
        if ports.contains(&Some(peer_port)) {
            assert!(
                from_selects(etcd_labels) && !from_selects(proxy_labels),
                "{overlay}: etcd peer port: {rule}"
            );
            peers_in = true;
        }
    }
    assert!(
        proxies_in && peers_in,
        "{overlay}: etcd's NetworkPolicy admits neither proxies nor peers"
    );

    // A policy that limits the proxies' egress must let them reach etcd.
    for policy in objects.iter().filter(|o| {
        o["kind"] == "NetworkPolicy"
            && selects(&o["spec"]["podSelector"]["matchLabels"], proxy_labels)
            && array_at(o, "/spec/policyTypes").contains(&json!("Egress"))
    }) {
        let reaches = array_at(policy, "/spec/egress").iter().any(|rule| {
            let ports = array_at(rule, "/ports");
            let to = array_at(rule, "/to");
            (ports.is_empty() || ports.iter().any(|p| p["port"] == json!(client_port)))
                && (to.is_empty()
                    || to
                        .iter()
                        .any(|t| selects(&t["podSelector"]["matchLabels"], etcd_labels)))
        });
        assert!(
            reaches,
            "{overlay}: NetworkPolicy {} keeps the proxies from etcd",
            policy["metadata"]["name"]
        );
    }
}

/// `to` relative to `from` (both absolute): kustomize refuses absolute
/// component paths.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path: PathBuf = from[common..].iter().map(|_| "..").collect();
    path.extend(&to[common..]);
    path
}

#[test]
fn the_readme_recipe_injects_a_working_sidecar_into_a_deployment() {
    let Some(kubectl) = kubectl_or_skip() else {
        return;
    };
    // The kustomization exactly as manifests/README.md gives it.
    let readme = read(&manifests().join("README.md"));
    let section = &readme[readme
        .find("### Injecting the sidecar into an existing Deployment")
        .expect("the injection section")..];
    let start = section
        .find("```yaml\n# kustomization.yaml")
        .expect("the recipe's kustomization")
        + "```yaml\n".len();
    let recipe = &section[start..start + section[start..].find("```").unwrap()];

    // An application that knows nothing of Switchyard but the label.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "manifests-inject-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let to_manifests = relative(&dir, &manifests());
    std::fs::write(
        dir.join("kustomization.yaml"),
        recipe.replace("path/to/manifests", to_manifests.to_str().unwrap()),
    )
    .unwrap();
    std::fs::write(
        dir.join("deployment.yaml"),
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: my-app
  labels:
    switchyard.dev/inject: "true"
spec:
  selector:
    matchLabels: { app: my-app }
  template:
    metadata:
      labels: { app: my-app }
    spec:
      containers:
        - name: web
          image: example/web:1
          ports: [{ name: http, containerPort: 8081 }]
          lifecycle: { preStop: { sleep: { seconds: 25 } } }
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("service.yaml"),
        r#"apiVersion: v1
kind: Service
metadata:
  name: my-app
spec:
  selector: { app: my-app }
  ports: [{ name: http, port: 80, targetPort: http }]
"#,
    )
    .unwrap();
    std::fs::copy(
        manifests().join("overlays/sidecar/switchyard.yaml"),
        dir.join("switchyard.yaml"),
    )
    .unwrap();

    let objects = render(&kubectl, &dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let app = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("the Deployment");
    let names: BTreeSet<&str> = array_at(app, "/spec/template/spec/containers")
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["switchyard", "web"]), "not injected");
    check_workload("README recipe", app, &objects, true);
}
