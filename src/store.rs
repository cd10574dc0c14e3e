//! The live world: the current [`State`] behind an atomic pointer, the one
//! writer, revisions that readers can wait for, and the change events that
//! `Admin.Watch` streams.
//!
//! Readers do one `ArcSwap` load and then evaluate on an immutable snapshot.
//! Writers take the write lock, clone the current state (cheap: persistent
//! maps), change the clone and swap it in, so a reader sees a whole update
//! or none of it.
//!
//! INVARIANT: the stored state's revision only grows; every revision a
//! writer publishes has its events in the event log before the revision is
//! announced, so a watcher that asks "after N" misses nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::Value;
use thiserror::Error;
use tokio::sync::{broadcast, watch};

use crate::policy::PolicyKind;
use crate::state::{State, StateError};
use crate::tagging::{perform, TagChange, TagError, TagOutcome, TagRequest};
use crate::tags::{check_key, check_tag, TagSet, TagSetError};
use crate::world::{build_principal, compile_policy, PrincipalSpec, ResourceBuilder, ResourceSpec, WorldSpec};

/// One change to the world, as the admin stream sends it.
#[derive(Debug, Clone)]
pub enum Update {
    PutPolicy { name: String, document: Value },
    DeletePolicy { name: String },
    PutPrincipal(PrincipalSpec),
    DeletePrincipal { arn: String },
    PutResource(ResourceSpec),
    DeleteResource { arn: String },
    /// Administrator's tag write: the tag rules apply, authorization not.
    SetTags { resource: String, tags: Vec<(String, String)> },
    RemoveTags { resource: String, keys: Vec<String> },
    /// All or nothing.
    Batch(Vec<Update>),
    /// The whole state, all or nothing.
    ReplaceWorld(WorldSpec),
}

/// A refused update: the AWS-style error name and the message (with the
/// field path).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code}: {message}")]
pub struct UpdateError {
    pub code: &'static str,
    pub message: String,
}

impl UpdateError {
    fn new(code: &'static str, message: impl Into<String>) -> UpdateError {
        UpdateError { code, message: message.into() }
    }
}

/// What a change event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Tags { resource: String, action: String, before: Vec<(String, String)>, after: Vec<(String, String)> },
    /// `kind`: policy, principal, resource or world; `change`: put, delete
    /// or replace.
    Entity { kind: &'static str, name: String, change: &'static str },
}

/// A change event, at the revision it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: u64,
    pub time_unix_ms: i64,
    pub actor: String,
    pub kind: EventKind,
}

/// A tag operation's result, as the store applied it.
#[derive(Debug)]
pub struct Tagged {
    pub outcome: TagOutcome,
    /// The revision after the operation.
    pub revision: u64,
    /// This operation changed the tags (and so made `revision`).
    pub changed: bool,
}

/// Why a watch cannot start.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("events after revision {asked} are no longer kept (the oldest kept follows revision {dropped}); export the state and watch from its revision")]
pub struct WatchGone {
    pub asked: u64,
    pub dropped: u64,
}

/// Waiting for a revision took too long.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("revision {wanted} not reached within {waited:?}; the current revision is {current}")]
pub struct RevisionTimeout {
    pub wanted: u64,
    pub current: u64,
    pub waited: Duration,
}

struct EventLog {
    kept: VecDeque<Arc<Event>>,
    capacity: usize,
    /// The highest revision whose event was dropped from `kept`.
    dropped: u64,
    live: broadcast::Sender<Arc<Event>>,
}

struct Writer {
    resources: ResourceBuilder,
}

/// The live world.
pub struct Store {
    current: ArcSwap<State>,
    writer: Mutex<Writer>,
    events: Mutex<EventLog>,
    revision: watch::Sender<u64>,
}

fn pairs(tags: &TagSet) -> Vec<(String, String)> {
    tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a half-made state behind:
    // the state is only swapped in whole. Carry on with the data.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Store {
    /// A store holding `state`, keeping up to `event_capacity` events for
    /// watchers that resume from a revision.
    pub fn new(state: State, event_capacity: usize) -> Store {
        let (live, _) = broadcast::channel(4096);
        let (revision, _) = watch::channel(state.revision());
        Store {
            current: ArcSwap::from_pointee(state),
            writer: Mutex::new(Writer { resources: ResourceBuilder::default() }),
            events: Mutex::new(EventLog { kept: VecDeque::new(), capacity: event_capacity.max(1), dropped: 0, live }),
            revision,
        }
    }

    /// The current snapshot: one atomic load.
    pub fn snapshot(&self) -> Arc<State> {
        self.current.load_full()
    }

    pub fn revision(&self) -> u64 {
        self.current.load().revision()
    }

    /// The current snapshot once its revision is at least `wanted`, waiting
    /// at most `limit`.
    pub async fn snapshot_at_least(&self, wanted: u64, limit: Duration) -> Result<Arc<State>, RevisionTimeout> {
        let now = self.snapshot();
        if now.revision() >= wanted {
            return Ok(now);
        }
        let mut rx = self.revision.subscribe();
        let reached = async move { rx.wait_for(|r| *r >= wanted).await.is_ok() };
        match tokio::time::timeout(limit, reached).await {
            Ok(true) => Ok(self.snapshot()),
            _ => Err(RevisionTimeout { wanted, current: self.revision(), waited: limit }),
        }
    }

    /// Publishes `next` and its events. Called with the writer lock held.
    fn publish(&self, next: State, events: Vec<Event>) {
        let revision = next.revision();
        {
            let mut log = lock(&self.events);
            for e in events {
                let e = Arc::new(e);
                if log.kept.len() == log.capacity {
                    if let Some(old) = log.kept.pop_front() {
                        log.dropped = old.revision;
                    }
                }
                log.kept.push_back(e.clone());
                // No receivers is fine: nobody is watching.
                let _ = log.live.send(e);
            }
        }
        self.current.store(Arc::new(next));
        self.revision.send_replace(revision);
    }

    /// Applies one admin update, all or nothing; returns the new revision.
    pub fn apply(&self, update: &Update, actor: &str) -> Result<u64, UpdateError> {
        let mut writer = lock(&self.writer);
        let current = self.snapshot();
        let mut next = State::clone(&current);
        let mut events = Vec::new();
        apply_one(&mut next, &mut writer, update, actor, &mut events)?;
        if next.revision() == current.revision() {
            return Ok(current.revision());
        }
        let revision = next.revision();
        self.publish(next, events);
        Ok(revision)
    }

    /// Performs a tag operation as a principal; a change is published
    /// before this returns. Gives the outcome, the revision after it and
    /// whether this operation changed anything.
    pub fn tag(&self, req: &TagRequest) -> Result<Tagged, TagError> {
        let _writer = lock(&self.writer);
        let current = self.snapshot();
        let mut outcome = perform(&current, req)?;
        Ok(match outcome.change.take() {
            Some((next, change)) => {
                let revision = next.revision();
                self.publish(next, vec![tag_event(&change)]);
                Tagged { outcome, revision, changed: true }
            }
            None => Tagged { outcome, revision: current.revision(), changed: false },
        })
    }

    /// The kept events after `from` (none for 0) and a receiver for the live
    /// ones, with no gap and no repeat between them.
    pub fn watch(&self, from: u64) -> Result<(Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>), WatchGone> {
        let log = lock(&self.events);
        let rx = log.live.subscribe();
        if from == 0 {
            return Ok((Vec::new(), rx));
        }
        if from < log.dropped {
            return Err(WatchGone { asked: from, dropped: log.dropped });
        }
        let backlog = log.kept.iter().filter(|e| e.revision > from).cloned().collect();
        Ok((backlog, rx))
    }
}

fn tag_event(change: &TagChange) -> Event {
    Event {
        revision: change.revision,
        time_unix_ms: now_ms(),
        actor: change.principal.clone(),
        kind: EventKind::Tags {
            resource: change.resource.clone(),
            action: change.action.clone(),
            before: pairs(&change.before),
            after: pairs(&change.after),
        },
    }
}

/// A refused state change, at the field `path` of the update.
fn state_error(path: &str, e: StateError) -> UpdateError {
    let code = match e {
        StateError::NoSuchPolicy(_) | StateError::NoSuchPrincipal(_) => "NoSuchEntityException",
        StateError::NoSuchResource(_) => "NotFoundException",
        StateError::Invalid(_) => "ValidationException",
        StateError::Tags(TagSetError::Limit { .. }) => "LimitExceededException",
        StateError::Tags(TagSetError::Rule(_)) => "TagException",
    };
    UpdateError::new(code, format!("{path}: {e}"))
}

/// Every message of an [`UpdateError`] starts with the field path inside the
/// update (`put_policy.document.Statement[0].Effect`, `set_tags.tags[2]`).
fn world_error(e: crate::world::WorldError) -> UpdateError {
    let code = if e.path.contains("polic") && !e.path.ends_with(".arn") {
        "MalformedPolicyDocumentException"
    } else if e.path.contains(".tags") {
        "TagException"
    } else {
        "ValidationException"
    };
    UpdateError::new(code, e.to_string())
}

fn entity(kind: &'static str, name: &str, change: &'static str, state: &State, actor: &str) -> Event {
    Event {
        revision: state.revision(),
        time_unix_ms: now_ms(),
        actor: actor.to_string(),
        kind: EventKind::Entity { kind, name: name.to_string(), change },
    }
}

fn apply_one(
    state: &mut State,
    writer: &mut Writer,
    update: &Update,
    actor: &str,
    events: &mut Vec<Event>,
) -> Result<(), UpdateError> {
    match update {
        Update::PutPolicy { name, document } => {
            if name.is_empty() {
                return Err(UpdateError::new("ValidationException", "put_policy.name: empty"));
            }
            let policy = compile_policy("put_policy.document", document, PolicyKind::Identity)
                .map_err(|e| UpdateError::new("MalformedPolicyDocumentException", e.to_string()))?;
            state.put_policy(name, policy).map_err(|e| state_error("put_policy.name", e))?;
            events.push(entity("policy", name, "put", state, actor));
        }
        Update::DeletePolicy { name } => {
            state.delete_policy(name).map_err(|e| state_error("delete_policy.name", e))?;
            events.push(entity("policy", name, "delete", state, actor));
        }
        Update::PutPrincipal(spec) => {
            let principal = build_principal("put_principal", spec, state, false).map_err(world_error)?;
            state.put_principal(principal).map_err(|e| state_error("put_principal.arn", e))?;
            events.push(entity("principal", &spec.arn, "put", state, actor));
        }
        Update::DeletePrincipal { arn } => {
            state.delete_principal(arn).map_err(|e| state_error("delete_principal.arn", e))?;
            events.push(entity("principal", arn, "delete", state, actor));
        }
        Update::PutResource(spec) => {
            let resource = writer.resources.build("put_resource", spec).map_err(world_error)?;
            state.put_resource(resource).map_err(|e| state_error("put_resource.arn", e))?;
            events.push(entity("resource", &spec.arn, "put", state, actor));
        }
        Update::DeleteResource { arn } => {
            state.delete_resource(arn).map_err(|e| state_error("delete_resource.arn", e))?;
            events.push(entity("resource", arn, "delete", state, actor));
        }
        Update::SetTags { resource, tags } => {
            if tags.is_empty() {
                return Err(UpdateError::new("ValidationException", "set_tags.tags: at least one tag is needed"));
            }
            for (i, (k, v)) in tags.iter().enumerate() {
                check_tag(k, v).map_err(|e| UpdateError::new("TagException", format!("set_tags.tags[{i}]: {e}")))?;
            }
            let target = state
                .target(resource)
                .ok_or_else(|| UpdateError::new("NotFoundException", format!("set_tags.resource: no resource {resource:?}")))?;
            let before = target.tags().clone();
            let after = before.with(tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(|e| match e {
                TagSetError::Limit { .. } => UpdateError::new("LimitExceededException", format!("set_tags.tags: {e}")),
                TagSetError::Rule(_) => UpdateError::new("TagException", format!("set_tags.tags: {e}")),
            })?;
            tag_write(state, resource, before, after, actor, events)?;
        }
        Update::RemoveTags { resource, keys } => {
            if keys.is_empty() {
                return Err(UpdateError::new("ValidationException", "remove_tags.tag_keys: at least one key is needed"));
            }
            for (i, k) in keys.iter().enumerate() {
                check_key(k).map_err(|e| UpdateError::new("TagException", format!("remove_tags.tag_keys[{i}]: {e}")))?;
            }
            let target = state.target(resource).ok_or_else(|| {
                UpdateError::new("NotFoundException", format!("remove_tags.resource: no resource {resource:?}"))
            })?;
            let before = target.tags().clone();
            let after = before.without(keys.iter().map(String::as_str));
            tag_write(state, resource, before, after, actor, events)?;
        }
        Update::Batch(updates) => {
            for (i, u) in updates.iter().enumerate() {
                apply_one(state, writer, u, actor, events)
                    .map_err(|e| UpdateError::new(e.code, format!("batch.updates[{i}].{}", e.message)))?;
            }
        }
        Update::ReplaceWorld(world) => {
            let mut next = State::default();
            world.apply(&mut next).map_err(|e| {
                let mut e = world_error(e);
                e.message = format!("replace_world.world_json.{}", e.message);
                e
            })?;
            next.follow(state.revision());
            *state = next;
            events.push(entity("world", "", "replace", state, actor));
        }
    }
    Ok(())
}

fn tag_write(
    state: &mut State,
    resource: &str,
    before: TagSet,
    after: TagSet,
    actor: &str,
    events: &mut Vec<Event>,
) -> Result<(), UpdateError> {
    if state.replace_tags(resource, after.clone()).map_err(|e| state_error("resource", e))? {
        events.push(Event {
            revision: state.revision(),
            time_unix_ms: now_ms(),
            actor: actor.to_string(),
            kind: EventKind::Tags {
                resource: resource.to_string(),
                action: "admin".to_string(),
                before: pairs(&before),
                after: pairs(&after),
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> Store {
        let world: WorldSpec = serde_json::from_value(json!({
            "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "tags": {"Project": "Alpha"}}]
        }))
        .unwrap();
        Store::new(world.build().unwrap(), 3)
    }

    #[test]
    fn a_refused_batch_changes_nothing() {
        let s = store();
        let before = s.revision();
        let batch = Update::Batch(vec![
            Update::SetTags { resource: "arn:aws:kms:us-east-1:111122223333:key/k1".into(), tags: vec![("A".into(), "1".into())] },
            Update::PutPolicy { name: "P".into(), document: json!({"Statement": {"Effect": "Permit"}}) },
        ]);
        let err = s.apply(&batch, "admin").unwrap_err();
        assert_eq!(err.code, "MalformedPolicyDocumentException");
        assert!(err.message.starts_with("batch.updates[1].put_policy.document.Statement.Effect: "), "{err}");
        assert_eq!(s.revision(), before);
        let tags = s.snapshot().target("arn:aws:kms:us-east-1:111122223333:key/k1").unwrap().tags().len();
        assert_eq!(tags, 1);
    }

    #[test]
    fn events_are_kept_and_resumable() {
        let s = store();
        let key = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let start = s.revision();
        for i in 0..5 {
            s.apply(&Update::SetTags { resource: key.into(), tags: vec![("n".into(), i.to_string())] }, "admin").unwrap();
        }
        let (backlog, _) = s.watch(start + 2).unwrap();
        assert_eq!(backlog.iter().map(|e| e.revision).collect::<Vec<_>>(), vec![start + 3, start + 4, start + 5]);
        assert!(s.watch(start).is_err(), "only three events are kept");
        assert_eq!(s.apply(&Update::SetTags { resource: key.into(), tags: vec![("n".into(), "4".into())] }, "admin").unwrap(), start + 5, "no-op keeps the revision");
    }

    #[test]
    fn replace_world_moves_the_revision_forward() {
        let s = store();
        let before = s.revision();
        let rev = s.apply(&Update::ReplaceWorld(WorldSpec::default()), "admin").unwrap();
        assert!(rev > before);
        assert_eq!(s.snapshot().counts(), (0, 0, 0));
    }

    #[tokio::test]
    async fn waiting_for_a_revision() {
        let s = Arc::new(store());
        let wanted = s.revision() + 1;
        assert!(s.snapshot_at_least(wanted, Duration::from_millis(20)).await.is_err());
        let writer = s.clone();
        let waiter = tokio::spawn(async move { s.snapshot_at_least(wanted, Duration::from_secs(5)).await.map(|st| st.revision()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        writer
            .apply(&Update::SetTags { resource: "arn:aws:kms:us-east-1:111122223333:key/k1".into(), tags: vec![("x".into(), "y".into())] }, "admin")
            .unwrap();
        assert_eq!(waiter.await.unwrap(), Ok(wanted));
    }
}
