//! The vocabulary of changes, as three distinct types:
//!
//! - [`Update`]: the admin command (what the admin stream sends): intent,
//!   validated against the head state by [`apply`];
//! - [`Change`] inside a [`Record`]: what is durable, the effect of an
//!   accepted command or tag operation (put or delete of an entity, the
//!   exact tag set of a resource, a replaced world), at the revision it led
//!   from and to; [`replay`] applies it again at recovery;
//! - [`Event`]: what a published change says to `Watch` and the audit trail.
//!
//! Refusals are [`UpdateError`]s: an [`ErrorCode`] and a message that
//! starts with the field path.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::chain::{EndpointSpec, OrganizationSpec, SessionSpec};
use crate::error::ErrorCode;
use crate::kms::alias_of_arn;
use crate::kms_ops::{KmsChange, KmsEffect};
use crate::path::FieldPath;
use crate::policy::PolicyKind;
use crate::state::{Resource, State, StateError};
use crate::tagging::{check_keys, check_tags, remove_tags, write_tags, TagChange, TagWriteError};
use crate::tags::TagSet;
use crate::world::{
    build_grant, build_principal, compile_policy, endpoint_spec, principal_spec, resource_spec, session_spec, GrantSpec,
    PrincipalSpec, ResourceBuilder, ResourceSpec, WorldSpec,
};

/// One admin command, as the admin stream sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Sets or replaces the organization (SCPs, RCPs, units, accounts).
    PutOrganization(OrganizationSpec),
    DeleteOrganization,
    /// Declares (or replaces) an assumed-role session.
    PutSession(SessionSpec),
    DeleteSession {
        arn: String,
    },
    /// Adds or replaces a VPC endpoint.
    PutEndpoint(EndpointSpec),
    DeleteEndpoint {
        id: String,
    },
    /// Points a KMS alias (`alias/NAME`) at a key, creating it or moving it
    /// from the key it pointed to (the alias rules apply, authorization not).
    PutAlias {
        key: String,
        alias: String,
    },
    /// Removes a KMS alias, by ARN.
    DeleteAlias {
        alias_arn: String,
    },
    /// Adds a grant (with its id) to a KMS key.
    PutGrant {
        key: String,
        grant: GrantSpec,
    },
    /// Removes a grant from a KMS key.
    DeleteGrant {
        key: String,
        grant_id: String,
    },
}

/// The durable effect of one accepted change. The serde names are those
/// the log has always used for these effects, so older logs and snapshots
/// read back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
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
    /// The exact tag set of a resource after a tag write (admin or
    /// authorized).
    ReplaceTags {
        resource: String,
        tags: Vec<(String, String)>,
    },
    /// The whole state.
    ReplaceWorld(WorldSpec),
    /// Several effects at one revision (a batch).
    Batch(Vec<Change>),
    PutOrganization(OrganizationSpec),
    DeleteOrganization,
    PutSession(SessionSpec),
    DeleteSession {
        arn: String,
    },
    PutEndpoint(EndpointSpec),
    DeleteEndpoint {
        id: String,
    },
    /// A KMS alias now points to `key` (taken from any key it pointed to).
    PutAlias {
        key: String,
        alias: String,
    },
    DeleteAlias {
        key: String,
        alias: String,
    },
    PutGrant {
        key: String,
        grant: GrantSpec,
    },
    DeleteGrant {
        key: String,
        grant_id: String,
    },
}

impl Change {
    /// The effects of one revision as one change.
    pub fn of(mut changes: Vec<Change>) -> Change {
        if changes.len() == 1 {
            if let Some(one) = changes.pop() {
                return one;
            }
        }
        Change::Batch(changes)
    }

    /// What the change is about, for messages ("the snapshot record of
    /// policy \"P\"").
    pub fn describe(&self) -> String {
        match self {
            Change::PutPolicy { name, .. } | Change::DeletePolicy { name } => format!("policy {name:?}"),
            Change::PutPrincipal(p) => format!("principal {:?}", p.arn),
            Change::DeletePrincipal { arn } => format!("principal {arn:?}"),
            Change::PutResource(r) => format!("resource {:?}", r.arn),
            Change::DeleteResource { arn } | Change::ReplaceTags { resource: arn, .. } => format!("resource {arn:?}"),
            Change::ReplaceWorld(_) => "the world".to_string(),
            Change::Batch(changes) => format!("a batch of {} changes", changes.len()),
            Change::PutOrganization(_) | Change::DeleteOrganization => "the organization".to_string(),
            Change::PutSession(s) => format!("session {:?}", s.arn),
            Change::DeleteSession { arn } => format!("session {arn:?}"),
            Change::PutEndpoint(e) => format!("VPC endpoint {:?}", e.id),
            Change::DeleteEndpoint { id } => format!("VPC endpoint {id:?}"),
            Change::PutAlias { key, .. }
            | Change::DeleteAlias { key, .. }
            | Change::PutGrant { key, .. }
            | Change::DeleteGrant { key, .. } => format!("resource {key:?}"),
        }
    }
}

/// One log record: the change that led from revision `prev` to `rev`,
/// when and by whom.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub prev: u64,
    pub rev: u64,
    pub time_unix_ms: i64,
    pub actor: String,
    pub change: Change,
}

/// A refused update: the error name and the message (with the field path).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code}: {message}")]
pub struct UpdateError {
    pub code: ErrorCode,
    pub message: String,
}

impl UpdateError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> UpdateError {
        UpdateError { code, message: message.into() }
    }
}

/// The kind of entity an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntityKind {
    Policy,
    Principal,
    Resource,
    World,
    Organization,
    Session,
    Endpoint,
}

impl EntityKind {
    /// The wire spelling (`Watch`'s `EntityChange.kind`).
    pub const fn as_str(self) -> &'static str {
        match self {
            EntityKind::Policy => "policy",
            EntityKind::Principal => "principal",
            EntityKind::Resource => "resource",
            EntityKind::World => "world",
            EntityKind::Organization => "organization",
            EntityKind::Session => "session",
            EntityKind::Endpoint => "endpoint",
        }
    }
}

/// What happened to the entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Put,
    Delete,
    Replace,
}

impl ChangeKind {
    /// The wire spelling (`Watch`'s `EntityChange.change`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Put => "put",
            ChangeKind::Delete => "delete",
            ChangeKind::Replace => "replace",
        }
    }
}

impl std::fmt::Display for EntityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    Entity {
        kind: EntityKind,
        name: String,
        change: ChangeKind,
    },
    /// A KMS alias put (created or moved) or deleted.
    Alias {
        /// `kms:CreateAlias`, ... or "admin".
        action: String,
        /// `alias/NAME`.
        alias: String,
        /// The key it points to now (put) or pointed to (delete).
        key: String,
        /// The key it pointed to before a move.
        previous_key: Option<String>,
        change: ChangeKind,
        allowed_by: Vec<String>,
    },
    /// A KMS grant created, or retired or revoked.
    Grant {
        action: String,
        key: String,
        grant_id: String,
        /// The grant, when created.
        grant: Option<GrantSpec>,
        change: ChangeKind,
        allowed_by: Vec<String>,
    },
}

/// A change event, at the revision it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: u64,
    pub time_unix_ms: i64,
    pub actor: String,
    pub kind: EventKind,
}

/// What applying a command produced: the events to publish and the effects
/// to log, in order.
#[derive(Debug, Default)]
pub struct Applied {
    pub events: Vec<Event>,
    pub changes: Vec<Change>,
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

/// The log record of an authorized tag operation.
pub fn tag_record(change: &TagChange, prev: u64) -> Record {
    Record {
        prev,
        rev: change.revision,
        time_unix_ms: now_ms(),
        actor: change.principal.clone(),
        change: Change::ReplaceTags { resource: change.resource.clone(), tags: pairs(&change.after) },
    }
}

/// The effect of a KMS alias or grant change, as logged.
fn kms_effect_change(effect: &KmsEffect) -> Change {
    match effect {
        KmsEffect::PutAlias { key, alias, .. } => Change::PutAlias { key: key.clone(), alias: alias.clone() },
        KmsEffect::DeleteAlias { key, alias } => Change::DeleteAlias { key: key.clone(), alias: alias.clone() },
        KmsEffect::PutGrant { key, grant } => Change::PutGrant { key: key.clone(), grant: grant.clone() },
        KmsEffect::DeleteGrant { key, grant_id } => Change::DeleteGrant { key: key.clone(), grant_id: grant_id.clone() },
    }
}

/// The event of a KMS alias or grant change, as `actor` made it.
fn kms_event_kind(effect: &KmsEffect, action: &str, allowed_by: Vec<String>) -> EventKind {
    match effect {
        KmsEffect::PutAlias { key, alias, previous } => EventKind::Alias {
            action: action.to_string(),
            alias: alias.clone(),
            key: key.clone(),
            previous_key: previous.clone(),
            change: ChangeKind::Put,
            allowed_by,
        },
        KmsEffect::DeleteAlias { key, alias } => EventKind::Alias {
            action: action.to_string(),
            alias: alias.clone(),
            key: key.clone(),
            previous_key: None,
            change: ChangeKind::Delete,
            allowed_by,
        },
        KmsEffect::PutGrant { key, grant } => EventKind::Grant {
            action: action.to_string(),
            key: key.clone(),
            grant_id: grant.id.clone(),
            grant: Some(grant.clone()),
            change: ChangeKind::Put,
            allowed_by,
        },
        KmsEffect::DeleteGrant { key, grant_id } => EventKind::Grant {
            action: action.to_string(),
            key: key.clone(),
            grant_id: grant_id.clone(),
            grant: None,
            change: ChangeKind::Delete,
            allowed_by,
        },
    }
}

/// The event of an authorized KMS alias or grant operation.
pub fn kms_event(change: &KmsChange, allowed_by: Vec<String>) -> Event {
    Event {
        revision: change.revision,
        time_unix_ms: now_ms(),
        actor: change.principal.clone(),
        kind: kms_event_kind(&change.effect, &change.action, allowed_by),
    }
}

/// The log record of an authorized KMS alias or grant operation.
pub fn kms_record(change: &KmsChange, prev: u64) -> Record {
    Record {
        prev,
        rev: change.revision,
        time_unix_ms: now_ms(),
        actor: change.principal.clone(),
        change: kms_effect_change(&change.effect),
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
        Update::PutOrganization(_) => "put_organization",
        Update::DeleteOrganization => "delete_organization",
        Update::PutSession(_) => "put_session",
        Update::DeleteSession { .. } => "delete_session",
        Update::PutEndpoint(_) => "put_endpoint",
        Update::DeleteEndpoint { .. } => "delete_endpoint",
        Update::PutAlias { .. } => "put_alias",
        Update::DeleteAlias { .. } => "delete_alias",
        Update::PutGrant { .. } => "put_grant",
        Update::DeleteGrant { .. } => "delete_grant",
    }
}

/// A state as the changes that build it from nothing: every policy (by
/// name), principal and resource (by ARN) put. What a snapshot holds.
pub fn state_changes(state: &State) -> impl Iterator<Item = Change> + '_ {
    let mut policies: Vec<_> = state.policies().collect();
    policies.sort_by(|a, b| a.0.cmp(b.0));
    let policies = policies
        .into_iter()
        .map(|(name, policy)| Change::PutPolicy { name: name.to_string(), document: Value::clone(&policy.source) });
    let principals = state.principals().map(|p| Change::PutPrincipal(principal_spec(p)));
    let resources = state.resources_by_arn().map(|r| Change::PutResource(resource_spec(r)));
    let organization = state.organization().map(|o| Change::PutOrganization(o.spec.clone()));
    let sessions = state.sessions().map(|s| Change::PutSession(session_spec(s)));
    let endpoints = state.endpoints().map(|e| Change::PutEndpoint(endpoint_spec(e)));
    policies.chain(principals).chain(resources).chain(organization).chain(sessions).chain(endpoints)
}

/// A refused state change, at the field `path` of the update.
fn state_error(path: &str, e: StateError) -> UpdateError {
    UpdateError::new(e.code(), format!("{path}: {e}"))
}

/// Every message of an [`UpdateError`] starts with the field path inside the
/// update (`put_policy.document.Statement[0].Effect`, `set_tags.tags[2]`).
fn world_error(e: crate::world::WorldError) -> UpdateError {
    UpdateError::new(e.code(), e.to_string())
}

/// A refused tag write of the update `op` (`set_tags`, `remove_tags`).
fn tag_write_error(op: &str, e: TagWriteError) -> UpdateError {
    UpdateError::new(e.code(), format!("{op}.{e}"))
}

fn entity(kind: EntityKind, name: &str, change: ChangeKind, state: &State, actor: &str) -> Event {
    Event {
        revision: state.revision(),
        time_unix_ms: now_ms(),
        actor: actor.to_string(),
        kind: EventKind::Entity { kind, name: name.to_string(), change },
    }
}

/// Applies the admin command `update` to `state` as `actor`, appending the
/// events and the effects it produces to `out`; on `Err`, `state` may hold
/// part of it, so callers apply to a copy.
pub fn apply(
    state: &mut State,
    resources: &mut ResourceBuilder,
    update: &Update,
    actor: &str,
    out: &mut Applied,
) -> Result<(), UpdateError> {
    match update {
        Update::PutPolicy { name, document } => {
            if name.is_empty() {
                return Err(UpdateError::new(ErrorCode::Validation, "put_policy.name: empty"));
            }
            put_policy(state, "put_policy", name, document, actor, out)?;
        }
        Update::DeletePolicy { name } => delete_policy(state, "delete_policy", name, actor, out)?,
        Update::PutPrincipal(spec) => put_principal(state, "put_principal", spec, actor, out)?,
        Update::DeletePrincipal { arn } => delete_principal(state, "delete_principal", arn, actor, out)?,
        Update::PutResource(spec) => put_resource(state, resources, "put_resource", spec, actor, out)?,
        Update::DeleteResource { arn } => delete_resource(state, "delete_resource", arn, actor, out)?,
        Update::SetTags { resource, tags } => {
            if tags.is_empty() {
                return Err(UpdateError::new(ErrorCode::Validation, "set_tags.tags: at least one tag is needed"));
            }
            // The rules first, so that a bad tag is reported before a missing
            // resource; write_tags checks them again (cheap) with the set.
            check_tags("tags", tags).map_err(|e| tag_write_error("set_tags", e))?;
            let target = state
                .target(resource)
                .ok_or_else(|| UpdateError::new(ErrorCode::NotFound, format!("set_tags.resource: no resource {resource:?}")))?;
            let before = target.tags().clone();
            let after = write_tags(&before, "tags", tags).map_err(|e| tag_write_error("set_tags", e))?;
            tag_write(state, resource, before, after, actor, out)?;
        }
        Update::RemoveTags { resource, keys } => {
            if keys.is_empty() {
                return Err(UpdateError::new(ErrorCode::Validation, "remove_tags.tag_keys: at least one key is needed"));
            }
            check_keys("tag_keys", keys).map_err(|e| tag_write_error("remove_tags", e))?;
            let target = state.target(resource).ok_or_else(|| {
                UpdateError::new(ErrorCode::NotFound, format!("remove_tags.resource: no resource {resource:?}"))
            })?;
            let before = target.tags().clone();
            let after = remove_tags(&before, "tag_keys", keys).map_err(|e| tag_write_error("remove_tags", e))?;
            tag_write(state, resource, before, after, actor, out)?;
        }
        Update::Batch(updates) => {
            for (i, u) in updates.iter().enumerate() {
                apply(state, resources, u, actor, out)
                    .map_err(|e| UpdateError::new(e.code, format!("batch.updates[{i}].{}", e.message)))?;
            }
        }
        Update::ReplaceWorld(world) => replace_world(state, world, actor, out)?,
        Update::PutOrganization(spec) => put_organization(state, spec, actor, out)?,
        Update::DeleteOrganization => delete_organization(state, actor, out)?,
        Update::PutSession(spec) => put_session(state, spec, actor, out)?,
        Update::DeleteSession { arn } => delete_session(state, arn, actor, out)?,
        Update::PutEndpoint(spec) => put_endpoint(state, spec, actor, out)?,
        Update::DeleteEndpoint { id } => delete_endpoint(state, id, actor, out)?,
        Update::PutAlias { key, alias } => {
            let info = state
                .resource(key)
                .and_then(|r| r.key())
                .ok_or_else(|| UpdateError::new(ErrorCode::NotFound, format!("put_alias.key: no KMS key {key:?}")))?;
            crate::kms_ops::check_admin_alias(info, alias)
                .map_err(|e| UpdateError::new(ErrorCode::InvalidAliasName, format!("put_alias.alias: {e}")))?;
            put_alias(state, "put_alias", key, alias, actor, out)?;
        }
        Update::DeleteAlias { alias_arn } => {
            let key = state.alias_target(alias_arn).map(|k| k.to_string()).ok_or_else(|| {
                UpdateError::new(ErrorCode::NotFound, format!("delete_alias.alias_arn: no alias {alias_arn:?}"))
            })?;
            let alias = alias_of_arn(alias_arn).unwrap_or_default().to_string();
            delete_alias(state, "delete_alias", &key, &alias, actor, out)?;
        }
        Update::PutGrant { key, grant } => {
            if grant.id.is_empty() {
                return Err(UpdateError::new(ErrorCode::Validation, "put_grant.grant.id: empty"));
            }
            put_grant(state, "put_grant", key, grant, actor, out)?;
        }
        Update::DeleteGrant { key, grant_id } => delete_grant(state, "delete_grant", key, grant_id, actor, out)?,
    }
    Ok(())
}

fn put_alias(state: &mut State, field: &str, key: &str, alias: &str, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    let before = state.revision();
    let previous = state.put_alias(key, alias).map_err(|e| state_error(&format!("{field}.key"), e))?;
    if state.revision() == before {
        return Ok(());
    }
    let effect =
        KmsEffect::PutAlias { key: key.to_string(), alias: alias.to_string(), previous: previous.map(|p| p.to_string()) };
    out.events.push(Event {
        revision: state.revision(),
        time_unix_ms: now_ms(),
        actor: actor.to_string(),
        kind: kms_event_kind(&effect, "admin", Vec::new()),
    });
    out.changes.push(kms_effect_change(&effect));
    Ok(())
}

fn delete_alias(
    state: &mut State,
    field: &str,
    key: &str,
    alias: &str,
    actor: &str,
    out: &mut Applied,
) -> Result<(), UpdateError> {
    let arn = crate::kms::alias_arn(key, alias).unwrap_or_default();
    state.delete_alias(&arn).map_err(|e| state_error(&format!("{field}.alias"), e))?;
    let effect = KmsEffect::DeleteAlias { key: key.to_string(), alias: alias.to_string() };
    out.events.push(Event {
        revision: state.revision(),
        time_unix_ms: now_ms(),
        actor: actor.to_string(),
        kind: kms_event_kind(&effect, "admin", Vec::new()),
    });
    out.changes.push(kms_effect_change(&effect));
    Ok(())
}

fn put_grant(
    state: &mut State,
    field: &str,
    key: &str,
    spec: &GrantSpec,
    actor: &str,
    out: &mut Applied,
) -> Result<(), UpdateError> {
    let info = state
        .resource(key)
        .and_then(|r| r.key())
        .ok_or_else(|| UpdateError::new(ErrorCode::NotFound, format!("{field}.key: no KMS key {key:?}")))?;
    let grant = build_grant(&crate::path::FieldPath::field(field).then("grant"), spec, &spec.id, &info.spec, &info.usage)
        .map_err(world_error)?;
    state.put_grant(key, grant).map_err(|e| state_error(&format!("{field}.grant.id"), e))?;
    let effect = KmsEffect::PutGrant { key: key.to_string(), grant: spec.clone() };
    out.events.push(Event {
        revision: state.revision(),
        time_unix_ms: now_ms(),
        actor: actor.to_string(),
        kind: kms_event_kind(&effect, "admin", Vec::new()),
    });
    out.changes.push(kms_effect_change(&effect));
    Ok(())
}

fn delete_grant(state: &mut State, field: &str, key: &str, id: &str, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    state.delete_grant(key, id).map_err(|e| state_error(&format!("{field}.grant_id"), e))?;
    let effect = KmsEffect::DeleteGrant { key: key.to_string(), grant_id: id.to_string() };
    out.events.push(Event {
        revision: state.revision(),
        time_unix_ms: now_ms(),
        actor: actor.to_string(),
        kind: kms_event_kind(&effect, "admin", Vec::new()),
    });
    out.changes.push(kms_effect_change(&effect));
    Ok(())
}

/// Applies a logged effect again (recovery, snapshots): the same state
/// changes, so the same revisions, as when it was first applied.
pub fn replay(state: &mut State, resources: &mut ResourceBuilder, change: &Change) -> Result<(), UpdateError> {
    // A snapshot is mostly resources: put them without the event and the
    // copy of the spec that nobody reads here (same checks, same errors,
    // same revision).
    if let Change::PutResource(spec) = change {
        return put_built(state, build_resource(resources, spec)?);
    }
    let mut out = Applied::default();
    replay_into(state, resources, change, &mut out)
}

/// The first half of [`replay`] for a `PutResource`: the resource, lowered
/// and checked, with no state needed (so a restore can build resources on
/// another thread while it puts earlier ones).
pub fn build_resource(resources: &mut ResourceBuilder, spec: &ResourceSpec) -> Result<Resource, UpdateError> {
    resources.build("put_resource", spec).map_err(world_error)
}

/// [`build_resource`] on fields borrowed from wherever they were read (a
/// snapshot record read in place): the same checks and errors.
pub fn build_resource_fields<'a>(
    resources: &mut ResourceBuilder,
    fields: crate::world::ResourceFields<'a, impl IntoIterator<Item = (&'a str, &'a str)>>,
) -> Result<Resource, UpdateError> {
    resources.build_fields("put_resource", fields).map_err(world_error)
}

/// The second half: puts a resource [`build_resource`] built, as [`replay`]
/// does (the same checks, errors and revision).
pub fn put_built(state: &mut State, resource: Resource) -> Result<(), UpdateError> {
    state.put_resource(resource).map_err(|e| state_error("put_resource.arn", e))
}

/// [`replay`], returning the events the change makes (for the audit
/// records of changes recovered at start).
pub fn replay_events(state: &mut State, resources: &mut ResourceBuilder, change: &Change) -> Result<Vec<Event>, UpdateError> {
    let mut out = Applied::default();
    replay_into(state, resources, change, &mut out)?;
    Ok(out.events)
}

fn replay_into(
    state: &mut State,
    resources: &mut ResourceBuilder,
    change: &Change,
    out: &mut Applied,
) -> Result<(), UpdateError> {
    match change {
        Change::PutPolicy { name, document } => put_policy(state, "put_policy", name, document, "", out),
        Change::DeletePolicy { name } => delete_policy(state, "delete_policy", name, "", out),
        Change::PutPrincipal(spec) => put_principal(state, "put_principal", spec, "", out),
        Change::DeletePrincipal { arn } => delete_principal(state, "delete_principal", arn, "", out),
        Change::PutResource(spec) => put_resource(state, resources, "put_resource", spec, "", out),
        Change::DeleteResource { arn } => delete_resource(state, "delete_resource", arn, "", out),
        Change::ReplaceTags { resource, tags } => {
            let target = state.target(resource).ok_or_else(|| {
                UpdateError::new(ErrorCode::NotFound, format!("replace_tags.resource: no resource {resource:?}"))
            })?;
            let before = target.tags().clone();
            let after = TagSet::from_tags(before.case_insensitive(), tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|e| UpdateError::new(ErrorCode::Tag, format!("replace_tags.tags: {e}")))?;
            tag_write(state, resource, before, after, "", out)
        }
        Change::ReplaceWorld(world) => replace_world(state, world, "", out),
        Change::Batch(changes) => {
            for (i, c) in changes.iter().enumerate() {
                replay_into(state, resources, c, out)
                    .map_err(|e| UpdateError::new(e.code, format!("batch[{i}].{}", e.message)))?;
            }
            Ok(())
        }
        Change::PutOrganization(spec) => put_organization(state, spec, "", out),
        Change::DeleteOrganization => delete_organization(state, "", out),
        Change::PutSession(spec) => put_session(state, spec, "", out),
        Change::DeleteSession { arn } => delete_session(state, arn, "", out),
        Change::PutEndpoint(spec) => put_endpoint(state, spec, "", out),
        Change::DeleteEndpoint { id } => delete_endpoint(state, id, "", out),
        Change::PutAlias { key, alias } => put_alias(state, "put_alias", key, alias, "", out),
        Change::DeleteAlias { key, alias } => delete_alias(state, "delete_alias", key, alias, "", out),
        Change::PutGrant { key, grant } => put_grant(state, "put_grant", key, grant, "", out),
        Change::DeleteGrant { key, grant_id } => delete_grant(state, "delete_grant", key, grant_id, "", out),
    }
}

fn put_organization(state: &mut State, spec: &OrganizationSpec, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    let org = spec.build(&FieldPath::field("put_organization")).map_err(world_error)?;
    state.put_organization(org);
    out.events.push(entity(EntityKind::Organization, "", ChangeKind::Put, state, actor));
    out.changes.push(Change::PutOrganization(spec.clone()));
    Ok(())
}

fn delete_organization(state: &mut State, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    state.delete_organization().map_err(|e| state_error("delete_organization", e))?;
    out.events.push(entity(EntityKind::Organization, "", ChangeKind::Delete, state, actor));
    out.changes.push(Change::DeleteOrganization);
    Ok(())
}

fn put_session(state: &mut State, spec: &SessionSpec, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    let session = spec.build(&FieldPath::field("put_session")).map_err(world_error)?;
    state.put_session(session);
    out.events.push(entity(EntityKind::Session, &spec.arn, ChangeKind::Put, state, actor));
    out.changes.push(Change::PutSession(spec.clone()));
    Ok(())
}

fn delete_session(state: &mut State, arn: &str, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    state.delete_session(arn).map_err(|e| state_error("delete_session.arn", e))?;
    out.events.push(entity(EntityKind::Session, arn, ChangeKind::Delete, state, actor));
    out.changes.push(Change::DeleteSession { arn: arn.to_string() });
    Ok(())
}

fn put_endpoint(state: &mut State, spec: &EndpointSpec, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    let endpoint = spec.build(&FieldPath::field("put_endpoint")).map_err(world_error)?;
    state.put_endpoint(endpoint);
    out.events.push(entity(EntityKind::Endpoint, &spec.id, ChangeKind::Put, state, actor));
    out.changes.push(Change::PutEndpoint(spec.clone()));
    Ok(())
}

fn delete_endpoint(state: &mut State, id: &str, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    state.delete_endpoint(id).map_err(|e| state_error("delete_endpoint.id", e))?;
    out.events.push(entity(EntityKind::Endpoint, id, ChangeKind::Delete, state, actor));
    out.changes.push(Change::DeleteEndpoint { id: id.to_string() });
    Ok(())
}

fn put_policy(
    state: &mut State,
    field: &str,
    name: &str,
    document: &Value,
    actor: &str,
    out: &mut Applied,
) -> Result<(), UpdateError> {
    let policy = compile_policy(format!("{field}.document"), document, PolicyKind::Identity)
        .map_err(|e| UpdateError::new(ErrorCode::MalformedPolicyDocument, e.to_string()))?;
    state.put_policy(name, policy).map_err(|e| state_error(&format!("{field}.name"), e))?;
    out.events.push(entity(EntityKind::Policy, name, ChangeKind::Put, state, actor));
    out.changes.push(Change::PutPolicy { name: name.to_string(), document: document.clone() });
    Ok(())
}

fn delete_policy(state: &mut State, field: &str, name: &str, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    state.delete_policy(name).map_err(|e| state_error(&format!("{field}.name"), e))?;
    out.events.push(entity(EntityKind::Policy, name, ChangeKind::Delete, state, actor));
    out.changes.push(Change::DeletePolicy { name: name.to_string() });
    Ok(())
}

fn put_principal(
    state: &mut State,
    field: &str,
    spec: &PrincipalSpec,
    actor: &str,
    out: &mut Applied,
) -> Result<(), UpdateError> {
    let principal = build_principal(field, spec, state, false).map_err(world_error)?;
    state.put_principal(principal).map_err(|e| state_error(&format!("{field}.arn"), e))?;
    out.events.push(entity(EntityKind::Principal, &spec.arn, ChangeKind::Put, state, actor));
    out.changes.push(Change::PutPrincipal(spec.clone()));
    Ok(())
}

fn delete_principal(state: &mut State, field: &str, arn: &str, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    state.delete_principal(arn).map_err(|e| state_error(&format!("{field}.arn"), e))?;
    out.events.push(entity(EntityKind::Principal, arn, ChangeKind::Delete, state, actor));
    out.changes.push(Change::DeletePrincipal { arn: arn.to_string() });
    Ok(())
}

fn put_resource(
    state: &mut State,
    resources: &mut ResourceBuilder,
    field: &str,
    spec: &ResourceSpec,
    actor: &str,
    out: &mut Applied,
) -> Result<(), UpdateError> {
    let resource = resources.build(field, spec).map_err(world_error)?;
    state.put_resource(resource).map_err(|e| state_error(&format!("{field}.arn"), e))?;
    out.events.push(entity(EntityKind::Resource, &spec.arn, ChangeKind::Put, state, actor));
    out.changes.push(Change::PutResource(spec.clone()));
    Ok(())
}

fn delete_resource(state: &mut State, field: &str, arn: &str, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    state.delete_resource(arn).map_err(|e| state_error(&format!("{field}.arn"), e))?;
    out.events.push(entity(EntityKind::Resource, arn, ChangeKind::Delete, state, actor));
    out.changes.push(Change::DeleteResource { arn: arn.to_string() });
    Ok(())
}

fn replace_world(state: &mut State, world: &WorldSpec, actor: &str, out: &mut Applied) -> Result<(), UpdateError> {
    let mut next = State::default();
    world.apply(&mut next).map_err(|e| {
        let mut e = world_error(e);
        e.message = format!("replace_world.world_json.{}", e.message);
        e
    })?;
    next.follow(state.revision());
    *state = next;
    out.events.push(entity(EntityKind::World, "", ChangeKind::Replace, state, actor));
    out.changes.push(Change::ReplaceWorld(world.clone()));
    Ok(())
}

fn tag_write(
    state: &mut State,
    resource: &str,
    before: TagSet,
    after: TagSet,
    actor: &str,
    out: &mut Applied,
) -> Result<(), UpdateError> {
    if state.replace_tags(resource, after.clone()).map_err(|e| state_error("resource", e))? {
        let tags = pairs(&after);
        out.events.push(Event {
            revision: state.revision(),
            time_unix_ms: now_ms(),
            actor: actor.to_string(),
            kind: EventKind::Tags {
                resource: resource.to_string(),
                action: "admin".to_string(),
                before: pairs(&before),
                after: tags.clone(),
                allowed_by: Vec::new(),
            },
        });
        out.changes.push(Change::ReplaceTags { resource: resource.to_string(), tags });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn world() -> State {
        let spec: WorldSpec = serde_json::from_value(json!({
            "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "tags": {"Project": "Alpha"}}]
        }))
        .unwrap();
        spec.build().unwrap()
    }

    #[test]
    fn the_logged_effects_replay_to_the_same_state_and_revision() {
        let key = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let mut state = world();
        let start = state.clone();
        let mut resources = ResourceBuilder::default();
        let update = Update::Batch(vec![
            Update::SetTags { resource: key.into(), tags: vec![("A".into(), "1".into())] },
            Update::PutPolicy {
                name: "P".into(),
                document: json!({"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}}),
            },
            Update::RemoveTags { resource: key.into(), keys: vec!["Project".into()] },
            // A no-op: no effect, no event.
            Update::SetTags { resource: key.into(), tags: vec![("A".into(), "1".into())] },
        ]);
        let mut out = Applied::default();
        apply(&mut state, &mut resources, &update, "admin", &mut out).unwrap();
        assert_eq!(out.events.len(), 3);
        let change = Change::of(out.changes);
        match &change {
            Change::Batch(c) => {
                assert!(matches!(c[2], Change::ReplaceTags { ref tags, .. } if tags == &[("A".to_string(), "1".to_string())]))
            }
            other => panic!("expected a batch, got {other:?}"),
        }
        let mut again = start;
        replay(&mut again, &mut ResourceBuilder::default(), &change).unwrap();
        assert_eq!(again.revision(), state.revision());
        assert_eq!(again.target(key).unwrap().tags(), state.target(key).unwrap().tags());
        assert!(again.policy("P").is_some());
    }

    #[test]
    fn a_snapshot_is_the_changes_that_rebuild_the_state() {
        let state = world();
        let mut rebuilt = State::default();
        let mut resources = ResourceBuilder::default();
        for c in state_changes(&state) {
            replay(&mut rebuilt, &mut resources, &c).unwrap();
        }
        assert_eq!(rebuilt.counts(), state.counts());
    }
}
