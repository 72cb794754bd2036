//! Durations in config: `500ms`, `5s`, `1m30s`. Use with `#[serde(with = "duration")]`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::node::{DeError, Node};

/// Parses a human duration, with an error that shows the expected form.
pub fn parse(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        format!(
            "invalid duration `{text}` ({e}): expected a number and a unit, like 500ms, 5s or 1m"
        )
    })?;
    // Far past any sensible setting, and far enough from the clock arithmetic's limits.
    if d > MAX {
        return Err(format!(
            "duration `{text}` is over the 365 days any setting may take"
        ));
    }
    Ok(d)
}

/// The longest duration a setting may take.
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Deserializes `"500ms"`, `"10s"`, `"5m"`, `"1h"`: `#[serde(with = "duration")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

pub(crate) fn parse_node(node: &Node) -> Result<Duration, DeError> {
    let text: String = node.deserialize()?;
    parse(&text).map_err(|m| DeError::at(m, node.pos))
}

/// For `Option<Duration>` fields: `#[serde(default, with = "duration::option")]`.
pub mod option {
    use super::*;

    /// Deserializes an optional duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| parse(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse("5")
            .unwrap_err()
            .contains("expected a number and a unit"));
        assert!(parse("soon").is_err());
        assert!(parse("18446744073s 709551616ns")
            .unwrap_err()
            .contains("over the 365 days"));
        assert_eq!(parse("365days"), Ok(MAX));
    }
}
