//! The built-in mapping tables against the engine pages in tests/fixtures, taken the way the
//! receivers take them (parsed, converted, the vLLM receiver's extra gauges, the values TGI's
//! `/info` and llama.cpp's `/props` and `/slots` add): every table row maps something on some page of its
//! engine, and what it maps comes out under the row's name, with no series twice. A row no page
//! exercises fails the test unless it is in `UNEXERCISED`, with the reason.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{assert_each_series_once, normalize, point_attributes};
use genai_collector_core::model::{
    kv, metric, number_point, AttributesExt, Batch, Metric, MetricExt,
};
use genai_collector_processors::genai_normalize::{parse_table, Table, BUILTIN_TABLES};
use genai_collector_receivers::scrape::convert::Converter;
use genai_collector_receivers::scrape::text::{parse, Format};
use genai_collector_receivers::scrape::Engine;
use genai_collector_receivers::{llamacpp, tgi, vllm};
use genai_collector_testkit::sim;

/// Rows no page here has, and why (none now; keep the check for the rows to come).
const UNEXERCISED: &[(&str, &str)] = &[];

/// (engine, page, side endpoint answer) for every engine page in tests/fixtures.
const PAGES: &[(&str, &str, Option<&str>)] = &[
    ("vllm", "vllm/v0.33.0-loggers.prom", None),
    ("vllm", "vllm/v1-composed.prom", None),
    ("vllm", "vllm/v0-composed.prom", None),
    (
        "vllm",
        "vllm/datadog-integrations-core-vllm_metrics.txt",
        None,
    ),
    ("sglang", "sglang/v0.5.23-collector.prom", None),
    ("sglang", "sglang/v0.4.3-collector.prom", None),
    ("tgi", "tgi/composed.prom", Some("tgi/info-composed.json")),
    (
        "tgi",
        "tgi/datadog-payload-head-partial.prom",
        Some("tgi/info-composed.json"),
    ),
    (
        "llama.cpp",
        "llamacpp/real-server-0c1e570-tiny-random.prom",
        Some("llamacpp/props-0c1e570-tiny-random.json"),
    ),
    (
        "llama.cpp",
        "llamacpp/real-server-8733e0c-tiny-random.prom",
        Some("llamacpp/props-8733e0c-tiny-random.json"),
    ),
];

/// A page as its engine's receiver turns it into a batch, before the processors.
fn scraped(engine: &str, page: &str, side: Option<&str>) -> Batch {
    let dir = sim::fixtures_dir();
    let text = std::fs::read_to_string(dir.join(page)).unwrap();
    let parsed = parse(&text, Format::Prometheus).unwrap_or_else(|e| panic!("{page}: {e}"));
    let mut resource = vec![kv("gen_ai.provider.name", engine)];
    let (mut batch, _) = Converter::new().convert(&parsed, 1, resource.clone());
    let mut extra: Vec<Metric> = Vec::new();
    if engine == "vllm" {
        vllm::Vllm.enrich(&parsed, &mut extra, 1);
    }
    if let Some(side) = side {
        let answer: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(side)).unwrap()).unwrap();
        let identity = match engine {
            "tgi" => tgi::identity(&answer),
            _ => llamacpp::identity(&answer),
        };
        for (name, unit, value) in identity.gauges {
            extra.push(Metric::gauge(
                name,
                unit,
                vec![number_point(1, value, vec![])],
            ));
        }
        if let Some(model) = identity.model {
            resource.push(kv("gen_ai.request.model", model));
        }
    }
    // /slots as the current server answered it; the older one's page has its KV figures.
    if page.contains("0c1e570") {
        let slots: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("llamacpp/slots-0c1e570-tiny-random.json")).unwrap(),
        )
        .unwrap();
        for (name, unit, value) in llamacpp::slots(&slots) {
            extra.push(Metric::gauge(
                name,
                unit,
                vec![number_point(1, value, vec![])],
            ));
        }
    }
    let rm = &mut batch.resource_metrics[0];
    rm.resource.as_mut().unwrap().attributes = resource;
    rm.scope_metrics[0].metrics.extend(extra);
    batch
}

/// Whether `m` has what `row` takes: a point its `where` selects, of a kind `take` reads.
fn row_takes(row: &genai_collector_processors::genai_normalize::Rule, m: &Metric) -> bool {
    let kind_fits = row.take.is_none()
        || matches!(
            m.data,
            Some(metric::Data::Histogram(_)) | Some(metric::Data::Summary(_))
        );
    kind_fits
        && point_attributes(m).iter().any(|attrs| {
            row.where_attrs
                .iter()
                .all(|(k, v)| attrs.get_str(k) == Some(v.as_str()))
        })
}

#[test]
fn every_table_row_maps_a_line_of_a_real_or_documented_page() {
    let tables: Vec<Table> = BUILTIN_TABLES
        .iter()
        .map(|(name, text)| parse_table(text).unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect();
    // Row source → the pages it matched.
    let mut exercised: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for &(engine, page, side) in PAGES {
        let table = tables.iter().find(|t| t.engine == engine).unwrap();
        let mut batch = scraped(engine, page, side);
        let sources: Vec<Metric> = batch.metrics().cloned().collect();
        let mut expected: BTreeSet<&str> = BTreeSet::new();
        for row in &table.metrics {
            if sources
                .iter()
                .any(|m| m.name == row.from && row_takes(row, m))
            {
                exercised.entry(row.from.as_str()).or_default().insert(page);
                expected.insert(row.to.as_str());
            }
        }
        normalize(&mut batch);
        let names: BTreeSet<&str> = batch.metrics().map(|m| m.name.as_str()).collect();
        let missing: Vec<&&str> = expected.iter().filter(|n| !names.contains(**n)).collect();
        assert!(
            missing.is_empty(),
            "{page}: rows matched but {missing:?} did not come out"
        );
        assert_each_series_once(&batch, page);
        for m in batch.metrics() {
            if m.name.starts_with("gen_ai.server.") {
                for attrs in point_attributes(m) {
                    assert_eq!(
                        attrs.get_str("gen_ai.provider.name"),
                        Some(engine),
                        "{}",
                        m.name
                    );
                }
            }
        }
    }
    let unexercised: Vec<&str> = tables
        .iter()
        .flat_map(|t| &t.metrics)
        .map(|r| r.from.as_str())
        .filter(|from| !exercised.contains_key(from))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let allowed: Vec<&str> = UNEXERCISED.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        unexercised, allowed,
        "table rows no fixture page exercises (add a page, or the row and its reason to UNEXERCISED)"
    );
}

/// The signals of the real vLLM 0.33 page, through the whole mapping: values as vLLM's own
/// metrics code recorded them.
#[test]
fn operator_signals_from_the_vllm_page() {
    let mut batch = scraped("vllm", "vllm/v0.33.0-loggers.prom", None);
    normalize(&mut batch);
    let value = |name: &str, key: Option<(&str, &str)>| -> f64 {
        let m = batch
            .metrics()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name}"));
        let points: Vec<f64> = match &m.data {
            Some(metric::Data::Gauge(g)) => g
                .data_points
                .iter()
                .filter(|p| key.is_none_or(|(k, v)| p.attributes.get_str(k) == Some(v)))
                .filter_map(genai_collector_core::model::number_value)
                .collect(),
            Some(metric::Data::Sum(s)) => s
                .data_points
                .iter()
                .filter(|p| key.is_none_or(|(k, v)| p.attributes.get_str(k) == Some(v)))
                .filter_map(genai_collector_core::model::number_value)
                .collect(),
            _ => panic!("{name} is not a number"),
        };
        assert_eq!(points.len(), 1, "{name} {key:?}");
        points[0]
    };
    // Three steps of 4,096 prompt tokens, 1,536 of them prefix-cache hits.
    assert_eq!(value("gen_ai.server.prefix_cache.queries", None), 12288.0);
    assert_eq!(value("gen_ai.server.prefix_cache.hits", None), 4608.0);
    assert_eq!(value("gen_ai.server.token.cached", None), 4608.0);
    assert_eq!(value("gen_ai.server.preemptions", None), 1.0);
    let reason = "gen_ai.response.finish_reason";
    assert_eq!(
        value("gen_ai.server.requests.finished", Some((reason, "stop"))),
        6.0
    );
    assert_eq!(
        value("gen_ai.server.requests.finished", Some((reason, "abort"))),
        3.0
    );
    assert_eq!(value("gen_ai.server.requests.failed", None), 0.0);
    let waiting = "gen_ai.server.waiting.reason";
    assert_eq!(
        value(
            "gen_ai.server.requests.waiting_by_reason",
            Some((waiting, "capacity"))
        ),
        3.0
    );
    assert_eq!(
        value(
            "gen_ai.server.requests.waiting_by_reason",
            Some((waiting, "deferred"))
        ),
        1.0
    );
    assert_eq!(value("gen_ai.server.speculative.draft_tokens", None), 27.0);
    assert_eq!(
        value("gen_ai.server.speculative.accepted_tokens", None),
        15.0
    );
    assert_eq!(value("gen_ai.server.lora.adapters.running", None), 1.0);
    assert_eq!(value("gen_ai.server.lora.adapters.max", None), 4.0);
    // 27,000 blocks of 16 tokens.
    assert_eq!(value("gen_ai.server.kv_cache.tokens.limit", None), 432000.0);
    let state = "gen_ai.server.state";
    assert_eq!(value("gen_ai.server.status", Some((state, "awake"))), 1.0);
    assert_eq!(
        value("gen_ai.server.status", Some((state, "discard_all"))),
        0.0
    );
}

/// TGI counts tokens only in its length histograms: their sums become the token counters, and
/// its failures the failed requests, by error. (Datadog's payload has the input lengths, the
/// composed page the generated tokens.)
#[test]
fn tgi_tokens_from_its_histograms_and_failures_by_error() {
    let mut checked = 0;
    for page in ["tgi/datadog-payload-head-partial.prom", "tgi/composed.prom"] {
        let mut batch = scraped("tgi", page, Some("tgi/info-composed.json"));
        let sums: BTreeMap<String, f64> = batch
            .metrics()
            .filter_map(|m| match &m.data {
                Some(metric::Data::Histogram(h)) => Some((m.name.clone(), h.data_points[0].sum?)),
                _ => None,
            })
            .collect();
        normalize(&mut batch);
        let tokens = batch
            .metrics()
            .find(|m| m.name == "gen_ai.server.token.usage")
            .unwrap();
        let Some(metric::Data::Sum(s)) = &tokens.data else {
            panic!("a counter")
        };
        assert!(s.is_monotonic);
        for p in &s.data_points {
            let source = match p.attributes.get_str("gen_ai.token.type") {
                Some("input") => "tgi_request_input_length",
                Some("output") => "tgi_request_generated_tokens",
                other => panic!("{other:?}"),
            };
            assert_eq!(
                genai_collector_core::model::number_value(p),
                Some(sums[source]),
                "{page}"
            );
            checked += 1;
        }
        let failed = batch
            .metrics()
            .find(|m| m.name == "gen_ai.server.requests.failed")
            .unwrap();
        let errors: BTreeSet<&str> = point_attributes(failed)
            .iter()
            .filter_map(|a| a.get_str("error.type"))
            .collect();
        assert!(errors.contains("validation"), "{page}: {errors:?}");
    }
    assert_eq!(
        checked, 2,
        "input tokens from one page, output tokens from the other"
    );
}
