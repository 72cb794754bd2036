//! `genai_normalize`: maps each engine's native metrics onto the `gen_ai` vocabulary.
//!
//! The mappings are data: one YAML table per engine in `processors/tables/` (compiled in), plus
//! tables users name in config for their own servers. A table renames metrics, converts units
//! (`scale`), adds attributes (`gen_ai.token.type`) and renames attributes (`model_name` →
//! `gen_ai.request.model`). It applies to resources whose `gen_ai.provider.name` is its engine,
//! to resources with no provider (pushed or generically scraped data, which then gets the
//! engine as provider), or to those its `match` names.

use std::collections::{BTreeMap, HashMap};

use std::path::PathBuf;

use genai_collector_core::model::{
    any_value, metric, AttributesExt, Batch, KeyValue, Metric, MetricExt, ScopeMetrics,
};
use genai_collector_core::{
    BuildContext, ComponentConfig, ComponentError, Processor, ProcessorFactory,
};
use serde::Deserialize;

/// The built-in tables, by file name.
pub const BUILTIN_TABLES: &[(&str, &str)] = &[
    ("vllm.yaml", include_str!("../tables/vllm.yaml")),
    ("tgi.yaml", include_str!("../tables/tgi.yaml")),
    ("llamacpp.yaml", include_str!("../tables/llamacpp.yaml")),
    ("sglang.yaml", include_str!("../tables/sglang.yaml")),
    ("ollama.yaml", include_str!("../tables/ollama.yaml")),
];

/// One mapping table, as written in YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// The engine: compared with `gen_ai.provider.name`, and set as it where absent.
    pub engine: String,
    /// Apply only to resources with these attributes (`service.name: my-reranker`).
    #[serde(default, rename = "match")]
    pub match_attrs: BTreeMap<String, String>,
    /// Point attribute renames (`model_name: gen_ai.request.model`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    pub metrics: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub from: String,
    pub to: String,
    pub unit: Option<String>,
    /// Multiplies every value (ratio → %: 100; ms → s: 0.001).
    #[serde(default = "one")]
    pub scale: f64,
    /// Attributes set on every point.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Only the points whose labels (the engine's names, before renames) have these values;
    /// the others are left to the source's other rows.
    #[serde(default, rename = "where")]
    pub where_attrs: BTreeMap<String, String>,
    /// For a histogram or summary: a counter of each point's sum (TGI's token counts exist
    /// only as the sums of its length histograms) or count.
    pub take: Option<Take>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Take {
    Sum,
    Count,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmapped {
    /// Metrics no table maps pass through unchanged.
    #[default]
    Keep,
    /// Metrics no table maps are dropped; `gen_ai.*`, `hw.*`, `up` and `scrape_*` stay.
    Drop,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NormalizeConfig {
    /// Your own tables (YAML files in the built-in tables' format); they win over built-ins.
    pub tables: Vec<PathBuf>,
    /// Use the built-in engine tables.
    pub builtin_tables: bool,
    pub unmapped: Unmapped,
}

impl Default for NormalizeConfig {
    fn default() -> Self {
        Self {
            tables: Vec::new(),
            builtin_tables: true,
            unmapped: Unmapped::Keep,
        }
    }
}

impl ComponentConfig for NormalizeConfig {}

/// `genai_normalize`, with the built-in tables and any compiled into the binary.
#[derive(Default)]
pub struct GenaiNormalizeFactory(&'static [(&'static str, &'static str)]);

impl GenaiNormalizeFactory {
    /// `genai_normalize` with tables compiled into a binary of your own, as `(file name, YAML)`:
    /// they come after the config's `tables` and before the built-in ones. Register it in place
    /// of the built-in kind (`Components::with_processor` replaces a kind of the same name).
    pub fn with_tables(tables: &'static [(&'static str, &'static str)]) -> Self {
        Self(tables)
    }
}

impl ProcessorFactory for GenaiNormalizeFactory {
    type Config = NormalizeConfig;

    fn kind(&self) -> &'static str {
        "genai_normalize"
    }

    fn description(&self) -> &'static str {
        "maps engine metrics (vLLM, TGI, llama.cpp, SGLang, tables compiled in or named in the config) to the gen_ai vocabulary"
    }

    fn build(
        &self,
        config: &NormalizeConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError> {
        build(config, ctx, self.0)
    }
}

/// The processor with the config's tables, then `compiled`, then (unless turned off) the
/// built-in ones: the first table that maps a name wins.
fn build(
    config: &NormalizeConfig,
    ctx: &BuildContext,
    compiled: &[(&str, &str)],
) -> Result<Box<dyn Processor>, ComponentError> {
    let mut tables = Vec::new();
    for path in &config.tables {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ComponentError::Config(format!("table {}: {e}", path.display())))?;
        tables.push(
            parse_table(&text)
                .map_err(|e| ComponentError::Config(format!("table {}: {e}", path.display())))?,
        );
    }
    let builtin = if config.builtin_tables {
        BUILTIN_TABLES
    } else {
        &[]
    };
    for (name, text) in compiled.iter().chain(builtin) {
        tables.push(
            parse_table(text)
                .map_err(|e| ComponentError::Config(format!("built-in table {name}: {e}")))?,
        );
    }
    let mut normalize = GenaiNormalize::new(tables, config.unmapped);
    normalize.stats = ctx
        .pipeline
        .as_deref()
        .and_then(|p| ctx.telemetry.find_processor(&ctx.id.to_string(), p));
    Ok(Box::new(normalize))
}

/// Reads a table, with the YAML crate's located error on a mistake.
pub fn parse_table(text: &str) -> Result<Table, String> {
    let table: Table = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    for r in &table.metrics {
        if !r.scale.is_finite() || r.scale == 0.0 {
            return Err(format!(
                "metric `{}`: scale must be a non-zero number",
                r.from
            ));
        }
    }
    Ok(table)
}

struct Compiled {
    table: Table,
    /// Source name → its rows, in table order: one source may feed several names.
    rules: HashMap<String, Vec<usize>>,
}

pub struct GenaiNormalize {
    tables: Vec<Compiled>,
    unmapped: Unmapped,
    /// Per scraped target (`service.instance.id`): what its last page matched, as a
    /// fingerprint, and whether a core metric was missing. Bounded: see [`MAX_TARGETS`].
    targets: HashMap<String, (u64, bool)>,
    stats: Option<std::sync::Arc<genai_collector_core::telemetry::ComponentStats>>,
}

/// Targets whose table matches are remembered; past it the memory starts afresh (each target
/// is then described once more).
const MAX_TARGETS: usize = 10_000;

/// What every engine's page should give when its table maps it.
const CORE: [&str; 3] = [
    "gen_ai.server.requests.running",
    "gen_ai.server.requests.waiting",
    "gen_ai.server.kv_cache.usage",
];

const MODEL: &str = "gen_ai.request.model";
const PROVIDER: &str = "gen_ai.provider.name";

fn kept_when_unmapped(name: &str) -> bool {
    name.starts_with("gen_ai.")
        || name.starts_with("hw.")
        || name == "up"
        || name.starts_with("scrape_")
}

impl GenaiNormalize {
    pub fn new(tables: Vec<Table>, unmapped: Unmapped) -> Self {
        let tables = tables
            .into_iter()
            .map(|table| {
                let mut rules: HashMap<String, Vec<usize>> = HashMap::new();
                for (i, r) in table.metrics.iter().enumerate() {
                    rules.entry(r.from.clone()).or_default().push(i);
                }
                Compiled { table, rules }
            })
            .collect();
        Self {
            tables,
            unmapped,
            targets: HashMap::new(),
            stats: None,
        }
    }

    /// Says, once per change, which table rows a scraped target's page matched, and warns
    /// when a core metric its engine's table maps is missing from it (an engine version the
    /// tables do not know): a log line, the processor's `/healthz` error and
    /// `genai_collector_processor_incomplete_targets`.
    fn describe(
        &mut self,
        rm: &genai_collector_core::model::ResourceMetrics,
        matched: &[(usize, usize)],
    ) {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let metrics = || rm.scope_metrics.iter().flat_map(|s| &s.metrics);
        // Only a whole page can lack a metric: scrapes carry `up`, pushes do not.
        if !metrics().any(|m| m.name == "up") {
            return;
        }
        let none = Vec::new();
        let attrs = rm.resource.as_ref().map_or(&none, |r| &r.attributes);
        let Some(target) = attrs
            .get_str("service.instance.id")
            .or_else(|| attrs.get_str("url.full"))
        else {
            return;
        };
        let (table, _) = matched[0];
        let table = &self.tables[table].table;
        let missing: Vec<&str> = CORE
            .into_iter()
            .filter(|c| table.metrics.iter().any(|r| r.to == *c))
            .filter(|c| !metrics().any(|m| m.name == *c))
            .collect();
        let mut rows: Vec<&str> = matched
            .iter()
            .map(|&(t, r)| self.tables[t].table.metrics[r].from.as_str())
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let fingerprint =
            BuildHasherDefault::<DefaultHasher>::default().hash_one((&rows, &missing));
        if self.targets.get(target).map(|t| t.0) == Some(fingerprint) {
            return;
        }
        if self.targets.len() >= MAX_TARGETS {
            self.targets.clear();
        }
        self.targets
            .insert(target.to_owned(), (fingerprint, !missing.is_empty()));
        let version = attrs
            .get_str("service.version")
            .unwrap_or("version unknown");
        let engine = table.engine.as_str();
        tracing::info!(target_instance = target, engine, version, rows = rows.len(), of = table.metrics.len(), matched = %rows.join(", "), "table rows this target's page matches");
        if !missing.is_empty() {
            let message = format!(
                "{target} ({engine} {version}): its page has no {} (matched {} of the {engine} table's {} rows); an engine version the table does not know?",
                missing.join(", "),
                rows.len(),
                table.metrics.len()
            );
            tracing::warn!("{message}");
            if let Some(stats) = &self.stats {
                stats.set_error(message);
            }
        }
        if let Some(stats) = &self.stats {
            let incomplete = self.targets.values().filter(|t| t.1).count() as u64;
            stats.set_incomplete_targets(incomplete);
            // The message describes a state: once every page is whole again, /healthz drops it.
            if incomplete == 0 {
                stats.clear_error();
            }
        }
    }

    /// The tables that may apply to a resource with these attributes.
    fn applicable(&self, attrs: &[KeyValue]) -> Vec<usize> {
        let text = |key: &str| {
            attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
                match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.as_str()),
                    _ => None,
                }
            })
        };
        let provider = text(PROVIDER);
        (0..self.tables.len())
            .filter(|&i| {
                let t = &self.tables[i].table;
                if !t.match_attrs.is_empty() {
                    return t
                        .match_attrs
                        .iter()
                        .all(|(k, v)| text(k) == Some(v.as_str()));
                }
                provider.is_none_or(|p| p == t.engine)
            })
            .collect()
    }
}

impl Processor for GenaiNormalize {
    fn process(&mut self, batch: &mut Batch) {
        for rm in &mut batch.resource_metrics {
            let resource = rm.resource.as_ref().map(|r| &r.attributes);
            let tables = self.applicable(resource.map_or(&[][..], |a| &a[..]));
            let model = resource.and_then(|a| a.get_str(MODEL)).map(str::to_owned);
            let mut engine: Option<String> = None;
            // The rules (table, row) this resource's metrics matched.
            let mut matched: Vec<(usize, usize)> = Vec::new();
            for sm in &mut rm.scope_metrics {
                let mut renamed = false;
                let unmapped = self.unmapped;
                // Each kept metric's rank: its rule's place (table, row) for a renamed one.
                let mut ranks: Vec<(usize, usize)> = Vec::with_capacity(sm.metrics.len());
                // Metrics a source's other rows derive from it, with their ranks.
                let mut derived: Vec<(Metric, (usize, usize))> = Vec::new();
                sm.metrics.retain_mut(|m| {
                    let hit = tables
                        .iter()
                        .find_map(|&t| self.tables[t].rules.get(&m.name).map(|rows| (t, rows)));
                    let Some((t, rows)) = hit else {
                        let keep = unmapped == Unmapped::Keep || kept_when_unmapped(&m.name);
                        if keep {
                            ranks.push((usize::MAX, usize::MAX));
                        }
                        return keep;
                    };
                    let table = &self.tables[t].table;
                    engine.get_or_insert_with(|| table.engine.clone());
                    renamed = true;
                    let (&last, others) = rows.split_last().expect("a row per entry");
                    for &r in others {
                        if let Some(mut d) = shape(m.clone(), &table.metrics[r]) {
                            apply(&mut d, &table.metrics[r], table, model.as_deref());
                            derived.push((d, (t, r)));
                        }
                    }
                    match shape(std::mem::take(m), &table.metrics[last]) {
                        Some(shaped) => {
                            *m = shaped;
                            apply(m, &table.metrics[last], table, model.as_deref());
                            ranks.push((t, last));
                            true
                        }
                        None => false,
                    }
                });
                for (d, rank) in derived {
                    sm.metrics.push(d);
                    ranks.push(rank);
                }
                if renamed {
                    matched.extend(ranks.iter().filter(|r| r.0 != usize::MAX));
                    merge_same_names(sm, &ranks);
                }
            }
            if !matched.is_empty() {
                self.describe(rm, &matched);
            }
            if let (Some(e), Some(res)) = (engine, rm.resource.as_mut()) {
                if res.attributes.get_str(PROVIDER).is_none() {
                    res.attributes.set_attr(PROVIDER, e);
                }
            }
        }
    }
}

/// `m` as `rule` takes it: only the points its `where` selects, and for `take` a counter of
/// each histogram or summary point's sum or count. `None` when no point is left.
fn shape(mut m: Metric, rule: &Rule) -> Option<Metric> {
    if let Some(take) = rule.take {
        m = take_part(m, take)?;
    }
    if !rule.where_attrs.is_empty() {
        m.retain_points(|attrs| {
            rule.where_attrs
                .iter()
                .all(|(k, v)| attrs.get_str(k) == Some(v.as_str()))
        });
    }
    (m.point_count() > 0).then_some(m)
}

/// A monotonic cumulative sum of each histogram or summary point's sum or count.
fn take_part(m: Metric, take: Take) -> Option<Metric> {
    use genai_collector_core::model::{number_data_point, NumberDataPoint};
    let point = |attributes, start, time, value| NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: time,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    };
    let points: Vec<NumberDataPoint> = match m.data? {
        metric::Data::Histogram(h) => h
            .data_points
            .into_iter()
            .filter_map(|p| {
                let v = match take {
                    Take::Sum => p.sum?,
                    Take::Count => p.count as f64,
                };
                Some(point(
                    p.attributes,
                    p.start_time_unix_nano,
                    p.time_unix_nano,
                    v,
                ))
            })
            .collect(),
        metric::Data::Summary(s) => s
            .data_points
            .into_iter()
            .map(|p| {
                let v = match take {
                    Take::Sum => p.sum,
                    Take::Count => p.count as f64,
                };
                point(p.attributes, p.start_time_unix_nano, p.time_unix_nano, v)
            })
            .collect(),
        _ => return None,
    };
    let mut out = Metric::sum(&m.name, &m.unit, true, points);
    out.description = m.description;
    Some(out)
}

/// Renames and rescales `m` by `rule`; every point gets the model and, as the conventions
/// require on each point, the provider.
fn apply(m: &mut Metric, rule: &Rule, table: &Table, model: Option<&str>) {
    let renames = &table.attributes;
    m.rename(&rule.to);
    if rule.scale != 1.0 {
        m.scale(rule.scale);
    }
    if let Some(u) = &rule.unit {
        u.clone_into(&mut m.unit);
    }
    m.for_each_point_attrs(|attrs| {
        for (from, to) in renames {
            attrs.rename_attr(from, to);
        }
        for (k, v) in &rule.attributes {
            attrs.set_attr(k, v.as_str());
        }
        if let (Some(model), None) = (model, attrs.get_attr(MODEL)) {
            attrs.set_attr(MODEL, model);
        }
        if attrs.get_attr(PROVIDER).is_none() {
            attrs.set_attr(PROVIDER, table.engine.as_str());
        }
    });
}

/// Metrics renamed to one name (input and output tokens) become one metric with all points,
/// when their kinds agree. Where two carry a point with the same attributes (an engine that
/// emits an old and a new name side by side), the one whose rule comes first (`ranks`, one
/// per metric) wins: one series is never counted twice. Linear in the metrics: a scope may
/// hold a pushed request's hundreds of thousands.
fn merge_same_names(sm: &mut ScopeMetrics, ranks: &[(usize, usize)]) {
    use std::hash::{BuildHasher, RandomState};
    if sm.metrics.len() <= 32 {
        // A page's few dozen metrics: a scan beats hashing and allocating.
        let mut ranks = ranks.to_vec();
        let mut i = 1;
        while i < sm.metrics.len() {
            let m = &sm.metrics;
            match (0..i).find(|&j| m[j].name == m[i].name && same_kind(&m[j], &m[i])) {
                Some(j) => {
                    let extra = sm.metrics.remove(i);
                    let extra_rank = ranks.remove(i);
                    let first = ranks[j] <= extra_rank;
                    ranks[j] = ranks[j].min(extra_rank);
                    merge_points(&mut sm.metrics[j], extra, first);
                }
                None => i += 1,
            }
        }
        return;
    }
    let hasher = RandomState::new();
    // Name hash → the last metric kept with it; `earlier[i]` chains to the one before.
    let mut last: HashMap<u64, usize> = HashMap::with_capacity(sm.metrics.len());
    let mut earlier: Vec<Option<usize>> = Vec::with_capacity(sm.metrics.len());
    let mut kept: Vec<Metric> = Vec::with_capacity(sm.metrics.len());
    let mut kept_ranks: Vec<(usize, usize)> = Vec::with_capacity(sm.metrics.len());
    for (m, rank) in sm.metrics.drain(..).zip(ranks.iter().copied()) {
        let h = hasher.hash_one(&m.name);
        let mut at = last.get(&h).copied();
        while let Some(j) = at {
            if kept[j].name == m.name && same_kind(&kept[j], &m) {
                break;
            }
            at = earlier[j];
        }
        match at {
            Some(j) => {
                let first = kept_ranks[j] <= rank;
                kept_ranks[j] = kept_ranks[j].min(rank);
                merge_points(&mut kept[j], m, first);
            }
            None => {
                earlier.push(last.insert(h, kept.len()));
                kept.push(m);
                kept_ranks.push(rank);
            }
        }
    }
    sm.metrics = kept;
}

fn same_kind(a: &Metric, b: &Metric) -> bool {
    match (&a.data, &b.data) {
        (Some(metric::Data::Sum(x)), Some(metric::Data::Sum(y))) => {
            x.is_monotonic == y.is_monotonic
                && x.aggregation_temporality == y.aggregation_temporality
        }
        (Some(metric::Data::Histogram(x)), Some(metric::Data::Histogram(y))) => {
            x.aggregation_temporality == y.aggregation_temporality
        }
        (x, y) => a.kind_name() == b.kind_name() && x.is_some() && y.is_some(),
    }
}

/// One series: the same attributes, in any order.
fn same_attrs(x: &[KeyValue], y: &[KeyValue]) -> bool {
    x.len() == y.len()
        && x.iter()
            .all(|kv| y.iter().any(|o| o.key == kv.key && o.value == kv.value))
}

/// A hash equal for attribute sets `same_attrs` calls the same (keys and string values;
/// other values are left to the comparison).
fn attrs_hash(state: &impl std::hash::BuildHasher, attrs: &[KeyValue]) -> u64 {
    attrs.iter().fold(0u64, |sum, kv| {
        let text = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => s.as_str(),
            _ => "",
        };
        sum.wrapping_add(state.hash_one((&kv.key, text)))
    })
}

/// Adds `from`'s points to `into`'s. A point whose attributes `into` already has is one
/// series reported twice: the earlier rule's point stays (`into_first`: `into`'s).
fn merge_points(into: &mut Metric, from: Metric, into_first: bool) {
    fn merge<P>(a: &mut Vec<P>, b: Vec<P>, attrs: fn(&P) -> &[KeyValue], a_first: bool) {
        let put = |a: &mut Vec<P>, at: Option<usize>, p: P| match at {
            Some(_) if a_first => {}
            Some(i) => a[i] = p,
            None => a.push(p),
        };
        if a.len().saturating_mul(b.len()) <= 256 {
            // A page's few models: a scan beats hashing.
            for p in b {
                let at = a.iter().position(|q| same_attrs(attrs(q), attrs(&p)));
                put(a, at, p);
            }
            return;
        }
        let state = std::hash::RandomState::new();
        let hash = |p: &P| attrs_hash(&state, attrs(p));
        // Attribute hash → the last point with it; `earlier[i]` chains to the one before.
        let mut last: HashMap<u64, usize> = HashMap::with_capacity(a.len() + b.len());
        let mut earlier: Vec<Option<usize>> = Vec::with_capacity(a.len() + b.len());
        for (i, q) in a.iter().enumerate() {
            earlier.push(last.insert(hash(q), i));
        }
        for p in b {
            let h = hash(&p);
            let mut at = last.get(&h).copied();
            while let Some(i) = at {
                if same_attrs(attrs(&a[i]), attrs(&p)) {
                    break;
                }
                at = earlier[i];
            }
            if at.is_none() {
                earlier.push(last.insert(h, a.len()));
            }
            put(a, at, p);
        }
    }
    match (&mut into.data, from.data) {
        (Some(metric::Data::Gauge(a)), Some(metric::Data::Gauge(b))) => merge(
            &mut a.data_points,
            b.data_points,
            |p| &p.attributes,
            into_first,
        ),
        (Some(metric::Data::Sum(a)), Some(metric::Data::Sum(b))) => merge(
            &mut a.data_points,
            b.data_points,
            |p| &p.attributes,
            into_first,
        ),
        (Some(metric::Data::Histogram(a)), Some(metric::Data::Histogram(b))) => merge(
            &mut a.data_points,
            b.data_points,
            |p| &p.attributes,
            into_first,
        ),
        (Some(metric::Data::Summary(a)), Some(metric::Data::Summary(b))) => merge(
            &mut a.data_points,
            b.data_points,
            |p| &p.attributes,
            into_first,
        ),
        (
            Some(metric::Data::ExponentialHistogram(a)),
            Some(metric::Data::ExponentialHistogram(b)),
        ) => merge(
            &mut a.data_points,
            b.data_points,
            |p| &p.attributes,
            into_first,
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::{kv, number_point, number_value};

    fn normalize(config: NormalizeConfig) -> Box<dyn Processor> {
        let ctx = BuildContext {
            id: genai_collector_core::ComponentId::parse("genai_normalize").unwrap(),
            pipeline: Some("metrics".into()),
            telemetry: Default::default(),
        };
        GenaiNormalizeFactory::default()
            .build(&config, &ctx)
            .unwrap()
    }

    fn gauge(name: &str, value: f64, attrs: Vec<KeyValue>) -> Metric {
        Metric::gauge(name, "", vec![number_point(1, value, attrs)])
    }

    fn find<'a>(b: &'a Batch, name: &str) -> &'a Metric {
        b.metrics()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn a_page_without_a_core_metric_is_reported() {
        let telemetry = genai_collector_core::telemetry::Telemetry::new();
        let stats = telemetry.register(
            genai_collector_core::ComponentKind::Processor,
            "genai_normalize",
            Some("metrics"),
        );
        let ctx = BuildContext {
            id: genai_collector_core::ComponentId::parse("genai_normalize").unwrap(),
            pipeline: Some("metrics".into()),
            telemetry,
        };
        let mut p = GenaiNormalizeFactory::default()
            .build(&NormalizeConfig::default(), &ctx)
            .unwrap();
        let page = |with_kv: bool, up: bool| {
            let mut metrics = vec![
                gauge("vllm:num_requests_running", 1.0, vec![]),
                gauge("vllm:num_requests_waiting", 0.0, vec![]),
            ];
            if with_kv {
                metrics.push(gauge("vllm:kv_cache_usage_perc", 0.5, vec![]));
            }
            if up {
                metrics.push(gauge("up", 1.0, vec![]));
            }
            Batch::with_resource(
                vec![
                    kv("gen_ai.provider.name", "vllm"),
                    kv("service.instance.id", "10.0.0.5:8000"),
                    kv("service.version", "0.13.0"),
                ],
                metrics,
            )
        };
        let incomplete = || stats.snapshot().incomplete_targets;
        p.process(&mut page(false, false));
        assert_eq!(incomplete(), 0, "a push is no whole page");
        p.process(&mut page(false, true));
        assert_eq!(incomplete(), 1);
        let e = stats.last_error().unwrap();
        assert!(
            e.contains("10.0.0.5:8000 (vllm 0.13.0): its page has no gen_ai.server.kv_cache.usage"),
            "{e}"
        );
        p.process(&mut page(true, true));
        assert_eq!(incomplete(), 0, "the next whole page has it");
        assert_eq!(stats.last_error(), None, "/healthz no longer names it");
    }

    #[test]
    fn an_old_and_a_new_name_side_by_side_count_once() {
        let model = || vec![kv("model_name", "m")];
        // vLLM 0.9.2-0.10.x emits both KV names; the page order must not matter.
        for old_first in [false, true] {
            let mut metrics = vec![
                gauge("vllm:kv_cache_usage_perc", 0.5, model()),
                gauge("vllm:gpu_cache_usage_perc", 0.25, model()),
                gauge(
                    "vllm:gpu_cache_usage_perc",
                    0.75,
                    vec![kv("model_name", "other")],
                ),
            ];
            if old_first {
                metrics.reverse();
            }
            let mut batch = Batch::with_resource(vec![kv("gen_ai.provider.name", "vllm")], metrics);
            normalize(NormalizeConfig::default()).process(&mut batch);
            let usage = find(&batch, "gen_ai.server.kv_cache.usage");
            let Some(metric::Data::Gauge(g)) = &usage.data else {
                panic!("gauge")
            };
            let values: Vec<(Option<&str>, f64)> = g
                .data_points
                .iter()
                .map(|p| {
                    (
                        p.attributes.get_str("gen_ai.request.model"),
                        number_value(p).unwrap(),
                    )
                })
                .collect();
            assert_eq!(values.len(), 2, "one point per model: {values:?}");
            assert!(
                g.data_points
                    .iter()
                    .all(|p| p.attributes.get_str("gen_ai.provider.name") == Some("vllm")),
                "the provider on every point, as the conventions require"
            );
            assert!(
                values.contains(&(Some("m"), 50.0)),
                "the current name wins: {values:?}"
            );
            assert!(
                values.contains(&(Some("other"), 75.0)),
                "the old name still serves where it is alone: {values:?}"
            );
        }
    }

    #[test]
    fn many_series_under_an_old_and_a_new_name_count_once() {
        // 40 × 50 points: past the scan, through the hashed merge; attribute order differs.
        let attrs = |m: usize, reversed: bool| {
            let mut a = vec![kv("model_name", format!("m{m}")), kv("engine", "0")];
            if reversed {
                a.reverse();
            }
            a
        };
        let current = (0..40).map(|m| number_point(1, 0.5, attrs(m, false)));
        let old = (0..50).map(|m| number_point(1, 0.25, attrs(m, true)));
        let mut batch = Batch::with_resource(
            vec![kv("gen_ai.provider.name", "vllm")],
            vec![
                Metric::gauge("vllm:gpu_cache_usage_perc", "", old.collect()),
                Metric::gauge("vllm:kv_cache_usage_perc", "", current.collect()),
            ],
        );
        normalize(NormalizeConfig::default()).process(&mut batch);
        let usage = find(&batch, "gen_ai.server.kv_cache.usage");
        let Some(metric::Data::Gauge(g)) = &usage.data else {
            panic!("gauge")
        };
        assert_eq!(g.data_points.len(), 50, "one point per model");
        for p in &g.data_points {
            let model = p.attributes.get_str("gen_ai.request.model").unwrap();
            let n: usize = model[1..].parse().unwrap();
            let want = if n < 40 { 50.0 } else { 25.0 };
            assert_eq!(number_value(p), Some(want), "{model}");
        }
    }

    #[test]
    fn a_scope_of_many_metrics_merges_in_linear_time() {
        // 200,000 distinct names plus the two token counters that map to one name.
        let mut metrics: Vec<Metric> = (0..200_000)
            .map(|i| gauge(&format!("app_metric_{i}"), 1.0, vec![]))
            .collect();
        for name in ["vllm:prompt_tokens_total", "vllm:generation_tokens_total"] {
            metrics.push(Metric::sum(
                name,
                "",
                true,
                vec![number_point(1, 5.0, vec![])],
            ));
        }
        let mut b = Batch::with_resource(vec![kv(PROVIDER, "vllm")], metrics);
        let started = std::time::Instant::now();
        normalize(NormalizeConfig::default()).process(&mut b);
        let tokens: Vec<_> = b
            .metrics()
            .filter(|m| m.name == "gen_ai.server.token.usage")
            .collect();
        assert_eq!(tokens.len(), 1, "input and output are one metric");
        assert_eq!(tokens[0].point_count(), 2);
        assert_eq!(b.metrics().count(), 200_001);
        println!("200,002 metrics normalised in {:?}", started.elapsed());
    }

    #[test]
    fn builtin_tables_parse() {
        for (name, text) in BUILTIN_TABLES {
            let t = parse_table(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                t.metrics.iter().all(|r| r.to.starts_with("gen_ai.")),
                "{name}"
            );
        }
    }

    #[test]
    fn vllm_names_units_and_attributes() {
        let mut b = Batch::with_resource(
            vec![kv(PROVIDER, "vllm")],
            vec![
                gauge(
                    "vllm:kv_cache_usage_perc",
                    0.4375,
                    vec![kv("model_name", "llama"), kv("engine", "0")],
                ),
                Metric::sum(
                    "vllm:prompt_tokens_total",
                    "",
                    true,
                    vec![number_point(1, 100.0, vec![kv("model_name", "llama")])],
                ),
                Metric::sum(
                    "vllm:generation_tokens_total",
                    "",
                    true,
                    vec![number_point(1, 40.0, vec![kv("model_name", "llama")])],
                ),
                gauge("vllm:mm_cache_queries_total", 1.0, vec![]),
            ],
        );
        normalize(NormalizeConfig::default()).process(&mut b);
        let kv_cache = find(&b, "gen_ai.server.kv_cache.usage");
        assert_eq!(kv_cache.unit, "%");
        let Some(metric::Data::Gauge(g)) = &kv_cache.data else {
            panic!()
        };
        assert_eq!(number_value(&g.data_points[0]), Some(43.75));
        assert_eq!(g.data_points[0].attributes.get_str(MODEL), Some("llama"));
        assert_eq!(g.data_points[0].attributes.get_str("model_name"), None);
        let tokens = find(&b, "gen_ai.server.token.usage");
        let Some(metric::Data::Sum(s)) = &tokens.data else {
            panic!()
        };
        let types: Vec<_> = s
            .data_points
            .iter()
            .map(|p| p.attributes.get_str("gen_ai.token.type").unwrap())
            .collect();
        assert_eq!(
            types,
            ["input", "output"],
            "input and output tokens are one metric"
        );
        assert_eq!(
            b.metrics()
                .filter(|m| m.name == "gen_ai.server.token.usage")
                .count(),
            1
        );
        assert!(
            b.metrics().any(|m| m.name == "vllm:mm_cache_queries_total"),
            "unmapped metrics are kept"
        );
    }

    #[test]
    fn one_source_feeds_several_rows_by_where_and_take() {
        let table = parse_table(
            r#"
engine: custom
attributes: { outcome: gen_ai.response.finish_reason }
metrics:
  - { from: requests_total, to: finished }
  - { from: requests_total, to: failed, where: { outcome: error }, attributes: { error.type: _OTHER } }
  - { from: requests_total, to: timed_out, where: { outcome: timeout } }
  - { from: prompt_length, to: input_tokens, take: sum }
  - { from: prompt_length, to: requests_seen, take: count }
  - { from: prompt_length, to: prompt_length_histogram }
"#,
        )
        .unwrap();
        let histogram = Metric {
            name: "prompt_length".into(),
            data: Some(metric::Data::Histogram(
                genai_collector_core::model::Histogram {
                    data_points: vec![genai_collector_core::model::HistogramDataPoint {
                        count: 4,
                        sum: Some(900.0),
                        bucket_counts: vec![1, 3],
                        explicit_bounds: vec![100.0],
                        ..Default::default()
                    }],
                    aggregation_temporality: 2,
                },
            )),
            ..Default::default()
        };
        let mut b = Batch::with_resource(
            vec![kv(PROVIDER, "custom")],
            vec![
                Metric::sum(
                    "requests_total",
                    "",
                    true,
                    vec![
                        number_point(1, 10.0, vec![kv("outcome", "stop")]),
                        number_point(1, 2.0, vec![kv("outcome", "error")]),
                    ],
                ),
                histogram,
            ],
        );
        GenaiNormalize::new(vec![table], Unmapped::Keep).process(&mut b);
        let points = |name: &str| match &find(&b, name).data {
            Some(metric::Data::Sum(s)) => s
                .data_points
                .iter()
                .map(|p| number_value(p).unwrap())
                .collect::<Vec<_>>(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(points("finished"), [10.0, 2.0]);
        assert_eq!(points("failed"), [2.0], "only the points `where` selects");
        let failed = find(&b, "failed");
        let Some(metric::Data::Sum(s)) = &failed.data else {
            panic!()
        };
        let attrs = &s.data_points[0].attributes;
        assert_eq!(
            attrs.get_str("gen_ai.response.finish_reason"),
            Some("error")
        );
        assert_eq!(attrs.get_str("error.type"), Some("_OTHER"));
        assert!(
            b.metrics().all(|m| m.name != "timed_out"),
            "no point, no metric"
        );
        assert_eq!(points("input_tokens"), [900.0]);
        assert_eq!(points("requests_seen"), [4.0]);
        assert!(s.is_monotonic);
        assert!(matches!(
            find(&b, "prompt_length_histogram").data,
            Some(metric::Data::Histogram(_))
        ));
        assert!(b
            .metrics()
            .all(|m| m.name != "requests_total" && m.name != "prompt_length"));
    }

    #[test]
    fn model_from_the_resource_and_provider_from_the_table() {
        let mut b = Batch::with_resource(
            vec![kv(PROVIDER, "tgi"), kv(MODEL, "mistral")],
            vec![gauge("tgi_queue_size", 3.0, vec![])],
        );
        b.push_resource(
            vec![kv("service.name", "llama-box")],
            vec![gauge("llamacpp:requests_processing", 2.0, vec![])],
        );
        normalize(NormalizeConfig::default()).process(&mut b);
        let waiting = find(&b, "gen_ai.server.requests.waiting");
        let Some(metric::Data::Gauge(g)) = &waiting.data else {
            panic!()
        };
        assert_eq!(g.data_points[0].attributes.get_str(MODEL), Some("mistral"));
        let llama = &b.resource_metrics[1];
        assert_eq!(
            llama
                .resource
                .as_ref()
                .unwrap()
                .attributes
                .get_str(PROVIDER),
            Some("llama.cpp"),
            "a provider-less resource gets the table's engine"
        );
        assert_eq!(
            llama.scope_metrics[0].metrics[0].name,
            "gen_ai.server.requests.running"
        );
    }

    #[test]
    fn a_table_only_applies_to_its_engine() {
        // An SGLang resource with a metric that happens to carry a vLLM name is not renamed.
        let mut b = Batch::with_resource(
            vec![kv(PROVIDER, "sglang")],
            vec![gauge("vllm:num_requests_running", 1.0, vec![])],
        );
        normalize(NormalizeConfig::default()).process(&mut b);
        assert_eq!(
            b.metrics().next().unwrap().name,
            "vllm:num_requests_running"
        );
    }

    #[test]
    fn a_custom_server_by_user_table_and_drop_mode() {
        let dir = std::env::temp_dir().join(format!("tables-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("reranker.yaml");
        std::fs::write(
            &path,
            "engine: reranker\nmatch: { service.name: cross-encoder }\nmetrics:\n  - { from: request_latency_seconds, to: gen_ai.server.request.duration, unit: s }\n  - { from: model_queue_size, to: gen_ai.server.requests.waiting, unit: \"{request}\" }\n  - { from: padding_ratio, to: gen_ai.server.padding.usage, unit: \"%\", scale: 100 }\n",
        )
        .unwrap();
        let mut b = Batch::with_resource(
            vec![kv("service.name", "cross-encoder")],
            vec![
                gauge("model_queue_size", 4.0, vec![]),
                gauge("padding_ratio", 0.25, vec![]),
                gauge("python_gc_objects_collected_total", 9.0, vec![]),
                gauge("up", 1.0, vec![]),
            ],
        );
        let config = NormalizeConfig {
            tables: vec![path],
            unmapped: Unmapped::Drop,
            ..Default::default()
        };
        normalize(config).process(&mut b);
        let names: Vec<&str> = b.metrics().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "gen_ai.server.requests.waiting",
                "gen_ai.server.padding.usage",
                "up"
            ]
        );
        let Some(metric::Data::Gauge(g)) = &find(&b, "gen_ai.server.padding.usage").data else {
            panic!()
        };
        assert_eq!(number_value(&g.data_points[0]), Some(25.0));
        assert_eq!(
            b.resource_metrics[0]
                .resource
                .as_ref()
                .unwrap()
                .attributes
                .get_str(PROVIDER),
            Some("reranker")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pushed_gen_ai_data_passes_and_bad_tables_are_errors() {
        let mut b = Batch::with_resource(
            vec![],
            vec![gauge(
                "gen_ai.server.requests.running",
                5.0,
                vec![kv(MODEL, "m")],
            )],
        );
        let before = b.clone();
        normalize(NormalizeConfig {
            unmapped: Unmapped::Drop,
            ..Default::default()
        })
        .process(&mut b);
        assert_eq!(b, before);
        assert!(
            parse_table("engine: x\nmetrics:\n  - { from: a, to: b, scale: 0 }\n")
                .unwrap_err()
                .contains("scale")
        );
        assert!(
            parse_table("engine: x\nmetrics:\n  - { from: a, too: b }\n")
                .unwrap_err()
                .contains("too")
        );
    }
}
