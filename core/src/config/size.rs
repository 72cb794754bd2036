//! Sizes in config: a plain number, or a number with a unit (`512KiB`, `32MiB`, `1GiB`, `64MB`).

use serde::{Deserialize, Deserializer};

/// Parses a size, with an error that shows the expected form.
pub fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => u64::MAX,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|_| factor != u64::MAX)
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| {
            format!("invalid size `{text}`: expected a whole number, optionally with a unit, like 1000, 512KiB or 32MiB")
        })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Number(u64),
    Text(String),
}

/// Deserializes a byte count: a number or `"64MiB"`, `"1GB"`: `#[serde(with = "size")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Raw::deserialize(d)? {
        Raw::Number(n) => Ok(n),
        Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
    }
}

/// For `Option<u64>` fields: `#[serde(default, with = "size::option")]`.
pub mod option {
    use super::*;

    /// Deserializes an optional byte count.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse("1000"), Ok(1000));
        assert_eq!(parse("32MiB"), Ok(32 << 20));
        assert_eq!(parse("2 GiB"), Ok(2 << 30));
        assert_eq!(parse("64MB"), Ok(64_000_000));
        assert!(parse("lots").unwrap_err().contains("like 1000, 512KiB"));
        assert!(parse("5 parsecs").is_err());
        assert!(parse("99999999999999GiB").is_err(), "overflow is an error");
    }
}
