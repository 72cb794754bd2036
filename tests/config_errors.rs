//! Every broken config under tests/configs/bad gives one clear error with file:line:col and exit
//! status 2 (or, for `expect-warning`, a warning and status 0); none panics.
//!
//! Each file starts with `# expect: <text the message must contain>` (or `# expect-warning:`)
//! and `# at: LINE:COL` (`LINE:` when only the line is certain, `none` for whole-file errors).

use std::path::Path;
use std::process::Command;

fn validate(path: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_genai-collector"))
        .args(["validate", "-c"])
        .arg(path)
        .env_remove("GENAI_TEST_SURELY_UNSET")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn header<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
}

#[test]
fn every_bad_config_is_reported_with_its_position() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs/bad");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 15,
        "at least 15 broken configs, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let (warning, expect) = match (header(&text, "expect"), header(&text, "expect-warning")) {
            (Some(e), None) => (false, e),
            (None, Some(e)) => (true, e),
            _ => panic!(
                "{}: needs one `# expect:` or `# expect-warning:` line",
                path.display()
            ),
        };
        let at = header(&text, "at").unwrap_or_else(|| panic!("{}: needs `# at:`", path.display()));
        let (code, _stdout, stderr) = validate(path);
        let shown = path.display().to_string();
        let location = match at {
            "none" => format!("{shown}: "),
            at => format!("{shown}:{at}"),
        };
        let kind = if warning { "warning: " } else { "error: " };
        let problems: Vec<String> = [
            (code != Some(if warning { 0 } else { 2 })).then(|| format!("exit status {code:?}")),
            (!stderr.contains(&format!("{kind}{location}")))
                .then(|| format!("no `{kind}{location}`")),
            (!stderr.contains(expect)).then(|| format!("no `{expect}`")),
            stderr.contains("panicked").then(|| "panicked".to_string()),
            (at != "none" && !stderr.contains(" | ")).then(|| "no source snippet".to_string()),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n--- stderr:\n{stderr}",
                path.display(),
                problems.join("; ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn good_configs_and_the_example_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("config.example.yaml")];
    for e in std::fs::read_dir(root.join("tests/configs/good")).unwrap() {
        files.push(e.unwrap().path());
    }
    for path in files {
        let (code, stdout, stderr) = validate(&path);
        assert_eq!(code, Some(0), "{}: {stderr}", path.display());
        assert!(stdout.starts_with("config is valid"), "{stdout}");
        assert!(!stderr.contains("warning"), "{}: {stderr}", path.display());
    }
}

#[test]
fn embedded_default_validates_and_components_are_listed() {
    let bin = env!("CARGO_BIN_EXE_genai-collector");
    let out = Command::new(bin).arg("validate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin).arg("components").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("receiver   internal")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("exporter   debug")),
        "{text}"
    );
}

#[test]
fn a_missing_file_is_a_config_error() {
    let (code, _, stderr) = validate(Path::new("/nonexistent/collector.yaml"));
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("/nonexistent/collector.yaml: cannot read the config file"),
        "{stderr}"
    );
}
