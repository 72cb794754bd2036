//! Helpers for tests that run the collector in process against simulators.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use genai_collector_core::config::{self, Source};
use genai_collector_core::model::{
    display_value, metric, number_value, AttributesExt, Batch, KeyValue, Metric,
};
use genai_collector_core::Service;
use genai_collector_testkit::{components, Capture};

/// Runs the collector on `yaml` for `secs` seconds and returns what the capture exporter got.
pub async fn run_for(yaml: &str, secs: f64) -> Capture {
    let capture = Capture::new();
    let comps = components(&capture);
    let cfg =
        config::load(&[Source::new("test.yaml", yaml)], &comps).unwrap_or_else(|e| panic!("{e}"));
    let service = Service::build(cfg, &comps).unwrap_or_else(|e| panic!("{e}"));
    service
        .run(tokio::time::sleep(Duration::from_secs_f64(secs)))
        .await
        .unwrap();
    capture
}

pub fn resource_attrs(batch: &Batch) -> &Vec<KeyValue> {
    &batch.resource_metrics[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes
}

/// One scrape of one target: its resource attributes and metrics by name.
pub struct Scrape {
    pub attrs: BTreeMap<String, String>,
    pub metrics: BTreeMap<String, Metric>,
}

impl Scrape {
    pub fn gauge(&self, name: &str) -> Option<f64> {
        match &self.metrics.get(name)?.data {
            Some(metric::Data::Gauge(g)) => g.data_points.first().and_then(number_value),
            _ => None,
        }
    }
}

/// Every scrape captured, grouped by the target's URL, in order.
pub fn scrapes(capture: &Capture) -> BTreeMap<String, Vec<Scrape>> {
    scrapes_by_resource(capture, "url.full")
}

/// Every batch captured, grouped by the resource attribute `key`, in order.
pub fn scrapes_by_resource(capture: &Capture, key: &str) -> BTreeMap<String, Vec<Scrape>> {
    let mut out: BTreeMap<String, Vec<Scrape>> = BTreeMap::new();
    for b in capture.batches() {
        let attrs = resource_attrs(&b);
        let Some(url) = attrs.get_str(key).map(str::to_owned) else {
            continue;
        };
        let attrs = attrs
            .iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.as_ref().map(display_value).unwrap_or_default(),
                )
            })
            .collect();
        let metrics = b.metrics().map(|m| (m.name.clone(), m.clone())).collect();
        out.entry(url).or_default().push(Scrape { attrs, metrics });
    }
    out
}
