//! `myserve`: a scraper for a team's own Python serving stack, whose `/metrics` page has names
//! of its own (queue sizes, KV blocks, GPU memory in MB, utilisation in %). The receiver is a
//! `ScrapeFactory` of the collector's scrape receivers (targets, discovery, auth, TLS, limits,
//! `up` all come with it); what makes the page speak `gen_ai` is the mapping table
//! `myserve.yaml`, data and no Rust, compiled into the binary with `TABLES`.

use std::sync::Arc;

use genai_collector_receivers::scrape::{Provider, ScrapeFactory};

/// The `myserve` receiver: plain scraping, every resource marked `gen_ai.provider.name=myserve`,
/// the name the table's `engine` matches.
pub const FACTORY: ScrapeFactory = ScrapeFactory {
    kind: "myserve",
    description: "example: scrapes a team's own serving stack; myserve.yaml maps its names",
    engine: |_| Arc::new(Provider(Some("myserve"))),
};

/// The mapping table, for `GenaiNormalizeFactory::with_tables`.
pub const TABLES: &[(&str, &str)] = &[("myserve.yaml", include_str!("../myserve.yaml"))];
