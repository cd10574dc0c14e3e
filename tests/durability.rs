//! Durability of `tagward serve --data-dir`: the real binary as a child
//! process, killed with SIGKILL in the middle of a stream of changes, stopped
//! with SIGTERM, restarted; data directories damaged by hand. Every
//! acknowledged change must survive, no batch may be half applied, a torn
//! tail of the newest log is cut (and logged), and damage anywhere else
//! stops the start with exit code 2 and leaves the directory as it was.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tagward::grpc::proto::{self, update::Op};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// The keys of deploy/world/example.json.
const KEY_A: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
const KEY_B: &str = "arn:aws:kms:us-east-1:111122223333:key/0987dcba-09fe-87dc-65ba-ab0987654321";
const KEY_C: &str = "arn:aws:kms:us-east-1:111122223333:key/5555eeee-0000-0000-0000-000000000005";

/// Every wait in this file has a deadline; these are the usual ones.
const START_LIMIT: Duration = Duration::from_secs(20);
const EXIT_LIMIT: Duration = Duration::from_secs(15);
const CALL_LIMIT: Duration = Duration::from_secs(10);

fn example_world() -> String {
    manifest_dir().join("deploy/world/example.json").to_string_lossy().into_owned()
}

// ------------------------------------------------------------------ scratch

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Copies the regular files of `from` into a new directory `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Every file of a directory with its bytes.
fn dir_contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

fn numbered(dir: &Path, prefix: &str, suffix: &str) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn wals(dir: &Path) -> Vec<(u64, PathBuf)> {
    numbered(dir, "wal-", ".twl")
}

fn newest_wal(dir: &Path) -> PathBuf {
    wals(dir).pop().unwrap_or_else(|| panic!("no wal-*.twl in {}", dir.display())).1
}

fn newest_snapshot(dir: &Path) -> PathBuf {
    numbered(dir, "snap-", ".tws").pop().unwrap_or_else(|| panic!("no snap-*.tws in {}", dir.display())).1
}

/// The records of a log or snapshot file (storage.rs: an 8-byte magic, then
/// `[u32 length][u32 CRC][payload]` little-endian): (offset, payload length).
fn records(path: &Path) -> Vec<(u64, u64)> {
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut off = 8usize;
    while off + 8 <= bytes.len() {
        let size = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        if off + 8 + size > bytes.len() {
            break;
        }
        out.push((off as u64, size as u64));
        off += 8 + size;
    }
    assert_eq!(off, bytes.len(), "{} does not end at a record boundary", path.display());
    out
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn append(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x5a;
    std::fs::write(path, &bytes).unwrap();
}

// ------------------------------------------------------------------ processes

fn assert_no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked"), "a panic:\n{stderr}");
}

/// `tagward serve --data-dir DIR` on loopback ports it picks plus `extra`,
/// once it answers health checks with SERVING.
async fn serve(dir: &Path, extra: &[&str]) -> Tagward {
    let serve = Serve::new().args(["--data-dir", &s(dir), "--shutdown-grace-secs", "5"]).args(extra);
    serve.start(START_LIMIT).await.unwrap_or_else(|stderr| panic!("tagward serve {:?} did not start:\n{stderr}", serve.argv()))
}

/// `tagward serve` that must refuse to start: exit code 2 within 10 s.
/// Returns the stderr.
fn serve_must_fail(dir: &Path) -> String {
    let mut server = Serve::new().args(["--data-dir", &s(dir)]).spawn();
    let status = server
        .wait_for_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("tagward serve started on the damaged directory {}", dir.display()));
    let stderr = server.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_no_panic(&stderr);
    stderr
}

/// Runs a `tagward` command to completion (bounded); (exit code, stdout, stderr).
fn run(args: &[String]) -> (Option<i32>, String, String) {
    tokio::task::block_in_place(|| run_blocking(args))
}

fn run_blocking(args: &[String]) -> (Option<i32>, String, String) {
    let mut child = command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run tagward");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tagward {args:?} did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code(), out.join().unwrap(), err.join().unwrap())
}

// ------------------------------------------------------------------ log lines

/// The revision of the `restored the acknowledged state` line.
fn restored_revision(stderr: &str) -> Option<u64> {
    let re = regex::Regex::new(r"revision=(\d+)").unwrap();
    let line = stderr.lines().find(|l| l.contains("restored the acknowledged state"))?;
    re.captures(line).map(|c| c[1].parse().unwrap())
}

/// The `cut a torn tail` line: (file, offset, bytes).
fn cut_line(stderr: &str) -> Option<(String, u64, u64)> {
    let line = stderr.lines().find(|l| l.contains("cut a torn tail"))?;
    let field = |name: &str| {
        regex::Regex::new(&format!(r"\b{name}=(\S+)")).unwrap().captures(line).map(|c| c[1].trim_matches('"').to_string())
    };
    Some((field("file")?, field("offset")?.parse().ok()?, field("bytes")?.parse().ok()?))
}

// ------------------------------------------------------------------ gRPC views

/// Admin.Export: the revision and the updates.
#[derive(Debug, Clone, PartialEq)]
struct Exported {
    revision: u64,
    updates: Vec<proto::Update>,
}

impl Exported {
    fn tags(&self, arn: &str) -> BTreeMap<String, String> {
        self.updates
            .iter()
            .find_map(|u| match &u.op {
                Some(Op::PutResource(r)) if r.arn == arn => {
                    Some(r.tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no resource {arn} in the export"))
    }

    fn policies(&self) -> BTreeSet<String> {
        self.updates
            .iter()
            .filter_map(|u| match &u.op {
                Some(Op::PutPolicy(p)) => Some(p.name.clone()),
                _ => None,
            })
            .collect()
    }
}

async fn export(admin: &mut AdminClient<Channel>) -> Exported {
    let collect = async {
        let mut stream = admin.export(proto::ExportRequest {}).await.expect("Admin.Export").into_inner();
        let mut items = Vec::new();
        while let Some(item) = stream.message().await.expect("Admin.Export streams") {
            items.push(item);
        }
        items
    };
    let items = timeout(CALL_LIMIT, collect).await.expect("Admin.Export within the limit");
    assert!(!items.is_empty(), "an empty export");
    let revision = items[0].revision;
    assert!(items.iter().all(|i| i.revision == revision), "one revision on every item");
    Exported { revision, updates: items.into_iter().map(|i| i.update.expect("an update")).collect() }
}

/// Applies `updates` on one stream; every one must be acknowledged.
/// Returns the revisions.
async fn apply_acked(admin: &mut AdminClient<Channel>, updates: Vec<proto::Update>) -> Vec<u64> {
    let answers = timeout(CALL_LIMIT, apply_all(admin, updates)).await.expect("Admin.Apply within the limit");
    answers
        .iter()
        .map(|r| {
            assert!(r.error.is_none(), "update {} refused: {:?}", r.id, r.error);
            r.revision
        })
        .collect()
}

fn remove_tags(resource: &str, keys: &[&str]) -> proto::Update {
    update(Op::RemoveTags(proto::RemoveTags {
        resource: resource.to_string(),
        tag_keys: keys.iter().map(|k| k.to_string()).collect(),
    }))
}

fn tag_request(principal: &str, resource: &str, t: &[(&str, &str)]) -> proto::TagResourceRequest {
    proto::TagResourceRequest {
        principal: principal.to_string(),
        resource: resource.to_string(),
        tags: t.iter().map(|(k, v)| tag(k, v)).collect(),
        ..Default::default()
    }
}

fn policy_document(i: u64) -> String {
    format!(
        r#"{{"Version": "2012-10-17", "Statement": {{"Sid": "S{i}", "Effect": "Allow", "Action": "kms:DescribeKey",
            "Resource": "arn:aws:kms:*:111122223333:key/k{i}"}}}}"#
    )
}

/// A deterministic PRNG (splitmix64), seeded per round.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

// ------------------------------------------------------------------ 1. kill -9

/// Rounds of kill -9; `TAGWARD_TEST_KILL_ROUNDS` and `TAGWARD_TEST_KILL_SEED`
/// override the count and the seed of the kill moments, for longer soak runs.
const ROUNDS: u64 = 5;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
/// Counters of round r are r * STRIDE + 1, r * STRIDE + 2, ...: they only grow.
const STRIDE: u64 = 1_000_000;
/// Updates on the admin stream not yet acknowledged, at most.
const WINDOW: usize = 32;

/// What the clients saw acknowledged, over all rounds so far.
#[derive(Debug, Default)]
struct Acked {
    /// The highest revision in any acknowledgement.
    revision: u64,
    /// The highest Seq of an acknowledged batch (A and B), and the highest sent.
    seq: u64,
    seq_sent: u64,
    /// The highest counter of an acknowledged TagResource on C, and the highest sent.
    tag: u64,
    tag_sent: u64,
    policies: BTreeSet<String>,
}

/// What one round under load saw.
#[derive(Debug, Default)]
struct RoundLoad {
    admin_acks: u64,
    tag_acks: u64,
    /// Failures before the kill, or acknowledgements that are wrong.
    problems: Vec<String>,
}

fn counter(value: Option<&String>, prefix: &str) -> Option<u64> {
    value?.strip_prefix(prefix)?.parse().ok()
}

/// Checks a freshly restarted server against everything acknowledged.
async fn check_restored(server: &Tagward, acked: &Acked, round: u64) -> Exported {
    let mut admin = server.admin().await;
    let ex = export(&mut admin).await;
    let ctx = format!("after the kill of round {}", round - 1);
    assert!(ex.revision >= acked.revision, "{ctx}: restored revision {} < acknowledged revision {}", ex.revision, acked.revision);

    // No half batch: A and B carry the same Seq, at least the acknowledged one.
    let (a, b) = (ex.tags(KEY_A), ex.tags(KEY_B));
    assert_eq!(a.get("Seq"), b.get("Seq"), "{ctx}: a half-applied batch: A {a:?}, B {b:?}");
    if acked.seq_sent > 0 {
        let seq = counter(a.get("Seq"), "").unwrap_or(0);
        assert!(seq >= acked.seq, "{ctx}: Seq {seq} < acknowledged {} (A {a:?})", acked.seq);
        assert!(seq <= acked.seq_sent, "{ctx}: Seq {seq} was never sent (highest sent {})", acked.seq_sent);
    }
    // The tag loop's effect: Project and Type of one TagResource call, both.
    let c = ex.tags(KEY_C);
    if acked.tag_sent > 0 {
        let p = counter(c.get("Project"), "P");
        let t = counter(c.get("Type"), "T");
        if acked.tag > 0 || p.is_some() {
            assert_eq!(p, t, "{ctx}: one TagResource half applied on C: {c:?}");
            let p = p.unwrap_or_else(|| panic!("{ctx}: C lost its acknowledged Project tag: {c:?}"));
            assert!(p >= acked.tag, "{ctx}: C has Project=P{p}, but P{} was acknowledged", acked.tag);
            assert!(p <= acked.tag_sent, "{ctx}: C has Project=P{p}, never sent (highest {})", acked.tag_sent);
        }
    }
    // Every acknowledged policy.
    let have = ex.policies();
    let missing: Vec<&String> = acked.policies.difference(&have).collect();
    assert!(missing.is_empty(), "{ctx}: acknowledged policies missing: {missing:?}");

    // The data plane answers from the same state, at the acknowledged revision.
    let mut tagging = server.tagging().await;
    let listed = timeout(
        CALL_LIMIT,
        tagging.list_resource_tags(proto::ListResourceTagsRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_C.into(),
            min_revision: acked.revision,
            ..Default::default()
        }),
    )
    .await
    .expect("ListResourceTags within the limit")
    .expect("ListResourceTags")
    .into_inner();
    let listed_tags: BTreeMap<String, String> = listed.tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect();
    assert_eq!(listed_tags, c, "{ctx}: ListResourceTags and Export disagree");
    assert_eq!(listed.revision, ex.revision);
    let mut authz = server.authz().await;
    let mut req = authorize_req(ALPHA_APP, "kms:Decrypt", KEY_A);
    req.min_revision = acked.revision;
    let r = timeout(CALL_LIMIT, authz.authorize(req)).await.expect("Authorize within the limit").expect("Authorize").into_inner();
    assert!(allowed(&r), "{ctx}: AlphaApp may decrypt with A: {r:?}");
    assert_eq!(r.revision, ex.revision);
    ex
}

/// One round: an Admin.Apply pipeline and a TagResource loop, then SIGKILL
/// after `delay`. Updates `acked` with what was acknowledged.
async fn load_and_kill(server: &mut Tagward, round: u64, delay: Duration, acked: &mut Acked) -> (RoundLoad, String) {
    let killed = Arc::new(AtomicBool::new(false));
    let mut admin = server.admin().await;
    let mut tagging = server.tagging().await;

    // (a) The admin stream: batches of two SetTags (Seq on A and B), and
    // every tenth update a put_policy.
    let (tx, rx) = mpsc::channel::<proto::ApplyRequest>(WINDOW * 2);
    let window = Arc::new(Semaphore::new(WINDOW));
    let sent: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let seq_sent = Arc::new(Mutex::new(0u64));
    let mut answers = timeout(CALL_LIMIT, admin.apply(ReceiverStream::new(rx)))
        .await
        .expect("Admin.Apply opens within the limit")
        .expect("Admin.Apply opens")
        .into_inner();
    let sender = {
        let (window, sent, seq_sent) = (window.clone(), sent.clone(), seq_sent.clone());
        tokio::spawn(async move {
            for i in 1..STRIDE {
                let Ok(permit) = window.acquire().await else { break };
                permit.forget();
                let n = round * STRIDE + i;
                let (id, u) = if i % 10 == 0 {
                    let name = format!("Durable-r{round}-{i}");
                    (format!("policy:{name}"), put_policy(&name, &policy_document(n)))
                } else {
                    let v = n.to_string();
                    (format!("seq:{n}"), batch(vec![set_tags(KEY_A, &[("Seq", &v)]), set_tags(KEY_B, &[("Seq", &v)])]))
                };
                sent.lock().unwrap().push_back(id.clone());
                if id.starts_with("seq:") {
                    *seq_sent.lock().unwrap() = n;
                }
                if tx.send(apply_request(&id, u)).await.is_err() {
                    break;
                }
            }
        })
    };
    let receiver = {
        let (window, sent, killed) = (window.clone(), sent.clone(), killed.clone());
        tokio::spawn(async move {
            let (mut acks, mut problems) = (Vec::<(String, u64)>::new(), Vec::new());
            let mut last = 0u64;
            loop {
                match timeout(CALL_LIMIT, answers.message()).await {
                    Ok(Ok(Some(r))) => {
                        let expected = sent.lock().unwrap().pop_front();
                        if expected.as_deref() != Some(r.id.as_str()) {
                            problems.push(format!("answer {:?} out of order (expected {expected:?})", r.id));
                        }
                        if let Some(e) = &r.error {
                            problems.push(format!("update {} refused: {e:?}", r.id));
                        } else {
                            if r.revision <= last {
                                problems.push(format!("update {} acknowledged at revision {} after {last}", r.id, r.revision));
                            }
                            last = r.revision;
                            acks.push((r.id.clone(), r.revision));
                        }
                        window.add_permits(1);
                    }
                    Ok(Ok(None)) => {
                        if !killed.load(Ordering::SeqCst) {
                            problems.push("the Apply stream ended before the kill".into());
                        }
                        break;
                    }
                    Ok(Err(status)) => {
                        if !killed.load(Ordering::SeqCst) {
                            problems.push(format!("the Apply stream failed before the kill: {status:?}"));
                        }
                        break;
                    }
                    Err(_) => {
                        problems.push(format!("no Apply answer for {CALL_LIMIT:?}"));
                        break;
                    }
                }
            }
            window.close();
            (acks, problems)
        })
    };

    // (b) TagResource as KeyAdmin on C: Project=P<n>, Type=T<n> in one call.
    let tagger = {
        let killed = killed.clone();
        tokio::spawn(async move {
            let (mut acks, mut problems, mut highest_sent) = (Vec::<(u64, u64)>::new(), Vec::new(), 0u64);
            let mut last = 0u64;
            for i in 1..STRIDE {
                let n = round * STRIDE + i;
                highest_sent = n;
                let (p, t) = (format!("P{n}"), format!("T{n}"));
                let req = tag_request(KEY_ADMIN, KEY_C, &[("Project", &p), ("Type", &t)]);
                match timeout(CALL_LIMIT, tagging.tag_resource(req)).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        let got: BTreeMap<String, String> = r.tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect();
                        if got.get("Project") != Some(&p) || got.get("Type") != Some(&t) || !r.changed || r.revision <= last {
                            problems.push(format!("TagResource P{n} answered {r:?} (previous revision {last})"));
                        }
                        last = r.revision;
                        acks.push((n, r.revision));
                    }
                    Ok(Err(status)) => {
                        if !killed.load(Ordering::SeqCst) {
                            problems.push(format!("TagResource failed before the kill: {status:?}"));
                        }
                        break;
                    }
                    Err(_) => {
                        problems.push(format!("no TagResource answer for {CALL_LIMIT:?}"));
                        break;
                    }
                }
            }
            (acks, problems, highest_sent)
        })
    };

    tokio::time::sleep(delay).await;
    killed.store(true, Ordering::SeqCst);
    let stderr = server.kill9(EXIT_LIMIT);

    let mut load = RoundLoad::default();
    let (admin_acks, mut problems) = timeout(CALL_LIMIT, receiver).await.expect("the Apply reader ends").unwrap();
    timeout(CALL_LIMIT, sender).await.expect("the Apply writer ends").unwrap();
    let (tag_acks, tag_problems, tag_sent) = timeout(CALL_LIMIT, tagger).await.expect("the TagResource loop ends").unwrap();
    problems.extend(tag_problems);
    load.problems = problems;
    load.admin_acks = admin_acks.len() as u64;
    load.tag_acks = tag_acks.len() as u64;
    for (id, rev) in admin_acks {
        acked.revision = acked.revision.max(rev);
        if let Some(n) = id.strip_prefix("seq:") {
            acked.seq = acked.seq.max(n.parse().unwrap());
        } else if let Some(name) = id.strip_prefix("policy:") {
            acked.policies.insert(name.to_string());
        }
    }
    let seq_sent = *seq_sent.lock().unwrap();
    acked.seq_sent = acked.seq_sent.max(seq_sent);
    for (n, rev) in tag_acks {
        acked.revision = acked.revision.max(rev);
        acked.tag = acked.tag.max(n);
    }
    acked.tag_sent = acked.tag_sent.max(tag_sent);
    (load, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loses_no_acknowledged_change() {
    let dir = Scratch::new("kill9");
    let world = example_world();
    let mut acked = Acked::default();
    let mut restored_before: Option<u64> = None;
    // Some rounds compact often (snapshots and new logs while the changes
    // stream in, so a kill can land in the middle of one), some never.
    let compaction = ["32768", "67108864", "8192", "65536", "67108864"];
    let rounds = env_u64("TAGWARD_TEST_KILL_ROUNDS", ROUNDS);
    let seed = env_u64("TAGWARD_TEST_KILL_SEED", 0x7a67_7761_7264);
    for round in 0..=rounds {
        let mut extra: Vec<&str> = Vec::new();
        if round == 0 {
            extra.extend(["--world", world.as_str()]);
        }
        if round < rounds {
            extra.extend(["--compact-after-bytes", compaction[round as usize % compaction.len()]]);
        }
        let mut server = serve(dir.path(), &extra).await;
        let restored = if round > 0 { Some(check_restored(&server, &acked, round).await.revision) } else { None };

        let stderr = if round == rounds {
            server.term(EXIT_LIMIT)
        } else {
            let mut rng = SplitMix(seed ^ round);
            let delay = Duration::from_millis(rng.range(100, 600));
            let (load, stderr) = load_and_kill(&mut server, round, delay, &mut acked).await;
            assert!(load.problems.is_empty(), "round {round}: {:#?}", load.problems);
            eprintln!(
                "round {round}: killed after {delay:?}; {} admin acks, {} tag acks; highest acknowledged revision {}",
                load.admin_acks, load.tag_acks, acked.revision
            );
            stderr
        };
        assert_no_panic(&stderr);
        if round > 0 {
            let logged = restored_revision(&stderr)
                .unwrap_or_else(|| panic!("round {round}: no `restored the acknowledged state` line:\n{stderr}"));
            assert_eq!(Some(logged), restored, "round {round}: the log and Export disagree on the restored revision");
            assert!(logged >= restored_before.unwrap_or(0), "round {round}: the revision went back");
            restored_before = Some(logged);
            let cut = match cut_line(&stderr) {
                Some((file, offset, bytes)) => format!("; cut {bytes} bytes at offset {offset} of {file}"),
                None => String::new(),
            };
            eprintln!("  restart {round}: restored revision {logged}{cut}");
        }
    }
    assert!(acked.seq > 0 && acked.tag > 0 && !acked.policies.is_empty(), "nothing was acknowledged: {acked:?}");
}

// ------------------------------------------------------------------ 2. torn tail

/// A directory seeded from the example world plus 20 acknowledged SetTags
/// on A (T0=v0 ... T19=v19), stopped cleanly. Returns the revisions.
async fn twenty_updates(dir: &Path) -> Vec<u64> {
    let mut server = serve(dir, &["--world", &example_world()]).await;
    let updates = (0..20).map(|i| set_tags(KEY_A, &[(&format!("T{i}"), &format!("v{i}"))])).collect();
    let revs = apply_acked(&mut server.admin().await, updates).await;
    server.term(EXIT_LIMIT);
    revs
}

/// Restarts on `dir`, which must cut a torn tail of `wal` at `offset` of
/// `bytes` bytes; then checks that A holds T0..T(keep-1) and the revision.
async fn restart_after_torn_tail(dir: &Path, wal: &Path, offset: u64, bytes: u64, keep: usize, revision: u64, case: &str) {
    let mut server = serve(dir, &[]).await;
    let ex = export(&mut server.admin().await).await;
    let stderr = server.term(EXIT_LIMIT);
    let (file, at, n) = cut_line(&stderr).unwrap_or_else(|| panic!("{case}: no `cut a torn tail` line:\n{stderr}"));
    assert_eq!(file, s(wal), "{case}: the line names the log");
    assert_eq!((at, n), (offset, bytes), "{case}: where and how much was cut:\n{stderr}");
    assert_eq!(restored_revision(&stderr), Some(revision), "{case}:\n{stderr}");
    assert_eq!(ex.revision, revision, "{case}");
    assert_eq!(file_len(wal), offset, "{case}: the log ends at the last complete record");
    let a = ex.tags(KEY_A);
    for i in 0..20 {
        let v = format!("v{i}");
        if i < keep {
            assert_eq!(a.get(&format!("T{i}")), Some(&v), "{case}: acknowledged T{i} lost: {a:?}");
        } else {
            assert_eq!(a.get(&format!("T{i}")), None, "{case}: T{i} was cut off but is there: {a:?}");
        }
    }
    // A second start finds nothing more to cut.
    let mut again = serve(dir, &[]).await;
    assert_eq!(export(&mut again.admin().await).await, ex, "{case}: a second restart");
    let stderr = again.term(EXIT_LIMIT);
    assert!(!stderr.contains("cut a torn tail"), "{case}: cut again:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torn_tail_is_cut_and_logged() {
    let scratch = Scratch::new("torn");
    let base = scratch.join("base");
    let revs = twenty_updates(&base).await;
    let last = *revs.last().unwrap();
    let wal_name = newest_wal(&base).file_name().unwrap().to_owned();
    let recs = records(&newest_wal(&base));
    assert!(recs.len() >= 20, "{} records in the log", recs.len());
    let (last_off, last_size) = *recs.last().unwrap();

    // (a) A header claiming 1000 bytes, then only 10: a write cut short.
    let dir = scratch.join("garbage");
    copy_dir(&base, &dir);
    let wal = dir.join(&wal_name);
    let whole = file_len(&wal);
    let mut tail = Vec::new();
    tail.extend_from_slice(&1000u32.to_le_bytes());
    tail.extend_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    tail.extend_from_slice(b"{\"prev\":99");
    append(&wal, &tail);
    restart_after_torn_tail(&dir, &wal, whole, 18, 20, last, "garbage header").await;

    // (b) The first half of the last record written again: a crash in the
    // middle of writing a new record.
    let dir = scratch.join("half");
    copy_dir(&base, &dir);
    let wal = dir.join(&wal_name);
    let bytes = std::fs::read(&wal).unwrap();
    let record = &bytes[last_off as usize..(last_off + 8 + last_size) as usize];
    let half = &record[..record.len() / 2];
    append(&wal, half);
    restart_after_torn_tail(&dir, &wal, whole, half.len() as u64, 20, last, "half a record").await;

    // (c) Fewer than 8 bytes: not even a whole record header.
    let dir = scratch.join("short-header");
    copy_dir(&base, &dir);
    let wal = dir.join(&wal_name);
    append(&wal, &record[..5]);
    restart_after_torn_tail(&dir, &wal, whole, 5, 20, last, "a short header").await;

    // (d) The last record itself cut short by 5 bytes (the disk lost the end
    // of an acknowledged write): the tail goes, the 19 before it stay.
    let dir = scratch.join("truncated");
    copy_dir(&base, &dir);
    let wal = dir.join(&wal_name);
    std::fs::OpenOptions::new().write(true).open(&wal).unwrap().set_len(whole - 5).unwrap();
    restart_after_torn_tail(&dir, &wal, last_off, last_size + 8 - 5, 19, revs[18], "truncated last record").await;
}

// ------------------------------------------------------------------ 3. damage

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn damage_in_the_middle_stops_the_start() {
    let scratch = Scratch::new("damage");
    let base = scratch.join("base");
    // Two logs: 10 changes, a clean restart (which starts a new log), 10 more.
    let mut server = serve(&base, &["--world", &example_world()]).await;
    apply_acked(&mut server.admin().await, (0..10).map(|i| set_tags(KEY_A, &[(&format!("T{i}"), "x")])).collect()).await;
    server.term(EXIT_LIMIT);
    let mut server = serve(&base, &[]).await;
    apply_acked(&mut server.admin().await, (10..20).map(|i| set_tags(KEY_A, &[(&format!("T{i}"), "x")])).collect()).await;
    server.term(EXIT_LIMIT);
    let logs = wals(&base);
    assert!(logs.len() >= 2, "two logs: {logs:?}");

    let check = |dir: &Path, file: &Path, offset: u64, case: &str| {
        let before = dir_contents(dir);
        let stderr = tokio::task::block_in_place(|| serve_must_fail(dir));
        let named = format!("{} at offset {offset}", file.display());
        assert!(stderr.contains(&named), "{case}: the error names {named:?}:\n{stderr}");
        assert_eq!(dir_contents(dir), before, "{case}: the directory changed");
        eprintln!("{case}: {}", stderr.lines().find(|l| l.contains("at offset")).unwrap_or_default());
    };

    // (a) A byte flipped inside the third record of the newest log.
    let dir = scratch.join("wal");
    copy_dir(&base, &dir);
    let wal = newest_wal(&dir);
    let recs = records(&wal);
    assert!(recs.len() >= 5, "{recs:?}");
    let (off, size) = recs[2];
    let len = file_len(&wal);
    flip_byte(&wal, off + 8 + size / 2);
    check(&dir, &wal, off, "a flipped byte in the newest log");
    assert_eq!(file_len(&wal), len);

    // (b) A byte flipped inside a record of the snapshot.
    let dir = scratch.join("snapshot");
    copy_dir(&base, &dir);
    let snap = newest_snapshot(&dir);
    let recs = records(&snap);
    assert!(recs.len() >= 4, "{recs:?}");
    let (off, size) = recs[recs.len() / 2];
    let len = file_len(&snap);
    flip_byte(&snap, off + 8 + size / 2);
    check(&dir, &snap, off, "a flipped byte in the snapshot");
    assert_eq!(file_len(&snap), len);

    // (c) The snapshot's last record damaged: a snapshot is never torn.
    let dir = scratch.join("snapshot-end");
    copy_dir(&base, &dir);
    let snap = newest_snapshot(&dir);
    let (off, size) = *records(&snap).last().unwrap();
    flip_byte(&snap, off + 8 + size / 2);
    check(&dir, &snap, off, "a flipped byte in the snapshot's last record");

    // (d) The older log's last record cut short: only the newest log's tail
    // may be torn.
    let dir = scratch.join("older-wal");
    copy_dir(&base, &dir);
    let older = wals(&dir)[wals(&dir).len() - 2].1.clone();
    let (off, _) = *records(&older).last().unwrap();
    let len = file_len(&older);
    std::fs::OpenOptions::new().write(true).open(&older).unwrap().set_len(len - 3).unwrap();
    check(&dir, &older, off, "a torn tail in an older log");
    assert_eq!(file_len(&older), len - 3);

    // The undamaged copy still starts, with all 20 changes.
    let mut server = serve(&base, &[]).await;
    let a = export(&mut server.admin().await).await.tags(KEY_A);
    assert!((0..20).all(|i| a.get(&format!("T{i}")).map(String::as_str) == Some("x")), "{a:?}");
    server.term(EXIT_LIMIT);
}

// ------------------------------------------------------------------ 4. clean restart

/// Questions whose answers must not change across a restart.
fn questions() -> Vec<proto::AuthorizeRequest> {
    let with_tags = |mut r: proto::AuthorizeRequest, t: &[(&str, &str)]| {
        r.request_tags = t.iter().map(|(k, v)| tag(k, v)).collect();
        r
    };
    vec![
        authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA),
        authorize_req(ALPHA_APP, "kms:Decrypt", KEY_BETA),
        authorize_req(BETA_APP, "kms:Decrypt", KEY_BETA),
        authorize_req(BETA_APP, "kms:Encrypt", KEY_ALPHA),
        authorize_req(ALPHA_APP, "kms:Decrypt", KEY_RESERVED),
        authorize_req(ALPHA_APP, "kms:Encrypt", KEY_DISABLED),
        with_tags(authorize_req(KEY_ADMIN, "kms:TagResource", KEY_ALPHA), &[("Project", "Beta")]),
        with_tags(authorize_req(KEY_ADMIN, "kms:TagResource", KEY_ALPHA), &[("Owner", "me")]),
        authorize_req(OPS_USER, "s3:GetObject", BUCKET),
        authorize_req(ALPHA_APP, "s3:GetObject", BUCKET),
        authorize_req("arn:aws:iam::111122223333:role/Auditor", "kms:DescribeKey", KEY_BETA),
        authorize_req("arn:aws:iam::111122223333:role/Auditor", "kms:Decrypt", KEY_BETA),
    ]
}

/// The answers, with the order of matched statements and missing keys fixed.
async fn answers(server: &Tagward) -> Vec<proto::AuthorizeResponse> {
    let mut authz = server.authz().await;
    let mut out = Vec::new();
    for q in questions() {
        let mut r = timeout(CALL_LIMIT, authz.authorize(q.clone()))
            .await
            .expect("Authorize within the limit")
            .unwrap_or_else(|e| panic!("{q:?}: {e:?}"))
            .into_inner();
        r.matched.sort_by(|a, b| (&a.policy, a.index).cmp(&(&b.policy, b.index)));
        r.missing_keys.sort();
        out.push(r);
    }
    out
}

fn write_world(scratch: &Scratch) -> String {
    let path = scratch.join("world.json");
    std::fs::write(&path, WORLD).unwrap();
    s(&path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clean_restart_keeps_revision_and_answers() {
    let scratch = Scratch::new("clean");
    let world = write_world(&scratch);
    let dir = scratch.join("data");
    let mut server = serve(&dir, &["--world", &world]).await;
    let revision = some_changes(&server, "one").await;
    let before = (export(&mut server.admin().await).await, answers(&server).await);
    assert_eq!(before.0.revision, revision);
    assert!(before.1.iter().all(|r| r.revision == revision));
    assert!(before.1.iter().any(allowed) && !before.1.iter().all(allowed), "a mix of answers: {:#?}", before.1);
    server.term(EXIT_LIMIT);

    // Restored from the log.
    let mut server = serve(&dir, &[]).await;
    let after = (export(&mut server.admin().await).await, answers(&server).await);
    assert_eq!(after.0, before.0, "the export after a restart");
    assert_eq!(after.1, before.1, "the answers after a restart");
    let stderr = server.term(EXIT_LIMIT);
    assert_eq!(restored_revision(&stderr), Some(revision), "{stderr}");

    // Restored from a snapshot: compact after every commit, change, wait for
    // the snapshot of the new revision, stop, start again.
    let mut server = serve(&dir, &["--compact-after-bytes", "1"]).await;
    let revision = some_changes(&server, "two").await;
    let snap = dir.join(format!("snap-{revision:020}.tws"));
    let deadline = Instant::now() + CALL_LIMIT;
    while !snap.exists() {
        assert!(Instant::now() < deadline, "no snapshot {} within {CALL_LIMIT:?}", snap.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = (export(&mut server.admin().await).await, answers(&server).await);
    assert_eq!(before.0.revision, revision);
    server.term(EXIT_LIMIT);
    let mut server = serve(&dir, &[]).await;
    let after = (export(&mut server.admin().await).await, answers(&server).await);
    assert_eq!(after.0, before.0, "the export after a restart from a snapshot");
    assert_eq!(after.1, before.1, "the answers after a restart from a snapshot");
    let stderr = server.term(EXIT_LIMIT);
    assert_eq!(restored_revision(&stderr), Some(revision), "{stderr}");
}

/// Admin updates and tag operations of several kinds on the test world;
/// returns the revision after them.
async fn some_changes(server: &Tagward, salt: &str) -> u64 {
    let mut admin = server.admin().await;
    let auditor = "arn:aws:iam::111122223333:role/Auditor";
    let policy = r#"{"Version": "2012-10-17", "Statement": [{"Sid": "Describe", "Effect": "Allow", "Action": "kms:DescribeKey",
        "Resource": "*", "Condition": {"StringEquals": {"aws:ResourceTag/Project": "${aws:PrincipalTag/project}"}}}]}"#;
    let inline = r#"{"Version": "2012-10-17", "Statement": {"Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*"}}"#;
    let principal = update(Op::PutPrincipal(proto::Principal {
        arn: auditor.into(),
        tags: vec![tag("project", "Beta"), tag("salt", salt)],
        policies: vec!["Auditing".into()],
        inline_policies: [("NoDecrypt".to_string(), inline.to_string())].into_iter().collect(),
        ..Default::default()
    }));
    apply_acked(
        &mut admin,
        vec![
            put_policy("Auditing", policy),
            principal,
            set_tags(KEY_BETA, &[("CostCenter", salt)]),
            batch(vec![set_tags(KEY_ALPHA, &[("Stage", salt)]), remove_tags(KEY_DISABLED, &["Owner"])]),
            put_policy(&format!("Extra-{salt}"), &policy_document(7)),
        ],
    )
    .await;
    let mut tagging = server.tagging().await;
    let r = timeout(CALL_LIMIT, tagging.tag_resource(tag_request(KEY_ADMIN, KEY_RESERVED, &[("Project", salt)])))
        .await
        .unwrap()
        .expect("TagResource")
        .into_inner();
    assert!(r.changed);
    let r = timeout(
        CALL_LIMIT,
        tagging.untag_resource(proto::UntagResourceRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_BETA.into(),
            tag_keys: vec!["Type".into()],
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .expect("UntagResource")
    .into_inner();
    // The second time round Type is gone already: no change, same revision.
    let _ = r.changed;
    r.revision
}

// ------------------------------------------------------------------ 5. world file

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn world_file_seeds_only_an_empty_directory() {
    let scratch = Scratch::new("world");
    let dir = scratch.join("data");
    let world = example_world();

    let mut server = serve(&dir, &["--world", &world]).await;
    let seeded = export(&mut server.admin().await).await;
    assert_eq!(seeded.tags(KEY_A).get("Project").map(String::as_str), Some("Alpha"));
    let changed = apply_acked(&mut server.admin().await, vec![set_tags(KEY_A, &[("Project", "Gamma")])]).await[0];
    let stderr = server.term(EXIT_LIMIT);
    assert!(stderr.contains("seeded the empty data directory from the world file"), "{stderr}");

    // The same --world again: the directory's state wins.
    let mut server = serve(&dir, &["--world", &world]).await;
    let ex = export(&mut server.admin().await).await;
    assert_eq!(ex.revision, changed);
    assert_eq!(ex.tags(KEY_A).get("Project").map(String::as_str), Some("Gamma"), "the change was kept");
    let stderr = server.term(EXIT_LIMIT);
    assert!(stderr.contains("the world file is not applied"), "{stderr}");
    assert_eq!(restored_revision(&stderr), Some(changed), "{stderr}");

    // --force-world: the world's tags are back, at a higher revision.
    let mut server = serve(&dir, &["--world", &world, "--force-world"]).await;
    let forced = export(&mut server.admin().await).await;
    assert!(forced.revision > changed, "forced revision {} after {changed}", forced.revision);
    assert_eq!(forced.tags(KEY_A).get("Project").map(String::as_str), Some("Alpha"), "the world's tags are back");
    assert_eq!(forced.updates, seeded.updates, "exactly the world again");
    let stderr = server.term(EXIT_LIMIT);
    assert!(stderr.contains("replaced the restored state with the world file"), "{stderr}");

    // And the replacement is durable: a start without a world keeps it.
    let mut server = serve(&dir, &[]).await;
    assert_eq!(export(&mut server.admin().await).await, forced, "the forced world after a restart");
    let stderr = server.term(EXIT_LIMIT);
    assert_eq!(restored_revision(&stderr), Some(forced.revision), "{stderr}");
}

// ------------------------------------------------------------------ 6. export / import

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_and_import_round_trip() {
    let scratch = Scratch::new("export");
    let world = write_world(&scratch);
    let (d, d2, file) = (scratch.join("d"), scratch.join("d2"), scratch.join("export.json"));

    let mut server = serve(&d, &["--world", &world]).await;
    some_changes(&server, "exported").await;
    let original = export(&mut server.admin().await).await;
    let original_answers = answers(&server).await;
    server.term(EXIT_LIMIT);

    let (code, _, stderr) = run(&["export".into(), "--data-dir".into(), s(&d), "--output".into(), s(&file)]);
    assert_eq!(code, Some(0), "tagward export: {stderr}");
    assert!(stderr.contains(&format!("exported revision {}", original.revision)), "{stderr}");
    let (code, _, stderr) = run(&["import".into(), "--data-dir".into(), s(&d2), s(&file)]);
    assert_eq!(code, Some(0), "tagward import: {stderr}");

    let mut server = serve(&d2, &[]).await;
    let imported = export(&mut server.admin().await).await;
    assert_eq!(imported.updates, original.updates, "the imported state");
    let mut imported_answers = answers(&server).await;
    let stderr = server.term(EXIT_LIMIT);
    assert!(restored_revision(&stderr).is_some(), "{stderr}");
    for (a, r) in imported_answers.iter_mut().zip(&original_answers) {
        a.revision = r.revision;
    }
    assert_eq!(imported_answers, original_answers, "the same answers from the imported state");

    // Exporting the imported directory gives the same file.
    let file2 = scratch.join("export2.json");
    let (code, _, stderr) = run(&["export".into(), "--data-dir".into(), s(&d2), "--output".into(), s(&file2)]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file2).unwrap(), std::fs::read_to_string(&file).unwrap());
}

/// The eventName and principalId of each line of an audit file.
fn audit_events(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let field = |f: &str| v[f].as_str().unwrap_or_default().to_string();
            (field("eventName"), v["userIdentity"]["principalId"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_and_force_world_are_audited() {
    let scratch = Scratch::new("import-audit");
    let world = write_world(&scratch);
    let d = scratch.join("d");
    let audit = d.join("audit.jsonl");
    let replaced = |events: &[(String, String)]| events.iter().filter(|(name, _)| name == "ReplaceWorld").count();

    // Into an empty directory the world seeds it: nothing is replaced.
    let (code, _, stderr) = run(&["import".into(), "--data-dir".into(), s(&d), world.clone()]);
    assert_eq!(code, Some(0), "tagward import: {stderr}");
    assert_eq!(replaced(&audit_events(&audit)), 0);
    // Over a state: one ReplaceWorld record in DATA_DIR/audit.jsonl.
    let (code, _, stderr) = run(&["import".into(), "--data-dir".into(), s(&d), world.clone()]);
    assert_eq!(code, Some(0), "tagward import: {stderr}");
    let events = audit_events(&audit);
    assert_eq!(events, vec![("ReplaceWorld".to_string(), "world-file".to_string())], "{events:?}");

    // --force-world on serve: audited in the same default file before serving.
    let mut server = serve(&d, &["--world", &world, "--force-world"]).await;
    assert_eq!(replaced(&audit_events(&audit)), 2, "{:?}", audit_events(&audit));
    server.term(EXIT_LIMIT);
}
