//! `loadbalancing`: sends each resource's points to one of several OTLP backends (gateway
//! replicas), chosen by a routing key (default `gen_ai.pool.name`), so that every pool's
//! servers reach the same gateway and its `pool_aggregate` sees the whole pool.
//!
//! The choice is rendezvous hashing (highest random weight) of the key over the backends, with
//! a hash that is the same in every agent (FNV-1a): adding or removing one of N backends moves
//! only the keys that belong to it, about 1/N. Backends come from a static list, from DNS (a
//! headless Service) re-resolved on an interval, or from the Service's EndpointSlices watched
//! through the Kubernetes API (`k8s.rs`). Resources without the key go to the backend of the
//! empty key: one stable default.
//!
//! A batch is split by backend and sent to all of them at once. A backend that cannot be reached
//! (a failure without the backend's own retry hint) is down for `failover.recheck_after`: its
//! part goes at once to each key's next backend in rendezvous order, which is where the key
//! would go were the backend gone, so no other key moves; the keys return when it answers
//! again. A backend that answers "retry later" (a full gateway) is not failed over: the whole
//! batch is retried (the runtime's queue and retry), so a backend that succeeded gets those
//! points again: cumulative points sent twice change nothing at a gateway (the latest wins).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use genai_collector_core::config::duration;
use genai_collector_core::model::{AttributesExt, Batch};
use genai_collector_core::{
    async_trait, BuildContext, CancellationToken, ComponentConfig, ComponentError, ExportError,
    Exporter, ExporterFactory, ValidationError,
};
use serde::Deserialize;

use crate::otlp::{OtlpExporter, OtlpExporterConfig};

#[cfg(feature = "k8s")]
mod k8s;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancingConfig {
    /// The resource attribute whose value picks the backend.
    #[serde(default = "pool_key")]
    pub routing_key: String,
    pub protocol: ProtocolConfig,
    pub resolver: ResolverConfig,
    #[serde(default)]
    pub failover: FailoverConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverConfig {
    /// Send an unreachable backend's keys to their next backend instead of retrying it.
    pub enabled: bool,
    /// How long an unreachable backend is passed over before it is tried again.
    #[serde(with = "duration")]
    pub recheck_after: Duration,
    /// A send to one backend that takes longer is abandoned and the backend counts as
    /// unreachable: a gateway that went away without closing its connections (a pod's address
    /// dropping packets) is failed over instead of holding every batch until the runtime's
    /// `timeout`. Keep it under that `timeout`.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            recheck_after: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
        }
    }
}

fn pool_key() -> String {
    "gen_ai.pool.name".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolConfig {
    /// The `otlp` exporter's settings but `endpoint`, which each backend gives.
    pub otlp: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverConfig {
    #[serde(rename = "static")]
    pub static_list: Option<StaticResolver>,
    pub dns: Option<DnsResolver>,
    pub k8s: Option<K8sResolver>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sResolver {
    /// The gateway's Service, `name.namespace` (`name` alone: namespace `default`).
    pub service: String,
    /// A backend per ready endpoint address and port.
    #[serde(default = "otlp_ports")]
    pub ports: Vec<u16>,
    /// Default: in-cluster, else `KUBECONFIG`.
    pub kubeconfig: Option<std::path::PathBuf>,
}

fn otlp_ports() -> Vec<u16> {
    vec![4317]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticResolver {
    /// `host:port`, or a whole URL (`https://gateway-0:4317`).
    pub hostnames: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsResolver {
    /// A name with one address per backend (a headless Service).
    pub hostname: String,
    #[serde(default = "otlp_port")]
    pub port: u16,
    #[serde(default = "thirty_seconds", with = "duration")]
    pub interval: Duration,
}

fn otlp_port() -> u16 {
    4317
}

fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}

impl LoadBalancingConfig {
    /// The `otlp` exporter's config for one backend.
    fn backend(&self, endpoint: &str) -> Result<OtlpExporterConfig, String> {
        let mut otlp = self.protocol.otlp.clone();
        if otlp.contains_key("endpoint") {
            return Err("protocol.otlp: `endpoint` comes from the resolver".into());
        }
        otlp.insert("endpoint".into(), endpoint.into());
        serde_json::from_value(serde_json::Value::Object(otlp))
            .map_err(|e| format!("protocol.otlp: {e}"))
    }

    /// The https scheme when the backends' settings ask for TLS.
    fn url(&self, host_port: &str) -> String {
        if host_port.contains("://") {
            return host_port.to_owned();
        }
        let tls = self.protocol.otlp.contains_key("tls");
        format!("{}://{host_port}", if tls { "https" } else { "http" })
    }
}

impl ComponentConfig for LoadBalancingConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        let probe = self
            .backend("http://localhost:4317")
            .map_err(|e| ValidationError::field("protocol", e))?;
        probe.validate()?;
        let r = &self.resolver;
        match (&r.static_list, &r.dns, &r.k8s) {
            _ if self.failover.enabled && self.failover.recheck_after.is_zero() => Err(
                ValidationError::field("failover.recheck_after", "must be more than 0s"),
            ),
            _ if self.failover.enabled && self.failover.timeout.is_zero() => Err(
                ValidationError::field("failover.timeout", "must be more than 0s"),
            ),
            (Some(s), None, None) if !s.hostnames.is_empty() => Ok(()),
            (None, Some(d), None) if !d.hostname.is_empty() && !d.interval.is_zero() => Ok(()),
            (None, None, Some(k)) if cfg!(not(feature = "k8s")) => {
                let _ = k;
                Err(ValidationError::field(
                    "resolver.k8s",
                    "this build has no Kubernetes client (the `k8s` feature)",
                ))
            }
            (None, None, Some(k)) if !k.service.is_empty() && !k.ports.is_empty() => Ok(()),
            _ => Err(ValidationError::field(
                "resolver",
                "one of `static: {hostnames: [...]}`, `dns: {hostname: ...}` and `k8s: {service: name.namespace}`",
            )),
        }
    }
}

/// FNV-1a, 64 bits: the same in every agent and every build, unlike std's hasher.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The backend (index into `backends`) that `key` goes to: the one of highest weight.
pub fn pick<S: AsRef<str>>(key: &str, backends: &[S]) -> Option<usize> {
    (0..backends.len()).max_by_key(|&i| (fnv1a(&[key, backends[i].as_ref()]), std::cmp::Reverse(i)))
}

/// One backend: its URL (what the hash weighs), its `otlp` exporter, and until when it is
/// passed over (ms since `Shared::epoch`; 0: up).
struct Backend {
    url: String,
    exporter: OtlpExporter,
    down_until: AtomicU64,
}

type Backends = Vec<Arc<Backend>>;

pub struct LoadBalancingFactory;

impl ExporterFactory for LoadBalancingFactory {
    type Config = LoadBalancingConfig;

    fn kind(&self) -> &'static str {
        "loadbalancing"
    }

    fn description(&self) -> &'static str {
        "routes each pool (a routing key) to one of several OTLP gateways by consistent hashing; static, DNS or EndpointSlice backends, failover"
    }

    fn build(
        &self,
        config: LoadBalancingConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        let shared = Arc::new(Shared {
            backends: RwLock::new(Arc::new(Vec::new())),
            config,
            ctx_id: ctx.id.clone(),
            epoch: Instant::now(),
            stats: ctx.telemetry.find(
                genai_collector_core::ComponentKind::Exporter,
                &ctx.id.to_string(),
            ),
        });
        let stop = CancellationToken::new();
        if let Some(s) = &shared.config.resolver.static_list {
            let urls: Vec<String> = s.hostnames.iter().map(|h| shared.config.url(h)).collect();
            shared.update(urls)?;
        }
        if let Some(d) = shared.config.resolver.dns.clone() {
            tokio::spawn(watch_dns(d, shared.clone(), stop.clone()));
        }
        #[cfg(feature = "k8s")]
        if let Some(k) = shared.config.resolver.k8s.clone() {
            tokio::spawn(k8s::watch(k, shared.clone(), stop.clone()));
        }
        Ok(Box::new(LoadBalancing { shared, stop }))
    }
}

/// Resolves `d` every `interval` and makes its addresses the backends, until `stop`; a name
/// that does not resolve leaves them as they were.
async fn watch_dns(d: DnsResolver, shared: Arc<Shared>, stop: CancellationToken) {
    let target = format!("{}:{}", d.hostname, d.port);
    loop {
        match tokio::net::lookup_host(&target).await {
            Ok(addrs) => {
                let urls = addrs.map(|a| shared.config.url(&a.to_string())).collect();
                shared.update_or_warn(urls);
            }
            Err(e) => {
                tracing::warn!(exporter = %shared.ctx_id, %target, error = %e, "loadbalancing: cannot resolve; keeping the backends");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(d.interval) => {}
        }
    }
}

struct Shared {
    config: LoadBalancingConfig,
    /// Replaced whole on a change, so that a batch reads them with one `Arc` clone.
    backends: RwLock<Arc<Backends>>,
    ctx_id: genai_collector_core::ComponentId,
    epoch: Instant,
    /// Where the backends' number and state are told (`genai_collector_exporter_backends`).
    stats: Option<Arc<genai_collector_core::telemetry::ComponentStats>>,
}

impl Shared {
    /// Makes `urls` (in any order, repeats counting once) the backends: the ones kept keep
    /// their connections.
    fn update(&self, mut urls: Vec<String>) -> Result<(), ComponentError> {
        urls.sort();
        urls.dedup();
        let current: Arc<Backends> = self.backends.read().map(|b| b.clone()).unwrap_or_default();
        if current.iter().map(|b| &b.url).eq(urls.iter()) {
            return Ok(());
        }
        let mut next = Vec::with_capacity(urls.len());
        for url in urls {
            let backend = match current.iter().find(|b| b.url == url) {
                Some(b) => b.clone(),
                None => {
                    let config = self.config.backend(&url).map_err(ComponentError::Config)?;
                    Arc::new(Backend {
                        exporter: OtlpExporter::new(config)?,
                        url,
                        down_until: AtomicU64::new(0),
                    })
                }
            };
            next.push(backend);
        }
        let shown: Vec<&str> = next.iter().map(|b| b.url.as_str()).collect();
        tracing::info!(exporter = %self.ctx_id, backends = ?shown, "loadbalancing: backends");
        if let Ok(mut b) = self.backends.write() {
            *b = Arc::new(next);
        }
        self.report();
        Ok(())
    }

    /// Tells the self-metrics how many backends there are and how many are passed over.
    fn report(&self) {
        let (Some(stats), Ok(backends)) = (&self.stats, self.backends.read()) else {
            return;
        };
        let now = self.now_ms();
        let down = backends
            .iter()
            .filter(|b| b.down_until.load(Ordering::Relaxed) > now)
            .count();
        stats.set_backends(backends.len() as u64, down as u64);
    }

    /// [`Shared::update`] from a resolver, which carries on with the old backends on an error.
    fn update_or_warn(&self, urls: Vec<String>) {
        if let Err(e) = self.update(urls) {
            tracing::warn!(exporter = %self.ctx_id, error = %e, "loadbalancing: backends not updated");
        }
    }

    fn now_ms(&self) -> u64 {
        // 1 past the epoch, so that 0 keeps meaning "up".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Passes `b` over for `recheck_after`; true when it was up until now.
    fn mark_down(&self, b: &Backend) -> bool {
        let until = self.now_ms() + self.config.failover.recheck_after.as_millis() as u64;
        b.down_until.swap(until, Ordering::Relaxed) == 0
    }

    /// Backends not passed over now, as indices; a backend whose time is up is tried again.
    fn up(&self, backends: &[Arc<Backend>]) -> Vec<usize> {
        let now = self.now_ms();
        (0..backends.len())
            .filter(|&i| {
                let until = backends[i].down_until.load(Ordering::Relaxed);
                until == 0 || until <= now
            })
            .collect()
    }
}

struct LoadBalancing {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

/// An unreachable backend, as opposed to one that asked to be retried later.
fn unreachable(e: &ExportError) -> bool {
    matches!(
        e,
        ExportError::Retryable {
            retry_after: None,
            ..
        }
    )
}

#[async_trait]
impl Exporter for LoadBalancing {
    async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
        let shared = &*self.shared;
        let backends: Arc<Backends> = shared
            .backends
            .read()
            .map(|b| b.clone())
            .unwrap_or_default();
        if backends.is_empty() {
            return Err(ExportError::retryable("no backend resolved yet"));
        }
        let key = shared.config.routing_key.as_str();
        let keys: Vec<&str> = batch
            .resource_metrics
            .iter()
            .map(|rm| {
                rm.resource
                    .as_ref()
                    .and_then(|r| r.attributes.get_str(key))
                    .unwrap_or("")
            })
            .collect();
        // Resources (indices into the batch) still to send; failed over, they are sent again.
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let mut failed_over: Vec<usize> = Vec::new();
        // A backend's "retry later" retries the whole batch; a permanent refusal of one part is
        // told only when nothing can be retried.
        let (mut unreached, mut retry, mut permanent) = (None, None, None);
        while !pending.is_empty() {
            let mut up = shared.up(&backends);
            up.retain(|i| !failed_over.contains(i));
            if up.is_empty() {
                // All down: the owners are tried again rather than nothing sent.
                if !failed_over.is_empty() {
                    break;
                }
                up = (0..backends.len()).collect();
            }
            let names: Vec<&str> = up.iter().map(|&i| backends[i].url.as_str()).collect();
            let mut parts: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for &r in &pending {
                if let Some(j) = pick(keys[r], &names) {
                    parts.entry(up[j]).or_default().push(r);
                }
            }
            let whole = parts.len() == 1 && pending.len() == keys.len();
            let (backends, failover) = (&backends, &shared.config.failover);
            let sends = parts.iter().map(|(&b, resources)| async move {
                // One backend for the whole batch (one gateway, or one pool): as it is.
                let body = if whole {
                    batch.encode_request()
                } else {
                    batch.encode_request_of(resources)
                };
                let send = backends[b].exporter.send_encoded(body);
                let result = if failover.enabled {
                    tokio::time::timeout(failover.timeout, send)
                        .await
                        .unwrap_or_else(|_| {
                            Err(ExportError::retryable(format!(
                                "no answer within failover.timeout ({:?})",
                                failover.timeout
                            )))
                        })
                } else {
                    send.await
                };
                (b, result)
            });
            let results = futures_util::future::join_all(sends).await;
            pending.clear();
            for (b, result) in results {
                let backend = &backends[b];
                match result {
                    Ok(()) => {
                        if backend.down_until.swap(0, Ordering::Relaxed) != 0 {
                            tracing::info!(exporter = %shared.ctx_id, backend = %backend.url, "loadbalancing: backend answers again");
                            shared.report();
                        }
                    }
                    Err(e) if shared.config.failover.enabled && unreachable(&e) => {
                        if shared.mark_down(backend) {
                            tracing::warn!(exporter = %shared.ctx_id, backend = %backend.url, error = %e, "loadbalancing: backend unreachable; its keys go to the next backend");
                            shared.report();
                        }
                        failed_over.push(b);
                        pending.extend(&parts[&b]);
                        unreached = Some(e);
                    }
                    Err(e @ ExportError::Retryable { .. }) => retry = Some(e),
                    Err(e) => permanent = Some(e),
                }
            }
        }
        if !pending.is_empty() {
            return Err(unreached.unwrap_or_else(|| ExportError::retryable("no backend")));
        }
        retry.or(permanent).map_or(Ok(()), Err)
    }

    async fn shutdown(&self) -> Result<(), ExportError> {
        self.stop.cancel();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateways(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://gateway-{i}:4317")).collect()
    }

    #[test]
    fn removing_or_adding_a_backend_moves_only_its_keys() {
        let pools: Vec<String> = (0..600).map(|i| format!("pool-{i}")).collect();
        let three = gateways(3);
        let before: Vec<usize> = pools.iter().map(|p| pick(p, &three).unwrap()).collect();
        for g in 0..3 {
            let n = before.iter().filter(|b| **b == g).count();
            assert!((150..=250).contains(&n), "gateway {g} holds {n} of 600");
        }
        // gateway-1 leaves: only its pools move, to the other two.
        let two = vec![three[0].clone(), three[2].clone()];
        for (p, b) in pools.iter().zip(&before) {
            let now = &two[pick(p, &two).unwrap()];
            if *b != 1 {
                assert_eq!(now, &three[*b], "{p} moved without cause");
            }
        }
        // A fourth joins: about a quarter of the pools move to it, and only to it.
        let four = gateways(4);
        let moved = pools
            .iter()
            .zip(&before)
            .filter(|(p, b)| four[pick(p, &four).unwrap()] != three[**b])
            .inspect(|(p, _)| assert_eq!(pick(p, &four), Some(3)))
            .count();
        assert!((100..=200).contains(&moved), "{moved} of 600 moved");
        assert_eq!(pick::<&str>("x", &[]), None);
        assert_eq!(
            fnv1a(&["pool-7", "http://gateway-0:4317"]),
            fnv1a(&["pool-7", "http://gateway-0:4317"])
        );
    }

    #[test]
    fn the_backends_settings_are_the_otlp_exporters_without_endpoint() {
        let yaml = "routing_key: gen_ai.pool.name\nprotocol: { otlp: { compression: none } }\nresolver: { static: { hostnames: [\"gw-0:4317\"] } }\n";
        let c: LoadBalancingConfig = serde_saphyr::from_str(yaml).unwrap();
        c.validate().unwrap();
        assert_eq!(c.url("gw-0:4317"), "http://gw-0:4317");
        let bad = "protocol: { otlp: { endpoint: \"http://x:1\" } }\nresolver: { static: { hostnames: [a:1] } }\n";
        let c: LoadBalancingConfig = serde_saphyr::from_str(bad).unwrap();
        assert!(
            c.validate().is_err(),
            "the endpoint comes from the resolver"
        );
        let none = "protocol: { otlp: {} }\nresolver: {}\n";
        let c: LoadBalancingConfig = serde_saphyr::from_str(none).unwrap();
        assert!(c.validate().is_err(), "a resolver is needed");
    }
}
