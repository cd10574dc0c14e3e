//! Architecture invariants that the compiler alone does not hold
//! (ARCHITECTURE.md, "Architecture invariants"):
//! - no transport in the domain: only the root package's `src/grpc*` and
//!   `src/main.rs` (and the bench crate) may use tonic or prost;
//! - `tagward-core` depends, even transitively, on no async runtime,
//!   transport, logging or metrics crate (read from `Cargo.lock`);
//! - no import circles between the modules of any crate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The library sources of each crate: (crate name, its `src`).
fn crates() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("tagward", root().join("src")),
        ("tagward-core", root().join("crates/tagward-core/src")),
        ("tagward-store", root().join("crates/tagward-store/src")),
        ("tagward-bench", root().join("crates/tagward-bench/src")),
    ]
}

/// The code of a line, without its `//` comment.
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or_default()
}

#[test]
fn the_domain_layers_do_not_know_the_transport() {
    let mut offenders = Vec::new();
    let mut seen = 0;
    for (name, src) in crates() {
        if name == "tagward-bench" {
            continue;
        }
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        seen += files.len();
        for file in files {
            let rel = file.strip_prefix(&src).expect("under src").to_string_lossy().into_owned();
            if name == "tagward" && (rel == "main.rs" || rel == "grpc.rs" || rel.starts_with("grpc/")) {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("read");
            for (n, line) in text.lines().enumerate() {
                if code(line).contains("tonic") || code(line).contains("prost") {
                    offenders.push(format!("{name}/{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(seen > 15, "found only {seen} files");
    assert!(offenders.is_empty(), "transport in the domain layers:\n{}", offenders.join("\n"));
}

/// Every package `from` depends on, transitively, by name (from Cargo.lock).
fn closure(from: &str) -> BTreeSet<String> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).expect("read Cargo.lock");
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let name = block
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("a package name")
            .to_string();
        let mut list = Vec::new();
        if let Some(start) = block.find("dependencies = [") {
            for l in block[start..].lines().skip(1) {
                if l.starts_with(']') {
                    break;
                }
                let dep = l.trim().trim_matches(|c| c == '"' || c == ',');
                list.push(dep.split(' ').next().unwrap_or_default().to_string());
            }
        }
        deps.entry(name).or_default().extend(list);
    }
    let mut out = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(p) = todo.pop() {
        for d in deps.get(&p).into_iter().flatten() {
            if out.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    out
}

#[test]
fn the_core_crate_has_no_runtime_transport_logging_or_metrics() {
    let deps = closure("tagward-core");
    assert!(deps.contains("serde_json"), "the closure was not read: {deps:?}");
    for banned in ["tokio", "tonic", "prost", "tracing", "metrics", "tagward-store", "tagward"] {
        assert!(!deps.contains(banned), "tagward-core depends on {banned}: {deps:?}");
    }
    let store = closure("tagward-store");
    for banned in ["tonic", "prost", "tagward"] {
        assert!(!store.contains(banned), "tagward-store depends on {banned}");
    }
}

/// The top-level module a file belongs to (`policy/condition.rs` is
/// `policy`), `None` for the crate root.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

#[test]
fn no_crate_has_an_import_circle_between_its_modules() {
    for (name, src) in crates() {
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let Some(from) = module_of(&src, file) else { continue };
            let text = std::fs::read_to_string(file).expect("read");
            // Test modules may reach anywhere; the circles that matter are
            // in the code that ships.
            let shipped = text.split("#[cfg(test)]").next().unwrap_or_default();
            for line in shipped.lines() {
                let line = code(line);
                let mut rest = line;
                while let Some(i) = rest.find("crate::") {
                    rest = &rest[i + "crate::".len()..];
                    let target: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if modules.contains(&target) && target != from {
                        edges.entry(from.clone()).or_default().insert(target);
                    }
                }
            }
        }
        // Depth-first search for a back edge.
        fn visit(
            m: &str,
            edges: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(i) = path.iter().position(|p| p == m) {
                let mut cycle = path[i..].to_vec();
                cycle.push(m.to_string());
                return Some(cycle);
            }
            if done.contains(m) {
                return None;
            }
            path.push(m.to_string());
            for next in edges.get(m).into_iter().flatten() {
                if let Some(c) = visit(next, edges, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(m.to_string());
            None
        }
        let mut done = BTreeSet::new();
        for m in &modules {
            if let Some(cycle) = visit(m, &edges, &mut Vec::new(), &mut done) {
                panic!("{name}: an import circle: {}", cycle.join(" -> "));
            }
        }
    }
}
