//! `filter`: keeps or drops metrics by name (globs with `*`) and points by attribute.

use std::collections::BTreeMap;

use genai_collector_core::model::{display_value, KeyValue, MetricExt};
use genai_collector_core::{
    Batch, BuildContext, ComponentConfig, ComponentError, Processor, ProcessorFactory,
    ValidationError,
};
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Match {
    /// Metric names; `*` matches any run of characters (`gen_ai.*`).
    pub names: Vec<String>,
    /// Point (or, failing that, resource) attributes that must all be equal.
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterConfig {
    /// Keep only what matches (an empty list matches everything).
    pub include: Option<Match>,
    /// Then drop what matches.
    pub exclude: Option<Match>,
}

impl ComponentConfig for FilterConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.include.is_none() && self.exclude.is_none() {
            return Err(ValidationError::new("needs `include` or `exclude`"));
        }
        Ok(())
    }
}

pub struct FilterFactory;

impl ProcessorFactory for FilterFactory {
    type Config = FilterConfig;

    fn kind(&self) -> &'static str {
        "filter"
    }

    fn description(&self) -> &'static str {
        "keeps or drops metrics by name glob and points by attribute"
    }

    fn build(
        &self,
        config: &FilterConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError> {
        Ok(Box::new(Filter(config.clone())))
    }
}

struct Filter(FilterConfig);

/// `*` matches any run of characters; everything else literally.
pub fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

fn attrs_match(want: &BTreeMap<String, String>, point: &[KeyValue], resource: &[KeyValue]) -> bool {
    want.iter().all(|(k, v)| {
        let found = point.iter().chain(resource).find(|kv| &kv.key == k);
        found
            .and_then(|kv| kv.value.as_ref())
            .map(display_value)
            .as_deref()
            == Some(v.as_str())
    })
}

impl Processor for Filter {
    fn process(&mut self, batch: &mut Batch) {
        let (inc, exc) = (&self.0.include, &self.0.exclude);
        for rm in &mut batch.resource_metrics {
            // Disjoint fields: the resource is read while its scopes are edited.
            let resource = rm.resource.as_ref().map_or(&[][..], |r| &r.attributes[..]);
            for sm in &mut rm.scope_metrics {
                sm.metrics.retain_mut(|m| {
                    if let Some(i) = inc {
                        if !i.names.is_empty() && !i.names.iter().any(|p| glob(p, &m.name)) {
                            return false;
                        }
                        if !i.attributes.is_empty() {
                            m.retain_points(|a| attrs_match(&i.attributes, a, resource));
                        }
                    }
                    if let Some(e) = exc {
                        let named = e.names.is_empty() || e.names.iter().any(|p| glob(p, &m.name));
                        if named && e.attributes.is_empty() && !e.names.is_empty() {
                            return false;
                        }
                        if named && !e.attributes.is_empty() {
                            m.retain_points(|a| !attrs_match(&e.attributes, a, resource));
                        }
                    }
                    m.point_count() > 0
                });
            }
        }
        batch.retain_metrics(|_| true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::{kv, number_point, Metric, MetricExt};

    #[test]
    fn globs() {
        assert!(glob("gen_ai.*", "gen_ai.server.kv_cache.usage"));
        assert!(glob("*usage", "gen_ai.server.kv_cache.usage"));
        assert!(glob("gen_ai.*.usage", "gen_ai.server.kv_cache.usage"));
        assert!(!glob("gen_ai.*", "vllm:x"));
        assert!(glob("up", "up") && !glob("up", "upper"));
    }

    #[test]
    fn include_names_then_exclude_points() {
        let g = |n: &str, attrs| Metric::gauge(n, "", vec![number_point(1, 1.0, attrs)]);
        let mut b = Batch::with_resource(
            vec![kv("gen_ai.pool.name", "chat")],
            vec![
                g(
                    "gen_ai.server.requests.running",
                    vec![kv("gen_ai.request.model", "a")],
                ),
                g(
                    "gen_ai.server.requests.waiting",
                    vec![kv("gen_ai.request.model", "b")],
                ),
                g("python_info", vec![]),
            ],
        );
        let config = FilterConfig {
            include: Some(Match {
                names: vec!["gen_ai.*".into()],
                attributes: [("gen_ai.pool.name".into(), "chat".into())].into(),
            }),
            exclude: Some(Match {
                names: vec![],
                attributes: [("gen_ai.request.model".into(), "b".into())].into(),
            }),
        };
        let ctx = BuildContext {
            id: genai_collector_core::ComponentId::parse("filter").unwrap(),
            pipeline: None,
            telemetry: Default::default(),
        };
        FilterFactory.build(&config, &ctx).unwrap().process(&mut b);
        let names: Vec<&str> = b.metrics().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["gen_ai.server.requests.running"]);
    }
}
