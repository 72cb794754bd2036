//! The scrape scheduler every pull receiver runs: one task per target, started at an offset
//! within the interval (hash of its URL, so many targets spread out and restarts keep their
//! phase), a timeout shorter than the interval, a bound on scrapes in flight, and health series
//! per target. A target that fails or hangs never delays the others.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use genai_collector_core::config::{self, duration};
use genai_collector_core::model::{
    kv, now_unix_nanos, number_point, Batch, KeyValue, Metric, MetricExt,
};
use genai_collector_core::{
    async_trait, CancellationToken, ComponentConfig, ComponentError, Output, ReceiverContext,
    ValidationError,
};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::convert::Converter;
use super::fetch::{build_client, fetch, ScrapeError, TlsConfig};
use super::kubernetes::KubernetesConfig;
use super::text::{self, Format, Page};

/// Which text format to ask targets for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextFormat {
    /// Ask for OpenMetrics, accept 0.0.4; parse by the answer's `Content-Type`.
    #[default]
    Auto,
    /// Ask for the 0.0.4 text format only.
    Prometheus,
    /// Ask for OpenMetrics only.
    Openmetrics,
}

impl TextFormat {
    fn accept(self) -> &'static str {
        match self {
            Self::Auto => "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            Self::Prometheus => "text/plain;version=0.0.4",
            Self::Openmetrics => "application/openmetrics-text;version=1.0.0",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// The settings every scraping receiver (`prometheus`, `vllm`, `tgi`) takes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScrapeConfig {
    /// URLs (`http://10.0.0.5:8000/metrics`), or `host:port` for the engine's default path.
    pub targets: Vec<String>,
    /// Files listing more targets (YAML or JSON: a list of URLs, or Prometheus file_sd groups
    /// `[{targets: [...], labels: {...}}]`), re-read when they change.
    pub file_targets: Vec<PathBuf>,
    /// Between scrapes of one target; the receiver kind sets the default.
    #[serde(with = "duration::option")]
    pub interval: Option<Duration>,
    /// Limit on one scrape; default 80 % of the interval, at most 10 s.
    #[serde(with = "duration::option")]
    pub timeout: Option<Duration>,
    /// Scrapes in flight at once, across this receiver's targets.
    pub max_concurrent_scrapes: usize,
    /// Largest page read, after decompression.
    pub max_response_bytes: u64,
    /// A page with more samples fails its scrape (`up` 0), as Prometheus's `sample_limit`;
    /// 0: no limit.
    pub sample_limit: usize,
    /// A sample with more labels fails the scrape (Prometheus's `label_limit`); 0: no limit
    /// beyond the parser's 128.
    pub label_limit: usize,
    /// A label name longer than this many bytes fails the scrape; 0: no limit.
    pub label_name_length_limit: usize,
    /// A label value longer than this many bytes fails the scrape; 0: no limit.
    pub label_value_length_limit: usize,
    /// Targets scraped at once by this receiver; discovered targets past it are ignored
    /// (logged and reported on `/healthz`) until others go away.
    pub max_targets: usize,
    pub format: TextFormat,
    /// Extra request headers.
    pub headers: BTreeMap<String, String>,
    pub bearer_token: Option<String>,
    pub bearer_token_file: Option<PathBuf>,
    pub basic_auth: Option<BasicAuth>,
    pub tls: TlsConfig,
    /// The inference pool these targets serve (`gen_ai.pool.name`).
    pub pool: Option<String>,
    /// The model, where the engine's page does not say (`gen_ai.request.model`).
    pub model: Option<String>,
    /// `service.name` of the targets; default: the receiver's id.
    pub job: Option<String>,
    /// Targets found by watching pods through the Kubernetes API.
    pub kubernetes: Option<KubernetesConfig>,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            file_targets: Vec::new(),
            interval: None,
            timeout: None,
            max_concurrent_scrapes: 32,
            max_response_bytes: 16 * 1024 * 1024,
            sample_limit: 0,
            label_limit: 0,
            label_name_length_limit: 0,
            label_value_length_limit: 0,
            max_targets: 10_000,
            format: TextFormat::Auto,
            headers: BTreeMap::new(),
            bearer_token: None,
            bearer_token_file: None,
            basic_auth: None,
            tls: TlsConfig::default(),
            pool: None,
            model: None,
            job: None,
            kubernetes: None,
        }
    }
}

impl ComponentConfig for ScrapeConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.targets.is_empty() && self.file_targets.is_empty() && self.kubernetes.is_none() {
            return Err(ValidationError::new(
                "needs `targets`, `file_targets` or `kubernetes`",
            ));
        }
        if let Some(k) = &self.kubernetes {
            k.validate()?;
        }
        for t in &self.targets {
            Target::parse(t, "/metrics", &[]).map_err(|e| ValidationError::field("targets", e))?;
        }
        if let (Some(i), Some(t)) = (self.interval, self.timeout) {
            if t >= i {
                return Err(ValidationError::field(
                    "timeout",
                    format!("must be shorter than the interval ({i:?})"),
                ));
            }
        }
        if self
            .interval
            .is_some_and(|i| i < Duration::from_millis(100))
        {
            return Err(ValidationError::field("interval", "must be at least 100ms"));
        }
        if self.max_targets == 0 {
            return Err(ValidationError::field("max_targets", "must be at least 1"));
        }
        if self.targets.len() > self.max_targets {
            return Err(ValidationError::field(
                "targets",
                format!(
                    "{} targets, more than max_targets ({})",
                    self.targets.len(),
                    self.max_targets
                ),
            ));
        }
        if self.max_concurrent_scrapes == 0 {
            return Err(ValidationError::field(
                "max_concurrent_scrapes",
                "must be at least 1",
            ));
        }
        let auths = [
            self.bearer_token.is_some(),
            self.bearer_token_file.is_some(),
            self.basic_auth.is_some(),
        ];
        if auths.iter().filter(|a| **a).count() > 1 {
            return Err(ValidationError::new(
                "choose one of `bearer_token`, `bearer_token_file` and `basic_auth`",
            ));
        }
        config::header_map(&self.headers).map_err(|e| ValidationError::field("headers", e))?;
        Ok(())
    }
}

/// One scrape target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// What is fetched, credentials (`user:password@`) included.
    pub url: String,
    /// The URL without credentials: what `url.full`, logs and `/healthz` show.
    pub shown: String,
    /// `service.instance.id`: `host:port`, and the path too when it is not the receiver's
    /// default, so that two pages of one server stay two series.
    pub instance: String,
    pub host: String,
    pub port: u16,
    /// Labels from a file_sd group, added as resource attributes.
    pub labels: Vec<(String, String)>,
}

impl Target {
    /// A URL, or `host:port` completed with `default_path`.
    pub fn parse(
        raw: &str,
        default_path: &str,
        labels: &[(String, String)],
    ) -> Result<Self, String> {
        let full = if raw.contains("://") {
            raw.to_owned()
        } else {
            format!("http://{raw}{default_path}")
        };
        let url = reqwest::Url::parse(&full)
            .map_err(|e| format!("`{raw}` is not a valid target URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "`{raw}`: only http and https targets can be scraped"
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("`{raw}` has no host"))?
            .to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let mut shown = url.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        let mut instance = format!("{}:{port}", url.host_str().unwrap_or_default());
        if url.path() != default_path || url.query().is_some() {
            instance.push_str(url.path());
            if let Some(q) = url.query() {
                instance.push('?');
                instance.push_str(q);
            }
        }
        Ok(Self {
            url: url.to_string(),
            shown: shown.to_string(),
            instance,
            host,
            port,
            labels: labels.to_vec(),
        })
    }
}

/// What an engine adds to plain scraping.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// `gen_ai.provider.name`, for engine receivers.
    fn provider(&self) -> Option<&'static str>;
    fn default_interval(&self) -> Duration;
    /// What the target says about itself (TGI's `/info`, llama.cpp's `/props`); `None` until
    /// it answers, and then asked again on the next scrape. Asked again after a failed scrape
    /// too: a server that went away may come back with another model.
    async fn discover(
        &self,
        _client: &reqwest::Client,
        _target: &Target,
        _timeout: Duration,
    ) -> Option<Discovered> {
        Some(Discovered::default())
    }
    /// Readings a side endpoint gives on every scrape (llama.cpp's `/slots`), as gauges sent
    /// with the page; none when it does not answer in time, which fails nothing.
    async fn every_scrape(
        &self,
        _client: &reqwest::Client,
        _target: &Target,
        _timeout: Duration,
    ) -> Vec<(&'static str, &'static str, f64)> {
        Vec::new()
    }
    /// Engine facts derived from the page (vLLM's cache config, LoRA adapters).
    fn enrich(&self, _page: &Page<'_>, _metrics: &mut Vec<Metric>, _now: u64) {}
}

/// What an engine learnt from a target besides its page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Discovered {
    /// Resource attributes: the model, the server's version.
    pub resource: Vec<KeyValue>,
    /// Gauges of the server's fixed settings (name, unit, value), sent with every page.
    pub gauges: Vec<(&'static str, &'static str, f64)>,
}

/// Prometheus's per-scrape limits; 0 turns one off. A page past any of them fails its scrape
/// whole, as in Prometheus: a partial page would make sums and ratios lie.
#[derive(Clone, Copy, Debug, Default)]
pub struct PageLimits {
    pub samples: usize,
    pub labels: usize,
    pub name_length: usize,
    pub value_length: usize,
}

impl PageLimits {
    pub fn check(&self, page: &text::Page<'_>) -> Result<(), String> {
        let over = |limit: usize, n: usize| limit > 0 && n > limit;
        let samples = page.sample_count();
        if over(self.samples, samples) {
            return Err(format!(
                "{samples} samples, over sample_limit {}",
                self.samples
            ));
        }
        if self.labels == 0 && self.name_length == 0 && self.value_length == 0 {
            return Ok(());
        }
        for sample in page.families.iter().flat_map(|f| &f.samples) {
            // As in Prometheus, the name counts as the value of `__name__`.
            if over(self.value_length, sample.name.len()) {
                return Err(format!(
                    "line {}: a metric name of {} bytes, over label_value_length_limit {}",
                    sample.line,
                    sample.name.len(),
                    self.value_length
                ));
            }
            let labels = page.labels_of(sample);
            if over(self.labels, labels.len()) {
                return Err(format!(
                    "line {}: {} labels, over label_limit {}",
                    sample.line,
                    labels.len(),
                    self.labels
                ));
            }
            for l in labels {
                if over(self.name_length, l.name.len()) {
                    return Err(format!(
                        "line {}: a label name of {} bytes, over label_name_length_limit {}",
                        sample.line,
                        l.name.len(),
                        self.name_length
                    ));
                }
                if over(self.value_length, l.value.len()) {
                    return Err(format!(
                        "line {}: label `{}` has a value of {} bytes, over label_value_length_limit {}",
                        sample.line,
                        l.name,
                        l.value.len(),
                        self.value_length
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Pages above this size are parsed on a blocking thread.
const BIG_PAGE: usize = 1 << 20;

struct Settings {
    id: String,
    interval: Duration,
    timeout: Duration,
    limit: u64,
    page_limits: PageLimits,
    accept: &'static str,
    headers: reqwest::header::HeaderMap,
    resource: Vec<KeyValue>,
}

/// One GET of `url` within the timeout and size limit.
async fn get(
    client: &reqwest::Client,
    url: &str,
    s: &Settings,
    timeout: Duration,
) -> Result<super::fetch::Fetched, ScrapeError> {
    if timeout.is_zero() {
        return Err(ScrapeError::Timeout(s.timeout));
    }
    let request = client
        .get(url)
        .headers(s.headers.clone())
        .header(reqwest::header::ACCEPT, s.accept)
        .timeout(timeout);
    match tokio::time::timeout(timeout, fetch(request, s.limit)).await {
        Ok(Ok(f)) => Ok(f),
        Ok(Err(ScrapeError::Timeout(_))) | Err(_) => Err(ScrapeError::Timeout(s.timeout)),
        Ok(Err(e)) => Err(e),
    }
}

/// Ticks a target skips after `timeouts` scrapes in a row timed out: none after the first,
/// then 1, 2, 4, up to 8, so that hung targets stop filling the receiver's scrape slots while
/// one that recovers is seen again within nine intervals.
fn backoff_ticks(timeouts: u32) -> u32 {
    match timeouts {
        0 | 1 => 0,
        n => 1 << (n - 2).min(3),
    }
}

/// Scrapes `target` once with `config`'s settings and returns how many samples the page
/// held: for troubleshooting a target, and for tests.
pub async fn scrape_once(target: &str, config: &ScrapeConfig) -> Result<usize, ScrapeError> {
    let (client, settings) = prepare(config, &super::Provider(None), "scrape_once")
        .map_err(|e| ScrapeError::Connect(e.to_string()))?;
    let t = Target::parse(target, "/metrics", &[]).map_err(ScrapeError::Connect)?;
    let fetched = get(&client, &t.url, &settings, settings.timeout).await?;
    let page = text::parse(
        &fetched.body,
        Format::from_content_type(&fetched.content_type),
    )
    .map_err(|e| ScrapeError::Parse(e.to_string()))?;
    settings
        .page_limits
        .check(&page)
        .map_err(ScrapeError::Limit)?;
    Ok(page.sample_count())
}

/// The HTTP client and resolved settings of a receiver.
fn prepare(
    config: &ScrapeConfig,
    engine: &dyn Engine,
    id: &str,
) -> Result<(reqwest::Client, Settings), ComponentError> {
    let client = build_client(&config.tls).map_err(ComponentError::Config)?;
    let interval = config.interval.unwrap_or_else(|| engine.default_interval());
    let timeout = config
        .timeout
        .unwrap_or_else(|| interval.mul_f64(0.8).min(Duration::from_secs(10)));
    let mut headers = config::header_map(&config.headers).map_err(ComponentError::Config)?;
    let token = match (&config.bearer_token, &config.bearer_token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(read_secret(f)?),
        _ => None,
    };
    if let Some(t) = token {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|e| ComponentError::Config(format!("bearer token: {e}")))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    if let Some(b) = &config.basic_auth {
        let password = match (&b.password, &b.password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(f)) => read_secret(f)?,
            _ => String::new(),
        };
        let value = reqwest::header::HeaderValue::from_str(&format!(
            "Basic {}",
            base64(&format!("{}:{password}", b.username))
        ))
        .map_err(|e| ComponentError::Config(format!("basic auth: {e}")))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut resource = vec![kv(
        "service.name",
        config.job.clone().unwrap_or_else(|| id.to_owned()),
    )];
    if let Some(p) = engine.provider() {
        resource.push(kv("gen_ai.provider.name", p));
    }
    if let Some(pool) = &config.pool {
        resource.push(kv("gen_ai.pool.name", pool.as_str()));
    }
    if let Some(model) = &config.model {
        resource.push(kv("gen_ai.request.model", model.as_str()));
    }
    let settings = Settings {
        id: id.to_owned(),
        interval,
        timeout,
        limit: config.max_response_bytes,
        page_limits: PageLimits {
            samples: config.sample_limit,
            labels: config.label_limit,
            name_length: config.label_name_length_limit,
            value_length: config.label_value_length_limit,
        },
        accept: config.format.accept(),
        headers,
        resource,
    };
    Ok((client, settings))
}

/// Runs the scrape loops of `config`'s targets until shutdown.
pub async fn run(
    engine: Arc<dyn Engine>,
    config: ScrapeConfig,
    ctx: ReceiverContext,
) -> Result<(), ComponentError> {
    let (client, settings) = prepare(&config, engine.as_ref(), &ctx.id.to_string())?;
    let settings = Arc::new(settings);
    let scrapes = Arc::new(Semaphore::new(config.max_concurrent_scrapes));
    let default_path = "/metrics";
    let mut running: HashMap<Target, CancellationToken> = HashMap::new();
    let start_target = |t: Target, running: &mut HashMap<Target, CancellationToken>| {
        let stop = ctx.shutdown.child_token();
        running.insert(t.clone(), stop.clone());
        let job = TargetLoop {
            target: t,
            settings: settings.clone(),
            client: client.clone(),
            engine: engine.clone(),
            scrapes: scrapes.clone(),
            output: ctx.output.clone(),
            stop,
        };
        tokio::spawn(job.supervised());
    };
    for raw in &config.targets {
        let t = Target::parse(raw, default_path, &[]).map_err(ComponentError::Config)?;
        start_target(t, &mut running);
    }
    let static_targets: Vec<Target> = running.keys().cloned().collect();
    ctx.output.set_targets(running.len());

    // Pod discovery publishes the whole set of pod targets on each change.
    let (pods_tx, mut pods_rx) = tokio::sync::watch::channel(Vec::<Target>::new());
    if let Some(k) = &config.kubernetes {
        #[cfg(feature = "k8s")]
        tokio::spawn(super::kubernetes::discover(
            k.clone(),
            default_path.to_owned(),
            settings.id.clone(),
            ctx.output.clone(),
            pods_tx.clone(),
            ctx.shutdown.child_token(),
        ));
        #[cfg(not(feature = "k8s"))]
        let _ = k;
    }

    // File targets: re-read when a file changes; targets come and go without a restart.
    let mut seen: HashMap<PathBuf, Option<SystemTime>> = HashMap::new();
    let mut from_files: HashMap<PathBuf, Vec<Target>> = HashMap::new();
    let mut check = tokio::time::interval(settings.interval.min(Duration::from_secs(5)));
    loop {
        let mut changed = false;
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            _ = check.tick(), if !config.file_targets.is_empty() => {}
            Ok(()) = pods_rx.changed() => changed = true,
        }
        for path in &config.file_targets {
            let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if seen.get(path) == Some(&mtime) {
                continue;
            }
            seen.insert(path.clone(), mtime);
            changed = true;
            match read_target_file(path, default_path) {
                Ok(targets) => {
                    info!(receiver = %settings.id, file = %path.display(), targets = targets.len(), "read target file");
                    from_files.insert(path.clone(), targets);
                }
                // A broken or missing file keeps the targets it listed last.
                Err(e) => {
                    warn!(receiver = %settings.id, file = %path.display(), error = %e, "cannot read target file; keeping its previous targets")
                }
            }
        }
        if !changed {
            continue;
        }
        let wanted: std::collections::HashSet<Target> = static_targets
            .iter()
            .cloned()
            .chain(from_files.values().flatten().cloned())
            .chain(pods_rx.borrow_and_update().iter().cloned())
            .collect();
        let (new, ignored) = reconcile(&mut running, wanted, config.max_targets, &settings.id);
        for t in new {
            start_target(t, &mut running);
        }
        if ignored > 0 {
            let message = format!(
                "{ignored} discovered targets not scraped: max_targets ({}) reached",
                config.max_targets
            );
            warn!(receiver = %settings.id, ignored, max_targets = config.max_targets, "max_targets reached; ignoring discovered targets");
            ctx.output.report_error(message);
        }
        ctx.output.set_targets(running.len());
    }
    for stop in running.values() {
        stop.cancel();
    }
    Ok(())
}

/// Stops the running targets no longer `wanted` and returns the wanted ones to start, as many
/// as `max` running targets allow, with how many that left out. Linear in the targets: a
/// cluster-wide pod watch republishes thousands of them on every pod event.
fn reconcile(
    running: &mut HashMap<Target, CancellationToken>,
    wanted: std::collections::HashSet<Target>,
    max: usize,
    receiver: &str,
) -> (Vec<Target>, usize) {
    running.retain(|t, stop| {
        let keep = wanted.contains(t);
        if !keep {
            info!(receiver, target = %t.shown, "target removed");
            stop.cancel();
        }
        keep
    });
    let room = max.saturating_sub(running.len());
    let mut new: Vec<Target> = wanted
        .into_iter()
        .filter(|t| !running.contains_key(t))
        .collect();
    let ignored = new.len().saturating_sub(room);
    new.truncate(room);
    (new, ignored)
}

fn read_secret(path: &PathBuf) -> Result<String, ComponentError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| ComponentError::Config(format!("cannot read {}: {e}", path.display())))
}

fn base64(input: &str) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FileEntry {
    Url(String),
    Group {
        targets: Vec<String>,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
}

fn read_target_file(path: &PathBuf, default_path: &str) -> Result<Vec<Target>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let entries: Vec<FileEntry> = serde_saphyr::from_str(&text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for entry in entries {
        match entry {
            FileEntry::Url(u) => out.push(Target::parse(&u, default_path, &[])?),
            FileEntry::Group { targets, labels } => {
                let labels: Vec<(String, String)> = labels.into_iter().collect();
                for t in targets {
                    out.push(Target::parse(&t, default_path, &labels)?);
                }
            }
        }
    }
    Ok(out)
}

#[derive(Clone)]
struct TargetLoop {
    target: Target,
    settings: Arc<Settings>,
    client: reqwest::Client,
    engine: Arc<dyn Engine>,
    scrapes: Arc<Semaphore>,
    output: Output,
    stop: CancellationToken,
}

impl TargetLoop {
    /// Runs the loop; one that panics is reported and started again after an interval, so a
    /// target never silently stops being scraped.
    async fn supervised(self) {
        loop {
            match tokio::spawn(self.clone().run()).await {
                Err(e) if e.is_panic() => {
                    let message = format!(
                        "{}: the scrape loop panicked; restarting it",
                        self.target.shown
                    );
                    tracing::error!(receiver = %self.settings.id, target = %self.target.shown, "scrape loop panicked; restarting it");
                    self.output.report_error(message);
                    tokio::select! {
                        () = tokio::time::sleep(self.settings.interval) => {}
                        () = self.stop.cancelled() => return,
                    }
                }
                _ => return,
            }
        }
    }

    async fn run(self) {
        let s = &self.settings;
        let mut h = DefaultHasher::new();
        self.target.url.hash(&mut h);
        let offset =
            Duration::from_nanos((u128::from(h.finish()) % s.interval.as_nanos().max(1)) as u64);
        tokio::select! {
            () = self.stop.cancelled() => return,
            () = tokio::time::sleep(offset) => {}
        }
        let mut ticker = tokio::time::interval(s.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut converter = Converter::new();
        let mut discovered: Option<Discovered> = None;
        // What the engine's every-scrape side endpoint said on this tick.
        let mut live: Vec<(&'static str, &'static str, f64)> = Vec::new();
        let mut was_up: Option<bool> = None;
        // Consecutive timed-out scrapes, and the ticks still to skip because of them.
        let mut timeouts = 0u32;
        let mut skip = 0u32;
        let mut resource = s.resource.clone();
        resource.push(kv("server.address", self.target.host.as_str()));
        resource.push(kv("server.port", self.target.port));
        resource.push(kv("service.instance.id", self.target.instance.as_str()));
        resource.push(kv("url.full", self.target.shown.as_str()));
        for (k, v) in &self.target.labels {
            // A target's own labels (a pod's pool) win over the receiver's.
            resource.retain(|a| a.key != *k);
            resource.push(kv(k.as_str(), v.as_str()));
        }
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // Above the memory limit a page would only be read to be dropped.
            if !self.output.admit_round() {
                continue;
            }
            let (scraped, started, now) = if skip > 0 {
                // A hung target still reports `up` 0 on schedule, without taking a slot.
                skip -= 1;
                let error = Err(ScrapeError::BackingOff(timeouts));
                (error, Instant::now(), now_unix_nanos())
            } else {
                let Ok(permit) = self.scrapes.acquire().await else {
                    return;
                };
                // One deadline covers the side endpoint and the page.
                let deadline = Instant::now() + s.timeout;
                if discovered.is_none() {
                    discovered = self
                        .engine
                        .discover(&self.client, &self.target, s.timeout)
                        .await;
                }
                // At most half of what is left, so that the page keeps its time.
                live = self
                    .engine
                    .every_scrape(
                        &self.client,
                        &self.target,
                        deadline.saturating_duration_since(Instant::now()) / 2,
                    )
                    .await;
                // The scrape's duration and time, as before the side endpoint shared its
                // deadline: from the page's request on, never the wait for a slot.
                let (started, now) = (Instant::now(), now_unix_nanos());
                let left = deadline.saturating_duration_since(started);
                let scraped = match get(&self.client, &self.target.url, s, left).await {
                    Ok(f) => self.convert(f, &mut converter, now).await,
                    Err(e) => Err(e),
                };
                // The slot is for fetching and parsing; waiting on a full pipeline must not
                // keep the receiver's other targets from their scrapes.
                drop(permit);
                if matches!(scraped, Err(ScrapeError::Timeout(_))) {
                    timeouts = timeouts.saturating_add(1);
                    skip = backoff_ticks(timeouts);
                } else {
                    timeouts = 0;
                }
                (scraped, started, now)
            };
            let elapsed = started.elapsed().as_secs_f64();
            let (mut metrics, samples, bytes, error) = match scraped {
                Ok((metrics, samples, bytes)) => (metrics, samples, bytes, None),
                Err(e) => (Vec::new(), 0, 0, Some(e)),
            };
            let up = error.is_none();
            if let Some(e) = &error {
                self.output
                    .report_error(format!("{}: {e}", self.target.shown));
            }
            match (&error, was_up) {
                (Some(e), Some(true) | None) => {
                    warn!(receiver = %s.id, target = %self.target.shown, error = %e, "scrape failed")
                }
                (Some(e), Some(false)) => {
                    debug!(receiver = %s.id, target = %self.target.shown, error = %e, "scrape failed again")
                }
                (None, Some(false)) => {
                    info!(receiver = %s.id, target = %self.target.shown, "target is back")
                }
                _ => {}
            }
            was_up = Some(up);
            if up {
                let fixed = discovered.iter().flat_map(|d| &d.gauges);
                for (name, unit, value) in fixed.chain(&live) {
                    metrics.push(Metric::gauge(
                        name,
                        unit,
                        vec![number_point(now, *value, Vec::new())],
                    ));
                }
            }
            for (name, unit, value, help) in [
                (
                    "up",
                    "",
                    if up { 1.0 } else { 0.0 },
                    "1 if the target answered its last scrape, else 0.",
                ),
                (
                    "scrape_duration_seconds",
                    "s",
                    elapsed,
                    "Duration of the last scrape.",
                ),
                (
                    "scrape_samples_scraped",
                    "",
                    samples as f64,
                    "Samples on the last page scraped.",
                ),
                (
                    "scrape_body_size_bytes",
                    "By",
                    bytes as f64,
                    "Size of the last page scraped, uncompressed.",
                ),
            ] {
                let mut m = Metric::gauge(name, unit, vec![number_point(now, value, Vec::new())]);
                help.clone_into(&mut m.description);
                metrics.push(m);
            }
            let mut attrs = resource.clone();
            attrs.extend(discovered.iter().flat_map(|d| &d.resource).cloned());
            if !up {
                discovered = None;
            }
            if self
                .output
                .send(Batch::with_resource(attrs, metrics))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Parses and converts a page; a big page goes to a blocking thread so the runtime's
    /// workers stay free.
    async fn convert(
        &self,
        fetched: super::fetch::Fetched,
        converter: &mut Converter,
        now: u64,
    ) -> Result<(Vec<Metric>, usize, usize), ScrapeError> {
        let format = Format::from_content_type(&fetched.content_type);
        let big = fetched.body.len() > BIG_PAGE;
        let engine = self.engine.clone();
        let limits = self.settings.page_limits;
        let work = move |mut converter: Converter| {
            let bytes = fetched.body.len();
            let result = match text::parse(&fetched.body, format) {
                Ok(page) => match limits.check(&page) {
                    Err(e) => Err(ScrapeError::Limit(e)),
                    Ok(()) => {
                        let (batch, stats) = converter.convert(&page, now, Vec::new());
                        let mut metrics: Vec<Metric> = batch
                            .resource_metrics
                            .into_iter()
                            .flat_map(|rm| rm.scope_metrics)
                            .flat_map(|sm| sm.metrics)
                            .collect();
                        engine.enrich(&page, &mut metrics, now);
                        Ok((metrics, stats.samples, bytes))
                    }
                },
                Err(e) => Err(ScrapeError::Parse(e.to_string())),
            };
            (converter, result)
        };
        let taken = std::mem::take(converter);
        let (back, result) = if big {
            tokio::task::spawn_blocking(move || work(taken))
                .await
                .unwrap_or_else(|_| {
                    (
                        Converter::new(),
                        Err(ScrapeError::Parse("the parser panicked".into())),
                    )
                })
        } else {
            // A panic in the parser, the converter or the engine's enrichment is a failed
            // scrape of this page, not a dead target.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(taken))).unwrap_or_else(
                |_| {
                    (
                        Converter::new(),
                        Err(ScrapeError::Parse("the parser panicked".into())),
                    )
                },
            )
        };
        *converter = back;
        result.map(|(m, samples, bytes)| {
            let points: usize = m.iter().map(MetricExt::point_count).sum();
            debug!(target = %self.target.shown, samples, points, "scraped");
            (m, samples, bytes)
        })
    }
}

/// A receiver that scrapes with `engine`'s additions: what `prometheus`, `vllm` and `tgi` build.
pub struct ScrapeReceiver {
    pub engine: Arc<dyn Engine>,
    pub config: ScrapeConfig,
}

#[async_trait]
impl genai_collector_core::Receiver for ScrapeReceiver {
    async fn run(self: Box<Self>, ctx: ReceiverContext) -> Result<(), ComponentError> {
        run(self.engine, self.config, ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A target URL's credentials never reach what is shown (`url.full`, logs, healthz).
        #[test]
        fn credentials_are_never_shown(
            user in "[a-zA-Z0-9%]{1,8}",
            password in "[a-zA-Z0-9%]{0,8}",
            host in "[a-z]{1,8}(\\.[a-z]{1,5})?",
            rest in "\\PC{0,24}",
        ) {
            let raw = format!("http://{user}:{password}@{host}:9000/{rest}");
            if let Ok(t) = Target::parse(&raw, "/metrics", &[]) {
                let shown = reqwest::Url::parse(&t.shown).unwrap();
                proptest::prop_assert!(shown.username().is_empty() && shown.password().is_none(), "{}", t.shown);
                proptest::prop_assert!(!t.instance.contains('@') || rest.contains('@'), "{}", t.instance);
            }
        }
    }

    #[test]
    fn targets_and_auth() {
        let t = Target::parse("10.0.0.5:8000", "/metrics", &[]).unwrap();
        assert_eq!(
            (t.url.as_str(), t.host.as_str(), t.port),
            ("http://10.0.0.5:8000/metrics", "10.0.0.5", 8000)
        );
        let t = Target::parse("https://vllm.example/metrics", "/metrics", &[]).unwrap();
        assert_eq!(t.port, 443);
        assert_eq!(t.instance, "vllm.example:443");
        // Two pages of one server are two instances; credentials are never shown.
        let a = Target::parse("http://u:p@10.0.0.5:8000/metrics", "/metrics", &[]).unwrap();
        let b =
            Target::parse("http://10.0.0.5:8000/engine/2/metrics?x=1", "/metrics", &[]).unwrap();
        assert_eq!(a.instance, "10.0.0.5:8000");
        assert_eq!(b.instance, "10.0.0.5:8000/engine/2/metrics?x=1");
        assert_eq!(a.shown, "http://10.0.0.5:8000/metrics");
        assert!(a.url.contains("u:p@"), "fetched with its credentials");
        assert!(Target::parse("ftp://x/metrics", "/metrics", &[]).is_err());
        assert!(Target::parse("http://", "/metrics", &[]).is_err());
        assert_eq!(
            base64("Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(base64("ab"), "YWI=");
    }

    #[test]
    fn page_limits() {
        let page = "a{x=\"1\",yy=\"22\"} 1\nlong_metric_name 2\n";
        let page = text::parse(page, Format::Prometheus).unwrap();
        let check = |l: PageLimits| l.check(&page);
        assert!(check(PageLimits::default()).is_ok());
        let at = PageLimits {
            samples: 2,
            labels: 2,
            name_length: 2,
            value_length: 16,
        };
        assert!(check(at).is_ok(), "limits are inclusive");
        let cases = [
            (
                PageLimits { samples: 1, ..at },
                "2 samples, over sample_limit 1",
            ),
            (
                PageLimits { labels: 1, ..at },
                "line 1: 2 labels, over label_limit 1",
            ),
            (
                PageLimits {
                    name_length: 1,
                    ..at
                },
                "line 1: a label name of 2 bytes, over label_name_length_limit 1",
            ),
            (
                PageLimits {
                    value_length: 1,
                    ..at
                },
                "line 1: label `yy` has a value of 2 bytes, over label_value_length_limit 1",
            ),
            (
                PageLimits {
                    value_length: 15,
                    ..at
                },
                "line 2: a metric name of 16 bytes, over label_value_length_limit 15",
            ),
        ];
        for (limits, expected) in cases {
            let e = check(limits).unwrap_err();
            assert!(e.starts_with(expected), "{e}");
        }
    }

    #[test]
    fn reconcile_is_linear_and_keeps_to_max_targets() {
        let pod = |i: usize| {
            Target::parse(
                &format!(
                    "http://10.{}.{}.{}:8000/metrics",
                    i >> 16,
                    (i >> 8) & 255,
                    i & 255
                ),
                "/metrics",
                &[("k8s.pod.name".into(), format!("vllm-{i}"))],
            )
            .unwrap()
        };
        let mut running: HashMap<Target, CancellationToken> = (0..10_000)
            .map(|i| (pod(i), CancellationToken::new()))
            .collect();
        let gone = running[&pod(0)].clone();
        // A pod event in a 10,000-pod watch: one pod replaced by another.
        let wanted = (1..10_001).map(pod).collect();
        let started = std::time::Instant::now();
        let (new, ignored) = reconcile(&mut running, wanted, 10_000, "vllm");
        println!("10,000 targets reconciled in {:?}", started.elapsed());
        assert_eq!((new, ignored), (vec![pod(10_000)], 0));
        assert!(gone.is_cancelled(), "the replaced pod's loop stops");
        assert_eq!(running.len(), 9_999);
        // Twice as many pods as max_targets: the rest are left out and counted.
        let wanted = (0..20_000).map(pod).collect();
        let (new, ignored) = reconcile(&mut running, wanted, 10_000, "vllm");
        assert_eq!((new.len(), ignored), (1, 10_000), "one place was left");
    }

    #[test]
    fn hung_targets_back_off_to_every_ninth_tick() {
        let skips: Vec<u32> = (0..8).map(backoff_ticks).collect();
        assert_eq!(skips, [0, 0, 1, 2, 4, 8, 8, 8]);
        assert_eq!(backoff_ticks(u32::MAX), 8);
    }

    #[test]
    fn config_checks() {
        let ok = ScrapeConfig {
            targets: vec!["localhost:8000".into()],
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        assert!(ScrapeConfig::default().validate().is_err(), "no targets");
        let slow = ScrapeConfig {
            interval: Some(Duration::from_secs(1)),
            timeout: Some(Duration::from_secs(2)),
            ..ok.clone()
        };
        assert_eq!(
            slow.validate().unwrap_err().field.as_deref(),
            Some("timeout")
        );
        let both = ScrapeConfig {
            bearer_token: Some("t".into()),
            basic_auth: Some(BasicAuth {
                username: "u".into(),
                password: None,
                password_file: None,
            }),
            ..ok
        };
        assert!(both.validate().is_err());
    }
}
