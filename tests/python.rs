//! The wire contract from another ecosystem: the Python grpcio client in
//! `clients/python/` (code generated from the same .proto) runs its test
//! against the real `tagward` binary. `clients/python/run.sh` creates its own
//! virtualenv and installs what it needs, so `cargo test` needs only Python 3
//! on the machine; without it this test fails rather than skips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::path::PathBuf;
use std::process::Command;

#[test]
fn python_client_passes_the_wire_contract() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("clients/python/run.sh"))
        .arg(env!("CARGO_BIN_EXE_tagward"))
        .output()
        .expect("bash runs clients/python/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the Python wire test failed ({}):\n{stdout}\n{stderr}", out.status);
    let last = stdout.lines().last().unwrap_or_default();
    let passed: usize = last
        .strip_suffix(" passed, 0 failed")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected closing line {last:?}:\n{stdout}"));
    assert!(passed >= 20, "only {passed} Python checks ran:\n{stdout}");
}
