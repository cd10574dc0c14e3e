//! `tagward serve` as an operator runs it: the real binary as a child
//! process on loopback ports it picks (tests/common/process.rs), driven over gRPC and by `tagward test
//! --server`, stopped with SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tagward::grpc::proto;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread")]
async fn serve_runs_the_scenarios_and_stops_cleanly_on_sigterm() {
    let scratch = Scratch::new("process");
    let data_dir = scratch.join("data").to_string_lossy().into_owned();
    let mut server = Serve::new()
        .for_scenarios()
        .args(["--data-dir", &data_dir, "--world", "deploy/world/example.json", "--shutdown-grace-secs", "10"])
        .start(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("tagward serve did not become SERVING: {e}"));
    let (data, admin_addr) = (server.data().to_string(), server.admin_addr().to_string());
    for service in ["tagward.v1.Authorizer", "tagward.v1.Tagging"] {
        let mut health = HealthClient::new(channel(&data).await);
        assert_eq!(health_check(&mut health, service).await.unwrap(), SERVING, "{service}");
    }

    // The example world is loaded.
    let mut authz = AuthorizerClient::new(channel(&data).await);
    let example_key = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let r = authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", example_key)).await.unwrap().into_inner();
    assert!(allowed(&r), "{r:?}");

    // The whole scenario corpus through the sidecar's gRPC API.
    let (d, a) = (data.clone(), admin_addr.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["test", "--server", &d, "--admin", &a, "tests/scenarios"])
            .current_dir(manifest_dir())
            .env_remove("TAGWARD_ADMIN_TOKEN")
            .output()
            .expect("run tagward test")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "tagward test --server failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    let re = regex::Regex::new(r"^(\d+) passed, 0 failed$").unwrap();
    let passed: usize = re.captures(last).unwrap_or_else(|| panic!("last line {last:?}\n{stdout}"))[1].parse().unwrap();
    assert!(passed >= 504, "only {passed} steps ran:\n{stdout}");

    // SIGTERM with a Watch stream open and an Authorize loop running.
    let mut admin = AdminClient::new(channel(&admin_addr).await);
    let mut watch = admin.watch(proto::WatchRequest { from_revision: 0 }).await.unwrap().into_inner();
    let answered = Arc::new(AtomicUsize::new(0));
    let signalled = Arc::new(AtomicBool::new(false));
    let looping = {
        let (answered, signalled) = (answered.clone(), signalled.clone());
        let mut authz = authz.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(25);
            while Instant::now() < deadline {
                match authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", example_key)).await {
                    Ok(_) => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if signalled.load(Ordering::Acquire) => return Ok(e),
                    Err(e) => return Err(format!("Authorize failed before SIGTERM: {e:?}")),
                }
            }
            Err("the Authorize loop never stopped".to_string())
        })
    };
    let spin = Instant::now();
    while answered.load(Ordering::Relaxed) < 20 {
        assert!(spin.elapsed() < Duration::from_secs(10), "the Authorize loop makes no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    signalled.store(true, Ordering::Release);
    server.signal("-TERM");
    let stopping = Instant::now();
    let status = tokio::task::block_in_place(|| server.wait_for_exit(Duration::from_secs(15)));
    let status = status.unwrap_or_else(|| panic!("tagward serve still running 15 s after SIGTERM"));
    let took = stopping.elapsed();
    let stderr = server.stderr();
    assert!(status.success(), "exit status {status} after SIGTERM; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "a panic:\n{stderr}");

    let ended = timeout(Duration::from_secs(5), watch.message()).await.expect("the watch stream ends");
    assert!(!matches!(ended, Ok(Some(_))), "no event was due: {ended:?}");
    let stopped_with = timeout(Duration::from_secs(5), looping).await.expect("the Authorize loop ends").unwrap();
    let status = stopped_with.unwrap_or_else(|e| panic!("{e}"));
    assert!(answered.load(Ordering::Relaxed) >= 20, "{status:?}");
    eprintln!(
        "stopped {took:?} after SIGTERM; watch ended with {ended:?}; {} answers, then {status:?}",
        answered.load(Ordering::Relaxed)
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_beyond_loopback_without_a_token_exits_2() {
    let admin = "0.0.0.0:0";
    let mut server = Serve::new().admin_listen(admin).args(["--ephemeral", "--world", "deploy/world/example.json"]).spawn();
    let status = tokio::task::block_in_place(|| server.wait_for_exit(Duration::from_secs(10)))
        .unwrap_or_else(|| panic!("tagward serve started with an admin listener on {admin} and no token"));
    let stderr = server.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("admin token"), "the message says what is missing:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_serving_line_is_read_in_both_formats() {
    let plain = "2026-01-01T00:00:00Z  INFO tagward::grpc::server: serving data_addr=127.0.0.1:4001 admin_addr=127.0.0.1:4002 token=false\n";
    let json = r#"{"level":"INFO","fields":{"message":"serving","data_addr":"127.0.0.1:4001","admin_addr":"127.0.0.1:4002","token":false}}"#;
    let want = Some(("127.0.0.1:4001".parse().unwrap(), "127.0.0.1:4002".parse().unwrap()));
    assert_eq!(common::process::serving_addrs(plain), want);
    assert_eq!(common::process::serving_addrs(json), want);
    assert_eq!(common::process::serving_addrs("INFO tagward: state ready"), None);
}
