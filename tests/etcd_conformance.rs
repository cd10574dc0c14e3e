//! The store-level half of the storage conformance suite
//! (`crates/tagward-store/tests/store_suite/mod.rs`, whose header says what
//! it covers and `conformance.rs` which backend-level properties do not
//! apply to etcd, and why) run for fleet mode: each property against stores
//! opened the way `tagward serve --store etcd://...` opens them (seeded by
//! one transaction, loaded at one revision, followed by a watch), on a real
//! etcd of its own on loopback. Where `etcd` is not on the PATH each test
//! says loudly that it did not run (under `CI=true` that is a failure).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test stops loudly

mod common;
#[path = "../crates/tagward-store/tests/store_suite/mod.rs"]
#[macro_use]
mod store_suite;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::etcd::{self, Etcd};
use common::Scratch;
use store_suite::{Followed, Limits, OpenFailed, Opened, StoreHarness, KEY};
use tagward::grpc::etcd::{connect, follow, EtcdTls, EtcdUrl};
use tagward_core::world::WorldSpec;
use tagward_store::store::{delivered_events, Durability, EventKind, LogEntry, Shared, Store, LOG_KEY};

const PREFIX: &str = "conformance";

/// A fleet on one etcd, started on the first open with that open's limit
/// on a transaction's size (`--max-request-bytes`).
struct EtcdStores {
    scratch: Scratch,
    etcd: tokio::sync::Mutex<Option<(Etcd, u32)>>,
    nodes: AtomicU64,
}

impl EtcdStores {
    fn new(name: &str) -> EtcdStores {
        EtcdStores {
            scratch: Scratch::new(&format!("etcd-conformance-{name}")),
            etcd: Default::default(),
            nodes: AtomicU64::new(0),
        }
    }

    /// The etcd, started if need be; its URL and a client.
    async fn etcd(&self, max_record: u32) -> (EtcdUrl, tagward::grpc::etcd::Etcd) {
        let mut etcd = self.etcd.lock().await;
        if etcd.is_none() {
            let limit = format!("--max-request-bytes={max_record}");
            let args: Vec<&str> = if max_record == u32::MAX { Vec::new() } else { vec![&limit] };
            *etcd = Some((Etcd::start_args(self.scratch.path(), &args).await, max_record));
        }
        let (etcd, limit) = etcd.as_ref().unwrap();
        assert_eq!(*limit, max_record, "one etcd, one limit: a property opens with the same limits each time");
        (etcd.url(PREFIX).parse().unwrap(), etcd.client_for(PREFIX))
    }

    async fn client(&self) -> tagward::grpc::etcd::Etcd {
        let etcd = self.etcd.lock().await;
        etcd.as_ref().expect("etcd was started by an open").0.client_for(PREFIX)
    }
}

impl StoreHarness for EtcdStores {
    const SHARED: bool = true;
    const TOO_LARGE: &'static str = "request is too large";

    async fn open(&self, seed: Option<&WorldSpec>, limits: Limits) -> Result<Opened, OpenFailed> {
        let (url, client) = self.etcd(limits.max_record).await;
        let was_empty = client.newest().await.map_err(OpenFailed::Other)? == 0;
        let node = format!("node-{}", self.nodes.fetch_add(1, Ordering::Relaxed));
        let (client, loaded) = connect(&url, Duration::from_secs(2), &EtcdTls::default(), seed, &node, Duration::ZERO)
            .await
            .map_err(OpenFailed::Other)?;
        let options = Durability { compact_after_bytes: u64::MAX, event_capacity: 64 };
        let store = Store::open_shared(Arc::new(client.clone()), &loaded.entries, loaded.revision, &options, None, &node)
            .map_err(|e| OpenFailed::Other(e.to_string()))?;
        let follower = follow(client, store.clone(), loaded.read_at + 1, Duration::from_millis(250));
        let seeded = seed.is_some() && was_empty;
        Ok(Opened {
            store,
            restored: (!seeded && loaded.revision > 0).then_some(loaded.revision),
            seeded,
            on_close: Some(Box::new(move || follower.stop())),
        })
    }

    /// etcd's own history of the prefix (a watch from `from + 1` through the
    /// prefix's newest change), whatever the store holds.
    async fn follow(&self, _store: &Store, from: u64) -> Result<Vec<Followed>, String> {
        let client = self.client().await;
        let newest = client.newest().await?;
        if from >= newest {
            return Ok(Vec::new());
        }
        let mut history = client.history(from + 1, newest).await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(delivered) = history.recv().await {
            let delivered = delivered?;
            let (_, log) = delivered.puts.iter().find(|(k, _)| k == LOG_KEY).ok_or("a transaction without its log entry")?;
            let entry: LogEntry = serde_json::from_slice(log).map_err(|e| e.to_string())?;
            let tags = delivered_events(&delivered)?.into_iter().find_map(|e| match e.kind {
                EventKind::Tags { resource, after, .. } if resource == KEY => Some(after),
                _ => None,
            });
            out.push((delivered.revision, entry.actor, tags));
        }
        Ok(out)
    }

    async fn compact(&self, store: &Store) {
        self.client().await.compact(store.revision()).await.unwrap();
    }

    async fn fail(&self) {
        self.etcd.lock().await.as_mut().expect("etcd runs").0.kill9();
    }

    async fn heal(&self) {
        self.etcd.lock().await.as_mut().expect("etcd was started").0.restart().await;
    }
}

macro_rules! etcd_conformance {
    ($($property:ident),* $(,)?) => {
        $(#[tokio::test(flavor = "multi_thread")] async fn $property() {
            if !etcd::available(concat!("etcd_conformance::", stringify!($property))) {
                return;
            }
            store_suite::$property(&EtcdStores::new(stringify!($property))).await;
        })*
    };
}

every_store_property!(etcd_conformance);
