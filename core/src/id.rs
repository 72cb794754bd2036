//! Component kinds and instance ids: what every other module names components by.

use std::fmt;

/// Receiver, processor or exporter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ComponentKind {
    /// Pulls or accepts samples.
    Receiver,
    /// Transforms batches within a pipeline.
    Processor,
    /// Sends batches out.
    Exporter,
}

impl ComponentKind {
    /// `receiver`, `processor` or `exporter`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Receiver => "receiver",
            Self::Processor => "processor",
            Self::Exporter => "exporter",
        }
    }

    /// The config section that holds components of this kind.
    pub fn section(self) -> &'static str {
        match self {
            Self::Receiver => "receivers",
            Self::Processor => "processors",
            Self::Exporter => "exporters",
        }
    }
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A component instance's name in config: `kind` or `kind/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComponentId {
    kind: String,
    name: Option<String>,
}

impl ComponentId {
    /// Parses `kind` or `kind/name`; the kind is lowercase letters, digits and `_`.
    pub fn parse(id: &str) -> Result<Self, String> {
        let (kind, name) = match id.split_once('/') {
            Some((k, n)) => (k, Some(n)),
            None => (id, None),
        };
        let kind_ok = !kind.is_empty()
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !kind_ok {
            return Err(format!(
                "`{id}` is not a valid component id: expected `kind` or `kind/name`, where kind is lowercase letters, digits and `_`"
            ));
        }
        if name.is_some_and(|n| n.is_empty() || n.contains(char::is_whitespace)) {
            return Err(format!(
                "`{id}` is not a valid component id: the name after `/` must be non-empty and have no spaces"
            ));
        }
        Ok(Self {
            kind: kind.to_owned(),
            name: name.map(str::to_owned),
        })
    }

    /// The part before the `/`: the registered kind (`vllm`).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The part after the `/`, which tells instances of one kind apart (`chat`).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

impl fmt::Display for ComponentId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{}/{}", self.kind, n),
            None => f.write_str(&self.kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_ids() {
        let id = ComponentId::parse("vllm/chat").unwrap();
        assert_eq!((id.kind(), id.name()), ("vllm", Some("chat")));
        assert_eq!(id.to_string(), "vllm/chat");
        assert_eq!(ComponentId::parse("nvml").unwrap().name(), None);
        assert_eq!(
            ComponentId::parse("pool_aggregate/a/b").unwrap().name(),
            Some("a/b")
        );
        for bad in ["", "/x", "Vllm", "vllm/", "v llm", "vllm/a b"] {
            assert!(
                ComponentId::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
