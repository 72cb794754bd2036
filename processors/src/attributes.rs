//! `attributes`: inserts, updates, deletes and renames attributes on points or resources; a
//! value may come from the environment (`NODE_NAME` from the downward API, say).

use genai_collector_core::model::{AttributesExt, KeyValue};
use genai_collector_core::{
    Batch, BuildContext, ComponentConfig, ComponentError, Processor, ProcessorFactory,
    ValidationError,
};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Add where absent.
    Insert,
    /// Change where present.
    Update,
    /// Add or change.
    Upsert,
    Delete,
    /// Move `key` to `to`.
    Rename,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    #[default]
    Point,
    Resource,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub key: String,
    pub action: ActionKind,
    pub value: Option<String>,
    /// Take the value from this environment variable.
    pub from_env: Option<String>,
    /// The new key, for `rename`.
    pub to: Option<String>,
    /// Points or the resource. Not called `on`: YAML 1.1 readers (Helm's values) turn that
    /// key into `true`.
    #[serde(default)]
    pub context: Target,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttributesConfig {
    pub actions: Vec<Action>,
}

impl ComponentConfig for AttributesConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        for a in &self.actions {
            let needs_value = matches!(
                a.action,
                ActionKind::Insert | ActionKind::Update | ActionKind::Upsert
            );
            if needs_value && a.value.is_none() == a.from_env.is_none() {
                return Err(ValidationError::field(
                    "actions",
                    format!("`{}`: give one of `value` and `from_env`", a.key),
                ));
            }
            if a.action == ActionKind::Rename && a.to.is_none() {
                return Err(ValidationError::field(
                    "actions",
                    format!("`{}`: rename needs `to`", a.key),
                ));
            }
        }
        Ok(())
    }
}

pub struct AttributesFactory;

impl ProcessorFactory for AttributesFactory {
    type Config = AttributesConfig;

    fn kind(&self) -> &'static str {
        "attributes"
    }

    fn description(&self) -> &'static str {
        "inserts, updates, deletes or renames point or resource attributes (values from env too)"
    }

    fn build(
        &self,
        config: &AttributesConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError> {
        // Environment values are read once, at start.
        let mut actions = Vec::new();
        for a in &config.actions {
            let value = match (&a.value, &a.from_env) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
                    ComponentError::Config(format!(
                        "`{}`: environment variable `{var}` is not set",
                        a.key
                    ))
                })?),
                _ => None,
            };
            actions.push((a.clone(), value));
        }
        Ok(Box::new(Attributes(actions)))
    }
}

struct Attributes(Vec<(Action, Option<String>)>);

fn apply(attrs: &mut Vec<KeyValue>, a: &Action, value: Option<&str>) {
    let present = attrs.get_attr(&a.key).is_some();
    match (a.action, value) {
        (ActionKind::Insert, Some(v)) if !present => attrs.set_attr(&a.key, v),
        (ActionKind::Update, Some(v)) if present => attrs.set_attr(&a.key, v),
        (ActionKind::Upsert, Some(v)) => attrs.set_attr(&a.key, v),
        (ActionKind::Delete, _) => {
            attrs.remove_attr(&a.key);
        }
        (ActionKind::Rename, _) => {
            if let Some(to) = &a.to {
                attrs.rename_attr(&a.key, to);
            }
        }
        _ => {}
    }
}

impl Processor for Attributes {
    fn process(&mut self, batch: &mut Batch) {
        for rm in &mut batch.resource_metrics {
            for (a, value) in &self.0 {
                match a.context {
                    Target::Resource => {
                        if let Some(r) = rm.resource.as_mut() {
                            apply(&mut r.attributes, a, value.as_deref());
                        }
                    }
                    Target::Point => {
                        for m in rm.scope_metrics.iter_mut().flat_map(|s| &mut s.metrics) {
                            genai_collector_core::model::MetricExt::for_each_point_attrs(
                                m,
                                |attrs| apply(attrs, a, value.as_deref()),
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::{kv, number_point, Metric, MetricExt};

    #[test]
    fn actions_on_points_and_resources() {
        std::env::set_var("GENAI_TEST_NODE", "gpu-node-7");
        let yaml = "actions:\n  - { key: k8s.node.name, action: insert, from_env: GENAI_TEST_NODE, context: resource }\n  - { key: team, action: upsert, value: ml }\n  - { key: engine, action: delete }\n  - { key: model_name, action: rename, to: gen_ai.request.model }\n  - { key: absent, action: update, value: x }\n";
        let config: AttributesConfig = serde_saphyr::from_str(yaml).unwrap();
        config.validate().unwrap();
        let ctx = BuildContext {
            id: genai_collector_core::ComponentId::parse("attributes").unwrap(),
            pipeline: None,
            telemetry: Default::default(),
        };
        let mut b = Batch::with_resource(
            vec![],
            vec![Metric::gauge(
                "g",
                "",
                vec![number_point(
                    1,
                    1.0,
                    vec![kv("engine", "0"), kv("model_name", "m")],
                )],
            )],
        );
        AttributesFactory
            .build(&config, &ctx)
            .unwrap()
            .process(&mut b);
        assert_eq!(
            b.resource_metrics[0]
                .resource
                .as_ref()
                .unwrap()
                .attributes
                .get_str("k8s.node.name"),
            Some("gpu-node-7")
        );
        let mut m = b.metrics().next().unwrap().clone();
        let mut seen = Vec::new();
        m.for_each_point_attrs(|a| seen = a.iter().map(|kv| kv.key.clone()).collect());
        assert_eq!(seen, ["gen_ai.request.model", "team"]);
        let bad = AttributesConfig {
            actions: vec![Action {
                key: "x".into(),
                action: ActionKind::Insert,
                value: None,
                from_env: None,
                to: None,
                context: Target::Point,
            }],
        };
        assert!(bad.validate().is_err());
    }
}
