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
//! Each backend has its own queue, consumers, retries and (with `sending_queue.storage`)
//! persistent-queue directory, with this exporter's settings, or those under `protocol.otlp`
//! where given. A batch is split by backend into those queues, all or none, so a slow gateway
//! holds up only its own pools until its queue is full. A backend that cannot be reached (a
//! failure without the backend's own retry hint, or no answer within `failover.timeout`) is
//! passed over for `failover.recheck_after`: what its queue holds goes to each key's next
//! backend in rendezvous order, which is where the key would go were the backend gone, so no
//! other key moves; the keys return when it answers again. A backend the resolver no longer
//! lists is retired: its queue, in memory and on disk, is routed to the others the same way,
//! then closed. A backend that answers "retry later" (a full gateway) keeps its part and
//! retries it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use genai_collector_core::config::{duration, ExporterSettings};
use genai_collector_core::model::{AttributesExt, Batch};
use genai_collector_core::runtime::QueuedExporter;
use genai_collector_core::telemetry::{ComponentStats, Telemetry};
use genai_collector_core::{
    async_trait, BuildContext, CancellationToken, ComponentConfig, ComponentError, ComponentId,
    ExportError, Exporter, ExporterFactory, ValidationError,
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
    /// The `otlp` exporter's settings but `endpoint`, which each backend gives; with
    /// `sending_queue`, `retry_on_failure` or `timeout`, each backend's queue takes them in
    /// place of this exporter's own.
    pub otlp: serde_json::Map<String, serde_json::Value>,
}

/// The keys of `protocol.otlp` that set each backend's queue rather than its `otlp` exporter.
const QUEUE_KEYS: [&str; 3] = ["sending_queue", "retry_on_failure", "timeout"];

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
        otlp.retain(|k, _| !QUEUE_KEYS.contains(&k.as_str()));
        otlp.insert("endpoint".into(), endpoint.into());
        serde_json::from_value(serde_json::Value::Object(otlp))
            .map_err(|e| format!("protocol.otlp: {e}"))
    }

    /// Each backend's queue settings: this exporter's, but for the keys `protocol.otlp` gives.
    fn backend_settings(&self, own: &ExporterSettings) -> Result<ExporterSettings, String> {
        let given: serde_json::Map<String, serde_json::Value> = QUEUE_KEYS
            .iter()
            .filter_map(|&k| Some((k.to_owned(), self.protocol.otlp.get(k)?.clone())))
            .collect();
        let mut settings = own.clone();
        if given.is_empty() {
            return Ok(settings);
        }
        let parsed: ExporterSettings =
            serde_json::from_value(serde_json::Value::Object(given.clone()))
                .map_err(|e| format!("protocol.otlp: {e}"))?;
        if given.contains_key("sending_queue") {
            parsed
                .sending_queue
                .validate()
                .map_err(|e| format!("protocol.otlp: {e}"))?;
            settings.sending_queue = parsed.sending_queue;
        }
        if given.contains_key("retry_on_failure") {
            settings.retry_on_failure = parsed.retry_on_failure;
        }
        if given.contains_key("timeout") {
            settings.timeout = parsed.timeout;
        }
        Ok(settings)
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
        self.backend_settings(&ExporterSettings::default())
            .map_err(|e| ValidationError::field("protocol", e))?;
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
    /// Not among the resolved backends: what its queue holds goes to the others.
    retired: AtomicBool,
}

/// A backend and the queue in front of it.
struct Member {
    backend: Arc<Backend>,
    queue: QueuedExporter,
}

type Members = Vec<Arc<Member>>;

pub struct LoadBalancingFactory;

impl ExporterFactory for LoadBalancingFactory {
    type Config = LoadBalancingConfig;

    fn kind(&self) -> &'static str {
        "loadbalancing"
    }

    fn description(&self) -> &'static str {
        "routes each pool (a routing key) to one of several OTLP gateways by consistent hashing, a queue per gateway; static, DNS or EndpointSlice backends, failover"
    }

    fn build(
        &self,
        config: LoadBalancingConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        self.build_with_settings(config, ctx, &ExporterSettings::default())
    }

    fn build_with_settings(
        &self,
        config: LoadBalancingConfig,
        ctx: &BuildContext,
        settings: &ExporterSettings,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        let settings = config
            .backend_settings(settings)
            .map_err(ComponentError::Config)?;
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            current: RwLock::new(Arc::new(Vec::new())),
            members: Mutex::new(BTreeMap::new()),
            config,
            settings,
            ctx_id: ctx.id.clone(),
            epoch: Instant::now(),
            telemetry: ctx.telemetry.clone(),
            stats: ctx.telemetry.find(
                genai_collector_core::ComponentKind::Exporter,
                &ctx.id.to_string(),
            ),
        });
        shared.recover()?;
        let stop = CancellationToken::new();
        if let Some(s) = &shared.config.resolver.static_list {
            let urls: Vec<String> = s.hostnames.iter().map(|h| shared.config.url(h)).collect();
            shared.update(urls)?;
        }
        let mut tasks = vec![tokio::spawn(reap(shared.clone(), stop.clone()))];
        if let Some(d) = shared.config.resolver.dns.clone() {
            tasks.push(tokio::spawn(watch_dns(d, shared.clone(), stop.clone())));
        }
        #[cfg(feature = "k8s")]
        if let Some(k) = shared.config.resolver.k8s.clone() {
            tasks.push(tokio::spawn(k8s::watch(k, shared.clone(), stop.clone())));
        }
        Ok(Box::new(LoadBalancing {
            shared,
            stop,
            tasks: Mutex::new(tasks),
        }))
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

/// Closes the queues of retired backends once they are empty, until `stop`.
async fn reap(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        // Closed and removed under the lock, so that a resolver bringing a backend back finds
        // it either open or gone, never half closed.
        let closed: Vec<(String, Arc<Member>)> = {
            let mut members = shared.lock_members();
            let idle: Vec<String> = members
                .iter()
                .filter(|(_, m)| m.backend.retired.load(Ordering::Relaxed))
                .filter(|(_, m)| m.queue.close_if_idle())
                .map(|(url, _)| url.clone())
                .collect();
            idle.into_iter()
                .filter_map(|url| members.remove_entry(&url))
                .collect()
        };
        for (url, member) in closed {
            member.queue.retire().await;
            tracing::info!(exporter = %shared.ctx_id, backend = %url, "loadbalancing: a backend that left has nothing queued any more; its queue is closed");
        }
    }
}

struct Shared {
    me: Weak<Shared>,
    config: LoadBalancingConfig,
    /// Each backend's queue settings.
    settings: ExporterSettings,
    /// The resolved backends by URL, replaced whole on a change, so that a batch reads them
    /// with one `Arc` clone.
    current: RwLock<Arc<Members>>,
    /// Those and the retired ones whose queues are not yet empty, by URL.
    members: Mutex<BTreeMap<String, Arc<Member>>>,
    ctx_id: ComponentId,
    epoch: Instant,
    telemetry: Telemetry,
    /// Where the backends' number and state are told (`genai_collector_exporter_backends`).
    stats: Option<Arc<ComponentStats>>,
}

impl Shared {
    fn current(&self) -> Arc<Members> {
        self.current.read().map(|b| b.clone()).unwrap_or_default()
    }

    fn lock_members(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Member>>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The self-metrics id of a backend's queue, which also names its persistent-queue
    /// directory: this exporter's id, then the URL without its scheme.
    fn backend_id(&self, url: &str) -> String {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        format!("{}/{rest}", self.ctx_id)
    }

    /// A backend and its queue, started retired.
    fn member(&self, url: &str) -> Result<Arc<Member>, ComponentError> {
        let config = self.config.backend(url).map_err(ComponentError::Config)?;
        let backend = Arc::new(Backend {
            exporter: OtlpExporter::new(config)?,
            url: url.to_owned(),
            down_until: AtomicU64::new(0),
            retired: AtomicBool::new(true),
        });
        let send = BackendSend {
            backend: backend.clone(),
            shared: self.me.clone(),
        };
        let id = self.backend_id(url);
        let queue = QueuedExporter::start(&id, Box::new(send), &self.settings, &self.telemetry)?;
        Ok(Arc::new(Member { backend, queue }))
    }

    /// Opens the persistent queues an earlier run left for backends, retired: what they hold
    /// goes to the backends resolved now (or back to the same one, if it is among them).
    fn recover(&self) -> Result<(), ComponentError> {
        let Some(root) = &self.settings.sending_queue.storage else {
            return Ok(());
        };
        let parent = self.ctx_id.to_string();
        for id in QueuedExporter::left_below(root, &parent) {
            let Some(rest) = id.strip_prefix(&parent).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            let url = self.config.url(rest);
            let member = self.member(&url)?;
            self.lock_members().insert(url, member);
        }
        Ok(())
    }

    /// Makes `urls` (in any order, repeats counting once) the backends: the ones kept keep
    /// their connections and queues, the others are retired.
    fn update(&self, mut urls: Vec<String>) -> Result<(), ComponentError> {
        urls.sort();
        urls.dedup();
        if self
            .current()
            .iter()
            .map(|m| &m.backend.url)
            .eq(urls.iter())
        {
            return Ok(());
        }
        let mut members = self.lock_members();
        let mut next = Vec::with_capacity(urls.len());
        for url in &urls {
            let member = match members.get(url) {
                Some(m) => m.clone(),
                None => {
                    let m = self.member(url)?;
                    members.insert(url.clone(), m.clone());
                    m
                }
            };
            next.push(member);
        }
        for (url, m) in members.iter() {
            let listed = urls.binary_search(url).is_ok();
            m.backend.retired.store(!listed, Ordering::Relaxed);
        }
        tracing::info!(exporter = %self.ctx_id, backends = ?urls, "loadbalancing: backends");
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(next);
        }
        drop(members);
        self.report();
        Ok(())
    }

    /// Tells the self-metrics how many backends there are and how many are passed over.
    fn report(&self) {
        let Some(stats) = &self.stats else { return };
        let current = self.current();
        let now = self.now_ms();
        let down = current
            .iter()
            .filter(|m| self.is_down(&m.backend, now))
            .count();
        stats.set_backends(current.len() as u64, down as u64);
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

    fn is_down(&self, b: &Backend, now: u64) -> bool {
        b.down_until.load(Ordering::Relaxed) > now
    }

    /// Passes `b` over for `recheck_after`; true when it was up until now.
    fn mark_down(&self, b: &Backend) -> bool {
        let until = self.now_ms() + self.config.failover.recheck_after.as_millis() as u64;
        b.down_until.swap(until, Ordering::Relaxed) == 0
    }

    /// Queues each resource of `batch` on its key's backend among those up, other than
    /// `from` (a backend handing its batch on): in every queue it goes to, or in none, so
    /// that a retry sends nothing twice. Waits for room.
    async fn route(&self, batch: &Batch, from: Option<&Backend>) -> Result<(), ExportError> {
        let current = self.current();
        if current.is_empty() {
            return Err(ExportError::retryable("no backend resolved yet"));
        }
        let now = self.now_ms();
        let mut up: Vec<&Member> = current
            .iter()
            .map(|m| &**m)
            .filter(|m| !self.is_down(&m.backend, now))
            .filter(|m| !from.is_some_and(|f| std::ptr::eq(f, &*m.backend)))
            .collect();
        if up.is_empty() {
            if from.is_some() {
                return Err(ExportError::retryable("no other backend is up"));
            }
            // All down: the owners are tried again rather than nothing sent.
            up = current.iter().map(|m| &**m).collect();
        }
        let names: Vec<&str> = up.iter().map(|m| m.backend.url.as_str()).collect();
        let key = self.config.routing_key.as_str();
        let mut parts: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (r, rm) in batch.resource_metrics.iter().enumerate() {
            let k = rm.resource.as_ref().and_then(|r| r.attributes.get_str(key));
            if let Some(j) = pick(k.unwrap_or(""), &names) {
                parts.entry(j).or_default().push(r);
            }
        }
        let whole = parts.len() == 1;
        let mut rooms = Vec::with_capacity(parts.len());
        for (&j, resources) in &parts {
            let part = if whole {
                batch.clone()
            } else {
                Batch {
                    resource_metrics: resources
                        .iter()
                        .map(|&r| batch.resource_metrics[r].clone())
                        .collect(),
                }
            };
            let Some(room) = up[j].queue.reserve(&part).await else {
                // Rooms taken so far are given back as they drop.
                return Err(ExportError::retryable(format!(
                    "loadbalancing: the queue of {} is closed",
                    names[j]
                )));
            };
            rooms.push((room, part));
        }
        for (room, part) in rooms {
            room.commit(Arc::new(part)).await;
        }
        Ok(())
    }
}

struct LoadBalancing {
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// The resolver and the reaper, which hold `shared` until they end.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
    /// Done once every part is in its backend's queue; the backends' consumers send them.
    async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
        self.shared.route(batch, None).await
    }

    async fn shutdown(&self) -> Result<(), ExportError> {
        self.stop.cancel();
        let members: Vec<Arc<Member>> = self.shared.lock_members().values().cloned().collect();
        let (retired, resolved): (Vec<_>, Vec<_>) = members
            .iter()
            .partition(|m| m.backend.retired.load(Ordering::Relaxed));
        // Retired first: they hand their batches to the resolved, whose queues still take them.
        futures_util::future::join_all(retired.iter().map(|m| m.queue.stop())).await;
        futures_util::future::join_all(resolved.iter().map(|m| m.queue.stop())).await;
        // Once they end, dropping this exporter frees the persistent queues' directories at
        // once, for a reloaded config's exporter to open.
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        futures_util::future::join_all(tasks).await;
        Ok(())
    }
}

/// What a backend's queue sends through: the backend itself, or, when it is retired or
/// unreachable, the backends its keys go to instead.
struct BackendSend {
    backend: Arc<Backend>,
    shared: Weak<Shared>,
}

#[async_trait]
impl Exporter for BackendSend {
    async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
        let Some(shared) = self.shared.upgrade() else {
            return Err(ExportError::retryable("the loadbalancing exporter stopped"));
        };
        let b = &*self.backend;
        let failover = &shared.config.failover;
        let retired = b.retired.load(Ordering::Relaxed);
        let down = failover.enabled && shared.is_down(b, shared.now_ms());
        if (retired || down) && shared.route(batch, Some(b)).await.is_ok() {
            return Ok(());
        }
        // No other backend takes it: this one is tried, even retired (a gateway that stopped
        // being listed may well still be there).
        let send = b.exporter.export(batch);
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
        match result {
            Ok(()) => {
                if b.down_until.swap(0, Ordering::Relaxed) != 0 {
                    tracing::info!(exporter = %shared.ctx_id, backend = %b.url, "loadbalancing: backend answers again");
                    shared.report();
                }
                Ok(())
            }
            Err(e) if failover.enabled && unreachable(&e) => {
                if shared.mark_down(b) {
                    tracing::warn!(exporter = %shared.ctx_id, backend = %b.url, error = %e, "loadbalancing: backend unreachable; its keys go to the next backend");
                    shared.report();
                }
                shared.route(batch, Some(b)).await.map_err(|_| e)
            }
            Err(e) => Err(e),
        }
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
        // Queue keys under protocol.otlp set the backends' queues; the rest is inherited.
        let own = "protocol: { otlp: { timeout: 2s, sending_queue: { num_consumers: 2 } } }\nresolver: { static: { hostnames: [a:1] } }\n";
        let c: LoadBalancingConfig = serde_saphyr::from_str(own).unwrap();
        c.validate().unwrap();
        c.backend("http://a:1")
            .expect("queue keys are not the otlp exporter's");
        let mut inherited = ExporterSettings::default();
        inherited.retry_on_failure.initial_interval = Duration::from_millis(100);
        inherited.sending_queue.num_consumers = 7;
        let b = c.backend_settings(&inherited).unwrap();
        assert_eq!(b.timeout, Duration::from_secs(2));
        assert_eq!(b.sending_queue.num_consumers, 2);
        assert_eq!(b.retry_on_failure, inherited.retry_on_failure);
        assert_eq!(
            c.backend_settings(&ExporterSettings::default())
                .unwrap()
                .timeout,
            Duration::from_secs(2)
        );
        let bad = "protocol: { otlp: { sending_queue: { num_consumers: 0 } } }\nresolver: { static: { hostnames: [a:1] } }\n";
        let c: LoadBalancingConfig = serde_saphyr::from_str(bad).unwrap();
        assert!(c.validate().is_err(), "a backend queue without consumers");
        let none = "protocol: { otlp: {} }\nresolver: {}\n";
        let c: LoadBalancingConfig = serde_saphyr::from_str(none).unwrap();
        assert!(c.validate().is_err(), "a resolver is needed");
    }
}
