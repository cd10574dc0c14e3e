//! `tagward serve` as an operator runs it: the real binary as a child
//! process on free loopback ports, driven over gRPC and by `tagward test
//! --server`, stopped with SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tagward::grpc::proto;
use tokio::time::timeout;

const BIN: &str = env!("CARGO_BIN_EXE_tagward");

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A `tagward` child process with its stderr collected; killed if a test
/// fails before it exits.
struct Tagward {
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Tagward {
    fn spawn(args: &[&str]) -> Tagward {
        let mut cmd = Command::new(BIN);
        cmd.args(args).current_dir(manifest_dir()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        for var in [
            "TAGWARD_LISTEN",
            "TAGWARD_ADMIN_LISTEN",
            "TAGWARD_ADMIN_TOKEN",
            "TAGWARD_ADMIN_TOKEN_FILE",
            "TAGWARD_WORLD",
            "TAGWARD_LOG_FORMAT",
            "TAGWARD_SHUTDOWN_GRACE_SECS",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("TAGWARD_LOG", "info");
        let (child, stderr) = spawn_collecting_stderr(&mut cmd);
        Tagward { child, stderr: Some(stderr) }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, at most `limit`.
    fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_for_exit(&mut self.child, limit)
    }

    /// Everything the process wrote to stderr (after it has exited).
    fn stderr(&mut self) -> String {
        self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for Tagward {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until the data plane answers health checks with SERVING.
async fn wait_serving(addr: &str, server: &mut Tagward) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!("tagward serve exited early with {status}: {}", server.stderr());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_millis(500));
        if let Ok(ch) = endpoint.connect().await {
            if let Ok(SERVING) = health_check(&mut HealthClient::new(ch), "").await {
                return;
            }
        }
        assert!(Instant::now() < deadline, "tagward serve did not become SERVING on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_runs_the_scenarios_and_stops_cleanly_on_sigterm() {
    let (data, admin_addr) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let data_dir = std::env::temp_dir().join(format!("tagward-process-{}-{}", std::process::id(), free_port()));
    let data_dir = data_dir.to_string_lossy().into_owned();
    let mut server = Tagward::spawn(&[
        "serve",
        "--data-dir",
        &data_dir,
        "--listen",
        &data,
        "--admin-listen",
        &admin_addr,
        "--world",
        "deploy/world/example.json",
        "--shutdown-grace-secs",
        "10",
    ]);
    wait_serving(&data, &mut server).await;
    for service in ["tagward.v1.Authorizer", "tagward.v1.Tagging"] {
        let mut health = HealthClient::new(channel(data.parse().unwrap()).await);
        assert_eq!(health_check(&mut health, service).await.unwrap(), SERVING, "{service}");
    }

    // The example world is loaded.
    let mut authz = AuthorizerClient::new(channel(data.parse().unwrap()).await);
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
    let mut admin = AdminClient::new(channel(admin_addr.parse().unwrap()).await);
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
    let pid = server.pid().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(kill.success());
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
    let data = format!("127.0.0.1:{}", free_port());
    let admin = format!("0.0.0.0:{}", free_port());
    let mut server = Tagward::spawn(&[
        "serve",
        "--ephemeral",
        "--listen",
        &data,
        "--admin-listen",
        &admin,
        "--world",
        "deploy/world/example.json",
    ]);
    let status = tokio::task::block_in_place(|| server.wait_for_exit(Duration::from_secs(10)))
        .unwrap_or_else(|| panic!("tagward serve started with an admin listener on {admin} and no token"));
    let stderr = server.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("admin token"), "the message says what is missing:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
