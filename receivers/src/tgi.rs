//! `tgi`: scrapes Text Generation Inference's `/metrics`. TGI's page has no model label, so
//! the model comes from config (`model`) or, when the config names none, from TGI's `/info`.

use std::sync::Arc;

use crate::scrape::{IdentifiedEngine, Identity, ScrapeFactory};

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

pub const FACTORY: ScrapeFactory = ScrapeFactory {
    kind: "tgi",
    description:
        "scrapes Text Generation Inference's /metrics; the model from config or TGI's /info",
    engine: |config| {
        Arc::new(IdentifiedEngine {
            provider: "tgi",
            path: "/info",
            model_configured: config.model.is_some(),
            read: identity,
            live: None,
        })
    },
};
