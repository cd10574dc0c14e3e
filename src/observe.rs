//! Metrics names and helpers, and the optional decision log.
//!
//! Metrics go through the `metrics` facade: without an installed recorder
//! (tests, `tagward test`) every call is a no-op; `tagward serve` installs
//! the Prometheus exporter on its own port. Labels stay bounded: results,
//! reasons, RPC names, error codes; never a principal or a resource.
//!
//! The decision log is a bounded queue in front of a writer task: offering a
//! record never waits, and what does not fit is dropped and counted.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;

use crate::engine::{Decision, Request};
pub use tagward_store::observe::*;

pub const DECISIONS: &str = "tagward_decisions_total";
pub const RPC_DURATION: &str = "tagward_rpc_duration_seconds";
pub const RPCS: &str = "tagward_rpc_total";
pub const DECISION_LOG_DROPPED: &str = "tagward_decision_log_dropped_total";
pub const BUILD_INFO: &str = "tagward_build_info";
pub const WATCH_STREAMS: &str = "tagward_watch_streams";
pub const DECISION_CACHE: &str = "tagward_decision_cache_total";

/// The RPCs whose `rpc` series exist from start-up (at 0): the data
/// plane's and the admin streams; the KMS operations' appear with their
/// first call. The first entries of [`OBSERVED_RPCS`].
pub const RPC_NAMES: &[&str] = OBSERVED_RPCS.split_at(9).0;

/// Buckets for RPC latency, from 25 µs to 2.5 s.
pub const RPC_BUCKETS: &[f64] =
    &[0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5];

/// Counts a decision by result and reason.
pub fn decision(d: &Decision) {
    let result = if d.allowed() { "allow" } else { "deny" };
    metrics::counter!(DECISIONS, "result" => result, "reason" => d.reason.as_str()).increment(1);
}

/// Records an RPC's latency and outcome (`code`: a gRPC code name).
pub fn rpc(name: &'static str, started: Instant, code: &'static str) {
    metrics::histogram!(RPC_DURATION, "rpc" => name).record(started.elapsed().as_secs_f64());
    metrics::counter!(RPCS, "rpc" => name, "code" => code).increment(1);
}

/// Counts one open `Admin.Watch` stream in `tagward_watch_streams` for as
/// long as it lives.
pub struct WatchStreamGauge(());

impl WatchStreamGauge {
    pub fn open() -> WatchStreamGauge {
        metrics::gauge!(WATCH_STREAMS).increment(1.0);
        WatchStreamGauge(())
    }
}

impl Drop for WatchStreamGauge {
    fn drop(&mut self) {
        metrics::gauge!(WATCH_STREAMS).decrement(1.0);
    }
}

/// Every RPC the handlers observe (the data plane's, the admin streams, the
/// KMS ones), as the `rpc` label names them: [`Meters`] keeps handles for
/// these. The first nine are [`RPC_NAMES`].
const OBSERVED_RPCS: &[&str] = &[
    "Authorize",
    "BatchAuthorize",
    "TagResource",
    "UntagResource",
    "ListResourceTags",
    "GetResources",
    "Apply",
    "Export",
    "Watch",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "ListAliases",
    "CreateGrant",
    "RetireGrant",
    "RevokeGrant",
    "ListGrants",
];

/// The `code` labels an RPC is counted under (the gRPC code names the
/// handlers answer with, and `OTHER`): at most this many per RPC.
pub const CODE_LABELS: usize = 16;

/// The series of one RPC.
struct RpcMeters {
    duration: OnceLock<metrics::Histogram>,
    codes: [OnceLock<metrics::Counter>; CODE_LABELS],
}

/// Handles on the request path's series, each registered with the
/// recorder the first time it is used and kept: the `metrics` macros with
/// labels that are not literals build a key (a vector of labels) and look
/// it up in the recorder's registry on every call, which a handle skips.
/// A series appears when it is first recorded, as with the macros, so the
/// exposition is the same; an RPC name or code outside the tables goes
/// through the macros. Make it after the recorder is installed (`serve`
/// installs the exporter before it starts the listeners): a handle taken
/// without a recorder records nothing.
pub struct Meters {
    rpcs: Vec<RpcMeters>,
    /// By allowed/denied and reason.
    decisions: [OnceLock<metrics::Counter>; 6],
    /// Decision-cache lookups: hits, misses.
    cache: [OnceLock<metrics::Counter>; 2],
}

impl Default for Meters {
    fn default() -> Meters {
        Meters::new()
    }
}

impl Meters {
    pub fn new() -> Meters {
        Meters {
            rpcs: OBSERVED_RPCS
                .iter()
                .map(|_| RpcMeters { duration: OnceLock::new(), codes: std::array::from_fn(|_| OnceLock::new()) })
                .collect(),
            decisions: std::array::from_fn(|_| OnceLock::new()),
            cache: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// Counts a decision by result and reason, as [`decision`] does.
    pub fn decision(&self, d: &Decision) {
        self.reason(d.reason);
    }

    /// Counts a decision known by its reason (allowed exactly when the
    /// reason is `ALLOWED`).
    pub fn reason(&self, reason: crate::engine::Reason) {
        let allowed = reason == crate::engine::Reason::Allowed;
        let index = match reason {
            crate::engine::Reason::Allowed => 0,
            crate::engine::Reason::ExplicitDeny => 1,
            crate::engine::Reason::ImplicitDeny => 2,
        };
        let slot = &self.decisions[index * 2 + usize::from(allowed)];
        slot.get_or_init(|| {
            let result = if allowed { "allow" } else { "deny" };
            metrics::counter!(DECISIONS, "result" => result, "reason" => reason.as_str())
        })
        .increment(1);
    }

    /// Counts a decision-cache lookup (only requests the cache could
    /// answer are looked up: see `grpc::decisions`).
    pub fn decision_cache(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.cache[usize::from(!hit)].get_or_init(|| metrics::counter!(DECISION_CACHE, "result" => result)).increment(1);
    }

    /// Records an RPC's latency and outcome, as [`rpc`] does; `code` is the
    /// label's index (below [`CODE_LABELS`]) and `code_name` the label.
    pub fn rpc(&self, name: &'static str, elapsed: Duration, code: usize, code_name: &'static str) {
        let Some(m) = OBSERVED_RPCS.iter().position(|n| *n == name).and_then(|i| self.rpcs.get(i)) else {
            metrics::histogram!(RPC_DURATION, "rpc" => name).record(elapsed.as_secs_f64());
            metrics::counter!(RPCS, "rpc" => name, "code" => code_name).increment(1);
            return;
        };
        m.duration.get_or_init(|| metrics::histogram!(RPC_DURATION, "rpc" => name)).record(elapsed.as_secs_f64());
        match m.codes.get(code) {
            Some(slot) => slot.get_or_init(|| metrics::counter!(RPCS, "rpc" => name, "code" => code_name)).increment(1),
            None => metrics::counter!(RPCS, "rpc" => name, "code" => code_name).increment(1),
        }
    }
}

/// Which decisions the decision log keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    All,
    DeniesOnly,
    /// One decision in N.
    Sample(u64),
}

/// Where decisions are logged, and which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionLogConfig {
    pub path: std::path::PathBuf,
    pub mode: LogMode,
    /// Records that may wait to be written; more are dropped (and counted).
    pub queue: usize,
}

/// What `serve` observes beyond its logs: the decision log and the
/// Prometheus listener, each off when `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub decision_log: Option<DecisionLogConfig>,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The optional decision log.
#[derive(Clone)]
pub struct DecisionLog {
    tx: mpsc::Sender<serde_json::Value>,
    mode: LogMode,
    seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl DecisionLog {
    /// Starts the writer task (in the current tokio runtime) appending JSON
    /// lines to `path`; at most `capacity` records wait in the queue.
    pub fn start(path: &Path, mode: LogMode, capacity: usize) -> std::io::Result<DecisionLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(capacity.max(1));
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::new(file);
            while let Some(record) = rx.blocking_recv() {
                let mut line = record.to_string();
                line.push('\n');
                let written = out.write_all(line.as_bytes()).and_then(|_| if rx.is_empty() { out.flush() } else { Ok(()) });
                if let Err(e) = written {
                    tracing::warn!(file = %path.display(), error = %e, "cannot write the decision log");
                }
            }
            let _ = out.flush();
        });
        Ok(DecisionLog { tx, mode, seen: Default::default() })
    }

    /// Offers a decision; never waits. Dropped records are counted.
    pub fn offer(&self, req: &Request, d: &Decision, revision: u64, took: Duration) {
        let keep = match self.mode {
            LogMode::All => true,
            LogMode::DeniesOnly => !d.allowed(),
            LogMode::Sample(n) => self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(n.max(1)),
        };
        if !keep {
            return;
        }
        let record = json!({
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "principal": req.principal,
            "action": req.action,
            "resource": req.resource,
            "decision": if d.allowed() { "Allow" } else { "Deny" },
            "reason": d.reason.as_str(),
            "matched": d.matched.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "missing_keys": d.missing_keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            "revision": revision,
            "micros": took.as_micros() as u64,
        });
        if self.tx.try_send(record).is_err() {
            metrics::counter!(DECISION_LOG_DROPPED).increment(1);
        }
    }
}

/// Why the Prometheus exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error("the latency buckets: {0}")]
    Buckets(metrics_exporter_prometheus::BuildError),
    #[error("cannot serve metrics on {addr}: {error}")]
    Install { addr: std::net::SocketAddr, error: metrics_exporter_prometheus::BuildError },
}

/// Installs the Prometheus exporter with its own HTTP listener (`/metrics`).
pub fn install_exporter(addr: std::net::SocketAddr) -> Result<(), ExporterError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(RPC_DURATION.to_string()), RPC_BUCKETS)
        .map_err(ExporterError::Buckets)?
        .install()
        .map_err(|error| ExporterError::Install { addr, error })?;
    metrics::describe_counter!(DECISIONS, "Authorization decisions by result and reason");
    metrics::describe_counter!(DECISION_CACHE, "Decision-cache lookups by result (hit, miss)");
    metrics::describe_histogram!(RPC_DURATION, metrics::Unit::Seconds, "Latency of each gRPC call");
    metrics::describe_counter!(RPCS, "gRPC calls by method and status code");
    metrics::describe_counter!(ADMIN_UPDATES, "Admin updates applied and rejected");
    metrics::describe_counter!(TAG_CHANGES, "Tag changes published, by origin");
    metrics::describe_counter!(DECISION_LOG_DROPPED, "Decision-log records dropped because the queue was full");
    metrics::describe_counter!(AUDIT_FAILURES, "Audit writes that failed (the change was refused)");
    metrics::describe_gauge!(REVISION, "Revision of the published snapshot");
    metrics::describe_gauge!(PUBLISHED_AT, metrics::Unit::Seconds, "When the current snapshot was published (Unix time)");
    metrics::describe_gauge!(
        SNAPSHOT_AGE,
        metrics::Unit::Seconds,
        "Seconds since the current snapshot was published (fleet mode: since it was last known to be etcd's newest state)"
    );
    metrics::describe_gauge!(REVISION_LAG, "Fleet mode: revisions the snapshot was behind etcd when last looked at");
    metrics::describe_gauge!(POLICIES, "Managed policies");
    metrics::describe_gauge!(PRINCIPALS, "Principals");
    metrics::describe_gauge!(RESOURCES, "Resources");
    metrics::describe_gauge!(TAGS, "Tags on resources and principals");
    metrics::describe_gauge!(BUILD_INFO, "Always 1; the labels carry the version");
    metrics::describe_gauge!(STORE_FAILED, "1 while the store refuses every change after a storage failure");
    metrics::describe_gauge!(WATCH_STREAMS, "Admin.Watch streams open");
    register_at_zero();
    Ok(())
}

/// Makes every documented series exist from start-up: counters at 0 for
/// each bounded label set a scrape would otherwise only see after its first
/// event, empty latency histograms for every RPC, and the build info.
fn register_at_zero() {
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for (result, reason) in [("allow", "Allowed"), ("deny", "ExplicitDeny"), ("deny", "ImplicitDeny")] {
        metrics::counter!(DECISIONS, "result" => result, "reason" => reason).absolute(0);
    }
    for rpc in RPC_NAMES {
        metrics::counter!(RPCS, "rpc" => *rpc, "code" => "OK").absolute(0);
        // Registers the histogram without recording a sample.
        let _ = metrics::histogram!(RPC_DURATION, "rpc" => *rpc);
    }
    metrics::counter!(ADMIN_UPDATES, "result" => "applied").absolute(0);
    for origin in ["tagging", "admin"] {
        metrics::counter!(TAG_CHANGES, "origin" => origin).absolute(0);
    }
    metrics::counter!(DECISION_CACHE, "result" => "hit").absolute(0);
    metrics::counter!(DECISION_CACHE, "result" => "miss").absolute(0);
    metrics::counter!(DECISION_LOG_DROPPED).absolute(0);
    metrics::counter!(AUDIT_FAILURES).absolute(0);
    metrics::gauge!(STORE_FAILED).set(0.0);
    metrics::gauge!(WATCH_STREAMS).set(0.0);
}
