//! Pod discovery for the scrape receivers (`kubernetes:`): watches pods through the Kubernetes
//! API and turns each running pod into a target, with its pod, namespace and node as resource
//! attributes and its pool from a pod label. Targets follow pods as they come, change and go.
//!
//! The API server being unreachable, or RBAC forbidding the watch, leaves the static targets
//! scraping; the watch is retried with backoff and the error shows in `/healthz`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use genai_collector_core::ValidationError;
use serde::Deserialize;

use super::scheduler::Target;

/// The pod label read for pool membership unless `pool_label` says otherwise. The Gateway API
/// Inference Extension selects a pool's pods with the pool's own selector and defines no pod
/// label; this one is ours to put in the pod template.
pub const DEFAULT_POOL_LABEL: &str = "inference.networking.k8s.io/pool";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// Label selector, as `kubectl -l` takes it (`app=vllm,tier in (prod)`).
    pub label_selector: String,
    /// Only pods on this node: the agent's `${env:NODE_NAME}` from the downward API. Unset:
    /// the whole cluster, as a gateway watches it.
    pub node: Option<String>,
    /// The port to scrape where the pod has no `prometheus.io/port` annotation; pods with
    /// neither are skipped.
    pub port: Option<u16>,
    /// The path where the pod has no `prometheus.io/path` annotation; default the engine's.
    pub path: Option<String>,
    /// The pod label naming its inference pool (`gen_ai.pool.name`).
    pub pool_label: String,
    /// A kubeconfig file, for running outside the cluster; default: the in-cluster service
    /// account, then `$KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            label_selector: String::new(),
            node: None,
            port: None,
            path: None,
            pool_label: DEFAULT_POOL_LABEL.into(),
            kubeconfig: None,
        }
    }
}

impl KubernetesConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if cfg!(not(feature = "k8s")) {
            return Err(ValidationError::field(
                "kubernetes",
                "this build has no Kubernetes support (the `k8s` feature)",
            ));
        }
        if self.node.as_deref() == Some("") {
            return Err(ValidationError::field(
                "kubernetes.node",
                "is empty: set NODE_NAME from the downward API (spec.nodeName), or remove `node` to watch the whole cluster",
            ));
        }
        if self.port == Some(0) {
            return Err(ValidationError::field("kubernetes.port", "must be 1-65535"));
        }
        if let Some(p) = &self.path {
            if !p.starts_with('/') {
                return Err(ValidationError::field(
                    "kubernetes.path",
                    "must start with `/`",
                ));
            }
        }
        Ok(())
    }
}

/// What discovery needs of a pod: a plain view, so the mapping is testable without the API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodView<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub node: Option<&'a str>,
    pub phase: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub labels: Option<&'a BTreeMap<String, String>>,
    pub annotations: Option<&'a BTreeMap<String, String>>,
}

/// The target a pod makes, or why it makes none.
pub fn target_of(
    pod: &PodView<'_>,
    config: &KubernetesConfig,
    default_path: &str,
) -> Result<Target, String> {
    let annotation = |k: &str| pod.annotations.and_then(|a| a.get(k)).map(String::as_str);
    if annotation("prometheus.io/scrape") == Some("false") {
        return Err("annotated prometheus.io/scrape: false".into());
    }
    if pod.phase != Some("Running") {
        return Err(format!(
            "not running (phase {})",
            pod.phase.unwrap_or("unknown")
        ));
    }
    let ip = pod.ip.filter(|ip| !ip.is_empty()).ok_or("no pod IP yet")?;
    let port = match annotation("prometheus.io/port") {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("prometheus.io/port `{p}` is not a port"))?,
        None => config
            .port
            .ok_or("no prometheus.io/port annotation and no `port` in config")?,
    };
    let path = annotation("prometheus.io/path")
        .or(config.path.as_deref())
        .unwrap_or(default_path);
    let scheme = match annotation("prometheus.io/scheme") {
        Some("https") => "https",
        _ => "http",
    };
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    let mut labels = vec![
        ("k8s.pod.name".to_owned(), pod.name.to_owned()),
        ("k8s.namespace.name".to_owned(), pod.namespace.to_owned()),
        ("k8s.pod.uid".to_owned(), pod.uid.to_owned()),
    ];
    if let Some(node) = pod.node {
        labels.push(("k8s.node.name".to_owned(), node.to_owned()));
    }
    if let Some(pool) = pod.labels.and_then(|l| l.get(&config.pool_label)) {
        labels.push(("gen_ai.pool.name".to_owned(), pool.clone()));
    }
    // Built from parts, never by pasting text: an annotation such as `@other-host/` would
    // otherwise turn the pod's address into user info and send the scrape (and its
    // credentials) to another host.
    if !path.starts_with('/') || path.contains(['@', '\\', '#']) {
        return Err(format!(
            "prometheus.io/path `{path}` is not a path (it must start with `/` and hold no `@`, `\\` or `#`)"
        ));
    }
    let mut url = reqwest::Url::parse(&format!("{scheme}://{host}:{port}/"))
        .map_err(|e| format!("pod address `{host}:{port}`: {e}"))?;
    let (path_only, query) = path
        .split_once('?')
        .map_or((path, None), |(p, q)| (p, Some(q)));
    url.set_path(path_only);
    url.set_query(query);
    if url.host_str() != Some(host.as_str()) || url.port_or_known_default() != Some(port) {
        return Err(format!(
            "prometheus.io/path `{path}` would change the host scraped"
        ));
    }
    Target::parse(url.as_str(), path_only, &labels)
}

/// Names the verb RBAC refused, from the API server's "cannot list resource" message.
pub fn forbidden_hint(message: &str) -> Option<String> {
    let verb = message
        .split("cannot ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .to_owned();
    Some(format!(
        "RBAC forbids `{verb}` on pods: give the collector's ServiceAccount get, list and watch on pods (deploy/kubernetes/rbac.yaml)"
    ))
}

#[cfg(feature = "k8s")]
pub use watch::discover;

#[cfg(feature = "k8s")]
mod watch {
    use std::collections::HashMap;

    use futures_util::StreamExt;
    use genai_collector_core::component::error_chain;
    use genai_collector_core::{CancellationToken, Output};
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::WatchStreamExt;
    use tokio::sync::watch as channel;
    use tracing::{debug, info, warn};

    use super::{forbidden_hint, target_of, KubernetesConfig, PodView};
    use crate::scrape::scheduler::Target;

    fn explain(e: &watcher::Error) -> String {
        let text = error_chain(e);
        match forbidden_hint(&text) {
            Some(hint) if text.contains("forbidden") || text.contains("403") => {
                format!("{hint} ({text})")
            }
            _ => text,
        }
    }

    /// Watches pods and publishes the targets they make on `targets` until `stop`.
    pub async fn discover(
        config: KubernetesConfig,
        default_path: String,
        receiver: String,
        output: Output,
        targets: channel::Sender<Vec<Target>>,
        stop: CancellationToken,
    ) {
        let client = loop {
            match genai_collector_core::kubernetes::client(config.kubeconfig.as_deref()).await {
                Ok(c) => break c,
                Err(e) => {
                    warn!(%receiver, error = %e, "pod discovery cannot start; retrying in 30s");
                    output.report_error(format!("kubernetes: {e}"));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
                    }
                }
            }
        };
        let mut wc = watcher::Config::default();
        if !config.label_selector.is_empty() {
            wc = wc.labels(&config.label_selector);
        }
        if let Some(node) = &config.node {
            wc = wc.fields(&format!("spec.nodeName={node}"));
        }
        let apis: Vec<(String, kube::Api<Pod>)> = if config.namespaces.is_empty() {
            vec![(String::new(), kube::Api::all(client))]
        } else {
            config
                .namespaces
                .iter()
                .map(|ns| (ns.clone(), kube::Api::namespaced(client.clone(), ns)))
                .collect()
        };
        let mut streams = futures_util::stream::select_all(apis.into_iter().map(|(ns, api)| {
            watcher::watcher(api, wc.clone())
                .default_backoff()
                .map(move |e| (ns.clone(), e))
                .boxed()
        }));
        // Per namespace stream: pods by uid; a re-list rebuilds its namespace's map.
        let mut pods: HashMap<String, HashMap<String, Target>> = HashMap::new();
        let mut relisting: HashMap<String, HashMap<String, Target>> = HashMap::new();
        loop {
            let (ns, event) = tokio::select! {
                () = stop.cancelled() => return,
                next = streams.next() => match next {
                    Some(n) => n,
                    None => return,
                },
            };
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    let text = explain(&e);
                    warn!(%receiver, error = %text, "pod watch failed; keeping the targets known, retrying");
                    output.report_error(format!("kubernetes: {text}"));
                    continue;
                }
            };
            let changed = match event {
                Event::Init => {
                    relisting.insert(ns.clone(), HashMap::new());
                    false
                }
                Event::InitApply(pod) => {
                    if let Some((uid, t)) = accept(&pod, &config, &default_path, &receiver) {
                        relisting.entry(ns.clone()).or_default().insert(uid, t);
                    }
                    false
                }
                Event::InitDone => {
                    let fresh = relisting.remove(&ns).unwrap_or_default();
                    info!(%receiver, namespace = %ns, targets = fresh.len(), "pods listed");
                    pods.insert(ns.clone(), fresh);
                    true
                }
                Event::Apply(pod) => {
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    let map = pods.entry(ns.clone()).or_default();
                    match accept(&pod, &config, &default_path, &receiver) {
                        Some((uid, t)) => map.insert(uid, t.clone()) != Some(t),
                        None => map.remove(&uid).is_some(),
                    }
                }
                Event::Delete(pod) => {
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    pods.entry(ns.clone()).or_default().remove(&uid).is_some()
                }
            };
            if changed {
                let mut all: Vec<Target> =
                    pods.values().flat_map(|m| m.values().cloned()).collect();
                all.sort_by(|a, b| a.url.cmp(&b.url));
                let _ = targets.send(all);
            }
        }
    }

    fn accept(
        pod: &Pod,
        config: &KubernetesConfig,
        default_path: &str,
        receiver: &str,
    ) -> Option<(String, Target)> {
        let meta = &pod.metadata;
        let status = pod.status.as_ref();
        let view = PodView {
            name: meta.name.as_deref().unwrap_or(""),
            namespace: meta.namespace.as_deref().unwrap_or(""),
            uid: meta.uid.as_deref().unwrap_or(""),
            node: pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            phase: status.and_then(|s| s.phase.as_deref()),
            ip: status.and_then(|s| s.pod_ip.as_deref()),
            labels: meta.labels.as_ref(),
            annotations: meta.annotations.as_ref(),
        };
        match target_of(&view, config, default_path) {
            Ok(t) => Some((view.uid.to_owned(), t)),
            Err(why) => {
                debug!(%receiver, pod = %view.name, namespace = %view.namespace, reason = %why, "pod skipped");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever a pod's annotations say, a target is scraped on the pod's own IP (S7).
        #[test]
        fn annotations_never_move_the_host(
            ip in "(10\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3})|(fd00::[0-9a-f]{1,4})",
            path in "\\PC{0,40}",
            port in "\\PC{0,8}",
            scheme in "\\PC{0,8}",
        ) {
            let annotations = map(&[
                ("prometheus.io/path", &path),
                ("prometheus.io/port", &port),
                ("prometheus.io/scheme", &scheme),
            ]);
            let pod = PodView {
                name: "p",
                namespace: "n",
                uid: "u",
                phase: Some("Running"),
                ip: Some(&ip),
                annotations: Some(&annotations),
                ..Default::default()
            };
            let config = KubernetesConfig { port: Some(8000), ..Default::default() };
            if let Ok(t) = target_of(&pod, &config, "/metrics") {
                let url = reqwest::Url::parse(&t.url).unwrap();
                let host = url.host_str().unwrap().trim_matches(['[', ']']);
                proptest::prop_assert_eq!(host, ip.as_str(), "{}", t.url);
                proptest::prop_assert_eq!(t.host.trim_matches(['[', ']']), ip.as_str());
                proptest::prop_assert!(url.username().is_empty() && url.password().is_none());
            }
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn pods_become_targets_from_annotations_or_config() {
        let labels = map(&[(DEFAULT_POOL_LABEL, "chat"), ("app", "vllm")]);
        let annotations = map(&[("prometheus.io/port", "8000")]);
        let pod = PodView {
            name: "vllm-0",
            namespace: "inference",
            uid: "u-1",
            node: Some("gpu-node-1"),
            phase: Some("Running"),
            ip: Some("10.1.2.3"),
            labels: Some(&labels),
            annotations: Some(&annotations),
        };
        let config = KubernetesConfig::default();
        let t = target_of(&pod, &config, "/metrics").unwrap();
        assert_eq!(t.url, "http://10.1.2.3:8000/metrics");
        let labels: BTreeMap<_, _> = t.labels.iter().cloned().collect();
        assert_eq!(labels["k8s.pod.name"], "vllm-0");
        assert_eq!(labels["k8s.namespace.name"], "inference");
        assert_eq!(labels["k8s.node.name"], "gpu-node-1");
        assert_eq!(labels["gen_ai.pool.name"], "chat");

        let bare = PodView {
            annotations: None,
            ..pod.clone()
        };
        let e = target_of(&bare, &config, "/metrics").unwrap_err();
        assert!(e.contains("no prometheus.io/port"), "{e}");
        let with_port = KubernetesConfig {
            port: Some(3000),
            path: Some("/stats".into()),
            ..Default::default()
        };
        let t = target_of(&bare, &with_port, "/metrics").unwrap();
        assert_eq!(t.url, "http://10.1.2.3:3000/stats");

        let pending = PodView {
            phase: Some("Pending"),
            ..pod.clone()
        };
        assert!(target_of(&pending, &config, "/metrics").is_err());
        let v6 = PodView {
            ip: Some("fd00::5"),
            ..pod.clone()
        };
        assert_eq!(
            target_of(&v6, &config, "/metrics").unwrap().url,
            "http://[fd00::5]:8000/metrics"
        );
        let opted_out = map(&[
            ("prometheus.io/scrape", "false"),
            ("prometheus.io/port", "1"),
        ]);
        let off = PodView {
            annotations: Some(&opted_out),
            ..pod
        };
        assert!(target_of(&off, &config, "/metrics").is_err());
    }

    #[test]
    fn an_annotation_never_changes_the_host_scraped() {
        fn pod(annotations: &BTreeMap<String, String>) -> PodView<'_> {
            PodView {
                name: "evil",
                namespace: "default",
                uid: "u-2",
                node: None,
                phase: Some("Running"),
                ip: Some("10.1.2.3"),
                labels: None,
                annotations: Some(annotations),
            }
        }
        let config = KubernetesConfig::default();
        for path in [
            "@169.254.169.254/latest/meta-data/",
            "@attacker.example/metrics",
            "/x@attacker.example",
            "metrics",
            "\\\\attacker.example/metrics",
            "//attacker.example/metrics",
            "/a#@attacker.example",
        ] {
            let a = map(&[("prometheus.io/port", "8000"), ("prometheus.io/path", path)]);
            match target_of(&pod(&a), &config, "/metrics") {
                Ok(t) => {
                    let url = reqwest::Url::parse(&t.url).unwrap();
                    assert_eq!(url.host_str(), Some("10.1.2.3"), "{path} -> {}", t.url);
                    assert_eq!(url.username(), "", "{path} -> {}", t.url);
                }
                Err(e) => assert!(e.contains("prometheus.io/path"), "{path}: {e}"),
            }
        }
        let a = map(&[
            ("prometheus.io/port", "8000"),
            ("prometheus.io/path", "/metrics?format=prometheus"),
        ]);
        assert_eq!(
            target_of(&pod(&a), &config, "/metrics").unwrap().url,
            "http://10.1.2.3:8000/metrics?format=prometheus",
            "a query is still allowed"
        );
    }

    #[test]
    fn forbidden_names_the_verb() {
        let msg = r#"pods is forbidden: User "system:serviceaccount:monitoring:genai" cannot watch resource "pods" in API group "" at the cluster scope"#;
        let hint = forbidden_hint(msg).unwrap();
        assert!(hint.starts_with("RBAC forbids `watch` on pods"), "{hint}");
        assert_eq!(forbidden_hint("connection refused"), None);
    }
}
