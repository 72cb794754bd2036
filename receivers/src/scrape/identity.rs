//! Engines whose page does not say which server it is (TGI, llama.cpp): a JSON endpoint beside
//! `/metrics` gives the model, the version and fixed settings.

use std::time::Duration;

use genai_collector_core::model::kv;

use super::fetch::{side_json, SideAnswer};
use super::{Discovered, Engine, Target};

/// What an engine's side endpoint says about the server.
#[derive(Debug, Default, PartialEq)]
pub struct Identity {
    pub model: Option<String>,
    pub version: Option<String>,
    /// Gauges of fixed settings: (name, unit, value).
    pub gauges: Vec<(&'static str, &'static str, f64)>,
}

pub struct IdentifiedEngine {
    pub provider: &'static str,
    /// The side endpoint's path (`/info`).
    pub path: &'static str,
    /// The config names the model; the endpoint's is then ignored.
    pub model_configured: bool,
    pub read: fn(&serde_json::Value) -> Identity,
    /// A second endpoint asked on every scrape, and the gauges read from its answer.
    pub live: Option<(&'static str, Live)>,
}

/// Gauges read from a JSON answer: (name, unit, value).
pub type Live = fn(&serde_json::Value) -> Vec<(&'static str, &'static str, f64)>;

#[genai_collector_core::async_trait]
impl Engine for IdentifiedEngine {
    fn provider(&self) -> Option<&'static str> {
        Some(self.provider)
    }

    fn default_interval(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn discover(
        &self,
        client: &reqwest::Client,
        target: &Target,
        timeout: Duration,
    ) -> Option<Discovered> {
        let answer = match side_json(client, &target.url, self.path, timeout).await {
            SideAnswer::Json(v) => v,
            SideAnswer::NotFound => return Some(Discovered::default()),
            SideAnswer::Failed => return None,
        };
        let identity = (self.read)(&answer);
        let mut found = Discovered {
            gauges: identity.gauges,
            ..Default::default()
        };
        if let (false, Some(model)) = (self.model_configured, identity.model) {
            found.resource.push(kv("gen_ai.request.model", model));
        }
        if let Some(v) = identity.version {
            found.resource.push(kv("service.version", v));
        }
        Some(found)
    }

    async fn every_scrape(
        &self,
        client: &reqwest::Client,
        target: &Target,
        timeout: Duration,
    ) -> Vec<(&'static str, &'static str, f64)> {
        let Some((path, read)) = self.live else {
            return Vec::new();
        };
        match side_json(client, &target.url, path, timeout).await {
            SideAnswer::Json(v) => read(&v),
            SideAnswer::NotFound | SideAnswer::Failed => Vec::new(),
        }
    }
}
