//! `llamacpp`: scrapes llama.cpp's `llama-server --metrics`. Its page has no labels at all, so
//! what identifies the server comes from its `/props`: the model (`--alias`, else the path given
//! to `-m`), the build, and the number of slots (`--parallel`), the requests it runs at once;
//! `/slots`, asked on every scrape, the tokens the slots hold in the KV cache.

use std::sync::Arc;

use crate::scrape::{IdentifiedEngine, Identity, ScrapeFactory};

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

/// `/slots`, on every scrape: the tokens each slot holds in the KV cache (`n_prompt_tokens`: its
/// prompt and what it generated, kept after the request for reuse), summed. Servers that no
/// longer publish `llamacpp:kv_cache_usage_ratio` still answer it (unless `--no-slots`). The
/// cache's size is not to be had from the API: with `--kv-unified` (the default without
/// `--parallel`) every slot reports the whole context as its `n_ctx`.
pub fn slots(answer: &serde_json::Value) -> Vec<(&'static str, &'static str, f64)> {
    let Some(slots) = answer.as_array() else {
        return Vec::new();
    };
    let tokens: f64 = slots
        .iter()
        .filter_map(|s| s["n_prompt_tokens"].as_f64())
        .sum();
    vec![("llamacpp:slots_kv_tokens", "{token}", tokens)]
}

pub const FACTORY: ScrapeFactory = ScrapeFactory {
    kind: "llamacpp",
    description: "scrapes llama.cpp's llama-server /metrics; the model, build and slots from its /props, KV tokens from /slots",
    engine: |config| {
        Arc::new(IdentifiedEngine {
            provider: "llama.cpp",
            path: "/props",
            model_configured: config.model.is_some(),
            read: identity,
            live: Some(("/slots", slots)),
        })
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_tokens_from_a_real_slots_answer() {
        let answer: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/llamacpp/slots-0c1e570-tiny-random.json"
            ))
            .unwrap(),
        )
        .unwrap();
        // Two slots served a request each (61 and 49 tokens cached), two never did.
        assert_eq!(
            slots(&answer),
            vec![("llamacpp:slots_kv_tokens", "{token}", 110.0)]
        );
        assert!(slots(&serde_json::json!({"error": "slots disabled"})).is_empty());
    }

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
