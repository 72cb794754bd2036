//! `pool_aggregate`: per inference pool, the view a gateway or an autoscaler needs.
//!
//! A server is one resource with `gen_ai.pool.name` (set by a receiver's `pool`), identified by
//! `service.instance.id` (else `server.address:server.port`). Every `interval` the processor
//! emits, per pool: average KV-cache usage, average queue size, each server's queue size, ready
//! servers, total running and waiting requests, and capacity utilisation. A server counts once,
//! however many engines it runs (vLLM data parallel: their values add up, KV usage averages).
//!
//! A server whose scrape fails (`up` = 0) twice in a row leaves the averages and the ready
//! count; one failure is a blip. A server silent for three of its own report periods is away:
//! out of every aggregate until it reports again. Behind several gateways, that is how a pool
//! moving to another gateway leaves this one within a few scrapes, so that summing the pool's
//! series across gateways counts each server once. A server not heard from for `stale_after`
//! is forgotten, and a pool with no present servers stops emitting: its series go stale rather
//! than freeze. The number of pools emitted is the self-metric `genai_collector_processor_pools`.

mod objectives;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use genai_collector_core::config::duration;
use genai_collector_core::model::{
    attr, display_value, kv, now_unix_nanos, number_point, number_value, server_identity,
    AttributesExt, Batch, KeyValue, Metric, MetricExt, NumberDataPoint,
};
use genai_collector_core::telemetry::ComponentStats;
use genai_collector_core::{
    BuildContext, ComponentConfig, ComponentError, Processor, ProcessorFactory, ValidationError,
};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compat {
    /// Also emit the Gateway API Inference Extension's pool metrics.
    GatewayApiInferenceExtension,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(with = "duration")]
    pub interval: Duration,
    #[serde(with = "duration")]
    pub stale_after: Duration,
    pub compat: Option<Compat>,
    /// Servers tracked at most, across pools; new ones past it are ignored (counted in
    /// `ignored_servers`) until others go stale.
    pub max_servers: usize,
    /// The unit of `gen_ai.pool.cost.per_1m_tokens`: `efficiency`'s currency.
    pub currency: String,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            stale_after: Duration::from_secs(60),
            compat: None,
            max_servers: 10_000,
            currency: "USD".into(),
        }
    }
}

impl ComponentConfig for PoolConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.interval < Duration::from_millis(100) {
            return Err(ValidationError::field("interval", "must be at least 100ms"));
        }
        if self.stale_after < self.interval {
            return Err(ValidationError::field(
                "stale_after",
                "must be at least the interval",
            ));
        }
        Ok(())
    }
}

pub struct PoolAggregateFactory;

impl ProcessorFactory for PoolAggregateFactory {
    type Config = PoolConfig;

    fn kind(&self) -> &'static str {
        "pool_aggregate"
    }

    fn description(&self) -> &'static str {
        "per-pool KV-cache and queue averages, ready servers, running requests, capacity; Gateway API Inference Extension names"
    }

    fn build(
        &self,
        config: &PoolConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError> {
        let mut p = PoolAggregate::new(config.clone());
        p.stats = ctx
            .pipeline
            .as_deref()
            .and_then(|pipeline| ctx.telemetry.find_processor(&ctx.id.to_string(), pipeline));
        Ok(Box::new(p))
    }
}

/// What the last scrapes of one server said.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Server {
    pub kv_cache: Option<f64>,
    pub running: f64,
    pub waiting: f64,
    pub max: Option<f64>,
    /// A scrape has succeeded since the server was first seen.
    pub answered: bool,
    /// Failed scrapes in a row.
    pub misses: u32,
    last_seen: Option<Instant>,
    /// How often its reports arrive, smoothed.
    period: Option<Duration>,
    /// The `efficiency` counters where its energy counter last moved, and the window that ended
    /// there.
    efficiency_mark: Option<EfficiencyMark>,
    pub efficiency: Option<EfficiencyMark>,
    /// GPUs `efficiency` attributes to the server, and those of them idle.
    pub gpus: Option<(f64, f64)>,
}

/// Energy, cost and tokens of a server: at a mark, running totals; as a window, their deltas.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EfficiencyMark {
    pub joules: f64,
    pub cost: Option<f64>,
    pub input_tokens: f64,
    pub output_tokens: f64,
}

impl Server {
    /// Takes the `efficiency` processor's counters: each time the energy counter moves, the
    /// deltas since it last moved are the server's latest window. A window whose tokens went
    /// back (an engine restart) is dropped.
    fn observe_efficiency(&mut self, metrics: &[&Metric]) {
        let Some(joules) = values(metrics, "gen_ai.server.energy").first().copied() else {
            return;
        };
        let tokens = |ty: &str| -> f64 {
            values_where(metrics, "gen_ai.server.token.usage", |p| {
                p.attributes.get_str("gen_ai.token.type") == Some(ty)
            })
            .iter()
            .sum()
        };
        let now = EfficiencyMark {
            joules,
            cost: values(metrics, "gen_ai.server.cost").first().copied(),
            input_tokens: tokens("input"),
            output_tokens: tokens("output"),
        };
        match self.efficiency_mark {
            Some(m) if m.joules == now.joules => return,
            Some(m) => {
                let w = EfficiencyMark {
                    joules: now.joules - m.joules,
                    cost: now.cost.zip(m.cost).map(|(a, b)| a - b),
                    input_tokens: now.input_tokens - m.input_tokens,
                    output_tokens: now.output_tokens - m.output_tokens,
                };
                let sane = w.joules >= 0.0 && w.input_tokens >= 0.0 && w.output_tokens >= 0.0;
                self.efficiency = sane.then_some(w);
            }
            None => {}
        }
        self.efficiency_mark = Some(now);
    }
}

/// Reports closer than this are parts of one scrape, not a period.
const MIN_PERIOD: Duration = Duration::from_millis(100);

/// `period` moved a quarter of the way to a new `gap`.
fn smooth(period: Option<Duration>, gap: Duration) -> Duration {
    period.map_or(gap, |p| p.mul_f64(0.75) + gap.mul_f64(0.25))
}

impl Server {
    /// In the averages and the ready count.
    pub fn live(&self) -> bool {
        self.answered && self.misses < 2
    }

    /// Notes a report at `now`; returns the gap since the last one when it counts as a period.
    fn seen(&mut self, now: Instant) -> Option<Duration> {
        let gap = self
            .last_seen
            .map(|t| now.saturating_duration_since(t))
            .filter(|gap| *gap >= MIN_PERIOD);
        if let Some(gap) = gap {
            self.period = Some(smooth(self.period, gap));
        }
        self.last_seen = Some(now);
        gap
    }

    /// Reported within three of its periods: one late report is no absence, and a server
    /// whose reports went to another gateway is gone from this one after about three. Before
    /// its own period is known, `typical` (every server's) stands in, else `stale_after`.
    pub fn present(&self, now: Instant, stale_after: Duration, typical: Option<Duration>) -> bool {
        let away_after = self
            .period
            .or(typical)
            .map_or(stale_after, |p| (p * 3).min(stale_after));
        self.last_seen
            .is_some_and(|t| now.saturating_duration_since(t) < away_after)
    }
}

/// One pool's aggregates.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolView {
    pub kv_cache_average: Option<f64>,
    pub queue_average: Option<f64>,
    pub queue_by_server: Vec<(String, f64)>,
    pub ready: usize,
    pub running: f64,
    pub waiting: f64,
    pub capacity: Option<f64>,
    /// Joules per token and per output token, and cost per 1M tokens, over the live servers'
    /// latest `efficiency` windows.
    pub energy_per_token: Option<f64>,
    pub energy_per_output_token: Option<f64>,
    pub cost_per_1m_tokens: Option<f64>,
    /// GPUs the live servers run on, and those of them idle while allocated.
    pub gpus: Option<(f64, f64)>,
}

/// The aggregates of `servers`, by their definitions.
pub fn aggregate<'a>(servers: impl Iterator<Item = (&'a String, &'a Server)>) -> PoolView {
    let live: Vec<(&String, &Server)> = servers.filter(|(_, s)| s.live()).collect();
    let kv: Vec<f64> = live.iter().filter_map(|(_, s)| s.kv_cache).collect();
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let queues: Vec<f64> = live.iter().map(|(_, s)| s.waiting).collect();
    let running: f64 = live.iter().map(|(_, s)| s.running).sum();
    let maxes: Vec<f64> = live.iter().filter_map(|(_, s)| s.max).collect();
    let max: f64 = maxes.iter().sum();
    PoolView {
        kv_cache_average: mean(&kv),
        queue_average: mean(&queues),
        queue_by_server: live
            .iter()
            .map(|(k, s)| ((*k).clone(), s.waiting))
            .collect(),
        ready: live.len(),
        running,
        waiting: queues.iter().sum(),
        capacity: (!maxes.is_empty() && max > 0.0).then(|| running / max * 100.0),
        gpus: live
            .iter()
            .filter_map(|(_, s)| s.gpus)
            .reduce(|a, b| (a.0 + b.0, a.1 + b.1)),
        ..efficiency(live.iter().filter_map(|(_, s)| s.efficiency))
    }
}

/// The pool's efficiency: sums of the servers' windows, divided (never by zero).
fn efficiency(windows: impl Iterator<Item = EfficiencyMark>) -> PoolView {
    let mut sum = EfficiencyMark::default();
    let mut priced = false;
    for w in windows {
        sum.joules += w.joules;
        sum.input_tokens += w.input_tokens;
        sum.output_tokens += w.output_tokens;
        if let Some(c) = w.cost {
            *sum.cost.get_or_insert(0.0) += c;
            priced = true;
        }
    }
    let all = sum.input_tokens + sum.output_tokens;
    let per = |n: f64, d: f64| (d > 0.0).then(|| n / d);
    PoolView {
        energy_per_token: per(sum.joules, all),
        energy_per_output_token: per(sum.joules, sum.output_tokens),
        cost_per_1m_tokens: sum.cost.filter(|_| priced).and_then(|c| per(c * 1e6, all)),
        ..PoolView::default()
    }
}

pub struct PoolAggregate {
    config: PoolConfig,
    pools: BTreeMap<String, BTreeMap<String, Server>>,
    /// Servers tracked now, across pools.
    servers: usize,
    /// Batches of new servers ignored at `max_servers`.
    pub ignored_servers: u64,
    /// How many of those the log has told of.
    reported: u64,
    /// The Inference Extension's per-model series, with its compat switch.
    objectives: Option<objectives::Objectives>,
    /// Where the number of pools emitted is told.
    stats: Option<std::sync::Arc<ComponentStats>>,
    /// The report period of all servers, smoothed: for a server just seen.
    typical_period: Option<Duration>,
}

/// Point attributes that tell replicas of one scheduler apart: SGLang with
/// `--enable-metrics-for-all-schedulers` exports the same gauges from every tensor-, pipeline-
/// and expert-parallel rank. Data-parallel ranks (`dp_rank`, vLLM's `engine`) are schedulers of
/// their own and add up.
const REPLICA_RANKS: [&str; 3] = ["tp_rank", "pp_rank", "moe_ep_rank"];

/// A server's values of `name`: one per scheduler, replicas counted once.
fn values(rm_metrics: &[&Metric], name: &str) -> Vec<f64> {
    values_where(rm_metrics, name, |_| true)
}

/// [`values`] of the points `keep` takes.
fn values_where(
    rm_metrics: &[&Metric],
    name: &str,
    keep: impl Fn(&NumberDataPoint) -> bool,
) -> Vec<f64> {
    let points = rm_metrics
        .iter()
        .filter(|m| m.name == name)
        .flat_map(|m| m.number_points())
        .filter(|p| keep(p));
    let mut seen = std::collections::HashSet::new();
    points
        .filter(|p| {
            if !p
                .attributes
                .iter()
                .any(|a| REPLICA_RANKS.contains(&a.key.as_str()))
            {
                return true;
            }
            // The first replica of each scheduler stands for all of them.
            let mut scheduler: Vec<String> = p
                .attributes
                .iter()
                .filter(|a| !REPLICA_RANKS.contains(&a.key.as_str()))
                .map(|a| format!("{}={:?}", a.key, a.value))
                .collect();
            scheduler.sort_unstable();
            seen.insert(scheduler)
        })
        .filter_map(number_value)
        .collect()
}

/// A server's key: its identity, else what part of an address it gives.
fn server_key(attrs: &[KeyValue]) -> String {
    server_identity(attrs).unwrap_or_else(|| {
        let get = |key| attr(attrs, key).map(display_value);
        let address = get("server.address").unwrap_or_else(|| "unknown".into());
        match get("server.port") {
            Some(port) => format!("{address}:{port}"),
            None => address,
        }
    })
}

impl PoolAggregate {
    pub fn new(config: PoolConfig) -> Self {
        let objectives = (config.compat == Some(Compat::GatewayApiInferenceExtension))
            .then(|| objectives::Objectives::new(now_unix_nanos()));
        Self {
            config,
            pools: BTreeMap::new(),
            servers: 0,
            ignored_servers: 0,
            reported: 0,
            objectives,
            stats: None,
            typical_period: None,
        }
    }

    /// Folds one server's batch into its state, at `now`.
    pub fn observe(&mut self, pool: &str, server: &str, metrics: &[&Metric], now: Instant) {
        // Any client that can push can name pools and servers: their number is bounded.
        let known = self.pools.get(pool).is_some_and(|s| s.contains_key(server));
        if !known && self.servers >= self.config.max_servers {
            self.ignored_servers += 1;
            return;
        }
        // Look up before inserting: a known server costs no key allocation.
        if !self.pools.contains_key(pool) {
            self.pools.insert(pool.to_owned(), BTreeMap::new());
        }
        let servers = self.pools.get_mut(pool).expect("inserted above");
        if !servers.contains_key(server) {
            servers.insert(server.to_owned(), Server::default());
            self.servers += 1;
        }
        let s = servers.get_mut(server).expect("inserted above");
        if let Some(gap) = s.seen(now) {
            self.typical_period = Some(smooth(self.typical_period, gap));
        }
        let up = values(metrics, "up").first().copied();
        if up == Some(0.0) {
            s.misses += 1;
            return;
        }
        // Ollama's figure is a VRAM allocation, not a KV cache's fill: it is no KV usage here.
        let kv = values_where(metrics, "gen_ai.server.kv_cache.usage", |p| {
            !p.attributes
                .iter()
                .any(|a| a.key == "gen_ai.server.kv_cache.basis")
        });
        let running = values(metrics, "gen_ai.server.requests.running");
        let waiting = values(metrics, "gen_ai.server.requests.waiting");
        let max = values(metrics, "gen_ai.server.requests.max");
        if up.is_none() && kv.is_empty() && running.is_empty() && waiting.is_empty() {
            return;
        }
        s.observe_efficiency(metrics);
        s.gpus = values(metrics, "gen_ai.server.gpus")
            .first()
            .map(|n| (*n, values(metrics, "gen_ai.server.gpus.idle").iter().sum()));
        s.misses = 0;
        s.answered = true;
        s.kv_cache = (!kv.is_empty()).then(|| kv.iter().sum::<f64>() / kv.len() as f64);
        s.running = running.iter().sum();
        s.waiting = waiting.iter().sum();
        s.max = (!max.is_empty()).then(|| max.iter().sum());
    }

    /// Forgets servers not heard from for `stale_after`, and pools left empty.
    fn expire(&mut self, now: Instant) {
        let stale = self.config.stale_after;
        for servers in self.pools.values_mut() {
            servers.retain(|_, s| s.last_seen.is_some_and(|t| now.duration_since(t) < stale));
        }
        self.pools.retain(|_, servers| !servers.is_empty());
        self.servers = self.pools.values().map(BTreeMap::len).sum();
    }

    /// The aggregates of every pool with present servers, at `now`.
    pub fn views(&self, now: Instant) -> BTreeMap<String, PoolView> {
        let (stale, typical) = (self.config.stale_after, self.typical_period);
        self.pools
            .iter()
            .filter_map(|(p, servers)| {
                let mut present = servers
                    .iter()
                    .filter(|(_, s)| s.present(now, stale, typical))
                    .peekable();
                present.peek()?;
                Some((p.clone(), aggregate(present)))
            })
            .collect()
    }

    fn emit(&self, now: Instant, now_ns: u64) -> Batch {
        let mut batch = Batch::new();
        let gateway = self.config.compat == Some(Compat::GatewayApiInferenceExtension);
        let views = self.views(now);
        if let Some(stats) = &self.stats {
            stats.set_pools(views.len() as u64);
        }
        for (pool, v) in views {
            let p = |value: f64, attrs: Vec<KeyValue>| vec![number_point(now_ns, value, attrs)];
            let mut m = vec![
                Metric::gauge(
                    "gen_ai.pool.servers.ready",
                    "{server}",
                    p(v.ready as f64, vec![]),
                ),
                Metric::gauge(
                    "gen_ai.pool.requests.running",
                    "{request}",
                    p(v.running, vec![]),
                ),
                Metric::gauge(
                    "gen_ai.pool.requests.waiting",
                    "{request}",
                    p(v.waiting, vec![]),
                ),
            ];
            if let Some(kv) = v.kv_cache_average {
                m.push(Metric::gauge(
                    "gen_ai.pool.kv_cache.usage.average",
                    "%",
                    p(kv, vec![]),
                ));
            }
            if let Some(q) = v.queue_average {
                m.push(Metric::gauge(
                    "gen_ai.pool.queue.size.average",
                    "{request}",
                    p(q, vec![]),
                ));
            }
            if !v.queue_by_server.is_empty() {
                let points = v
                    .queue_by_server
                    .iter()
                    .map(|(s, q)| {
                        number_point(now_ns, *q, vec![kv("service.instance.id", s.as_str())])
                    })
                    .collect();
                m.push(Metric::gauge("gen_ai.pool.queue.size", "{request}", points));
            }
            if let Some(c) = v.capacity {
                m.push(Metric::gauge(
                    "gen_ai.pool.capacity.usage",
                    "%",
                    p(c, vec![]),
                ));
            }
            for (name, unit, value) in [
                (
                    "gen_ai.pool.energy.per_token",
                    "J/{token}",
                    v.energy_per_token,
                ),
                (
                    "gen_ai.pool.energy.per_output_token",
                    "J/{token}",
                    v.energy_per_output_token,
                ),
                (
                    "gen_ai.pool.cost.per_1m_tokens",
                    self.config.currency.as_str(),
                    v.cost_per_1m_tokens,
                ),
            ] {
                if let Some(x) = value {
                    m.push(Metric::gauge(name, unit, p(x, vec![])));
                }
            }
            if let Some((gpus, idle)) = v.gpus {
                m.push(Metric::gauge("gen_ai.pool.gpus", "{gpu}", p(gpus, vec![])));
                m.push(Metric::gauge(
                    "gen_ai.pool.gpus.idle",
                    "{gpu}",
                    p(idle, vec![]),
                ));
            }
            if gateway {
                let name = || vec![kv("name", pool.as_str())];
                if let Some(kv_avg) = v.kv_cache_average {
                    m.push(Metric::gauge(
                        "inference_pool_average_kv_cache_utilization",
                        "",
                        p(kv_avg / 100.0, name()),
                    ));
                }
                if let Some(q) = v.queue_average {
                    m.push(Metric::gauge(
                        "inference_pool_average_queue_size",
                        "",
                        p(q, name()),
                    ));
                }
                let per_pod = v
                    .queue_by_server
                    .iter()
                    .map(|(s, q)| {
                        number_point(
                            now_ns,
                            *q,
                            vec![
                                kv("name", pool.as_str()),
                                kv("model_server_pod", s.as_str()),
                            ],
                        )
                    })
                    .collect::<Vec<_>>();
                if !per_pod.is_empty() {
                    m.push(Metric::gauge(
                        "inference_pool_per_pod_queue_size",
                        "",
                        per_pod,
                    ));
                }
                m.push(Metric::gauge(
                    "inference_pool_ready_pods",
                    "",
                    p(v.ready as f64, name()),
                ));
                if let Some(o) = &self.objectives {
                    m.extend(o.emit(&pool, now_ns));
                }
            }
            batch.push_resource(
                vec![
                    kv("gen_ai.pool.name", pool.as_str()),
                    kv("service.name", "genai-collector/pool_aggregate"),
                ],
                m,
            );
        }
        batch
    }
}

impl Processor for PoolAggregate {
    fn process(&mut self, batch: &mut Batch) {
        let now = Instant::now();
        for rm in &batch.resource_metrics {
            let Some(attrs) = rm.resource.as_ref().map(|r| &r.attributes) else {
                continue;
            };
            let Some(pool) = attrs.get_str("gen_ai.pool.name") else {
                continue;
            };
            let metrics: Vec<&Metric> = rm.scope_metrics.iter().flat_map(|s| &s.metrics).collect();
            let key = server_key(attrs);
            self.observe(pool, &key, &metrics, now);
            // Within the same cap as the pools: a server they ignore is not counted here.
            let tracked = self.pools.get(pool).is_some_and(|s| s.contains_key(&key));
            if let (Some(o), true) = (&mut self.objectives, tracked) {
                o.observe(pool, &key, &metrics, now);
            }
        }
    }

    fn flush_interval(&self) -> Option<Duration> {
        Some(self.config.interval)
    }

    fn flush(&mut self) -> Option<Batch> {
        if self.ignored_servers > self.reported {
            tracing::warn!(
                ignored = self.ignored_servers - self.reported,
                max_servers = self.config.max_servers,
                "pool_aggregate is tracking max_servers servers: batches of new servers were ignored"
            );
            self.reported = self.ignored_servers;
        }
        let now = Instant::now();
        self.expire(now);
        if let Some(o) = &mut self.objectives {
            let pools = &self.pools;
            let live = |server: &str| pools.values().any(|s| s.contains_key(server));
            o.expire(&live, now, self.config.stale_after);
        }
        let batch = self.emit(now, now_unix_nanos());
        (!batch.is_empty()).then_some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::metric;

    fn g(name: &str, v: f64) -> Metric {
        Metric::gauge(name, "", vec![number_point(1, v, vec![])])
    }

    fn server_batch(
        pool: &str,
        id: &str,
        up: f64,
        kv_cache: f64,
        running: f64,
        waiting: f64,
    ) -> Batch {
        Batch::with_resource(
            vec![kv("gen_ai.pool.name", pool), kv("service.instance.id", id)],
            vec![
                g("up", up),
                g("gen_ai.server.kv_cache.usage", kv_cache),
                g("gen_ai.server.requests.running", running),
                g("gen_ai.server.requests.waiting", waiting),
                g("gen_ai.server.requests.max", 64.0),
            ],
        )
    }

    fn value(b: &Batch, pool: &str, name: &str) -> Option<f64> {
        b.resource_metrics
            .iter()
            .filter(|rm| {
                rm.resource
                    .as_ref()
                    .unwrap()
                    .attributes
                    .get_str("gen_ai.pool.name")
                    == Some(pool)
            })
            .flat_map(|rm| rm.scope_metrics.iter().flat_map(|s| &s.metrics))
            .find(|m| m.name == name)
            .and_then(|m| match &m.data {
                Some(metric::Data::Gauge(g)) => number_value(&g.data_points[0]),
                _ => None,
            })
    }

    /// A server's batch with `efficiency`'s counters: joules, cost, input and output tokens.
    fn efficiency_batch(id: &str, joules: f64, cost: f64, input: f64, output: f64) -> Batch {
        let mut b = server_batch("chat", id, 1.0, 10.0, 1.0, 0.0);
        let tokens = |v: f64, ty: &str| number_point(1, v, vec![kv("gen_ai.token.type", ty)]);
        b.resource_metrics[0].scope_metrics[0].metrics.extend([
            Metric::sum(
                "gen_ai.server.energy",
                "J",
                true,
                vec![number_point(1, joules, vec![])],
            ),
            Metric::sum(
                "gen_ai.server.cost",
                "USD",
                true,
                vec![number_point(1, cost, vec![])],
            ),
            g("gen_ai.server.gpus", 2.0),
            g("gen_ai.server.gpus.idle", if id == "b" { 1.0 } else { 0.0 }),
            Metric::sum(
                "gen_ai.server.token.usage",
                "{token}",
                true,
                vec![tokens(input, "input"), tokens(output, "output")],
            ),
        ]);
        b
    }

    #[test]
    fn pool_efficiency_is_the_sum_of_the_servers_latest_windows() {
        let mut p = PoolAggregate::new(PoolConfig::default());
        let feed = |p: &mut PoolAggregate, mut b: Batch| p.process(&mut b);
        feed(&mut p, efficiency_batch("a", 100.0, 1.0, 10.0, 10.0));
        feed(&mut p, efficiency_batch("b", 0.0, 0.0, 0.0, 0.0));
        // Between windows the counters repeat: nothing changes.
        feed(&mut p, efficiency_batch("a", 100.0, 1.0, 15.0, 15.0));
        feed(&mut p, efficiency_batch("a", 1100.0, 2.0, 60.0, 60.0));
        feed(&mut p, efficiency_batch("b", 3000.0, 3.0, 100.0, 50.0));
        let b = p.flush().unwrap();
        // (1000 + 3000) J for (100 + 150) tokens, 50 + 50 of them output; 1 + 3 for 250.
        assert_eq!(
            value(&b, "chat", "gen_ai.pool.energy.per_token"),
            Some(16.0)
        );
        assert_eq!(
            value(&b, "chat", "gen_ai.pool.energy.per_output_token"),
            Some(40.0)
        );
        assert_eq!(
            value(&b, "chat", "gen_ai.pool.cost.per_1m_tokens"),
            Some(16_000.0)
        );
        assert_eq!(value(&b, "chat", "gen_ai.pool.gpus"), Some(4.0));
        assert_eq!(value(&b, "chat", "gen_ai.pool.gpus.idle"), Some(1.0));
        // `a` restarts: its tokens go back, so its window is dropped, not counted negative.
        feed(&mut p, efficiency_batch("a", 1200.0, 2.5, 5.0, 5.0));
        let b = p.flush().unwrap();
        assert_eq!(
            value(&b, "chat", "gen_ai.pool.energy.per_token"),
            Some(20.0)
        );
    }

    #[test]
    fn averages_ready_capacity_and_gateway_names() {
        let mut p = PoolAggregate::new(PoolConfig {
            compat: Some(Compat::GatewayApiInferenceExtension),
            ..Default::default()
        });
        p.process(&mut server_batch("chat", "a:8000", 1.0, 40.0, 10.0, 2.0));
        p.process(&mut server_batch("chat", "b:8000", 1.0, 60.0, 22.0, 4.0));
        p.process(&mut server_batch("code", "c:8000", 1.0, 10.0, 1.0, 0.0));
        let out = p.flush().unwrap();
        assert_eq!(
            value(&out, "chat", "gen_ai.pool.kv_cache.usage.average"),
            Some(50.0)
        );
        assert_eq!(
            value(&out, "chat", "gen_ai.pool.queue.size.average"),
            Some(3.0)
        );
        assert_eq!(value(&out, "chat", "gen_ai.pool.servers.ready"), Some(2.0));
        assert_eq!(
            value(&out, "chat", "gen_ai.pool.requests.running"),
            Some(32.0)
        );
        assert_eq!(
            value(&out, "chat", "gen_ai.pool.capacity.usage"),
            Some(25.0)
        );
        assert_eq!(
            value(&out, "chat", "inference_pool_average_kv_cache_utilization"),
            Some(0.5)
        );
        assert_eq!(value(&out, "chat", "inference_pool_ready_pods"), Some(2.0));
        assert_eq!(value(&out, "code", "gen_ai.pool.servers.ready"), Some(1.0));
        let per_pod = out
            .metrics()
            .find(|m| m.name == "inference_pool_per_pod_queue_size")
            .unwrap();
        assert_eq!(per_pod.point_count(), 2);
    }

    #[test]
    fn tensor_parallel_replicas_count_once_data_parallel_ranks_add_up() {
        // SGLang with metrics from every scheduler: TP ranks repeat their DP rank's numbers.
        let ranks = |v: [f64; 4]| {
            let points = [("0", "0"), ("1", "0"), ("0", "1"), ("1", "1")]
                .iter()
                .zip(v)
                .map(|((tp, dp), v)| {
                    number_point(1, v, vec![kv("tp_rank", *tp), kv("dp_rank", *dp)])
                })
                .collect();
            points
        };
        let mut batch = Batch::with_resource(
            vec![
                kv("gen_ai.pool.name", "chat"),
                kv("service.instance.id", "s:30000"),
            ],
            vec![
                Metric::gauge("up", "", vec![number_point(1, 1.0, vec![])]),
                Metric::gauge(
                    "gen_ai.server.requests.running",
                    "",
                    ranks([3.0, 3.0, 2.0, 2.0]),
                ),
                Metric::gauge(
                    "gen_ai.server.requests.waiting",
                    "",
                    ranks([1.0, 1.0, 0.0, 0.0]),
                ),
                Metric::gauge(
                    "gen_ai.server.kv_cache.usage",
                    "",
                    ranks([40.0, 40.0, 60.0, 60.0]),
                ),
            ],
        );
        let mut p = PoolAggregate::new(PoolConfig::default());
        p.process(&mut batch);
        let out = p.flush().unwrap();
        assert_eq!(
            value(&out, "chat", "gen_ai.pool.requests.running"),
            Some(5.0)
        );
        assert_eq!(
            value(&out, "chat", "gen_ai.pool.queue.size.average"),
            Some(1.0)
        );
        assert_eq!(
            value(&out, "chat", "gen_ai.pool.kv_cache.usage.average"),
            Some(50.0)
        );
    }

    #[test]
    fn ollamas_vram_allocation_is_no_kv_usage() {
        let mut batch = server_batch("local", "ollama:11434", 1.0, 0.0, 1.0, 0.0);
        batch.for_each_metric_mut(|_, m| {
            if let (true, Some(metric::Data::Gauge(g))) =
                (m.name == "gen_ai.server.kv_cache.usage", &mut m.data)
            {
                g.data_points[0].attributes =
                    vec![kv("gen_ai.server.kv_cache.basis", "vram_allocation")];
            }
        });
        let mut p = PoolAggregate::new(PoolConfig::default());
        p.process(&mut batch);
        let out = p.flush().unwrap();
        assert_eq!(value(&out, "local", "gen_ai.pool.servers.ready"), Some(1.0));
        assert_eq!(
            value(&out, "local", "gen_ai.pool.kv_cache.usage.average"),
            None,
            "no KV average from a VRAM allocation"
        );
    }

    #[test]
    fn two_misses_leave_the_pool_and_stale_pools_stop() {
        let mut p = PoolAggregate::new(PoolConfig::default());
        p.process(&mut server_batch("chat", "a", 1.0, 40.0, 10.0, 2.0));
        p.process(&mut server_batch("chat", "b", 1.0, 60.0, 20.0, 4.0));
        p.process(&mut server_batch("chat", "b", 0.0, 0.0, 0.0, 0.0));
        let out = p.flush().unwrap();
        assert_eq!(
            value(&out, "chat", "gen_ai.pool.servers.ready"),
            Some(2.0),
            "one miss is a blip"
        );
        p.process(&mut server_batch("chat", "b", 0.0, 0.0, 0.0, 0.0));
        let out = p.flush().unwrap();
        assert_eq!(value(&out, "chat", "gen_ai.pool.servers.ready"), Some(1.0));
        assert_eq!(
            value(&out, "chat", "gen_ai.pool.kv_cache.usage.average"),
            Some(40.0)
        );
        // Nothing heard for longer than stale_after: the pool disappears.
        p.expire(Instant::now() + Duration::from_secs(3600));
        assert!(p.emit(Instant::now(), 1).is_empty());
    }

    #[test]
    fn a_server_whose_reports_went_elsewhere_leaves_within_three_periods() {
        let mut p = PoolAggregate::new(PoolConfig::default());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let metrics =
            |b: &Batch| -> Vec<Metric> { b.resource_metrics[0].scope_metrics[0].metrics.clone() };
        let (a, b) = (
            metrics(&server_batch("chat", "a", 1.0, 40.0, 10.0, 2.0)),
            metrics(&server_batch("chat", "b", 1.0, 60.0, 20.0, 4.0)),
        );
        fn refs(m: &[Metric]) -> Vec<&Metric> {
            m.iter().collect()
        }
        // Both report every 10 s; parts of one scrape (ms apart) are no period.
        for s in [0, 10, 20, 30] {
            p.observe("chat", "a", &refs(&a), at(s));
            p.observe("chat", "a", &refs(&a), at(s) + Duration::from_millis(5));
            p.observe("chat", "b", &refs(&b), at(s));
        }
        assert_eq!(p.views(at(35))["chat"].running, 30.0);
        // `b`'s reports now go to another gateway: after three periods it counts here no more,
        // long before stale_after (60 s) forgets it.
        p.observe("chat", "a", &refs(&a), at(40));
        p.observe("chat", "a", &refs(&a), at(50));
        assert_eq!(p.views(at(55))["chat"].running, 30.0, "one period late");
        p.observe("chat", "a", &refs(&a), at(60));
        let v = &p.views(at(61))["chat"];
        assert_eq!((v.running, v.ready), (10.0, 1));
        // It comes back: counted at once.
        p.observe("chat", "b", &refs(&b), at(62));
        assert_eq!(p.views(at(62))["chat"].running, 30.0);
        // A server seen once (a pool that moved here and on) goes by everyone's period.
        p.observe("edge", "c", &refs(&b), at(62));
        assert!(p.views(at(70)).contains_key("edge"));
        assert!(
            !p.views(at(112)).contains_key("edge"),
            "before stale_after (60 s)"
        );
        // The whole pool moved away: it is no longer emitted here.
        assert!(p.views(at(200)).is_empty());
        assert!(p.emit(at(200), 1).is_empty());
    }

    #[test]
    fn servers_are_capped_across_pools() {
        let mut p = PoolAggregate::new(PoolConfig {
            max_servers: 3,
            ..Default::default()
        });
        for (pool, id) in [
            ("chat", "a"),
            ("chat", "b"),
            ("edge", "c"),
            ("edge", "d"),
            ("x", "e"),
        ] {
            p.process(&mut server_batch(pool, id, 1.0, 10.0, 1.0, 0.0));
        }
        assert_eq!(p.ignored_servers, 2, "the 4th and 5th server are ignored");
        p.process(&mut server_batch("chat", "a", 1.0, 20.0, 1.0, 0.0));
        assert_eq!(p.ignored_servers, 2, "a known server is always updated");
        let out = p.flush().unwrap();
        assert_eq!(value(&out, "edge", "gen_ai.pool.servers.ready"), Some(1.0));
        assert_eq!(value(&out, "x", "gen_ai.pool.servers.ready"), None);
        p.expire(Instant::now() + Duration::from_secs(3600));
        p.process(&mut server_batch("x", "e", 1.0, 10.0, 1.0, 0.0));
        assert_eq!(
            p.ignored_servers, 2,
            "room again once the others went stale"
        );
    }

    /// One scrape as the brute force sees it: up, KV usage, running, waiting.
    type Observation = (bool, f64, f64, f64);

    /// Every aggregate against a brute-force recomputation, over random pools, servers,
    /// values and failures.
    #[test]
    fn property_aggregates_match_brute_force() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for case in 0..300 {
            let mut p = PoolAggregate::new(PoolConfig::default());
            // Brute force: every observation per (pool, server), in order.
            let mut log: BTreeMap<(String, String), Vec<Observation>> = BTreeMap::new();
            let pools = 1 + rand(3);
            for _ in 0..(1 + rand(40)) {
                let pool = format!("pool{}", rand(pools));
                let server = format!("s{}", rand(6));
                let up = rand(4) != 0;
                let (kv_cache, running, waiting) =
                    (rand(101) as f64, rand(64) as f64, rand(20) as f64);
                p.process(&mut server_batch(
                    &pool,
                    &server,
                    if up { 1.0 } else { 0.0 },
                    kv_cache,
                    running,
                    waiting,
                ));
                log.entry((pool, server))
                    .or_default()
                    .push((up, kv_cache, running, waiting));
            }
            let views = p.views(Instant::now());
            let mut expected: BTreeMap<String, (Vec<f64>, Vec<f64>, f64, f64)> = BTreeMap::new();
            for ((pool, _), obs) in &log {
                let e = expected.entry(pool.clone()).or_default();
                let trailing_misses = obs.iter().rev().take_while(|o| !o.0).count();
                let Some(last_good) = obs.iter().rev().find(|o| o.0) else {
                    continue;
                };
                if trailing_misses >= 2 {
                    continue;
                }
                e.0.push(last_good.1);
                e.1.push(last_good.3);
                e.2 += last_good.2;
                e.3 += 64.0;
            }
            for (pool, (kvs, queues, running, max)) in expected {
                let v = &views[&pool];
                let mean =
                    |x: &[f64]| (!x.is_empty()).then(|| x.iter().sum::<f64>() / x.len() as f64);
                assert_eq!(v.ready, kvs.len(), "case {case} {pool}: ready");
                assert_eq!(v.kv_cache_average, mean(&kvs), "case {case} {pool}: kv");
                assert_eq!(v.queue_average, mean(&queues), "case {case} {pool}: queue");
                assert_eq!(v.running, running, "case {case} {pool}: running");
                assert_eq!(
                    v.waiting,
                    queues.iter().sum::<f64>(),
                    "case {case} {pool}: waiting"
                );
                assert_eq!(
                    v.capacity,
                    (max > 0.0).then(|| running / max * 100.0),
                    "case {case} {pool}: capacity"
                );
            }
        }
    }
}
