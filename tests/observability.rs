//! Observability of `tagward serve`: the audit trail (CloudTrail-shaped JSON
//! lines, synced before a change is acknowledged) and Admin.Watch agree on
//! every change; Prometheus metrics move by exactly the traffic sent and keep
//! their labels bounded; the decision log keeps what its mode asks for and
//! accounts for every decision (written or counted as dropped); an ephemeral
//! sidecar writes an audit trail only when asked to.
//!
//! The real binary runs as a child process (tests/common/process.rs) on
//! loopback ports it picks, with a scratch directory; every wait has a
//! deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tagward::grpc::proto::{self, watch_event::Event as WatchKind};
use tokio::time::timeout;
use tonic::transport::Channel;

/// The keys of deploy/world/example.json.
const KEY_A: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
const KEY_B: &str = "arn:aws:kms:us-east-1:111122223333:key/0987dcba-09fe-87dc-65ba-ab0987654321";
const KEY_C: &str = "arn:aws:kms:us-east-1:111122223333:key/5555eeee-0000-0000-0000-000000000005";

const START_LIMIT: Duration = Duration::from_secs(15);
const EXIT_LIMIT: Duration = Duration::from_secs(10);
const CALL_LIMIT: Duration = Duration::from_secs(5);

/// A policy that parses as JSON but is no policy ("Permit" is no effect).
const MALFORMED_POLICY: &str =
    r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Permit", "Action": "kms:Decrypt", "Resource": "*"}]}"#;
const VALID_POLICY: &str = r#"{"Version": "2012-10-17", "Statement": [{"Sid": "ReadTags", "Effect": "Allow", "Action": "kms:ListResourceTags", "Resource": "*"}]}"#;

fn example_world() -> String {
    s(&manifest_dir().join("deploy/world/example.json"))
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

// ------------------------------------------------------------------ scratch

/// Every file below `dir`, recursively.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_below(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

// ------------------------------------------------------------------ processes

/// A `tagward serve` child process (tests/common/process.rs) and, when it
/// was started with one, its metrics address.
struct Sidecar {
    process: Tagward,
    metrics: Option<String>,
}

impl std::ops::Deref for Sidecar {
    type Target = Tagward;

    fn deref(&self) -> &Tagward {
        &self.process
    }
}

impl std::ops::DerefMut for Sidecar {
    fn deref_mut(&mut self) -> &mut Tagward {
        &mut self.process
    }
}

impl Sidecar {
    /// SIGTERM; insists on a clean exit and returns the stderr.
    fn term(&mut self) -> String {
        self.process.term(EXIT_LIMIT)
    }

    /// GET /metrics, parsed.
    fn scrape(&self) -> Metrics {
        let addr = self.metrics.as_deref().expect("started with --metrics-listen");
        let text = tokio::task::block_in_place(|| http_get_metrics(addr)).unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
        Metrics::parse(text)
    }
}

/// `tagward serve` on loopback ports it picks (and a metrics port when
/// `metrics`) with `extra`, run in `cwd`, once it answers health checks with
/// SERVING (and /metrics answers).
async fn serve(cwd: &Path, extra: &[&str], metrics: bool) -> Sidecar {
    serve_with_env(cwd, extra, metrics, &[]).await
}

/// [`serve`] with environment variables set for the process.
async fn serve_with_env(cwd: &Path, extra: &[&str], metrics: bool, env: &[(&str, &str)]) -> Sidecar {
    let mut last = String::new();
    // The metrics port is the one port chosen here (with `free_port`, which
    // races: the exporter cannot report a port it picked), so a start may
    // find it taken; then it is tried again with another.
    for _attempt in 0..4 {
        let metrics_addr = metrics.then(|| format!("127.0.0.1:{}", free_port()));
        let mut serve = Serve::new().cwd(cwd).args(["--shutdown-grace-secs", "3"]);
        if let Some(m) = &metrics_addr {
            serve = serve.args(["--metrics-listen", m]);
        }
        serve = serve.args(extra);
        for (k, v) in env {
            serve = serve.env(k, v);
        }
        let deadline = Instant::now() + START_LIMIT;
        let mut process = serve.spawn();
        let ready = match process.ready(START_LIMIT).await {
            Ok(()) => wait_metrics(&mut process, metrics_addr.as_deref(), deadline).await,
            Err(e) => Err(e),
        };
        match ready {
            Ok(()) => return Sidecar { process, metrics: metrics_addr },
            Err(stderr) => last = format!("tagward {:?} did not start:\n{stderr}", serve.argv()),
        }
    }
    panic!("{last}")
}

/// Waits until /metrics answers (when there is a metrics address).
async fn wait_metrics(process: &mut Tagward, addr: Option<&str>, deadline: Instant) -> Result<(), String> {
    let Some(addr) = addr else { return Ok(()) };
    loop {
        if let Some(status) = process.try_wait() {
            return Err(format!("exit status {status}\n{}", process.stderr()));
        }
        if tokio::task::block_in_place(|| http_get_metrics(addr)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            process.signal("-9");
            let _ = process.wait_for_exit(EXIT_LIMIT);
            return Err(format!("/metrics not answering within {START_LIMIT:?}\n{}", process.stderr()));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Bounds a call.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    timeout(CALL_LIMIT, f).await.unwrap_or_else(|_| panic!("{what}: no answer within {CALL_LIMIT:?}"))
}

// ------------------------------------------------------------------ metrics

/// A plain HTTP/1.1 GET of /metrics over a raw TCP stream (every step
/// bounded); the body.
fn http_get_metrics(addr: &str) -> Result<String, String> {
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{e}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let raw = String::from_utf8(raw).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| format!("no end of headers in {raw:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("status {status:?}"));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        dechunk(body)
    } else {
        Ok(body.to_string())
    }
}

fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").ok_or("a torn chunk header")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).map_err(|e| format!("chunk size: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).ok_or("a torn chunk")?);
        body = rest.get(size + 2..).ok_or("a torn chunk end")?;
    }
}

/// A scrape: the text and every sample as `name{k="v",...}` (labels sorted)
/// to its value.
struct Metrics {
    text: String,
    samples: BTreeMap<String, f64>,
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<(&str, &str)> = labels.to_vec();
    labels.sort();
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// `k="v",k2="v2"` (values may hold escaped quotes and commas).
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(',' | ' ')) {
            chars.next();
        }
        let mut name = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            name.push(c);
        }
        if name.is_empty() {
            return out;
        }
        assert_eq!(chars.next(), Some('"'), "a label value starts with a quote in {text:?}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((name.trim().to_string(), value));
    }
}

impl Metrics {
    fn parse(text: String) -> Metrics {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = match line.rfind('}') {
                Some(close) => (&line[..=close], line[close + 1..].trim()),
                None => line.split_once(' ').map(|(a, b)| (a, b.trim())).unwrap_or_else(|| panic!("a sample line {line:?}")),
            };
            // No timestamps are expected, but take the first token anyway.
            let value = value.split_whitespace().next().unwrap_or_else(|| panic!("no value in {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|e| panic!("value {v:?} in {line:?}: {e}")),
            };
            let k = match series.split_once('{') {
                Some((name, labels)) => {
                    let labels = parse_labels(labels.strip_suffix('}').unwrap());
                    let borrowed: Vec<(&str, &str)> = labels.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                    key(name, &borrowed)
                }
                None => series.to_string(),
            };
            assert!(samples.insert(k.clone(), value).is_none(), "the series {k} twice in one scrape");
        }
        Metrics { text, samples }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&key(name, labels)).copied()
    }

    /// A counter: absent until first incremented, so absent is 0.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    fn gauge(&self, name: &str) -> f64 {
        self.get(name, &[]).unwrap_or_else(|| panic!("no gauge {name} in\n{}", self.text))
    }

    /// Every sample of `name` whose labels include `labels`.
    fn series(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(String, f64)> {
        let prefix = format!("{name}{{");
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix) && labels.iter().all(|(lk, lv)| k.contains(&format!("{lk}=\"{lv}\""))))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

// ------------------------------------------------------------------ audit and log files

/// The complete lines of a JSON-lines file, parsed (a torn last line, still
/// being written, is left out; a missing file has none).
/// The JSON lines of `path` once there are at least `n` (refusal records
/// are written by the committer shortly after the refused call returns).
async fn json_lines_at_least(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + CALL_LIMIT;
    loop {
        let lines = json_lines(path);
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn json_lines(path: &Path) -> Vec<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("{}: {e}", path.display()),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => return Vec::new(),
    };
    complete
        .lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("{} line {}: {e}: {l:?}", path.display(), i + 1)))
        .collect()
}

/// `[{"tagKey": k, "tagValue": v}, ...]` as sorted pairs.
fn audit_tags(v: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = v
        .as_array()
        .unwrap_or_else(|| panic!("a tag list: {v}"))
        .iter()
        .map(|t| (t["tagKey"].as_str().unwrap().to_string(), t["tagValue"].as_str().unwrap().to_string()))
        .collect();
    out.sort();
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap_or_else(|| panic!("a list: {v}")).iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// Waits (bounded) until `path` holds at least `n` complete lines.
async fn wait_lines(path: &Path, n: usize, limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let lines = json_lines(path);
        if lines.len() >= n {
            return lines;
        }
        assert!(Instant::now() < deadline, "{} has {} lines after {limit:?}, expected {n}", path.display(), lines.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------ requests

fn tag_req(principal: &str, resource: &str, t: &[(&str, &str)]) -> proto::TagResourceRequest {
    proto::TagResourceRequest {
        principal: principal.to_string(),
        resource: resource.to_string(),
        tags: t.iter().map(|(k, v)| tag(k, v)).collect(),
        ..Default::default()
    }
}

fn untag_req(principal: &str, resource: &str, keys: &[&str]) -> proto::UntagResourceRequest {
    proto::UntagResourceRequest {
        principal: principal.to_string(),
        resource: resource.to_string(),
        tag_keys: keys.iter().map(|k| k.to_string()).collect(),
        ..Default::default()
    }
}

async fn authorize(
    authz: &mut AuthorizerClient<Channel>,
    principal: &str,
    action: &str,
    resource: &str,
) -> proto::AuthorizeResponse {
    within("Authorize", authz.authorize(authorize_req(principal, action, resource))).await.expect("Authorize").into_inner()
}

async fn apply(admin: &mut AdminClient<Channel>, updates: Vec<proto::Update>) -> Vec<proto::ApplyResponse> {
    within("Admin.Apply", apply_all(admin, updates)).await
}

// ------------------------------------------------------------------ 1. audit and watch

/// What one acknowledged change should look like, in the audit file and on
/// the Watch stream.
#[derive(Debug)]
struct Expected {
    revision: u64,
    actor: String,
    /// Tag changes; None for an entity change.
    tags: Option<TagExpect>,
    /// Entity changes: (kind, name, change).
    entity: Option<(String, String, String)>,
}

#[derive(Debug)]
struct TagExpect {
    resource: String,
    action: String,
    before: Vec<(String, String)>,
    after: Vec<(String, String)>,
    /// Whether allowed_by must be non-empty (a principal's change).
    needs_allow: bool,
}

fn tag_expect(
    resource: &str,
    action: &str,
    before: Vec<(String, String)>,
    after: Vec<(String, String)>,
    needs_allow: bool,
) -> Option<TagExpect> {
    Some(TagExpect { resource: resource.into(), action: action.into(), before, after, needs_allow })
}

/// An audit event id: UUID-shaped (8-4-4-4-12 hex digits), not derived
/// from the revision.
fn is_event_id(v: &Value) -> bool {
    v.as_str().is_some_and(|id| {
        id.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
            && id.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
    })
}

/// Checks the audit record of a tag change; returns its allowedBy.
#[allow(clippy::too_many_arguments)]
fn check_tag_record(
    r: &Value,
    event_name: &str,
    actor: &str,
    resource: &str,
    action: &str,
    revision: u64,
    before: &[(String, String)],
    after: &[(String, String)],
) -> Vec<String> {
    assert_eq!(r["eventName"], event_name, "{r:#}");
    assert_eq!(r["eventVersion"], "1.08", "{r:#}");
    assert_eq!(r["eventType"], "AwsApiCall", "{r:#}");
    assert_eq!(r["readOnly"], false, "{r:#}");
    assert_eq!(r["eventSource"], "kms.amazonaws.com", "{r:#}");
    assert!(is_event_id(&r["eventID"]), "eventID: {r:#}");
    assert!(r["eventTime"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 20), "eventTime: {r:#}");
    if actor == "admin" {
        assert_eq!(r["userIdentity"]["type"], "TagwardAdmin", "{r:#}");
        assert_eq!(r["userIdentity"]["principalId"], "admin", "{r:#}");
        assert!(r["userIdentity"].get("arn").is_none(), "{r:#}");
    } else {
        assert_eq!(r["userIdentity"]["type"], "AssumedRole", "{r:#}");
        assert_eq!(r["userIdentity"]["arn"], actor, "{r:#}");
    }
    assert_eq!(r["requestParameters"]["resourceArn"], resource, "{r:#}");
    assert_eq!(r["resources"][0]["ARN"], resource, "{r:#}");
    let extra = &r["additionalEventData"];
    assert_eq!(extra["revision"].as_u64(), Some(revision), "the record's revision is the acknowledged one: {r:#}");
    assert_eq!(extra["action"], action, "{r:#}");
    assert_eq!(audit_tags(&extra["tagsBefore"]), before, "tagsBefore: {r:#}");
    assert_eq!(audit_tags(&extra["tagsAfter"]), after, "tagsAfter: {r:#}");
    strings(&extra["allowedBy"])
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_and_watch_record_every_change() {
    let started = Instant::now();
    let scratch = Scratch::new("audit");
    let data_dir = scratch.join("data");
    let world = example_world();
    let mut server = serve(scratch.path(), &["--data-dir", &s(&data_dir), "--world", &world], false).await;
    // The default audit trail: DATA_DIR/audit.jsonl.
    let audit = data_dir.join("audit.jsonl");
    assert!(audit.is_file(), "no {} (the default audit log)", audit.display());
    let seeded = json_lines(&audit).len();

    let mut authz = server.authz().await;
    let mut tagging = server.tagging().await;
    let mut admin = server.admin().await;
    let rev0 = authorize(&mut authz, KEY_ADMIN, "kms:ListResourceTags", KEY_A).await.revision;
    let mut watch = within("Admin.Watch", admin.watch(proto::WatchRequest { from_revision: rev0 }))
        .await
        .expect("Admin.Watch opens")
        .into_inner();
    let mut expected: Vec<Expected> = Vec::new();
    let mut audited = seeded;

    // 1. TagResource as KeyAdmin: allowed by KeyTagAdmin's ManageProjectTags.
    let r = within("TagResource", tagging.tag_resource(tag_req(KEY_ADMIN, KEY_A, &[("Project", "Gamma")])))
        .await
        .expect("KeyAdmin may tag Project")
        .into_inner();
    let lines = json_lines(&audit); // at once: no sleep
    assert!(r.changed);
    assert_eq!(r.revision, rev0 + 1);
    assert_eq!(lines.len(), audited + 1, "the audit record is on disk when TagResource is answered");
    audited += 1;
    let (before, after) =
        (pairs(&[("Project", "Alpha"), ("Type", "General")]), pairs(&[("Project", "Gamma"), ("Type", "General")]));
    assert_eq!(tags_of(&r.tags), after);
    let rec = lines.last().unwrap();
    let allowed_by = check_tag_record(rec, "TagResource", KEY_ADMIN, KEY_A, "kms:TagResource", r.revision, &before, &after);
    assert!(!allowed_by.is_empty(), "allowedBy names the Allow statements: {rec:#}");
    assert!(allowed_by.iter().any(|s| s.contains("KeyTagAdmin") && s.contains("ManageProjectTags")), "{allowed_by:?}");
    assert_eq!(audit_tags(&rec["requestParameters"]["tags"]), pairs(&[("Project", "Gamma")]), "{rec:#}");
    assert_eq!(strings(&rec["requestParameters"]["tagKeys"]), Vec::<String>::new(), "{rec:#}");
    expected.push(Expected {
        revision: r.revision,
        actor: KEY_ADMIN.into(),
        tags: tag_expect(KEY_A, "kms:TagResource", before, after.clone(), true),
        entity: None,
    });

    // 2. UntagResource as KeyAdmin.
    let r = within("UntagResource", tagging.untag_resource(untag_req(KEY_ADMIN, KEY_A, &["Type"])))
        .await
        .expect("KeyAdmin may untag Type")
        .into_inner();
    let lines = json_lines(&audit);
    assert!(r.changed);
    assert_eq!(r.revision, rev0 + 2);
    assert_eq!(lines.len(), audited + 1, "the audit record is on disk when UntagResource is answered");
    audited += 1;
    let (before, after) = (after, pairs(&[("Project", "Gamma")]));
    assert_eq!(tags_of(&r.tags), after);
    let rec = lines.last().unwrap();
    let allowed_by = check_tag_record(rec, "UntagResource", KEY_ADMIN, KEY_A, "kms:UntagResource", r.revision, &before, &after);
    assert!(allowed_by.iter().any(|s| s.contains("ManageProjectTags")), "allowedBy: {rec:#}");
    assert_eq!(strings(&rec["requestParameters"]["tagKeys"]), vec!["Type".to_string()], "{rec:#}");
    expected.push(Expected {
        revision: r.revision,
        actor: KEY_ADMIN.into(),
        tags: tag_expect(KEY_A, "kms:UntagResource", before, after, true),
        entity: None,
    });

    // 3. A denied TagResource (Owner is not among the allowed keys): a
    //    refusal record (written by the committer soon after), no event, no
    //    revision.
    let denied = within("TagResource", tagging.tag_resource(tag_req(KEY_ADMIN, KEY_A, &[("Owner", "eve")])))
        .await
        .expect_err("KeyAdmin may not tag Owner");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let lines = json_lines_at_least(&audit, audited + 1).await;
    assert_eq!(lines.len(), audited + 1, "a denied tag operation leaves one audit record");
    let rec = lines.last().unwrap();
    assert_eq!((rec["errorCode"].as_str(), rec["eventName"].as_str()), (Some("AccessDenied"), Some("TagResource")), "{rec:#}");
    assert_eq!(rec["additionalEventData"]["revision"].as_u64(), Some(rev0 + 2), "refused at the current revision: {rec:#}");
    assert!(is_event_id(&rec["eventID"]), "eventID: {rec:#}");
    audited += 1;
    assert_eq!(authorize(&mut authz, KEY_ADMIN, "kms:ListResourceTags", KEY_A).await.revision, rev0 + 2);

    // 4. The administrator sets a tag.
    let acks = apply(&mut admin, vec![set_tags(KEY_B, &[("Owner", "ops")])]).await;
    let lines = json_lines(&audit);
    assert!(acks[0].error.is_none(), "{acks:?}");
    let rev = acks[0].revision;
    assert_eq!(rev, rev0 + 3);
    assert_eq!(lines.len(), audited + 1, "the audit record is on disk when set_tags is acknowledged");
    audited += 1;
    let (before, after) = (
        pairs(&[("Project", "Beta"), ("Type", "General")]),
        pairs(&[("Owner", "ops"), ("Project", "Beta"), ("Type", "General")]),
    );
    let rec = lines.last().unwrap();
    let allowed_by = check_tag_record(rec, "TagResource", "admin", KEY_B, "admin", rev, &before, &after);
    assert!(allowed_by.is_empty(), "the administrator needs no Allow: {rec:#}");
    expected.push(Expected {
        revision: rev,
        actor: "admin".into(),
        tags: tag_expect(KEY_B, "admin", before, after, false),
        entity: None,
    });

    // 5. The administrator puts a policy.
    let acks = apply(&mut admin, vec![put_policy("Observed", VALID_POLICY)]).await;
    let lines = json_lines(&audit);
    assert!(acks[0].error.is_none(), "{acks:?}");
    let rev = acks[0].revision;
    assert_eq!(rev, rev0 + 4);
    assert_eq!(lines.len(), audited + 1, "the audit record is on disk when put_policy is acknowledged");
    audited += 1;
    let rec = lines.last().unwrap();
    assert_eq!(rec["eventName"], "PutPolicy", "{rec:#}");
    assert_eq!(rec["eventSource"], "tagward", "{rec:#}");
    assert_eq!(rec["userIdentity"]["type"], "TagwardAdmin", "{rec:#}");
    assert_eq!(rec["requestParameters"]["kind"], "policy", "{rec:#}");
    assert_eq!(rec["requestParameters"]["name"], "Observed", "{rec:#}");
    assert_eq!(rec["additionalEventData"]["revision"].as_u64(), Some(rev), "{rec:#}");
    assert!(is_event_id(&rec["eventID"]), "eventID: {rec:#}");
    expected.push(Expected {
        revision: rev,
        actor: "admin".into(),
        tags: None,
        entity: Some(("policy".into(), "Observed".into(), "put".into())),
    });

    // The whole trail: one record per acknowledged change, in revision order
    // (and the refusal's record, which changed nothing).
    let all: Vec<Value> = json_lines(&audit).into_iter().filter(|r| r.get("errorCode").is_none()).collect();
    assert_eq!(all.len(), seeded + expected.len());
    let revs: Vec<u64> = all[seeded..].iter().map(|r| r["additionalEventData"]["revision"].as_u64().unwrap()).collect();
    assert_eq!(revs, expected.iter().map(|e| e.revision).collect::<Vec<_>>());

    // The Watch stream: the same changes, in the same order, nothing for the
    // denied call.
    for (i, want) in expected.iter().enumerate() {
        let ev = timeout(CALL_LIMIT, watch.message())
            .await
            .unwrap_or_else(|_| panic!("Watch event {i} ({want:?}) did not arrive within {CALL_LIMIT:?}"))
            .expect("the Watch stream")
            .unwrap_or_else(|| panic!("the Watch stream ended before event {i}"));
        assert_eq!(ev.revision, want.revision, "event {i}: {ev:?}");
        assert_eq!(ev.actor, want.actor, "event {i}: {ev:?}");
        let rec = &all[seeded + i];
        match (&ev.event, &want.tags, &want.entity) {
            (Some(WatchKind::TagChange(tc)), Some(t), None) => {
                assert_eq!(tc.resource, t.resource, "event {i}");
                assert_eq!(tc.action, t.action, "event {i}");
                assert_eq!(tags_of(&tc.before), t.before, "event {i}: before");
                assert_eq!(tags_of(&tc.after), t.after, "event {i}: after");
                assert_eq!(tc.allowed_by, strings(&rec["additionalEventData"]["allowedBy"]), "event {i}: allowed_by as audited");
                assert_eq!(!tc.allowed_by.is_empty(), t.needs_allow, "event {i}: allowed_by {:?}", tc.allowed_by);
            }
            (Some(WatchKind::EntityChange(ec)), None, Some((kind, name, change))) => {
                assert_eq!((&ec.kind, &ec.name, &ec.change), (kind, name, change), "event {i}");
            }
            other => panic!("event {i}: {ev:?} is not the expected {other:?}"),
        }
    }
    match timeout(Duration::from_millis(300), watch.message()).await {
        Err(_) => {}
        Ok(extra) => panic!("an event no change accounts for: {extra:?}"),
    }
    assert_eq!(json_lines(&audit).len(), audited);
    server.term();
    eprintln!("audit_and_watch_record_every_change: {:?}", started.elapsed());
}

// ------------------------------------------------------------------ 2. metrics

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_with_traffic() {
    let started = Instant::now();
    let scratch = Scratch::new("metrics");
    let world = example_world();
    let mut server = serve(scratch.path(), &["--data-dir", &s(&scratch.join("data")), "--world", &world], true).await;
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(&world).unwrap()).unwrap();
    let n_policies = spec["policies"].as_object().unwrap().len();
    let n_principals = spec["principals"].as_array().unwrap().len();
    let n_resources = spec["resources"].as_array().unwrap().len();
    let n_tags: usize = spec["principals"]
        .as_array()
        .unwrap()
        .iter()
        .chain(spec["resources"].as_array().unwrap())
        .map(|e| e.get("tags").and_then(Value::as_object).map_or(0, |t| t.len()))
        .sum();

    let mut authz = server.authz().await;
    let mut admin = server.admin().await;
    let before = server.scrape();

    // 3 allowed and 2 implicitly denied Authorize calls.
    for _ in 0..3 {
        assert!(allowed(&authorize(&mut authz, ALPHA_APP, "kms:Decrypt", KEY_A).await));
    }
    for _ in 0..2 {
        let r = authorize(&mut authz, BETA_APP, "kms:Decrypt", KEY_A).await;
        assert_eq!(r.reason, proto::Reason::ImplicitDeny as i32, "{r:?}");
    }
    // One BatchAuthorize of 4: 2 allowed, 2 implicitly denied.
    let batch = proto::BatchAuthorizeRequest {
        principal: ALPHA_APP.to_string(),
        items: vec![
            item("kms:Decrypt", KEY_A),
            item("kms:Encrypt", KEY_A),
            item("kms:Decrypt", KEY_B),
            item("kms:Encrypt", KEY_B),
        ],
        ..Default::default()
    };
    let b = within("BatchAuthorize", authz.batch_authorize(batch)).await.expect("BatchAuthorize").into_inner();
    let batch_allowed = b.results.iter().filter(|r| allowed(r)).count();
    assert_eq!(batch_allowed, 2, "{b:?}");
    assert!(b.results.iter().filter(|r| !allowed(r)).all(|r| r.reason == proto::Reason::ImplicitDeny as i32), "{b:?}");
    // One rejected admin update (a malformed policy), one applied.
    let acks = apply(&mut admin, vec![put_policy("Broken", MALFORMED_POLICY), put_policy("Extra", VALID_POLICY)]).await;
    let rejected = acks[0].error.as_ref().unwrap_or_else(|| panic!("the malformed policy was accepted: {acks:?}"));
    assert_eq!(rejected.code, "MalformedPolicyDocumentException", "{acks:?}");
    assert!(acks[1].error.is_none(), "{acks:?}");
    let last_ack = acks[1].revision;

    let after = server.scrape();
    let delta = |name: &str, labels: &[(&str, &str)]| after.counter(name, labels) - before.counter(name, labels);
    let report = || format!("before:\n{}\nafter:\n{}", before.text, after.text);

    assert_eq!(delta("tagward_decisions_total", &[("result", "allow"), ("reason", "Allowed")]), 5.0, "{}", report());
    assert_eq!(delta("tagward_decisions_total", &[("result", "deny"), ("reason", "ImplicitDeny")]), 4.0, "{}", report());
    assert_eq!(delta("tagward_decisions_total", &[("result", "deny"), ("reason", "ExplicitDeny")]), 0.0, "{}", report());
    // The repeated questions are answered from the decision cache: of the
    // five Authorize calls (looked up by their message's bytes), the second
    // and third of each kind. The batch is looked up whole (a miss), then
    // item by item (four misses: an item is known by its fields, and no
    // item was asked before that way).
    assert_eq!(delta("tagward_decision_cache_total", &[("result", "hit")]), 3.0, "{}", report());
    assert_eq!(delta("tagward_decision_cache_total", &[("result", "miss")]), 7.0, "{}", report());
    assert_eq!(delta("tagward_rpc_total", &[("rpc", "Authorize"), ("code", "OK")]), 5.0, "{}", report());
    assert_eq!(delta("tagward_rpc_total", &[("rpc", "BatchAuthorize"), ("code", "OK")]), 1.0, "{}", report());
    assert_eq!(delta("tagward_rpc_duration_seconds_count", &[("rpc", "Authorize")]), 5.0, "{}", report());
    assert_eq!(delta("tagward_rpc_duration_seconds_count", &[("rpc", "BatchAuthorize")]), 1.0, "{}", report());
    assert!(after.get("tagward_rpc_duration_seconds_sum", &[("rpc", "Authorize")]).is_some_and(|s| s > 0.0), "{}", report());
    // A histogram with buckets (not a summary): cumulative, ending in +Inf.
    let buckets = after.series("tagward_rpc_duration_seconds_bucket", &[("rpc", "Authorize")]);
    assert!(buckets.len() >= 2, "no _bucket lines for Authorize:\n{}", after.text);
    let mut by_le: Vec<(f64, f64)> = buckets
        .iter()
        .map(|(k, v)| {
            let le = k.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_else(|| panic!("no le in {k}"));
            (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, *v)
        })
        .collect();
    by_le.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert!(by_le.windows(2).all(|w| w[0].1 <= w[1].1), "buckets are cumulative: {by_le:?}");
    assert_eq!(by_le.last().unwrap().0, f64::INFINITY, "{by_le:?}");
    assert_eq!(
        by_le.last().unwrap().1,
        after.counter("tagward_rpc_duration_seconds_count", &[("rpc", "Authorize")]),
        "{by_le:?}"
    );
    assert!(after.text.contains("# TYPE tagward_rpc_duration_seconds histogram"), "{}", after.text);

    assert_eq!(
        delta("tagward_admin_updates_total", &[("result", "rejected"), ("code", "MalformedPolicyDocumentException")]),
        1.0,
        "{}",
        report()
    );
    assert_eq!(delta("tagward_admin_updates_total", &[("result", "applied")]), 1.0, "{}", report());

    assert_eq!(after.gauge("tagward_snapshot_revision"), last_ack as f64, "the revision the last ack reported\n{}", after.text);
    assert_eq!(after.gauge("tagward_policies"), (n_policies + 1) as f64, "{}", after.text);
    assert_eq!(after.gauge("tagward_principals"), n_principals as f64, "{}", after.text);
    assert_eq!(after.gauge("tagward_resources"), n_resources as f64, "{}", after.text);
    assert_eq!(after.gauge("tagward_tags"), n_tags as f64, "{}", after.text);
    let age = after.gauge("tagward_snapshot_age_seconds");
    assert!((0.0..60.0).contains(&age), "tagward_snapshot_age_seconds {age}");
    assert!(after.get("tagward_snapshot_published_timestamp_seconds", &[]).is_some(), "{}", after.text);

    // Bounded labels: never a principal or a resource.
    assert!(!after.text.contains("arn:"), "an ARN in the metrics:\n{}", after.text);
    for k in after.samples.keys() {
        assert!(!k.contains("111122223333"), "an account in a label: {k}");
    }
    server.term();
    eprintln!("metrics_move_with_traffic: {:?}", started.elapsed());
}

/// Every documented series is there before any traffic: counters at 0 for
/// their bounded label sets, RPC histograms, the build info; then tag
/// changes are counted by origin and the admin RPCs like the others.
#[tokio::test(flavor = "multi_thread")]
async fn every_documented_series_exists_from_the_start() {
    let scratch = Scratch::new("metrics-start");
    let world = example_world();
    let mut server = serve(scratch.path(), &["--ephemeral", "--world", &world], true).await;
    let first = server.scrape();
    let zero = |name: &str, labels: &[(&str, &str)]| {
        assert_eq!(first.get(name, labels), Some(0.0), "{name} {labels:?} missing or not 0 at start:\n{}", first.text);
    };
    zero("tagward_decisions_total", &[("result", "allow"), ("reason", "Allowed")]);
    zero("tagward_decisions_total", &[("result", "deny"), ("reason", "ExplicitDeny")]);
    zero("tagward_decisions_total", &[("result", "deny"), ("reason", "ImplicitDeny")]);
    zero("tagward_decision_cache_total", &[("result", "hit")]);
    zero("tagward_decision_cache_total", &[("result", "miss")]);
    for rpc in [
        "Authorize",
        "BatchAuthorize",
        "TagResource",
        "UntagResource",
        "ListResourceTags",
        "GetResources",
        "Apply",
        "Export",
        "Watch",
    ] {
        zero("tagward_rpc_total", &[("rpc", rpc), ("code", "OK")]);
        zero("tagward_rpc_duration_seconds_count", &[("rpc", rpc)]);
    }
    zero("tagward_admin_updates_total", &[("result", "applied")]);
    zero("tagward_tag_changes_total", &[("origin", "tagging")]);
    zero("tagward_tag_changes_total", &[("origin", "admin")]);
    zero("tagward_decision_log_dropped_total", &[]);
    zero("tagward_audit_write_failures_total", &[]);
    zero("tagward_store_failed", &[]);
    zero("tagward_watch_streams", &[]);
    assert_eq!(first.get("tagward_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0), "{}", first.text);

    // One tag change through the Tagging API (KeyAdmin may set Project),
    // one through the admin stream.
    let mut tagging = server.tagging().await;
    let tagged = within(
        "TagResource",
        tagging.tag_resource(proto::TagResourceRequest {
            principal: "arn:aws:iam::111122223333:role/KeyAdmin".to_string(),
            resource: KEY_A.to_string(),
            tags: vec![tag("Project", "Gamma")],
            ..Default::default()
        }),
    )
    .await;
    assert!(tagged.is_ok(), "{tagged:?}");
    let mut admin = server.admin().await;
    let acks = apply(&mut admin, vec![set_tags(KEY_A, &[("Owner", "ops")])]).await;
    assert!(acks[0].error.is_none(), "{acks:?}");
    let after = server.scrape();
    assert_eq!(after.counter("tagward_tag_changes_total", &[("origin", "tagging")]), 1.0, "{}", after.text);
    assert_eq!(after.counter("tagward_tag_changes_total", &[("origin", "admin")]), 1.0, "{}", after.text);
    assert_eq!(after.counter("tagward_rpc_total", &[("rpc", "TagResource"), ("code", "OK")]), 1.0, "{}", after.text);
    assert_eq!(after.counter("tagward_rpc_total", &[("rpc", "Apply"), ("code", "OK")]), 1.0, "{}", after.text);
    server.term();
}

/// A Watch stream its caller abandoned is closed at once on an idle sidecar,
/// not when the next change would have found it gone:
/// `tagward_watch_streams` counts them up and back down to 0 with no change
/// made in between.
#[tokio::test(flavor = "multi_thread")]
async fn abandoned_watch_streams_are_freed_without_waiting_for_a_change() {
    let scratch = Scratch::new("metrics-watch");
    let world = example_world();
    let mut server = serve(scratch.path(), &["--ephemeral", "--world", &world], true).await;
    let revision = server.scrape().gauge("tagward_snapshot_revision");
    let mut admin = server.admin().await;
    let mut streams = Vec::new();
    for _ in 0..50 {
        let stream = within("Watch", admin.watch(proto::WatchRequest { from_revision: 0 })).await.unwrap().into_inner();
        streams.push(stream);
    }
    let open = server.scrape();
    assert_eq!(open.gauge("tagward_watch_streams"), 50.0, "{}", open.text);
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = server.scrape();
        if now.gauge("tagward_watch_streams") == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "abandoned Watch streams still open:\n{}", now.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.scrape().gauge("tagward_snapshot_revision"), revision, "no change was made meanwhile");
    server.term();
}

/// `TAGWARD_LOG=tagward=debug` prints one line per RPC naming the RPC, the
/// action and the decision.
#[tokio::test(flavor = "multi_thread")]
async fn debug_logs_name_each_rpc_its_action_and_decision() {
    let scratch = Scratch::new("debug-log");
    let world = example_world();
    let mut server =
        serve_with_env(scratch.path(), &["--ephemeral", "--world", &world], false, &[("TAGWARD_LOG", "tagward=debug")]).await;
    let mut authz = server.authz().await;
    assert!(allowed(&authorize(&mut authz, ALPHA_APP, "kms:Decrypt", KEY_A).await));
    let r = authorize(&mut authz, BETA_APP, "kms:Encrypt", KEY_A).await;
    assert!(!allowed(&r));
    let stderr = server.term();
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("rpc finished") && l.contains("rpc=Authorize")).collect();
    assert_eq!(lines.len(), 2, "one line per Authorize:\n{stderr}");
    assert!(lines[0].contains("action=kms:Decrypt") && lines[0].contains("decision=Allowed"), "{}", lines[0]);
    assert!(lines[1].contains("action=kms:Encrypt") && lines[1].contains("decision=ImplicitDeny"), "{}", lines[1]);
}

/// An admin update refused before it reaches the store (its policy is not
/// even JSON) is a rejected update too.
#[tokio::test(flavor = "multi_thread")]
async fn unparsable_policy_counts_as_a_rejected_update() {
    let scratch = Scratch::new("metrics-json");
    let world = example_world();
    let mut server = serve(scratch.path(), &["--ephemeral", "--world", &world], true).await;
    let mut admin = server.admin().await;
    let before = server.scrape();
    let acks = apply(&mut admin, vec![put_policy("NotJson", "{ this is not json")]).await;
    let rejected = acks[0].error.as_ref().unwrap_or_else(|| panic!("accepted: {acks:?}"));
    assert_eq!(rejected.code, "MalformedPolicyDocumentException", "{acks:?}");
    let after = server.scrape();
    let labels = [("result", "rejected"), ("code", "MalformedPolicyDocumentException")];
    assert_eq!(
        after.counter("tagward_admin_updates_total", &labels) - before.counter("tagward_admin_updates_total", &labels),
        1.0,
        "a refused update is counted whatever stage refused it\n{}",
        after.text
    );
    server.term();
}

// ------------------------------------------------------------------ 3. decision log

#[tokio::test(flavor = "multi_thread")]
async fn decision_log_modes_and_drops() {
    let started = Instant::now();
    let scratch = Scratch::new("decisions");
    let world = example_world();

    // (a) Denies only.
    let log = scratch.join("denies.jsonl");
    let mut server = serve(
        scratch.path(),
        &["--ephemeral", "--world", &world, "--decision-log", &s(&log), "--decision-log-mode", "deny"],
        false,
    )
    .await;
    let mut authz = server.authz().await;
    for _ in 0..3 {
        assert!(allowed(&authorize(&mut authz, ALPHA_APP, "kms:Decrypt", KEY_A).await));
    }
    let implicit = authorize(&mut authz, BETA_APP, "kms:Decrypt", KEY_A).await;
    assert_eq!(implicit.reason, proto::Reason::ImplicitDeny as i32, "{implicit:?}");
    let explicit = authorize(&mut authz, ALPHA_APP, "kms:Decrypt", KEY_C).await;
    assert_eq!(explicit.reason, proto::Reason::ExplicitDeny as i32, "{explicit:?}");
    let lines = wait_lines(&log, 2, Duration::from_secs(5)).await;
    // A moment more, for anything that should not be there.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines_again = json_lines(&log);
    assert_eq!(lines_again.len(), 2, "only the denies: {lines_again:#?}");
    assert_eq!(lines, lines_again);
    let want = [(BETA_APP, KEY_A, "ImplicitDeny", implicit.revision), (ALPHA_APP, KEY_C, "ExplicitDeny", explicit.revision)];
    for (line, (principal, resource, reason, revision)) in lines.iter().zip(want) {
        assert_eq!(line["decision"], "Deny", "{line:#}");
        assert_eq!(line["principal"], principal, "{line:#}");
        assert_eq!(line["action"], "kms:Decrypt", "{line:#}");
        assert_eq!(line["resource"], resource, "{line:#}");
        assert_eq!(line["reason"], reason, "{line:#}");
        assert_eq!(line["revision"].as_u64(), Some(revision), "{line:#}");
        assert!(line["time"].is_string() && line["micros"].is_u64(), "{line:#}");
    }
    assert!(strings(&lines[1]["matched"]).iter().any(|m| m.contains("DenyReserved")), "{:#}", lines[1]);
    server.term();

    // (b) Everything, through a queue of one: every decision is written or
    //     counted as dropped.
    let log = scratch.join("all.jsonl");
    let server = serve(
        scratch.path(),
        &[
            "--ephemeral",
            "--world",
            &world,
            "--decision-log",
            &s(&log),
            "--decision-log-mode",
            "all",
            "--decision-log-queue",
            "1",
        ],
        true,
    )
    .await;
    let before_dropped = server.scrape().counter("tagward_decision_log_dropped_total", &[]);
    assert_eq!(before_dropped, 0.0);
    let mut authz = server.authz().await;
    let keys = [KEY_A, KEY_B, KEY_C];
    let actions = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"];
    let items: Vec<proto::BatchItem> = (0..1000).map(|i| item(actions[i % 3], keys[(i / 3) % 3])).collect();
    let batch = proto::BatchAuthorizeRequest { principal: ALPHA_APP.to_string(), items, ..Default::default() };
    let b = within("BatchAuthorize", authz.batch_authorize(batch)).await.expect("BatchAuthorize of 1000").into_inner();
    assert_eq!(b.results.len(), 1000);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (written, dropped) = loop {
        let written = json_lines(&log).len();
        let dropped = server.scrape().counter("tagward_decision_log_dropped_total", &[]) as usize;
        assert!(written + dropped <= 1000, "{written} written + {dropped} dropped > 1000 decisions");
        if written + dropped == 1000 {
            break (written, dropped);
        }
        assert!(Instant::now() < deadline, "after 10 s: {written} written + {dropped} dropped != 1000 decisions");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lines = json_lines(&log);
    assert!(lines.iter().all(|l| l["principal"] == ALPHA_APP && l["revision"].as_u64() == Some(b.revision)), "{lines:#?}");
    eprintln!("decision log with a queue of 1: {written} of 1000 written, {dropped} dropped (counted)");
    drop(server);
    eprintln!("decision_log_modes_and_drops: {:?}", started.elapsed());
}

// ------------------------------------------------------------------ 4. ephemeral audit

#[tokio::test(flavor = "multi_thread")]
async fn ephemeral_without_audit_flag_writes_no_audit_file() {
    let scratch = Scratch::new("ephemeral");
    let cwd = scratch.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let world = example_world();
    let mut server = serve(&cwd, &["--ephemeral", "--world", &world], false).await;
    let mut tagging = server.tagging().await;
    let mut admin = server.admin().await;
    let r = within("TagResource", tagging.tag_resource(tag_req(KEY_ADMIN, KEY_A, &[("Project", "Gamma")])))
        .await
        .expect("TagResource")
        .into_inner();
    assert!(r.changed);
    let acks = apply(&mut admin, vec![set_tags(KEY_B, &[("Owner", "ops")]), put_policy("Extra", VALID_POLICY)]).await;
    assert!(acks.iter().all(|a| a.error.is_none()), "{acks:?}");
    server.term();
    let written = files_below(scratch.path());
    assert!(written.is_empty(), "an ephemeral sidecar without --audit-log wrote {written:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ephemeral_with_audit_log_flag_writes_the_records() {
    let scratch = Scratch::new("ephemeral-audit");
    // A directory that does not exist yet.
    let audit = scratch.join("logs/audit.jsonl");
    let world = example_world();
    let mut server = serve(scratch.path(), &["--ephemeral", "--world", &world, "--audit-log", &s(&audit)], false).await;
    assert!(audit.is_file(), "{} is created at start", audit.display());
    assert_eq!(json_lines(&audit).len(), 0);
    let mut tagging = server.tagging().await;
    let mut admin = server.admin().await;

    let r = within("TagResource", tagging.tag_resource(tag_req(KEY_ADMIN, KEY_A, &[("Project", "Gamma")])))
        .await
        .expect("TagResource")
        .into_inner();
    let lines = json_lines(&audit);
    assert!(r.changed);
    assert_eq!(lines.len(), 1, "the record is on disk when TagResource is answered");
    let allowed_by = check_tag_record(
        &lines[0],
        "TagResource",
        KEY_ADMIN,
        KEY_A,
        "kms:TagResource",
        r.revision,
        &pairs(&[("Project", "Alpha"), ("Type", "General")]),
        &pairs(&[("Project", "Gamma"), ("Type", "General")]),
    );
    assert!(allowed_by.iter().any(|s| s.contains("ManageProjectTags")), "{allowed_by:?}");

    let denied = within("TagResource", tagging.tag_resource(tag_req(KEY_ADMIN, KEY_A, &[("Owner", "eve")]))).await;
    assert_eq!(denied.expect_err("denied").code(), tonic::Code::PermissionDenied);
    let lines = json_lines_at_least(&audit, 2).await;
    assert_eq!(lines.len(), 2, "one record for a denied call");
    assert_eq!(lines[1]["errorCode"], "AccessDenied", "{:#}", lines[1]);

    let acks = apply(&mut admin, vec![set_tags(KEY_B, &[("Owner", "ops")])]).await;
    let lines = json_lines(&audit);
    assert!(acks[0].error.is_none(), "{acks:?}");
    assert_eq!(lines.len(), 3, "the record is on disk when set_tags is acknowledged");
    check_tag_record(
        &lines[2],
        "TagResource",
        "admin",
        KEY_B,
        "admin",
        acks[0].revision,
        &pairs(&[("Project", "Beta"), ("Type", "General")]),
        &pairs(&[("Owner", "ops"), ("Project", "Beta"), ("Type", "General")]),
    );
    server.term();
    assert_eq!(files_below(scratch.path()), vec![audit.clone()], "only the audit log is written");
}
