//! `efficiency`: what a token costs on the node's own GPUs, in joules, GPU-seconds and money,
//! and which GPUs sit allocated but idle.
//!
//! It joins, in one pipeline, the `nvml` receiver's GPUs (`hw.energy`, `hw.gpu.utilization`,
//! per-process memory) with the engines' normalised token counters
//! (`gen_ai.server.token.usage`). An engine's GPUs are, in this order: the ones `gpus` names for
//! its `service.instance.id`; on Kubernetes, those the kubelet allocated to its pod; else, for an
//! engine on this machine, those whose compute processes are in the process tree of the process
//! listening on its port, a GPU that also runs others' processes split by their SM utilisation
//! (where the driver samples it). A GPU two engines claim otherwise is shared: neither gets
//! it, and both skip.
//!
//! Every `interval` per engine, from the deltas since the last evaluation: energy per token and
//! per output token, GPU-seconds per 1k tokens, and with a price cost per 1M tokens; and the
//! counters `gen_ai.server.energy`, `gen_ai.server.gpu.time` and `gen_ai.server.cost` that
//! `pool_aggregate` and dashboards divide by tokens over any window. A counter that went back
//! (driver reload, engine restart), GPUs that changed hands, or a shared GPU skips the interval:
//! nothing negative or infinite is emitted, and `genai_collector_processor_skipped_intervals_total`
//! counts it.

mod processes;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use genai_collector_core::config::duration;
use genai_collector_core::model::any_value::Value;
use genai_collector_core::model::{
    attr, attr_str, display_value, kv, number_point, number_value, server_identity, AnyValue,
    AttributesExt, Batch, KeyValue, Metric, MetricExt,
};
use genai_collector_core::telemetry::ComponentStats;
use genai_collector_core::{
    BuildContext, ComponentConfig, ComponentError, Processor, ProcessorFactory, ValidationError,
};
use serde::Deserialize;
use tracing::{debug, info, warn};

/// A GPU named by index (`0`) or UUID (`GPU-…`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GpuRef {
    Index(i64),
    Uuid(String),
}

/// A price per GPU-hour for GPUs (or engines) whose attributes match.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Attribute values the GPU's or its engine's resource must have (`hw.model`,
    /// `k8s.node.name`, `gen_ai.pool.name`, ...); empty matches every GPU.
    #[serde(default, rename = "match")]
    pub matches: BTreeMap<String, String>,
    pub price_per_gpu_hour: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdleConfig {
    /// Utilisation (0..1) under which an allocated GPU is idle.
    pub utilization_below: f64,
    /// How long it must stay under before it is reported.
    #[serde(rename = "for", with = "duration")]
    pub window: Duration,
}

impl Default for IdleConfig {
    fn default() -> Self {
        Self {
            utilization_below: 0.05,
            window: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EfficiencyConfig {
    /// Shortest window per evaluation: token counters move in steps, so short windows are noisy.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// The unit of prices and costs.
    pub currency: String,
    /// Prices per GPU-hour; the first that matches a GPU applies.
    pub prices: Vec<Price>,
    /// GPUs by engine `service.instance.id` (`host:port`), over any discovery.
    pub gpus: BTreeMap<String, Vec<GpuRef>>,
    /// Find a local engine's GPUs through its listening process and NVML's process list.
    pub local_processes: bool,
    pub idle: IdleConfig,
    /// Engines tracked at most (any client that can push names them).
    pub max_engines: usize,
}

impl Default for EfficiencyConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            currency: "USD".into(),
            prices: Vec::new(),
            gpus: BTreeMap::new(),
            local_processes: true,
            idle: IdleConfig::default(),
            max_engines: 1000,
        }
    }
}

impl ComponentConfig for EfficiencyConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.interval.is_zero() {
            return Err(ValidationError::field("interval", "must be more than 0s"));
        }
        if self.currency.is_empty() {
            return Err(ValidationError::field("currency", "must not be empty"));
        }
        if let Some(p) = self
            .prices
            .iter()
            .find(|p| !p.price_per_gpu_hour.is_finite() || p.price_per_gpu_hour < 0.0)
        {
            return Err(ValidationError::field(
                "prices",
                format!(
                    "price_per_gpu_hour must be 0 or more, not {}",
                    p.price_per_gpu_hour
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.idle.utilization_below) {
            return Err(ValidationError::field(
                "idle",
                "utilization_below is a ratio between 0 and 1",
            ));
        }
        Ok(())
    }
}

pub struct EfficiencyFactory;

impl ProcessorFactory for EfficiencyFactory {
    type Config = EfficiencyConfig;

    fn kind(&self) -> &'static str {
        "efficiency"
    }

    fn description(&self) -> &'static str {
        "joins GPUs to engines: energy and GPU-seconds per token, cost per 1M tokens, idle allocated GPUs"
    }

    fn build(
        &self,
        config: &EfficiencyConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError> {
        let stats = ctx
            .pipeline
            .as_deref()
            .and_then(|p| ctx.telemetry.find_processor(&ctx.id.to_string(), p));
        Ok(Box::new(Efficiency::new(config.clone(), stats)))
    }
}

/// Why an interval gave no figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    NoGpus,
    SharedGpu,
    GpusChanged,
    EnergyReset,
    TokenReset,
    NoTokens,
}

impl Skip {
    fn as_str(self) -> &'static str {
        match self {
            Skip::NoGpus => "no GPU found for the engine",
            Skip::SharedGpu => "a GPU is shared with another engine",
            Skip::GpusChanged => "the engine's GPUs changed",
            Skip::EnergyReset => "a GPU's energy counter went back (driver reload)",
            Skip::TokenReset => "the token counters went back (engine restart)",
            Skip::NoTokens => "the engine reports no token counters",
        }
    }
}

/// The latest reading of one GPU.
#[derive(Debug, Clone, Default)]
struct Gpu {
    index: Option<i64>,
    resource: Vec<KeyValue>,
    time: u64,
    energy: Option<f64>,
    utilization: Option<f64>,
    pids: Vec<u32>,
    /// SM utilisation (0..1) by process, where the driver samples it.
    process_utilization: HashMap<u32, f64>,
    idle_since: Option<u64>,
    idle_seconds: f64,
    idle_cost: f64,
    /// When the GPU's owner claimed it, and the owner's key.
    owner: Option<(String, u64)>,
}

/// An energy reading: (time, joules).
type Reading = (u64, f64);

#[derive(Debug, Clone)]
struct Baseline {
    time: u64,
    tokens: (f64, f64),
    gpus: BTreeMap<String, Reading>,
}

/// The figures of one evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    pub joules: f64,
    pub gpu_seconds: f64,
    pub cost: Option<f64>,
    pub input_tokens: f64,
    pub output_tokens: f64,
}

#[derive(Debug, Default)]
struct Engine {
    start: u64,
    baseline: Option<Baseline>,
    energy: f64,
    gpu_seconds: f64,
    cost: f64,
    priced: bool,
    last: Option<Window>,
    skip: Option<Skip>,
    pid: Option<(u32, u64)>,
    /// The GPUs of its last evaluation.
    gpus: Vec<String>,
    /// The model its token counters name, when they name one.
    model: Option<String>,
    /// Its latest batch's time.
    seen: u64,
}

pub struct Efficiency {
    config: EfficiencyConfig,
    stats: Option<std::sync::Arc<ComponentStats>>,
    proc_root: PathBuf,
    gpus: HashMap<String, Gpu>,
    engines: HashMap<String, Engine>,
    ignored: u64,
    /// When `expire` last ran.
    swept: u64,
}

const NS: f64 = 1e9;

impl Efficiency {
    pub fn new(config: EfficiencyConfig, stats: Option<std::sync::Arc<ComponentStats>>) -> Self {
        Self {
            config,
            stats,
            proc_root: PathBuf::from("/proc"),
            gpus: HashMap::new(),
            engines: HashMap::new(),
            ignored: 0,
            swept: 0,
        }
    }

    /// Forgets engines and GPUs not heard from for ten intervals (pods come and go), at most
    /// once an interval.
    fn expire(&mut self, now: u64) {
        let interval = self.config.interval.as_nanos() as u64;
        if now.saturating_sub(self.swept) < interval {
            return;
        }
        self.swept = now;
        let keep = |seen: u64| now.saturating_sub(seen) < 10 * interval;
        self.engines.retain(|_, e| keep(e.seen));
        self.gpus.retain(|_, g| keep(g.time));
    }

    /// Takes a GPU's readings; returns its UUID and the time of its previous reading.
    fn observe_gpu(
        &mut self,
        resource: &[KeyValue],
        metrics: &[Metric],
    ) -> Option<(String, Option<u64>)> {
        let uuid = attr_str(resource, "hw.id")?.to_owned();
        let g = self.gpus.entry(uuid.clone()).or_default();
        let previous = (g.time > 0).then_some(g.time);
        g.index = attr(resource, "gpu.index").and_then(int);
        g.resource = resource.to_vec();
        let mut pids = Vec::new();
        let mut process_utilization = HashMap::new();
        for m in metrics {
            for p in m.number_points() {
                g.time = g.time.max(p.time_unix_nano);
                match m.name.as_str() {
                    "hw.energy" => g.energy = number_value(p),
                    "hw.gpu.utilization"
                        if p.attributes
                            .get_str("hw.gpu.task")
                            .is_none_or(|t| t == "general") =>
                    {
                        g.utilization = number_value(p);
                    }
                    "hw.gpu.process.memory.usage" => {
                        if let Some(pid) = p.attributes.get_attr("process.pid").and_then(int) {
                            pids.push(pid as u32);
                        }
                    }
                    "hw.gpu.process.utilization" => {
                        let pid = p.attributes.get_attr("process.pid").and_then(int);
                        if let (Some(pid), Some(v)) = (pid, number_value(p)) {
                            process_utilization.insert(pid as u32, v);
                        }
                    }
                    _ => {}
                }
            }
        }
        g.pids = pids;
        g.process_utilization = process_utilization;
        Some((uuid, previous))
    }

    /// The GPUs an engine runs on, each with the engine's share of it (1 unless split by
    /// per-process utilisation), or why none can be attributed to it.
    fn gpus_of(
        &mut self,
        key: &str,
        resource: &[KeyValue],
        now: u64,
    ) -> Result<Vec<(String, f64)>, Skip> {
        let found: Vec<(String, f64)> = if let Some(refs) = self.config.gpus.get(key) {
            self.gpus
                .iter()
                .filter(|(uuid, g)| {
                    refs.iter().any(|r| match r {
                        GpuRef::Index(i) => g.index == Some(*i),
                        GpuRef::Uuid(u) => u == *uuid,
                    })
                })
                .map(|(u, _)| (u.clone(), 1.0))
                .collect()
        } else if let (Some(ns), Some(pod)) = (
            attr_str(resource, "k8s.namespace.name"),
            attr_str(resource, "k8s.pod.name"),
        ) {
            self.gpus
                .iter()
                .filter(|(_, g)| {
                    attr_str(&g.resource, "k8s.namespace.name") == Some(ns)
                        && attr_str(&g.resource, "k8s.pod.name") == Some(pod)
                })
                .map(|(u, _)| (u.clone(), 1.0))
                .collect()
        } else {
            self.local_gpus(key, resource, now)?
        };
        if found.is_empty() {
            return Err(Skip::NoGpus);
        }
        // Claims last three intervals: an engine that stopped reporting frees its GPUs. A GPU
        // split by utilisation is shared knowingly: no claim.
        let fresh = 3 * self.config.interval.as_nanos() as u64;
        for (uuid, _) in found.iter().filter(|(_, share)| *share == 1.0) {
            let g = self.gpus.get_mut(uuid).expect("found above");
            match &g.owner {
                Some((other, at)) if other != key && now.saturating_sub(*at) < fresh => {
                    return Err(Skip::SharedGpu)
                }
                _ => g.owner = Some((key.to_owned(), now)),
            }
        }
        Ok(found)
    }

    /// A local engine's GPUs: those running a process in the tree of the process listening on
    /// its port. A GPU that also runs others' processes is split by the processes' SM
    /// utilisation where the driver samples it, else shared.
    fn local_gpus(
        &mut self,
        key: &str,
        resource: &[KeyValue],
        now: u64,
    ) -> Result<Vec<(String, f64)>, Skip> {
        if !self.config.local_processes {
            return Ok(Vec::new());
        }
        let (Some(host), Some(port)) = (
            attr_str(resource, "server.address"),
            attr(resource, "server.port").and_then(int),
        ) else {
            return Ok(Vec::new());
        };
        if !processes::is_local(&self.proc_root, host) {
            return Ok(Vec::new());
        }
        let root = &self.proc_root;
        let engine = self.engines.get_mut(key).expect("observed before");
        // A lookup walks every process's descriptors: keep it for a minute while the PID lives.
        let cached = engine.pid.filter(|(pid, at)| {
            now.saturating_sub(*at) < 60 * NS as u64 && root.join(pid.to_string()).exists()
        });
        let pid = match cached {
            Some((pid, _)) => pid,
            None => match processes::listening_pid(root, port as u16) {
                Some(pid) => {
                    engine.pid = Some((pid, now));
                    pid
                }
                None => return Ok(Vec::new()),
            },
        };
        let mut found = Vec::new();
        for (uuid, g) in &self.gpus {
            let (ours, others): (Vec<u32>, Vec<u32>) = g
                .pids
                .iter()
                .partition(|p| processes::same_tree(root, pid, **p));
            if ours.is_empty() {
                continue;
            }
            if others.is_empty() {
                found.push((uuid.clone(), 1.0));
                continue;
            }
            let util = |pids: &[u32]| -> Option<f64> {
                pids.iter()
                    .map(|p| g.process_utilization.get(p).copied())
                    .sum()
            };
            match (util(&ours), util(&others)) {
                (Some(a), Some(b)) if a + b > 0.0 => found.push((uuid.clone(), a / (a + b))),
                _ => return Err(Skip::SharedGpu),
            }
        }
        Ok(found)
    }

    fn price(&self, gpu: &[KeyValue], engine: &[KeyValue]) -> Option<f64> {
        self.config
            .prices
            .iter()
            .find(|p| {
                p.matches.iter().all(|(k, v)| {
                    [gpu, engine]
                        .iter()
                        .any(|attrs| attr(attrs, k).is_some_and(|a| display_value(a) == *v))
                })
            })
            .map(|p| p.price_per_gpu_hour)
    }

    /// Evaluates an engine's window when it is due; the figures land in `engine.last`.
    fn evaluate(&mut self, key: &str, resource: &[KeyValue], tokens: Option<(f64, f64)>, now: u64) {
        let skip = self.try_evaluate(key, resource, tokens, now).err();
        let engine = self.engines.get_mut(key).expect("observed before");
        // An engine without GPUs or token counters is a normal case (no driver here, Ollama):
        // said at debug level; a window lost to a reset or a shared GPU is a warning.
        let counted = skip.filter(|s| !matches!(s, Skip::NoGpus | Skip::NoTokens));
        if skip != engine.skip {
            match (skip, counted) {
                (Some(s), Some(_)) => warn!(
                    engine = key,
                    reason = s.as_str(),
                    "efficiency: interval skipped"
                ),
                (Some(s), None) => {
                    debug!(engine = key, reason = s.as_str(), "efficiency: no figures")
                }
                (None, _) if engine.skip.is_some() => {
                    info!(engine = key, "efficiency: figures again")
                }
                (None, _) => {}
            }
            engine.skip = skip;
        }
        if counted.is_some() {
            if let Some(stats) = &self.stats {
                stats.add_skipped_intervals(1);
            }
        }
    }

    fn try_evaluate(
        &mut self,
        key: &str,
        resource: &[KeyValue],
        tokens: Option<(f64, f64)>,
        now: u64,
    ) -> Result<(), Skip> {
        let tokens = tokens.ok_or(Skip::NoTokens)?;
        let due = self.engines[key]
            .baseline
            .as_ref()
            .is_none_or(|b| now.saturating_sub(b.time) >= self.config.interval.as_nanos() as u64);
        if !due {
            return Ok(());
        }
        let gpus = match self.gpus_of(key, resource, now) {
            Ok(g) => g,
            Err(e) => {
                let engine = self.engines.get_mut(key).expect("observed");
                engine.baseline = None;
                engine.gpus.clear();
                return Err(e);
            }
        };
        let readings: BTreeMap<String, Reading> = gpus
            .iter()
            .filter_map(|(u, _)| {
                let g = &self.gpus[u];
                Some((u.clone(), (g.time, g.energy?)))
            })
            .collect();
        self.engines.get_mut(key).expect("observed").gpus =
            gpus.iter().map(|(u, _)| u.clone()).collect();
        let shares: HashMap<String, f64> = gpus.into_iter().collect();
        let baseline = Baseline {
            time: now,
            tokens,
            gpus: readings,
        };
        let prices: Vec<Option<f64>> = baseline
            .gpus
            .keys()
            .map(|u| self.price(&self.gpus[u].resource, resource))
            .collect();
        let engine = self.engines.get_mut(key).expect("observed");
        let Some(before) = engine.baseline.replace(baseline.clone()) else {
            return Ok(());
        };
        if before.gpus.keys().ne(baseline.gpus.keys()) {
            return Err(Skip::GpusChanged);
        }
        if baseline
            .gpus
            .iter()
            .any(|(u, (t, _))| *t <= before.gpus[u].0)
        {
            // No GPU reading since the last window: wait for one rather than count 0 J.
            engine.baseline = Some(before);
            return Ok(());
        }
        let mut w = Window {
            input_tokens: tokens.0 - before.tokens.0,
            output_tokens: tokens.1 - before.tokens.1,
            ..Window::default()
        };
        if w.input_tokens < 0.0 || w.output_tokens < 0.0 {
            return Err(Skip::TokenReset);
        }
        let mut cost = 0.0;
        let mut priced = false;
        for ((u, (t, j)), price) in baseline.gpus.iter().zip(&prices) {
            let (t0, j0) = before.gpus[u];
            if j < &j0 {
                return Err(Skip::EnergyReset);
            }
            let share = shares[u];
            let seconds = (t - t0) as f64 / NS * share;
            w.joules += (j - j0) * share;
            w.gpu_seconds += seconds;
            if let Some(p) = price {
                cost += seconds / 3600.0 * p;
                priced = true;
            }
        }
        w.cost = priced.then_some(cost);
        engine.energy += w.joules;
        engine.gpu_seconds += w.gpu_seconds;
        engine.cost += cost;
        engine.priced |= priced;
        engine.last = Some(w);
        Ok(())
    }

    /// The engine's figures, as metrics on its resource.
    fn engine_metrics(&self, key: &str, attrs: &[KeyValue], now: u64) -> Vec<Metric> {
        let e = &self.engines[key];
        let point = |v: f64| number_point(now, v, attrs.to_vec());
        let counter = |v: f64| {
            let mut p = point(v);
            p.start_time_unix_nano = e.start;
            vec![p]
        };
        let currency = self.config.currency.as_str();
        let mut m = Vec::new();
        if e.baseline.is_none() && e.last.is_none() {
            return m;
        }
        m.push(Metric::sum(
            "gen_ai.server.energy",
            "J",
            true,
            counter(e.energy),
        ));
        m.push(Metric::sum(
            "gen_ai.server.gpu.time",
            "s",
            true,
            counter(e.gpu_seconds),
        ));
        if !e.gpus.is_empty() {
            let window = self.config.idle.window.as_nanos() as u64;
            let idle = e
                .gpus
                .iter()
                .filter_map(|u| self.gpus.get(u))
                .filter(|g| {
                    g.idle_since
                        .is_some_and(|s| g.time.saturating_sub(s) >= window)
                })
                .count();
            m.push(Metric::gauge(
                "gen_ai.server.gpus",
                "{gpu}",
                vec![point(e.gpus.len() as f64)],
            ));
            m.push(Metric::gauge(
                "gen_ai.server.gpus.idle",
                "{gpu}",
                vec![point(idle as f64)],
            ));
        }
        if e.priced {
            m.push(Metric::sum(
                "gen_ai.server.cost",
                currency,
                true,
                counter(e.cost),
            ));
        }
        let Some(w) = e.last.filter(|_| e.skip.is_none()) else {
            return m;
        };
        let all = w.input_tokens + w.output_tokens;
        let mut ratio = |name: &str, unit: &str, num: Option<f64>, den: f64, scale: f64| {
            if let Some(n) = num.filter(|_| den > 0.0) {
                m.push(Metric::gauge(name, unit, vec![point(n / den * scale)]));
            }
        };
        ratio(
            "gen_ai.server.energy.per_token",
            "J/{token}",
            Some(w.joules),
            all,
            1.0,
        );
        ratio(
            "gen_ai.server.energy.per_output_token",
            "J/{token}",
            Some(w.joules),
            w.output_tokens,
            1.0,
        );
        ratio(
            "gen_ai.server.gpu.time.per_1k_tokens",
            "s",
            Some(w.gpu_seconds),
            all,
            1e3,
        );
        ratio(
            "gen_ai.server.cost.per_1m_tokens",
            currency,
            w.cost,
            all,
            1e6,
        );
        ratio(
            "gen_ai.server.cost.per_1m_output_tokens",
            currency,
            w.cost,
            w.output_tokens,
            1e6,
        );
        m
    }

    /// An allocated GPU's idle state, as metrics on its resource; none for an unallocated one.
    fn idle_metrics(&mut self, uuid: &str, previous: Option<u64>) -> Vec<Metric> {
        let fresh = 3 * self.config.interval.as_nanos() as u64;
        let window = self.config.idle.window.as_nanos() as u64;
        let below = self.config.idle.utilization_below;
        let g = &self.gpus[uuid];
        let owner = g
            .owner
            .as_ref()
            .filter(|(_, at)| g.time.saturating_sub(*at) < fresh)
            .map(|(k, _)| k.clone());
        let allocated = owner.is_some() || attr_str(&g.resource, "k8s.pod.name").is_some();
        let price = self.price(&g.resource, &[]);
        let currency = self.config.currency.clone();
        let g = self.gpus.get_mut(uuid).expect("observed");
        let (Some(util), true) = (g.utilization, allocated) else {
            g.idle_since = None;
            return Vec::new();
        };
        let idle_before = g
            .idle_since
            .zip(previous)
            .is_some_and(|(s, p)| p.saturating_sub(s) >= window);
        if util < below {
            g.idle_since.get_or_insert(g.time);
        } else {
            g.idle_since = None;
        }
        let idle = g
            .idle_since
            .is_some_and(|s| g.time.saturating_sub(s) >= window);
        // Time between two readings that both found it idle.
        if let (true, true, Some(t0)) = (idle_before, idle, previous) {
            let seconds = g.time.saturating_sub(t0) as f64 / NS;
            g.idle_seconds += seconds;
            g.idle_cost += seconds / 3600.0 * price.unwrap_or(0.0);
        }
        let mut attrs = vec![kv("hw.id", uuid)];
        if let Some(k) = &owner {
            attrs.push(kv("service.instance.id", k.as_str()));
            if let Some(model) = self.engines.get(k).and_then(|e| e.model.as_deref()) {
                attrs.push(kv("gen_ai.request.model", model));
            }
        }
        let point = |v: f64| vec![number_point(g.time, v, attrs.clone())];
        let mut m = vec![
            Metric::gauge(
                "hw.gpu.idle_allocated",
                "{gpu}",
                point(f64::from(u8::from(idle))),
            ),
            Metric::sum(
                "hw.gpu.idle_allocated.time",
                "s",
                true,
                point(g.idle_seconds),
            ),
        ];
        if price.is_some() {
            m.push(Metric::sum(
                "hw.gpu.idle_allocated.cost",
                &currency,
                true,
                point(g.idle_cost),
            ));
        }
        m
    }
}

fn int(v: &AnyValue) -> Option<i64> {
    match &v.value {
        Some(Value::IntValue(i)) => Some(*i),
        Some(Value::StringValue(s)) => s.parse().ok(),
        _ => None,
    }
}

/// What an engine's token counters say: (input, output) over all its models, the newest
/// point's time, and its model when it serves one.
struct Tokens<'a> {
    counts: (f64, f64),
    time: u64,
    model: Option<&'a str>,
}

fn tokens<'a>(metrics: &[&'a Metric]) -> Option<Tokens<'a>> {
    let mut found = None::<Tokens<'a>>;
    let mut models = Vec::new();
    for m in metrics
        .iter()
        .filter(|m| m.name == "gen_ai.server.token.usage")
    {
        for p in m.number_points() {
            let Some(v) = number_value(p) else { continue };
            let t = found.get_or_insert(Tokens {
                counts: (0.0, 0.0),
                time: 0,
                model: None,
            });
            t.time = t.time.max(p.time_unix_nano);
            match p.attributes.get_str("gen_ai.token.type") {
                Some("input") => t.counts.0 += v,
                Some("output") => t.counts.1 += v,
                _ => {}
            }
            if let Some(model) = p.attributes.get_str("gen_ai.request.model") {
                if !models.contains(&model) {
                    models.push(model);
                }
            }
        }
    }
    if let (Some(t), [one]) = (found.as_mut(), models.as_slice()) {
        t.model = Some(one);
    }
    found
}

impl Processor for Efficiency {
    fn process(&mut self, batch: &mut Batch) {
        self.expire(genai_collector_core::model::now_unix_nanos());
        for rm in &mut batch.resource_metrics {
            let Some(resource) = rm.resource.as_ref().map(|r| &r.attributes) else {
                continue;
            };
            if rm.scope_metrics.is_empty() {
                continue;
            }
            if attr_str(resource, "hw.type") == Some("gpu") {
                let metrics = &rm.scope_metrics[0].metrics;
                if let Some((uuid, previous)) = self.observe_gpu(resource, metrics) {
                    let idle = self.idle_metrics(&uuid, previous);
                    rm.scope_metrics[0].metrics.extend(idle);
                }
                continue;
            }
            let all: Vec<&Metric> = rm.scope_metrics.iter().flat_map(|s| &s.metrics).collect();
            if !all.iter().any(|m| m.name.starts_with("gen_ai.server.")) {
                continue;
            }
            let Some(key) = server_identity(resource) else {
                continue;
            };
            let found = tokens(&all);
            let now = found
                .as_ref()
                .map_or_else(genai_collector_core::model::now_unix_nanos, |t| t.time);
            let mut attrs = Vec::new();
            if let Some(p) = attr_str(resource, "gen_ai.provider.name") {
                attrs.push(kv("gen_ai.provider.name", p));
            }
            if let Some(m) = found.as_ref().and_then(|t| t.model) {
                attrs.push(kv("gen_ai.request.model", m));
            }
            let counts = found.map(|t| t.counts);
            if !self.engines.contains_key(&key) {
                if self.engines.len() >= self.config.max_engines {
                    if self.ignored == 0 {
                        warn!(
                            max_engines = self.config.max_engines,
                            "efficiency is tracking max_engines engines: new ones are left out"
                        );
                    }
                    self.ignored += 1;
                    continue;
                }
                let engine = Engine {
                    start: now,
                    ..Engine::default()
                };
                self.engines.insert(key.clone(), engine);
            }
            let model = attrs
                .iter()
                .find(|a| a.key == "gen_ai.request.model")
                .and_then(|a| a.value.as_ref())
                .map(display_value);
            let engine = self.engines.get_mut(&key).expect("inserted above");
            engine.model = model;
            engine.seen = now;
            self.evaluate(&key, resource, counts, now);
            let out = self.engine_metrics(&key, &attrs, now);
            rm.scope_metrics[0].metrics.extend(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn gpu(
        uuid: &str,
        index: i64,
        t: u64,
        joules: f64,
        util: f64,
        pids: &[u32],
        pod: Option<&str>,
    ) -> Batch {
        let mut resource = vec![
            kv("hw.id", uuid),
            kv("hw.type", "gpu"),
            kv("gpu.index", index),
            kv("hw.model", "NVIDIA H100 80GB HBM3"),
        ];
        if let Some(p) = pod {
            resource.extend([kv("k8s.namespace.name", "inference"), kv("k8s.pod.name", p)]);
        }
        let at = |v: f64, attrs: Vec<KeyValue>| number_point(t * S, v, attrs);
        let mut metrics = vec![
            Metric::sum(
                "hw.energy",
                "J",
                true,
                vec![at(joules, vec![kv("hw.id", uuid)])],
            ),
            Metric::gauge(
                "hw.gpu.utilization",
                "1",
                vec![
                    at(util, vec![kv("hw.gpu.task", "general")]),
                    at(0.9, vec![kv("hw.gpu.task", "encoder")]),
                ],
            ),
        ];
        if !pids.is_empty() {
            let points = pids
                .iter()
                .map(|p| at(1e9, vec![kv("process.pid", i64::from(*p))]))
                .collect();
            metrics.push(Metric::gauge("hw.gpu.process.memory.usage", "By", points));
        }
        let mut b = Batch::new();
        b.push_resource(resource, metrics);
        b
    }

    fn engine(instance: &str, t: u64, input: f64, output: f64, pod: Option<&str>) -> Batch {
        let (host, port) = instance.rsplit_once(':').unwrap();
        let mut resource = vec![
            kv("service.instance.id", instance),
            kv("server.address", host),
            kv("server.port", port.parse::<i64>().unwrap()),
            kv("gen_ai.provider.name", "vllm"),
        ];
        if let Some(p) = pod {
            resource.extend([kv("k8s.namespace.name", "inference"), kv("k8s.pod.name", p)]);
        }
        let point = |v: f64, ty: &str| {
            number_point(
                t * S,
                v,
                vec![
                    kv("gen_ai.token.type", ty),
                    kv("gen_ai.request.model", "llama"),
                ],
            )
        };
        let mut b = Batch::new();
        b.push_resource(
            resource,
            vec![
                Metric::sum(
                    "gen_ai.server.token.usage",
                    "{token}",
                    true,
                    vec![point(input, "input"), point(output, "output")],
                ),
                Metric::gauge(
                    "gen_ai.server.requests.running",
                    "{request}",
                    vec![number_point(t * S, 1.0, vec![])],
                ),
            ],
        );
        b
    }

    fn run(e: &mut Efficiency, mut b: Batch) -> Batch {
        e.process(&mut b);
        b
    }

    /// The value of `name` in the batch, if emitted.
    fn value(b: &Batch, name: &str) -> Option<f64> {
        b.resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|s| &s.metrics)
            .filter(|m| m.name == name)
            .flat_map(|m| m.number_points())
            .find_map(number_value)
    }

    fn config(yaml: &str) -> EfficiencyConfig {
        let c: EfficiencyConfig = serde_saphyr::from_str(yaml).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn figures_are_the_deltas_of_the_counters() {
        let mut e = Efficiency::new(
            config(
                r#"
interval: 10s
gpus: { "10.0.0.1:8000": [0] }
prices: [{ match: { hw.model: "NVIDIA H100 80GB HBM3" }, price_per_gpu_hour: 2.0 }]
"#,
            ),
            None,
        );
        run(&mut e, gpu("GPU-a", 0, 0, 1000.0, 0.5, &[], None));
        let first = run(&mut e, engine("10.0.0.1:8000", 1, 100.0, 50.0, None));
        assert_eq!(
            value(&first, "gen_ai.server.energy"),
            Some(0.0),
            "counters start at 0"
        );
        assert_eq!(
            value(&first, "gen_ai.server.energy.per_token"),
            None,
            "no window yet"
        );
        run(&mut e, gpu("GPU-a", 0, 20, 5000.0, 0.5, &[], None));
        let b = run(&mut e, engine("10.0.0.1:8000", 21, 300.0, 250.0, None));
        // 4000 J over 20 s for 200 input and 200 output tokens, at 2 per GPU-hour.
        assert_eq!(value(&b, "gen_ai.server.energy.per_token"), Some(10.0));
        assert_eq!(
            value(&b, "gen_ai.server.energy.per_output_token"),
            Some(20.0)
        );
        assert_eq!(
            value(&b, "gen_ai.server.gpu.time.per_1k_tokens"),
            Some(50.0)
        );
        let cost = 20.0 / 3600.0 * 2.0;
        let per_1m = value(&b, "gen_ai.server.cost.per_1m_tokens").unwrap();
        assert!((per_1m - cost / 400.0 * 1e6).abs() < 1e-9, "{per_1m}");
        assert_eq!(value(&b, "gen_ai.server.energy"), Some(4000.0));
        assert_eq!(value(&b, "gen_ai.server.gpu.time"), Some(20.0));
        assert!((value(&b, "gen_ai.server.cost").unwrap() - cost).abs() < 1e-12);
        // Before the next window is due, the counters and the last window's figures repeat.
        let early = run(&mut e, engine("10.0.0.1:8000", 25, 310.0, 260.0, None));
        assert_eq!(value(&early, "gen_ai.server.energy"), Some(4000.0));
        assert_eq!(value(&early, "gen_ai.server.energy.per_token"), Some(10.0));
    }

    #[test]
    fn a_counter_going_back_skips_the_window_and_the_next_one_is_right() {
        let mut e = Efficiency::new(
            config("{ interval: 10s, gpus: { \"h:1\": [GPU-a] } }"),
            None,
        );
        run(&mut e, gpu("GPU-a", 0, 0, 1000.0, 0.5, &[], None));
        run(&mut e, engine("h:1", 0, 0.0, 0.0, None));
        // The driver reloads: the energy counter starts over.
        run(&mut e, gpu("GPU-a", 0, 20, 300.0, 0.5, &[], None));
        let b = run(&mut e, engine("h:1", 20, 100.0, 100.0, None));
        assert_eq!(e.engines["h:1"].skip, Some(Skip::EnergyReset));
        assert_eq!(
            value(&b, "gen_ai.server.energy.per_token"),
            None,
            "nothing negative"
        );
        assert_eq!(value(&b, "gen_ai.server.energy"), Some(0.0));
        run(&mut e, gpu("GPU-a", 0, 40, 2300.0, 0.5, &[], None));
        let b = run(&mut e, engine("h:1", 40, 200.0, 200.0, None));
        assert_eq!(value(&b, "gen_ai.server.energy.per_token"), Some(10.0));
        // The engine restarts: its token counters start over.
        run(&mut e, gpu("GPU-a", 0, 60, 4300.0, 0.5, &[], None));
        let b = run(&mut e, engine("h:1", 60, 5.0, 5.0, None));
        assert_eq!(e.engines["h:1"].skip, Some(Skip::TokenReset));
        assert_eq!(value(&b, "gen_ai.server.energy.per_token"), None);
        assert_eq!(
            value(&b, "gen_ai.server.energy"),
            Some(2000.0),
            "the skipped window is not counted"
        );
        // No tokens in a window: energy counts, no ratio is infinite.
        run(&mut e, gpu("GPU-a", 0, 80, 5300.0, 0.5, &[], None));
        let b = run(&mut e, engine("h:1", 80, 5.0, 5.0, None));
        assert_eq!(value(&b, "gen_ai.server.energy"), Some(3000.0));
        assert_eq!(value(&b, "gen_ai.server.energy.per_token"), None);
    }

    #[test]
    fn no_new_gpu_reading_waits_instead_of_counting_zero_joules() {
        let mut e = Efficiency::new(config("{ interval: 10s, gpus: { \"h:1\": [0] } }"), None);
        run(&mut e, gpu("GPU-a", 0, 0, 0.0, 0.5, &[], None));
        run(&mut e, engine("h:1", 0, 0.0, 0.0, None));
        let b = run(&mut e, engine("h:1", 30, 100.0, 100.0, None));
        assert_eq!(value(&b, "gen_ai.server.energy.per_token"), None);
        run(&mut e, gpu("GPU-a", 0, 40, 4000.0, 0.5, &[], None));
        let b = run(&mut e, engine("h:1", 41, 200.0, 200.0, None));
        assert_eq!(value(&b, "gen_ai.server.energy.per_token"), Some(10.0));
    }

    #[test]
    fn pods_get_their_gpus_and_an_idle_one_is_reported() {
        let mut e = Efficiency::new(
            config("{ interval: 10s, idle: { utilization_below: 0.05, for: 30s }, prices: [{ price_per_gpu_hour: 3.6 }] }"),
            None,
        );
        let mut idle = Vec::new();
        for step in 0..=6u64 {
            let t = step * 10;
            run(
                &mut e,
                gpu("GPU-busy", 0, t, 400.0 * t as f64, 0.8, &[], Some("vllm-a")),
            );
            idle.push(run(
                &mut e,
                gpu("GPU-idle", 1, t, 60.0 * t as f64, 0.0, &[], Some("vllm-b")),
            ));
            let a = run(
                &mut e,
                engine(
                    "10.1.0.1:8000",
                    t,
                    30.0 * t as f64,
                    10.0 * t as f64,
                    Some("vllm-a"),
                ),
            );
            let b = run(&mut e, engine("10.1.0.2:8000", t, 0.0, 0.0, Some("vllm-b")));
            if step > 0 {
                // 400 W for 40 tokens/s.
                assert_eq!(value(&a, "gen_ai.server.energy.per_token"), Some(10.0));
                assert_eq!(
                    value(&a, "gen_ai.server.energy.per_output_token"),
                    Some(40.0)
                );
                assert_eq!(
                    value(&b, "gen_ai.server.energy.per_token"),
                    None,
                    "no tokens"
                );
                assert_eq!(value(&b, "gen_ai.server.energy"), Some(60.0 * t as f64));
            }
        }
        let last_b = run(
            &mut e,
            engine("10.1.0.2:8000", 60, 0.0, 0.0, Some("vllm-b")),
        );
        assert_eq!(value(&last_b, "gen_ai.server.gpus"), Some(1.0));
        assert_eq!(
            value(&last_b, "gen_ai.server.gpus.idle"),
            Some(1.0),
            "its one GPU is idle"
        );
        let flags: Vec<f64> = idle
            .iter()
            .map(|b| value(b, "hw.gpu.idle_allocated").unwrap())
            .collect();
        assert_eq!(
            flags,
            [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
            "idle once under 5 % for 30 s"
        );
        let last = idle.last().unwrap();
        let flag = last.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == "hw.gpu.idle_allocated")
            .unwrap();
        let attrs = &flag.number_points()[0].attributes;
        assert_eq!(attrs.get_str("service.instance.id"), Some("10.1.0.2:8000"));
        assert_eq!(
            attrs.get_str("gen_ai.request.model"),
            Some("llama"),
            "with its model"
        );
        assert_eq!(value(last, "hw.gpu.idle_allocated.time"), Some(30.0));
        assert!((value(last, "hw.gpu.idle_allocated.cost").unwrap() - 0.03).abs() < 1e-12);
        // The busy GPU is reported as allocated and not idle.
        let busy = run(
            &mut e,
            gpu("GPU-busy", 0, 70, 28000.0, 0.8, &[], Some("vllm-a")),
        );
        assert_eq!(value(&busy, "hw.gpu.idle_allocated"), Some(0.0));
        // A GPU nobody holds says nothing.
        let free = run(&mut e, gpu("GPU-free", 2, 70, 0.0, 0.0, &[], None));
        assert_eq!(value(&free, "hw.gpu.idle_allocated"), None);
    }

    #[test]
    fn a_gpu_moving_to_another_pod_skips_the_window() {
        let mut e = Efficiency::new(config("{ interval: 10s }"), None);
        run(&mut e, gpu("GPU-a", 0, 0, 0.0, 0.5, &[], Some("vllm-a")));
        run(&mut e, gpu("GPU-b", 1, 0, 0.0, 0.5, &[], Some("vllm-a")));
        run(&mut e, engine("10.1.0.1:8000", 0, 0.0, 0.0, Some("vllm-a")));
        run(&mut e, gpu("GPU-a", 0, 20, 100.0, 0.5, &[], Some("vllm-a")));
        run(&mut e, gpu("GPU-b", 1, 20, 100.0, 0.5, &[], Some("vllm-c")));
        let b = run(
            &mut e,
            engine("10.1.0.1:8000", 20, 10.0, 10.0, Some("vllm-a")),
        );
        assert_eq!(e.engines["10.1.0.1:8000"].skip, Some(Skip::GpusChanged));
        assert_eq!(value(&b, "gen_ai.server.energy.per_token"), None);
        run(&mut e, gpu("GPU-a", 0, 40, 300.0, 0.5, &[], Some("vllm-a")));
        let b = run(
            &mut e,
            engine("10.1.0.1:8000", 40, 20.0, 20.0, Some("vllm-a")),
        );
        assert_eq!(
            value(&b, "gen_ai.server.energy.per_token"),
            Some(10.0),
            "one GPU from now on"
        );
    }

    #[test]
    fn a_gpu_two_engines_claim_is_shared_and_attributed_to_neither() {
        let mut e = Efficiency::new(
            config("{ interval: 10s, gpus: { \"h:1\": [0], \"h:2\": [0] } }"),
            None,
        );
        run(&mut e, gpu("GPU-a", 0, 0, 0.0, 0.5, &[], None));
        run(&mut e, engine("h:1", 0, 0.0, 0.0, None));
        run(&mut e, engine("h:2", 0, 0.0, 0.0, None));
        assert_eq!(e.engines["h:2"].skip, Some(Skip::SharedGpu));
    }

    #[test]
    fn a_local_engine_is_found_through_its_listening_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let instance = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let mut e = Efficiency::new(config("{ interval: 10s }"), None);
        // GPU 0 runs the server's child (a worker); GPU 1 a stranger's process too.
        run(&mut e, gpu("GPU-a", 0, 0, 0.0, 0.5, &[child.id()], None));
        run(&mut e, gpu("GPU-b", 1, 0, 0.0, 0.5, &[], None));
        run(&mut e, engine(&instance, 0, 0.0, 0.0, None));
        assert_eq!(e.engines[&instance].skip, None);
        run(
            &mut e,
            gpu("GPU-a", 0, 20, 1000.0, 0.5, &[child.id()], None),
        );
        let b = run(&mut e, engine(&instance, 20, 50.0, 50.0, None));
        assert_eq!(value(&b, "gen_ai.server.energy.per_token"), Some(10.0));
        run(&mut e, gpu("GPU-b", 1, 30, 0.0, 0.5, &[me, 1], None));
        run(
            &mut e,
            gpu("GPU-a", 0, 40, 2000.0, 0.5, &[child.id()], None),
        );
        run(&mut e, engine(&instance, 40, 100.0, 100.0, None));
        assert_eq!(
            e.engines[&instance].skip,
            Some(Skip::SharedGpu),
            "GPU 1 also runs PID 1's process"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_gpu_shared_with_another_process_is_split_by_its_sm_utilisation() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let instance = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let mut e = Efficiency::new(config("{ interval: 10s }"), None);
        // The engine's worker at 30 % SM, PID 1's process at 10 %: the engine gets 3/4.
        let shared = |t: u64, joules: f64| {
            let mut b = gpu("GPU-a", 0, t, joules, 0.4, &[child.id(), 1], None);
            let util =
                |pid: u32, v: f64| number_point(t * S, v, vec![kv("process.pid", i64::from(pid))]);
            b.resource_metrics[0].scope_metrics[0]
                .metrics
                .push(Metric::gauge(
                    "hw.gpu.process.utilization",
                    "1",
                    vec![util(child.id(), 0.3), util(1, 0.1)],
                ));
            b
        };
        run(&mut e, shared(0, 0.0));
        run(&mut e, engine(&instance, 0, 0.0, 0.0, None));
        run(&mut e, shared(20, 4000.0));
        let b = run(&mut e, engine(&instance, 20, 150.0, 150.0, None));
        for (name, want) in [
            ("gen_ai.server.energy", 3000.0),
            ("gen_ai.server.gpu.time", 15.0),
            ("gen_ai.server.energy.per_token", 10.0),
        ] {
            let got = value(&b, name).unwrap();
            assert!((got - want).abs() < 1e-9 * want, "{name}: {got}");
        }
        // Without samples the split is unknown: shared, nothing attributed.
        run(
            &mut e,
            gpu("GPU-a", 0, 40, 8000.0, 0.4, &[child.id(), 1], None),
        );
        run(&mut e, engine(&instance, 40, 300.0, 300.0, None));
        assert_eq!(e.engines[&instance].skip, Some(Skip::SharedGpu));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn an_engine_without_token_counters_gets_no_figures() {
        let mut e = Efficiency::new(config("{ interval: 10s, gpus: { \"h:1\": [0] } }"), None);
        run(&mut e, gpu("GPU-a", 0, 0, 0.0, 0.5, &[], None));
        let mut b = Batch::new();
        b.push_resource(
            vec![
                kv("service.instance.id", "h:1"),
                kv("gen_ai.provider.name", "ollama"),
            ],
            vec![Metric::gauge(
                "gen_ai.server.kv_cache.usage",
                "%",
                vec![number_point(S, 40.0, vec![])],
            )],
        );
        let b = run(&mut e, b);
        assert_eq!(e.engines["h:1"].skip, Some(Skip::NoTokens));
        assert_eq!(value(&b, "gen_ai.server.energy"), None);
    }

    #[test]
    fn engines_and_gpus_gone_for_ten_intervals_are_forgotten() {
        let mut e = Efficiency::new(config("{ interval: 10s, gpus: { \"h:1\": [0] } }"), None);
        let now = genai_collector_core::model::now_unix_nanos() / S;
        run(&mut e, gpu("GPU-a", 0, now, 0.0, 0.5, &[], None));
        run(&mut e, engine("h:1", now, 0.0, 0.0, None));
        run(&mut e, gpu("GPU-b", 1, now - 200, 0.0, 0.5, &[], None));
        run(&mut e, engine("h:2", now - 200, 0.0, 0.0, None));
        e.swept = 0;
        e.expire(now * S);
        assert!(e.engines.contains_key("h:1") && !e.engines.contains_key("h:2"));
        assert!(e.gpus.contains_key("GPU-a") && !e.gpus.contains_key("GPU-b"));
    }

    #[test]
    fn bad_configs_are_refused() {
        for yaml in [
            "{ interval: 0s }",
            "{ currency: \"\" }",
            "{ prices: [{ price_per_gpu_hour: -1 }] }",
            "{ idle: { utilization_below: 5 } }",
        ] {
            let c: EfficiencyConfig = serde_saphyr::from_str(yaml).unwrap();
            assert!(c.validate().is_err(), "{yaml}");
        }
    }
}
