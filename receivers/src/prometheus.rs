//! `prometheus`: scrapes any Prometheus or OpenMetrics page.

use std::sync::Arc;

use crate::scrape::{Provider, ScrapeFactory};

pub const FACTORY: ScrapeFactory = ScrapeFactory {
    kind: "prometheus",
    description:
        "scrapes any Prometheus (0.0.4) or OpenMetrics page; static and file-based targets",
    engine: |_| Arc::new(Provider(None)),
};
