//! The live world: the current [`State`] behind an atomic pointer, the one
//! writer, revisions that readers can wait for, and the change events that
//! `Admin.Watch` streams.
//!
//! Readers do one `ArcSwap` load and then evaluate on an immutable snapshot.
//! Writers take the write lock, clone the head state (cheap: persistent
//! maps), change the clone and make it the new head, so a reader sees a
//! whole update or none of it.
//!
//! Every store writes through a storage [`Backend`] (a data directory, or
//! memory for `--ephemeral` and in-process runs): a change is appended to
//! the log as a [`Record`] and becomes visible only once it is durable. The
//! committer thread syncs every change that arrived meanwhile with one sync
//! (group commit), writes their audit records, then publishes them in order
//! and wakes their [`Ticket`]s. Writers build on the head, which may be
//! ahead of what readers see by the changes in flight.
//!
//! INVARIANT: the published state's revision only grows, and only durable
//! states are published; every revision published has its events in the
//! event log before the revision is announced, so a watcher that asks
//! "after N" misses nothing.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use thiserror::Error;
use tokio::sync::{broadcast, watch};

use tagward_core::change::{
    apply, kms_event, kms_record, now_ms, put_built, replay, replay_events, state_changes, tag_event, tag_record, update_field,
    Applied,
};
use tagward_core::change::{Change, Record};
use tagward_core::error::ErrorCode;
use tagward_core::kms_ops::{KmsError, KmsOutcome, KmsRequest};
use tagward_core::state::State;
use tagward_core::tagging::{perform, TagError, TagOutcome, TagRequest};
use tagward_core::world::{ResourceBuilder, WorldSpec};

use crate::audit::{AuditLog, Refusal, Refused as RefusedWrite};
mod record;
mod shared;
use crate::storage::{Backend, Cut, FileBackend, Loaded, LogRecord, MemoryBackend, NotLoaded, StorageError};
use record::Decoded;
pub use shared::{
    delivered_events, entities, load_state, seed_transaction, CommitError, CommitFuture, Delivered, EntityKey, Guard, History,
    HistoryError, HistoryFuture, LogEntry, Op, Shared, Txn, WatchRefused, Watched, ENTITY_DIR, LOG_KEY,
};
/// The vocabulary of changes, where the store's callers have always found it.
pub use tagward_core::change::{ChangeKind, EntityKind, Event, EventKind, Update, UpdateError};

/// Log bytes after which an in-process store's memory backend drops its
/// older log.
pub const MEMORY_COMPACT_AFTER: u64 = 64 << 20;

/// Refusal records that may wait for the committer; more are dropped (and
/// counted), so a flood of refused calls cannot grow memory without bound.
pub const MAX_PENDING_REFUSALS: usize = 65_536;

/// A tag operation's result, as the store applied it.
#[derive(Debug)]
pub struct Tagged {
    pub outcome: TagOutcome,
    /// The revision after the operation.
    pub revision: u64,
    /// This operation changed the tags (and so made `revision`).
    pub changed: bool,
}

/// A KMS alias or grant operation's result, as the store applied it.
#[derive(Debug)]
pub struct KmsDone {
    pub outcome: KmsOutcome,
    /// The revision after the operation.
    pub revision: u64,
    /// This operation changed the state (and so made `revision`).
    pub changed: bool,
}

/// The audit record of a refused KMS alias or grant operation.
pub fn kms_refusal(
    req: &KmsRequest,
    resource: &str,
    caller: Option<String>,
    revision: u64,
    error_code: &str,
    error_message: String,
) -> Refusal {
    Refusal {
        time_unix_ms: now_ms(),
        actor: req.principal.clone(),
        caller,
        revision,
        what: RefusedWrite::Kms { resource: resource.to_string(), action: req.op.action() },
        error_code: error_code.to_string(),
        error_message,
    }
}

/// The kept events a watch starts with, and the receiver of the live ones.
pub type Following = (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>);

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
    /// The newest accepted state: published, or durable soon.
    head: Arc<State>,
    resources: ResourceBuilder,
    backend: Box<dyn Backend>,
    /// Accepted and logged, waiting for the sync that publishes them.
    pending: Vec<(Arc<State>, Vec<Event>)>,
    /// Set when storage failed: every later change is refused.
    failed: Option<String>,
}

/// Durability progress, shared with tickets and the committer thread.
#[derive(Debug)]
struct Commit {
    progress: Mutex<Progress>,
    changed: Condvar,
    watch: watch::Sender<Progress>,
    wake: Mutex<Wake>,
    wake_cv: Condvar,
}

#[derive(Debug, Default)]
struct Wake {
    /// Pending changes wait for a sync.
    pending: bool,
    /// The store was dropped: commit what is pending, then stop.
    stop: bool,
}

#[derive(Debug, Clone, Default)]
struct Progress {
    durable: u64,
    failed: Option<String>,
}

/// What the store and its committer thread share.
struct Inner {
    current: ArcSwap<State>,
    writer: Mutex<Writer>,
    events: Mutex<EventLog>,
    revision: watch::Sender<u64>,
    commit: Arc<Commit>,
    /// Written before a change is acknowledged.
    audit: Mutex<Option<AuditLog>>,
    /// An audit trail is attached (so refusals are worth queueing).
    audited: bool,
    /// Refusals waiting for the committer to write them (bounded).
    refusals: Mutex<VecDeque<Refusal>>,
    /// When the current snapshot was published.
    published_at: Mutex<std::time::Instant>,
    /// Set for a fleet store (`shared.rs`): its changes go through a shared
    /// store.
    fleet: shared::FleetCell,
    /// Why the store refuses every change, when it does (for health).
    failure: watch::Sender<Option<String>>,
    /// How to open the medium again after a storage failure (a data
    /// directory's store has one): the committer retries with it, with
    /// back-off, until the store takes changes again.
    reopen: Mutex<Option<Reopen>>,
}

/// Opens a store's medium again (see [`Store::recover_with`]).
pub type Reopen = Box<dyn FnMut() -> Result<Box<dyn Backend>, StorageError> + Send>;

/// The first wait before a failed store tries its medium again, and the
/// longest (the wait doubles from one to the other).
const REOPEN_FIRST: Duration = Duration::from_millis(500);
const REOPEN_MOST: Duration = Duration::from_secs(30);

/// The live world.
pub struct Store {
    inner: Arc<Inner>,
    /// Joined on drop, so the backend (a directory's lock) is released
    /// when the store is gone.
    committer: Option<std::thread::JoinHandle<()>>,
}

/// A change that was accepted; `wait` or `durable` return once it is
/// durable and visible.
#[must_use = "a change is acknowledged only once its ticket says it is durable"]
#[derive(Debug)]
pub struct Ticket {
    revision: u64,
    commit: Arc<Commit>,
}

/// Why an accepted change could not be logged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
enum Refused {
    /// Storage failed; every later change is refused too.
    #[error(transparent)]
    Failed(StorageFailed),
    /// This one change cannot be a log record (too large); nothing was
    /// written and the store carries on.
    #[error("{0}")]
    TooLarge(String),
}

/// Storage failed: the change may not be durable, and the store refuses
/// further changes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("storage failed, so changes are refused: {0}")]
pub struct StorageFailed(pub String);

impl Ticket {
    /// The revision the change produced (durable or not yet).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn check(&self, p: &Progress) -> Option<Result<u64, StorageFailed>> {
        if p.durable >= self.revision {
            Some(Ok(self.revision))
        } else {
            p.failed.as_ref().map(|f| Err(StorageFailed(f.clone())))
        }
    }

    /// Blocks until the change is durable.
    pub fn wait(self) -> Result<u64, StorageFailed> {
        let mut p = lock(&self.commit.progress);
        loop {
            if let Some(r) = self.check(&p) {
                return r;
            }
            p = self.commit.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits, without blocking a thread, until the change is durable.
    pub async fn durable(self) -> Result<u64, StorageFailed> {
        let mut rx = self.commit.watch.subscribe();
        let outcome = rx.wait_for(|p| self.check(p).is_some()).await.map(|p| self.check(&p));
        match outcome {
            Ok(Some(r)) => r,
            _ => Err(StorageFailed("the committer stopped".into())),
        }
    }
}

/// How a store runs.
#[derive(Debug, Clone)]
pub struct Durability {
    /// Log bytes after which a snapshot is written and older records
    /// dropped (by the backends [`Store::open_dir`] and
    /// [`Store::open_memory`] make).
    pub compact_after_bytes: u64,
    pub event_capacity: usize,
}

/// What opening a backend found.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The revision restored from the backend (`None` when it was empty).
    pub restored: Option<u64>,
    /// The world file seeded an empty backend.
    pub seeded: bool,
    /// The world file replaced the restored state (forced).
    pub replaced: bool,
    /// A torn tail that recovery cut off.
    pub cut: Option<Cut>,
    /// Logged changes replayed over the snapshot.
    pub replayed: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a half-made state behind:
    // the state is only swapped in whole. Carry on with the data.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Encodes `state` as snapshot records, each at most `max_record` bytes
/// (an entity over it refuses the snapshot, naming the entity).
fn snapshot_records(state: &State, max_record: u32, place: PathBuf) -> impl Iterator<Item = Result<Vec<u8>, StorageError>> + '_ {
    state_changes(state).map(move |change| {
        let what = || format!("the snapshot record of {}", change.describe());
        let bytes = record::encode(&change).map_err(|reason| StorageError::Encode { what: what(), reason })?;
        if bytes.len() > max_record as usize {
            return Err(StorageError::TooLarge { path: place.clone(), what: what(), bytes: bytes.len(), limit: max_record });
        }
        Ok(bytes)
    })
}

/// Writes `state` as a snapshot at its revision to `backend` (after its
/// recovery), dropping what the snapshot makes obsolete: how a store seeds
/// an empty backend, and how tools write one.
pub fn write_snapshot(backend: &mut dyn Backend, state: &State) -> Result<(), StorageError> {
    let job = backend.begin_compaction(state.revision())?;
    job.write(&mut snapshot_records(state, backend.max_record(), backend.place()))
}

/// The audit record of a refused tag operation.
pub fn tag_refusal(
    req: &TagRequest,
    action: &str,
    caller: Option<String>,
    revision: u64,
    error_code: &str,
    error_message: String,
) -> Refusal {
    let (tags, keys) = match &req.op {
        tagward_core::tagging::TagOp::Tag(tags) => (tags.clone(), Vec::new()),
        tagward_core::tagging::TagOp::Untag(keys) => (Vec::new(), keys.clone()),
        tagward_core::tagging::TagOp::List => (Vec::new(), Vec::new()),
    };
    Refusal {
        time_unix_ms: now_ms(),
        actor: req.principal.clone(),
        caller,
        revision,
        what: RefusedWrite::Tags { resource: req.resource.clone(), action: action.to_string(), tags, keys },
        error_code: error_code.to_string(),
        error_message,
    }
}

/// A log record as versions before [`Record`] wrote it: the admin command.
#[derive(serde::Deserialize)]
struct LegacyRecord {
    actor: String,
    change: Update,
}

/// What replaying the log found for the audit trail: the events of the
/// replayed changes after `audited` (the trail's newest revision).
struct Unaudited {
    audited: u64,
    events: Vec<Event>,
}

impl Unaudited {
    /// Keeps the events of the change to `rev` when the trail lacks it,
    /// with the record's actor and time.
    fn note(&mut self, rev: u64, actor: &str, time_unix_ms: i64, events: Vec<Event>) {
        if rev > self.audited {
            self.events.extend(events.into_iter().map(|mut e| {
                e.revision = rev;
                e.actor = actor.to_string();
                e.time_unix_ms = time_unix_ms;
                e
            }));
        }
    }
}

/// Replays one recovered item onto `state`. `spare` builds resources on a
/// second thread during a snapshot (see [`load_snapshot_records`]).
fn load(
    state: &mut State,
    resources: &mut ResourceBuilder,
    spare: &mut ResourceBuilder,
    replayed: &mut u64,
    unaudited: &mut Option<Unaudited>,
    item: Loaded<'_>,
) -> Result<(), NotLoaded> {
    match item {
        Loaded::SnapshotBegin { .. } => {
            // The snapshot's tag index is built once, at its end.
            *state = State::default();
            state.defer_tag_index();
        }
        Loaded::SnapshotRecords(records) => load_snapshot_records(state, resources, spare, records)?,
        Loaded::SnapshotEnd { revision } => {
            state.complete_tag_index();
            state.set_revision(revision);
        }
        Loaded::Record(record) => {
            let (prev, rev) = (record.prev, record.rev);
            if prev != state.revision() {
                return Err(format!("the entry follows revision {prev} but the state is at revision {}", state.revision()).into());
            }
            match serde_json::from_slice::<Record>(&record.bytes) {
                Ok(record) => {
                    let events = replay_events(state, resources, &record.change)
                        .map_err(|e| format!("the logged change does not apply: {e}"))?;
                    if let Some(u) = unaudited.as_mut() {
                        u.note(rev, &record.actor, record.time_unix_ms, events);
                    }
                }
                // Logs written before records held effects hold the admin
                // command itself (`set_tags`, `remove_tags`, a batch of
                // them): applying it again gives the same state.
                Err(e) => {
                    let legacy: LegacyRecord =
                        serde_json::from_slice(&record.bytes).map_err(|_| format!("the record is not a log entry: {e}"))?;
                    let mut applied = Applied::default();
                    apply(state, resources, &legacy.change, &legacy.actor, &mut applied)
                        .map_err(|e| format!("the logged change does not apply: {e}"))?;
                    if let Some(u) = unaudited.as_mut() {
                        u.note(rev, &legacy.actor, now_ms(), applied.events);
                    }
                }
            }
            if state.revision() != rev {
                return Err(format!("replaying gives revision {}, the entry says {rev}", state.revision()).into());
            }
            *replayed += 1;
        }
    }
    Ok(())
}

fn apply_snapshot_record(state: &mut State, resources: &mut ResourceBuilder, decoded: Decoded) -> Result<(), String> {
    match decoded {
        Decoded::Resource(resource) => put_built(state, resource),
        Decoded::Change(change) => replay(state, resources, &change),
    }
    .map_err(|e| format!("the snapshot does not load: {e}"))
}

/// Batches of fewer records are loaded on one thread.
const PARALLEL_FROM: usize = 64;

/// Records a thread takes at a time while two share a batch.
const CHUNK: usize = 32;

/// What the two threads sharing a batch share: which chunks are taken, and
/// the second thread's decoded chunks this one has not put yet.
struct Sharing {
    /// The second thread takes chunks from here on, in order.
    front: usize,
    /// This thread takes chunks from before here, last first.
    back: usize,
    /// The second thread's decoded chunks, in order.
    decoded: VecDeque<(usize, Vec<Result<Decoded, String>>)>,
    /// The second thread takes no more.
    done: bool,
}

/// Marks the second thread done, however it stops (a panic included), so
/// that the thread waiting for its chunks never waits for nothing.
struct Finishing<'a>(&'a (Mutex<Sharing>, Condvar));

impl Drop for Finishing<'_> {
    fn drop(&mut self) {
        lock(&self.0 .0).done = true;
        self.0 .1.notify_all();
    }
}

/// Replays a batch of snapshot records, in order, onto `state`. Decoding a
/// record and lowering a resource need no state, so two threads share the
/// decoding, in chunks of [`CHUNK`] records: a second thread (with `spare`,
/// its own builder) decodes chunks from the front of the batch and hands
/// them over in order; this one puts each as it comes and, while the next
/// is not ready, decodes chunks from the back and keeps them; when the two
/// meet, it puts what it kept, in order. Neither part is fixed in advance,
/// so neither thread waits for the other until they meet. The first record
/// that fails, in the batch's order, is the one refused, with the same
/// reason as one by one; nothing after it is put.
fn load_snapshot_records(
    state: &mut State,
    resources: &mut ResourceBuilder,
    spare: &mut ResourceBuilder,
    records: &[&[u8]],
) -> Result<(), NotLoaded> {
    let refused = |record: usize| move |reason: String| NotLoaded { reason, record };
    let parallel = records.len() >= PARALLEL_FROM && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    if !parallel {
        for (i, bytes) in records.iter().enumerate() {
            record::decode(resources, bytes)
                .and_then(|decoded| apply_snapshot_record(state, resources, decoded))
                .map_err(refused(i))?;
        }
        return Ok(());
    }
    let chunks = records.len().div_ceil(CHUNK);
    let chunk = |c: usize| c * CHUNK..records.len().min((c + 1) * CHUNK);
    // A chunk decoded up to its first record that fails.
    let decode = |builder: &mut ResourceBuilder, c: usize| {
        let mut items = Vec::with_capacity(CHUNK);
        for bytes in records.get(chunk(c)).unwrap_or_default() {
            let item = record::decode(builder, bytes);
            let failed = item.is_err();
            items.push(item);
            if failed {
                break;
            }
        }
        items
    };
    let failed = |items: &[Result<Decoded, String>]| items.last().is_some_and(|i| i.is_err());
    let sharing = (Mutex::new(Sharing { front: 0, back: chunks, decoded: VecDeque::new(), done: false }), Condvar::new());
    std::thread::scope(|scope| {
        let second = scope.spawn(|| {
            let _finishing = Finishing(&sharing);
            loop {
                let c = {
                    let mut s = lock(&sharing.0);
                    if s.front >= s.back {
                        break;
                    }
                    s.front += 1;
                    s.front - 1
                };
                let items = decode(spare, c);
                let stop = failed(&items);
                let mut s = lock(&sharing.0);
                s.decoded.push_back((c, items));
                if stop {
                    // Nothing after a refused record is needed.
                    s.back = s.front;
                }
                drop(s);
                sharing.1.notify_all();
            }
        });
        let result: Result<(), NotLoaded> = (|| {
            let mut kept: Vec<(usize, Vec<Result<Decoded, String>>)> = Vec::new();
            let put = |state: &mut State, resources: &mut ResourceBuilder, c: usize, items| -> Result<(), NotLoaded> {
                for (i, item) in chunk(c).zip(items) {
                    let item: Result<Decoded, String> = item;
                    item.and_then(|decoded| apply_snapshot_record(state, resources, decoded)).map_err(refused(i))?;
                }
                Ok(())
            };
            loop {
                let mut s = lock(&sharing.0);
                if let Some((c, items)) = s.decoded.pop_front() {
                    drop(s);
                    put(state, resources, c, items)?;
                } else if s.front < s.back {
                    s.back -= 1;
                    let c = s.back;
                    drop(s);
                    kept.push((c, decode(resources, c)));
                } else if s.done {
                    break;
                } else {
                    // The second thread is decoding its last chunk.
                    drop(sharing.1.wait(s).unwrap_or_else(|poisoned| poisoned.into_inner()));
                }
            }
            // Kept last first: put from the last kept, in order.
            for (c, items) in kept.into_iter().rev() {
                put(state, resources, c, items)?;
            }
            Ok(())
        })();
        if result.is_err() {
            // The second thread takes no more; it is joined either way.
            let mut s = lock(&sharing.0);
            s.back = s.front;
        }
        let joined = second.join();
        result?;
        // A panic of the second thread (there is none to expect) left a
        // chunk it took undecoded: the batch is refused.
        joined.map_err(|_| refused(records.len().saturating_sub(1))("the snapshot's second decoding thread stopped".to_string()))
    })
}

impl Store {
    /// A store holding `state` on a memory backend of its own (in-process
    /// runs and tests), keeping up to `event_capacity` events for watchers
    /// that resume from a revision. Nothing restores it: its records start
    /// after `state`'s revision.
    pub fn new(state: State, event_capacity: usize) -> Store {
        let mut backend: Box<dyn Backend> = Box::new(MemoryBackend::new(MEMORY_COMPACT_AFTER));
        let recovered = backend.recover(&mut |_| Ok(()));
        let (store, started) = Store::start(state, ResourceBuilder::default(), backend, event_capacity, None);
        if let Err(e) = recovered.map_err(|e| e.to_string()).and(started) {
            // Reads work; every change is refused with the reason.
            store.inner.failure.send_replace(Some(e.clone()));
            lock(&store.inner.writer).failed = Some(e);
        }
        store
    }

    /// A store on `backend`, its committer thread started (or the reason it
    /// could not start).
    fn start(
        state: State,
        resources: ResourceBuilder,
        backend: Box<dyn Backend>,
        event_capacity: usize,
        audit: Option<AuditLog>,
    ) -> (Store, Result<(), String>) {
        let (live, _) = broadcast::channel(4096);
        let revision = state.revision();
        let durable = Progress { durable: revision, failed: None };
        let commit = Arc::new(Commit {
            progress: Mutex::new(durable.clone()),
            changed: Condvar::new(),
            watch: watch::channel(durable).0,
            wake: Mutex::new(Wake::default()),
            wake_cv: Condvar::new(),
        });
        let head = Arc::new(state);
        let inner = Arc::new(Inner {
            current: ArcSwap::new(head.clone()),
            writer: Mutex::new(Writer { head, resources, backend, pending: Vec::new(), failed: None }),
            // The events that led to the starting revision are not kept: a
            // watch from before it must answer OUT_OF_RANGE, not skip them.
            events: Mutex::new(EventLog { kept: VecDeque::new(), capacity: event_capacity.max(1), dropped: revision, live }),
            revision: watch::channel(revision).0,
            commit: commit.clone(),
            audited: audit.is_some(),
            audit: Mutex::new(audit),
            refusals: Mutex::new(VecDeque::new()),
            published_at: Mutex::new(std::time::Instant::now()),
            fleet: shared::FleetCell::new(),
            failure: watch::channel(None).0,
            reopen: Mutex::new(None),
        });
        let shared = inner.clone();
        let spawned = std::thread::Builder::new().name("tagward-commit".into()).spawn(move || committer(&shared));
        match spawned {
            Ok(handle) => (Store { inner, committer: Some(handle) }, Ok(())),
            Err(e) => (Store { inner, committer: None }, Err(format!("cannot start the commit thread: {e}"))),
        }
    }

    /// Opens a data directory with the file backend: [`Store::open`].
    pub fn open_dir(
        dir: &Path,
        seed: Option<&WorldSpec>,
        force: bool,
        options: &Durability,
        audit: Option<AuditLog>,
    ) -> Result<(Arc<Store>, Opened), OpenError> {
        let backend = FileBackend::open(dir, options.compact_after_bytes)?;
        let (store, opened) = Store::open(Box::new(backend), seed, force, options, audit)?;
        let (dir, compact_after) = (dir.to_path_buf(), options.compact_after_bytes);
        store.recover_with(Box::new(move || Ok(Box::new(FileBackend::open(&dir, compact_after)?) as Box<dyn Backend>)));
        Ok((store, opened))
    }

    /// After a storage failure (a full disk, an I/O error), the store
    /// refuses every change; with `reopen` it also tries its medium again,
    /// after 0.5 s and then at doubling intervals up to 30 s. Each try
    /// releases the failed backend, opens a new one with `reopen` and
    /// recovers from it exactly as a restart would (a torn tail cut off);
    /// if that holds every acknowledged change, its state is published (the
    /// changes it holds beyond them, refused when their sync failed, come
    /// back as after a restart: audited as recovered and sent to watchers)
    /// and the store takes changes again.
    pub fn recover_with(&self, reopen: Reopen) {
        *lock(&self.inner.reopen) = Some(reopen);
    }

    /// A store on a memory backend of its own (`--ephemeral`), seeded from
    /// `seed`: [`Store::open`].
    pub fn open_memory(
        seed: Option<&WorldSpec>,
        options: &Durability,
        audit: Option<AuditLog>,
    ) -> Result<(Arc<Store>, Opened), OpenError> {
        Store::open(Box::new(MemoryBackend::new(options.compact_after_bytes)), seed, false, options, audit)
    }

    /// Opens a backend: restores exactly the state and revision it
    /// acknowledged (newest snapshot, then the records after it, a torn
    /// tail cut off), seeds an empty backend from `seed` (written as its
    /// first snapshot), or with `force` replaces the restored state with
    /// `seed` as one logged change. Then serves with every change durable
    /// before it is acknowledged.
    ///
    /// `audit` is attached before anything is applied, so the forced
    /// replacement (`--force-world`, `tagward import`) is audited like any
    /// other change.
    pub fn open(
        mut backend: Box<dyn Backend>,
        seed: Option<&WorldSpec>,
        force: bool,
        options: &Durability,
        audit: Option<AuditLog>,
    ) -> Result<(Arc<Store>, Opened), OpenError> {
        let mut state = State::default();
        let mut resources = ResourceBuilder::default();
        let mut replayed = 0u64;
        let mut audit = audit;
        let mut unaudited = audit.as_ref().map(|a| Unaudited { audited: a.last_revision().unwrap_or(0), events: Vec::new() });
        let mut spare = ResourceBuilder::default();
        let recovered =
            backend.recover(&mut |item| load(&mut state, &mut resources, &mut spare, &mut replayed, &mut unaudited, item))?;
        // A snapshot cut short leaves its tag index to build (a recovery
        // that stops inside one fails, but the state must hold its
        // invariants whatever happens next).
        state.complete_tag_index();
        // Changes synced to the log whose audit write a crash prevented:
        // their records now, marked recovered, before anything new.
        if let (Some(log), Some(u)) = (audit.as_mut(), unaudited) {
            if !u.events.is_empty() {
                log.write_recovered(&u.events).map_err(|e| {
                    OpenError::Audit(format!("{}: cannot write the recovered records: {e}", log.path().display()))
                })?;
                tracing::warn!(
                    records = u.events.len(),
                    after = u.audited,
                    "audited changes the log held but the audit trail lacked (a crash between the two writes); they are marked recovered"
                );
            }
        }
        let mut opened = Opened {
            restored: recovered.found.then(|| state.revision()),
            seeded: false,
            replaced: false,
            cut: recovered.cut.clone(),
            replayed,
        };
        if !recovered.found {
            if let Some(world) = seed {
                state = world.build().map_err(|e| OpenError::World(e.to_string()))?;
                // The seed is the first snapshot, so a restart needs no
                // world file.
                write_snapshot(backend.as_mut(), &state)?;
                opened.seeded = true;
            }
        }
        // A store keeps no events before its starting revision: a watch from
        // an older revision (restored, so its events are gone) is OUT_OF_RANGE.
        let (store, started) = Store::start(state, resources, backend, options.event_capacity, audit);
        started.map_err(OpenError::World)?;
        let store = Arc::new(store);
        if force && opened.restored.is_some() {
            if let Some(world) = seed {
                store
                    .apply(&Update::ReplaceWorld(world.clone()), "world-file")
                    .map_err(|e| OpenError::World(e.to_string()))?
                    .wait()
                    .map_err(|e| OpenError::World(e.to_string()))?;
                opened.replaced = true;
            }
        }
        Ok((store, opened))
    }

    /// The current snapshot: one atomic load.
    pub fn snapshot(&self) -> Arc<State> {
        self.inner.current.load_full()
    }

    pub fn revision(&self) -> u64 {
        self.inner.current.load().revision()
    }

    /// Why the store refuses every change (`None` while it takes them),
    /// as it changes: what health reports for the writers.
    pub fn failures(&self) -> watch::Receiver<Option<String>> {
        self.inner.failure.subscribe()
    }

    /// How long ago the current snapshot was published; for a fleet store,
    /// how long ago it was last known to be the newest state of the prefix.
    pub fn snapshot_age(&self) -> Duration {
        if let Some(age) = self.fleet_age() {
            return age;
        }
        lock(&self.inner.published_at).elapsed()
    }

    /// The current snapshot once its revision is at least `wanted`, waiting
    /// at most `limit`.
    pub async fn snapshot_at_least(&self, wanted: u64, limit: Duration) -> Result<Arc<State>, RevisionTimeout> {
        let now = self.snapshot();
        if now.revision() >= wanted {
            return Ok(now);
        }
        let mut rx = self.inner.revision.subscribe();
        let reached = async move { rx.wait_for(|r| *r >= wanted).await.is_ok() };
        match tokio::time::timeout(limit, reached).await {
            Ok(true) => Ok(self.snapshot()),
            _ => Err(RevisionTimeout { wanted, current: self.revision(), waited: limit }),
        }
    }

    /// Applies one admin update, all or nothing. The ticket says when it is
    /// durable and visible.
    pub fn apply(&self, update: &Update, actor: &str) -> Result<Ticket, UpdateError> {
        let result = self.apply_unmetered(update, actor);
        crate::observe::admin_update(result.as_ref().err().map(|e| e.code));
        if let Err(e) = &result {
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
        result
    }

    /// Queues the audit record of a refused write; the committer thread
    /// writes it (with the next sync), so the caller never waits for the
    /// file. Without an audit trail, or with too many waiting, it is
    /// dropped (and counted).
    pub fn audit_refusal(&self, refusal: Refusal) {
        if !self.inner.audited {
            return;
        }
        {
            let mut queue = lock(&self.inner.refusals);
            if queue.len() >= MAX_PENDING_REFUSALS {
                metrics::counter!(crate::observe::AUDIT_REFUSALS_DROPPED).increment(1);
                return;
            }
            queue.push_back(refusal);
        }
        let commit = &self.inner.commit;
        lock(&commit.wake).pending = true;
        commit.wake_cv.notify_one();
    }

    fn apply_unmetered(&self, update: &Update, actor: &str) -> Result<Ticket, UpdateError> {
        if self.is_shared() {
            return Err(UpdateError::new(ErrorCode::StorageFailed, "a fleet store takes changes through apply_acked"));
        }
        let mut writer = lock(&self.inner.writer);
        if let Some(failed) = &writer.failed {
            return Err(UpdateError::new(ErrorCode::StorageFailed, StorageFailed(failed.clone()).to_string()));
        }
        let head = writer.head.clone();
        let mut next = State::clone(&head);
        let mut applied = Applied::default();
        let Writer { resources, .. } = &mut *writer;
        apply(&mut next, resources, update, actor, &mut applied)?;
        if next.revision() == head.revision() {
            return Ok(self.unchanged(head.revision()));
        }
        let record = Record {
            prev: head.revision(),
            rev: next.revision(),
            time_unix_ms: now_ms(),
            actor: actor.to_string(),
            change: Change::of(applied.changes),
        };
        self.accept(&mut writer, next, applied.events, &record).map_err(|e| match e {
            Refused::Failed(e) => UpdateError::new(ErrorCode::StorageFailed, e.to_string()),
            Refused::TooLarge(reason) => UpdateError::new(ErrorCode::Validation, format!("{}: {reason}", update_field(update))),
        })
    }

    /// Performs a tag operation as a principal, on the newest accepted
    /// state. The ticket says when the change is durable and visible.
    pub fn tag(&self, req: &TagRequest) -> Result<(Tagged, Ticket), TagError> {
        if self.is_shared() {
            return Err(TagError::Unavailable("a fleet store takes changes through tag_acked".into()));
        }
        let mut writer = lock(&self.inner.writer);
        let head = writer.head.clone();
        let mut outcome = match perform(&head, req) {
            Ok(outcome) => outcome,
            Err(e) => {
                drop(writer);
                if let TagError::AccessDenied { action, .. } = &e {
                    self.audit_refusal(tag_refusal(req, action, None, head.revision(), "AccessDenied", e.to_string()));
                }
                return Err(e);
            }
        };
        let Some((next, change)) = outcome.change.take() else {
            return Ok((Tagged { outcome, revision: head.revision(), changed: false }, self.unchanged(head.revision())));
        };
        if let Some(failed) = &writer.failed {
            return Err(TagError::Unavailable(StorageFailed(failed.clone()).to_string()));
        }
        let revision = next.revision();
        let record = tag_record(&change, head.revision());
        let event = tag_event(&change, outcome.decision.matched.iter().map(ToString::to_string).collect());
        let ticket = self.accept(&mut writer, next, vec![event], &record).map_err(|e| match e {
            Refused::Failed(e) => TagError::Unavailable(e.to_string()),
            Refused::TooLarge(reason) => TagError::Validation { field: "tags".into(), reason },
        })?;
        Ok((Tagged { outcome, revision, changed: true }, ticket))
    }

    /// Performs a KMS alias or grant operation as a principal, on the
    /// newest accepted state, like [`Store::tag`]. The ticket says when the
    /// change is durable and visible.
    pub fn kms(&self, req: &KmsRequest) -> Result<(KmsDone, Ticket), KmsError> {
        if self.is_shared() {
            return Err(KmsError::Unavailable("a fleet store takes changes through kms_acked".into()));
        }
        let mut writer = lock(&self.inner.writer);
        let head = writer.head.clone();
        let mut outcome = match tagward_core::kms_ops::perform(&head, req) {
            Ok(outcome) => outcome,
            Err(e) => {
                drop(writer);
                if let KmsError::AccessDenied { resource, .. } = &e {
                    self.audit_refusal(kms_refusal(req, resource, None, head.revision(), "AccessDenied", e.to_string()));
                }
                return Err(e);
            }
        };
        let Some((next, change)) = outcome.change.take() else {
            return Ok((KmsDone { outcome, revision: head.revision(), changed: false }, self.unchanged(head.revision())));
        };
        if let Some(failed) = &writer.failed {
            return Err(KmsError::Unavailable(StorageFailed(failed.clone()).to_string()));
        }
        let revision = next.revision();
        let record = kms_record(&change, head.revision());
        let event = kms_event(&change, outcome.decision.matched.iter().map(ToString::to_string).collect());
        let ticket = self.accept(&mut writer, next, vec![event], &record).map_err(|e| match e {
            Refused::Failed(e) => KmsError::Unavailable(e.to_string()),
            Refused::TooLarge(reason) => KmsError::Validation { field: req.op.name().to_string(), reason },
        })?;
        Ok((KmsDone { outcome, revision, changed: true }, ticket))
    }

    /// The ticket of a change that changed nothing: it was decided on the
    /// head, which may hold changes still waiting for their sync, so it is
    /// answered once the head is durable too.
    fn unchanged(&self, head: u64) -> Ticket {
        Ticket { revision: head, commit: self.inner.commit.clone() }
    }

    /// Logs `record` and makes `next` the head; the committer publishes it
    /// once it is durable.
    fn accept(&self, writer: &mut Writer, next: State, events: Vec<Event>, record: &Record) -> Result<Ticket, Refused> {
        let revision = next.revision();
        let bytes = serde_json::to_vec(record)
            .map_err(|e| Refused::TooLarge(format!("the change to revision {revision} cannot be encoded: {e}")))?;
        match writer.backend.append(&LogRecord { prev: record.prev, rev: record.rev, bytes }) {
            Ok(()) => {}
            // Nothing was written: refuse this change only.
            Err(e) if e.refused_only_this() => return Err(Refused::TooLarge(e.to_string())),
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "cannot append to the log; refusing further changes");
                writer.failed = Some(message.clone());
                self.inner.failure.send_replace(Some(message.clone()));
                // The committer tries the medium again (when it can).
                lock(&self.inner.commit.wake).pending = true;
                self.inner.commit.wake_cv.notify_one();
                return Err(Refused::Failed(StorageFailed(message)));
            }
        }
        let next = Arc::new(next);
        writer.head = next.clone();
        writer.pending.push((next, events));
        let commit = &self.inner.commit;
        lock(&commit.wake).pending = true;
        commit.wake_cv.notify_one();
        Ok(Ticket { revision, commit: commit.clone() })
    }

    /// The kept events after `from` (none for 0) and a receiver for the live
    /// ones, with no gap and no repeat between them.
    pub fn watch(&self, from: u64) -> Result<Following, WatchGone> {
        let log = lock(&self.inner.events);
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

    /// The durable log records after revision `from`, as the backend
    /// follows them (on a single-writer backend: what this store wrote).
    /// Reads the backend under the writer lock: for tools and tests, not
    /// for request paths.
    pub fn follow(&self, from: u64) -> Result<Vec<Record>, StorageError> {
        let writer = lock(&self.inner.writer);
        let place = writer.backend.place();
        writer
            .backend
            .follow(from)?
            .map(|r| {
                serde_json::from_slice(&r.bytes).map_err(|e| StorageError::Damaged {
                    path: place.clone(),
                    offset: 0,
                    reason: format!("the record of revision {} is not a log entry: {e}", r.rev),
                })
            })
            .collect()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // The committer commits what is pending, then stops and releases
        // the backend (a data directory's lock).
        lock(&self.inner.commit.wake).stop = true;
        self.inner.commit.wake_cv.notify_one();
        if let Some(handle) = self.committer.take() {
            // A committer that panicked has nothing left to release.
            let _ = handle.join();
        }
    }
}

impl Inner {
    /// Writes the audit records of `events` and of `refusals`; a failure
    /// refuses the changes.
    fn audit(&self, events: &[&Event], refusals: &[Refusal]) -> Result<(), String> {
        let mut audit = lock(&self.audit);
        let Some(log) = audit.as_mut() else { return Ok(()) };
        log.write(events, refusals).map_err(|e| {
            metrics::counter!(crate::observe::AUDIT_FAILURES).increment(1);
            format!("{}: cannot write the audit log: {e}", log.path().display())
        })
    }

    /// Publishes `next` and its events, in revision order.
    fn publish(&self, next: Arc<State>, events: Vec<Event>) {
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
                if let EventKind::Tags { action, .. } = &e.kind {
                    crate::observe::tag_change(action == "admin");
                }
                log.kept.push_back(e.clone());
                // No receivers is fine: nobody is watching.
                let _ = log.live.send(e);
            }
        }
        crate::observe::published(&next);
        *lock(&self.published_at) = std::time::Instant::now();
        self.current.store(next);
        self.revision.send_replace(revision);
    }
}

/// Why a store could not be opened.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the world file: {0}")]
    World(String),
    #[error("the audit trail: {0}")]
    Audit(String),
}

/// The committer: syncs what is pending (one sync for all of it), writes
/// the audit records, publishes it in order and wakes the tickets; starts
/// compactions off the writer lock. Stops once the store is dropped and
/// nothing is pending, or when storage fails.
fn committer(inner: &Inner) {
    let commit = &inner.commit;
    // The newest snapshot being written (each waits for the one before),
    // joined before the committer stops, so no snapshot writes into a
    // backend after its store is gone (a directory whose lock is released).
    let mut snapshotting: Option<std::thread::JoinHandle<()>> = None;
    commit_loop(inner, commit, &mut snapshotting);
    if let Some(handle) = snapshotting.take() {
        let _ = handle.join();
    }
}

fn commit_loop(inner: &Inner, commit: &Commit, snapshotting: &mut Option<std::thread::JoinHandle<()>>) {
    loop {
        let stop = {
            let mut wake = lock(&commit.wake);
            while !wake.pending && !wake.stop {
                wake = commit.wake_cv.wait(wake).unwrap_or_else(|e| e.into_inner());
            }
            wake.pending = false;
            wake.stop
        };
        let (batch, sync, compaction) = {
            let mut writer = lock(&inner.writer);
            let batch = std::mem::take(&mut writer.pending);
            if batch.is_empty() {
                let failed = writer.failed.is_some();
                // Refusals change nothing: write them, no log sync needed.
                let refusals: Vec<Refusal> = lock(&inner.refusals).drain(..).collect();
                drop(writer);
                if let Err(message) = inner.audit(&[], &refusals) {
                    tracing::error!(error = %message, dropped = refusals.len(), "cannot write refusal records");
                }
                if stop || (failed && can_reopen(inner) && !reopen_after_failure(inner, commit, snapshotting)) {
                    return;
                }
                continue;
            }
            let head = writer.head.clone();
            let sync = writer.backend.prepare_sync();
            let compaction = match &sync {
                Ok(_) if writer.backend.wants_compaction() => Some(
                    writer
                        .backend
                        .begin_compaction(head.revision())
                        .map(|job| (job, head, writer.backend.max_record(), writer.backend.place())),
                ),
                _ => None,
            };
            (batch, sync, compaction)
        };
        let refusals: Vec<Refusal> = lock(&inner.refusals).drain(..).collect();
        let synced = sync.and_then(|s| s.sync()).map_err(|e| e.to_string()).and_then(|()| {
            let events: Vec<&Event> = batch.iter().flat_map(|(_, events)| events.iter()).collect();
            inner.audit(&events, &refusals)
        });
        let last = batch.last().map(|(s, _)| s.revision()).unwrap_or(0);
        match synced {
            Ok(()) => {
                for (state, events) in batch {
                    inner.publish(state, events);
                }
                let mut p = lock(&commit.progress);
                p.durable = last;
                commit.watch.send_replace(p.clone());
                commit.changed.notify_all();
            }
            Err(message) => {
                tracing::error!(error = %message, "cannot make changes durable; refusing further changes");
                lock(&inner.writer).failed = Some(message.clone());
                inner.failure.send_replace(Some(message.clone()));
                {
                    let mut p = lock(&commit.progress);
                    p.failed = Some(message);
                    commit.watch.send_replace(p.clone());
                    commit.changed.notify_all();
                }
                // No snapshot of a state that is not durable; the log the
                // compaction started holds everything.
                drop(compaction);
                if stop || !reopen_after_failure(inner, commit, snapshotting) {
                    return;
                }
                continue;
            }
        }
        match compaction {
            Some(Ok((job, state, max_record, place))) => {
                // Snapshots are written one after the other: this one waits
                // for the one before it (never the committer).
                let before = snapshotting.take();
                let spawned = std::thread::Builder::new().name("tagward-snapshot".into()).spawn(move || {
                    if let Some(before) = before {
                        let _ = before.join();
                    }
                    match job.write(&mut snapshot_records(&state, max_record, place)) {
                        Ok(()) => tracing::info!("snapshot written; older log files removed"),
                        Err(e) => tracing::warn!(error = %e, "the snapshot failed; the log keeps everything"),
                    }
                });
                match spawned {
                    Ok(handle) => *snapshotting = Some(handle),
                    Err(e) => tracing::warn!(error = %e, "cannot start the snapshot thread"),
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "cannot start a new log for compaction"),
            None => {}
        }
        // An append failed meanwhile (the caller was answered): try the
        // medium again once what was pending is settled.
        if lock(&inner.writer).failed.is_some() && can_reopen(inner) && !reopen_after_failure(inner, commit, snapshotting) {
            return;
        }
    }
}

/// The store was given a way to reopen its medium (a store without one
/// stays failed, its committer still writing refusal records).
fn can_reopen(inner: &Inner) -> bool {
    lock(&inner.reopen).is_some()
}

/// Waits, then tries the failed store's medium again (see
/// [`Store::recover_with`]) until that works (true) or the store is
/// dropped (false). Without a way to reopen, returns false at once: the
/// store stays failed until the process restarts.
fn reopen_after_failure(inner: &Inner, commit: &Commit, snapshotting: &mut Option<std::thread::JoinHandle<()>>) -> bool {
    if !can_reopen(inner) {
        return false;
    }
    // A snapshot of the failed backend writes into the medium about to be
    // reopened: it finishes first.
    if let Some(handle) = snapshotting.take() {
        let _ = handle.join();
    }
    let mut wait = REOPEN_FIRST;
    loop {
        {
            let wake = lock(&commit.wake);
            let (wake, _) = commit.wake_cv.wait_timeout_while(wake, wait, |w| !w.stop).unwrap_or_else(|e| e.into_inner());
            if wake.stop {
                return false;
            }
        }
        match reopen(inner) {
            Ok(revision) => {
                tracing::info!(revision, "storage works again: the store was reopened and takes changes");
                return true;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "storage still fails; changes stay refused");
                wait = (wait * 2).min(REOPEN_MOST);
            }
        }
    }
}

/// Stands in for a failed backend released so that its medium can be
/// opened again: refuses everything.
struct Released(PathBuf);

impl Released {
    fn refuse(&self) -> StorageError {
        StorageError::Io { path: self.0.clone(), source: std::io::Error::other("the storage is being reopened after a failure") }
    }
}

impl Backend for Released {
    fn place(&self) -> PathBuf {
        self.0.clone()
    }
    fn max_record(&self) -> u32 {
        0
    }
    fn recover(
        &mut self,
        _: &mut dyn FnMut(Loaded<'_>) -> Result<(), NotLoaded>,
    ) -> Result<crate::storage::Recovered, StorageError> {
        Err(self.refuse())
    }
    fn append(&mut self, _: &LogRecord) -> Result<(), StorageError> {
        Err(self.refuse())
    }
    fn prepare_sync(&mut self) -> Result<Box<dyn crate::storage::DurableSync>, StorageError> {
        Err(self.refuse())
    }
    fn wants_compaction(&self) -> bool {
        false
    }
    fn begin_compaction(&mut self, _: u64) -> Result<Box<dyn crate::storage::SnapshotJob>, StorageError> {
        Err(self.refuse())
    }
    fn follow(&self, _: u64) -> Result<crate::storage::Follow, StorageError> {
        Err(self.refuse())
    }
}

/// One try at reopening a failed store: releases its backend (and audit
/// trail), opens both again, recovers, and when that holds every
/// acknowledged change publishes it and takes changes again. Returns the
/// revision it recovered to.
fn reopen(inner: &Inner) -> Result<u64, String> {
    let mut writer = lock(&inner.writer);
    let place = writer.backend.place();
    // Released before it is opened again: a data directory is locked by
    // the backend holding it.
    writer.backend = Box::new(Released(place));
    let mut backend = {
        let mut reopen = lock(&inner.reopen);
        let Some(open) = reopen.as_mut() else { return Err("the store has no way to reopen its storage".into()) };
        open().map_err(|e| e.to_string())?
    };
    let published = inner.current.load_full();
    let mut state = State::default();
    let mut resources = ResourceBuilder::default();
    let mut spare = ResourceBuilder::default();
    let mut replayed = 0u64;
    // The events of the changes the medium holds beyond the published state.
    let mut beyond = Some(Unaudited { audited: published.revision(), events: Vec::new() });
    let recovered = backend
        .recover(&mut |item| load(&mut state, &mut resources, &mut spare, &mut replayed, &mut beyond, item))
        .map_err(|e| e.to_string())?;
    state.complete_tag_index();
    if state.revision() < published.revision() {
        return Err(format!(
            "the reopened storage ends at revision {}, before the acknowledged revision {}",
            state.revision(),
            published.revision()
        ));
    }
    if let Some(cut) = &recovered.cut {
        tracing::warn!(file = %cut.path.display(), offset = cut.offset, reason = %cut.reason, "cut a torn write off the log when reopening it");
    }
    let events = beyond.map(|b| b.events).unwrap_or_default();
    // The trail too: a failed write may have left a torn line, and records
    // still buffered for changes that were refused. Those changes are
    // audited now, as recovered, when the trail lacks them.
    {
        let mut audit = lock(&inner.audit);
        if let Some(old) = audit.as_ref() {
            let mut trail = old.reopen().map_err(|e| format!("{}: cannot reopen the audit log: {e}", old.path().display()))?;
            let audited = trail.last_revision().unwrap_or(0);
            let missing: Vec<Event> = events.iter().filter(|e| e.revision > audited).cloned().collect();
            trail
                .write_recovered(&missing)
                .map_err(|e| format!("{}: cannot write the recovered records: {e}", trail.path().display()))?;
            if let Some(old) = audit.replace(trail) {
                old.discard();
            }
        }
    }
    let revision = state.revision();
    let complete = {
        let mut seen: Vec<u64> = events.iter().map(|e| e.revision).collect();
        seen.dedup();
        seen.len() as u64 == revision - published.revision()
    };
    let head = Arc::new(state);
    writer.head = head.clone();
    writer.resources = resources;
    writer.backend = backend;
    writer.pending.clear();
    writer.failed = None;
    if !complete {
        // A snapshot covers some of the changes: their events are not
        // known, so a watch from before the new revision must start over.
        lock(&inner.events).dropped = revision;
    }
    inner.publish(head, events);
    {
        let mut p = lock(&inner.commit.progress);
        p.durable = revision;
        p.failed = None;
        inner.commit.watch.send_replace(p.clone());
        inner.commit.changed.notify_all();
    }
    inner.failure.send_replace(None);
    Ok(revision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use serde_json::Value;
    use tagward_core::world::PrincipalSpec;

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
            Update::SetTags {
                resource: "arn:aws:kms:us-east-1:111122223333:key/k1".into(),
                tags: vec![("A".into(), "1".into())],
            },
            Update::PutPolicy { name: "P".into(), document: json!({"Statement": {"Effect": "Permit"}}) },
        ]);
        let err = s.apply(&batch, "admin").unwrap_err();
        assert_eq!(err.code, ErrorCode::MalformedPolicyDocument);
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
            s.apply(&Update::SetTags { resource: key.into(), tags: vec![("n".into(), i.to_string())] }, "admin")
                .unwrap()
                .wait()
                .unwrap();
        }
        let (backlog, _) = s.watch(start + 2).unwrap();
        assert_eq!(backlog.iter().map(|e| e.revision).collect::<Vec<_>>(), vec![start + 3, start + 4, start + 5]);
        assert!(s.watch(start).is_err(), "only three events are kept");
        let noop = s.apply(&Update::SetTags { resource: key.into(), tags: vec![("n".into(), "4".into())] }, "admin").unwrap();
        assert_eq!(noop.wait().unwrap(), start + 5, "no-op keeps the revision");
    }

    #[test]
    fn replace_world_moves_the_revision_forward() {
        let s = store();
        let before = s.revision();
        let rev = s.apply(&Update::ReplaceWorld(WorldSpec::default()), "admin").unwrap().wait().unwrap();
        assert!(rev > before);
        assert_eq!(s.snapshot().counts(), (0, 0, 0));
    }

    #[tokio::test]
    async fn waiting_for_a_revision() {
        let s = Arc::new(store());
        let wanted = s.revision() + 1;
        assert!(s.snapshot_at_least(wanted, Duration::from_millis(20)).await.is_err());
        let writer = s.clone();
        let waiter =
            tokio::spawn(async move { s.snapshot_at_least(wanted, Duration::from_secs(5)).await.map(|st| st.revision()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        writer
            .apply(
                &Update::SetTags {
                    resource: "arn:aws:kms:us-east-1:111122223333:key/k1".into(),
                    tags: vec![("x".into(), "y".into())],
                },
                "admin",
            )
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(waiter.await.unwrap(), Ok(wanted));
    }
    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tagward-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn options() -> Durability {
        Durability { compact_after_bytes: u64::MAX, event_capacity: 16 }
    }

    /// The offset of the first record of the file at `path` whose payload
    /// holds `needle`, walking its frames.
    fn offset_of(path: &Path, needle: &[u8]) -> u64 {
        let bytes = std::fs::read(path).unwrap();
        let mut at = 8;
        while at < bytes.len() {
            let size = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            if bytes[at + 8..at + 8 + size].windows(needle.len()).any(|w| w == needle) {
                return at as u64;
            }
            at += 8 + size;
        }
        panic!("{needle:?} is not in {}", path.display());
    }

    #[test]
    fn a_snapshot_entity_that_does_not_build_refuses_the_restore_with_its_reason_at_its_offset() {
        // The refused entity sits among thousands of good ones: early or
        // late in a batch (either thread may decode it), in the first batch
        // (10, 1,500) or a later one (2,100, 4,990); or it does not decode
        // at all (700, 3,000).
        let key = |i: usize| json!({"put_resource": {"arn": format!("arn:aws:kms:us-east-1:111122223333:key/k{i}")}});
        let bad = json!({"put_resource": {"arn": "arn:aws:kms:us-east-1:111122223333:key/bad", "tags": {"aws:x": "1"}}});
        let undecodable = json!({"put_resource": {"arn": "arn:aws:kms:us-east-1:111122223333:key/bad", "tags": 7}});
        for (at, record, reason) in [
            (10, &bad, "reserved for AWS"),
            (1_500, &bad, "reserved for AWS"),
            (2_100, &bad, "reserved for AWS"),
            (4_990, &bad, "reserved for AWS"),
            (700, &undecodable, "not a snapshot record"),
            (3_000, &undecodable, "not a snapshot record"),
        ] {
            let dir = scratch("bad-snapshot");
            let mut backend = FileBackend::open(&dir, u64::MAX).unwrap();
            backend.recover(&mut |_| Ok(())).unwrap();
            // A second bad record after it: the first is the one reported.
            let records: Vec<Value> =
                (0..at).map(key).chain([record.clone()]).chain((at..5_000).map(key)).chain([undecodable.clone()]).collect();
            let mut records = records.iter().map(|r| Ok(serde_json::to_vec(r).unwrap()));
            backend.begin_compaction(7).unwrap().write(&mut records).unwrap();
            drop(backend);
            let snapshot = dir.join(format!("snap-{:020}.tws", 7));
            let expected = offset_of(&snapshot, b"key/bad");
            match Store::open_dir(&dir, None, false, &options(), None).err().unwrap() {
                OpenError::Storage(StorageError::Damaged { path, offset, reason: why }) => {
                    assert_eq!((path, offset), (snapshot, expected), "record {at}: {why}");
                    assert!(why.contains(reason), "record {at}: {why}");
                    if reason == "reserved for AWS" {
                        assert!(why.contains("the snapshot does not load"), "{why}");
                    }
                }
                other => panic!("record {at}: {other}"),
            }
        }
        // The same records, all good, restore.
        let dir = scratch("good-snapshot");
        let mut backend = FileBackend::open(&dir, u64::MAX).unwrap();
        backend.recover(&mut |_| Ok(())).unwrap();
        let records: Vec<Value> = (0..5_000).map(key).collect();
        let mut records = records.iter().map(|r| Ok(serde_json::to_vec(r).unwrap()));
        backend.begin_compaction(7).unwrap().write(&mut records).unwrap();
        drop(backend);
        let (s, opened) = Store::open_dir(&dir, None, false, &options(), None).unwrap();
        assert_eq!((opened.restored, s.snapshot().counts().2), (Some(7), 5_000));
    }

    /// A world with every kind of resource field, over a batch's size.
    fn varied_world() -> WorldSpec {
        let keys = (0..300).map(|i| {
            let mut key = json!({"arn": format!("arn:aws:kms:us-east-1:111122223333:key/k{i}"),
                "tags": {"Project": format!("p{}", i % 7), "Owner": "team-1", "n": i.to_string()}});
            match i % 5 {
                1 => key["key_state"] = json!("Disabled"),
                2 => key["aliases"] = json!([format!("alias/k{i}")]),
                3 => {
                    key["grants"] = json!([{"id": "g", "grantee_principal": "arn:aws:iam::111122223333:role/app",
                        "operations": ["Decrypt"], "constraints": {"encryption_context_subset": {"a": "b"}}}])
                }
                4 => {
                    key["key_policy"] = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                        "Principal": {"AWS": "arn:aws:iam::111122223333:root"}, "Action": "kms:*", "Resource": "*"}]})
                }
                _ => key["account"] = json!("444455556666"),
            }
            key
        });
        let others = [
            json!({"arn": "arn:aws:s3:::bucket", "tags": {"Project": "p1"},
                "resource_policy": {"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "*"}]}}),
            json!({"arn": "arn:aws:sqs:us-east-1:111122223333:queue"}),
        ];
        serde_json::from_value(json!({
            "policies": {"P": {"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}}},
            "principals": [{"arn": "arn:aws:iam::111122223333:role/app", "tags": {"project": "p1"}, "policies": ["P"]}],
            "resources": keys.chain(others).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    #[test]
    fn a_snapshot_of_binary_and_json_resource_records_restores_the_state_written() {
        let world = varied_world();
        let state = world.build().unwrap();
        let expected = serde_json::to_value(WorldSpec::from_state(&state)).unwrap();
        // As this version writes it (resources as binary records), as
        // earlier versions did (all JSON), and both mixed in one file.
        for (name, binary_every) in [("binary", 1), ("json", 0), ("mixed", 2)] {
            let dir = scratch(&format!("formats-{name}"));
            let mut backend = FileBackend::open(&dir, u64::MAX).unwrap();
            backend.recover(&mut |_| Ok(())).unwrap();
            let records: Vec<Vec<u8>> = state_changes(&state)
                .enumerate()
                .map(|(i, c)| match binary_every {
                    0 => serde_json::to_vec(&c).unwrap(),
                    n if i % n == 0 => record::encode(&c).unwrap(),
                    _ => serde_json::to_vec(&c).unwrap(),
                })
                .collect();
            let binary = records.iter().filter(|r| r[0] != b'{').count();
            assert_eq!(binary > 0, binary_every > 0, "{name}: {binary} binary records");
            backend.begin_compaction(9).unwrap().write(&mut records.into_iter().map(Ok)).unwrap();
            drop(backend);
            let (s, opened) = Store::open_dir(&dir, None, false, &options(), None).unwrap();
            assert_eq!(opened.restored, Some(9), "{name}");
            assert_eq!(serde_json::to_value(WorldSpec::from_state(&s.snapshot())).unwrap(), expected, "{name}");
        }
        // The store's own snapshots write resources as binary records.
        let dir = scratch("formats-written");
        let mut backend = FileBackend::open(&dir, u64::MAX).unwrap();
        backend.recover(&mut |_| Ok(())).unwrap();
        write_snapshot(&mut backend, &state).unwrap();
        drop(backend);
        let snapshot = dir.join(format!("snap-{:020}.tws", state.revision()));
        let bytes = std::fs::read(&snapshot).unwrap();
        let needle = b"key/k17";
        let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap();
        assert!(!bytes[at.saturating_sub(64)..at].windows(15).any(|w| w == b"\"put_resource\""), "a JSON resource record");
        let (s, _) = Store::open_dir(&dir, None, false, &options(), None).unwrap();
        assert_eq!(serde_json::to_value(WorldSpec::from_state(&s.snapshot())).unwrap(), expected);
    }

    #[test]
    fn a_damaged_binary_resource_record_refuses_the_restore_at_its_offset() {
        let state = varied_world().build().unwrap();
        let dir = scratch("binary-damaged");
        let mut backend = FileBackend::open(&dir, u64::MAX).unwrap();
        backend.recover(&mut |_| Ok(())).unwrap();
        let mut records: Vec<Vec<u8>> = state_changes(&state).map(|c| record::encode(&c).unwrap()).collect();
        // Cut inside its tags: a valid frame (its checksum is of the cut
        // bytes) holding a record that does not decode.
        let victim = records.iter().position(|r| r.windows(8).any(|w| w == b"key/k150")).unwrap();
        let cut = records[victim].len() - 10;
        records[victim].truncate(cut);
        backend.begin_compaction(9).unwrap().write(&mut records.into_iter().map(Ok)).unwrap();
        drop(backend);
        let snapshot = dir.join(format!("snap-{:020}.tws", 9));
        let expected = offset_of(&snapshot, b"key/k150");
        match Store::open_dir(&dir, None, false, &options(), None).err().unwrap() {
            OpenError::Storage(StorageError::Damaged { path, offset, reason }) => {
                assert_eq!((path, offset), (snapshot, expected), "{reason}");
                assert!(reason.contains("the record is not a resource record"), "{reason}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_batch_shared_by_two_threads_puts_every_record_in_order_or_refuses_the_first_bad_one() {
        // Records of one ARN given twice keep the later (as one by one);
        // a bad record anywhere (chunk edges included) is the one refused,
        // wherever the two threads met.
        let key = |i: usize, v: usize| {
            let arn = format!("arn:aws:kms:us-east-1:111122223333:key/k{}", i % 1_500);
            serde_json::to_vec(&json!({"put_resource": {"arn": arn, "tags": {"V": v.to_string()}}})).unwrap()
        };
        let bad = serde_json::to_vec(
            &json!({"put_resource": {"arn": "arn:aws:kms:us-east-1:111122223333:key/bad", "tags": {"aws:x": "1"}}}),
        )
        .unwrap();
        let undecodable = b"{\"put_resource\": 7}".to_vec();
        let len = 2_000;
        for bad_at in [
            None,
            Some(0),
            Some(CHUNK - 1),
            Some(CHUNK),
            Some(CHUNK + 1),
            Some(999),
            Some(1_000),
            Some(len - CHUNK),
            Some(len - 1),
        ] {
            for refused in [&bad, &undecodable] {
                let mut owned: Vec<Vec<u8>> = (0..len).map(|i| key(i, i)).collect();
                if let Some(at) = bad_at {
                    owned[at] = refused.clone();
                    // A second bad record later: the first is the one refused.
                    owned[len - 1] = undecodable.clone();
                    if at == len - 1 {
                        owned[len - 1] = refused.clone();
                    }
                }
                let records: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
                let mut state = State::default();
                state.defer_tag_index();
                let (mut builder, mut spare) = (ResourceBuilder::default(), ResourceBuilder::default());
                let loaded = load_snapshot_records(&mut state, &mut builder, &mut spare, &records);
                match bad_at {
                    None => {
                        assert!(loaded.is_ok(), "{:?}", loaded.err().map(|e| e.reason));
                        state.complete_tag_index();
                        assert_eq!(state.counts().2, 1_500);
                        for i in [0, 499, 500, 1_499] {
                            let arn = format!("arn:aws:kms:us-east-1:111122223333:key/k{i}");
                            let last = if i < 500 { i + 1_500 } else { i };
                            let tags = state.resource(&arn).map(|r| r.tags.get("V").map(str::to_string));
                            assert_eq!(tags, Some(Some(last.to_string())), "{arn}");
                        }
                    }
                    Some(at) => {
                        let refusal = loaded.err().map(|e| e.record);
                        assert_eq!(refusal, Some(at), "bad record at {at}");
                        assert_eq!(state.counts().2, at.min(1_500), "nothing after the refused record is put (at {at})");
                    }
                }
            }
        }
    }

    /// Opens `dir`, retrying while the previous store's committer thread
    /// still holds the directory for a moment after its last change.
    fn reopen(dir: &Path, seed: Option<&WorldSpec>, force: bool, audit: Option<AuditLog>) -> (Arc<Store>, Opened) {
        let mut audit = audit;
        for _ in 0..200 {
            match Store::open_dir(dir, seed, force, &options(), audit.take()) {
                Err(OpenError::Storage(StorageError::Locked(_))) => {
                    audit = None;
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other.unwrap(),
            }
        }
        panic!("{} stayed locked", dir.display());
    }

    fn audit_names(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["eventName"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    fn world(key_tag: &str) -> WorldSpec {
        serde_json::from_value(json!({
            "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "tags": {"Project": key_tag}}]
        }))
        .unwrap()
    }

    #[test]
    fn a_forced_world_is_audited() {
        let d = scratch("force-audit");
        let (s, _) = reopen(&d, Some(&world("Alpha")), false, None);
        drop(s);
        let audit_path = d.join("audit.jsonl");
        // The audit log is attached before the forced world is applied.
        let (s, opened) = reopen(&d, Some(&world("Beta")), true, Some(AuditLog::open(&audit_path).unwrap()));
        assert!(opened.replaced);
        assert_eq!(audit_names(&audit_path), vec!["ReplaceWorld".to_string()]);
        let record: Value = serde_json::from_str(std::fs::read_to_string(&audit_path).unwrap().trim()).unwrap();
        assert_eq!(record["additionalEventData"]["revision"], s.revision());
        assert_eq!(record["userIdentity"]["principalId"], "world-file");
    }

    #[test]
    fn a_watch_from_before_a_restart_is_out_of_range() {
        let d = scratch("watch-restart");
        let key = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let (s, _) = reopen(&d, Some(&world("Alpha")), false, None);
        let start = s.revision();
        for i in 0..3 {
            s.apply(&Update::SetTags { resource: key.into(), tags: vec![("n".into(), i.to_string())] }, "admin")
                .unwrap()
                .wait()
                .unwrap();
        }
        assert_eq!(s.watch(start + 1).unwrap().0.len(), 2, "before the restart the events are kept");
        let restored = s.revision();
        drop(s);
        let (s, opened) = reopen(&d, None, false, None);
        assert_eq!(opened.restored, Some(restored));
        for from in [1, start, start + 1, restored - 1] {
            let gone = s.watch(from).unwrap_err();
            assert_eq!(gone, WatchGone { asked: from, dropped: restored }, "watch from {from}");
        }
        assert!(s.watch(restored).unwrap().0.is_empty(), "from the restored revision nothing is missed");
        assert!(s.watch(0).is_ok(), "0 is the live feed only");
        s.apply(&Update::SetTags { resource: key.into(), tags: vec![("n".into(), "x".into())] }, "admin")
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(s.watch(restored).unwrap().0.len(), 1);
        // An ephemeral store started from a world file keeps no events before it either.
        let e = Store::new(world("Alpha").build().unwrap(), 16);
        if e.revision() > 1 {
            assert!(e.watch(e.revision() - 1).is_err());
        }
        assert!(e.watch(e.revision()).is_ok());
    }

    #[test]
    fn an_entry_over_the_record_limit_is_refused_and_the_store_carries_on() {
        let d = scratch("too-large");
        let key = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let backend = FileBackend::open(&d, u64::MAX).unwrap().limit_records(4096);
        let (s, _) = Store::open(Box::new(backend), Some(&world("Alpha")), false, &options(), None).unwrap();
        let before = s.revision();
        let big: Vec<Value> =
            (0..200).map(|i| json!({"Effect": "Allow", "Action": format!("kms:Action{i:04}"), "Resource": "*"})).collect();
        let err = s.apply(&Update::PutPolicy { name: "Big".into(), document: json!({"Statement": big}) }, "admin").unwrap_err();
        assert_eq!(err.code, ErrorCode::Validation);
        assert!(err.message.starts_with("put_policy: "), "{err}");
        assert!(err.message.contains("more than the 4096-byte limit"), "{err}");
        assert_eq!(s.revision(), before, "the refused change left the state as it was");
        assert!(s.snapshot().policy("Big").is_none());
        // Not a storage failure: the next change is accepted and durable.
        let rev = s
            .apply(&Update::SetTags { resource: key.into(), tags: vec![("a".into(), "b".into())] }, "admin")
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(rev, before + 1);
        drop(s);
        let (s, opened) = reopen(&d, None, false, None);
        assert_eq!((opened.restored, s.snapshot().policy("Big").is_none()), (Some(rev), true));
    }

    #[test]
    fn an_entity_over_the_record_limit_refuses_the_snapshot() {
        let d = scratch("too-large-snap");
        let tags: serde_json::Map<String, Value> = (0..40).map(|i| (format!("key-{i:02}"), json!("v".repeat(200)))).collect();
        let seed: WorldSpec = serde_json::from_value(json!({
            "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1"},
                          {"arn": "arn:aws:kms:us-east-1:111122223333:key/big", "tags": tags}]
        }))
        .unwrap();
        let backend = FileBackend::open(&d, u64::MAX).unwrap().limit_records(4096);
        match Store::open(Box::new(backend), Some(&seed), false, &options(), None) {
            Err(OpenError::Storage(StorageError::TooLarge { what, limit, .. })) => {
                assert!(what.contains("key/big"), "{what}");
                assert_eq!(limit, 4096);
            }
            Err(e) => panic!("expected TooLarge, got {e}"),
            Ok(_) => panic!("expected TooLarge, got a store"),
        }
        let left: Vec<_> =
            std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!left.iter().any(|n| n.starts_with("snap-")), "no snapshot or temporary file is left: {left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ephemeral_store_audits_every_change_before_its_ticket_resolves() {
        let d = scratch("ephemeral-audit");
        let path = d.join("audit.jsonl");
        let key = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let opts = Durability { compact_after_bytes: u64::MAX, event_capacity: 16 };
        let (s, opened) = Store::open_memory(Some(&world("Alpha")), &opts, Some(AuditLog::open(&path).unwrap())).unwrap();
        assert!(opened.seeded && opened.restored.is_none());
        for i in 0..5 {
            let ticket =
                s.apply(&Update::SetTags { resource: key.into(), tags: vec![("n".into(), i.to_string())] }, "admin").unwrap();
            let rev = ticket.durable().await.unwrap();
            assert_eq!(audit_names(&path).len(), i + 1, "the record of revision {rev} is written when its ticket resolves");
            assert_eq!(s.revision(), rev, "and the change is visible");
        }
        let (_, ticket) = s
            .tag(&TagRequest {
                principal: "arn:aws:iam::111122223333:root".into(),
                resource: key.into(),
                op: tagward_core::tagging::TagOp::Tag(vec![("Owner".into(), "me".into())]),
                session_tags: Vec::new(),
                context: Vec::new(),
            })
            .unwrap();
        ticket.durable().await.unwrap();
        assert_eq!(audit_names(&path).last().map(String::as_str), Some("TagResource"));
    }

    #[test]
    fn a_dangling_attachment_survives_export_import_and_restart() {
        let d = scratch("dangling");
        let role = "arn:aws:iam::111122223333:role/Early";
        let (s, _) = reopen(&d, Some(&world("Alpha")), false, None);
        let spec =
            PrincipalSpec { arn: role.into(), policies: vec!["Later".into(), "Exists".into()], ..PrincipalSpec::default() };
        s.apply(
            &Update::PutPolicy {
                name: "Exists".into(),
                document: json!({"Statement": {"Effect": "Allow", "Action": "sqs:*", "Resource": "*"}}),
            },
            "admin",
        )
        .unwrap()
        .wait()
        .unwrap();
        s.apply(&Update::PutPrincipal(spec), "admin").unwrap().wait().unwrap();
        let exported = WorldSpec::from_state(&s.snapshot());
        let p = exported.principals.iter().find(|p| p.arn == role).unwrap();
        assert_eq!((p.policies.clone(), p.pending_policies.clone()), (vec!["Exists".to_string()], vec!["Later".to_string()]));
        let text = serde_json::to_string(&exported).unwrap();
        assert!(text.contains("\"pending_policies\":[\"Later\"]"), "{text}");
        drop(s);
        // A world file with a dangling name under `policies` is still refused (a typo)...
        let typo: WorldSpec = serde_json::from_value(json!({"principals": [{"arn": role, "policies": ["Later"]}]})).unwrap();
        assert_eq!(typo.build().unwrap_err().path, "principals[0].policies[0]");
        // ...and the export imports (here: as a forced world, like `tagward import`).
        let imported: WorldSpec = serde_json::from_str(&text).unwrap();
        let (s, opened) = reopen(&d, Some(&imported), true, None);
        assert!(opened.replaced);
        drop(s);
        let (s, _) = reopen(&d, None, false, None);
        let ask = |s: &Store| {
            let req = tagward_core::engine::Request {
                principal: role.into(),
                action: "kms:ListKeys".into(),
                resource: "*".into(),
                ..tagward_core::engine::Request::default()
            };
            tagward_core::engine::authorize(&s.snapshot(), &req, false).unwrap().allowed()
        };
        assert!(!ask(&s), "the dangling attachment grants nothing yet");
        let again = WorldSpec::from_state(&s.snapshot());
        assert_eq!(serde_json::to_value(&again).unwrap(), serde_json::to_value(&exported).unwrap(), "the attachment was kept");
        // It starts applying once the policy is put.
        s.apply(
            &Update::PutPolicy {
                name: "Later".into(),
                document: json!({"Statement": {"Effect": "Allow", "Action": "kms:ListKeys", "Resource": "*"}}),
            },
            "admin",
        )
        .unwrap()
        .wait()
        .unwrap();
        assert!(ask(&s));
        let p = WorldSpec::from_state(&s.snapshot()).principals.into_iter().find(|p| p.arn == role).unwrap();
        assert_eq!((p.policies, p.pending_policies), (vec!["Exists".to_string(), "Later".to_string()], Vec::<String>::new()));
    }

    #[test]
    fn a_log_written_before_records_held_effects_reads_back() {
        let d = scratch("legacy-log");
        let key = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let (s, _) = reopen(&d, Some(&world("Alpha")), false, None);
        let start = s.revision();
        drop(s);
        let mut wals: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("wal-"))
            .collect();
        wals.sort();
        // What an older version logged for an admin tag write and a batch.
        let entries = [
            json!({"prev": start, "rev": start + 1, "time_unix_ms": 0, "actor": "admin",
                   "change": {"set_tags": {"resource": key, "tags": [["Owner", "me"]]}}}),
            json!({"prev": start + 1, "rev": start + 2, "time_unix_ms": 0, "actor": "admin",
                   "change": {"batch": [{"remove_tags": {"resource": key, "keys": ["Project"]}}]}}),
            json!({"prev": start + 2, "rev": start + 3, "time_unix_ms": 0, "actor": "arn:aws:iam::111122223333:root",
                   "change": {"replace_tags": {"resource": key, "tags": [["Owner", "you"]]}}}),
        ];
        let mut bytes = std::fs::read(wals.last().unwrap()).unwrap();
        for e in &entries {
            bytes.extend_from_slice(&crate::storage::frame(&serde_json::to_vec(e).unwrap()));
        }
        std::fs::write(wals.last().unwrap(), bytes).unwrap();
        let (s, opened) = reopen(&d, None, false, None);
        assert_eq!((opened.restored, opened.replayed), (Some(start + 3), 3));
        let tags = tagward_core::change::pairs(s.snapshot().target(key).unwrap().tags());
        assert_eq!(tags, vec![("Owner".to_string(), "you".to_string())]);
    }

    /// Waits until the audit trail at `path` holds `n` records.
    fn audit_records(path: &Path, n: usize) -> Vec<Value> {
        for _ in 0..500 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            if records.len() >= n {
                return records;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("{} never held {n} records", path.display());
    }

    #[test]
    fn a_denied_tag_operation_and_a_refused_update_are_audited_without_a_revision() {
        let d = scratch("refusal-audit");
        let path = d.join("audit.jsonl");
        let key = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let (s, _) =
            Store::open_memory(Some(&world("Alpha")), &options(), Some(AuditLog::open(&path).unwrap().with_node("node-a")))
                .unwrap();
        let before = s.revision();
        let denied = s.tag(&TagRequest {
            principal: "arn:aws:iam::111122223333:role/Nobody".into(),
            resource: key.into(),
            op: tagward_core::tagging::TagOp::Tag(vec![("Project".into(), "Beta".into())]),
            session_tags: Vec::new(),
            context: Vec::new(),
        });
        assert!(matches!(denied, Err(TagError::AccessDenied { .. })), "{denied:?}");
        let refused = s.apply(&Update::PutPolicy { name: "Bad".into(), document: json!({"Statement": 3}) }, "ops-admin");
        assert!(refused.is_err());
        let records = audit_records(&path, 2);
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(
            (records[0]["eventName"].as_str(), records[0]["errorCode"].as_str()),
            (Some("TagResource"), Some("AccessDenied"))
        );
        assert!(records[0]["errorMessage"].as_str().unwrap().contains("not authorized"), "{}", records[0]);
        assert_eq!(records[0]["requestParameters"]["tags"][0]["tagValue"], "Beta");
        assert_eq!(
            (records[1]["eventName"].as_str(), records[1]["errorCode"].as_str()),
            (Some("PutPolicy"), Some("MalformedPolicyDocumentException"))
        );
        assert_eq!(records[1]["userIdentity"]["principalId"], "ops-admin");
        for r in &records {
            assert_eq!(r["additionalEventData"]["revision"], before);
            assert_eq!(r["additionalEventData"]["node"], "node-a");
        }
        assert_ne!(records[0]["eventID"], records[1]["eventID"]);
        assert_eq!(s.revision(), before, "refusals change no revision");
        assert_eq!(
            tagward_core::change::pairs(s.snapshot().target(key).unwrap().tags()),
            vec![("Project".to_string(), "Alpha".to_string())]
        );
    }
}
