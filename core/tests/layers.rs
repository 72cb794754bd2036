//! The core's modules depend on each other one way: no module reaches, through `crate::`
//! paths, a module that reaches it back. The config's leaf helpers (`config::duration`, `size`,
//! `node`, `env`) count as modules of their own, since they use nothing of the crate. Reading
//! order, from the bottom: `model`, `id`, `tls` → `disk_queue`, `memory` → `telemetry` →
//! `delivery` → `component` → `registry` → `config` → `runtime`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a file belongs to, and what `crate::` path names one.
fn module_of(rel: &str) -> String {
    const LEAVES: [&str; 5] = ["duration", "size", "node", "env", "exporter"];
    let parts: Vec<&str> = rel.trim_end_matches(".rs").split('/').collect();
    match parts.as_slice() {
        ["config", leaf] if LEAVES.contains(leaf) => format!("config::{leaf}"),
        [top, ..] => (*top).to_owned(),
        [] => String::new(),
    }
}

#[test]
fn no_module_of_the_core_depends_on_one_that_depends_on_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in all {
        let rel = path.strip_prefix(&src).unwrap().display().to_string();
        let module = module_of(&rel);
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let entry = deps.entry(module.clone()).or_default();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let path: String = line[i + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let mut segs = path.split("::");
                let top = segs.next().unwrap_or("");
                let target = match (top, segs.next()) {
                    ("config", Some(leaf)) => {
                        let m = module_of(&format!("config/{leaf}.rs"));
                        if m.contains("::") {
                            m
                        } else {
                            "config".to_owned()
                        }
                    }
                    _ => top.to_owned(),
                };
                if !target.is_empty() && target != module {
                    entry.insert(target);
                }
            }
        }
    }
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(m) = stack.pop() {
            for d in deps.get(&m).into_iter().flatten() {
                if d == to {
                    return true;
                }
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        false
    };
    let cycles: Vec<(String, String)> = deps
        .iter()
        .flat_map(|(m, ds)| ds.iter().map(move |d| (m.clone(), d.clone())))
        .filter(|(m, d)| deps.contains_key(d) && reaches(d, m))
        .collect();
    assert!(
        cycles.is_empty(),
        "modules that depend on each other: {cycles:?}\n{deps:#?}"
    );
    assert!(
        deps["runtime"].contains("component"),
        "the analysis sees dependencies: {deps:#?}"
    );
}
