//! Runs the project's scenario corpus (`tests/scenarios`, with the seed
//! documents' examples in `tests/scenarios/seeds`) in-process on every
//! `cargo test`. A missing corpus fails the test: it is never skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::path::PathBuf;

use tagward::scenario::{self, InProcess};

fn run_corpus(dir: PathBuf, at_least: usize) {
    assert!(dir.is_dir(), "scenario corpus {} is missing", dir.display());
    let files = scenario::collect(std::slice::from_ref(&dir)).unwrap_or_else(|e| panic!("{e}"));
    let (mut passed, mut failures) = (0, Vec::new());
    for file in files {
        let loaded = scenario::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let report = scenario::run(&loaded, &mut InProcess::default());
        passed += report.passed;
        failures.extend(report.failures);
    }
    assert!(failures.is_empty(), "{} failing steps:\n{}", failures.len(), failures.join("\n"));
    assert!(passed >= at_least, "{}: only {passed} steps ran, expected at least {at_least}", dir.display());
    println!("{}: {passed} passed", dir.display());
}

#[test]
fn seed_examples_pass() {
    run_corpus(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/seeds"), 82);
}

#[test]
fn project_corpus_passes() {
    run_corpus(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios"), 200);
}
