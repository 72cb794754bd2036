//! `tgi`: scrapes Text Generation Inference's `/metrics`. TGI's page has no model label, so
//! the model comes from config (`model`) or, when the config names none, from TGI's `/info`.

use std::sync::Arc;
use std::time::Duration;

use genai_collector_core::model::{kv, KeyValue};
use genai_collector_core::{async_trait, BuildContext, ComponentError, Receiver, ReceiverFactory};
use serde::Deserialize;
use tracing::debug;

use crate::scrape::{Engine, ScrapeConfig, ScrapeReceiver, Target};

pub struct TgiReceiverFactory;

struct Tgi {
    /// The config names the model; `/info` is then only read for the version.
    model_configured: bool,
}

#[derive(Deserialize)]
struct Info {
    model_id: Option<String>,
    version: Option<String>,
}

#[async_trait]
impl Engine for Tgi {
    fn provider(&self) -> Option<&'static str> {
        Some("tgi")
    }

    fn default_interval(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn discover(
        &self,
        client: &reqwest::Client,
        target: &Target,
        timeout: Duration,
    ) -> Option<Vec<KeyValue>> {
        let mut url = reqwest::Url::parse(&target.url).ok()?;
        url.set_path("/info");
        url.set_query(None);
        let response = match client.get(url.clone()).timeout(timeout).send().await {
            Ok(r) => r,
            Err(e) => {
                debug!(target = %url, error = %e, "TGI /info did not answer; asking again next scrape");
                return None;
            }
        };
        // A TGI without /info will not grow one: stop asking.
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Some(Vec::new());
        }
        let body = response.error_for_status().ok()?.bytes().await.ok()?;
        let info: Info = serde_json::from_slice(&body).ok()?;
        let mut attrs = Vec::new();
        if let (false, Some(model)) = (self.model_configured, info.model_id) {
            attrs.push(kv("gen_ai.request.model", model));
        }
        if let Some(v) = info.version {
            attrs.push(kv("service.version", v));
        }
        Some(attrs)
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
        Ok(Box::new(ScrapeReceiver {
            engine: Arc::new(Tgi {
                model_configured: config.model.is_some(),
            }),
            config,
        }))
    }
}
