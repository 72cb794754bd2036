//! The core's public surface, which third-party receiver crates build on, against the snapshot
//! in `core/public-api.txt`: a change to it fails here until the snapshot is updated on purpose
//! (`GENAI_BLESS=1 cargo test -p genai-collector-core --test public_api`), so it shows up in
//! review. A line per `pub` item declaration (not `pub(crate)`), by file, in source order;
//! test modules are left out.

use std::path::Path;

fn declarations(dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for path in entries {
        if path.is_dir() {
            declarations(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // What follows `#[cfg(test)]` is the file's tests.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let file = path.strip_prefix(root).unwrap().display().to_string();
        for line in code.lines() {
            let t = line.trim_start();
            let item = [
                "pub fn ",
                "pub async fn ",
                "pub const fn ",
                "pub struct ",
                "pub enum ",
                "pub trait ",
                "pub mod ",
                "pub type ",
                "pub const ",
                "pub static ",
                "pub use ",
            ]
            .iter()
            .any(|k| t.starts_with(k));
            if item {
                let decl = t.split(['{', '=']).next().unwrap().trim_end();
                out.push(format!("{file}: {decl}"));
            }
        }
    }
}

#[test]
fn the_public_api_is_the_snapshot() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut now = Vec::new();
    declarations(&root.join("src"), &mut now);
    let now = now.join("\n") + "\n";
    let snapshot = root.join("public-api.txt");
    if std::env::var_os("GENAI_BLESS").is_some() {
        std::fs::write(&snapshot, &now).unwrap();
        return;
    }
    let before = std::fs::read_to_string(&snapshot).unwrap_or_default();
    if before != now {
        let old: std::collections::BTreeSet<&str> = before.lines().collect();
        let new: std::collections::BTreeSet<&str> = now.lines().collect();
        let added: Vec<&&str> = new.difference(&old).collect();
        let removed: Vec<&&str> = old.difference(&new).collect();
        panic!(
            "the core's public API changed (bless with GENAI_BLESS=1 once intended):\nadded: {added:#?}\nremoved: {removed:#?}"
        );
    }
}
