//! One suite of storage properties, run against every way of keeping the
//! state, in two halves:
//!
//! - **Store-level** (`store_suite/mod.rs`): a whole `Store` on a medium,
//!   generic over a `StoreHarness`, written through the calls the handlers
//!   make (`apply_acked`/`tag_acked`): every kind of change round-trips
//!   through a reopen, recovery after a compaction, following the medium,
//!   an oversize change refused leaving nothing, a failing medium refusing
//!   then recovering, no acknowledged change lost under concurrent writers,
//!   a second writer refused or serialized. They run here for the file and
//!   memory backends and, in the root package's
//!   `tests/etcd_conformance.rs`, for fleet mode on a real etcd.
//! - **Backend-level** (below): a `storage::Backend` on its own, generic
//!   over a [`Harness`] (open, reopen, tear), for the file and memory
//!   backends. These do not apply to etcd, which is not a `Backend`: its
//!   revisions are assigned by etcd at commit, so there are no records
//!   numbered by the store (`records_round_trip`), no snapshot written
//!   beside a log (`compaction_then_recovery`,
//!   `sync_prepared_before_a_compaction`), no local log whose tail a crash
//!   tears (`short_write`, `torn_tail_is_cut_once`) and no separate append
//!   and sync to fail one at a time (`failing_sync`, `full_disk_on_sync`,
//!   `full_disk_on_append`): a transaction commits whole or not at all,
//!   and the etcd half's failure property kills etcd instead.
//!
//! Faults finer than SIGKILL come from [`Faulty`], a wrapper backend that
//! fails an append or a sync (an I/O error, a full disk) or tears a record
//! half-written, on command.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test stops loudly

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tagward_core::change::Update;
use tagward_core::state::State;
use tagward_core::tagging::{TagOp, TagRequest};
use tagward_core::world::WorldSpec;
use tagward_core::ErrorCode;
use tagward_store::storage::{
    Backend, DurableSync, FileBackend, Follow, Loaded, LogRecord, MemoryBackend, MemoryMedium, NotLoaded, Recovered, SnapshotJob,
    StorageError,
};
use tagward_store::store::{Durability, Opened, Store};

const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";
const ROOT: &str = "arn:aws:iam::111122223333:root";

/// How a property opens (and reopens) one backend's medium.
trait Harness {
    /// A backend on this harness's medium, compacting after `compact_after`
    /// log bytes and writing records of at most `max_record` bytes.
    fn try_open(&self, compact_after: u64, max_record: u32) -> Result<Box<dyn Backend>, StorageError>;
    fn open(&self, compact_after: u64, max_record: u32) -> Box<dyn Backend> {
        self.try_open(compact_after, max_record).unwrap()
    }
    /// Appends `bytes` to the newest log as they are (a crash mid-write).
    fn tear(&self, bytes: &[u8]);
}

struct FileHarness {
    dir: PathBuf,
}

impl FileHarness {
    fn new(name: &str) -> FileHarness {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tagward-conformance-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        FileHarness { dir }
    }
}

impl Drop for FileHarness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Harness for FileHarness {
    fn try_open(&self, compact_after: u64, max_record: u32) -> Result<Box<dyn Backend>, StorageError> {
        Ok(Box::new(FileBackend::open(&self.dir, compact_after)?.limit_records(max_record)))
    }

    fn tear(&self, bytes: &[u8]) {
        let mut wals: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("wal-"))
            .collect();
        wals.sort();
        let newest = wals.last().expect("a log");
        let mut f = std::fs::OpenOptions::new().append(true).open(newest).unwrap();
        io::Write::write_all(&mut f, bytes).unwrap();
    }
}

struct MemoryHarness {
    medium: MemoryMedium,
}

impl MemoryHarness {
    fn new(_name: &str) -> MemoryHarness {
        MemoryHarness { medium: MemoryMedium::new() }
    }
}

impl Harness for MemoryHarness {
    fn try_open(&self, compact_after: u64, max_record: u32) -> Result<Box<dyn Backend>, StorageError> {
        Ok(Box::new(MemoryBackend::open(&self.medium, compact_after)?.limit_records(max_record)))
    }

    fn tear(&self, bytes: &[u8]) {
        self.medium.tear(bytes);
    }
}

// ---- faults ----------------------------------------------------------------

/// What the next append or sync does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Fails with this OS error (28: ENOSPC, a full disk; 5: EIO) before
    /// anything is written.
    Error(i32),
    /// Writes half of the record, then fails (a short write).
    Short,
}

#[derive(Default)]
struct Faults {
    append: Mutex<Option<Fault>>,
    sync: Mutex<Option<Fault>>,
    /// Set once a fault fired.
    fired: AtomicBool,
}

impl Faults {
    fn on_append(&self, f: Fault) {
        *self.append.lock().unwrap() = Some(f);
    }
    fn on_sync(&self, f: Fault) {
        *self.sync.lock().unwrap() = Some(f);
    }
}

/// A backend that fails on command.
struct Faulty {
    inner: Box<dyn Backend>,
    faults: Arc<Faults>,
    /// What short writes left, for the harness to tear into its medium.
    torn: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn os_error(place: PathBuf, code: i32) -> StorageError {
    StorageError::Io { path: place, source: io::Error::from_raw_os_error(code) }
}

/// The first half of a framed record: its header says more bytes follow
/// than do.
fn half_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&payload[..payload.len() / 2]);
    out
}

struct FailingSync {
    error: StorageError,
}

impl DurableSync for FailingSync {
    fn sync(self: Box<Self>) -> Result<(), StorageError> {
        Err(self.error)
    }
}

impl Backend for Faulty {
    fn place(&self) -> PathBuf {
        self.inner.place()
    }
    fn max_record(&self) -> u32 {
        self.inner.max_record()
    }
    fn recover(&mut self, load: &mut dyn FnMut(Loaded<'_>) -> Result<(), NotLoaded>) -> Result<Recovered, StorageError> {
        self.inner.recover(load)
    }
    fn append(&mut self, record: &LogRecord) -> Result<(), StorageError> {
        match self.faults.append.lock().unwrap().take() {
            None => self.inner.append(record),
            Some(Fault::Error(code)) => {
                self.faults.fired.store(true, Ordering::SeqCst);
                Err(os_error(self.inner.place(), code))
            }
            Some(Fault::Short) => {
                // What was appended before reaches the medium whole; this
                // record only half.
                self.inner.prepare_sync()?.sync()?;
                self.torn.lock().unwrap().push(half_frame(&record.bytes));
                self.faults.fired.store(true, Ordering::SeqCst);
                Err(os_error(self.inner.place(), 28))
            }
        }
    }
    fn prepare_sync(&mut self) -> Result<Box<dyn DurableSync>, StorageError> {
        let sync = self.inner.prepare_sync()?;
        match self.faults.sync.lock().unwrap().take() {
            None => Ok(sync),
            Some(fault) => {
                self.faults.fired.store(true, Ordering::SeqCst);
                let code = if let Fault::Error(code) = fault { code } else { 28 };
                Ok(Box::new(FailingSync { error: os_error(self.inner.place(), code) }))
            }
        }
    }
    fn wants_compaction(&self) -> bool {
        self.inner.wants_compaction()
    }
    fn begin_compaction(&mut self, revision: u64) -> Result<Box<dyn SnapshotJob>, StorageError> {
        self.inner.begin_compaction(revision)
    }
    fn follow(&self, from: u64) -> Result<Follow, StorageError> {
        self.inner.follow(from)
    }
}

// ---- helpers ---------------------------------------------------------------

fn options() -> Durability {
    Durability { compact_after_bytes: u64::MAX, event_capacity: 64 }
}

fn seed() -> WorldSpec {
    serde_json::from_value(json!({
        "resources": [{"arn": KEY, "tags": {"Project": "Alpha"}}]
    }))
    .unwrap()
}

fn open_store(backend: Box<dyn Backend>, seed: Option<&WorldSpec>) -> (Arc<Store>, Opened) {
    match Store::open(backend, seed, false, &options(), None) {
        Ok(opened) => opened,
        Err(e) => panic!("open: {e}"),
    }
}

fn set(n: usize) -> Update {
    Update::SetTags { resource: KEY.into(), tags: vec![("n".into(), n.to_string())] }
}

/// The state as a comparable value (and its revision).
fn world_of(state: &State) -> (u64, Value) {
    (state.revision(), serde_json::to_value(WorldSpec::from_state(state)).unwrap())
}

/// A mix of every kind of change; returns the acknowledged revisions.
fn mixed_changes(store: &Store) -> Vec<u64> {
    let updates = store_suite::every_kind_of_update();
    let mut revs: Vec<u64> = updates.iter().map(|u| store.apply(u, "admin").unwrap().wait().unwrap()).collect();
    let tag = TagRequest {
        principal: ROOT.into(),
        resource: KEY.into(),
        op: TagOp::Tag(vec![("Owner".into(), "me".into())]),
        session_tags: Vec::new(),
        context: Vec::new(),
    };
    let (tagged, ticket) = store.tag(&tag).unwrap();
    assert!(tagged.changed);
    revs.push(ticket.wait().unwrap());
    revs
}

// ---- properties ------------------------------------------------------------

/// Records appended and synced come back from recovery exactly: bytes,
/// `prev` and `rev`, in order.
fn records_round_trip(h: &dyn Harness) {
    let mut b = h.open(u64::MAX, u32::MAX);
    assert!(!b.recover(&mut |_| Ok(())).unwrap().found, "a new medium is empty");
    let written: Vec<LogRecord> = (0..20u64)
        .map(|i| LogRecord {
            prev: i,
            rev: i + 1,
            bytes: serde_json::to_vec(&json!({"prev": i, "rev": i + 1, "payload": "x".repeat(i as usize)})).unwrap(),
        })
        .collect();
    for (i, r) in written.iter().enumerate() {
        b.append(r).unwrap();
        if i % 7 == 6 {
            b.prepare_sync().unwrap().sync().unwrap();
        }
    }
    b.prepare_sync().unwrap().sync().unwrap();
    drop(b);
    let mut b = h.open(u64::MAX, u32::MAX);
    let mut read = Vec::new();
    let recovered = b
        .recover(&mut |item| {
            if let Loaded::Record(r) = item {
                read.push(r);
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(read, written);
    assert_eq!((recovered.found, recovered.revision, recovered.cut.is_none()), (true, 20, true));
    // A record that does not follow the last one is refused.
    let out_of_order = LogRecord { prev: 5, rev: 6, bytes: b"{\"prev\":5,\"rev\":6}".to_vec() };
    assert!(matches!(b.append(&out_of_order), Err(StorageError::OutOfOrder { prev: 5, last: 20, .. })));
}

/// A store's changes of every kind come back after a reopen: the same state
/// at the same revision.
fn store_round_trip(h: &dyn Harness) {
    let (s, opened) = open_store(h.open(u64::MAX, u32::MAX), Some(&seed()));
    assert!(opened.seeded);
    let revs = mixed_changes(&s);
    let before = world_of(&s.snapshot());
    assert_eq!(before.0, *revs.last().unwrap());
    drop(s);
    let (s, opened) = open_store(h.open(u64::MAX, u32::MAX), None);
    assert_eq!((opened.restored, opened.replayed, opened.seeded), (Some(before.0), revs.len() as u64, false));
    assert_eq!(world_of(&s.snapshot()), before);
}

/// A snapshot written from records, then recovery: the snapshot's records
/// and the records after it, nothing before.
fn compaction_then_recovery(h: &dyn Harness) {
    let mut b = h.open(u64::MAX, u32::MAX);
    b.recover(&mut |_| Ok(())).unwrap();
    let rec = |i: u64| LogRecord { prev: i, rev: i + 1, bytes: format!("{{\"prev\":{i},\"rev\":{}}}", i + 1).into_bytes() };
    for i in 0..5 {
        b.append(&rec(i)).unwrap();
    }
    let job = b.begin_compaction(5).unwrap();
    for i in 5..8 {
        b.append(&rec(i)).unwrap();
    }
    b.prepare_sync().unwrap().sync().unwrap();
    let records: Vec<Vec<u8>> = (0..3).map(|i| format!("{{\"entity\":{i}}}").into_bytes()).collect();
    job.write(&mut records.clone().into_iter().map(Ok)).unwrap();
    drop(b);
    let mut b = h.open(u64::MAX, u32::MAX);
    let mut seen = Vec::new();
    b.recover(&mut |item| {
        match item {
            Loaded::SnapshotBegin { revision } => seen.push(format!("begin {revision}")),
            Loaded::SnapshotRecords(rs) => seen.extend(rs.iter().map(|r| String::from_utf8(r.to_vec()).unwrap())),
            Loaded::SnapshotEnd { revision } => seen.push(format!("end {revision}")),
            Loaded::Record(r) => seen.push(format!("record {}->{}", r.prev, r.rev)),
        }
        Ok(())
    })
    .unwrap();
    let mut expected = vec!["begin 5".to_string()];
    expected.extend(records.iter().map(|r| String::from_utf8(r.clone()).unwrap()));
    expected.extend(["end 5".to_string(), "record 5->6".into(), "record 6->7".into(), "record 7->8".into()]);
    assert_eq!(seen, expected);
    // Following from before the snapshot: those records are gone.
    assert!(matches!(b.follow(2), Err(StorageError::Gone { from: 2, .. })), "records before the snapshot are dropped");
}

/// The committer prepares a sync, then may start a compaction before the
/// sync runs: the records of that sync are kept all the same.
fn sync_prepared_before_a_compaction(h: &dyn Harness) {
    let rec = |i: u64| LogRecord { prev: i, rev: i + 1, bytes: format!("{{\"prev\":{i},\"rev\":{}}}", i + 1).into_bytes() };
    let recovered_revs = |b: &mut Box<dyn Backend>| {
        let mut revs = Vec::new();
        b.recover(&mut |item| {
            if let Loaded::Record(r) = item {
                revs.push(r.rev);
            }
            Ok(())
        })
        .unwrap();
        revs
    };
    let mut b = h.open(u64::MAX, u32::MAX);
    b.recover(&mut |_| Ok(())).unwrap();
    b.append(&rec(0)).unwrap();
    b.append(&rec(1)).unwrap();
    let sync = b.prepare_sync().unwrap();
    let job = b.begin_compaction(2).unwrap();
    sync.sync().unwrap();
    b.append(&rec(2)).unwrap();
    b.prepare_sync().unwrap().sync().unwrap();
    // A crash before the snapshot is written: every record is in the logs.
    drop((job, b));
    let mut b = h.open(u64::MAX, u32::MAX);
    assert_eq!(recovered_revs(&mut b), vec![1, 2, 3]);
    // With the snapshot at 3 written: the snapshot, and nothing after it.
    b.begin_compaction(3).unwrap().write(&mut std::iter::empty()).unwrap();
    drop(b);
    let mut b = h.open(u64::MAX, u32::MAX);
    assert_eq!(recovered_revs(&mut b), Vec::<u64>::new());
    assert!(b.follow(3).unwrap().next().is_none());
}

/// A store that compacts as it goes restores the same state.
fn store_compaction_then_recovery(h: &dyn Harness) {
    let (s, _) = open_store(h.open(2048, u32::MAX), Some(&seed()));
    // Every kind first, so the snapshot must hold them all.
    mixed_changes(&s);
    for i in 0..200 {
        s.apply(&set(i), "admin").unwrap().wait().unwrap();
    }
    let before = world_of(&s.snapshot());
    assert!(before.1.get("organization").is_some() && before.1.get("sessions").is_some(), "{}", before.1);
    drop(s); // waits for a snapshot in progress
    let (s, opened) = open_store(h.open(2048, u32::MAX), None);
    assert_eq!(world_of(&s.snapshot()), before);
    assert!(opened.replayed < 200, "a snapshot was written and the log after it is short: {}", opened.replayed);
}

/// Following from a revision yields the records after it, in order; from
/// the head, nothing.
fn following(h: &dyn Harness) {
    let (s, _) = open_store(h.open(u64::MAX, u32::MAX), Some(&seed()));
    let start = s.revision();
    let revs = mixed_changes(&s);
    let all = s.follow(start).unwrap();
    assert_eq!(all.iter().map(|r| r.rev).collect::<Vec<_>>(), revs);
    assert!(all.windows(2).all(|w| w[0].rev == w[1].prev), "each record follows the one before");
    assert_eq!(all[0].prev, start);
    let later = s.follow(revs[3]).unwrap();
    assert_eq!(later.iter().map(|r| r.rev).collect::<Vec<_>>(), revs[4..].to_vec());
    assert!(s.follow(s.revision()).unwrap().is_empty(), "one writer: nothing new beyond what it wrote");
    assert_eq!(all.last().unwrap().actor, ROOT, "the tag operation's record names its principal");
}

/// A record over the limit is refused with the field and the reason, leaves
/// nothing behind, and the store carries on.
fn oversize_record_leaves_nothing(h: &dyn Harness) {
    let (s, _) = open_store(h.open(u64::MAX, 4096), Some(&seed()));
    let before = world_of(&s.snapshot());
    let big: Vec<Value> =
        (0..200).map(|i| json!({"Effect": "Allow", "Action": format!("kms:Action{i:04}"), "Resource": "*"})).collect();
    let err = s.apply(&Update::PutPolicy { name: "Big".into(), document: json!({"Statement": big}) }, "admin").unwrap_err();
    assert_eq!(err.code, ErrorCode::Validation);
    assert!(err.message.starts_with("put_policy: ") && err.message.contains("4096-byte limit"), "{err}");
    assert_eq!(world_of(&s.snapshot()), before, "the refused change left the state as it was");
    let rev = s.apply(&set(1), "admin").unwrap().wait().unwrap();
    let after = world_of(&s.snapshot());
    drop(s);
    let (s, opened) = open_store(h.open(u64::MAX, 4096), None);
    assert_eq!(opened.cut.map(|c| c.reason), None, "nothing half-written");
    assert_eq!((opened.restored, world_of(&s.snapshot())), (Some(rev), after));
}

/// The failure checks every fault shares: the waiting change (if any) is
/// answered `StorageFailed`, further changes are refused, reads go on from
/// the last durable state, and after reopening every acknowledged change is
/// there.
fn refuses_then_recovers(h: &dyn Harness, fault_on_sync: bool, fault: Fault) {
    let faults = Arc::new(Faults::default());
    // What a short write leaves; torn into the harness's medium below.
    let shared_tear = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let pending = shared_tear.clone();
    let backend = Faulty { inner: h.open(u64::MAX, u32::MAX), faults: faults.clone(), torn: pending };
    let (s, _) = open_store(Box::new(backend), Some(&seed()));
    let acked: Vec<u64> = (0..5).map(|i| s.apply(&set(i), "admin").unwrap().wait().unwrap()).collect();
    let durable = world_of(&s.snapshot());

    if fault_on_sync {
        faults.on_sync(fault);
        let ticket = s.apply(&set(100), "admin").expect("accepted: the append worked");
        let failed = ticket.wait().expect_err("the sync failed, so the change is not acknowledged");
        assert!(failed.to_string().contains("changes are refused"), "{failed}");
    } else {
        faults.on_append(fault);
        let err = s.apply(&set(100), "admin").expect_err("the append failed");
        assert_eq!(err.code, ErrorCode::StorageFailed, "{err}");
    }
    assert!(faults.fired.load(Ordering::SeqCst));
    // Torn bytes reach the medium as the crash would leave them.
    for bytes in shared_tear.lock().unwrap().drain(..) {
        h.tear(&bytes);
    }
    let err = s.apply(&set(200), "admin").expect_err("no change is accepted after a storage failure");
    assert_eq!(err.code, ErrorCode::StorageFailed);
    assert!(err.message.contains("No space left") || fault != Fault::Error(28), "the reason is named: {err}");
    let tag = TagRequest {
        principal: ROOT.into(),
        resource: KEY.into(),
        op: TagOp::Tag(vec![("Owner".into(), "me".into())]),
        session_tags: Vec::new(),
        context: Vec::new(),
    };
    assert!(s.tag(&tag).is_err(), "tag operations are refused too");
    assert_eq!(world_of(&s.snapshot()), durable, "reads go on from the last durable state");
    drop(s);

    let (s, opened) = open_store(h.open(u64::MAX, u32::MAX), None);
    let restored = opened.restored.unwrap();
    assert!(restored >= *acked.last().unwrap(), "every acknowledged change is there: {restored} < {acked:?}");
    if restored == durable.0 {
        assert_eq!(world_of(&s.snapshot()), durable);
    }
    if fault == Fault::Short {
        let cut = opened.cut.expect("the torn record was cut");
        assert!(cut.reason.contains("left in the file"), "{}", cut.reason);
        assert_eq!(world_of(&s.snapshot()), durable, "the half-written change is gone, the rest intact");
    }
    if !fault_on_sync && fault != Fault::Short {
        assert_eq!(world_of(&s.snapshot()), durable, "the refused append left no trace");
    }
    // And the reopened store takes changes again.
    let rev = s.apply(&set(300), "admin").unwrap().wait().unwrap();
    assert_eq!(rev, restored + 1);
}

fn failing_sync(h: &dyn Harness) {
    refuses_then_recovers(h, true, Fault::Error(5));
}

fn full_disk_on_sync(h: &dyn Harness) {
    refuses_then_recovers(h, true, Fault::Error(28));
}

fn full_disk_on_append(h: &dyn Harness) {
    refuses_then_recovers(h, false, Fault::Error(28));
}

fn short_write(h: &dyn Harness) {
    refuses_then_recovers(h, false, Fault::Short);
}

/// A torn tail with no fault injected (a crash between writes): recovery
/// cuts it and says where; a second recovery finds nothing to cut.
fn torn_tail_is_cut_once(h: &dyn Harness) {
    let (s, _) = open_store(h.open(u64::MAX, u32::MAX), Some(&seed()));
    let mut rev = 0;
    for i in 0..3 {
        rev = s.apply(&set(i), "admin").unwrap().wait().unwrap();
    }
    drop(s);
    h.tear(&half_frame(br#"{"prev":99,"rev":100,"change":"half"}"#));
    let (s, opened) = open_store(h.open(u64::MAX, u32::MAX), None);
    assert_eq!(opened.restored, Some(rev));
    assert!(opened.cut.is_some());
    drop(s);
    let (_, opened) = open_store(h.open(u64::MAX, u32::MAX), None);
    assert!(opened.cut.is_none(), "cut once");
}

/// One writer at a time; a dropped store releases its backend.
fn second_writer_is_refused(h: &dyn Harness) {
    let first = h.open(u64::MAX, u32::MAX);
    assert!(matches!(h.try_open(u64::MAX, u32::MAX), Err(StorageError::Locked(_))));
    drop(first);
    let (s, _) = open_store(h.open(u64::MAX, u32::MAX), Some(&seed()));
    s.apply(&set(1), "admin").unwrap().wait().unwrap();
    assert!(matches!(h.try_open(u64::MAX, u32::MAX), Err(StorageError::Locked(_))), "the store holds it");
    drop(s);
    let (s, _) = open_store(h.open(u64::MAX, u32::MAX), None);
    assert_eq!(s.snapshot().target(KEY).unwrap().tags().len(), 2);
}

// ---- the store-level half, for the file and memory backends ---------------

#[macro_use]
mod store_suite;

use store_suite::{Followed, Limits, OpenFailed, StoreHarness};

/// A store on one of this crate's backends, behind [`Faulty`] so that the
/// failure property can make it fail.
struct Stores<H: Harness> {
    medium: H,
    faults: Arc<Faults>,
}

impl<H: Harness> Stores<H> {
    fn new(medium: H) -> Stores<H> {
        Stores { medium, faults: Arc::new(Faults::default()) }
    }
}

fn followed(record: tagward_core::change::Record) -> Followed {
    let tags = match &record.change {
        tagward_core::change::Change::ReplaceTags { resource, tags } if resource == store_suite::KEY => Some(tags.clone()),
        _ => None,
    };
    (record.rev, record.actor, tags)
}

impl<H: Harness> StoreHarness for Stores<H> {
    const SHARED: bool = false;
    const TOO_LARGE: &'static str = "4096-byte limit";

    async fn open(&self, seed: Option<&WorldSpec>, limits: Limits) -> Result<store_suite::Opened, OpenFailed> {
        let inner = match self.medium.try_open(limits.compact_after, limits.max_record) {
            Ok(b) => b,
            Err(e @ StorageError::Locked(_)) => return Err(OpenFailed::Locked(e.to_string())),
            Err(e) => return Err(OpenFailed::Other(e.to_string())),
        };
        let backend = Faulty { inner, faults: self.faults.clone(), torn: Arc::new(Mutex::new(Vec::new())) };
        let options = Durability { compact_after_bytes: limits.compact_after, event_capacity: 64 };
        let (store, opened) =
            Store::open(Box::new(backend), seed, false, &options, None).map_err(|e| OpenFailed::Other(e.to_string()))?;
        Ok(store_suite::Opened { store, restored: opened.restored, seeded: opened.seeded, on_close: None })
    }

    async fn follow(&self, store: &Store, from: u64) -> Result<Vec<Followed>, String> {
        store.follow(from).map(|records| records.into_iter().map(followed).collect()).map_err(|e| e.to_string())
    }

    async fn compact(&self, _store: &Store) {
        // These backends compact on their own past `compact_after`.
    }

    async fn fail(&self) {
        self.faults.on_append(Fault::Error(28));
    }

    async fn heal(&self) {
        assert!(self.faults.fired.load(Ordering::SeqCst), "the fault fired");
    }
}

macro_rules! store_conformance {
    ($($property:ident),* $(,)?) => {
        mod file_store {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread")] async fn $property() {
                store_suite::$property(&Stores::new(FileHarness::new(stringify!($property)))).await;
            })*
        }
        mod memory_store {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread")] async fn $property() {
                store_suite::$property(&Stores::new(MemoryHarness::new(stringify!($property)))).await;
            })*
        }
    };
}

every_store_property!(store_conformance);

// ---- every backend-level property, once per backend -----------------------

macro_rules! conformance {
    ($($property:ident),* $(,)?) => {
        mod file {
            use super::*;
            $(#[test] fn $property() { super::$property(&FileHarness::new(stringify!($property))); })*
        }
        mod memory {
            use super::*;
            $(#[test] fn $property() { super::$property(&MemoryHarness::new(stringify!($property))); })*
        }
    };
}

conformance!(
    records_round_trip,
    store_round_trip,
    compaction_then_recovery,
    sync_prepared_before_a_compaction,
    store_compaction_then_recovery,
    following,
    oversize_record_leaves_nothing,
    failing_sync,
    full_disk_on_sync,
    full_disk_on_append,
    short_write,
    torn_tail_is_cut_once,
    second_writer_is_refused,
);

// ---- a failed store recovers in place ----------------------------------------

/// A store given a way to reopen its medium (`Store::recover_with`, what a
/// data directory's store has) takes changes again once the fault is gone,
/// without a restart: every acknowledged change is still there, the change
/// whose sync or append failed is as a restart would find it, the audit
/// trail has a record of every revision (those of refused changes the
/// medium kept marked recovered, every line whole; refusal records aside), watchers see every
/// revision once, and a later reopen finds what the recovered store wrote.
fn reopens_once_the_fault_clears(h: &dyn Harness, reopen: tagward_store::store::Reopen, fault_on_sync: bool, fault: Fault) {
    let faults = Arc::new(Faults::default());
    let torn = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let backend = Faulty { inner: h.open(u64::MAX, u32::MAX), faults: faults.clone(), torn: torn.clone() };
    let trail_dir = std::env::temp_dir().join(format!("tagward-reopen-audit-{}-{}", std::process::id(), fault_on_sync));
    let _ = std::fs::remove_dir_all(&trail_dir);
    let trail = trail_dir.join("audit.jsonl");
    let audit = tagward_store::audit::AuditLog::open(&trail).unwrap();
    let (s, _) = Store::open(Box::new(backend), Some(&seed()), false, &options(), Some(audit)).unwrap();
    let acked: Vec<u64> = (0..5).map(|i| s.apply(&set(i), "admin").unwrap().wait().unwrap()).collect();
    let last = *acked.last().unwrap();
    let (backlog, mut live) = s.watch(last).unwrap();
    assert!(backlog.is_empty());
    s.recover_with(reopen);

    if fault_on_sync {
        faults.on_sync(fault);
        let failed = s.apply(&set(100), "admin").expect("accepted: the append worked").wait();
        assert!(failed.is_err(), "the sync failed, so the change is not acknowledged");
    } else {
        faults.on_append(fault);
        let err = s.apply(&set(100), "admin").expect_err("the append failed");
        assert_eq!(err.code, ErrorCode::StorageFailed, "{err}");
    }
    for bytes in torn.lock().unwrap().drain(..) {
        h.tear(&bytes);
    }
    // Waited for, not timed: the first retry comes after half a second.
    let mut failures = s.failures();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while failures.borrow_and_update().is_some() || s.apply(&Update::Batch(Vec::new()), "admin").is_err() {
        assert!(std::time::Instant::now() < deadline, "the store did not recover: {:?}", failures.borrow());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let recovered = s.revision();
    assert!(recovered == last || recovered == last + 1, "recovered to {recovered}, acknowledged {last}");
    let next = s.apply(&set(300), "admin").unwrap().wait().unwrap();
    assert_eq!(next, recovered + 1);

    // Watchers: every revision after `last`, once, in order.
    let mut seen = Vec::new();
    while let Ok(e) = live.try_recv() {
        if seen.last() != Some(&e.revision) {
            seen.push(e.revision);
        }
    }
    assert_eq!(seen, ((last + 1)..=next).collect::<Vec<_>>());

    // The trail: one record per revision, whole lines, the refused change
    // the medium kept marked recovered.
    drop(s);
    let text = std::fs::read_to_string(&trail).unwrap();
    assert!(text.ends_with('\n'));
    let mut revisions = Vec::new();
    let mut marked = Vec::new();
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        // A refusal (the failed append's, written whenever the committer
        // next drains them) names the revision it was refused at.
        if r.get("errorCode").is_some() {
            continue;
        }
        let rev = r["additionalEventData"]["revision"].as_u64().unwrap();
        revisions.push(rev);
        if r["additionalEventData"]["recovered"] == true {
            marked.push(rev);
        }
    }
    revisions.dedup();
    let first = revisions[0];
    assert_eq!(revisions, (first..=next).collect::<Vec<_>>(), "{text}");
    let expect_marked: Vec<u64> = if recovered > last { vec![recovered] } else { Vec::new() };
    assert_eq!(marked, expect_marked, "{text}");
    let _ = std::fs::remove_dir_all(&trail_dir);

    // What the recovered store wrote is on the medium.
    let (again, opened) = open_store(h.open(u64::MAX, u32::MAX), None);
    assert_eq!(opened.restored, Some(next));
    assert_eq!(again.snapshot().target(KEY).unwrap().tags().get("n"), Some("300"));
}

fn file_reopener(h: &FileHarness) -> tagward_store::store::Reopen {
    let dir = h.dir.clone();
    Box::new(move || Ok(Box::new(FileBackend::open(&dir, u64::MAX)?) as Box<dyn Backend>))
}

fn memory_reopener(h: &MemoryHarness) -> tagward_store::store::Reopen {
    let medium = h.medium.clone();
    Box::new(move || Ok(Box::new(MemoryBackend::open(&medium, u64::MAX)?) as Box<dyn Backend>))
}

#[test]
fn file_reopens_after_a_failed_sync() {
    let h = FileHarness::new("reopen-sync");
    reopens_once_the_fault_clears(&h, file_reopener(&h), true, Fault::Error(28));
}

#[test]
fn file_reopens_after_a_short_write() {
    let h = FileHarness::new("reopen-short");
    reopens_once_the_fault_clears(&h, file_reopener(&h), false, Fault::Short);
}

#[test]
fn memory_reopens_after_a_failed_append() {
    let h = MemoryHarness::new("reopen-append");
    reopens_once_the_fault_clears(&h, memory_reopener(&h), false, Fault::Error(5));
}
