//! The components reference in docs/ against the factories the binary registers: every
//! receiver and exporter has its row in the Components table of docs/configuration.md, every
//! processor its section, and no row names a kind the binary lacks.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn doc(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(name),
    )
    .unwrap()
}

#[test]
fn every_registered_kind_is_documented_and_every_documented_kind_exists() {
    let out = Command::new(env!("CARGO_BIN_EXE_genai-collector"))
        .arg("components")
        .output()
        .unwrap();
    let listed = String::from_utf8(out.stdout).unwrap();
    let registered: BTreeSet<(String, String)> = listed
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect();
    assert!(registered.len() >= 15, "{listed}");

    let configuration = doc("configuration.md");
    let metrics = doc("metrics.md");
    // `| receiver | `vllm` | ...` rows of the Components table.
    let rows: BTreeSet<(String, String)> = configuration
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let kind = *cells.get(1)?;
            let name = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
            ["receiver", "exporter"]
                .contains(&kind)
                .then(|| (kind.to_owned(), name.to_owned()))
        })
        .collect();
    for (kind, name) in &registered {
        let documented = match kind.as_str() {
            "processor" => configuration
                .lines()
                .chain(metrics.lines())
                .any(|l| l.starts_with("## ") && l.contains(&format!("`{name}`"))),
            _ => rows.contains(&(kind.clone(), name.clone())),
        };
        assert!(
            documented,
            "{kind} `{name}` is registered but not documented in docs/"
        );
    }
    for row in &rows {
        assert!(
            registered.contains(row),
            "docs/configuration.md documents {row:?}, which the binary lacks"
        );
    }
}

#[test]
fn the_readmes_first_pipeline_is_valid() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("```yaml\n# pipeline.yaml")
        .expect("the README's first pipeline")
        + 8;
    let yaml = &readme[start..start + readme[start..].find("```").unwrap()];
    let file = std::env::temp_dir().join(format!("readme-pipeline-{}.yaml", std::process::id()));
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_genai-collector"))
        .args(["validate", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
