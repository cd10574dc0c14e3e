//! Fleet mode: a store whose changes are ordered by a shared store (etcd)
//! instead of its own log. This module knows no transport: the shared store
//! is the [`Shared`] trait (the root package implements it over etcd's gRPC
//! API), and it hands this store what it delivers as [`Delivered`] batches.
//!
//! - **Keys.** One key per entity under the fleet's prefix ([`EntityKey`]:
//!   `e/policy/NAME`, `e/principal/ARN`, `e/resource/ARN`), holding the
//!   entity's snapshot record (the same JSON a data directory's snapshot
//!   holds), plus [`LOG_KEY`], rewritten by every transaction with who made
//!   the change and its events (what `Watch` streams on every sidecar).
//! - **Revisions** are the shared store's: the revision of a state is the
//!   revision of the last transaction on the prefix it holds, so a revision
//!   one sidecar answers is one every other sidecar's watch delivers.
//! - **Writes** are computed on this sidecar's snapshot, then committed as
//!   one transaction guarded by what they read ([`Guard`]); a conflict waits
//!   for the newer state and tries again, at most [`MAX_ATTEMPTS`] times. A
//!   write is acknowledged once this sidecar's own snapshot holds it.
//! - **Following.** Each transaction arrives whole ([`Delivered`]) and is
//!   applied whole, or not at all (the store then stops following and says
//!   why); a reload swaps a whole new state in.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use tagward_core::change::{apply, kms_event, kms_record, now_ms, replay, state_changes, tag_event, update_field, Applied};
use tagward_core::change::{Change, ChangeKind, EntityKind, Event, EventKind, Update, UpdateError};
use tagward_core::error::ErrorCode;
use tagward_core::kms_ops::{KmsError, KmsRequest};
use tagward_core::state::State;
use tagward_core::tagging::{perform, TagError, TagRequest};
use tagward_core::world::{endpoint_spec, principal_spec, resource_spec, session_spec, GrantSpec, ResourceBuilder, WorldSpec};

use super::{kms_refusal, lock, tag_refusal, Durability, KmsDone, OpenError, Store, Tagged};
use crate::audit::{AuditLog, Refusal, Refused as RefusedWrite};
use crate::storage::MemoryBackend;

/// The key every transaction rewrites: who changed what (its events).
/// Its `mod_revision` is the revision of the newest change on the prefix.
pub const LOG_KEY: &str = "log";
/// Where the entities' keys start.
pub const ENTITY_DIR: &str = "e/";
/// How often a write is tried when others changed what it read meanwhile.
pub const MAX_ATTEMPTS: usize = 64;
/// How long a writer waits for its own snapshot to reach a revision (its
/// own write, or the one it lost a conflict to).
pub const ACK_WAIT: Duration = Duration::from_secs(10);

/// One entity's key under the prefix. This is the one place the state's
/// kinds of entity map to keys: a new kind of state adds a variant here and
/// its arms in [`EntityKey::record`], [`EntityKey::deletion`],
/// [`touched`] and [`record_key`], which are exhaustive so that a kind left
/// out does not compile.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntityKey {
    Policy(String),
    Principal(String),
    Resource(String),
    /// The organization (one per state: its SCPs, RCPs and tree).
    Organization,
    Session(String),
    Endpoint(String),
}

/// The organization's one key: `e/organization/` holds no other.
const ORGANIZATION_NAME: &str = "organization";

impl EntityKey {
    /// The key under the prefix.
    pub fn path(&self) -> String {
        match self {
            EntityKey::Policy(name) => format!("{ENTITY_DIR}policy/{name}"),
            EntityKey::Principal(arn) => format!("{ENTITY_DIR}principal/{arn}"),
            EntityKey::Resource(arn) => format!("{ENTITY_DIR}resource/{arn}"),
            EntityKey::Organization => format!("{ENTITY_DIR}organization/{ORGANIZATION_NAME}"),
            EntityKey::Session(arn) => format!("{ENTITY_DIR}session/{arn}"),
            EntityKey::Endpoint(id) => format!("{ENTITY_DIR}endpoint/{id}"),
        }
    }

    /// The directory (under the prefix) that holds keys of this kind.
    pub fn dir(&self) -> &'static str {
        match self {
            EntityKey::Policy(_) => "e/policy/",
            EntityKey::Principal(_) => "e/principal/",
            EntityKey::Resource(_) => "e/resource/",
            EntityKey::Organization => "e/organization/",
            EntityKey::Session(_) => "e/session/",
            EntityKey::Endpoint(_) => "e/endpoint/",
        }
    }

    /// A key under the prefix back as an entity (`None` for other keys).
    pub fn parse(path: &str) -> Option<EntityKey> {
        let rest = path.strip_prefix(ENTITY_DIR)?;
        let (kind, name) = rest.split_once('/')?;
        match kind {
            "policy" => Some(EntityKey::Policy(name.to_string())),
            "principal" => Some(EntityKey::Principal(name.to_string())),
            "resource" => Some(EntityKey::Resource(name.to_string())),
            "organization" if name == ORGANIZATION_NAME => Some(EntityKey::Organization),
            "session" => Some(EntityKey::Session(name.to_string())),
            "endpoint" => Some(EntityKey::Endpoint(name.to_string())),
            _ => None,
        }
    }

    /// The entity's durable form in `state`, `None` when it has none.
    pub fn record(&self, state: &State) -> Option<Change> {
        match self {
            EntityKey::Policy(name) => {
                state.policy(name).map(|p| Change::PutPolicy { name: name.clone(), document: Value::clone(&p.source) })
            }
            EntityKey::Principal(arn) => state.principal(arn).map(|p| Change::PutPrincipal(principal_spec(p))),
            EntityKey::Resource(arn) => state.resource(arn).map(|r| Change::PutResource(resource_spec(r))),
            EntityKey::Organization => state.organization().map(|o| Change::PutOrganization(o.spec.clone())),
            EntityKey::Session(arn) => state.session(arn).map(|s| Change::PutSession(session_spec(s))),
            EntityKey::Endpoint(id) => state.endpoint(id).map(|e| Change::PutEndpoint(endpoint_spec(e))),
        }
    }

    /// The change that removes the entity.
    pub fn deletion(&self) -> Change {
        match self {
            EntityKey::Policy(name) => Change::DeletePolicy { name: name.clone() },
            EntityKey::Principal(arn) => Change::DeletePrincipal { arn: arn.clone() },
            EntityKey::Resource(arn) => Change::DeleteResource { arn: arn.clone() },
            EntityKey::Organization => Change::DeleteOrganization,
            EntityKey::Session(arn) => Change::DeleteSession { arn: arn.clone() },
            EntityKey::Endpoint(id) => Change::DeleteEndpoint { id: id.clone() },
        }
    }

    /// The event a change of this key says when the log key does not tell.
    fn event(&self, revision: u64, change: ChangeKind) -> Event {
        let (kind, name) = match self {
            EntityKey::Policy(n) => (EntityKind::Policy, n),
            EntityKey::Principal(a) => (EntityKind::Principal, a),
            EntityKey::Resource(a) => (EntityKind::Resource, a),
            EntityKey::Organization => (EntityKind::Organization, &String::new()),
            EntityKey::Session(a) => (EntityKind::Session, a),
            EntityKey::Endpoint(i) => (EntityKind::Endpoint, i),
        };
        Event {
            revision,
            time_unix_ms: now_ms(),
            actor: String::new(),
            kind: EventKind::Entity { kind, name: name.clone(), change },
        }
    }
}

/// What a change writes: some entities, or (a replaced world) all of them.
#[derive(Debug, Default)]
pub struct Touched {
    pub keys: BTreeSet<EntityKey>,
    pub everything: bool,
}

/// Adds the entities `change` writes to `out`; `before` is the state the
/// change was made on (a moved alias also rewrites the key it left).
pub fn touched(change: &Change, before: &State, out: &mut Touched) {
    match change {
        Change::PutPolicy { name, .. } | Change::DeletePolicy { name } => {
            out.keys.insert(EntityKey::Policy(name.clone()));
        }
        Change::PutPrincipal(spec) => {
            out.keys.insert(EntityKey::Principal(spec.arn.clone()));
        }
        Change::DeletePrincipal { arn } => {
            out.keys.insert(EntityKey::Principal(arn.clone()));
        }
        Change::PutResource(spec) => {
            out.keys.insert(EntityKey::Resource(spec.arn.clone()));
        }
        Change::DeleteResource { arn } | Change::ReplaceTags { resource: arn, .. } => {
            out.keys.insert(EntityKey::Resource(arn.clone()));
        }
        Change::ReplaceWorld(_) => out.everything = true,
        Change::Batch(changes) => changes.iter().for_each(|c| touched(c, before, out)),
        Change::PutOrganization(_) | Change::DeleteOrganization => {
            out.keys.insert(EntityKey::Organization);
        }
        Change::PutSession(spec) => {
            out.keys.insert(EntityKey::Session(spec.arn.clone()));
        }
        Change::DeleteSession { arn } => {
            out.keys.insert(EntityKey::Session(arn.clone()));
        }
        Change::PutEndpoint(spec) => {
            out.keys.insert(EntityKey::Endpoint(spec.id.clone()));
        }
        Change::DeleteEndpoint { id } => {
            out.keys.insert(EntityKey::Endpoint(id.clone()));
        }
        // Aliases and grants live on their key's resource entity.
        Change::PutAlias { key, alias } => {
            out.keys.insert(EntityKey::Resource(key.clone()));
            let previous = tagward_core::kms::alias_arn(key, alias).and_then(|arn| before.alias_target(&arn).cloned());
            if let Some(previous) = previous {
                out.keys.insert(EntityKey::Resource(previous.to_string()));
            }
        }
        Change::DeleteAlias { key, .. } | Change::PutGrant { key, .. } | Change::DeleteGrant { key, .. } => {
            out.keys.insert(EntityKey::Resource(key.clone()));
        }
    }
}

/// The key of a snapshot record (what [`state_changes`] yields).
pub fn record_key(change: &Change) -> Option<EntityKey> {
    match change {
        Change::PutPolicy { name, .. } => Some(EntityKey::Policy(name.clone())),
        Change::PutPrincipal(spec) => Some(EntityKey::Principal(spec.arn.clone())),
        Change::PutResource(spec) => Some(EntityKey::Resource(spec.arn.clone())),
        Change::PutOrganization(_) => Some(EntityKey::Organization),
        Change::PutSession(spec) => Some(EntityKey::Session(spec.arn.clone())),
        Change::PutEndpoint(spec) => Some(EntityKey::Endpoint(spec.id.clone())),
        Change::PutAlias { .. }
        | Change::DeleteAlias { .. }
        | Change::PutGrant { .. }
        | Change::DeleteGrant { .. }
        | Change::DeleteOrganization
        | Change::DeleteSession { .. }
        | Change::DeleteEndpoint { .. }
        | Change::DeletePolicy { .. }
        | Change::DeletePrincipal { .. }
        | Change::DeleteResource { .. }
        | Change::ReplaceTags { .. }
        | Change::ReplaceWorld(_)
        | Change::Batch(_) => None,
    }
}

/// Every entity of `state` with its encoded record.
pub fn entities(state: &State) -> Result<BTreeMap<EntityKey, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    for change in state_changes(state) {
        let Some(key) = record_key(&change) else { continue };
        let bytes = serde_json::to_vec(&change).map_err(|e| format!("cannot encode {}: {e}", change.describe()))?;
        out.insert(key, bytes);
    }
    Ok(out)
}

/// A condition a transaction commits under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// The key was not written after revision `since` (an absent key
    /// passes: it compares as revision 0).
    Unchanged { key: String, since: u64 },
    /// No key under `dir` was written after `since`.
    DirUnchanged { dir: String, since: u64 },
    /// The key exists (it was not deleted meanwhile).
    Exists { key: String },
    /// The key was never created (or is deleted).
    Missing { key: String },
}

/// A write in a transaction, keys relative to the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// One transaction: all its writes happen at one revision, or none.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    pub guards: Vec<Guard>,
    pub ops: Vec<Op>,
}

/// Why a transaction did not commit.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CommitError {
    /// A guard failed: something it read changed. `current` is the newest
    /// revision on the prefix.
    #[error("a conflicting change at revision {current}")]
    Conflict { current: u64 },
    /// The shared store cannot be reached (the change may or may not have
    /// been made: it is not acknowledged).
    #[error("the shared store is unavailable: {0}")]
    Unavailable(String),
    /// The shared store refused this transaction (too large, too many
    /// operations): nothing was written.
    #[error("the shared store refused the change: {0}")]
    Refused(String),
}

pub type CommitFuture = Pin<Box<dyn Future<Output = Result<u64, CommitError>> + Send>>;

/// Why the shared store cannot replay its history from a revision.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HistoryError {
    /// The shared store compacted its history: `oldest` is the oldest
    /// revision it still retains.
    #[error("the shared store compacted its history; the oldest revision it retains is {oldest}")]
    Compacted { oldest: u64 },
    #[error("the shared store is unavailable: {0}")]
    Unavailable(String),
}

/// The prefix's past transactions, oldest first, each whole; an `Err` ends
/// it (the shared store went away mid-way).
pub type History = tokio::sync::mpsc::Receiver<Result<Delivered, String>>;
pub type HistoryFuture = Pin<Box<dyn Future<Output = Result<History, HistoryError>> + Send>>;

/// The shared store (etcd) as the fleet store writes to it.
pub trait Shared: Send + Sync {
    /// Commits `txn` when its guards hold; the revision it made.
    fn commit(&self, txn: Txn) -> CommitFuture;
    /// The transactions on the prefix from revision `from` through `until`
    /// (the last one ends the history). Resolves once the shared store has
    /// said whether it still retains `from`.
    fn history(&self, from: u64, until: u64) -> HistoryFuture;
    /// Where the state lives, for messages (`etcd://HOST:PORT/PREFIX`).
    fn place(&self) -> String;
}

/// What the shared store delivered at one revision: one transaction, whole.
/// Keys are relative to the prefix.
#[derive(Debug, Clone, Default)]
pub struct Delivered {
    pub revision: u64,
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
}

/// The log key's value: who made the change, and its events.
#[derive(Debug, Serialize, Deserialize)]
pub struct LogEntry {
    pub actor: String,
    pub time_unix_ms: i64,
    /// The sidecar that made the change (it wrote the audit record).
    #[serde(default)]
    pub node: String,
    pub events: Vec<LoggedEvent>,
}

/// An [`Event`] as the log key holds it (the revision is the key's).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoggedEvent {
    Tags {
        time_unix_ms: i64,
        actor: String,
        resource: String,
        action: String,
        before: Vec<(String, String)>,
        after: Vec<(String, String)>,
        allowed_by: Vec<String>,
    },
    Entity {
        time_unix_ms: i64,
        actor: String,
        kind: String,
        name: String,
        change: String,
    },
    Alias {
        time_unix_ms: i64,
        actor: String,
        action: String,
        alias: String,
        key: String,
        previous_key: Option<String>,
        change: String,
        allowed_by: Vec<String>,
    },
    Grant {
        time_unix_ms: i64,
        actor: String,
        action: String,
        key: String,
        grant_id: String,
        grant: Option<GrantSpec>,
        change: String,
        allowed_by: Vec<String>,
    },
}

/// A change kind back from its wire spelling.
fn change_kind(change: &str) -> Option<ChangeKind> {
    match change {
        "put" => Some(ChangeKind::Put),
        "delete" => Some(ChangeKind::Delete),
        "replace" => Some(ChangeKind::Replace),
        _ => None,
    }
}

impl LoggedEvent {
    fn of(e: &Event) -> LoggedEvent {
        match &e.kind {
            EventKind::Tags { resource, action, before, after, allowed_by } => LoggedEvent::Tags {
                time_unix_ms: e.time_unix_ms,
                actor: e.actor.clone(),
                resource: resource.clone(),
                action: action.clone(),
                before: before.clone(),
                after: after.clone(),
                allowed_by: allowed_by.clone(),
            },
            EventKind::Entity { kind, name, change } => LoggedEvent::Entity {
                time_unix_ms: e.time_unix_ms,
                actor: e.actor.clone(),
                kind: kind.as_str().to_string(),
                name: name.clone(),
                change: change.as_str().to_string(),
            },
            EventKind::Alias { action, alias, key, previous_key, change, allowed_by } => LoggedEvent::Alias {
                time_unix_ms: e.time_unix_ms,
                actor: e.actor.clone(),
                action: action.clone(),
                alias: alias.clone(),
                key: key.clone(),
                previous_key: previous_key.clone(),
                change: change.as_str().to_string(),
                allowed_by: allowed_by.clone(),
            },
            EventKind::Grant { action, key, grant_id, grant, change, allowed_by } => LoggedEvent::Grant {
                time_unix_ms: e.time_unix_ms,
                actor: e.actor.clone(),
                action: action.clone(),
                key: key.clone(),
                grant_id: grant_id.clone(),
                grant: grant.clone(),
                change: change.as_str().to_string(),
                allowed_by: allowed_by.clone(),
            },
        }
    }

    fn event(self, revision: u64) -> Option<Event> {
        Some(match self {
            LoggedEvent::Tags { time_unix_ms, actor, resource, action, before, after, allowed_by } => {
                Event { revision, time_unix_ms, actor, kind: EventKind::Tags { resource, action, before, after, allowed_by } }
            }
            LoggedEvent::Entity { time_unix_ms, actor, kind, name, change } => {
                let kind = match kind.as_str() {
                    "policy" => EntityKind::Policy,
                    "principal" => EntityKind::Principal,
                    "resource" => EntityKind::Resource,
                    "world" => EntityKind::World,
                    "organization" => EntityKind::Organization,
                    "session" => EntityKind::Session,
                    "endpoint" => EntityKind::Endpoint,
                    _ => return None,
                };
                let change = change_kind(&change)?;
                Event { revision, time_unix_ms, actor, kind: EventKind::Entity { kind, name, change } }
            }
            LoggedEvent::Alias { time_unix_ms, actor, action, alias, key, previous_key, change, allowed_by } => {
                let change = change_kind(&change)?;
                let kind = EventKind::Alias { action, alias, key, previous_key, change, allowed_by };
                Event { revision, time_unix_ms, actor, kind }
            }
            LoggedEvent::Grant { time_unix_ms, actor, action, key, grant_id, grant, change, allowed_by } => {
                let change = change_kind(&change)?;
                let kind = EventKind::Grant { action, key, grant_id, grant, change, allowed_by };
                Event { revision, time_unix_ms, actor, kind }
            }
        })
    }
}

/// What a fleet store keeps besides the ordinary store.
pub(super) struct Fleet {
    shared: Arc<dyn Shared>,
    node: String,
    /// When this sidecar last confirmed that its snapshot was the newest
    /// state on the prefix.
    confirmed: Mutex<Instant>,
    /// The newest revision on the prefix minus this snapshot's, as last seen.
    lag: AtomicU64,
    /// Set when a delivered change could not be applied: the store stops
    /// following (it serves the last whole state) and refuses writes.
    stuck: Mutex<Option<String>>,
}

/// A state rebuilt from the entity keys of a prefix.
fn build(entries: &[(String, Vec<u8>)], revision: u64, resources: &mut ResourceBuilder) -> Result<State, String> {
    let mut state = State::default();
    let mut sorted: Vec<(EntityKey, &Vec<u8>)> =
        entries.iter().filter_map(|(k, v)| EntityKey::parse(k).map(|key| (key, v))).collect();
    // Policies before principals (which resolve them), then resources.
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    state.bulk(|state| {
        for (key, bytes) in sorted {
            let change: Change =
                serde_json::from_slice(bytes).map_err(|e| format!("{}: not an entity record: {e}", key.path()))?;
            replay(state, resources, &change).map_err(|e| format!("{}: does not load: {e}", key.path()))?;
        }
        Ok::<(), String>(())
    })?;
    state.set_revision(revision);
    Ok(state)
}

impl Store {
    /// A fleet store: the state loaded from a prefix of the shared store
    /// (`entries`, read at one revision; `revision` is the newest change on
    /// the prefix, 0 when empty), kept current by [`Store::deliver`] and
    /// [`Store::reload`], writing through `shared`.
    pub fn open_shared(
        shared: Arc<dyn Shared>,
        entries: &[(String, Vec<u8>)],
        revision: u64,
        options: &Durability,
        audit: Option<AuditLog>,
        node: &str,
    ) -> Result<Arc<Store>, OpenError> {
        let mut resources = ResourceBuilder::default();
        let state = build(entries, revision, &mut resources).map_err(OpenError::World)?;
        let backend = Box::new(MemoryBackend::new(super::MEMORY_COMPACT_AFTER));
        let mut backend: Box<dyn crate::storage::Backend> = backend;
        backend.recover(&mut |_| Ok(()))?;
        let (store, started) = Store::start(state, resources, backend, options.event_capacity, audit);
        started.map_err(OpenError::World)?;
        let fleet = Fleet {
            shared,
            node: node.to_string(),
            confirmed: Mutex::new(Instant::now()),
            lag: AtomicU64::new(0),
            stuck: Mutex::new(None),
        };
        if store.inner.fleet.set(fleet).is_err() {
            return Err(OpenError::World("the store is already a fleet store".into()));
        }
        Ok(Arc::new(store))
    }

    /// This store takes its changes from a shared store.
    pub fn is_shared(&self) -> bool {
        self.inner.fleet.get().is_some()
    }

    /// Where a fleet store's state lives, `None` for other stores.
    pub fn shared_place(&self) -> Option<String> {
        self.inner.fleet.get().map(|f| f.shared.place())
    }

    /// Applies one transaction the shared store delivered, whole: every key
    /// of it or none. A revision already applied is skipped. A change that
    /// does not apply stops the following (the store keeps serving the
    /// last whole state, refuses writes and says why).
    pub fn deliver(&self, delivered: Delivered) -> Result<(), String> {
        let Some(fleet) = self.inner.fleet.get() else { return Err("not a fleet store".into()) };
        if let Some(stuck) = lock(&fleet.stuck).clone() {
            return Err(stuck);
        }
        let current = self.snapshot();
        if delivered.revision <= current.revision() {
            return Ok(());
        }
        let revision = delivered.revision;
        let mut writer = lock(&self.inner.writer);
        let mut next = State::clone(&current);
        let outcome = apply_delivered(&mut next, &mut writer.resources, &delivered);
        let events = match outcome {
            Ok(events) => events,
            Err(reason) => {
                let message = format!("cannot apply the change at revision {revision} from {}: {reason}", fleet.shared.place());
                tracing::error!(error = %message, "stopped following the shared store; serving the last whole state");
                *lock(&fleet.stuck) = Some(message.clone());
                writer.failed = Some(message.clone());
                return Err(message);
            }
        };
        next.set_revision(revision);
        let next = Arc::new(next);
        writer.head = next.clone();
        self.inner.publish(next, events);
        Ok(())
    }

    /// Swaps in a whole new state loaded from the prefix (after the shared
    /// store compacted past what this store had applied). Watchers see one
    /// `world replace` event.
    pub fn reload(&self, entries: &[(String, Vec<u8>)], revision: u64) -> Result<(), String> {
        let Some(fleet) = self.inner.fleet.get() else { return Err("not a fleet store".into()) };
        let mut writer = lock(&self.inner.writer);
        let mut resources = ResourceBuilder::default();
        let state = build(entries, revision, &mut resources)?;
        writer.resources = resources;
        let next = Arc::new(state);
        writer.head = next.clone();
        writer.failed = None;
        *lock(&fleet.stuck) = None;
        let event = Event {
            revision,
            time_unix_ms: now_ms(),
            actor: "reload".into(),
            kind: EventKind::Entity { kind: EntityKind::World, name: String::new(), change: ChangeKind::Replace },
        };
        self.inner.publish(next, vec![event]);
        Ok(())
    }

    /// Records what a look at the shared store found: its newest revision on
    /// the prefix. When this snapshot has it, the snapshot is current now.
    pub fn confirm(&self, newest: u64) {
        let Some(fleet) = self.inner.fleet.get() else { return };
        let lag = newest.saturating_sub(self.revision());
        fleet.lag.store(lag, Ordering::Relaxed);
        if lag == 0 && lock(&fleet.stuck).is_none() {
            *lock(&fleet.confirmed) = Instant::now();
        }
    }

    /// How far behind the shared store this snapshot was when last looked
    /// at (revisions; 0 for other stores).
    pub fn revision_lag(&self) -> u64 {
        self.inner.fleet.get().map_or(0, |f| f.lag.load(Ordering::Relaxed))
    }

    /// Why a fleet store stopped following, if it did.
    pub fn stuck(&self) -> Option<String> {
        self.inner.fleet.get().and_then(|f| lock(&f.stuck).clone())
    }

    /// For a fleet store: how long since the snapshot was known to be the
    /// newest state (`None` for other stores).
    pub(super) fn fleet_age(&self) -> Option<Duration> {
        self.inner.fleet.get().map(|f| lock(&f.confirmed).elapsed())
    }

    /// Applies an admin update and waits until it is durable and visible
    /// here: through the shared store for a fleet store, through the
    /// backend otherwise. The revision it made (or the current one when it
    /// changed nothing).
    pub async fn apply_acked(&self, update: &Update, actor: &str) -> Result<u64, UpdateError> {
        if !self.is_shared() {
            let ticket = self.apply(update, actor)?;
            return ticket.durable().await.map_err(|e| UpdateError::new(ErrorCode::StorageFailed, e.to_string()));
        }
        let result = self.apply_shared(update, actor).await;
        crate::observe::admin_update(result.as_ref().err().map(|e| e.code));
        if let Err(e) = &result {
            if e.code != ErrorCode::StorageFailed {
                self.audit_refusal(Refusal {
                    time_unix_ms: now_ms(),
                    actor: actor.to_string(),
                    caller: None,
                    revision: self.revision(),
                    what: RefusedWrite::Update { update: update_field(update).to_string() },
                    error_code: e.code.as_str().to_string(),
                    error_message: e.message.clone(),
                });
            }
        }
        result
    }

    /// Performs a tag operation and waits until it is durable and visible
    /// here (see [`Store::apply_acked`]).
    pub async fn tag_acked(&self, req: &TagRequest) -> Result<Tagged, TagError> {
        if !self.is_shared() {
            let (done, ticket) = self.tag(req)?;
            ticket.durable().await.map_err(|e| TagError::Unavailable(e.to_string()))?;
            return Ok(done);
        }
        self.tag_shared(req).await
    }

    /// Performs a KMS alias or grant operation and waits until it is durable
    /// and visible here (see [`Store::apply_acked`]).
    pub async fn kms_acked(&self, req: &KmsRequest) -> Result<KmsDone, KmsError> {
        if !self.is_shared() {
            let (done, ticket) = self.kms(req)?;
            ticket.durable().await.map_err(|e| KmsError::Unavailable(e.to_string()))?;
            return Ok(done);
        }
        self.kms_shared(req).await
    }

    async fn kms_shared(&self, req: &KmsRequest) -> Result<KmsDone, KmsError> {
        let fleet = self.fleet().map_err(KmsError::Unavailable)?;
        let refused = |reason: String| KmsError::Validation { field: req.op.name().to_string(), reason };
        for _ in 0..MAX_ATTEMPTS {
            let snap = self.snapshot();
            let mut outcome = match tagward_core::kms_ops::perform(&snap, req) {
                Ok(outcome) => outcome,
                Err(e) => {
                    if let KmsError::AccessDenied { resource, .. } = &e {
                        self.audit_refusal(kms_refusal(req, resource, None, snap.revision(), "AccessDenied", e.to_string()));
                    }
                    return Err(e);
                }
            };
            let Some((next, change)) = outcome.change.take() else {
                return Ok(KmsDone { outcome, revision: snap.revision(), changed: false });
            };
            let event = kms_event(&change, outcome.decision.matched.iter().map(ToString::to_string).collect());
            let mut keys = Touched::default();
            touched(&kms_record(&change, snap.revision()).change, &snap, &mut keys);
            // The decision read the key, the principal, its policies and the
            // rest of the chain, and an alias name is unique across the keys
            // of an account and Region: the operation commits only if nothing
            // on the prefix changed since (alias and grant changes are rare).
            let guards = vec![Guard::Unchanged { key: LOG_KEY.into(), since: snap.revision() }];
            let events = vec![event];
            let txn = transaction(&snap, &next, &keys, guards, &req.principal, &fleet.node, &events).map_err(refused)?;
            match fleet.shared.commit(txn).await {
                Ok(revision) => {
                    self.acknowledge(revision, events).await.map_err(KmsError::Unavailable)?;
                    return Ok(KmsDone { outcome, revision, changed: true });
                }
                Err(CommitError::Conflict { current }) => self.catch_up(current).await,
                Err(CommitError::Refused(reason)) => return Err(refused(reason)),
                Err(e @ CommitError::Unavailable(_)) => return Err(KmsError::Unavailable(e.to_string())),
            }
        }
        Err(KmsError::Unavailable(format!("gave up after {MAX_ATTEMPTS} attempts, each overtaken by a conflicting change")))
    }

    fn fleet(&self) -> Result<&Fleet, String> {
        let fleet = self.inner.fleet.get().ok_or("not a fleet store")?;
        if let Some(stuck) = lock(&fleet.stuck).clone() {
            return Err(stuck);
        }
        Ok(fleet)
    }

    async fn apply_shared(&self, update: &Update, actor: &str) -> Result<u64, UpdateError> {
        let unavailable = |m: String| UpdateError::new(ErrorCode::StorageFailed, m);
        let fleet = self.fleet().map_err(unavailable)?;
        for _ in 0..MAX_ATTEMPTS {
            let snap = self.snapshot();
            let mut next = State::clone(&snap);
            let mut applied = Applied::default();
            {
                let mut writer = lock(&self.inner.writer);
                apply(&mut next, &mut writer.resources, update, actor, &mut applied)?;
            }
            if next.revision() == snap.revision() {
                return Ok(snap.revision());
            }
            let mut touched_keys = Touched::default();
            applied.changes.iter().for_each(|c| touched(c, &snap, &mut touched_keys));
            // An admin update may read anything (a batch, a replaced world):
            // it commits only if nothing on the prefix changed since.
            let guards = vec![Guard::Unchanged { key: LOG_KEY.into(), since: snap.revision() }];
            let txn = transaction(&snap, &next, &touched_keys, guards, actor, &fleet.node, &applied.events)
                .map_err(|e| UpdateError::new(ErrorCode::Validation, format!("{}: {e}", update_field(update))))?;
            match fleet.shared.commit(txn).await {
                Ok(revision) => return self.acknowledge(revision, applied.events).await.map_err(unavailable),
                Err(CommitError::Conflict { current }) => self.catch_up(current).await,
                Err(CommitError::Refused(reason)) => {
                    return Err(UpdateError::new(ErrorCode::Validation, format!("{}: {reason}", update_field(update))))
                }
                Err(e @ CommitError::Unavailable(_)) => return Err(unavailable(e.to_string())),
            }
        }
        Err(unavailable(format!("gave up after {MAX_ATTEMPTS} attempts, each overtaken by a conflicting change")))
    }

    async fn tag_shared(&self, req: &TagRequest) -> Result<Tagged, TagError> {
        let fleet = self.fleet().map_err(TagError::Unavailable)?;
        for _ in 0..MAX_ATTEMPTS {
            let snap = self.snapshot();
            let mut outcome = match perform(&snap, req) {
                Ok(outcome) => outcome,
                Err(e) => {
                    if let TagError::AccessDenied { action, .. } = &e {
                        self.audit_refusal(tag_refusal(req, action, None, snap.revision(), "AccessDenied", e.to_string()));
                    }
                    return Err(e);
                }
            };
            let Some((next, change)) = outcome.change.take() else {
                return Ok(Tagged { outcome, revision: snap.revision(), changed: false });
            };
            let event = tag_event(&change, outcome.decision.matched.iter().map(ToString::to_string).collect());
            let mut keys = Touched::default();
            keys.keys.insert(target_key(&snap, &req.resource));
            let guards = tag_read_set(&snap, req);
            let events = vec![event];
            let txn = transaction(&snap, &next, &keys, guards, &req.principal, &fleet.node, &events)
                .map_err(|reason| TagError::Validation { field: "tags".into(), reason })?;
            match fleet.shared.commit(txn).await {
                Ok(revision) => {
                    self.acknowledge(revision, events).await.map_err(TagError::Unavailable)?;
                    return Ok(Tagged { outcome, revision, changed: true });
                }
                Err(CommitError::Conflict { current }) => self.catch_up(current).await,
                Err(CommitError::Refused(reason)) => return Err(TagError::Validation { field: "tags".into(), reason }),
                Err(e @ CommitError::Unavailable(_)) => return Err(TagError::Unavailable(e.to_string())),
            }
        }
        Err(TagError::Unavailable(format!("gave up after {MAX_ATTEMPTS} attempts, each overtaken by a conflicting change")))
    }

    /// After a lost conflict: waits until this snapshot holds the change
    /// that won (a timeout just means the next attempt may lose again).
    async fn catch_up(&self, current: u64) {
        let _ = self.snapshot_at_least(current, ACK_WAIT).await;
    }

    /// A committed change: its audit record (written here, once, by the
    /// sidecar that made it), then the wait for this snapshot to hold it.
    async fn acknowledge(&self, revision: u64, mut events: Vec<Event>) -> Result<u64, String> {
        for e in &mut events {
            e.revision = revision;
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.audit(&events.iter().collect::<Vec<_>>(), &[]))
            .await
            .map_err(|e| format!("the audit task failed: {e}"))?
            .map_err(|e| format!("the change was committed at revision {revision}, but {e}"))?;
        self.snapshot_at_least(revision, ACK_WAIT)
            .await
            .map(|_| revision)
            .map_err(|e| format!("the change was committed at revision {revision} but has not arrived here yet: {e}"))
    }
}

/// The entity a tag operation writes: an IAM user or role keeps its tags
/// on the principal, everything else on the resource.
fn target_key(state: &State, arn: &str) -> EntityKey {
    match state.principal(arn) {
        Some(_) => EntityKey::Principal(arn.to_string()),
        None => EntityKey::Resource(arn.to_string()),
    }
}

/// What a tag operation's decision read, as guards: the resource (its tags
/// and key policy), the principal (or every principal when the ARN names a
/// session of a role) and the managed policies it attaches.
fn tag_read_set(snap: &State, req: &TagRequest) -> Vec<Guard> {
    let since = snap.revision();
    let resource = target_key(snap, &req.resource).path();
    let mut guards = vec![Guard::Exists { key: resource.clone() }, Guard::Unchanged { key: resource, since }];
    match snap.principal(&req.principal) {
        Some(p) => {
            let key = EntityKey::Principal(req.principal.clone()).path();
            guards.push(Guard::Exists { key: key.clone() });
            guards.push(Guard::Unchanged { key, since });
            for name in p.managed.iter().chain(p.boundary.iter()) {
                let policy = EntityKey::Policy(name.to_string());
                if snap.policy(name).is_some() {
                    guards.push(Guard::Exists { key: policy.path() });
                }
                guards.push(Guard::Unchanged { key: policy.path(), since });
            }
        }
        None => {
            // A session of a role (or an unknown caller): whatever the
            // decision found, nothing among principals and policies moved.
            guards.push(Guard::DirUnchanged { dir: EntityKey::Principal(String::new()).dir().into(), since });
            guards.push(Guard::DirUnchanged { dir: EntityKey::Policy(String::new()).dir().into(), since });
        }
    }
    // The rest of the chain the decision may have consulted: the
    // organization's SCPs and RCPs, a declared session's policies, and the
    // policy of the VPC endpoint the request came through.
    guards.push(Guard::Unchanged { key: EntityKey::Organization.path(), since });
    guards.push(Guard::DirUnchanged { dir: EntityKey::Session(String::new()).dir().into(), since });
    guards.push(Guard::DirUnchanged { dir: EntityKey::Endpoint(String::new()).dir().into(), since });
    guards
}

/// The transaction that takes the prefix from `before` to `after`: a put or
/// delete per touched entity and the log key.
fn transaction(
    before: &State,
    after: &State,
    touched: &Touched,
    guards: Vec<Guard>,
    actor: &str,
    node: &str,
    events: &[Event],
) -> Result<Txn, String> {
    let mut ops = Vec::new();
    if touched.everything {
        let old = entities(before)?;
        let new = entities(after)?;
        for key in old.keys().filter(|k| !new.contains_key(k)) {
            ops.push(Op::Delete { key: key.path() });
        }
        for (key, value) in new {
            if old.get(&key) != Some(&value) {
                ops.push(Op::Put { key: key.path(), value });
            }
        }
    } else {
        for key in &touched.keys {
            match key.record(after) {
                Some(record) => {
                    let value = serde_json::to_vec(&record).map_err(|e| format!("cannot encode {}: {e}", record.describe()))?;
                    ops.push(Op::Put { key: key.path(), value });
                }
                None if key.record(before).is_some() => ops.push(Op::Delete { key: key.path() }),
                None => {}
            }
        }
    }
    let entry = LogEntry {
        actor: actor.to_string(),
        time_unix_ms: now_ms(),
        node: node.to_string(),
        events: events.iter().map(LoggedEvent::of).collect(),
    };
    let value = serde_json::to_vec(&entry).map_err(|e| format!("cannot encode the log entry: {e}"))?;
    ops.push(Op::Put { key: LOG_KEY.into(), value });
    Ok(Txn { guards, ops })
}

/// The transaction that seeds an empty prefix with `world` (only if no
/// change was ever made there: the first sidecar to commit it seeds).
pub fn seed_transaction(world: &WorldSpec, actor: &str, node: &str) -> Result<Txn, String> {
    let state = world.build().map_err(|e| e.to_string())?;
    let mut ops: Vec<Op> = entities(&state)?.into_iter().map(|(key, value)| Op::Put { key: key.path(), value }).collect();
    let entry = LogEntry {
        actor: actor.to_string(),
        time_unix_ms: now_ms(),
        node: node.to_string(),
        events: vec![LoggedEvent::Entity {
            time_unix_ms: now_ms(),
            actor: actor.to_string(),
            kind: EntityKind::World.as_str().into(),
            name: String::new(),
            change: ChangeKind::Replace.as_str().into(),
        }],
    };
    let value = serde_json::to_vec(&entry).map_err(|e| format!("cannot encode the log entry: {e}"))?;
    ops.push(Op::Put { key: LOG_KEY.into(), value });
    Ok(Txn { guards: vec![Guard::Missing { key: LOG_KEY.into() }], ops })
}

/// Builds a state from the entity keys of a prefix (`tagward export`).
pub fn load_state(entries: &[(String, Vec<u8>)], revision: u64) -> Result<State, String> {
    build(entries, revision, &mut ResourceBuilder::default())
}

/// The events one delivered transaction says: those of its log entry, or
/// (written by something other than a sidecar) one per entity key it put
/// or deleted. The same whether it is applied live or replayed for a watch.
pub fn delivered_events(d: &Delivered) -> Result<Vec<Event>, String> {
    let mut log: Option<LogEntry> = None;
    let mut puts: Vec<EntityKey> = Vec::new();
    for (key, value) in &d.puts {
        if key == LOG_KEY {
            log = Some(serde_json::from_slice(value).map_err(|e| format!("{LOG_KEY}: not a log entry: {e}"))?);
        } else if let Some(entity) = EntityKey::parse(key) {
            puts.push(entity);
        }
    }
    puts.sort();
    Ok(match log {
        Some(entry) => entry.events.into_iter().filter_map(|e| e.event(d.revision)).collect(),
        None => d
            .deletes
            .iter()
            .filter_map(|k| EntityKey::parse(k))
            .map(|k| k.event(d.revision, ChangeKind::Delete))
            .chain(puts.iter().map(|k| k.event(d.revision, ChangeKind::Put)))
            .collect(),
    })
}

/// Applies one delivered transaction to `state`; the events it says.
fn apply_delivered(state: &mut State, resources: &mut ResourceBuilder, d: &Delivered) -> Result<Vec<Event>, String> {
    let events = delivered_events(d)?;
    let mut puts: Vec<(EntityKey, &Vec<u8>)> = Vec::new();
    for (key, value) in &d.puts {
        if let Some(entity) = EntityKey::parse(key) {
            puts.push((entity, value));
        }
    }
    let deletes: Vec<EntityKey> = d.deletes.iter().filter_map(|k| EntityKey::parse(k)).collect();
    // Deletions first (a transaction never writes a key twice), then puts
    // in key order: policies before the principals that attach them.
    for key in &deletes {
        let present = key.record(state).is_some();
        if present {
            replay(state, resources, &key.deletion()).map_err(|e| format!("{}: {e}", key.path()))?;
        }
    }
    puts.sort_by(|a, b| a.0.cmp(&b.0));
    // A transaction may move an alias from one key to another (UpdateAlias,
    // or a batch): the keys it rewrites give up their aliases first, so that
    // their new records take them back in any order.
    for (key, _) in &puts {
        let EntityKey::Resource(arn) = key else { continue };
        if let Some(mut spec) = state.resource(arn).map(|r| resource_spec(r)).filter(|s| !s.aliases.is_empty()) {
            spec.aliases.clear();
            replay(state, resources, &Change::PutResource(spec)).map_err(|e| format!("{}: {e}", key.path()))?;
        }
    }
    for (key, bytes) in &puts {
        let change: Change = serde_json::from_slice(bytes).map_err(|e| format!("{}: not an entity record: {e}", key.path()))?;
        if record_key(&change).as_ref() != Some(key) {
            return Err(format!("{}: holds the record of {}", key.path(), change.describe()));
        }
        replay(state, resources, &change).map_err(|e| format!("{}: {e}", key.path()))?;
    }
    Ok(events)
}

/// What a watch streams, in this order: on a fleet store, the events older
/// than this store keeps, replayed from the shared store's history; the
/// kept events; then the live ones (no gap and no repeat between them).
pub struct Watched {
    pub older: Option<tokio::sync::mpsc::Receiver<Result<Event, String>>>,
    pub kept: Vec<Arc<Event>>,
    pub live: tokio::sync::broadcast::Receiver<Arc<Event>>,
}

/// Why a watch cannot start.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WatchRefused {
    /// Not a fleet store, and the events after `asked` are no longer kept.
    #[error(transparent)]
    Gone(#[from] super::WatchGone),
    /// The shared store compacted the history after `asked`.
    #[error("from_revision {asked}: {place} no longer retains that history (it was compacted); the oldest retained revision is {oldest}, so watch from revision {} or later, or export the state and watch from its revision", oldest.saturating_sub(1))]
    Compacted { asked: u64, oldest: u64, place: String },
    /// The older events must come from the shared store, which cannot be
    /// reached.
    #[error(
        "from_revision {asked}: the events through revision {dropped} are read from {place}, which is unavailable: {reason}"
    )]
    Unavailable { asked: u64, dropped: u64, place: String, reason: String },
}

impl Store {
    /// Starts a watch of the events after revision `from` (0: live only).
    /// A fleet store replays the events older than the ones it keeps from
    /// the shared store's history, which any sidecar can read: a watch from
    /// any revision the shared store retains works on every sidecar.
    pub async fn watch_all(&self, from: u64) -> Result<Watched, WatchRefused> {
        let gone = match self.watch(from) {
            Ok((kept, live)) => return Ok(Watched { older: None, kept, live }),
            Err(gone) => gone,
        };
        let Some(fleet) = self.inner.fleet.get() else { return Err(gone.into()) };
        // Taken together under the event log's lock: the revision through
        // which this store no longer has every event, the kept events after
        // it and the live feed. The history covers (from, dropped].
        let (dropped, kept, live) = {
            let log = lock(&self.inner.events);
            let kept: Vec<Arc<Event>> = log.kept.iter().filter(|e| e.revision > log.dropped).cloned().collect();
            (log.dropped, kept, log.live.subscribe())
        };
        let place = fleet.shared.place();
        let mut history = fleet.shared.history(from + 1, dropped).await.map_err(|e| match e {
            HistoryError::Compacted { oldest } => WatchRefused::Compacted { asked: from, oldest, place: place.clone() },
            HistoryError::Unavailable(reason) => WatchRefused::Unavailable { asked: from, dropped, place: place.clone(), reason },
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = history.recv() => next,
                    // The watcher went away: stop reading the history.
                    _ = tx.closed() => return,
                };
                let Some(next) = next else { return };
                let events = next.and_then(|d| delivered_events(&d).map_err(|e| format!("revision {}: {e}", d.revision)));
                match events {
                    Ok(events) => {
                        for e in events {
                            if tx.send(Ok(e)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("reading the history from {place}: {e}"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Watched { older: Some(rx), kept, live })
    }
}

/// Fleet state hidden behind a `OnceLock` in the store's shared part.
pub(super) type FleetCell = OnceLock<Fleet>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tagward_core::world::ResourceSpec;

    fn world() -> WorldSpec {
        serde_json::from_value(json!({
            "policies": {"P": {"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}}},
            "principals": [{"arn": "arn:aws:iam::111122223333:role/R", "policies": ["P"], "tags": {"team": "a"}}],
            "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "tags": {"Project": "Alpha"}}]
        }))
        .unwrap()
    }

    fn entries(state: &State) -> Vec<(String, Vec<u8>)> {
        entities(state).unwrap().into_iter().map(|(k, v)| (k.path(), v)).collect()
    }

    #[test]
    fn every_entity_has_one_key_that_reads_back() {
        let state = world().build().unwrap();
        let keys: Vec<String> = entries(&state).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            vec![
                "e/policy/P".to_string(),
                "e/principal/arn:aws:iam::111122223333:role/R".to_string(),
                "e/resource/arn:aws:kms:us-east-1:111122223333:key/k1".to_string()
            ]
        );
        for k in &keys {
            assert_eq!(EntityKey::parse(k).unwrap().path(), *k);
        }
        assert_eq!(EntityKey::parse("log"), None);
        assert_eq!(EntityKey::parse("e/other/x"), None);
        let rebuilt = load_state(&entries(&state), 42).unwrap();
        assert_eq!(rebuilt.revision(), 42);
        assert_eq!(WorldSpec::from_state(&rebuilt).principals.len(), 1);
        assert_eq!(entries(&rebuilt), entries(&state), "the same records come back");
    }

    #[test]
    fn a_tag_change_writes_one_key_and_a_replaced_world_every_changed_one() {
        let mut t = Touched::default();
        let empty = State::default();
        touched(&Change::ReplaceTags { resource: "arn:r".into(), tags: vec![] }, &empty, &mut t);
        touched(&Change::Batch(vec![Change::DeletePolicy { name: "P".into() }]), &empty, &mut t);
        assert_eq!(
            t.keys.into_iter().collect::<Vec<_>>(),
            vec![EntityKey::Policy("P".into()), EntityKey::Resource("arn:r".into())]
        );
        let before = world().build().unwrap();
        let mut after = State::clone(&before);
        let mut applied = Applied::default();
        let mut resources = ResourceBuilder::default();
        let replacement: WorldSpec =
            serde_json::from_value(json!({"resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1"}]})).unwrap();
        apply(&mut after, &mut resources, &Update::ReplaceWorld(replacement), "admin", &mut applied).unwrap();
        let mut t = Touched::default();
        applied.changes.iter().for_each(|c| touched(c, &before, &mut t));
        assert!(t.everything);
        let txn = transaction(&before, &after, &t, vec![], "admin", "n", &applied.events).unwrap();
        let deletes = txn.ops.iter().filter(|o| matches!(o, Op::Delete { .. })).count();
        let puts: Vec<&String> =
            txn.ops.iter().filter_map(|o| if let Op::Put { key, .. } = o { Some(key) } else { None }).collect();
        assert_eq!(deletes, 2, "the policy and the principal go: {:?}", txn.ops);
        assert_eq!(puts, vec!["e/resource/arn:aws:kms:us-east-1:111122223333:key/k1", LOG_KEY], "the key lost its tags");
    }

    #[test]
    fn a_delivered_change_applies_whole_or_not_at_all() {
        let mut state = world().build().unwrap();
        let before = WorldSpec::from_state(&state);
        let good = serde_json::to_vec(&Change::PutResource(ResourceSpec {
            arn: "arn:aws:kms:us-east-1:111122223333:key/k2".into(),
            ..ResourceSpec::default()
        }))
        .unwrap();
        let bad = Delivered {
            revision: 9,
            puts: vec![
                ("e/resource/arn:aws:kms:us-east-1:111122223333:key/k2".into(), good.clone()),
                ("e/policy/Q".into(), b"{not json".to_vec()),
            ],
            deletes: vec![],
        };
        let mut copy = State::clone(&state);
        let err = apply_delivered(&mut copy, &mut ResourceBuilder::default(), &bad).unwrap_err();
        assert!(err.contains("e/policy/Q"), "{err}");
        // A key holding another entity's record is refused too.
        let misplaced = Delivered { revision: 9, puts: vec![("e/resource/arn:other".into(), good.clone())], deletes: vec![] };
        assert!(apply_delivered(&mut State::clone(&state), &mut ResourceBuilder::default(), &misplaced).is_err());
        assert_eq!(serde_json::to_value(WorldSpec::from_state(&state)).unwrap(), serde_json::to_value(&before).unwrap());
        let ok = Delivered {
            revision: 9,
            puts: vec![("e/resource/arn:aws:kms:us-east-1:111122223333:key/k2".into(), good)],
            deletes: vec!["e/policy/P".into()],
        };
        let events = apply_delivered(&mut state, &mut ResourceBuilder::default(), &ok).unwrap();
        assert!(state.policy("P").is_none() && state.resource("arn:aws:kms:us-east-1:111122223333:key/k2").is_some());
        assert_eq!(events.len(), 2, "without a log entry the keys say what changed: {events:?}");
        assert!(events.iter().all(|e| e.revision == 9));
    }
}
