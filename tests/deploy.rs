//! The Grafana dashboard and the alert rules in deploy/ ask only for series the collector
//! emits (under the OpenTelemetry → Prometheus name translation), and the rules pass
//! `promtool check rules` (CI installs Debian's prometheus for it).

use std::collections::BTreeSet;
use std::path::Path;

/// The Prometheus name of an OTel metric: dots to underscores, the unit as a suffix unless the
/// name has it, `_total` on counters. (The rules of the OpenTelemetry specification's
/// Prometheus compatibility section, for the units we use.)
fn prometheus_name(name: &str, unit: &str, counter: bool) -> String {
    let mut n = name.replace(['.', '-'], "_");
    let suffix = match unit {
        "%" => "percent",
        "s" => "seconds",
        "By" => "bytes",
        "W" => "watts",
        "1" => "ratio",
        _ => "",
    };
    if !suffix.is_empty() && !n.ends_with(suffix) {
        n = format!("{n}_{suffix}");
    }
    if counter {
        n.push_str("_total");
    }
    n
}

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
        ("gen_ai.pool.servers.ready", "{server}"),
        ("gen_ai.pool.capacity.usage", "%"),
        ("gen_ai.pool.queue.size.average", "{request}"),
        ("gen_ai.pool.kv_cache.usage.average", "%"),
        ("hw.gpu.memory.usage.percent", "%"),
        ("hw.gpu.memory.usage", "By"),
        ("hw.gpu.utilization", "1"),
        ("hw.gpu.power.draw", "W"),
        ("hw.gpu.power.limit", "W"),
        ("up", ""),
    ];
    let counters = [
        ("gen_ai.server.token.usage", "{token}"),
        ("tgi_request_failure", ""),
        ("tgi_request_count", ""),
    ];
    gauges
        .iter()
        .map(|(n, u)| prometheus_name(n, u, false))
        .chain(counters.iter().map(|(n, u)| prometheus_name(n, u, true)))
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
fn name_translation() {
    assert_eq!(
        prometheus_name("gen_ai.server.kv_cache.usage", "%", false),
        "gen_ai_server_kv_cache_usage_percent"
    );
    assert_eq!(
        prometheus_name("gen_ai.server.token.usage", "{token}", true),
        "gen_ai_server_token_usage_total"
    );
    assert_eq!(
        prometheus_name("hw.gpu.memory.usage.percent", "%", false),
        "hw_gpu_memory_usage_percent"
    );
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
}

#[test]
fn the_pipelines_in_the_manifests_validate_and_match_the_helm_chart() {
    let values: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/genai-collector/values.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for role in ["agent", "gateway"] {
        let (text, parsed) = pipeline(&format!("deploy/kubernetes/{role}.yaml"));
        assert_eq!(
            values[role]["config"], parsed,
            "{role}: the Helm chart says the same"
        );
        let file = dir.join(format!("{role}.yaml"));
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_genai-collector"))
            .args(["validate", "-c"])
            .arg(&file)
            .env("NODE_NAME", "gpu-node-1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{role}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
