//! The Grafana dashboard and the alert rules in deploy/ ask only for series the collector
//! emits (under the OpenTelemetry → Prometheus name translation), and the rules pass
//! `promtool check rules` (CI installs Debian's prometheus for it). The Kubernetes manifests
//! validate as collector configs and against the Kubernetes schemas, and the Helm chart, rendered
//! and linted by Helm itself, makes the same objects.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use genai_collector_exporters::prometheus::{metric_name, Instrument};

/// What the collector emits that dashboards and alerts may use.
fn emitted() -> BTreeSet<String> {
    let gauges = [
        ("gen_ai.server.kv_cache.usage", "%"),
        ("gen_ai.server.requests.running", "{request}"),
        ("gen_ai.server.requests.waiting", "{request}"),
        ("gen_ai.server.requests.max", "{request}"),
        ("gen_ai.server.capacity.usage", "%"),
        ("gen_ai.server.request.duration", "s"),
        ("gen_ai.server.time_to_first_token", "s"),
        ("gen_ai.server.time_per_output_token", "s"),
        ("gen_ai.server.inter_token_latency", "s"),
        ("gen_ai.server.request.queue.duration", "s"),
        ("gen_ai.pool.servers.ready", "{server}"),
        ("gen_ai.pool.capacity.usage", "%"),
        ("gen_ai.pool.queue.size.average", "{request}"),
        ("gen_ai.pool.requests.waiting", "{request}"),
        ("gen_ai.pool.kv_cache.usage.average", "%"),
        ("gen_ai.server.energy.per_output_token", "J/{token}"),
        ("gen_ai.pool.energy.per_output_token", "J/{token}"),
        ("gen_ai.pool.cost.per_1m_tokens", "USD"),
        ("hw.gpu.idle_allocated", "{gpu}"),
        ("hw.gpu.memory.utilization", "1"),
        ("hw.gpu.utilization", "1"),
        ("hw.power", "W"),
        ("hw.gpu.power.limit", "W"),
        ("hw.temperature", "Cel"),
        ("up", ""),
    ];
    let up_down = [
        ("hw.gpu.memory.usage", "By"),
        ("hw.gpu.memory.limit", "By"),
        ("hw.status", "1"),
    ];
    let counters = [
        ("gen_ai.server.token.usage", "{token}"),
        ("hw.energy", "J"),
        ("hw.errors", "{error}"),
        ("gen_ai.server.requests.finished", "{request}"),
        ("gen_ai.server.requests.failed", "{request}"),
        ("gen_ai.server.preemptions", "{preemption}"),
        ("gen_ai.server.prefix_cache.hits", "{token}"),
        ("gen_ai.server.prefix_cache.queries", "{token}"),
        ("hw.gpu.idle_allocated.cost", "USD"),
    ];
    let named = |list: &[(&str, &str)], instrument| -> Vec<String> {
        list.iter()
            .map(|(n, u)| metric_name(n, u, instrument))
            .collect()
    };
    [
        named(&gauges, Instrument::Gauge),
        named(&up_down, Instrument::Other),
        named(&counters, Instrument::Counter),
    ]
    .concat()
    .into_iter()
    .collect()
}

/// Metric names in a PromQL expression: identifiers outside `{...}` and `by (...)`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut cleaned = String::new();
    let mut depth = 0;
    for c in expr.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ if depth == 0 => cleaned.push(c),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let mut rest = cleaned.as_str();
    while let Some(i) = rest.find("by (") {
        out.extend(idents(&rest[..i]));
        rest = rest[i..].split_once(')').map_or("", |(_, r)| r);
    }
    out.extend(idents(rest));
    out.into_iter()
        .filter(|n| {
            ["gen_ai_", "hw_", "tgi_", "inference_pool_", "up"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .map(|n| n.strip_suffix("_bucket").unwrap_or(&n).to_owned())
        .collect()
}

fn idents(s: &str) -> Vec<String> {
    s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn dashboard_and_alerts_use_emitted_series() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let known = emitted();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/genai-collector.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_owned())
        })
        .collect();
    assert!(
        exprs.len() >= 15,
        "panels for KV cache, queues, running vs max, latencies, tokens, GPUs"
    );
    let rules = std::fs::read_to_string(root.join("prometheus/alerts.yaml")).unwrap();
    exprs.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr: "))
            .map(str::to_owned),
    );
    let mut unknown = BTreeSet::new();
    for e in &exprs {
        for n in metric_names(e) {
            if !known.contains(&n) {
                unknown.insert(n);
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "series the collector does not emit: {unknown:?}"
    );

    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(root.join("prometheus/alerts.yaml"))
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!("promtool not installed: `apt-get install prometheus` (CI does)"),
    }
}

#[test]
fn metric_names_in_promql() {
    assert_eq!(metric_names("histogram_quantile(0.99, sum by (le, gen_ai_request_model) (rate(gen_ai_server_request_duration_seconds_bucket{a=\"b\"}[5m])))"), vec!["gen_ai_server_request_duration_seconds"]);
}

fn docs(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The pipeline YAML in a manifest's ConfigMap, as text and parsed.
fn pipeline(path: &str) -> (String, serde_json::Value) {
    let text = find(&docs(path), "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_owned();
    let parsed = serde_saphyr::from_str(&text).unwrap();
    (text, parsed)
}

#[test]
fn rbac_reads_pods_and_nothing_else() {
    let d = docs("deploy/kubernetes/rbac.yaml");
    let rules = &find(&d, "ClusterRole")["rules"];
    assert_eq!(
        rules,
        &serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    );
    let binding = find(&d, "ClusterRoleBinding");
    assert_eq!(
        binding["subjects"][0]["name"],
        find(&d, "ServiceAccount")["metadata"]["name"]
    );
}

#[test]
fn the_agent_daemonset_is_node_local_and_unprivileged() {
    let d = docs("deploy/kubernetes/agent.yaml");
    let spec = &find(&d, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(spec["hostPID"], false);
    let c = &spec["containers"][0];
    let env = c["env"].as_array().unwrap();
    let node = env.iter().find(|e| e["name"] == "NODE_NAME").unwrap();
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert!(
        c["resources"]["limits"].get("nvidia.com/gpu").is_none(),
        "monitoring takes no GPU from the workloads"
    );
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    let (_, config) = pipeline("deploy/kubernetes/agent.yaml");
    assert_eq!(
        config["receivers"]["vllm"]["kubernetes"]["node"],
        "${env:NODE_NAME}"
    );
    // GPUs are attributed to pods through the kubelet's socket, mounted read-only.
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "pod-resources")
        .unwrap();
    assert_eq!(mount["readOnly"], true);
    let socket = config["receivers"]["nvml"]["pod_resources_socket"]
        .as_str()
        .unwrap();
    assert!(socket.starts_with(&format!("{}/", mount["mountPath"].as_str().unwrap())));
}

/// `genai-collector validate` on a pipeline YAML text.
fn validate_pipeline(name: &str, text: &str) {
    let dir = std::env::temp_dir().join(format!("deploy-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.yaml");
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_genai-collector"))
        .args(["validate", "-c"])
        .arg(&file)
        .env("NODE_NAME", "gpu-node-1")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{name}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_pipelines_in_the_manifests_validate() {
    for path in [
        "deploy/kubernetes/agent.yaml",
        "deploy/kubernetes/gateway.yaml",
        "deploy/examples/llamacpp-inference-pool.yaml",
    ] {
        let (text, _) = pipeline(path);
        validate_pipeline(path.rsplit('/').next().unwrap(), &text);
    }
}

/// A tool installed beside the peers' Python (tests/peers/requirements.txt: Helm comes as a
/// wheel), or on the PATH when `GENAI_PEERS_PYTHON` points elsewhere.
fn peer_tool(name: &str) -> std::path::PathBuf {
    let python = std::env::var_os("GENAI_PEERS_PYTHON").map(std::path::PathBuf::from);
    let dir = match &python {
        Some(p) => p.parent().unwrap().to_owned(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin"),
    };
    let beside = dir.join(name);
    if beside.exists() {
        return beside;
    }
    assert!(
        python.is_some(),
        "{name} comes with tests/peers/requirements.txt: run `scripts/test`"
    );
    name.into()
}

fn run(tool: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(peer_tool(tool))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Objects by (kind, name), each ConfigMap's pipeline parsed so that formatting does not count.
fn objects(docs: Vec<serde_json::Value>) -> BTreeMap<(String, String), serde_json::Value> {
    docs.into_iter()
        .filter(|d| !d.is_null())
        .map(|mut d| {
            if d["kind"] == "ConfigMap" {
                let text = d["data"]["config.yaml"].as_str().unwrap().to_owned();
                d["data"]["config.yaml"] = serde_saphyr::from_str(&text).unwrap();
            }
            let key = (
                d["kind"].as_str().unwrap().to_owned(),
                d["metadata"]["name"].as_str().unwrap().to_owned(),
            );
            (key, d)
        })
        .collect()
}

/// Where two values differ, as `path: left != right` lines.
fn differences(a: &serde_json::Value, b: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    use serde_json::Value::{Array, Object};
    match (a, b) {
        (Object(x), Object(y)) => {
            for k in x.keys().chain(y.keys()).collect::<BTreeSet<_>>() {
                let null = serde_json::Value::Null;
                let (u, v) = (x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null));
                differences(u, v, &format!("{path}.{k}"), out);
            }
        }
        (Array(x), Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                differences(u, v, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} != {b}")),
        _ => {}
    }
}

#[test]
fn the_helm_chart_lints_and_renders_the_manifests() {
    let chart = "deploy/helm/genai-collector";
    let lint = run("helm", &["lint", "--strict", chart]);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");

    let rendered = run(
        "helm",
        &[
            "template",
            "genai-collector",
            chart,
            "--namespace",
            "genai-collector",
        ],
    );
    let mut helm = objects(serde_saphyr::from_multiple(&rendered).unwrap());
    let mut plain = objects(
        ["rbac", "agent", "gateway"]
            .iter()
            .flat_map(|f| docs(&format!("deploy/kubernetes/{f}.yaml")))
            .collect(),
    );
    // Differences by design: `helm install --create-namespace` makes the namespace, and the
    // chart rolls pods when their pipeline changes.
    assert!(plain
        .remove(&("Namespace".into(), "genai-collector".into()))
        .is_some());
    for kind in ["DaemonSet", "Deployment"] {
        let (_, o) = helm.iter_mut().find(|((k, _), _)| k == kind).unwrap();
        let annotations = o["spec"]["template"]["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations")
            .unwrap();
        let sum = annotations["checksum/config"].as_str().unwrap();
        assert!(sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    assert_eq!(
        helm.keys().collect::<Vec<_>>(),
        plain.keys().collect::<Vec<_>>()
    );
    let mut diff = Vec::new();
    for (key, object) in &plain {
        differences(object, &helm[key], &format!("{key:?}"), &mut diff);
    }
    assert!(diff.is_empty(), "manifests != chart:\n{}", diff.join("\n"));

    // Under another release name and namespace the agent still finds its gateway, and what
    // Helm's YAML 1.1 round trip makes of the pipelines is still a valid collector config.
    let other = run(
        "helm",
        &["template", "genai", chart, "--namespace", "monitoring"],
    );
    for (key, object) in objects(serde_saphyr::from_multiple(&other).unwrap()) {
        if key.0 == "ConfigMap" {
            let config = &object["data"]["config.yaml"];
            if key.1 == "genai-agent" {
                assert_eq!(
                    config["exporters"]["loadbalancing"]["resolver"]["dns"]["hostname"],
                    "genai-gateway-headless.monitoring"
                );
            }
            validate_pipeline(&key.1, &serde_json::to_string(config).unwrap());
        }
    }
}

#[test]
fn the_manifests_and_the_chart_pass_the_kubernetes_schemas() {
    let rendered = run(
        "helm",
        &["template", "genai-collector", "deploy/helm/genai-collector"],
    );
    let file = std::env::temp_dir().join(format!("helm-{}.yaml", std::process::id()));
    std::fs::write(&file, rendered).unwrap();
    // The Kubernetes version pod discovery is built for (k8s-openapi's `v1_33`); strict, so an
    // unknown or misplaced field fails.
    let out = run(
        "kubernetes-validate",
        &[
            "--strict",
            "-k",
            "1.33.0",
            "deploy/kubernetes/rbac.yaml",
            "deploy/kubernetes/agent.yaml",
            "deploy/kubernetes/gateway.yaml",
            "deploy/examples/llamacpp-inference-pool.yaml",
            file.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_file(&file);
    assert_eq!(
        out.matches(" passed for resource ").count(),
        10 + 2 + 9,
        "{out}"
    );
}
