//! Loading the pipeline YAML: environment substitution, parsing, component configs, pipelines.
//!
//! The file has the OpenTelemetry Collector's shape (`receivers`, `processors`, `exporters`,
//! `service.pipelines`). Every error names the file, line, column and component, and says what
//! was expected.

pub mod duration;
mod env;
pub mod exporter;
pub(crate) mod node;
pub mod size;

use std::fmt;
use std::time::Duration;

use indexmap::IndexMap;
use serde::Deserialize;

use crate::id::{ComponentId, ComponentKind};
use crate::registry::AnyConfig;
use crate::registry::Components;
pub use exporter::{ExporterSettings, QueueSettings, RetrySettings, Sizer};
use node::{DeError, Node, Pos, Value};

/// Request headers from config (`headers: {name: value}`), checked: an invalid name or value
/// is an error naming it. Components that make HTTP requests validate and build with this.
pub fn header_map(
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<axum::http::HeaderMap, String> {
    use axum::http::{HeaderName, HeaderValue};
    let mut map = axum::http::HeaderMap::new();
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("`{k}` is not a valid header name"))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| format!("header `{k}`: the value is not a valid header value"))?;
        map.insert(name, value);
    }
    Ok(map)
}

/// One config file's name and text.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file's name, as errors show it.
    pub name: String,
    /// The YAML text.
    pub text: String,
}

impl Source {
    /// A source from text, named for errors (`pipeline.yaml`, `<embedded>`).
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            text: text.into(),
        }
    }

    /// Reads a file; a missing or unreadable one is a located error.
    pub fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        std::fs::read_to_string(path)
            .map(|text| Self::new(name.clone(), text))
            .map_err(|e| ConfigError {
                file: name,
                line: 0,
                column: 0,
                component: None,
                message: format!("cannot read the config file: {e}"),
                snippet: None,
            })
    }
}

/// A config mistake, located.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The file the mistake is in.
    pub file: String,
    /// 1-based; 0 when the error concerns the file as a whole.
    pub line: u64,
    /// 1-based; 0 with `line` 0.
    pub column: u64,
    /// The component (`receivers: vllm/chat`) or section (`service.pipelines.metrics`) at fault.
    pub component: Option<String>,
    /// What is wrong, and what would do.
    pub message: String,
    /// The offending source line with a caret under the column.
    pub snippet: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if let Some(c) = &self.component {
            write!(f, ": {c}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(s) = &self.snippet {
            write!(f, "\n{s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A config that is valid but probably not what was meant.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigWarning(pub ConfigError);

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A component's parsed and validated config, with where it was defined.
pub struct ComponentEntry {
    pub(crate) config: AnyConfig,
    /// Where the component was defined, for errors about it at run time.
    pub pos: Pos,
    /// Its config node, canonical (positions left out), exporters' settings included: what a
    /// reload compares.
    pub fingerprint: String,
}

/// The `service.telemetry` section: the collector's own endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Where `/metrics` (self-telemetry), `/healthz` and `/readyz` are served; `null` disables.
    pub endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            endpoint: Some("localhost:8888".into()),
        }
    }
}

/// One `service.pipelines` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// Receivers feeding the pipeline.
    pub receivers: Vec<ComponentId>,
    /// Processors in order.
    pub processors: Vec<ComponentId>,
    /// Exporters it fans out to.
    pub exporters: Vec<ComponentId>,
}

/// The `service` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// The self-telemetry endpoint.
    pub telemetry: TelemetryConfig,
    /// The process-wide memory limit.
    pub memory_limiter: crate::memory::MemoryLimiterConfig,
    /// How long shutdown may take to drain pipelines and flush exporters.
    pub shutdown_timeout: Duration,
    /// The async runtime's worker threads; `None`: one per CPU the process may use (its
    /// cgroup's CPU limit counts). Read at start; a reload does not change it.
    pub worker_threads: Option<usize>,
    /// Pipelines by name (`metrics`, `metrics/gpu`).
    pub pipelines: IndexMap<String, PipelineConfig>,
}

/// A loaded, validated config, ready for the runtime to build.
pub struct Config {
    /// Receivers by instance id.
    pub receivers: IndexMap<ComponentId, ComponentEntry>,
    /// Processors by instance id.
    pub processors: IndexMap<ComponentId, ComponentEntry>,
    /// Exporters by instance id, with the runtime's settings for each.
    pub exporters: IndexMap<ComponentId, (ComponentEntry, ExporterSettings)>,
    /// The `service` section.
    pub service: ServiceConfig,
    /// Warnings the load found (an unused component), for the log.
    pub warnings: Vec<ConfigWarning>,
}

const TOP_LEVEL: &[&str] = &["receivers", "processors", "exporters", "service"];
const SERVICE_KEYS: &[&str] = &[
    "telemetry",
    "memory_limiter",
    "shutdown_timeout",
    "worker_threads",
    "pipelines",
];
const PIPELINE_KEYS: &[&str] = &["receivers", "processors", "exporters"];
const EXPORTER_SETTINGS: &[&str] = &["sending_queue", "retry_on_failure", "timeout"];

/// Reads the config from `sources`; later files overlay earlier ones, mapping by mapping.
pub fn load(sources: &[Source], components: &Components) -> Result<Config, ConfigError> {
    Loader {
        sources,
        env: &|name| std::env::var(name).ok(),
    }
    .load(components)
}

/// Like [`load`], with a custom environment (for tests).
pub fn load_with_env(
    sources: &[Source],
    components: &Components,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    Loader { sources, env }.load(components)
}

struct Loader<'a> {
    sources: &'a [Source],
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Loader<'_> {
    fn error(
        &self,
        pos: Pos,
        component: Option<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let source = &self.sources[pos.source.min(self.sources.len() - 1)];
        let snippet = (pos.line > 0)
            .then(|| source.text.lines().nth(pos.line as usize - 1))
            .flatten()
            .map(|text| {
                let gutter = pos.line.to_string();
                let caret_pad: String = text
                    .chars()
                    .take(pos.column.saturating_sub(1) as usize)
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                format!(
                    "{gutter} | {text}\n{blank} | {caret_pad}^",
                    blank = " ".repeat(gutter.len())
                )
            });
        ConfigError {
            file: source.name.clone(),
            line: pos.line,
            column: pos.column,
            component,
            message: message.into(),
            snippet,
        }
    }

    fn de_error(&self, e: DeError, fallback: Pos, component: Option<String>) -> ConfigError {
        self.error(e.pos.unwrap_or(fallback), component, e.message)
    }

    fn load(&self, components: &Components) -> Result<Config, ConfigError> {
        if self.sources.is_empty() {
            return Err(ConfigError {
                file: "<none>".into(),
                line: 0,
                column: 0,
                component: None,
                message: "no config given".into(),
                snippet: None,
            });
        }
        let mut root: Option<Node> = None;
        for (i, source) in self.sources.iter().enumerate() {
            let text = env::substitute(&source.text, self.env).map_err(|e| {
                let pos = Pos {
                    source: i,
                    line: e.line,
                    column: e.column,
                };
                self.error(pos, None, e.message)
            })?;
            let node = Node::parse(&text, i).map_err(|e| self.yaml_error(i, &e))?;
            match &mut root {
                Some(r) => r.merge(node),
                None => root = Some(node),
            }
        }
        let root = root.unwrap_or_else(|| Node::new(Value::Null, Pos::default()));
        let entries = self.mapping(&root, None, "the config")?;
        if entries.is_empty() {
            // An empty document has no line worth pointing at.
            return Err(self.error(
                Pos::default(),
                None,
                "the config is empty: it needs `receivers`, `exporters` and `service.pipelines`",
            ));
        }
        for (key, _) in entries {
            self.check_key(key, TOP_LEVEL, None, "top-level key")?;
        }

        let receivers = self.section(&root, ComponentKind::Receiver, components)?;
        let processors = self.section(&root, ComponentKind::Processor, components)?;
        let exporters = self.section(&root, ComponentKind::Exporter, components)?;
        let service_node = root.get("service").ok_or_else(|| {
            self.error(
                root.pos,
                None,
                "missing `service` section: it names the pipelines to run",
            )
        })?;
        let service = self.service(service_node, &receivers, &processors, &exporters)?;

        let mut warnings = Vec::new();
        for (kind, ids) in [
            (
                ComponentKind::Receiver,
                receivers
                    .iter()
                    .map(|(id, e)| (id, e.pos))
                    .collect::<Vec<_>>(),
            ),
            (
                ComponentKind::Processor,
                processors.iter().map(|(id, e)| (id, e.pos)).collect(),
            ),
            (
                ComponentKind::Exporter,
                exporters.iter().map(|(id, e)| (id, e.0.pos)).collect(),
            ),
        ] {
            for (id, pos) in ids {
                let used = service.pipelines.values().any(|p| match kind {
                    ComponentKind::Receiver => p.receivers.contains(id),
                    ComponentKind::Processor => p.processors.contains(id),
                    ComponentKind::Exporter => p.exporters.contains(id),
                });
                if !used {
                    warnings.push(ConfigWarning(self.error(
                        pos,
                        Some(format!("{}: {id}", kind.section())),
                        format!("{kind} `{id}` is defined but no pipeline uses it"),
                    )));
                }
            }
        }
        Ok(Config {
            receivers,
            processors,
            exporters,
            service,
            warnings,
        })
    }

    fn yaml_error(&self, source: usize, e: &serde_saphyr::Error) -> ConfigError {
        let loc = e.location();
        let pos = Pos {
            source,
            line: loc.map_or(0, |l| l.line()),
            column: loc.map_or(0, |l| l.column()),
        };
        // The YAML crate prefixes "line X column Y:" and appends its own snippet; keep the words.
        let text = e.without_snippet().to_string();
        let first = text.lines().next().unwrap_or_default();
        let message = first
            .trim_start_matches("error: ")
            .split_once(": ")
            .filter(|(head, _)| head.starts_with("line "))
            .map_or(first, |(_, rest)| rest);
        let message = message.split(" at line ").next().unwrap_or(message);
        let message = message
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(message);
        self.error(pos, None, format!("invalid YAML: {message}"))
    }

    fn mapping<'n>(
        &self,
        node: &'n Node,
        component: Option<String>,
        what: &str,
    ) -> Result<&'n [(Node, Node)], ConfigError> {
        node.entries().ok_or_else(|| {
            self.error(
                node.pos,
                component,
                format!("{what} must be a mapping, found {}", node.type_name()),
            )
        })
    }

    fn key_str<'n>(
        &self,
        key: &'n Node,
        component: Option<String>,
    ) -> Result<&'n str, ConfigError> {
        key.as_str().ok_or_else(|| {
            self.error(
                key.pos,
                component,
                format!("expected a string key, found {}", key.type_name()),
            )
        })
    }

    fn check_key(
        &self,
        key: &Node,
        allowed: &[&str],
        component: Option<String>,
        what: &str,
    ) -> Result<(), ConfigError> {
        let name = self.key_str(key, component.clone())?;
        if allowed.contains(&name) {
            return Ok(());
        }
        Err(self.error(
            key.pos,
            component,
            format!(
                "unknown {what} `{name}`{}, expected one of: {}",
                suggest(name, allowed),
                allowed.join(", ")
            ),
        ))
    }

    fn section<T>(
        &self,
        root: &Node,
        kind: ComponentKind,
        components: &Components,
    ) -> Result<IndexMap<ComponentId, T>, ConfigError>
    where
        T: FromEntry,
    {
        let mut out = IndexMap::new();
        let Some(section) = root.get(kind.section()) else {
            return Ok(out);
        };
        for (key, node) in self.mapping(
            section,
            Some(kind.section().into()),
            &format!("`{}`", kind.section()),
        )? {
            let raw = self.key_str(key, Some(kind.section().into()))?;
            let label = Some(format!("{}: {raw}", kind.section()));
            let id = ComponentId::parse(raw).map_err(|m| self.error(key.pos, label.clone(), m))?;
            let mut node = node.clone();
            // Before the runtime's settings are split off: they are part of what a reload
            // compares.
            let fingerprint = node.canonical();
            let settings = T::split_settings(&mut node)
                .map_err(|e| self.de_error(e, node.pos, label.clone()))?;
            let config = match components.parse(kind, &id, &node) {
                Some(result) => result.map_err(|e| self.de_error(e, node.pos, label.clone()))?,
                None => {
                    let known = components.kind_names(kind);
                    return Err(self.error(
                        key.pos,
                        label,
                        format!(
                            "unknown {kind} kind `{}`{}; known {kind} kinds: {}",
                            id.kind(),
                            suggest(id.kind(), &known),
                            if known.is_empty() {
                                "none".into()
                            } else {
                                known.join(", ")
                            }
                        ),
                    ));
                }
            };
            out.insert(
                id,
                T::from_entry(
                    ComponentEntry {
                        config,
                        pos: key.pos,
                        fingerprint,
                    },
                    settings,
                ),
            );
        }
        Ok(out)
    }

    fn service(
        &self,
        node: &Node,
        receivers: &IndexMap<ComponentId, ComponentEntry>,
        processors: &IndexMap<ComponentId, ComponentEntry>,
        exporters: &IndexMap<ComponentId, (ComponentEntry, ExporterSettings)>,
    ) -> Result<ServiceConfig, ConfigError> {
        let label = Some("service".to_string());
        for (key, _) in self.mapping(node, label.clone(), "`service`")? {
            self.check_key(key, SERVICE_KEYS, label.clone(), "key in `service`")?;
        }
        let telemetry = match node.get("telemetry") {
            Some(n) => n
                .deserialize()
                .map_err(|e| self.de_error(e, n.pos, Some("service.telemetry".into())))?,
            None => TelemetryConfig::default(),
        };
        let memory_limiter = match node.get("memory_limiter") {
            Some(n) => {
                let label = Some("service.memory_limiter".to_string());
                let c: crate::memory::MemoryLimiterConfig = n
                    .deserialize()
                    .map_err(|e| self.de_error(e, n.pos, label.clone()))?;
                c.validate().map_err(|m| self.error(n.pos, label, m))?;
                c
            }
            None => Default::default(),
        };
        let shutdown_timeout = match node.get("shutdown_timeout") {
            Some(n) => {
                duration::parse_node(n).map_err(|e| self.de_error(e, n.pos, label.clone()))?
            }
            None => Duration::from_secs(10),
        };
        let worker_threads = match node.get("worker_threads") {
            Some(n) => {
                let label = Some("service.worker_threads".to_string());
                let threads: usize = n
                    .deserialize()
                    .map_err(|e| self.de_error(e, n.pos, label.clone()))?;
                if !(1..=1024).contains(&threads) {
                    return Err(self.error(n.pos, label, "must be between 1 and 1024"));
                }
                Some(threads)
            }
            None => None,
        };
        let pipelines_node = node.get("pipelines").ok_or_else(|| {
            self.error(node.pos, label.clone(), "missing `pipelines`: name at least one, e.g. `metrics: {receivers: [...], exporters: [...]}`")
        })?;
        let entries = self.mapping(
            pipelines_node,
            Some("service.pipelines".into()),
            "`service.pipelines`",
        )?;
        if entries.is_empty() {
            return Err(self.error(pipelines_node.pos, Some("service.pipelines".into()), "no pipelines defined: add at least one, e.g. `metrics: {receivers: [...], exporters: [...]}`"));
        }
        let mut pipelines = IndexMap::new();
        for (key, p) in entries {
            let name = self.key_str(key, Some("service.pipelines".into()))?;
            let label = Some(format!("service.pipelines.{name}"));
            let (signal, _) = name.split_once('/').unwrap_or((name, ""));
            if signal != "metrics" {
                return Err(self.error(
                    key.pos,
                    label,
                    format!("pipeline `{name}`: only `metrics` pipelines are supported (name them `metrics` or `metrics/<name>`), found signal `{signal}`"),
                ));
            }
            for (k, _) in self.mapping(p, label.clone(), &format!("pipeline `{name}`"))? {
                self.check_key(k, PIPELINE_KEYS, label.clone(), "key in a pipeline")?;
            }
            let pipeline = PipelineConfig {
                receivers: self.refs(key, p, ComponentKind::Receiver, receivers, true)?,
                processors: self.refs(key, p, ComponentKind::Processor, processors, false)?,
                exporters: self.refs(key, p, ComponentKind::Exporter, exporters, true)?,
            };
            pipelines.insert(name.to_owned(), pipeline);
        }
        Ok(ServiceConfig {
            telemetry,
            memory_limiter,
            shutdown_timeout,
            worker_threads,
            pipelines,
        })
    }

    /// The component ids a pipeline lists under `kind`, each checked against what is defined.
    fn refs<T>(
        &self,
        key: &Node,
        pipeline: &Node,
        kind: ComponentKind,
        defined: &IndexMap<ComponentId, T>,
        required: bool,
    ) -> Result<Vec<ComponentId>, ConfigError> {
        let name = key.as_str().unwrap_or_default();
        let label = Some(format!("service.pipelines.{name}"));
        let section = kind.section();
        let Some(list) = pipeline.get(section) else {
            if required {
                return Err(self.error(
                    key.pos,
                    label,
                    format!("pipeline `{name}` has no `{section}`: list at least one {kind}"),
                ));
            }
            return Ok(Vec::new());
        };
        let items = match &list.value {
            Value::Seq(items) => items.as_slice(),
            Value::Null => &[],
            _ => {
                return Err(self.error(
                    list.pos,
                    label,
                    format!(
                        "`{section}` must be a list of {kind} ids, found {}",
                        list.type_name()
                    ),
                ))
            }
        };
        if required && items.is_empty() {
            return Err(self.error(
                list.pos,
                label,
                format!(
                    "pipeline `{name}` has an empty `{section}` list: list at least one {kind}"
                ),
            ));
        }
        let mut ids: Vec<ComponentId> = Vec::with_capacity(items.len());
        for item in items {
            let raw = item.as_str().ok_or_else(|| {
                self.error(
                    item.pos,
                    label.clone(),
                    format!("expected a {kind} id, found {}", item.type_name()),
                )
            })?;
            let id = ComponentId::parse(raw).map_err(|m| self.error(item.pos, label.clone(), m))?;
            if !defined.contains_key(&id) {
                let names: Vec<String> = defined.keys().map(ToString::to_string).collect();
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                return Err(self.error(
                    item.pos,
                    label,
                    format!(
                        "{kind} `{id}` is not defined in `{section}`{}; defined: {}",
                        suggest(raw, &refs),
                        if names.is_empty() {
                            "none".into()
                        } else {
                            names.join(", ")
                        }
                    ),
                ));
            }
            if ids.contains(&id) {
                return Err(self.error(
                    item.pos,
                    label,
                    format!("{kind} `{id}` is listed twice in pipeline `{name}`"),
                ));
            }
            ids.push(id);
        }
        Ok(ids)
    }
}

/// How a section stores a parsed component; exporters also keep their runtime settings.
trait FromEntry: Sized {
    type Settings;
    fn split_settings(node: &mut Node) -> Result<Self::Settings, DeError>;
    fn from_entry(entry: ComponentEntry, settings: Self::Settings) -> Self;
}

impl FromEntry for ComponentEntry {
    type Settings = ();
    fn split_settings(_: &mut Node) -> Result<(), DeError> {
        Ok(())
    }
    fn from_entry(entry: ComponentEntry, _: ()) -> Self {
        entry
    }
}

impl FromEntry for (ComponentEntry, ExporterSettings) {
    type Settings = ExporterSettings;
    fn split_settings(node: &mut Node) -> Result<ExporterSettings, DeError> {
        let pos = node.key_node("sending_queue").map_or(node.pos, |k| k.pos);
        let mut settings = Node::new(Value::Map(Vec::new()), node.pos);
        if let Value::Map(entries) = &mut settings.value {
            for key in EXPORTER_SETTINGS {
                if let Some(key_node) = node.key_node(key).cloned() {
                    let value = node
                        .take(key)
                        .unwrap_or_else(|| Node::new(Value::Null, key_node.pos));
                    entries.push((key_node, value));
                }
            }
        }
        let settings: ExporterSettings = settings.deserialize()?;
        settings
            .sending_queue
            .validate()
            .map_err(|m| DeError::at(m, pos))?;
        Ok(settings)
    }
    fn from_entry(entry: ComponentEntry, settings: ExporterSettings) -> Self {
        (entry, settings)
    }
}

/// ", did you mean `x`?" when a known name is one or two edits away.
fn suggest(name: &str, known: &[&str]) -> String {
    known
        .iter()
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let ok: std::collections::BTreeMap<String, String> =
            [("X-Scope-OrgID".to_string(), "team-a".to_string())].into();
        assert_eq!(
            header_map(&ok).unwrap().get("x-scope-orgid").unwrap(),
            "team-a"
        );
        let bad_name = [("bad header".to_string(), "v".to_string())].into();
        assert!(header_map(&bad_name)
            .unwrap_err()
            .contains("`bad header` is not a valid header name"));
        let bad_value = [("x".to_string(), "line\nbreak".to_string())].into();
        assert!(header_map(&bad_value).unwrap_err().contains("header `x`"));
    }

    #[test]
    fn suggestions() {
        assert_eq!(edit_distance("vlm", "vllm"), 1);
        assert_eq!(suggest("vlm", &["vllm", "tgi"]), " (did you mean `vllm`?)");
        assert_eq!(suggest("zzzzzz", &["vllm", "tgi"]), "");
    }
}
