//! `switchyard inject`: Kubernetes manifests in, the same manifests out with
//! the Switchyard sidecar added to every Deployment, StatefulSet and
//! DaemonSet pod template (as `linkerd inject` does). The container is the
//! one `manifests/components/switchyard` defines (embedded, so the two
//! never differ): its ports, probes, resources, security context, config
//! and state volumes. For each workload it also
//!
//! - writes the proxy's configuration as a ConfigMap `<workload>-switchyard`
//!   (one route, `stable` = the app's container port on 127.0.0.1), unless
//!   the input already has one of that name;
//! - moves every Service whose selector picks the workload's pods from the
//!   app's port to the proxy's (`targetPort: proxy-http`).
//!
//! Idempotent: a template that already has a `switchyard` container is left
//! as it is, and so are documents of other kinds.

use serde_json::{json, Map, Value};

/// The component's patch: its pod template holds the container, the pod
/// label and grace period, and the volumes.
const COMPONENT: &str = include_str!("../../manifests/components/switchyard/container.yaml");

const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet"];

/// What went wrong, in the user's terms.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InjectError(String);

/// The injected manifests, and a line per change for standard error.
pub fn inject(input: &str, app_port: Option<u16>) -> Result<(String, Vec<String>), InjectError> {
    let mut docs: Vec<Value> = serde_saphyr::from_multiple(input)
        .map_err(|e| InjectError(format!("not YAML manifests: {e}")))?;
    docs.retain(|d| !d.is_null());
    let component: Value = serde_saphyr::from_str(COMPONENT).expect("the component parses");
    let template = &component["spec"]["template"];
    let mut notes = Vec::new();
    let mut added = Vec::new();
    for doc in &mut docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        if !WORKLOADS.contains(&kind.as_str()) || doc["apiVersion"] != "apps/v1" {
            continue;
        }
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or("unnamed")
            .to_owned();
        let pod = &mut doc["spec"]["template"];
        let containers = pod["spec"]["containers"].as_array().ok_or_else(|| {
            InjectError(format!("{kind} {name}: no spec.template.spec.containers"))
        })?;
        if containers.iter().any(|c| c["name"] == "switchyard") {
            notes.push(format!(
                "{kind} {name}: already has the switchyard container, left as it is"
            ));
            continue;
        }
        let app = &containers[0];
        let port = match app_port {
            Some(p) => p,
            None => app["ports"][0]["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| {
                    InjectError(format!(
                        "{kind} {name}: its first container declares no port; give --app-port"
                    ))
                })?,
        };
        let app_port_name = app["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["containerPort"] == port)
            .and_then(|p| p["name"].as_str())
            .map(str::to_owned);
        let taken: Vec<u64> = containers
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .filter_map(|p| p["containerPort"].as_u64())
            .chain([u64::from(port)])
            .collect();
        let (proxy, admin) = (
            free(&taken, &[8080, 4140, 14140]),
            free(&taken, &[9901, 4191, 14191]),
        );
        let config_map = format!("{name}-switchyard");
        let mut container = template["spec"]["containers"][0].clone();
        set_port(&mut container, "proxy-http", proxy);
        set_port(&mut container, "proxy-admin", admin);
        let mut volumes = template["spec"]["volumes"].clone();
        for v in volumes.as_array_mut().into_iter().flatten() {
            if v["name"] == "switchyard-config" {
                v["configMap"]["name"] = json!(config_map);
            }
        }
        let spec = pod["spec"].as_object_mut().expect("checked above");
        push_all(spec, "containers", vec![container]);
        let existing: Vec<Value> = spec
            .get("volumes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let fresh: Vec<Value> = volumes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| !existing.iter().any(|e| e["name"] == v["name"]))
            .cloned()
            .collect();
        push_all(spec, "volumes", fresh);
        let grace = spec
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(30)
            .max(
                template["spec"]["terminationGracePeriodSeconds"]
                    .as_u64()
                    .unwrap_or(45),
            );
        spec.insert("terminationGracePeriodSeconds".into(), json!(grace));
        let labels = pod["metadata"]["labels"].clone();
        pod["metadata"]["labels"]["switchyard.dev/proxy"] = json!("true");
        notes.push(format!(
            "{kind} {name}: switchyard added (proxy {proxy} -> app 127.0.0.1:{port}, admin {admin}; config in ConfigMap {config_map})"
        ));
        added.push(Injected {
            name,
            labels,
            port,
            port_name: app_port_name,
            proxy,
            admin,
            config_map,
        });
    }
    for workload in &added {
        for doc in &mut docs {
            if doc["kind"] == "Service" && selects(&doc["spec"]["selector"], &workload.labels) {
                let service = doc["metadata"]["name"]
                    .as_str()
                    .unwrap_or("unnamed")
                    .to_owned();
                for p in doc["spec"]["ports"].as_array_mut().into_iter().flatten() {
                    let target = p
                        .get("targetPort")
                        .cloned()
                        .unwrap_or_else(|| p["port"].clone());
                    let to_app = target == json!(workload.port)
                        || workload
                            .port_name
                            .as_ref()
                            .is_some_and(|n| target == json!(n));
                    if to_app {
                        p["targetPort"] = json!("proxy-http");
                        notes.push(format!(
                            "Service {service}: port {} now goes to the proxy",
                            p["port"]
                        ));
                    }
                }
            }
        }
        let has_config = docs.iter().any(|d| {
            d["kind"] == "ConfigMap" && d["metadata"]["name"] == workload.config_map.as_str()
        });
        if !has_config {
            docs.push(workload.config_map_doc());
        }
    }
    let out = serde_saphyr::to_string_multiple(&docs)
        .map_err(|e| InjectError(format!("cannot write the manifests: {e}")))?;
    Ok((out, notes))
}

/// An injected workload, for its Services and its configuration.
struct Injected {
    name: String,
    labels: Value,
    port: u16,
    port_name: Option<String>,
    proxy: u16,
    admin: u16,
    config_map: String,
}

impl Injected {
    /// The proxy's configuration: one route to the app in the same pod.
    fn config_map_doc(&self) -> Value {
        let config = format!(
            "# Written by `switchyard inject`; every field: docs/config.md.\n\
             listen: 0.0.0.0:{proxy}\n\
             workers: 1\n\
             admin:\n  listen: 0.0.0.0:{admin}\n  tokens:\n    - {{ name: operator, env: SWITCHYARD_ADMIN_TOKEN }}\n\
             state_dir: /var/lib/switchyard\n\
             user_key: {{ headers: [x-user-id], cookies: [uid], fallback: cookie }}\n\
             timeouts: {{ drain: 20s }}\n\
             routes:\n  - name: {name}\n    backends:\n      # The app container in the same pod; add a canary after it.\n      - {{ name: stable, endpoints: [\"127.0.0.1:{port}\"], weight: 100 }}\n",
            proxy = self.proxy,
            admin = self.admin,
            name = self.name,
            port = self.port
        );
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": self.config_map },
            "data": { "switchyard.yaml": config },
        })
    }
}

/// The first of `wanted` not in `taken`.
fn free(taken: &[u64], wanted: &[u16]) -> u16 {
    *wanted
        .iter()
        .find(|p| !taken.contains(&u64::from(**p)))
        .unwrap_or(&wanted[wanted.len() - 1])
}

fn set_port(container: &mut Value, name: &str, port: u16) {
    for p in container["ports"].as_array_mut().into_iter().flatten() {
        if p["name"] == name {
            p["containerPort"] = json!(port);
        }
    }
}

fn push_all(spec: &mut Map<String, Value>, key: &str, items: Vec<Value>) {
    let list = spec.entry(key).or_insert_with(|| json!([]));
    if let Some(list) = list.as_array_mut() {
        list.extend(items);
    }
}

/// A selector picks pods with `labels` when every key it names matches.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: shop, labels: { app: shop } }
spec:
  selector: { matchLabels: { app: shop } }
  template:
    metadata: { labels: { app: shop } }
    spec:
      containers:
        - name: shop
          image: shop:1
          ports: [{ name: http, containerPort: 8080 }]
---
apiVersion: v1
kind: Service
metadata: { name: shop }
spec:
  selector: { app: shop }
  ports: [{ port: 80, targetPort: http }]
---
apiVersion: v1
kind: Service
metadata: { name: other }
spec:
  selector: { app: other }
  ports: [{ port: 80, targetPort: 8080 }]
"#;

    fn docs(text: &str) -> Vec<Value> {
        serde_saphyr::from_multiple(text).unwrap()
    }

    #[test]
    fn the_sidecar_is_added_the_service_moved_and_a_config_written() {
        let (out, notes) = inject(APP, None).unwrap();
        let d = docs(&out);
        assert_eq!(d.len(), 4, "{out}");
        let pod = &d[0]["spec"]["template"];
        let containers = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 2);
        let proxy = &containers[1];
        assert_eq!(proxy["name"], "switchyard");
        // The app has 8080: the proxy takes the next free port.
        assert_eq!(proxy["ports"][0]["containerPort"], 4140);
        assert_eq!(proxy["ports"][1]["containerPort"], 9901);
        assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/health/ready");
        assert_eq!(pod["metadata"]["labels"]["switchyard.dev/proxy"], "true");
        assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 45);
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes[0]["configMap"]["name"], "shop-switchyard");
        assert_eq!(d[1]["spec"]["ports"][0]["targetPort"], "proxy-http");
        assert_eq!(
            d[2]["spec"]["ports"][0]["targetPort"], 8080,
            "another app's Service is untouched"
        );
        let config = d[3]["data"]["switchyard.yaml"].as_str().unwrap();
        let parsed = switchyard_control::config::Config::from_yaml(config).unwrap();
        assert_eq!(parsed.listen.port(), 4140);
        assert_eq!(parsed.routes[0].backends[0].endpoints, ["127.0.0.1:8080"]);
        assert!(
            notes.iter().any(|n| n.contains("Service shop")),
            "{notes:?}"
        );
        // Again: nothing changes.
        let (again, notes) = inject(&out, None).unwrap();
        assert_eq!(docs(&again), d);
        assert!(notes[0].contains("already has"), "{notes:?}");
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        let e = inject("kind: [", None).unwrap_err().to_string();
        assert!(e.contains("not YAML"), "{e}");
        let portless = APP.replace(
            "ports: [{ name: http, containerPort: 8080 }]",
            "args: [serve]",
        );
        let e = inject(&portless, None).unwrap_err().to_string();
        assert!(
            e.contains("Deployment shop") && e.contains("--app-port"),
            "{e}"
        );
        let (out, _) = inject(&portless, Some(3000)).unwrap();
        assert!(out.contains("127.0.0.1:3000"), "{out}");
        // Other kinds pass through untouched.
        let (out, notes) = inject(
            "apiVersion: v1\nkind: Secret\nmetadata: { name: s }\n",
            None,
        )
        .unwrap();
        assert_eq!(docs(&out)[0]["kind"], "Secret");
        assert!(notes.is_empty());
    }
}
