//! `llamacpp`: scrapes llama.cpp's `llama-server --metrics`. Its page has no labels at all, so
//! what identifies the server comes from its `/props`: the model (`--alias`, else the path given
//! to `-m`), the build, and the number of slots (`--parallel`), the requests it runs at once.

use genai_collector_core::{BuildContext, ComponentError, Receiver, ReceiverFactory};

use crate::scrape::{IdentifiedEngine, Identity, ScrapeConfig};

pub struct LlamaCppReceiverFactory;

/// `/props`: `model_alias`, `build_info`, `total_slots`. A router (several models, `/metrics`
/// wants `?model=`) answers a placeholder model without `?model=`: only its build counts.
pub fn identity(props: &serde_json::Value) -> Identity {
    if props["role"] == "router" {
        return Identity {
            version: props["build_info"].as_str().map(str::to_owned),
            ..Default::default()
        };
    }
    Identity {
        model: props["model_alias"].as_str().map(str::to_owned),
        version: props["build_info"].as_str().map(str::to_owned),
        gauges: props["total_slots"]
            .as_f64()
            .map(|slots| ("llamacpp:total_slots", "{request}", slots))
            .into_iter()
            .collect(),
    }
}

impl ReceiverFactory for LlamaCppReceiverFactory {
    type Config = ScrapeConfig;

    fn kind(&self) -> &'static str {
        "llamacpp"
    }

    fn description(&self) -> &'static str {
        "scrapes llama.cpp's llama-server /metrics; the model, build and slots from its /props"
    }

    fn build(
        &self,
        config: ScrapeConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        Ok(IdentifiedEngine::receiver(
            "llama.cpp",
            "/props",
            identity,
            config,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_router_without_a_model_names_none() {
        let router = serde_json::json!({"role": "router", "model_alias": "llama-server",
            "model_path": "none", "build_info": "b1-0c1e570"});
        let id = identity(&router);
        assert_eq!((id.model, id.gauges.len()), (None, 0));
        assert_eq!(id.version.as_deref(), Some("b1-0c1e570"));
        let server = serde_json::json!({"model_alias": "tiny-llama", "total_slots": 2});
        let id = identity(&server);
        assert_eq!(id.model.as_deref(), Some("tiny-llama"));
        assert_eq!(id.gauges, vec![("llamacpp:total_slots", "{request}", 2.0)]);
    }
}
