//! A zero-copy parser for the Prometheus text format (0.0.4) and OpenMetrics 1.0.
//!
//! Names, label values without escapes and help texts borrow from the page; only escaped values
//! are copied. Labels of all samples live in one arena on the [`Page`], so a sample costs no
//! allocation of its own.
//!
//! [`Format::Prometheus`] is lenient, as Prometheus itself is with 0.0.4 pages: blank lines and
//! unknown comments are skipped, families may be interleaved. [`Format::OpenMetrics`] is strict:
//! every rule the OpenMetrics conformance suite checks is enforced, and a violation is an error
//! naming the line.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Range;

/// Which grammar the page is read with, chosen from the answer's `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`, lenient.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`, strict.
    OpenMetrics,
}

impl Format {
    /// The format a `Content-Type` header names; anything but OpenMetrics reads as 0.0.4.
    pub fn from_content_type(content_type: &str) -> Self {
        if content_type
            .trim_start()
            .starts_with("application/openmetrics-text")
        {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    GaugeHistogram,
    Summary,
    Info,
    StateSet,
    /// `unknown` in OpenMetrics, `untyped` in 0.0.4, or no TYPE line.
    Unknown,
}

impl Kind {
    fn parse(word: &str, format: Format) -> Option<Self> {
        Some(match word {
            "counter" => Self::Counter,
            "gauge" => Self::Gauge,
            "histogram" => Self::Histogram,
            "summary" => Self::Summary,
            "gaugehistogram" => Self::GaugeHistogram,
            "info" => Self::Info,
            "stateset" => Self::StateSet,
            "unknown" => Self::Unknown,
            "untyped" if format == Format::Prometheus => Self::Unknown,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
            Self::GaugeHistogram => "gaugehistogram",
            Self::Summary => "summary",
            Self::Info => "info",
            Self::StateSet => "stateset",
            Self::Unknown => "unknown",
        }
    }

    /// The suffixes a sample name may add to the family name.
    fn suffixes(self, format: Format) -> &'static [&'static str] {
        match (self, format) {
            // A 0.0.4 counter's family is named with its `_total` already.
            (Self::Counter, Format::Prometheus) => &["", "_created"],
            (Self::Counter, Format::OpenMetrics) => &["_total", "_created"],
            (Self::Histogram, _) => &["_bucket", "_count", "_sum", "_created"],
            (Self::GaugeHistogram, _) => &["_bucket", "_gcount", "_gsum"],
            (Self::Summary, _) => &["", "_count", "_sum", "_created"],
            (Self::Info, Format::OpenMetrics) => &["_info"],
            _ => &[""],
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Label<'a> {
    pub name: &'a str,
    pub value: Cow<'a, str>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Exemplar<'a> {
    pub labels: Vec<Label<'a>>,
    pub value: f64,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sample<'a> {
    /// The full sample name (`x_bucket`, `x_total`).
    pub name: &'a str,
    /// Indexes into [`Page::labels`].
    pub labels: Range<u32>,
    pub value: f64,
    /// Seconds since the Unix epoch (0.0.4 milliseconds are converted).
    pub timestamp: Option<f64>,
    pub exemplar: Option<Box<Exemplar<'a>>>,
    /// 1-based line of the sample, for error messages downstream.
    pub line: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Family<'a> {
    pub name: &'a str,
    pub kind: Kind,
    pub help: Option<Cow<'a, str>>,
    pub unit: Option<&'a str>,
    pub samples: Vec<Sample<'a>>,
}

impl<'a> Family<'a> {
    /// The part of a sample's name after the family name (`_bucket`, `_total`, ``).
    pub fn suffix<'s>(&self, sample: &'s Sample<'a>) -> &'s str {
        sample.name.get(self.name.len()..).unwrap_or("")
    }
}

/// Labels one sample may carry: real pages have a handful; a line of thousands is an attack on
/// the parser, refused before it costs quadratic time.
pub const MAX_LABELS: usize = 128;

/// A parsed page: its families, and the arena that holds every sample's labels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Page<'a> {
    pub families: Vec<Family<'a>>,
    pub labels: Vec<Label<'a>>,
}

impl<'a> Page<'a> {
    pub fn labels_of(&self, sample: &Sample<'a>) -> &[Label<'a>] {
        &self.labels[sample.labels.start as usize..sample.labels.end as usize]
    }

    pub fn sample_count(&self) -> usize {
        self.families.iter().map(|f| f.samples.len()).sum()
    }
}

/// Where and why a page was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based; 0 when the page as a whole is at fault (no `# EOF`).
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: {}", self.line, self.message)
        } else {
            f.write_str(&self.message)
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses a whole page.
pub fn parse(text: &str, format: Format) -> Result<Page<'_>, ParseError> {
    let mut p = Parser {
        format,
        page: Page {
            families: Vec::new(),
            labels: Vec::with_capacity(text.len() / 48),
        },
        by_name: HashMap::new(),
        current: None,
        typed: Vec::new(),
        claimed: HashSet::new(),
        line: 0,
    };
    p.run(text)?;
    Ok(p.page)
}

struct Parser<'a> {
    format: Format,
    page: Page<'a>,
    /// Family index by family name (0.0.4 lookups for interleaved families).
    by_name: HashMap<&'a str, usize>,
    /// The family samples and metadata currently go to.
    current: Option<usize>,
    /// Whether each family had a TYPE line.
    typed: Vec<bool>,
    /// OpenMetrics: every name a family or its samples use, to catch clashes and regrouping.
    claimed: HashSet<String>,
    line: usize,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        line,
        message: message.into(),
    })
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

fn valid_metric_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty() && is_name_start(b[0]) && b[1..].iter().all(|&c| is_name_char(c))
}

/// A number as both formats write it: decimal or exponent, `NaN`, `[+-]Inf(inity)` in any
/// case. Rust's parser takes exactly these and rejects hex, `_` separators and `0b`/`0o`.
fn parse_float(s: &str) -> Option<f64> {
    if s.is_empty() || s.len() > 400 {
        return None;
    }
    fast_decimal(s.as_bytes()).or_else(|| s.parse::<f64>().ok())
}

/// `123` or `123.456` with at most 15 digits: the mantissa and the power of ten are exact
/// doubles, so one division gives the correctly rounded value (Clinger's fast path).
fn fast_decimal(b: &[u8]) -> Option<f64> {
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];
    if b.len() > 16 {
        return None;
    }
    let mut mantissa: u64 = 0;
    let mut digits = 0;
    let mut frac: Option<usize> = None;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'0'..=b'9' => {
                mantissa = mantissa * 10 + u64::from(c - b'0');
                digits += 1;
            }
            b'.' if frac.is_none() && i > 0 => frac = Some(b.len() - i - 1),
            _ => return None,
        }
    }
    if digits == 0 || digits > 15 {
        return None;
    }
    Some(mantissa as f64 / POW10[frac.unwrap_or(0)])
}

/// Undoes `\\`, `\n` and (in label values) `\"`; other escapes stay as written, as the
/// reference parsers leave them.
fn unescape(s: &str, quotes: bool) -> Cow<'_, str> {
    if !s.contains('\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if quotes => out.push('"'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

/// The first `"` or `\\` in `b`, eight bytes at a time: label values are mostly 10-60 bytes,
/// too short for a SIMD search's setup to pay and too long for a byte loop.
fn find_quote_or_backslash(b: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut i = 0;
    while i + 8 <= b.len() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        let w = u64::from_le_bytes(w);
        let hit =
            zero_byte(w ^ (ONES * u64::from(b'"'))) | zero_byte(w ^ (ONES * u64::from(b'\\')));
        if hit != 0 {
            return Some(i + (hit.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    b[i..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\')
        .map(|p| i + p)
}

/// Reads `{name="value",...}` starting at `b[*pos] == b'{'`; pushes the labels into `out`.
fn parse_labels<'a>(
    line: &'a str,
    pos: &mut usize,
    strict: bool,
    out: &mut Vec<Label<'a>>,
    ln: usize,
) -> Result<(), ParseError> {
    let b = line.as_bytes();
    let skip_ws = |p: &mut usize| {
        if !strict {
            while *p < b.len() && (b[*p] == b' ' || b[*p] == b'\t') {
                *p += 1;
            }
        }
    };
    let first = out.len();
    *pos += 1;
    skip_ws(pos);
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Ok(());
    }
    loop {
        skip_ws(pos);
        let start = *pos;
        if !b
            .get(*pos)
            .is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_')
        {
            return err(ln, format!("expected a label name at column {}", *pos + 1));
        }
        while *pos < b.len() && (b[*pos].is_ascii_alphanumeric() || b[*pos] == b'_') {
            *pos += 1;
        }
        let name = &line[start..*pos];
        skip_ws(pos);
        if b.get(*pos) != Some(&b'=') {
            return err(ln, format!("expected `=` after label name `{name}`"));
        }
        *pos += 1;
        skip_ws(pos);
        if b.get(*pos) != Some(&b'"') {
            return err(
                ln,
                format!("label `{name}`: the value must be in double quotes"),
            );
        }
        *pos += 1;
        let vstart = *pos;
        let mut escaped = false;
        loop {
            match find_quote_or_backslash(&b[*pos..]) {
                None => return err(ln, format!("label `{name}`: unterminated value")),
                Some(i) if b[*pos + i] == b'\\' => {
                    escaped = true;
                    *pos += i + 2;
                    if *pos > b.len() {
                        return err(ln, format!("label `{name}`: unterminated value"));
                    }
                }
                Some(i) => {
                    *pos += i;
                    break;
                }
            }
        }
        let raw = &line[vstart..*pos];
        *pos += 1;
        let value = if escaped {
            unescape(raw, true)
        } else {
            Cow::Borrowed(raw)
        };
        if out.len() - first >= MAX_LABELS {
            return err(ln, format!("more than {MAX_LABELS} labels on one sample"));
        }
        // Bounded by MAX_LABELS: at most ~8k comparisons for one sample.
        if out[first..].iter().any(|l| l.name == name) {
            return err(ln, format!("label `{name}` appears twice"));
        }
        out.push(Label { name, value });
        skip_ws(pos);
        match b.get(*pos) {
            Some(b',') => {
                *pos += 1;
                skip_ws(pos);
                if b.get(*pos) == Some(&b'}') {
                    if strict {
                        return err(ln, "trailing comma in labels");
                    }
                    *pos += 1;
                    return Ok(());
                }
            }
            Some(b'}') => {
                *pos += 1;
                return Ok(());
            }
            _ => return err(ln, format!("expected `,` or `}}` after label `{name}`")),
        }
    }
}

impl<'a> Parser<'a> {
    fn om(&self) -> bool {
        self.format == Format::OpenMetrics
    }

    fn run(&mut self, text: &'a str) -> Result<(), ParseError> {
        let mut rest = text;
        let mut saw_eof = false;
        while !rest.is_empty() {
            self.line += 1;
            let (line, next) = match memchr::memchr(b'\n', rest.as_bytes()) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, ""),
            };
            rest = next;
            if self.om() {
                if line == "# EOF" {
                    if !rest.is_empty() {
                        return err(self.line + 1, "text after `# EOF`");
                    }
                    saw_eof = true;
                    break;
                }
                if line.is_empty() {
                    return err(self.line, "blank line (OpenMetrics allows none)");
                }
                if line.starts_with('#') {
                    self.metadata_om(line)?;
                } else {
                    self.sample(line)?;
                }
            } else {
                let line = line.trim_end_matches('\r').trim_start_matches([' ', '\t']);
                if line.is_empty() {
                    continue;
                }
                if line.starts_with('#') {
                    self.metadata_prom(line);
                } else {
                    self.sample(line)?;
                }
            }
        }
        if self.om() {
            if !saw_eof {
                return err(0, "missing `# EOF` at the end of an OpenMetrics page");
            }
            if let Some(i) = self.current {
                validate_family(&self.page, i, self.line)?;
            }
        }
        Ok(())
    }

    fn new_family(&mut self, name: &'a str, kind: Kind) -> usize {
        let i = self.page.families.len();
        self.page.families.push(Family {
            name,
            kind,
            help: None,
            unit: None,
            samples: Vec::new(),
        });
        self.typed.push(false);
        self.by_name.insert(name, i);
        i
    }

    /// OpenMetrics: switches to the family `name`, which must not have been seen before.
    fn enter_family_om(&mut self, name: &'a str) -> Result<usize, ParseError> {
        if let Some(i) = self.current {
            if self.page.families[i].name == name {
                return Ok(i);
            }
            validate_family(&self.page, i, self.line)?;
        }
        if !self.claimed.insert(name.to_owned()) {
            return err(self.line, format!("metric family `{name}` appears again after other families, or clashes with another family's samples"));
        }
        let i = self.new_family(name, Kind::Unknown);
        self.current = Some(i);
        Ok(i)
    }

    fn metadata_om(&mut self, line: &'a str) -> Result<(), ParseError> {
        let ln = self.line;
        let Some(body) = line.strip_prefix("# ") else {
            return err(
                ln,
                "a comment must be `# HELP`, `# TYPE`, `# UNIT` or `# EOF`",
            );
        };
        let (keyword, rest) = body.split_once(' ').unwrap_or((body, ""));
        if !matches!(keyword, "HELP" | "TYPE" | "UNIT") {
            return err(
                ln,
                format!("unknown metadata `# {keyword}`: expected HELP, TYPE, UNIT or EOF"),
            );
        }
        let Some((name, value)) = rest.split_once(' ') else {
            return err(
                ln,
                format!("`# {keyword}` needs a metric name, a space and a value"),
            );
        };
        if !valid_metric_name(name) {
            return err(ln, format!("`{name}` is not a valid metric name"));
        }
        let i = self.enter_family_om(name)?;
        let fam = &self.page.families[i];
        if !fam.samples.is_empty() {
            return err(ln, format!("`# {keyword}` for `{name}` after its samples"));
        }
        match keyword {
            "HELP" => {
                if fam.help.is_some() {
                    return err(ln, format!("second `# HELP` for `{name}`"));
                }
                self.page.families[i].help = Some(unescape(value, true));
            }
            "TYPE" => {
                let Some(kind) = Kind::parse(value, Format::OpenMetrics) else {
                    return err(ln, format!("unknown type `{value}`: expected counter, gauge, histogram, gaugehistogram, summary, info, stateset or unknown"));
                };
                if self.typed[i] {
                    return err(ln, format!("second `# TYPE` for `{name}`"));
                }
                if fam.unit.is_some() && matches!(kind, Kind::Info | Kind::StateSet) {
                    return err(ln, format!("{} `{name}` cannot have a unit", kind.as_str()));
                }
                self.typed[i] = true;
                self.page.families[i].kind = kind;
                for suffix in kind
                    .suffixes(Format::OpenMetrics)
                    .iter()
                    .filter(|s| !s.is_empty())
                {
                    let full = format!("{name}{suffix}");
                    if !self.claimed.insert(full.clone()) {
                        return err(ln, format!("`{full}`, a sample of {} `{name}`, clashes with another metric family", kind.as_str()));
                    }
                }
            }
            _ => {
                if fam.unit.is_some() {
                    return err(ln, format!("second `# UNIT` for `{name}`"));
                }
                if value.contains([' ', '\t']) {
                    return err(ln, format!("unit `{value}` contains whitespace"));
                }
                if !value.is_empty() && !name.strip_suffix(value).is_some_and(|n| n.ends_with('_'))
                {
                    return err(
                        ln,
                        format!("metric `{name}` with unit `{value}` must end in `_{value}`"),
                    );
                }
                if matches!(fam.kind, Kind::Info | Kind::StateSet) {
                    return err(
                        ln,
                        format!("{} `{name}` cannot have a unit", fam.kind.as_str()),
                    );
                }
                self.page.families[i].unit = Some(value);
            }
        }
        Ok(())
    }

    /// 0.0.4 metadata: HELP and TYPE are read, anything else is a comment.
    fn metadata_prom(&mut self, line: &'a str) {
        let body = line[1..].trim_start_matches([' ', '\t']);
        let (keyword, rest) = body.split_once([' ', '\t']).unwrap_or((body, ""));
        if keyword != "HELP" && keyword != "TYPE" {
            return;
        }
        let rest = rest.trim_start_matches([' ', '\t']);
        let (name, value) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
        if !valid_metric_name(name) {
            return;
        }
        let i = match self.by_name.get(name) {
            Some(&i) => i,
            None => self.new_family(name, Kind::Unknown),
        };
        self.current = Some(i);
        if keyword == "HELP" {
            self.page.families[i].help = Some(unescape(value, false));
        } else if let Some(kind) = Kind::parse(value.trim(), Format::Prometheus) {
            // 0.0.4 has no gaugehistogram, info or stateset; such pages read as gauges.
            self.page.families[i].kind = match kind {
                Kind::GaugeHistogram | Kind::Info | Kind::StateSet => Kind::Unknown,
                k => k,
            };
            self.typed[i] = true;
        }
    }

    /// The family a 0.0.4 sample belongs to: the current one, a typed one its name extends,
    /// or a new untyped family of its own.
    fn family_for_prom(&mut self, name: &'a str) -> usize {
        let fits = |f: &Family<'_>| {
            name.strip_prefix(f.name)
                .is_some_and(|suffix| f.kind.suffixes(Format::Prometheus).contains(&suffix))
        };
        if let Some(i) = self.current.filter(|&i| fits(&self.page.families[i])) {
            return i;
        }
        if let Some(&i) = self.by_name.get(name) {
            self.current = Some(i);
            return i;
        }
        for suffix in ["_bucket", "_count", "_sum", "_created"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if let Some(&i) = self.by_name.get(base) {
                    if fits(&self.page.families[i]) {
                        self.current = Some(i);
                        return i;
                    }
                }
            }
        }
        let i = self.new_family(name, Kind::Unknown);
        self.current = Some(i);
        i
    }

    /// The family an OpenMetrics sample belongs to: the current one, or a new one.
    fn family_for_om(&mut self, name: &'a str) -> Result<usize, ParseError> {
        if let Some(i) = self.current {
            let f = &self.page.families[i];
            if name
                .strip_prefix(f.name)
                .is_some_and(|s| f.kind.suffixes(Format::OpenMetrics).contains(&s))
            {
                return Ok(i);
            }
        }
        self.enter_family_om(name)
    }

    fn sample(&mut self, line: &'a str) -> Result<(), ParseError> {
        let ln = self.line;
        let strict = self.om();
        let b = line.as_bytes();
        let mut pos = 0;
        while pos < b.len() && is_name_char(b[pos]) {
            pos += 1;
        }
        let name = &line[..pos];
        if name.is_empty() || !is_name_start(b[0]) {
            return err(
                ln,
                format!(
                    "expected a metric name, found `{}`",
                    line.chars().take(40).collect::<String>()
                ),
            );
        }
        let labels_start = self.page.labels.len();
        if b.get(pos) == Some(&b'{') {
            parse_labels(line, &mut pos, strict, &mut self.page.labels, ln)?;
        }
        let labels = labels_start as u32..self.page.labels.len() as u32;

        // Value, then an optional timestamp and (OpenMetrics) an exemplar.
        let rest = &line[pos..];
        let mut fields = [""; 2];
        let mut n = 0;
        let mut exemplar_text = None;
        if strict {
            let body = match rest.find(" # ") {
                Some(i) => {
                    exemplar_text = Some(&rest[i + 3..]);
                    &rest[..i]
                }
                None => rest,
            };
            let Some(after) = body.strip_prefix(' ') else {
                return err(ln, format!("`{name}`: expected one space before the value"));
            };
            for f in after.split(' ') {
                if n == 2 || f.is_empty() {
                    return err(
                        ln,
                        format!(
                            "`{name}`: expected `value [timestamp]` separated by single spaces"
                        ),
                    );
                }
                fields[n] = f;
                n += 1;
            }
        } else {
            // Blank-separated fields up to an optional `#` comment.
            let rb = rest.as_bytes();
            let end = memchr::memchr(b'#', rb).unwrap_or(rb.len());
            if !matches!(rb.first(), Some(b' ' | b'\t')) {
                return err(
                    ln,
                    format!("`{name}`: expected whitespace before the value"),
                );
            }
            let mut i = 0;
            while i < end {
                while i < end && (rb[i] == b' ' || rb[i] == b'\t') {
                    i += 1;
                }
                if i == end {
                    break;
                }
                let start = i;
                while i < end && rb[i] != b' ' && rb[i] != b'\t' {
                    i += 1;
                }
                if n == 2 {
                    return err(ln, format!("`{name}`: unexpected text after the timestamp"));
                }
                fields[n] = &rest[start..i];
                n += 1;
            }
        }
        if n == 0 {
            return err(ln, format!("`{name}`: missing value"));
        }
        let value = parse_float(fields[0]).ok_or_else(|| ParseError {
            line: ln,
            message: format!("`{name}`: `{}` is not a number", fields[0]),
        })?;
        let timestamp = if n == 2 {
            Some(self.timestamp(fields[1], name)?)
        } else {
            None
        };
        let exemplar = match exemplar_text {
            Some(t) => Some(Box::new(parse_exemplar(t, ln)?)),
            None => None,
        };

        let fam = if strict {
            self.family_for_om(name)?
        } else {
            self.family_for_prom(name)
        };
        // A series repeated at the same nanosecond keeps its first sample, as OTLP (and the
        // reference parser) resolve time no finer.
        if let (Some(t), Some(last)) = (timestamp, self.page.families[fam].samples.last()) {
            let same_ns = last
                .timestamp
                .is_some_and(|lt| (lt * 1e9).floor() == (t * 1e9).floor());
            if same_ns
                && last.name == name
                && self.page.labels_of(last) == &self.page.labels[labels.start as usize..]
            {
                self.page.labels.truncate(labels.start as usize);
                return Ok(());
            }
        }
        self.page.families[fam].samples.push(Sample {
            name,
            labels,
            value,
            timestamp,
            exemplar,
            line: ln as u32,
        });
        Ok(())
    }

    fn timestamp(&self, text: &str, name: &str) -> Result<f64, ParseError> {
        let bad = || ParseError {
            line: self.line,
            message: format!("`{name}`: `{text}` is not a valid timestamp"),
        };
        if self.om() {
            parse_float(text).filter(|t| t.is_finite()).ok_or_else(bad)
        } else {
            text.parse::<i64>()
                .map(|ms| ms as f64 / 1000.0)
                .map_err(|_| bad())
        }
    }
}

fn parse_exemplar(text: &str, ln: usize) -> Result<Exemplar<'_>, ParseError> {
    if !text.starts_with('{') {
        return err(ln, "exemplar: expected `# {labels} value [timestamp]`");
    }
    let mut labels = Vec::new();
    let mut pos = 0;
    parse_labels(text, &mut pos, true, &mut labels, ln)?;
    let chars: usize = labels
        .iter()
        .map(|l| l.name.chars().count() + l.value.chars().count())
        .sum();
    if chars > 128 {
        return err(
            ln,
            format!("exemplar labels are {chars} characters long; at most 128 are allowed"),
        );
    }
    let Some(rest) = text[pos..].strip_prefix(' ') else {
        return err(ln, "exemplar: expected one space before its value");
    };
    let mut parts = rest.split(' ');
    let value = parts
        .next()
        .and_then(parse_float)
        .ok_or_else(|| ParseError {
            line: ln,
            message: "exemplar: invalid value".into(),
        })?;
    let timestamp = match parts.next() {
        Some(t) => Some(
            parse_float(t)
                .filter(|t| t.is_finite())
                .ok_or_else(|| ParseError {
                    line: ln,
                    message: format!("exemplar: `{t}` is not a valid timestamp"),
                })?,
        ),
        None => None,
    };
    if parts.next().is_some() {
        return err(ln, "exemplar: unexpected text after its timestamp");
    }
    Ok(Exemplar {
        labels,
        value,
        timestamp,
    })
}

/// Hash of a sample's labels, leaving out `skip` (`le`, `quantile`): the series it belongs to.
fn series_key(labels: &[Label<'_>], skip: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for l in labels.iter().filter(|l| l.name != skip) {
        l.name.hash(&mut h);
        l.value.hash(&mut h);
    }
    h.finish()
}

/// OpenMetrics rules that need a whole family: sample names and values by type, label sets
/// kept together, timestamps that never go back, histogram and summary structure.
fn validate_family(page: &Page<'_>, i: usize, line: usize) -> Result<(), ParseError> {
    let f = &page.families[i];
    let at = |s: &Sample<'_>| s.line as usize;
    let skip = match f.kind {
        Kind::Histogram | Kind::GaugeHistogram => "le",
        Kind::Summary => "quantile",
        _ => "",
    };
    // Series (by labels without `le`/`quantile`) must each be one contiguous run.
    let mut seen = HashSet::new();
    let mut prev_key = None;
    let mut prev: Option<&Sample<'_>> = None;
    for s in &f.samples {
        let labels = page.labels_of(s);
        let key = series_key(labels, skip);
        if prev_key != Some(key) {
            if !seen.insert(key) {
                return err(
                    at(s),
                    format!("`{}`: samples of one series must be together", s.name),
                );
            }
            prev_key = Some(key);
        }
        if let Some(p) = prev {
            if p.name == s.name && page.labels_of(p) == labels {
                match (p.timestamp, s.timestamp) {
                    (Some(a), Some(b)) if b >= a => {}
                    (Some(_), Some(_)) => {
                        return err(
                            at(s),
                            format!("`{}`: timestamps of a series must not go back", s.name),
                        )
                    }
                    _ => {
                        return err(
                            at(s),
                            format!(
                                "`{}`: a repeated series needs a timestamp on every sample",
                                s.name
                            ),
                        )
                    }
                }
            }
        }
        prev = Some(s);
        let suffix = f.suffix(s);
        if s.exemplar.is_some() {
            let allowed = match f.kind {
                Kind::Counter => suffix == "_total",
                Kind::Histogram | Kind::GaugeHistogram => suffix == "_bucket",
                _ => false,
            };
            if !allowed {
                return err(at(s), format!("`{}`: exemplars are allowed only on counter `_total` and histogram `_bucket` samples", s.name));
            }
        }
        let v = s.value;
        let must_count = |what: &str| -> Result<(), ParseError> {
            if v.is_nan() || v < 0.0 {
                return err(
                    at(s),
                    format!(
                        "`{}`: {what} must be a non-negative number, found {v}",
                        s.name
                    ),
                );
            }
            Ok(())
        };
        match f.kind {
            Kind::Counter if suffix == "_total" => must_count("a counter")?,
            Kind::Summary if suffix == "_count" || suffix == "_sum" => {
                must_count("a summary count or sum")?
            }
            Kind::Summary => {
                let q = labels
                    .iter()
                    .find(|l| l.name == "quantile")
                    .ok_or_else(|| ParseError {
                        line: at(s),
                        message: format!("`{}`: a summary sample needs a `quantile` label", s.name),
                    })?;
                let qv = parse_float(&q.value).filter(|q| (0.0..=1.0).contains(q));
                if qv.is_none() {
                    return err(
                        at(s),
                        format!(
                            "`{}`: quantile `{}` is not a number between 0 and 1",
                            s.name, q.value
                        ),
                    );
                }
                if v < 0.0 {
                    return err(
                        at(s),
                        format!(
                            "`{}`: a quantile value must not be negative, found {v}",
                            s.name
                        ),
                    );
                }
            }
            Kind::Info if v != 1.0 => {
                return err(
                    at(s),
                    format!("`{}`: an info sample's value must be 1", s.name),
                )
            }
            Kind::StateSet => {
                if v != 0.0 && v != 1.0 {
                    return err(
                        at(s),
                        format!("`{}`: a stateset sample's value must be 0 or 1", s.name),
                    );
                }
                if !labels.iter().any(|l| l.name == f.name) {
                    return err(
                        at(s),
                        format!("`{}`: a stateset sample needs a `{}` label", s.name, f.name),
                    );
                }
            }
            _ => {}
        }
    }
    if matches!(f.kind, Kind::Histogram | Kind::GaugeHistogram) {
        validate_histogram(page, f)?;
    }
    let _ = line;
    Ok(())
}

fn validate_histogram(page: &Page<'_>, f: &Family<'_>) -> Result<(), ParseError> {
    let gauge = f.kind == Kind::GaugeHistogram;
    let (count_suffix, sum_suffix) = if gauge {
        ("_gcount", "_gsum")
    } else {
        ("_count", "_sum")
    };
    // Samples of one series are contiguous (checked above), so walk runs of equal keys.
    let mut start = 0;
    while start < f.samples.len() {
        let key = series_key(page.labels_of(&f.samples[start]), "le");
        let end = f.samples[start..]
            .iter()
            .position(|s| series_key(page.labels_of(s), "le") != key)
            .map_or(f.samples.len(), |n| start + n);
        let run = &f.samples[start..end];
        let last = &run[run.len() - 1];
        let (mut prev_le, mut prev_v) = (f64::NEG_INFINITY, 0.0);
        let (mut inf, mut negative, mut count, mut sum) = (None, false, None, None);
        for s in run {
            let suffix = f.suffix(s);
            let ln = s.line as usize;
            if suffix == "_bucket" {
                let le = page
                    .labels_of(s)
                    .iter()
                    .find(|l| l.name == "le")
                    .ok_or_else(|| ParseError {
                        line: ln,
                        message: format!("`{}`: a bucket needs an `le` label", s.name),
                    })?;
                let bound = parse_float(&le.value)
                    .filter(|b| !b.is_nan())
                    .ok_or_else(|| ParseError {
                        line: ln,
                        message: format!("`{}`: `le` `{}` is not a number", s.name, le.value),
                    })?;
                if bound <= prev_le {
                    return err(ln, format!("`{}`: buckets must be sorted by `le`", s.name));
                }
                if s.value.is_nan() || s.value < 0.0 {
                    return err(
                        ln,
                        format!("`{}`: a bucket count must be a non-negative number", s.name),
                    );
                }
                if s.value < prev_v {
                    return err(ln, format!("`{}`: bucket counts must not decrease", s.name));
                }
                negative |= bound < 0.0;
                if le.value == "+Inf" {
                    inf = Some(s.value);
                }
                (prev_le, prev_v) = (bound, s.value);
            } else if suffix == count_suffix {
                if s.value.is_nan() || s.value < 0.0 {
                    return err(
                        ln,
                        format!("`{}`: a count must be a non-negative number", s.name),
                    );
                }
                count = Some(s.value);
            } else if suffix == sum_suffix {
                if s.value.is_nan() {
                    return err(ln, format!("`{}`: the sum must be a number", s.name));
                }
                sum = Some(s.value);
            }
        }
        let ln = last.line as usize;
        let Some(inf) = inf else {
            return err(
                ln,
                format!("`{}`: a histogram needs a bucket with le=\"+Inf\"", f.name),
            );
        };
        if count.is_some() != sum.is_some() {
            return err(
                ln,
                format!(
                    "`{}`: `{count_suffix}` and `{sum_suffix}` come together or not at all",
                    f.name
                ),
            );
        }
        if count.is_some_and(|c| c != inf) {
            return err(
                ln,
                format!("`{}`: `{count_suffix}` must equal the +Inf bucket", f.name),
            );
        }
        if let Some(sum) = sum {
            if !gauge && negative {
                return err(
                    ln,
                    format!(
                        "`{}`: a histogram with negative buckets cannot have `_sum`",
                        f.name
                    ),
                );
            }
            if sum < 0.0 && !negative {
                return err(
                    ln,
                    format!("`{}`: the sum is negative but no bucket is", f.name),
                );
            }
        }
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_page_with_colons_and_histograms() {
        let text =
            "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 12.0\n\n\
            # TYPE vllm:e2e_request_latency_seconds histogram\n\
            vllm:e2e_request_latency_seconds_bucket{le=\"1.0\",model_name=\"m\"} 3\n\
            vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 5\n\
            vllm:e2e_request_latency_seconds_sum{model_name=\"m\"} 4.5\n\
            vllm:e2e_request_latency_seconds_count{model_name=\"m\"} 5\n\
            other_total{a=\"x\\\"y\",} 7 1700000000000\n";
        let page = parse(text, Format::Prometheus).unwrap();
        assert_eq!(page.families.len(), 3);
        let g = &page.families[0];
        assert_eq!(
            (g.name, g.kind, g.help.as_deref()),
            ("vllm:num_requests_running", Kind::Gauge, Some("Running."))
        );
        assert_eq!(page.labels_of(&g.samples[0])[1].value, "m");
        let h = &page.families[1];
        assert_eq!((h.kind, h.samples.len()), (Kind::Histogram, 4));
        let o = &page.families[2];
        assert_eq!((o.name, o.kind), ("other_total", Kind::Unknown));
        assert_eq!(o.samples[0].timestamp, Some(1_700_000_000.0));
        assert_eq!(page.labels_of(&o.samples[0])[0].value, "x\"y");
    }

    #[test]
    fn openmetrics_needs_eof_and_rejects_with_line() {
        let e = parse("a 1\n", Format::OpenMetrics).unwrap_err();
        assert!(e.message.contains("# EOF"));
        let e = parse(
            "# TYPE a counter\na_total 1\na_total -1 # {} 1\n# EOF\n",
            Format::OpenMetrics,
        )
        .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let ok = parse(
            "# TYPE a counter\na_total 1 # {t=\"x\"} 0.5 123\n# EOF",
            Format::OpenMetrics,
        )
        .unwrap();
        let ex = ok.families[0].samples[0].exemplar.as_ref().unwrap();
        assert_eq!((ex.value, ex.timestamp), (0.5, Some(123.0)));
    }

    #[test]
    fn a_sample_with_too_many_labels_is_refused() {
        let labels = |n: usize| {
            (0..n)
                .map(|i| format!("a{i}=\"\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        let ok = format!("x{{{}}} 1\n", labels(MAX_LABELS));
        assert!(parse(&ok, Format::Prometheus).is_ok());
        // 200,000 labels on one line: refused at the 129th, not compared pairwise.
        let hostile = format!("x{{{}}} 1\n", labels(200_000));
        let e = parse(&hostile, Format::Prometheus).unwrap_err();
        assert!(e.to_string().contains("more than 128 labels"), "{e}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for page in [
            "<html><body>502</body></html>",
            "a{",
            "a{b=\"",
            "a{b=\"\\",
            "{",
            "a 1 2 3",
            "\u{0}",
            "a{b=\"c\"} x",
        ] {
            assert!(parse(page, Format::Prometheus).is_err(), "{page:?}");
            assert!(parse(page, Format::OpenMetrics).is_err(), "{page:?}");
        }
    }
}
