//! The vocabulary of changes: the admin [`Update`] (what the admin stream
//! and the log carry), the refusal [`UpdateError`], and the [`Event`] a
//! published change produces (what `Watch` streams and the audit trail
//! records), with [`apply`], which applies an update to a [`State`] all or
//! nothing and says what happened.

use serde_json::Value;
use thiserror::Error;

use crate::policy::PolicyKind;
use crate::state::{State, StateError};
use crate::tagging::TagChange;
use crate::tags::{check_key, check_tag, TagSet, TagSetError};
use crate::world::{build_principal, compile_policy, PrincipalSpec, ResourceBuilder, ResourceSpec, WorldSpec};

/// One change to the world, as the admin stream sends it (and as the log
/// records it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Update {
    PutPolicy {
        name: String,
        document: Value,
    },
    DeletePolicy {
        name: String,
    },
    PutPrincipal(PrincipalSpec),
    DeletePrincipal {
        arn: String,
    },
    PutResource(ResourceSpec),
    DeleteResource {
        arn: String,
    },
    /// Administrator's tag write: the tag rules apply, authorization not.
    SetTags {
        resource: String,
        tags: Vec<(String, String)>,
    },
    RemoveTags {
        resource: String,
        keys: Vec<String>,
    },
    /// All or nothing.
    Batch(Vec<Update>),
    /// The whole state, all or nothing.
    ReplaceWorld(WorldSpec),
    /// The exact tag set of a resource: how the log records the effect of an
    /// authorized tag operation.
    ReplaceTags {
        resource: String,
        tags: Vec<(String, String)>,
    },
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
    pub fn new(code: &'static str, message: impl Into<String>) -> UpdateError {
        UpdateError { code, message: message.into() }
    }
}

/// What a change event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Tags {
        resource: String,
        action: String,
        before: Vec<(String, String)>,
        after: Vec<(String, String)>,
        /// The statements that allowed the change (empty for the admin).
        allowed_by: Vec<String>,
    },
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

/// A tag set as key/value pairs, for events and log records.
pub fn pairs(tags: &TagSet) -> Vec<(String, String)> {
    tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Milliseconds since the epoch, for event times.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The event of an authorized tag operation.
pub fn tag_event(change: &TagChange, allowed_by: Vec<String>) -> Event {
    Event {
        revision: change.revision,
        time_unix_ms: now_ms(),
        actor: change.principal.clone(),
        kind: EventKind::Tags {
            resource: change.resource.clone(),
            action: change.action.clone(),
            before: pairs(&change.before),
            after: pairs(&change.after),
            allowed_by,
        },
    }
}

/// The field an update is named by in error messages.
pub fn update_field(update: &Update) -> &'static str {
    match update {
        Update::PutPolicy { .. } => "put_policy",
        Update::DeletePolicy { .. } => "delete_policy",
        Update::PutPrincipal(_) => "put_principal",
        Update::DeletePrincipal { .. } => "delete_principal",
        Update::PutResource(_) => "put_resource",
        Update::DeleteResource { .. } => "delete_resource",
        Update::SetTags { .. } => "set_tags",
        Update::RemoveTags { .. } => "remove_tags",
        Update::Batch(_) => "batch",
        Update::ReplaceWorld(_) => "replace_world",
        Update::ReplaceTags { .. } => "replace_tags",
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

/// Applies `update` to `state` as `actor`, appending the events it produces;
/// on `Err`, `state` may hold part of it, so callers apply to a copy.
pub fn apply(
    state: &mut State,
    resources: &mut ResourceBuilder,
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
            let resource = resources.build("put_resource", spec).map_err(world_error)?;
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
                apply(state, resources, u, actor, events)
                    .map_err(|e| UpdateError::new(e.code, format!("batch.updates[{i}].{}", e.message)))?;
            }
        }
        Update::ReplaceTags { resource, tags } => {
            let target = state.target(resource).ok_or_else(|| {
                UpdateError::new("NotFoundException", format!("replace_tags.resource: no resource {resource:?}"))
            })?;
            let before = target.tags().clone();
            let after = TagSet::from_tags(before.case_insensitive(), tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|e| UpdateError::new("TagException", format!("replace_tags.tags: {e}")))?;
            tag_write(state, resource, before, after, actor, events)?;
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
                allowed_by: Vec::new(),
            },
        });
    }
    Ok(())
}
