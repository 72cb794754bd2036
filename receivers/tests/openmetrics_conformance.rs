//! The OpenMetrics project's 211 parser conformance cases (tests/fixtures/openmetrics-parsers):
//! strict mode accepts the 44 good cases with the same samples as the reference parser
//! (prometheus_client, through tests/peers/prom_parse.py) and rejects the 167 bad ones with an
//! error naming the line; lenient 0.0.4 mode accepts only the bad cases listed here, each for
//! a stated reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use genai_collector_receivers::scrape::text::{parse, Format, Page};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cases() -> Vec<(String, String, bool)> {
    let dir = root().join("tests/fixtures/openmetrics-parsers");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_dir() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("test.json")).unwrap())
                .unwrap();
        let text =
            String::from_utf8_lossy(&std::fs::read(path.join("metrics")).unwrap()).into_owned();
        out.push((name, text, meta["shouldParse"].as_bool().unwrap()));
    }
    out.sort();
    out
}

/// The Python with the peers' requirements: $GENAI_PEERS_PYTHON, else the repo's .venv.
pub fn peers_python() -> PathBuf {
    if let Ok(p) = std::env::var("GENAI_PEERS_PYTHON") {
        return p.into();
    }
    let venv = root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "the reference parser needs Python with tests/peers/requirements.txt: run `scripts/test` (or `python3 -m venv .venv && .venv/bin/pip install -r tests/peers/requirements.txt`)"
    );
    venv
}

fn num(v: f64) -> Value {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        (if v > 0.0 { "+Inf" } else { "-Inf" }).into()
    } else {
        serde_json::json!(v)
    }
}

/// Our samples in the reference parser's JSON shape.
fn ours(page: &Page<'_>) -> Vec<Value> {
    let mut out = Vec::new();
    for f in &page.families {
        for s in &f.samples {
            let labels: serde_json::Map<String, Value> = page
                .labels_of(s)
                .iter()
                .map(|l| (l.name.to_owned(), Value::from(l.value.as_ref())))
                .collect();
            let exemplar = s.exemplar.as_ref().map(|e| {
                let labels: serde_json::Map<String, Value> =
                    e.labels.iter().map(|l| (l.name.to_owned(), Value::from(l.value.as_ref()))).collect();
                serde_json::json!({"labels": labels, "value": num(e.value), "timestamp": e.timestamp})
            });
            out.push(serde_json::json!({
                "family": f.name, "type": f.kind.as_str(), "unit": f.unit.unwrap_or(""),
                "name": s.name, "labels": labels, "value": num(s.value),
                "timestamp": s.timestamp, "exemplar": exemplar,
            }));
        }
    }
    out
}

fn close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || ((x - y).abs() <= 1e-9 * x.abs().max(y.abs()))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn strict_mode_matches_the_suite_and_the_reference_parser() {
    let python = peers_python();
    let script = root().join("tests/peers/prom_parse.py");
    let dir = root().join("tests/fixtures/openmetrics-parsers");
    let all = cases();
    assert_eq!(all.len(), 211);
    assert_eq!(all.iter().filter(|c| c.2).count(), 44);
    let mut failures = Vec::new();
    for (name, text, good) in &all {
        match (parse(text, Format::OpenMetrics), good) {
            (Ok(page), true) => {
                let out = Command::new(&python)
                    .arg(&script)
                    .arg(dir.join(name).join("metrics"))
                    .arg("--openmetrics")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{name}: reference parser failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let reference: Vec<Value> = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
                let mine = ours(&page);
                if mine.len() != reference.len()
                    || !mine.iter().zip(&reference).all(|(a, b)| close(a, b))
                {
                    failures.push(format!(
                        "{name}: samples differ\n ours: {mine:?}\n  ref: {reference:?}"
                    ));
                }
            }
            (Err(e), true) => failures.push(format!("{name}: rejected a good case: {e}")),
            (Ok(_), false) => failures.push(format!("{name}: accepted a bad case")),
            (Err(e), false) => {
                if e.line == 0 && name != "bad_no_eof" {
                    failures.push(format!("{name}: error names no line: {e}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Bad OpenMetrics cases that lenient 0.0.4 mode accepts, by the reason that is right for 0.0.4.
const LENIENT_ACCEPTS: &[(&str, &[&str])] = &[
    (
        "blank lines separate families in 0.0.4 pages",
        &[
            "bad_blank_line",
        ],
    ),
    (
        "0.0.4 has no family grouping rules: metadata may repeat, come late or clash, as Prometheus reads it",
        &[
            "bad_clashing_names_0",
            "bad_clashing_names_1",
            "bad_clashing_names_2",
            "bad_grouping_or_ordering_0",
            "bad_grouping_or_ordering_10",
            "bad_grouping_or_ordering_2",
            "bad_grouping_or_ordering_3",
            "bad_grouping_or_ordering_4",
            "bad_grouping_or_ordering_6",
            "bad_grouping_or_ordering_8",
            "bad_grouping_or_ordering_9",
            "bad_metadata_in_wrong_place_0",
            "bad_metadata_in_wrong_place_1",
            "bad_metadata_in_wrong_place_2",
            "bad_repeated_metadata_0",
            "bad_repeated_metadata_1",
            "bad_repeated_metadata_2",
            "bad_repeated_metadata_3",
        ],
    ),
    (
        "0.0.4 parsing does not check values or structure by type; the conversion to OTLP handles odd histograms, summaries and counters",
        &[
            "bad_counter_values_0",
            "bad_counter_values_1",
            "bad_counter_values_10",
            "bad_counter_values_11",
            "bad_counter_values_12",
            "bad_counter_values_13",
            "bad_counter_values_14",
            "bad_counter_values_15",
            "bad_counter_values_16",
            "bad_counter_values_17",
            "bad_counter_values_18",
            "bad_counter_values_19",
            "bad_counter_values_2",
            "bad_counter_values_3",
            "bad_counter_values_4",
            "bad_counter_values_5",
            "bad_counter_values_6",
            "bad_counter_values_7",
            "bad_counter_values_8",
            "bad_counter_values_9",
            "bad_histograms_0",
            "bad_histograms_1",
            "bad_histograms_10",
            "bad_histograms_11",
            "bad_histograms_12",
            "bad_histograms_13",
            "bad_histograms_14",
            "bad_histograms_2",
            "bad_histograms_3",
            "bad_histograms_4",
            "bad_histograms_5",
            "bad_histograms_6",
            "bad_histograms_7",
            "bad_histograms_8",
            "bad_histograms_9",
            "bad_info_and_stateset_values_0",
            "bad_info_and_stateset_values_1",
            "bad_missing_or_invalid_labels_for_a_type_0",
            "bad_missing_or_invalid_labels_for_a_type_1",
            "bad_missing_or_invalid_labels_for_a_type_2",
            "bad_missing_or_invalid_labels_for_a_type_3",
            "bad_missing_or_invalid_labels_for_a_type_4",
            "bad_missing_or_invalid_labels_for_a_type_5",
            "bad_missing_or_invalid_labels_for_a_type_6",
            "bad_missing_or_invalid_labels_for_a_type_7",
            "bad_stateset_info_values_0",
            "bad_stateset_info_values_1",
            "bad_stateset_info_values_2",
            "bad_stateset_info_values_3",
        ],
    ),
    (
        "0.0.4 has no exemplars: `#` after a sample's value starts a comment",
        &[
            "bad_exemplar_complex_chars",
            "bad_exemplar_timestamp_0",
            "bad_exemplar_timestamp_1",
            "bad_exemplar_timestamp_2",
            "bad_exemplars_0",
            "bad_exemplars_1",
            "bad_exemplars_10",
            "bad_exemplars_11",
            "bad_exemplars_2",
            "bad_exemplars_3",
            "bad_exemplars_4",
            "bad_exemplars_5",
            "bad_exemplars_6",
            "bad_exemplars_7",
            "bad_exemplars_8",
            "bad_exemplars_9",
            "bad_exemplars_on_unallowed_metric_types_0",
            "bad_exemplars_on_unallowed_metric_types_1",
            "bad_exemplars_on_unallowed_metric_types_2",
            "bad_exemplars_on_unallowed_samples_0",
            "bad_exemplars_on_unallowed_samples_1",
            "bad_exemplars_on_unallowed_samples_2",
            "bad_exemplars_on_unallowed_samples_3",
        ],
    ),
    (
        "a malformed or unknown `#` line is a comment in 0.0.4 (TYPE/HELP lines that do not parse are skipped; UNIT and gaugehistogram/info/stateset do not exist)",
        &[
            "bad_help_0",
            "bad_help_1",
            "bad_help_2",
            "bad_help_3",
            "bad_help_4",
            "bad_metadata",
            "bad_type_0",
            "bad_type_1",
            "bad_type_2",
            "bad_type_3",
            "bad_type_4",
            "bad_type_5",
            "bad_type_6",
            "bad_type_7",
            "bad_unit_0",
            "bad_unit_1",
            "bad_unit_2",
            "bad_unit_3",
            "bad_unit_4",
            "bad_unit_5",
            "bad_unit_6",
            "bad_unit_7",
        ],
    ),
    (
        "0.0.4 pages have no `# EOF`: it is a comment, and text after it is read",
        &[
            "bad_no_eof",
            "bad_text_after_eof_1",
        ],
    ),
    (
        "0.0.4 allows a trailing comma in a label set",
        &[
            "bad_missing_or_extra_commas_2",
        ],
    ),
    (
        "0.0.4 separates value and timestamp by any run of blanks, and allows trailing blanks",
        &[
            "bad_value_1",
            "bad_value_2",
            "bad_value_3",
        ],
    ),
];

#[test]
fn lenient_mode_accepts_only_listed_bad_cases() {
    let accepted: Vec<String> = cases()
        .into_iter()
        .filter(|(_, text, good)| !good && parse(text, Format::Prometheus).is_ok())
        .map(|(name, ..)| name)
        .collect();
    let mut listed: Vec<String> = LENIENT_ACCEPTS
        .iter()
        .flat_map(|(_, names)| names.iter().map(|n| n.to_string()))
        .collect();
    listed.sort();
    assert_eq!(
        accepted, listed,
        "bad cases lenient mode accepts must be listed with a reason"
    );
}

/// Every engine page in tests/fixtures reads in 0.0.4 mode with the same samples (names,
/// labels, values) as the reference parser's 0.0.4 mode.
#[test]
fn engine_pages_match_the_reference_parser() {
    let python = peers_python();
    let script = root().join("tests/peers/prom_parse.py");
    let pages = [
        "vllm/v1-composed.prom",
        "vllm/v0-composed.prom",
        "vllm/datadog-integrations-core-vllm_metrics.txt",
        "tgi/composed.prom",
        "tgi/datadog-payload-head-partial.prom",
        "llamacpp/real-server-0c1e570-tiny-random.prom",
    ];
    for rel in pages {
        let path = root().join("tests/fixtures").join(rel);
        let text = std::fs::read_to_string(&path).unwrap();
        let page = parse(&text, Format::Prometheus).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let out = Command::new(&python)
            .arg(&script)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{rel}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // prometheus_client's 0.0.4 parser appends `_total` to counter samples that lack it
        // (TGI's `tgi_request_failure`); Prometheus keeps the name as served, and so do we.
        let pick = |v: &Value| {
            let name = v["name"].as_str().unwrap();
            serde_json::json!({"name": name.strip_suffix("_total").unwrap_or(name), "labels": v["labels"], "value": v["value"]})
        };
        let mut reference: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| pick(&serde_json::from_str(l).unwrap()))
            .collect();
        let mut mine: Vec<Value> = ours(&page).iter().map(pick).collect();
        let key = |v: &Value| v.to_string();
        reference.sort_by_key(key);
        mine.sort_by_key(key);
        assert!(!mine.is_empty(), "{rel}: no samples");
        assert_eq!(mine.len(), reference.len(), "{rel}: sample count");
        for (a, b) in mine.iter().zip(&reference) {
            assert!(close(a, b), "{rel}: {a} != {b}");
        }
    }
}
