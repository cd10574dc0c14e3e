//! The store-level half of the storage conformance suite: properties of a
//! whole [`Store`] on some medium, generic over a [`StoreHarness`], so that
//! every way of keeping the state runs them: the file and memory backends
//! (`conformance.rs` in this crate) and etcd (the root package's
//! `tests/etcd_conformance.rs`, which includes this file: the etcd client
//! lives in the root package, and a dev-dependency of this crate on it would
//! build a second copy of this crate whose types do not match).
//!
//! Every write goes through `apply_acked`/`tag_acked`, the calls the
//! handlers make, which serve both a single-writer store and a fleet store.
//! What only a single-writer backend has (records the store numbers, a torn
//! local log tail, a sync prepared before a compaction) stays in the
//! backend-level properties of `conformance.rs`.

#![allow(dead_code)] // each includer runs the properties its harnesses support

/// Calls `$run!` with the name of every property below, so that a
/// property added here runs for every medium (the includers declare this
/// module `#[macro_use]` and pass the macro that makes their tests).
macro_rules! every_store_property {
    ($run:ident) => {
        $run!(
            round_trip_through_a_reopen,
            recovery_after_compaction,
            following,
            oversize_change_leaves_nothing,
            a_failing_store_refuses_then_recovers,
            no_acknowledged_change_is_lost,
            a_second_writer_is_refused_or_serialized,
        );
    };
}

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{json, Value};
use tagward_core::change::Update;
use tagward_core::state::State;
use tagward_core::tagging::{TagError, TagOp, TagRequest};
use tagward_core::world::WorldSpec;
use tagward_core::ErrorCode;
use tagward_store::store::Store;

pub const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";
pub const ROOT: &str = "arn:aws:iam::111122223333:root";

/// How a property opens its store.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Compact after this many log bytes (a backend), or compact when the
    /// property asks (etcd: `StoreHarness::compact`).
    pub compact_after: u64,
    /// The largest change the medium takes, in bytes.
    pub max_record: u32,
}

pub const UNLIMITED: Limits = Limits { compact_after: u64::MAX, max_record: u32::MAX };

/// An open store, and whatever keeps it current (stopped when dropped).
pub struct Opened {
    pub store: Arc<Store>,
    /// The revision it found on the medium (`None`: an empty medium).
    pub restored: Option<u64>,
    /// It seeded the empty medium from the world given.
    pub seeded: bool,
    /// Called when dropped (stops a fleet store's follower).
    pub on_close: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for Opened {
    fn drop(&mut self) {
        if let Some(close) = self.on_close.take() {
            close();
        }
    }
}

/// Why a store did not open.
#[derive(Debug)]
pub enum OpenFailed {
    /// Another store holds the medium (a single-writer backend's lock).
    Locked(String),
    Other(String),
}

/// One change as the medium holds it: its revision, who made it, and the
/// tags of [`KEY`] after it when it set them.
pub type Followed = (u64, String, Option<Vec<(String, String)>>);

/// How a property opens, fails and reads one medium.
#[allow(async_fn_in_trait)] // used generically, never as a trait object
pub trait StoreHarness {
    /// Several stores may write the medium at once (etcd); otherwise a
    /// second one is refused while the first is open (a data directory).
    const SHARED: bool;
    /// What the message of a change over [`Limits::max_record`] says.
    const TOO_LARGE: &'static str;
    async fn open(&self, seed: Option<&WorldSpec>, limits: Limits) -> Result<Opened, OpenFailed>;
    /// The changes on the medium after revision `from`, oldest first (one
    /// per revision); `Err` when that history is gone (compacted).
    /// `store` is the store open on the medium (a single-writer medium is
    /// read through it).
    async fn follow(&self, store: &Store, from: u64) -> Result<Vec<Followed>, String>;
    /// Discards the history the medium keeps through `store`'s revision
    /// (for a backend that compacts on its own as it goes: nothing).
    async fn compact(&self, store: &Store);
    /// From now on the medium fails every write.
    async fn fail(&self);
    /// The medium works again.
    async fn heal(&self);
}

async fn open<H: StoreHarness>(h: &H, seed: Option<&WorldSpec>, limits: Limits) -> Opened {
    match h.open(seed, limits).await {
        Ok(opened) => opened,
        Err(e) => panic!("open: {e:?}"),
    }
}

pub fn seed() -> WorldSpec {
    serde_json::from_value(json!({
        "resources": [{"arn": KEY, "tags": {"Project": "Alpha"}}]
    }))
    .unwrap()
}

pub fn set(n: usize) -> Update {
    Update::SetTags { resource: KEY.into(), tags: vec![("n".into(), n.to_string())] }
}

fn tag(value: &str) -> TagRequest {
    TagRequest {
        principal: ROOT.into(),
        resource: KEY.into(),
        op: TagOp::Tag(vec![("Owner".into(), value.into())]),
        session_tags: Vec::new(),
        context: Vec::new(),
    }
}

/// The state as a comparable value (and its revision).
pub fn world_of(state: &State) -> (u64, Value) {
    (state.revision(), serde_json::to_value(WorldSpec::from_state(state)).unwrap())
}

fn policy_all() -> Value {
    json!({"Statement": {"Effect": "Allow", "Action": "*", "Resource": "*"}})
}

/// One update of every kind (the wider chain's included: a boundary and a
/// trust policy, the organization, a session, endpoints), in an order that
/// applies; shared with the backend-level half of the suite.
pub fn every_kind_of_update() -> Vec<Update> {
    let policy = json!({"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}});
    vec![
        Update::PutPolicy { name: "P".into(), document: policy.clone() },
        Update::PutPrincipal(
            serde_json::from_value(json!({"arn": "arn:aws:iam::111122223333:role/R", "policies": ["P"]})).unwrap(),
        ),
        set(1),
        Update::RemoveTags { resource: KEY.into(), keys: vec!["Project".into()] },
        Update::Batch(vec![set(2), Update::PutPolicy { name: "Q".into(), document: policy }]),
        Update::PutResource(serde_json::from_value(json!({"arn": "arn:aws:kms:us-east-1:111122223333:key/k2"})).unwrap()),
        Update::DeleteResource { arn: "arn:aws:kms:us-east-1:111122223333:key/k2".into() },
        Update::DeletePolicy { name: "Q".into() },
        Update::PutPrincipal(
            serde_json::from_value(json!({"arn": "arn:aws:iam::111122223333:role/T", "permissions_boundary": "P",
                "trust_policy": {"Statement": {"Effect": "Allow", "Principal": "*", "Action": "sts:AssumeRole"}}}))
            .unwrap(),
        ),
        Update::PutOrganization(
            serde_json::from_value(json!({"id": "o-a1b2c3d4e5", "policies": {"F": policy_all()},
                "units": [{"id": "r-ab12", "scps": ["F"]}],
                "accounts": [{"id": "111122223333", "parent": "r-ab12", "scps": ["F"]}]}))
            .unwrap(),
        ),
        Update::PutSession(
            serde_json::from_value(json!({"arn": "arn:aws:sts::111122223333:assumed-role/T/s", "policies": ["P"], "tags": {"team": "a"}}))
                .unwrap(),
        ),
        Update::PutEndpoint(serde_json::from_value(json!({"id": "vpce-1", "policy": {"Statement": {"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*"}}})).unwrap()),
        Update::PutEndpoint(serde_json::from_value(json!({"id": "vpce-2"})).unwrap()),
        Update::DeleteEndpoint { id: "vpce-2".into() },
    ]
}

/// Every kind of change, acknowledged one by one; their revisions.
async fn mixed_changes(store: &Store) -> Vec<u64> {
    let updates = every_kind_of_update();
    let mut revs = Vec::new();
    for u in &updates {
        revs.push(store.apply_acked(u, "admin").await.unwrap());
    }
    let tagged = store.tag_acked(&tag("me")).await.unwrap();
    assert!(tagged.changed);
    revs.push(tagged.revision);
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "each change makes a newer revision: {revs:?}");
    revs
}

// ---- properties ------------------------------------------------------------

/// Changes of every kind come back after a reopen: the same state at the
/// same revision, without the seed applied again.
pub async fn round_trip_through_a_reopen<H: StoreHarness>(h: &H) {
    let first = open(h, Some(&seed()), UNLIMITED).await;
    assert!(first.seeded && first.restored.is_none(), "a new medium is seeded");
    let revs = mixed_changes(&first.store).await;
    let before = world_of(&first.store.snapshot());
    assert_eq!(before.0, *revs.last().unwrap());
    drop(first);
    let again = open(h, Some(&seed()), UNLIMITED).await;
    assert_eq!((again.restored, again.seeded), (Some(before.0), false));
    assert_eq!(world_of(&again.store.snapshot()), before);
}

/// After the medium discarded its history, a reopened store holds the same
/// state, and following from before the compaction is refused, not a gap.
pub async fn recovery_after_compaction<H: StoreHarness>(h: &H) {
    let limits = Limits { compact_after: 2048, max_record: u32::MAX };
    let first = open(h, Some(&seed()), limits).await;
    let start = first.store.revision();
    mixed_changes(&first.store).await;
    for i in 0..200 {
        first.store.apply_acked(&set(i), "admin").await.unwrap();
    }
    h.compact(&first.store).await;
    let before = world_of(&first.store.snapshot());
    assert!(before.1.get("organization").is_some() && before.1.get("sessions").is_some(), "{}", before.1);
    drop(first);
    let again = open(h, None, limits).await;
    assert_eq!(world_of(&again.store.snapshot()), before);
    assert!(h.follow(&again.store, start).await.is_err(), "the history from revision {start} was compacted away");
    let rev = again.store.apply_acked(&set(1000), "admin").await.unwrap();
    assert!(rev > before.0);
}

/// Following the medium from a revision yields the changes after it, one
/// per acknowledged revision, in order; from the head, nothing.
pub async fn following<H: StoreHarness>(h: &H) {
    let opened = open(h, Some(&seed()), UNLIMITED).await;
    let s = &opened.store;
    let start = s.revision();
    let revs = mixed_changes(s).await;
    let all = h.follow(s, start).await.unwrap();
    assert_eq!(all.iter().map(|r| r.0).collect::<Vec<_>>(), revs);
    let later = h.follow(s, revs[3]).await.unwrap();
    assert_eq!(later.iter().map(|r| r.0).collect::<Vec<_>>(), revs[4..].to_vec());
    assert!(h.follow(s, s.revision()).await.unwrap().is_empty(), "nothing beyond the head");
    assert_eq!(all.last().unwrap().1, ROOT, "the tag operation's change names its principal");
    assert_eq!(all[0].1, "admin");
}

/// A change over the medium's limit is refused with the field and the
/// reason, leaves nothing behind, and the store carries on.
pub async fn oversize_change_leaves_nothing<H: StoreHarness>(h: &H) {
    let limits = Limits { compact_after: u64::MAX, max_record: 4096 };
    let opened = open(h, Some(&seed()), limits).await;
    let s = &opened.store;
    let before = world_of(&s.snapshot());
    let big: Vec<Value> =
        (0..200).map(|i| json!({"Effect": "Allow", "Action": format!("kms:Action{i:04}"), "Resource": "*"})).collect();
    let update = Update::PutPolicy { name: "Big".into(), document: json!({"Statement": big}) };
    let err = s.apply_acked(&update, "admin").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Validation, "{err}");
    assert!(err.message.starts_with("put_policy: ") && err.message.contains(H::TOO_LARGE), "{err}");
    assert_eq!(world_of(&s.snapshot()), before, "the refused change left the state as it was");
    let rev = s.apply_acked(&set(1), "admin").await.unwrap();
    let after = world_of(&s.snapshot());
    assert_eq!(h.follow(s, before.0).await.unwrap().iter().map(|r| r.0).collect::<Vec<_>>(), vec![rev], "nothing else written");
    drop(opened);
    let again = open(h, None, limits).await;
    assert_eq!((again.restored, world_of(&again.store.snapshot())), (Some(rev), after));
}

/// A failing medium: changes are refused (admin updates and tag
/// operations), reads go on from the last acknowledged state, and once it
/// works again a reopened store holds every acknowledged change, nothing of
/// the refused ones, and takes changes again.
pub async fn a_failing_store_refuses_then_recovers<H: StoreHarness>(h: &H) {
    let opened = open(h, Some(&seed()), UNLIMITED).await;
    let s = &opened.store;
    let mut acked = Vec::new();
    for i in 0..5 {
        acked.push(s.apply_acked(&set(i), "admin").await.unwrap());
    }
    let durable = world_of(&s.snapshot());
    h.fail().await;
    let err = s.apply_acked(&set(100), "admin").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::StorageFailed, "{err}");
    let refused = s.tag_acked(&tag("me")).await.unwrap_err();
    assert!(matches!(refused, TagError::Unavailable(_)), "{refused:?}");
    assert_eq!(world_of(&s.snapshot()), durable, "reads go on from the last acknowledged state");
    drop(opened);
    h.heal().await;
    let again = open(h, None, UNLIMITED).await;
    assert_eq!(again.restored, Some(*acked.last().unwrap()), "every acknowledged change is there");
    assert_eq!(world_of(&again.store.snapshot()), durable, "and no refused one");
    let rev = again.store.apply_acked(&set(300), "admin").await.unwrap();
    assert!(rev > durable.0);
}

/// Many callers changing one key at once through one store: every
/// acknowledged change has a revision of its own, is on the medium with
/// what it wrote, and the last one is what a reopened store holds.
pub async fn no_acknowledged_change_is_lost<H: StoreHarness>(h: &H) {
    let opened = open(h, Some(&seed()), UNLIMITED).await;
    let start = opened.store.revision();
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = opened.store.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..25 {
                let value = format!("w{w}-{i}");
                match store.tag_acked(&tag(&value)).await {
                    Ok(done) => acked.push((done.revision, value)),
                    // A fleet store may give up after its bounded retries:
                    // not acknowledged, and said so.
                    Err(TagError::Unavailable(reason)) if H::SHARED => assert!(reason.contains("gave up"), "{reason}"),
                    Err(e) => panic!("{e:?}"),
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    acked.sort();
    assert!(acked.len() * 10 >= 100 * 9, "most writes are acknowledged: {}", acked.len());
    if !H::SHARED {
        assert_eq!(acked.len(), 100, "one writer never gives up");
    }
    check_history(h, &opened.store, start, &acked).await;
    let newest = acked.last().unwrap().clone();
    drop(opened);
    let again = open(h, None, UNLIMITED).await;
    assert_eq!(again.restored, Some(newest.0));
    let tags = again.store.snapshot().target(KEY).unwrap().tags().clone();
    assert!(format!("{tags:?}").contains(&newest.1), "{tags:?} after {newest:?}");
}

/// Every acknowledged (revision, value) is on the medium at its revision,
/// and no two share one.
async fn check_history<H: StoreHarness>(h: &H, store: &Store, start: u64, acked: &[(u64, String)]) {
    let revisions: BTreeSet<u64> = acked.iter().map(|(r, _)| *r).collect();
    assert_eq!(revisions.len(), acked.len(), "every acknowledged change has a revision of its own");
    let history: BTreeMap<u64, Option<Vec<(String, String)>>> =
        h.follow(store, start).await.unwrap().into_iter().map(|(rev, _, tags)| (rev, tags)).collect();
    for (rev, value) in acked {
        let tags = history.get(rev).unwrap_or_else(|| panic!("acknowledged revision {rev} is not on the medium"));
        let tags = tags.as_ref().unwrap_or_else(|| panic!("revision {rev} did not set the tags"));
        assert!(tags.contains(&("Owner".to_string(), value.clone())), "revision {rev}: {tags:?}, wrote {value}");
    }
}

/// A second store on the same medium: refused while the first is open (a
/// single-writer backend), or (a shared one) both write the same key at
/// once and their changes are serialized: distinct revisions, one history
/// holding every acknowledged change, the same final state on both.
pub async fn a_second_writer_is_refused_or_serialized<H: StoreHarness>(h: &H) {
    let first = open(h, Some(&seed()), UNLIMITED).await;
    let start = first.store.revision();
    if !H::SHARED {
        match h.open(None, UNLIMITED).await {
            Err(OpenFailed::Locked(_)) => {}
            Err(OpenFailed::Other(e)) => panic!("refused for the wrong reason: {e}"),
            Ok(_) => panic!("a second writer opened a single-writer medium"),
        }
        first.store.apply_acked(&set(1), "admin").await.unwrap();
        assert!(matches!(h.open(None, UNLIMITED).await, Err(OpenFailed::Locked(_))), "still held");
        drop(first);
        let again = open(h, None, UNLIMITED).await;
        assert_eq!(again.store.snapshot().target(KEY).unwrap().tags().len(), 2, "released on close");
        return;
    }
    let second = open(h, Some(&seed()), UNLIMITED).await;
    assert!(!second.seeded && second.restored == Some(start), "the second found the first's state");
    let writer = |store: Arc<Store>, who: &'static str| async move {
        let mut acked = Vec::new();
        for i in 0..50 {
            let value = format!("{who}-{i}");
            match store.tag_acked(&tag(&value)).await {
                Ok(done) => acked.push((done.revision, value)),
                Err(TagError::Unavailable(reason)) => assert!(reason.contains("gave up"), "{reason}"),
                Err(e) => panic!("{e:?}"),
            }
        }
        acked
    };
    let (a, b) = tokio::join!(tokio::spawn(writer(first.store.clone(), "a")), tokio::spawn(writer(second.store.clone(), "b")));
    let mut acked: Vec<(u64, String)> = a.unwrap().into_iter().chain(b.unwrap()).collect();
    acked.sort();
    assert!(acked.len() * 10 >= 100 * 9, "most writes are acknowledged: {}", acked.len());
    check_history(h, &first.store, start, &acked).await;
    let newest = acked.last().unwrap().0;
    for s in [&first.store, &second.store] {
        s.snapshot_at_least(newest, std::time::Duration::from_secs(20)).await.unwrap();
    }
    assert_eq!(world_of(&first.store.snapshot()), world_of(&second.store.snapshot()), "one state on both");
}
