//! The audit trail: every tag change and every policy or entity change as a
//! JSON line shaped like a CloudTrail record, written (and synced) before
//! the change is acknowledged, so a tag-operation audit event is never
//! dropped. The same events stream through `Admin.Watch`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use tagward_core::change::{ChangeKind, EntityKind, Event, EventKind};

/// An append-only file of audit records.
pub struct AuditLog {
    path: PathBuf,
    out: BufWriter<File>,
}

fn tags_json(tags: &[(String, String)]) -> Value {
    Value::Array(tags.iter().map(|(k, v)| json!({"tagKey": k, "tagValue": v})).collect())
}

fn service_of(arn: &str) -> &str {
    tagward_core::arn::Arn::parse(arn).map_or("tagward", |a| a.service)
}

/// The CloudTrail-shaped record of one event.
pub fn record(e: &Event) -> Value {
    let time = chrono::DateTime::from_timestamp_millis(e.time_unix_ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    let identity = if e.actor.starts_with("arn:") {
        let kind = match tagward_core::arn::Caller::parse(&e.actor).map(|c| c.principal_type()) {
            Ok("User") => "IAMUser",
            Ok("AssumedRole") => "AssumedRole",
            Ok(_) => "Root",
            Err(_) => "Unknown",
        };
        json!({"type": kind, "arn": e.actor})
    } else {
        json!({"type": "TagwardAdmin", "principalId": e.actor})
    };
    let event_id = format!("rev-{:020}", e.revision);
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
            json!({
                "eventVersion": "1.08",
                "eventTime": time,
                "eventSource": format!("{}.amazonaws.com", service_of(resource)),
                "eventName": name,
                "eventType": "AwsApiCall",
                "eventID": event_id,
                "readOnly": false,
                "userIdentity": identity,
                "requestParameters": {"resourceArn": resource, "tags": tags_json(&added), "tagKeys": removed},
                "resources": [{"ARN": resource}],
                "additionalEventData": {
                    "revision": e.revision,
                    "action": action,
                    "tagsBefore": tags_json(before),
                    "tagsAfter": tags_json(after),
                    "allowedBy": allowed_by,
                },
            })
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
            };
            let event_name = format!("{verb}{noun}");
            json!({
                "eventVersion": "1.08",
                "eventTime": time,
                "eventSource": "tagward",
                "eventName": event_name,
                "eventType": "AwsApiCall",
                "eventID": event_id,
                "readOnly": false,
                "userIdentity": identity,
                "requestParameters": {"kind": kind.as_str(), "name": name},
                "additionalEventData": {"revision": e.revision},
            })
        }
    }
}

impl AuditLog {
    /// Opens (creating) the file for appending.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog { path: path.to_path_buf(), out: BufWriter::new(file) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the records of `events` and syncs them.
    pub fn write(&mut self, events: &[&Event]) -> std::io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        for e in events {
            serde_json::to_writer(&mut self.out, &record(e))?;
            self.out.write_all(b"\n")?;
        }
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let r = record(&e);
        assert_eq!(r["eventName"], "TagResource");
        assert_eq!(r["eventSource"], "kms.amazonaws.com");
        assert_eq!(r["eventTime"], "2023-11-14T22:13:20Z");
        assert_eq!(r["userIdentity"]["type"], "AssumedRole");
        assert_eq!(r["requestParameters"]["tags"][0]["tagValue"], "Beta");
        assert_eq!(r["additionalEventData"]["tagsBefore"][0]["tagValue"], "Alpha");
        assert_eq!(r["additionalEventData"]["revision"], 42);
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
            record(&e)["eventName"].as_str().unwrap().to_string()
        };
        assert_eq!(named(EntityKind::Policy, ChangeKind::Put), "PutPolicy");
        assert_eq!(named(EntityKind::Principal, ChangeKind::Delete), "DeletePrincipal");
        assert_eq!(named(EntityKind::Resource, ChangeKind::Put), "PutResource");
        assert_eq!(named(EntityKind::World, ChangeKind::Replace), "ReplaceWorld");
    }
}
