//! `tagward-bench fleet`: fleet mode measured end to end on loopback. It
//! starts its own etcd and three `tagward serve --store etcd://...`
//! processes, then measures
//!
//! - visibility: for each change, the time from TagResource's
//!   acknowledgement by one sidecar to the first Authorize on each of the
//!   other two that answers at that revision or later (they are asked in a
//!   tight loop, concurrently), p50/p99/max;
//! - write throughput: `--writers` concurrent writers, each retagging a key
//!   of its own, through one sidecar and then spread over the three.
//!
//! Figures are printed; nothing is asserted (BENCHMARKS.md records them).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tonic::transport::Channel;

use tagward::grpc::etcd::{Etcd, EtcdUrl};
use tagward::grpc::proto;
use tagward::grpc::proto::authorizer_client::AuthorizerClient;
use tagward::grpc::proto::tagging_client::TaggingClient;

/// What to run.
pub struct FleetBench {
    pub tagward: PathBuf,
    pub etcd: String,
    pub changes: usize,
    pub writers: usize,
    pub writes: usize,
    /// Where etcd keeps its data (default: a temporary directory); a tmpfs
    /// such as /dev/shm takes the disk's fsync out of the figures.
    pub etcd_dir: Option<PathBuf>,
}

const ADMIN: &str = "arn:aws:iam::111122223333:role/BenchTagger";
const READER: &str = "arn:aws:iam::111122223333:role/BenchReader";

fn key(i: usize) -> String {
    format!("arn:aws:kms:us-east-1:111122223333:key/bench-{i:04}")
}

fn world(keys: usize) -> serde_json::Value {
    let resources: Vec<serde_json::Value> =
        (0..keys).map(|i| serde_json::json!({"arn": key(i), "tags": {"Project": "start"}})).collect();
    serde_json::json!({
        "policies": {
            "Tagger": {"Statement": {"Effect": "Allow", "Action": "kms:TagResource", "Resource": "*"}},
            "Reader": {"Statement": {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*",
                "Condition": {"StringEquals": {"aws:ResourceTag/Project": "start"}}}}
        },
        "principals": [{"arn": ADMIN, "policies": ["Tagger"]}, {"arn": READER, "policies": ["Reader"]}],
        "resources": resources
    })
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Children killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `tagward serve` and reads its data address from the `serving` line.
fn sidecar(bin: &Path, url: &str, world: &Path, procs: &mut Procs) -> Result<String, String> {
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--store", url, "--world"])
        .arg(world)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    procs.0.push(child);
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(rest) = line.split("data_addr=").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or_default().to_string();
            // Keep draining stderr so the process never blocks on it.
            std::thread::spawn(move || for _ in lines {});
            return Ok(addr);
        }
    }
    Err("tagward serve exited before serving".into())
}

async fn channel(addr: &str) -> Result<Channel, String> {
    Channel::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?.connect().await.map_err(|e| format!("{addr}: {e}"))
}

fn retag(i: usize, value: &str) -> proto::TagResourceRequest {
    proto::TagResourceRequest {
        principal: ADMIN.into(),
        resource: key(i),
        tags: vec![proto::Tag { key: "Project".into(), value: value.into() }],
        ..Default::default()
    }
}

/// Asks `authz` until it answers at `revision` or later; how long that took.
async fn until_visible(mut authz: AuthorizerClient<Channel>, revision: u64, since: Instant) -> Result<Duration, String> {
    let req = proto::AuthorizeRequest {
        principal: READER.into(),
        action: "kms:Decrypt".into(),
        resource: key(0),
        ..Default::default()
    };
    loop {
        let r = authz.authorize(req.clone()).await.map_err(|e| e.to_string())?.into_inner();
        if r.revision >= revision {
            return Ok(since.elapsed());
        }
    }
}

fn micros(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Runs the benchmark and prints its figures.
pub async fn run(bench: &FleetBench) -> Result<(), String> {
    let scratch = std::env::temp_dir().join(format!("tagward-bench-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let result = run_in(bench, &scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    if let Some(d) = &bench.etcd_dir {
        let _ = std::fs::remove_dir_all(d.join(format!("tagward-bench-etcd-{}", std::process::id())));
    }
    result
}

async fn run_in(bench: &FleetBench, scratch: &Path) -> Result<(), String> {
    let mut procs = Procs(Vec::new());
    let (client, peer) = (free_port()?, free_port()?);
    let (client_url, peer_url) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
    let etcd = Command::new(&bench.etcd)
        .args(["--name", "bench", "--data-dir"])
        .arg(
            bench
                .etcd_dir
                .as_ref()
                .map_or_else(|| scratch.join("etcd"), |d| d.join(format!("tagward-bench-etcd-{}", std::process::id()))),
        )
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        // The seeding transaction puts every key at once.
        .args(["--max-txn-ops", "10000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {} (install it with deploy/install-etcd.sh): {e}", bench.etcd))?;
    procs.0.push(etcd);
    let url = format!("etcd://127.0.0.1:{client}/bench");
    let parsed: EtcdUrl = url.parse()?;
    let probe = Etcd::new(&parsed, Duration::from_secs(1))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe.newest().await.is_err() {
        if Instant::now() > deadline {
            return Err("etcd did not answer within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys = bench.writers.max(1);
    let world_path = scratch.join("world.json");
    std::fs::write(&world_path, world(keys).to_string()).map_err(|e| e.to_string())?;
    let mut addrs = Vec::new();
    for _ in 0..3 {
        addrs.push(sidecar(&bench.tagward, &url, &world_path, &mut procs)?);
    }
    let mut authz = Vec::new();
    let mut tagging = Vec::new();
    for a in &addrs {
        let ch = channel(a).await?;
        authz.push(AuthorizerClient::new(ch.clone()));
        tagging.push(TaggingClient::new(ch));
    }
    println!("fleet: etcd on 127.0.0.1:{client}, sidecars {}", addrs.join(", "));

    // Visibility: a change acknowledged by one sidecar, seen by the others.
    let mut seen = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for i in 0..bench.changes {
        let writer = i % 3;
        let done = tagging[writer]
            .clone()
            .tag_resource(retag(0, &format!("v{i}")))
            .await
            .map_err(|e| format!("TagResource: {e}"))?
            .into_inner();
        let acked = Instant::now();
        let others: Vec<usize> = (0..3).filter(|j| *j != writer).collect();
        let (b, c) = tokio::join!(
            until_visible(authz[others[0]].clone(), done.revision, acked),
            until_visible(authz[others[1]].clone(), done.revision, acked)
        );
        for d in [b?, c?] {
            seen.record(d.as_nanos() as u64).map_err(|e| e.to_string())?;
        }
    }
    println!(
        "visibility over {} changes ({} samples): p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs (ack on one sidecar -> first Authorize at that revision on another)",
        bench.changes,
        seen.len(),
        micros(&seen, 0.5),
        micros(&seen, 0.99),
        seen.max() as f64 / 1000.0
    );

    // Throughput: writers on keys of their own, through one sidecar, then three.
    for spread in [1usize, 3] {
        let per = (bench.writes / bench.writers.max(1)).max(1);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..bench.writers.max(1) {
            let mut client = tagging[w % spread].clone();
            tasks.push(tokio::spawn(async move {
                let mut failed = 0usize;
                for n in 0..per {
                    if client.tag_resource(retag(w, &format!("s{spread}-{n}"))).await.is_err() {
                        failed += 1;
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for t in tasks {
            failed += t.await.map_err(|e| e.to_string())?;
        }
        let took = started.elapsed();
        let total = per * bench.writers.max(1);
        println!(
            "throughput through {spread} sidecar(s): {total} writes by {} writers in {:.2} s = {:.0} writes/s ({failed} failed)",
            bench.writers.max(1),
            took.as_secs_f64(),
            (total - failed) as f64 / took.as_secs_f64()
        );
    }
    drop(procs);
    Ok(())
}
