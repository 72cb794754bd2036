//! `tgi`: scrapes Text Generation Inference's `/metrics`. TGI's page has no model label, so
//! the model comes from config (`model`) or, when the config names none, from TGI's `/info`.

use genai_collector_core::{BuildContext, ComponentError, Receiver, ReceiverFactory};

use crate::scrape::{IdentifiedEngine, Identity, ScrapeConfig};

pub struct TgiReceiverFactory;

/// `/info`: `model_id`, `version`, and `max_batch_total_tokens` (the tokens the router lets
/// a batch hold, TGI's KV budget; absent from its page).
pub fn identity(info: &serde_json::Value) -> Identity {
    Identity {
        model: info["model_id"].as_str().map(str::to_owned),
        version: info["version"].as_str().map(str::to_owned),
        gauges: info["max_batch_total_tokens"]
            .as_f64()
            .map(|t| ("tgi_info_max_batch_total_tokens", "{token}", t))
            .into_iter()
            .collect(),
    }
}

impl ReceiverFactory for TgiReceiverFactory {
    type Config = ScrapeConfig;

    fn kind(&self) -> &'static str {
        "tgi"
    }

    fn description(&self) -> &'static str {
        "scrapes Text Generation Inference's /metrics; the model from config or TGI's /info"
    }

    fn build(
        &self,
        config: ScrapeConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        Ok(IdentifiedEngine::receiver("tgi", "/info", identity, config))
    }
}
