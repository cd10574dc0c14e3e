//! Fleet mode's shared store: etcd's v3 API over gRPC, with the client
//! generated from `proto/etcd/etcd.proto` (our own declaration of the part
//! of etcd's API we use, compiled by protox: no system `protoc`).
//!
//! [`Etcd`] implements the store's [`Shared`] trait (transactions guarded by
//! `mod_revision` compares), loads a prefix page by page at one revision,
//! and [`follow`] keeps a fleet store current: a watch from the revision
//! after the load, each transaction delivered whole, resumed from the last
//! applied revision after a disconnect, and a whole reload when etcd has
//! compacted past it; a probe reads the prefix's newest revision to measure
//! the lag and confirm the snapshot is current (its age is what health
//! compares with `--max-staleness`).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use tracing::{info, warn};

use crate::store::{CommitError, CommitFuture, Delivered, Guard, HistoryError, HistoryFuture, Op, Shared, Store, Txn, LOG_KEY};

/// The generated etcd client (`proto/etcd/etcd.proto`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::watch_client::WatchClient;

/// Keys read per page when loading a prefix.
const PAGE: i64 = 1000;
/// Largest etcd response accepted (a page of entities).
const MAX_RESPONSE: usize = 256 << 20;

/// `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    pub endpoints: Vec<String>,
    pub prefix: String,
}

impl FromStr for EtcdUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<EtcdUrl, String> {
        let rest = text
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("--store {text:?}: expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX"))?;
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return Err(format!("--store {text:?}: the key prefix is missing (etcd://HOST:PORT/PREFIX)"));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let valid = host.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !valid {
                return Err(format!("--store {text:?}: {host:?} is not HOST:PORT"));
            }
            endpoints.push(host.to_string());
        }
        Ok(EtcdUrl { endpoints, prefix: prefix.to_string() })
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}/{}", self.endpoints.join(","), self.prefix)
    }
}

/// TLS to etcd: the CA that signed etcd's certificate and, for etcd's
/// `--client-cert-auth`, a client certificate and key (all PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdTls {
    /// Any TLS flag was given.
    pub fn enabled(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    fn config(&self) -> Result<ClientTlsConfig, String> {
        let read = |flag: &str, path: &PathBuf| std::fs::read(path).map_err(|e| format!("{flag}: {}: {e}", path.display()));
        let mut config = ClientTlsConfig::new();
        match &self.ca {
            Some(ca) => {
                let pem = read("--etcd-ca", ca)?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!("--etcd-ca: {} holds no PEM certificate", ca.display()));
                }
                config = config.ca_certificate(Certificate::from_pem(pem));
            }
            None => return Err("--etcd-cert/--etcd-key: needs --etcd-ca (the CA bundle that signed etcd's certificate)".into()),
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(read("--etcd-cert", cert)?, read("--etcd-key", key)?))
            }
            (Some(_), None) => return Err("--etcd-cert: needs --etcd-key (the client certificate's private key)".into()),
            (None, Some(_)) => return Err("--etcd-key: needs --etcd-cert (the client certificate it belongs to)".into()),
            (None, None) => {}
        }
        Ok(config)
    }
}

/// The key after every key that starts with `key`.
fn range_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A connection to etcd, for one prefix.
#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    /// Watches that replay history for `Admin.Watch` run on a connection
    /// of their own: a slow reader there fills only that connection's
    /// flow-control window, never the one the follower's watch uses.
    history: WatchClient<Channel>,
    /// `PREFIX/`: every key of this fleet starts with it.
    root: String,
    place: String,
    timeout: Duration,
}

/// A prefix as loaded: its keys (relative), the revision of its newest
/// change and the etcd revision it was read at.
pub struct Loaded {
    pub entries: Vec<(String, Vec<u8>)>,
    pub revision: u64,
    pub read_at: u64,
}

fn unavailable(what: &str, status: &tonic::Status) -> String {
    format!("etcd {what}: {}: {}", crate::grpc::code_name(status.code()), status.message())
}

impl Etcd {
    /// A plaintext client for `url` (connecting lazily: etcd may come later).
    pub fn new(url: &EtcdUrl, timeout: Duration) -> Result<Etcd, String> {
        Etcd::with_tls(url, timeout, &EtcdTls::default())
    }

    /// A client for `url`, over TLS when `tls` says so.
    pub fn with_tls(url: &EtcdUrl, timeout: Duration, tls: &EtcdTls) -> Result<Etcd, String> {
        let config = tls.enabled().then(|| tls.config()).transpose()?;
        let scheme = if config.is_some() { "https" } else { "http" };
        let mut endpoints = Vec::new();
        for e in &url.endpoints {
            let mut endpoint =
                Endpoint::from_shared(format!("{scheme}://{e}")).map_err(|err| format!("--store: {e:?}: {err}"))?;
            if let Some(config) = &config {
                endpoint = endpoint.tls_config(config.clone()).map_err(|err| format!("--etcd-ca/--etcd-cert: {err}"))?;
            }
            let endpoint = endpoint
                .connect_timeout(timeout)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(true);
            endpoints.push(endpoint);
        }
        let connect = |endpoints: Vec<Endpoint>| match endpoints.as_slice() {
            [one] => one.connect_lazy(),
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        let history = connect(endpoints.clone());
        let channel = connect(endpoints);
        Ok(Etcd {
            kv: KvClient::new(channel.clone()).max_decoding_message_size(MAX_RESPONSE),
            watch: WatchClient::new(channel).max_decoding_message_size(MAX_RESPONSE),
            history: WatchClient::new(history).max_decoding_message_size(MAX_RESPONSE),
            root: format!("{}/", url.prefix),
            place: url.to_string(),
            timeout,
        })
    }

    fn key(&self, rel: &str) -> Vec<u8> {
        format!("{}{rel}", self.root).into_bytes()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.set_timeout(self.timeout);
        r
    }

    /// The whole prefix at one revision, page by page.
    pub async fn load(&self) -> Result<Loaded, String> {
        let root = self.root.as_bytes().to_vec();
        let end = range_end(&root);
        let mut entries = Vec::new();
        let mut from = root.clone();
        let mut read_at = 0i64;
        let mut revision = 0u64;
        loop {
            let req = pb::RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: PAGE,
                revision: read_at,
                ..Default::default()
            };
            let resp = self.kv.clone().range(self.request(req)).await.map_err(|s| unavailable("range", &s))?.into_inner();
            if read_at == 0 {
                read_at = resp.header.as_ref().map_or(0, |h| h.revision);
            }
            let last = resp.kvs.last().map(|kv| kv.key.clone());
            for kv in resp.kvs {
                let rel = String::from_utf8_lossy(&kv.key[root.len().min(kv.key.len())..]).into_owned();
                if rel == LOG_KEY {
                    revision = kv.mod_revision.max(0) as u64;
                }
                entries.push((rel, kv.value));
            }
            match (resp.more, last) {
                (true, Some(mut key)) => {
                    key.push(0);
                    from = key;
                }
                _ => break,
            }
        }
        Ok(Loaded { entries, revision, read_at: read_at.max(0) as u64 })
    }

    /// The revision of the newest change on the prefix (0: none yet).
    pub async fn newest(&self) -> Result<u64, String> {
        let req = pb::RangeRequest { key: self.key(LOG_KEY), ..Default::default() };
        let resp = self.kv.clone().range(self.request(req)).await.map_err(|s| unavailable("range", &s))?.into_inner();
        Ok(resp.kvs.first().map_or(0, |kv| kv.mod_revision.max(0) as u64))
    }

    /// Compacts etcd's history up to `revision` (tests, tools).
    pub async fn compact(&self, revision: u64) -> Result<(), String> {
        let req = pb::CompactionRequest { revision: revision as i64, physical: true };
        self.kv.clone().compact(self.request(req)).await.map_err(|s| unavailable("compact", &s))?;
        Ok(())
    }

    fn compare(&self, guard: &Guard) -> pb::Compare {
        use pb::compare::{CompareResult, CompareTarget, TargetUnion};
        let (result, target, key, union, range) = match guard {
            Guard::Unchanged { key, since } => {
                (CompareResult::Less, CompareTarget::Mod, self.key(key), TargetUnion::ModRevision(*since as i64 + 1), Vec::new())
            }
            Guard::DirUnchanged { dir, since } => {
                let key = self.key(dir);
                let end = range_end(&key);
                (CompareResult::Less, CompareTarget::Mod, key, TargetUnion::ModRevision(*since as i64 + 1), end)
            }
            Guard::Exists { key } => {
                (CompareResult::Greater, CompareTarget::Version, self.key(key), TargetUnion::Version(0), Vec::new())
            }
            Guard::Missing { key } => {
                (CompareResult::Equal, CompareTarget::Create, self.key(key), TargetUnion::CreateRevision(0), Vec::new())
            }
        };
        pb::Compare { result: result as i32, target: target as i32, key, target_union: Some(union), range_end: range }
    }

    fn txn_request(&self, txn: &Txn) -> pb::TxnRequest {
        use pb::request_op::Request;
        let success = txn
            .ops
            .iter()
            .map(|op| pb::RequestOp {
                request: Some(match op {
                    Op::Put { key, value } => {
                        Request::RequestPut(pb::PutRequest { key: self.key(key), value: value.clone(), ..Default::default() })
                    }
                    Op::Delete { key } => {
                        Request::RequestDeleteRange(pb::DeleteRangeRequest { key: self.key(key), ..Default::default() })
                    }
                }),
            })
            .collect();
        // When a guard fails: the prefix's newest revision, to catch up to.
        let failure = vec![pb::RequestOp {
            request: Some(Request::RequestRange(pb::RangeRequest { key: self.key(LOG_KEY), ..Default::default() })),
        }];
        pb::TxnRequest { compare: txn.guards.iter().map(|g| self.compare(g)).collect(), success, failure }
    }
}

impl Shared for Etcd {
    fn commit(&self, txn: Txn) -> CommitFuture {
        let request = self.request(self.txn_request(&txn));
        let mut kv = self.kv.clone();
        Box::pin(async move {
            let resp = match kv.txn(request).await {
                Ok(r) => r.into_inner(),
                // etcd's "too many operations" and "request too large".
                Err(s) if s.code() == Code::InvalidArgument => return Err(CommitError::Refused(s.message().to_string())),
                Err(s) => return Err(CommitError::Unavailable(unavailable("txn", &s))),
            };
            let revision = resp.header.as_ref().map_or(0, |h| h.revision.max(0) as u64);
            if resp.succeeded {
                return Ok(revision);
            }
            let current = resp
                .responses
                .first()
                .and_then(|r| match &r.response {
                    Some(pb::response_op::Response::ResponseRange(range)) => range.kvs.first().map(|kv| kv.mod_revision),
                    _ => None,
                })
                .unwrap_or(0);
            Err(CommitError::Conflict { current: current.max(0) as u64 })
        })
    }

    fn place(&self) -> String {
        self.place.clone()
    }

    fn history(&self, from: u64, until: u64) -> HistoryFuture {
        let etcd = self.clone();
        Box::pin(async move { etcd.read_history(from, until).await })
    }
}

impl Etcd {
    /// A watch of the prefix from revision `from`, read until revision
    /// `until` (a past one): etcd replays what it retains. Answers once etcd
    /// has said whether it retains `from` (its first answer after the
    /// watch is created: events, or the compaction); then a task forwards
    /// the transactions, each whole, and ends with the one at `until`, or
    /// as soon as the receiver is dropped.
    async fn read_history(&self, from: u64, until: u64) -> Result<crate::store::History, HistoryError> {
        let (requests, mut stream) =
            self.open_watch(&self.history, from).await.map_err(|s| HistoryError::Unavailable(unavailable("watch", &s)))?;
        let first = loop {
            let next = tokio::time::timeout(self.timeout, stream.message()).await;
            let resp = match next {
                Err(_) => {
                    return Err(HistoryError::Unavailable(format!("etcd did not answer the watch within {:?}", self.timeout)))
                }
                Ok(Err(s)) => return Err(HistoryError::Unavailable(unavailable("watch", &s))),
                Ok(Ok(None)) => return Err(HistoryError::Unavailable("etcd closed the watch".into())),
                Ok(Ok(Some(resp))) => resp,
            };
            if resp.compact_revision > 0 {
                return Err(HistoryError::Compacted { oldest: resp.compact_revision.max(0) as u64 });
            }
            if resp.canceled {
                return Err(HistoryError::Unavailable(format!("etcd canceled the watch: {}", resp.cancel_reason)));
            }
            if !resp.events.is_empty() {
                break resp;
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let root_len = self.root.len();
        tokio::spawn(async move {
            // etcd ends a watch whose request stream is closed.
            let _requests = requests;
            let mut resp = first;
            loop {
                for batch in batches(root_len, resp.events) {
                    if batch.revision > until {
                        return;
                    }
                    let last = batch.revision == until;
                    if tx.send(Ok(batch)).await.is_err() || last {
                        return;
                    }
                }
                let next = tokio::select! {
                    next = stream.message() => next,
                    _ = tx.closed() => return,
                };
                resp = match next {
                    Ok(Some(r)) if r.compact_revision > 0 => {
                        let _ = tx.send(Err(format!("etcd compacted past revision {} meanwhile", r.compact_revision))).await;
                        return;
                    }
                    Ok(Some(r)) if r.canceled => {
                        let _ = tx.send(Err(format!("etcd canceled the watch: {}", r.cancel_reason))).await;
                        return;
                    }
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        let _ = tx.send(Err("etcd closed the watch".into())).await;
                        return;
                    }
                    Err(s) => {
                        let _ = tx.send(Err(unavailable("watch", &s))).await;
                        return;
                    }
                };
            }
        });
        Ok(rx)
    }

    /// A watch of the whole prefix from revision `from`: the sender that
    /// keeps it open, and etcd's answers.
    async fn open_watch(
        &self,
        client: &WatchClient<Channel>,
        from: u64,
    ) -> Result<(mpsc::Sender<pb::WatchRequest>, tonic::Streaming<pb::WatchResponse>), tonic::Status> {
        let root = self.root.as_bytes().to_vec();
        let create = pb::WatchCreateRequest {
            key: root.clone(),
            range_end: range_end(&root),
            start_revision: from as i64,
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel(1);
        let first = pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)) };
        tx.send(first).await.map_err(|_| tonic::Status::internal("cannot start the watch"))?;
        let stream = client.clone().watch(ReceiverStream::new(rx)).await?.into_inner();
        Ok((tx, stream))
    }
}

/// The events of one watch answer as transactions: the events of one
/// revision are one transaction, delivered whole. Keys lose the prefix's
/// `root_len` bytes.
fn batches(root_len: usize, events: Vec<pb::Event>) -> Vec<Delivered> {
    let mut out: Vec<Delivered> = Vec::new();
    for event in events {
        let Some(kv) = event.kv else { continue };
        let revision = kv.mod_revision.max(0) as u64;
        if out.last().is_none_or(|b| b.revision != revision) {
            out.push(Delivered { revision, ..Delivered::default() });
        }
        let Some(b) = out.last_mut() else { continue };
        let rel = String::from_utf8_lossy(&kv.key[root_len.min(kv.key.len())..]).into_owned();
        if event.r#type == pb::event::EventType::Delete as i32 {
            b.deletes.push(rel);
        } else {
            b.puts.push((rel, kv.value));
        }
    }
    out
}

/// The tasks that keep a fleet store current. Dropping it leaves them
/// running (a sidecar follows until it exits); [`Follower::stop`] ends them.
pub struct Follower {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Follower {
    /// Stops following (tests that close a store and open another).
    pub fn stop(self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Keeps `store` current from `etcd`: the watch from `from` (the revision
/// after the load), and the probe every `probe`.
pub fn follow(etcd: Etcd, store: Arc<Store>, from: u64, probe: Duration) -> Follower {
    let (watcher, watched) = (etcd.clone(), store.clone());
    let watching = tokio::spawn(async move { watch_loop(watcher, watched, from).await });
    let probing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(probe);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Ok(newest) = etcd.newest().await {
                store.confirm(newest);
            }
            metrics::gauge!(crate::observe::REVISION_LAG).set(store.revision_lag() as f64);
        }
    });
    Follower { tasks: vec![watching, probing] }
}

/// Why one watch stream ended.
enum Ended {
    /// etcd no longer has the history after the last applied revision.
    Compacted(i64),
    Failed(String),
}

async fn watch_loop(etcd: Etcd, store: Arc<Store>, mut from: u64) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match watch_once(&etcd, &store, &mut from).await {
            Ended::Compacted(oldest) => {
                warn!(from, oldest, "etcd compacted past the last applied revision: reloading the prefix");
                match etcd.load().await {
                    Ok(loaded) => match store.reload(&loaded.entries, loaded.revision) {
                        Ok(()) => {
                            info!(revision = loaded.revision, "reloaded the prefix");
                            from = loaded.read_at + 1;
                            backoff = Duration::from_millis(50);
                            continue;
                        }
                        Err(e) => warn!(error = %e, "the reloaded prefix does not load"),
                    },
                    Err(e) => warn!(error = %e, "cannot reload the prefix"),
                }
            }
            Ended::Failed(e) => {
                if store.stuck().is_some() {
                    // Serving the last whole state; nothing more to follow.
                    return;
                }
                warn!(error = %e, from, "the etcd watch ended; resuming from the last applied revision");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn watch_once(etcd: &Etcd, store: &Store, from: &mut u64) -> Ended {
    let (_requests, mut stream) = match etcd.open_watch(&etcd.watch, *from).await {
        Ok(opened) => opened,
        Err(s) => return Ended::Failed(unavailable("watch", &s)),
    };
    // `_requests` stays open while the watch runs: etcd ends a watch whose
    // request stream is closed.
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return Ended::Failed("etcd closed the watch".into()),
            Err(s) => return Ended::Failed(unavailable("watch", &s)),
        };
        if resp.compact_revision > 0 {
            return Ended::Compacted(resp.compact_revision);
        }
        if resp.canceled {
            return Ended::Failed(format!("etcd canceled the watch: {}", resp.cancel_reason));
        }
        for done in batches(etcd.root.len(), resp.events) {
            if let Err(e) = deliver(store, done, from) {
                return Ended::Failed(e);
            }
        }
    }
}

fn deliver(store: &Store, delivered: Delivered, from: &mut u64) -> Result<(), String> {
    let revision = delivered.revision;
    store.deliver(delivered)?;
    *from = revision + 1;
    Ok(())
}

/// Connects, seeds an empty prefix from `seed` (one transaction: the first
/// sidecar to commit it seeds, the others find it seeded), loads the
/// prefix and returns what to open the store with. While etcd cannot be
/// reached this is tried again, with back-off, for up to `wait` (a fleet
/// often starts before its etcd is ready); what retrying cannot fix (a bad
/// flag, a world file that does not build, a seed etcd refuses) fails at
/// once, and so does an outage that outlasts `wait`, with its reason.
pub async fn connect(
    url: &EtcdUrl,
    timeout: Duration,
    tls: &EtcdTls,
    seed: Option<&crate::world::WorldSpec>,
    node: &str,
    wait: Duration,
) -> Result<(Etcd, Loaded), String> {
    let etcd = Etcd::with_tls(url, timeout, tls)?;
    let seed = seed
        .map(|world| crate::store::seed_transaction(world, "world-file", node).map_err(|e| format!("the world file: {e}")))
        .transpose()?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 1u32;
    loop {
        let error = match seed_and_load(&etcd, url, seed.clone()).await {
            Ok(loaded) => return Ok((etcd, loaded)),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Unreachable(e)) => e,
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(if wait.is_zero() { error } else { format!("{error} (still unreachable after {wait:?} of trying)") });
        }
        warn!(error = %error, attempt, "etcd is not reachable yet; trying again (--etcd-start-wait)");
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        attempt += 1;
    }
}

/// How one start-up attempt failed.
enum Attempt {
    /// etcd could not be reached or did not answer: worth another try.
    Unreachable(String),
    Fatal(String),
}

/// What to say when etcd refused a seeding transaction of `ops` writes:
/// the whole world goes in one transaction, so etcd's limits must fit it.
fn seed_refused(e: &CommitError, ops: usize) -> String {
    format!(
        "{e} (the world is seeded in one transaction of {ops} operations and its size; etcd must allow that much: \
         --max-txn-ops, 128 by default, and --max-request-bytes)"
    )
}

async fn seed_and_load(etcd: &Etcd, url: &EtcdUrl, seed: Option<Txn>) -> Result<Loaded, Attempt> {
    if let Some(txn) = seed {
        let ops = txn.ops.len();
        match etcd.commit(txn).await {
            Ok(revision) => info!(revision, store = %url, "seeded the empty prefix from the world file"),
            Err(CommitError::Conflict { current }) => {
                info!(revision = current, store = %url, "the prefix already holds state, so the world file is not applied")
            }
            Err(e @ CommitError::Unavailable(_)) => {
                return Err(Attempt::Unreachable(format!("{url}: cannot seed the prefix: {e}")))
            }
            Err(e @ CommitError::Refused(_)) => {
                return Err(Attempt::Fatal(format!("{url}: cannot seed the prefix: {}", seed_refused(&e, ops))))
            }
        }
    }
    etcd.load().await.map_err(|e| Attempt::Unreachable(format!("{url}: cannot load the prefix: {e}")))
}

/// `tagward export --store`: the prefix's state as a world file, to
/// `output` or standard output.
pub async fn export(url: &EtcdUrl, tls: &EtcdTls, output: Option<&std::path::Path>) -> Result<(), String> {
    let etcd = Etcd::with_tls(url, Duration::from_secs(5), tls)?;
    let loaded = etcd.load().await.map_err(|e| format!("{url}: {e}"))?;
    let state = crate::store::load_state(&loaded.entries, loaded.revision).map_err(|e| format!("{url}: {e}"))?;
    let text = serde_json::to_string_pretty(&crate::world::WorldSpec::from_state(&state))
        .map_err(|e| format!("cannot encode the state: {e}"))?
        + "\n";
    match output {
        Some(path) => std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?,
        None => std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()).map_err(|e| e.to_string())?,
    }
    eprintln!("exported revision {} of {url}", state.revision());
    Ok(())
}

/// `tagward import --store`: loads `world` into an empty prefix (one
/// transaction that commits only if no change was ever made there).
pub async fn import(url: &EtcdUrl, tls: &EtcdTls, world: &crate::world::WorldSpec, file: &std::path::Path) -> Result<(), String> {
    let etcd = Etcd::with_tls(url, Duration::from_secs(5), tls)?;
    let txn =
        crate::store::seed_transaction(world, "import", "tagward-import").map_err(|e| format!("{}: {e}", file.display()))?;
    let ops = txn.ops.len();
    match etcd.commit(txn).await {
        Ok(revision) => {
            eprintln!("imported {} into {url} at revision {revision}", file.display());
            Ok(())
        }
        Err(CommitError::Conflict { current }) => Err(format!(
            "{url}: the prefix already holds state (its newest change is revision {current}); import loads an empty prefix only"
        )),
        Err(e @ CommitError::Refused(_)) => Err(format!("{url}: cannot import: {}", seed_refused(&e, ops))),
        Err(e) => Err(format!("{url}: cannot import: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_name_endpoints_and_a_prefix() {
        let url: EtcdUrl = "etcd://10.0.0.1:2379,etcd-1.etcd:2379/fleet/prod".parse().unwrap();
        assert_eq!(url.endpoints, vec!["10.0.0.1:2379".to_string(), "etcd-1.etcd:2379".to_string()]);
        assert_eq!(url.prefix, "fleet/prod");
        assert_eq!(url.to_string(), "etcd://10.0.0.1:2379,etcd-1.etcd:2379/fleet/prod");
        for (bad, says) in [
            ("http://127.0.0.1:2379/x", "expected etcd://"),
            ("etcd://127.0.0.1:2379", "prefix is missing"),
            ("etcd://127.0.0.1:2379/", "prefix is missing"),
            ("etcd://127.0.0.1/x", "is not HOST:PORT"),
            ("etcd://127.0.0.1:99999/x", "is not HOST:PORT"),
            ("etcd://a:1,,b:2/x", "is not HOST:PORT"),
        ] {
            let err = bad.parse::<EtcdUrl>().unwrap_err();
            assert!(err.contains(says) && err.starts_with("--store"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_range_end_covers_exactly_the_prefix() {
        assert_eq!(range_end(b"fleet/"), b"fleet0".to_vec());
        assert_eq!(range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(range_end(b"\xff\xff"), vec![0]);
    }
}
