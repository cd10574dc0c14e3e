//! The audit trail: every tag change and every policy or entity change as a
//! JSON line shaped like a CloudTrail record, written (and synced) before
//! the change is acknowledged, so a tag-operation audit event is never
//! dropped. The same events stream through `Admin.Watch`.
//!
//! Refusals are records too ([`Refusal`]: a tag operation denied by policy
//! or refused because the caller may not act as the principal it names, a
//! refused admin update), with CloudTrail's `errorCode` and `errorMessage`
//! and the revision they were refused at (they change no revision). The
//! committer thread writes them with the next sync, so a refusal never
//! waits for a file on an async worker.
//!
//! Every record carries the sidecar's name (`additionalEventData.node`,
//! from `--node-name`) and an `eventID` formatted like a UUID: a random
//! 64-bit prefix drawn when the trail is opened, and a counter, so that ids
//! differ between sidecars and between runs of one sidecar even for the
//! same revision.

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use tagward_core::change::{ChangeKind, EntityKind, Event, EventKind};

/// An append-only file of audit records, rotated by size.
pub struct AuditLog {
    path: PathBuf,
    out: BufWriter<File>,
    node: String,
    ids: EventIds,
    /// Bytes in the current file.
    size: u64,
    rotation: Rotation,
    /// The newest revision a change record in the trail holds, when the
    /// trail was opened.
    last_revision: Option<u64>,
    /// Bytes of a torn last line cut off when the trail was opened.
    cut: u64,
}

/// When the trail moves to a new file and how many old ones it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The current file is renamed `NAME.1` (older ones `NAME.2`, ...)
    /// once it holds this many bytes; 0 never rotates.
    pub max_bytes: u64,
    /// Rotated files kept; the oldest beyond them is removed.
    pub keep: usize,
}

impl Default for Rotation {
    fn default() -> Rotation {
        Rotation { max_bytes: 64 << 20, keep: 5 }
    }
}

/// How much of the end of a trail file is read at open to find the newest
/// audited revision.
const TAIL_BYTES: u64 = 1 << 20;

/// The newest revision in the change records of the last `TAIL_BYTES` of
/// `path` (records are written in revision order).
fn last_revision_in(path: &Path) -> std::io::Result<Option<u64>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let newest = tail.split(|b| *b == b'\n').rev().filter_map(|line| serde_json::from_slice::<Value>(line).ok()).find_map(|r| {
        if r.get("errorCode").is_some() {
            None
        } else {
            r["additionalEventData"]["revision"].as_u64()
        }
    });
    Ok(newest)
}

/// Cuts a torn last line (a write a crash interrupted: no newline at the
/// end) off `file`; returns the bytes cut.
fn cut_torn_line(file: &mut File) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let mut at = len;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let start = at.saturating_sub(chunk.len() as u64);
        let n = (at - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..n])?;
        if let Some(i) = chunk[..n].iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                file.set_len(keep)?;
                file.sync_data()?;
            }
            return Ok(len - keep);
        }
        if start == 0 {
            file.set_len(0)?;
            file.sync_data()?;
            return Ok(len);
        }
        at = start;
    }
}

/// `NAME.N` beside `path`.
fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Event ids: a random prefix per opened trail, then a counter.
#[derive(Debug)]
pub struct EventIds {
    prefix: u64,
    next: u64,
}

impl EventIds {
    /// A fresh random prefix (from the standard library's randomly keyed
    /// hasher, mixed with the process id and the time).
    pub fn new() -> EventIds {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_i64(chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default());
        EventIds { prefix: h.finish(), next: 0 }
    }

    /// The next id, as a version-8 (custom) UUID.
    pub fn next_id(&mut self) -> String {
        let (hi, lo) = (self.prefix, self.next);
        self.next = self.next.wrapping_add(1);
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            (hi & 0x0fff) | 0x8000,
            ((lo >> 48) & 0x3fff) | 0x8000,
            lo & 0xffff_ffff_ffff
        )
    }
}

impl Default for EventIds {
    fn default() -> EventIds {
        EventIds::new()
    }
}

/// The name a sidecar gives itself when `--node-name` is not set: the
/// host name (`HOSTNAME`, else the kernel's), else `tagward`.
pub fn default_node_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tagward".to_string())
}

/// A refused write, for the audit trail: it changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub time_unix_ms: i64,
    /// The principal the request named (a tag operation), or the admin
    /// caller's name (an admin update).
    pub actor: String,
    /// The verified identity of the caller, when the refusal is about it
    /// (`spiffe://...`, `uid 1000`, `tcp 10.0.0.7:51234`).
    pub caller: Option<String>,
    /// The revision the request was refused at.
    pub revision: u64,
    pub what: Refused,
    /// CloudTrail's `errorCode`: `AccessDenied`, `CallerNotAllowed`, or the
    /// update's error name.
    pub error_code: String,
    pub error_message: String,
}

/// What was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A tag operation: `action` as authorized (`kms:TagResource`), the
    /// tags it would have set and the keys it would have removed.
    Tags { resource: String, action: String, tags: Vec<(String, String)>, keys: Vec<String> },
    /// An admin update, by its field name (`put_policy`, `set_tags`).
    Update { update: String },
    /// A KMS alias or grant operation: `action` as authorized
    /// (`kms:CreateAlias`) on `resource` (the alias or key it was denied on).
    Kms { resource: String, action: String },
}

fn tags_json(tags: &[(String, String)]) -> Value {
    Value::Array(tags.iter().map(|(k, v)| json!({"tagKey": k, "tagValue": v})).collect())
}

fn service_of(arn: &str) -> &str {
    tagward_core::arn::Arn::parse(arn).map_or("tagward", |a| a.service)
}

fn time_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
}

fn identity_of(actor: &str) -> Value {
    if actor.starts_with("arn:") {
        let kind = match tagward_core::arn::Caller::parse(actor).map(|c| c.principal_type()) {
            Ok("User") => "IAMUser",
            Ok("AssumedRole") => "AssumedRole",
            Ok(_) => "Root",
            Err(_) => "Unknown",
        };
        json!({"type": kind, "arn": actor})
    } else {
        json!({"type": "TagwardAdmin", "principalId": actor})
    }
}

/// `put_policy` as an event name: `PutPolicy`.
fn camel(field: &str) -> String {
    field
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

/// A record in CloudTrail's shape: the envelope of one API call (version,
/// time, source, name, id, caller), with `fields` (the request
/// parameters, resources and extra data) added to it.
fn api_call(time: String, identity: Value, source: &str, name: &str, event_id: &str, fields: Value) -> Value {
    let mut record = json!({
        "eventVersion": "1.08",
        "eventTime": time,
        "eventSource": source,
        "eventName": name,
        "eventType": "AwsApiCall",
        "eventID": event_id,
        "readOnly": false,
        "userIdentity": identity,
    });
    if let (Some(record), Value::Object(fields)) = (record.as_object_mut(), fields) {
        record.extend(fields);
    }
    record
}

/// The CloudTrail-shaped record of one refusal.
pub fn refusal_record(r: &Refusal, node: &str, event_id: &str) -> Value {
    let mut extra = json!({"revision": r.revision, "node": node});
    if let Some(caller) = &r.caller {
        extra["caller"] = json!(caller);
    }
    let (source, name, params, resources) = match &r.what {
        Refused::Tags { resource, action, tags, keys } => {
            extra["action"] = json!(action);
            let name = action.split_once(':').map_or(action.as_str(), |(_, n)| n).to_string();
            let params = json!({"resourceArn": resource, "tags": tags_json(tags), "tagKeys": keys});
            (format!("{}.amazonaws.com", service_of(resource)), name, params, json!([{"ARN": resource}]))
        }
        Refused::Update { update } => ("tagward".to_string(), camel(update), json!({"update": update}), json!([])),
        Refused::Kms { resource, action } => {
            extra["action"] = json!(action);
            let name = action.split_once(':').map_or(action.as_str(), |(_, n)| n).to_string();
            ("kms.amazonaws.com".to_string(), name, json!({"resource": resource}), json!([{"ARN": resource}]))
        }
    };
    api_call(
        time_of(r.time_unix_ms),
        identity_of(&r.actor),
        &source,
        &name,
        event_id,
        json!({
        "errorCode": r.error_code,
        "errorMessage": r.error_message,
        "requestParameters": params,
        "resources": resources,
        "additionalEventData": extra,
        }),
    )
}

/// The CloudTrail-shaped record of one event.
pub fn record(e: &Event, node: &str, event_id: &str) -> Value {
    let time = time_of(e.time_unix_ms);
    let identity = identity_of(&e.actor);
    match &e.kind {
        EventKind::Tags { resource, action, before, after, allowed_by } => {
            let added: Vec<(String, String)> = after.iter().filter(|t| !before.contains(t)).cloned().collect();
            let removed: Vec<&String> =
                before.iter().filter(|(k, _)| !after.iter().any(|(a, _)| a == k)).map(|(k, _)| k).collect();
            let name = if action == "admin" {
                if removed.is_empty() {
                    "TagResource"
                } else if added.is_empty() {
                    "UntagResource"
                } else {
                    "ReplaceTags"
                }
            } else {
                action.split_once(':').map_or(action.as_str(), |(_, n)| n)
            };
            api_call(
                time,
                identity,
                &format!("{}.amazonaws.com", service_of(resource)),
                name,
                event_id,
                json!({
                "requestParameters": {"resourceArn": resource, "tags": tags_json(&added), "tagKeys": removed},
                "resources": [{"ARN": resource}],
                "additionalEventData": {
                    "revision": e.revision,
                    "action": action,
                    "tagsBefore": tags_json(before),
                    "tagsAfter": tags_json(after),
                    "allowedBy": allowed_by,
                    "node": node,
                },
                }),
            )
        }
        EventKind::Alias { action, alias, key, previous_key, change, allowed_by } => {
            let name = kms_event_name(action, *change, "PutAlias", "DeleteAlias");
            let alias_arn = tagward_core::kms::alias_arn(key, alias).unwrap_or_default();
            let mut resources = vec![json!({"ARN": alias_arn}), json!({"ARN": key})];
            if let Some(p) = previous_key {
                resources.push(json!({"ARN": p}));
            }
            api_call(
                time,
                identity,
                "kms.amazonaws.com",
                &name,
                event_id,
                json!({
                "requestParameters": {"aliasName": alias, "targetKeyId": key},
                "resources": resources,
                "additionalEventData": {
                    "revision": e.revision,
                    "action": action,
                    "previousKeyId": previous_key,
                    "allowedBy": allowed_by,
                    "node": node,
                },
                }),
            )
        }
        EventKind::Grant { action, key, grant_id, grant, change, allowed_by } => {
            let name = kms_event_name(action, *change, "PutGrant", "DeleteGrant");
            let mut params = json!({"keyId": key, "grantId": grant_id});
            if let Some(g) = grant {
                params["granteePrincipal"] = json!(g.grantee_principal);
                params["retiringPrincipal"] = json!(g.retiring_principal);
                params["operations"] = json!(g.operations);
                params["constraints"] = serde_json::to_value(&g.constraints).unwrap_or(Value::Null);
                params["name"] = json!(g.name);
            }
            api_call(
                time,
                identity,
                "kms.amazonaws.com",
                &name,
                event_id,
                json!({
                "requestParameters": params,
                "resources": [{"ARN": key}],
                "additionalEventData": {
                    "revision": e.revision,
                    "action": action,
                    "allowedBy": allowed_by,
                    "node": node,
                },
                }),
            )
        }
        EventKind::Entity { kind, name, change } => {
            let verb = match change {
                ChangeKind::Put => "Put",
                ChangeKind::Delete => "Delete",
                ChangeKind::Replace => "Replace",
            };
            let noun = match kind {
                EntityKind::Policy => "Policy",
                EntityKind::Principal => "Principal",
                EntityKind::Resource => "Resource",
                EntityKind::World => "World",
                EntityKind::Organization => "Organization",
                EntityKind::Session => "Session",
                EntityKind::Endpoint => "Endpoint",
            };
            let event_name = format!("{verb}{noun}");
            api_call(
                time,
                identity,
                "tagward",
                &event_name,
                event_id,
                json!({
                "requestParameters": {"kind": kind.as_str(), "name": name},
                "additionalEventData": {"revision": e.revision, "node": node},
                }),
            )
        }
    }
}

impl AuditLog {
    /// Opens (creating) the file for appending. A torn last line, left by
    /// a crash in the middle of a write, is cut off first, so the next
    /// record starts on a line of its own; the newest audited revision is
    /// read from the end of the trail (the rotated file when the current
    /// one holds no change record yet).
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
        let cut = cut_torn_line(&mut file)?;
        let size = file.metadata()?.len();
        let last_revision = match last_revision_in(path)? {
            Some(rev) => Some(rev),
            None => last_revision_in(&rotated(path, 1))?,
        };
        Ok(AuditLog {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            node: default_node_name(),
            ids: EventIds::new(),
            size,
            rotation: Rotation { max_bytes: 0, keep: 0 },
            last_revision,
            cut,
        })
    }

    /// The same trail opened again, as [`AuditLog::open`] does (a torn last
    /// line cut), with this one's node and rotation: after a failed write.
    pub fn reopen(&self) -> std::io::Result<AuditLog> {
        Ok(AuditLog::open(&self.path)?.with_node(self.node.clone()).with_rotation(self.rotation))
    }

    /// Closes the trail without writing what is still buffered (the
    /// records of a write that failed).
    pub fn discard(self) {
        let (_file, _unwritten) = self.out.into_parts();
    }

    /// Rotates the trail by size (`--audit-max-bytes`, `--audit-keep`).
    pub fn with_rotation(mut self, rotation: Rotation) -> AuditLog {
        self.rotation = rotation;
        self
    }

    /// The newest revision the trail held a change record of when opened.
    pub fn last_revision(&self) -> Option<u64> {
        self.last_revision
    }

    /// Bytes of a torn last line cut off at open (0 when none).
    pub fn cut_bytes(&self) -> u64 {
        self.cut
    }

    /// Writes the records of changes replayed from the log at start that
    /// the trail lacks (the process died between the log's sync and the
    /// audit write), marked `"recovered": true`, and syncs them.
    pub fn write_recovered(&mut self, events: &[Event]) -> std::io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        for e in events {
            let id = self.ids.next_id();
            let mut r = record(e, &self.node, &id);
            r["additionalEventData"]["recovered"] = Value::Bool(true);
            self.line(&r)?;
        }
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        if let Some(rev) = events.last().map(|e| e.revision) {
            self.last_revision = Some(rev);
        }
        self.rotate_quietly();
        Ok(())
    }

    fn line(&mut self, r: &Value) -> std::io::Result<()> {
        let mut text = serde_json::to_vec(r)?;
        text.push(b'\n');
        self.out.write_all(&text)?;
        self.size += text.len() as u64;
        Ok(())
    }

    /// Once the current file is full: it becomes `NAME.1` (after its
    /// records are synced, so none is lost), older ones move up, the one
    /// beyond the retention count is removed, and a new file starts.
    fn rotate_if_full(&mut self) -> std::io::Result<()> {
        let Rotation { max_bytes, keep } = self.rotation;
        if max_bytes == 0 || self.size < max_bytes {
            return Ok(());
        }
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        if keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            match std::fs::remove_file(rotated(&self.path, keep)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            for n in (1..keep).rev() {
                match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        let file = OpenOptions::new().create(true).read(true).append(true).open(&self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.out = BufWriter::new(file);
        self.size = 0;
        Ok(())
    }

    /// Names the sidecar in every record (`--node-name`).
    pub fn with_node(mut self, node: impl Into<String>) -> AuditLog {
        self.node = node.into();
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Writes the records of `events`, then of `refusals`, and syncs them.
    pub fn write(&mut self, events: &[&Event], refusals: &[Refusal]) -> std::io::Result<()> {
        if events.is_empty() && refusals.is_empty() {
            return Ok(());
        }
        for e in events {
            let id = self.ids.next_id();
            let r = record(e, &self.node, &id);
            self.line(&r)?;
        }
        for r in refusals {
            let id = self.ids.next_id();
            let r = refusal_record(r, &self.node, &id);
            self.line(&r)?;
        }
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        self.rotate_quietly();
        Ok(())
    }

    /// Rotation happens after the records are synced: a failure to rotate
    /// loses nothing and refuses nothing (the file keeps growing), so it
    /// is logged rather than returned.
    fn rotate_quietly(&mut self) {
        if let Err(e) = self.rotate_if_full() {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot rotate the audit trail; it keeps growing");
        }
    }
}

/// A KMS change's CloudTrail event name: the operation of an authorized
/// call (`kms:CreateAlias` gives `CreateAlias`), else the admin's put or
/// delete.
fn kms_event_name(action: &str, change: ChangeKind, put: &str, delete: &str) -> String {
    match (action.split_once(':'), change) {
        (Some((_, name)), _) => name.to_string(),
        (None, ChangeKind::Delete) => delete.to_string(),
        (None, _) => put.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tagward-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn policy_event(revision: u64) -> Event {
        Event {
            revision,
            time_unix_ms: 1_700_000_000_000,
            actor: "admin".into(),
            kind: EventKind::Entity { kind: EntityKind::Policy, name: format!("p{revision}"), change: ChangeKind::Put },
        }
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_newest_revision_is_found() {
        let d = scratch("torn");
        let path = d.join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        log.write(&[&policy_event(1), &policy_event(2)], &[]).unwrap();
        drop(log);
        let whole = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"eventVersion\": \"1.0").unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!((log.cut_bytes(), log.last_revision()), (21, Some(2)));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        log.write_recovered(&[policy_event(3)]).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["additionalEventData"]["recovered"], true);
        assert_eq!(lines[2]["additionalEventData"]["revision"], 3);
        assert_eq!(AuditLog::open(&path).unwrap().last_revision(), Some(3));
    }

    #[test]
    fn the_trail_rotates_by_size_and_keeps_what_it_is_told() {
        let d = scratch("rotate");
        let path = d.join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap().with_rotation(Rotation { max_bytes: 1, keep: 2 });
        for rev in 1..=4 {
            log.write(&[&policy_event(rev)], &[]).unwrap();
        }
        drop(log);
        let revision_in = |p: PathBuf| last_revision_in(&p).unwrap();
        assert_eq!(revision_in(rotated(&path, 1)), Some(4), "the newest full file is NAME.1");
        assert_eq!(revision_in(rotated(&path, 2)), Some(3));
        assert!(!rotated(&path, 3).exists(), "only two are kept");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "a new file was started");
        // Reopened, the trail finds its newest revision in NAME.1.
        assert_eq!(AuditLog::open(&path).unwrap().last_revision(), Some(4));
    }

    #[test]
    fn tag_changes_look_like_cloudtrail_records() {
        let e = Event {
            revision: 42,
            time_unix_ms: 1_700_000_000_000,
            actor: "arn:aws:iam::111122223333:role/KeyAdmin".into(),
            kind: EventKind::Tags {
                resource: "arn:aws:kms:us-east-1:111122223333:key/k1".into(),
                action: "kms:TagResource".into(),
                before: vec![("Project".into(), "Alpha".into())],
                after: vec![("Project".into(), "Beta".into())],
                allowed_by: vec!["KeyTagAdmin[0] \"ManageProjectTags\"".into()],
            },
        };
        let r = record(&e, "node-a", "id");
        assert_eq!(r["eventName"], "TagResource");
        assert_eq!(r["additionalEventData"]["node"], "node-a");
        assert_eq!(r["eventSource"], "kms.amazonaws.com");
        assert_eq!(r["eventTime"], "2023-11-14T22:13:20Z");
        assert_eq!(r["userIdentity"]["type"], "AssumedRole");
        assert_eq!(r["requestParameters"]["tags"][0]["tagValue"], "Beta");
        assert_eq!(r["additionalEventData"]["tagsBefore"][0]["tagValue"], "Alpha");
        assert_eq!(r["additionalEventData"]["revision"], 42);
    }

    #[test]
    fn alias_and_grant_changes_are_kms_records() {
        let key = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let alias = Event {
            revision: 7,
            time_unix_ms: 0,
            actor: "arn:aws:iam::111122223333:role/Admin".into(),
            kind: EventKind::Alias {
                action: "kms:UpdateAlias".into(),
                alias: "alias/app".into(),
                key: key.into(),
                previous_key: Some("arn:aws:kms:us-east-1:111122223333:key/k0".into()),
                change: ChangeKind::Put,
                allowed_by: vec!["Admin[0]".into()],
            },
        };
        let r = record(&alias, "node-1", "id");
        assert_eq!((r["eventSource"].as_str(), r["eventName"].as_str()), (Some("kms.amazonaws.com"), Some("UpdateAlias")));
        assert_eq!(r["resources"][0]["ARN"], "arn:aws:kms:us-east-1:111122223333:alias/app");
        assert_eq!(r["additionalEventData"]["previousKeyId"], "arn:aws:kms:us-east-1:111122223333:key/k0");
        let grant = Event {
            revision: 8,
            time_unix_ms: 0,
            actor: "admin".into(),
            kind: EventKind::Grant {
                action: "admin".into(),
                key: key.into(),
                grant_id: "g1".into(),
                grant: None,
                change: ChangeKind::Delete,
                allowed_by: Vec::new(),
            },
        };
        let r = record(&grant, "node-1", "id");
        assert_eq!((r["eventName"].as_str(), r["requestParameters"]["grantId"].as_str()), (Some("DeleteGrant"), Some("g1")));
        assert_eq!(r["userIdentity"]["type"], "TagwardAdmin");
    }

    #[test]
    fn entity_changes_are_named_by_change_and_kind() {
        let named = |kind, change| {
            let e = Event {
                revision: 1,
                time_unix_ms: 0,
                actor: "admin".into(),
                kind: EventKind::Entity { kind, name: "n".into(), change },
            };
            record(&e, "n", "id")["eventName"].as_str().unwrap().to_string()
        };
        assert_eq!(named(EntityKind::Policy, ChangeKind::Put), "PutPolicy");
        assert_eq!(named(EntityKind::Principal, ChangeKind::Delete), "DeletePrincipal");
        assert_eq!(named(EntityKind::Resource, ChangeKind::Put), "PutResource");
        assert_eq!(named(EntityKind::World, ChangeKind::Replace), "ReplaceWorld");
    }

    #[test]
    fn refusals_carry_the_error_and_change_no_revision() {
        let r = Refusal {
            time_unix_ms: 0,
            actor: "arn:aws:iam::111122223333:root".into(),
            caller: Some("uid 1000".into()),
            revision: 7,
            what: Refused::Tags {
                resource: "arn:aws:kms:us-east-1:111122223333:key/k1".into(),
                action: "kms:TagResource".into(),
                tags: vec![("Project".into(), "Beta".into())],
                keys: Vec::new(),
            },
            error_code: "CallerNotAllowed".into(),
            error_message: "principal: no".into(),
        };
        let v = refusal_record(&r, "node-a", "id-1");
        assert_eq!((v["errorCode"].as_str(), v["eventName"].as_str()), (Some("CallerNotAllowed"), Some("TagResource")));
        assert_eq!(v["errorMessage"], "principal: no");
        assert_eq!(v["additionalEventData"]["revision"], 7);
        assert_eq!(v["additionalEventData"]["caller"], "uid 1000");
        assert_eq!(v["userIdentity"]["type"], "Root");
        let u = Refusal { what: Refused::Update { update: "put_policy".into() }, caller: None, ..r };
        assert_eq!(refusal_record(&u, "n", "i")["eventName"], "PutPolicy");
    }

    #[test]
    fn event_ids_look_like_uuids_and_differ_between_trails() {
        let (mut a, mut b) = (EventIds::new(), EventIds::new());
        let (a0, a1, b0) = (a.next_id(), a.next_id(), b.next_id());
        assert_ne!(a0, a1);
        assert_ne!(a0, b0, "two trails (two sidecars, or two runs) give different ids for the same position");
        let parts: Vec<usize> = a0.split('-').map(str::len).collect();
        assert_eq!(parts, vec![8, 4, 4, 4, 12], "{a0}");
        assert_eq!(a0.as_bytes()[14], b'8', "version 8: {a0}");
    }
}
