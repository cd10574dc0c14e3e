//! `tagward-bench load`: a ghz-like load generator for the Authorizer.
//!
//! `concurrency` workers share `connections` HTTP/2 connections (worker `w`
//! uses connection `w % connections`) and send requests drawn round-robin
//! from a list (a ghz data file, or the generator's mix), until `total`
//! requests or `duration` have passed, optionally paced to a global `rate`.
//! Latency is measured per call from send to response, into an HDR
//! histogram (3 significant digits). The report uses ghz's JSON field names
//! (`count`, `total`, `average`, `fastest`, `slowest`, `rps`,
//! `statusCodeDistribution`, `errorDistribution`, `latencyDistribution`,
//! `histogram`, durations in nanoseconds); what ghz has no field for
//! (p99.9, the baseline and its ratio, the half-peak run, tag-change
//! visibility) is under `tagward`.
//!
//! A [`Plan`] adds, in one run: the same load against a baseline (the empty
//! Authorizer of [`crate::baseline`]) alternating with the target for
//! `rounds` rounds, so throughput comes as a ratio; a run at half the
//! measured peak rate; and admin tag changes at a set rate with the time
//! from each acknowledgement to the first Authorize that reflects it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;
use tagward::grpc::dial::{ClientTls, Target};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Request;

use crate::gen::{self, MixItem};
use tagward::grpc::convert::{self, request_to_proto};
use tagward::grpc::proto::admin_client::AdminClient;
use tagward::grpc::proto::authorizer_client::AuthorizerClient;
use tagward::grpc::proto::{self, update::Op};

/// Which method the load calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Authorize,
    BatchAuthorize,
}

impl Call {
    /// The ghz name of the call.
    pub fn name(self) -> &'static str {
        match self {
            Call::Authorize => "tagward.v1.Authorizer.Authorize",
            Call::BatchAuthorize => "tagward.v1.Authorizer.BatchAuthorize",
        }
    }
}

/// The requests to send, round-robin.
#[derive(Debug, Clone)]
pub enum Requests {
    Authorize(Arc<Vec<proto::AuthorizeRequest>>),
    Batch(Arc<Vec<proto::BatchAuthorizeRequest>>),
}

impl Requests {
    pub fn call(&self) -> Call {
        match self {
            Requests::Authorize(_) => Call::Authorize,
            Requests::Batch(_) => Call::BatchAuthorize,
        }
    }

    fn len(&self) -> usize {
        match self {
            Requests::Authorize(r) => r.len(),
            Requests::Batch(r) => r.len(),
        }
    }
}

/// One load run's shape (ghz's options).
#[derive(Debug, Clone)]
pub struct Options {
    pub concurrency: usize,
    pub connections: usize,
    /// Stop after this many requests (the first to come of this and `duration`).
    pub total: Option<u64>,
    pub duration: Option<Duration>,
    /// Requests per second over all workers; `None`: as fast as they go.
    pub rate: Option<f64>,
    /// Requests sent before measuring (per target), not counted.
    pub warmup: u64,
    /// Per call.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            concurrency: 50,
            connections: 1,
            total: Some(200),
            duration: None,
            rate: None,
            warmup: 0,
            timeout: Duration::from_secs(20),
        }
    }
}

/// Tag changes on the admin stream while the load runs.
#[derive(Debug, Clone)]
pub struct TagChanges {
    /// The admin address.
    pub admin: String,
    pub token: Option<String>,
    /// Changes per second.
    pub rate: f64,
}

/// A whole run: the target, and optionally a baseline, a half-peak run and
/// tag changes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: String,
    pub requests: Requests,
    pub options: Options,
    /// The empty Authorizer's address: measured with the same load,
    /// alternating with the target.
    pub baseline: Option<String>,
    /// Baseline and target runs each, alternating (at least 1).
    pub rounds: usize,
    /// After the peak runs, run the target at half its measured peak rate.
    pub half_peak: bool,
    /// Tag changes during the half-peak run (or, without one, during the
    /// target's peak runs).
    pub tag_changes: Option<TagChanges>,
    pub name: String,
    /// The target server's process on this machine: its CPU time is read
    /// from `/proc` around each measured run (not the warm-up).
    pub target_pid: Option<u32>,
    /// The baseline server's process, likewise.
    pub baseline_pid: Option<u32>,
}

/// What one or more runs against one address measured.
#[derive(Clone)]
struct Stats {
    ok: Histogram<u64>,
    count: u64,
    sum_ns: u128,
    fastest: u64,
    slowest: u64,
    codes: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
    decisions: BTreeMap<&'static str, u64>,
    elapsed: Duration,
    /// The server's CPU time (user + system) over the measured runs, when
    /// its process was given.
    cpu: Option<Duration>,
}

fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (1 <= low,
    // high >= 2 * low, 3 significant figures): this cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

impl Stats {
    fn new() -> Stats {
        Stats {
            ok: histogram(),
            count: 0,
            sum_ns: 0,
            fastest: u64::MAX,
            slowest: 0,
            codes: BTreeMap::new(),
            errors: BTreeMap::new(),
            decisions: BTreeMap::new(),
            elapsed: Duration::ZERO,
            cpu: None,
        }
    }

    fn record(&mut self, latency: Duration, outcome: Result<&[i32], tonic::Status>) {
        let ns = latency.as_nanos().min(u64::MAX as u128) as u64;
        self.count += 1;
        self.sum_ns += ns as u128;
        match outcome {
            Ok(reasons) => {
                self.ok.saturating_record(ns.max(1));
                self.fastest = self.fastest.min(ns);
                self.slowest = self.slowest.max(ns);
                *self.codes.entry("OK").or_default() += 1;
                for r in reasons {
                    let name = proto::Reason::try_from(*r).map(|r| r.as_str_name()).unwrap_or("REASON_UNSPECIFIED");
                    *self.decisions.entry(name).or_default() += 1;
                }
            }
            Err(status) => {
                *self.codes.entry(code_name(status.code())).or_default() += 1;
                *self
                    .errors
                    .entry(format!("rpc error: code = {} desc = {}", code_name(status.code()), status.message()))
                    .or_default() += 1;
            }
        }
    }

    fn merge(&mut self, other: &Stats) {
        let _ = self.ok.add(&other.ok);
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.fastest = self.fastest.min(other.fastest);
        self.slowest = self.slowest.max(other.slowest);
        for (k, v) in &other.codes {
            *self.codes.entry(k).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.decisions {
            *self.decisions.entry(k).or_default() += v;
        }
        if let Some(c) = other.cpu {
            self.cpu = Some(self.cpu.unwrap_or_default() + c);
        }
    }

    /// The server's CPU time per call, in microseconds.
    fn cpu_per_call(&self) -> Option<f64> {
        self.cpu.filter(|_| self.count > 0).map(|c| c.as_secs_f64() * 1e6 / self.count as f64)
    }

    fn rps(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.count as f64 / s
        } else {
            0.0
        }
    }
}

/// gRPC status code names as grpc-go (and so ghz) spells them; the table
/// behind them is `tagward::grpc`'s, which also gives the metric labels.
pub use tagward::grpc::go_code_name as code_name;

// ------------------------------------------------------------------ server CPU

/// Clock ticks per second of `utime` and `stime` in `/proc/PID/stat`
/// (`USER_HZ`, which the kernel fixes at 100 for user space on Linux).
const USER_HZ: u64 = 100;

/// A process's CPU time so far (user + system, all its threads) from the
/// text of `/proc/PID/stat`. The command name (field 2) is in parentheses
/// and may hold spaces or parentheses itself, so the fields are counted
/// after the last `)`: state is the first there, `utime` the 12th and
/// `stime` the 13th (fields 14 and 15 of proc(5)).
pub fn parse_cpu_time(stat: &str) -> Result<Duration, String> {
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or("no \")\" after the command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize, name: &str| -> Result<u64, String> {
        fields.get(i).ok_or(format!("no {name} field"))?.parse::<u64>().map_err(|e| format!("{name}: {e}"))
    };
    let ticks = tick(11, "utime")? + tick(12, "stime")?;
    Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// The CPU time process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration, String> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e} (is the server running on this machine?)"))?;
    parse_cpu_time(&text).map_err(|e| format!("{path}: {e}"))
}

/// Runs `run` and, when `pid` is given, notes the CPU time that process
/// used meanwhile in the stats.
async fn with_cpu<F: std::future::Future<Output = Result<Stats, String>>>(pid: Option<u32>, run: F) -> Result<Stats, String> {
    let before = pid.map(cpu_time).transpose()?;
    let mut stats = run.await?;
    if let (Some(pid), Some(before)) = (pid, before) {
        stats.cpu = Some(cpu_time(pid)?.saturating_sub(before));
    }
    Ok(stats)
}

// ------------------------------------------------------------------ report

/// ghz's `options` block (the fields that apply).
#[derive(Debug, Clone, Serialize)]
pub struct ReportOptions {
    pub host: String,
    pub call: String,
    pub insecure: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    pub concurrency: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qps: Option<u64>,
    pub connections: usize,
    /// Nanoseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
    /// Nanoseconds.
    pub timeout: u64,
    #[serde(rename = "skipFirst", skip_serializing_if = "is_zero")]
    pub skip_first: u64,
    #[serde(rename = "CPUs")]
    pub cpus: usize,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One entry of ghz's `latencyDistribution`.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyPoint {
    pub percentage: u32,
    /// Nanoseconds.
    pub latency: u64,
}

/// One entry of ghz's `histogram`.
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// Seconds.
    pub mark: f64,
    pub count: u64,
    pub frequency: f64,
}

/// Percentiles of a latency, in nanoseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    #[serde(rename = "p99.9")]
    pub p999: u64,
    pub min: u64,
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            min: h.min(),
            max: h.max(),
        }
    }
}

/// Tag-change visibility, measured during a run.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Visibility {
    /// Changes acknowledged and then seen.
    pub changes: u64,
    /// Changes per second asked for.
    pub rate: f64,
    /// Sending the update to receiving its acknowledgement.
    pub ack_latency: Percentiles,
    /// The acknowledgement to the response of the first Authorize (sent
    /// after the acknowledgement, on the data plane) that reflects the
    /// change: the latency of that one call when the change is already
    /// visible, more if earlier probes still saw the old tags.
    pub visible_after_ack: Percentiles,
    /// Probes sent after an acknowledgement that still saw the old tags
    /// (Tagward publishes before it acknowledges, so 0 is expected).
    pub stale_probes: u64,
    /// Changes refused, lost or never seen within 2 s.
    pub errors: u64,
}

/// What ghz has no field for.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Extra {
    /// Latency percentiles of the successful calls (ns), with p99.9.
    pub latency: Percentiles,
    /// Answers by reason (one per item for BatchAuthorize).
    pub decisions: BTreeMap<String, u64>,
    /// Rounds the figures add up (each of warm connections).
    pub rounds: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<Report>>,
    /// This run's rps / the baseline's rps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput_ratio: Option<f64>,
    /// Each round's ratio (target / the baseline round just before it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub round_ratios: Vec<f64>,
    /// The server's CPU time (user + system, from `/proc/PID/stat`) over
    /// the measured runs, in seconds, when its process was given
    /// (`--target-pid`, `--baseline-pid`); 10 ms resolution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_seconds: Option<f64>,
    /// That CPU time per call, in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_micros_per_request: Option<f64>,
    /// The baseline's CPU per call ÷ this run's: 1.0 when the handler costs
    /// nothing beyond the empty one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ratio: Option<f64>,
    /// Each round's CPU ratio.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub round_cpu_ratios: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half_peak: Option<Box<Report>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visibility: Option<Visibility>,
}

/// A report in ghz's JSON shape, plus `tagward`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub end_reason: String,
    pub options: ReportOptions,
    pub date: String,
    pub count: u64,
    /// Nanoseconds.
    pub total: u64,
    pub average: u64,
    pub fastest: u64,
    pub slowest: u64,
    pub rps: f64,
    pub error_distribution: BTreeMap<String, u64>,
    pub status_code_distribution: BTreeMap<String, u64>,
    pub latency_distribution: Vec<LatencyPoint>,
    pub histogram: Vec<Bucket>,
    /// ghz lists every call here; this generator keeps none.
    pub details: Vec<Value>,
    pub tagward: Extra,
}

fn report(name: &str, host: &str, call: Call, options: &Options, rate: Option<f64>, stats: &Stats, rounds: usize) -> Report {
    let h = &stats.ok;
    let latency_distribution = if h.is_empty() {
        Vec::new()
    } else {
        [10u32, 25, 50, 75, 90, 95, 99]
            .iter()
            .map(|&p| LatencyPoint { percentage: p, latency: h.value_at_quantile(p as f64 / 100.0) })
            .collect()
    };
    let (fastest, slowest) = if h.is_empty() { (0, 0) } else { (stats.fastest, stats.slowest) };
    // ghz: ten equal buckets between the fastest and the slowest, plus the slowest.
    let histogram = if h.is_empty() {
        Vec::new()
    } else {
        let step = (slowest - fastest) as f64 / 10.0;
        let marks: Vec<f64> = (0..=10).map(|i| if i == 10 { slowest as f64 } else { fastest as f64 + step * i as f64 }).collect();
        let mut counts = vec![0u64; 11];
        for v in h.iter_recorded() {
            let x = v.value_iterated_to() as f64;
            let i = marks.iter().position(|&m| x <= m).unwrap_or(10);
            counts[i] += v.count_at_value();
        }
        marks.iter().zip(counts).map(|(&m, c)| Bucket { mark: m / 1e9, count: c, frequency: c as f64 / h.len() as f64 }).collect()
    };
    Report {
        name: name.to_string(),
        end_reason: "normal".into(),
        options: ReportOptions {
            host: host.to_string(),
            call: call.name().to_string(),
            insecure: true,
            total: options.total,
            concurrency: options.concurrency,
            qps: rate.map(|r| r.round() as u64),
            connections: options.connections,
            duration: options.duration.map(|d| d.as_nanos() as u64),
            timeout: options.timeout.as_nanos() as u64,
            skip_first: options.warmup,
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        },
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        count: stats.count,
        total: stats.elapsed.as_nanos() as u64,
        average: if stats.count > 0 { (stats.sum_ns / stats.count as u128) as u64 } else { 0 },
        fastest,
        slowest,
        rps: stats.rps(),
        error_distribution: stats.errors.clone(),
        status_code_distribution: stats.codes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        latency_distribution,
        histogram,
        details: Vec::new(),
        tagward: Extra {
            latency: Percentiles::of(h),
            decisions: stats.decisions.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            rounds,
            server_cpu_seconds: stats.cpu.map(|c| c.as_secs_f64()),
            server_cpu_micros_per_request: stats.cpu_per_call(),
            ..Extra::default()
        },
    }
}

fn ms(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{:.2} s", ns as f64 / 1e9)
    } else {
        format!("{:.3} ms", ns as f64 / 1e6)
    }
}

impl Report {
    /// A ghz-like summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.text_into(&mut out, "");
        out
    }

    fn text_into(&self, out: &mut String, title: &str) {
        use std::fmt::Write as _;
        let l = &self.tagward.latency;
        let _ = writeln!(out, "{title}Summary ({} on {}):", self.options.call, self.options.host);
        let _ = writeln!(out, "  Count:        {}", self.count);
        let _ = writeln!(out, "  Total:        {}", ms(self.total));
        let _ = writeln!(out, "  Slowest:      {}", ms(self.slowest));
        let _ = writeln!(out, "  Fastest:      {}", ms(self.fastest));
        let _ = writeln!(out, "  Average:      {}", ms(self.average));
        let _ = writeln!(out, "  Requests/sec: {:.2}", self.rps);
        let mut shape = format!("concurrency {}, connections {}", self.options.concurrency, self.options.connections);
        if let Some(q) = self.options.qps {
            let _ = write!(shape, ", rate {q}/s");
        }
        let _ = writeln!(out, "  Load:         {shape}");
        let _ = writeln!(out, "\nLatency distribution:");
        for (name, v) in [("p50", l.p50), ("p90", l.p90), ("p99", l.p99), ("p99.9", l.p999), ("min", l.min), ("max", l.max)] {
            let _ = writeln!(out, "  {name:<6} {}", ms(v));
        }
        let _ = writeln!(out, "\nStatus code distribution:");
        for (code, n) in &self.status_code_distribution {
            let _ = writeln!(out, "  [{code}]   {n} responses");
        }
        if !self.error_distribution.is_empty() {
            let _ = writeln!(out, "\nError distribution:");
            for (e, n) in &self.error_distribution {
                let _ = writeln!(out, "  [{n}]   {e}");
            }
        }
        if !self.tagward.decisions.is_empty() {
            let d: Vec<String> = self.tagward.decisions.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(out, "\nDecisions: {}", d.join(", "));
        }
        if let (Some(cpu), Some(per)) = (self.tagward.server_cpu_seconds, self.tagward.server_cpu_micros_per_request) {
            let _ = writeln!(out, "\nServer CPU:   {cpu:.2} s, {per:.2} µs per call (/proc, user + system)");
        }
        if let Some(v) = &self.tagward.visibility {
            let _ = writeln!(out, "\nTag changes ({} at {:.0}/s on the admin stream):", v.changes, v.rate);
            let _ = writeln!(
                out,
                "  ack latency:         p50 {}  p99 {}  max {}",
                ms(v.ack_latency.p50),
                ms(v.ack_latency.p99),
                ms(v.ack_latency.max)
            );
            let _ = writeln!(
                out,
                "  visible after ack:   p50 {}  p99 {}  max {}",
                ms(v.visible_after_ack.p50),
                ms(v.visible_after_ack.p99),
                ms(v.visible_after_ack.max)
            );
            let _ = writeln!(out, "  stale probes: {}   errors: {}", v.stale_probes, v.errors);
        }
        if let Some(b) = &self.tagward.baseline {
            let _ = writeln!(out);
            b.text_into(out, "Baseline (empty Authorizer) ");
            if let Some(r) = self.tagward.throughput_ratio {
                let rounds: Vec<String> = self.tagward.round_ratios.iter().map(|r| format!("{r:.3}")).collect();
                let _ = writeln!(
                    out,
                    "\nThroughput ratio Authorizer / empty handler: {r:.3} ({:.0} / {:.0} rps; per round {})",
                    self.rps,
                    b.rps,
                    rounds.join(", ")
                );
            }
            if let (Some(r), Some(t), Some(e)) =
                (self.tagward.cpu_ratio, self.tagward.server_cpu_micros_per_request, b.tagward.server_cpu_micros_per_request)
            {
                let rounds: Vec<String> = self.tagward.round_cpu_ratios.iter().map(|r| format!("{r:.3}")).collect();
                let _ = writeln!(
                    out,
                    "Server CPU ratio empty handler / Authorizer: {r:.3} ({e:.2} / {t:.2} µs per call; per round {})",
                    rounds.join(", ")
                );
            }
        }
        if let Some(h) = &self.tagward.half_peak {
            let _ = writeln!(out);
            h.text_into(out, "At half of peak ");
        }
    }
}

// ------------------------------------------------------------------ requests

/// The mix as Authorize requests.
pub fn authorize_requests(mix: &[MixItem]) -> Vec<proto::AuthorizeRequest> {
    mix.iter().map(|m| request_to_proto(&m.request)).collect()
}

/// Batches of the generator as BatchAuthorize requests.
pub fn batch_requests(batches: &[(String, Vec<MixItem>)]) -> Vec<proto::BatchAuthorizeRequest> {
    batches
        .iter()
        .map(|(principal, items)| proto::BatchAuthorizeRequest {
            principal: principal.clone(),
            items: items
                .iter()
                .map(|m| proto::BatchItem {
                    action: m.request.action.clone(),
                    resource: m.request.resource.clone(),
                    request_tags: convert::to_tags(m.request.request_tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                    tag_keys: m.request.tag_keys.as_ref().map(|k| proto::StringList { values: k.clone() }),
                })
                .collect(),
            ..Default::default()
        })
        .collect()
}

fn field<'a>(v: &'a Value, snake: &str, camel: &str) -> Option<&'a Value> {
    v.get(snake).or_else(|| v.get(camel))
}

fn string(v: &Value, snake: &str, camel: &str, at: &str) -> Result<String, String> {
    match field(v, snake, camel) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{at}.{snake}: expected a string")),
    }
}

fn tag_list(v: &Value, snake: &str, camel: &str, at: &str) -> Result<Vec<proto::Tag>, String> {
    match field(v, snake, camel) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let at = format!("{at}.{snake}[{i}]");
                Ok(proto::Tag { key: string(t, "key", "key", &at)?, value: string(t, "value", "value", &at)? })
            })
            .collect(),
        Some(_) => Err(format!("{at}.{snake}: expected a list of {{key, value}}")),
    }
}

fn key_list(v: &Value, snake: &str, camel: &str, at: &str) -> Result<Option<proto::StringList>, String> {
    match field(v, snake, camel) {
        None | Some(Value::Null) => Ok(None),
        Some(list) => {
            let values = list
                .get("values")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("{at}.{snake}: expected {{\"values\": [...]}}"))?;
            let values = values
                .iter()
                .map(|s| s.as_str().map(str::to_string).ok_or_else(|| format!("{at}.{snake}.values: expected strings")))
                .collect::<Result<_, _>>()?;
            Ok(Some(proto::StringList { values }))
        }
    }
}

fn objects(data: &Value) -> Result<Vec<&Value>, String> {
    match data {
        Value::Array(a) if a.is_empty() => Err("the data is an empty list".into()),
        Value::Array(a) => Ok(a.iter().collect()),
        Value::Object(_) => Ok(vec![data]),
        _ => Err("expected an object or a list of objects".into()),
    }
}

/// Reads ghz data (the JSON form of `AuthorizeRequest`: one object or a
/// list; field names as in the .proto or in lowerCamelCase).
pub fn authorize_requests_from_json(data: &Value) -> Result<Vec<proto::AuthorizeRequest>, String> {
    objects(data)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let at = format!("[{i}]");
            Ok(proto::AuthorizeRequest {
                principal: string(v, "principal", "principal", &at)?,
                action: string(v, "action", "action", &at)?,
                resource: string(v, "resource", "resource", &at)?,
                request_tags: tag_list(v, "request_tags", "requestTags", &at)?,
                tag_keys: key_list(v, "tag_keys", "tagKeys", &at)?,
                session_tags: tag_list(v, "session_tags", "sessionTags", &at)?,
                min_revision: field(v, "min_revision", "minRevision")
                    .and_then(|m| m.as_u64().or_else(|| m.as_str()?.parse().ok()))
                    .unwrap_or(0),
                explain: field(v, "explain", "explain").and_then(Value::as_bool).unwrap_or(false),
                ..Default::default()
            })
        })
        .collect()
}

/// Reads ghz data for BatchAuthorize.
pub fn batch_requests_from_json(data: &Value) -> Result<Vec<proto::BatchAuthorizeRequest>, String> {
    objects(data)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let at = format!("[{i}]");
            let items = match v.get("items") {
                Some(Value::Array(items)) => items
                    .iter()
                    .enumerate()
                    .map(|(j, it)| {
                        let at = format!("{at}.items[{j}]");
                        Ok(proto::BatchItem {
                            action: string(it, "action", "action", &at)?,
                            resource: string(it, "resource", "resource", &at)?,
                            request_tags: tag_list(it, "request_tags", "requestTags", &at)?,
                            tag_keys: key_list(it, "tag_keys", "tagKeys", &at)?,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?,
                _ => return Err(format!("{at}.items: expected a list")),
            };
            Ok(proto::BatchAuthorizeRequest {
                principal: string(v, "principal", "principal", &at)?,
                session_tags: tag_list(v, "session_tags", "sessionTags", &at)?,
                items,
                ..Default::default()
            })
        })
        .collect()
}

// ------------------------------------------------------------------ running

/// `connections` connections to `addr` (`HOST:PORT`, `http://`, `https://`
/// trusting the system's CA bundle, or `unix:///PATH`), the way every
/// Tagward client reaches a sidecar.
async fn connect(addr: &str, connections: usize) -> Result<Vec<Channel>, String> {
    let target = Target::new(addr, &ClientTls::default())?;
    let mut out = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let endpoint = target.endpoint().tcp_nodelay(true).connect_timeout(Duration::from_secs(5));
        out.push(target.connect_endpoint(endpoint).await?);
    }
    Ok(out)
}

/// One measured run against `channels`.
async fn run_once(
    channels: &[Channel],
    requests: &Requests,
    options: &Options,
    rate: Option<f64>,
    total: Option<u64>,
    duration: Option<Duration>,
) -> Stats {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let mut workers = Vec::with_capacity(options.concurrency);
    for w in 0..options.concurrency.max(1) {
        let channel = channels[w % channels.len()].clone();
        let requests = requests.clone();
        let next = next.clone();
        let timeout = options.timeout;
        workers.push(tokio::spawn(async move {
            let mut client = AuthorizerClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
            let mut stats = Stats::new();
            let n = requests.len().max(1);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if total.is_some_and(|t| i >= t) {
                    break;
                }
                if let Some(rate) = rate {
                    let at = start + Duration::from_secs_f64(i as f64 / rate);
                    if deadline.is_some_and(|d| at >= d) {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let t0 = Instant::now();
                match &requests {
                    Requests::Authorize(list) => {
                        let req = list[i as usize % n].clone();
                        let answer = tokio::time::timeout(timeout, client.authorize(req)).await;
                        let lat = t0.elapsed();
                        match answer {
                            Ok(Ok(r)) => stats.record(lat, Ok(&[r.get_ref().reason])),
                            Ok(Err(s)) => stats.record(lat, Err(s)),
                            Err(_) => stats.record(lat, Err(tonic::Status::deadline_exceeded("timed out"))),
                        }
                    }
                    Requests::Batch(list) => {
                        let req = list[i as usize % n].clone();
                        let answer = tokio::time::timeout(timeout, client.batch_authorize(req)).await;
                        let lat = t0.elapsed();
                        match answer {
                            Ok(Ok(r)) => {
                                let reasons: Vec<i32> = r.get_ref().results.iter().map(|x| x.reason).collect();
                                stats.record(lat, Ok(&reasons))
                            }
                            Ok(Err(s)) => stats.record(lat, Err(s)),
                            Err(_) => stats.record(lat, Err(tonic::Status::deadline_exceeded("timed out"))),
                        }
                    }
                }
            }
            stats
        }));
    }
    let mut all = Stats::new();
    for w in workers {
        if let Ok(s) = w.await {
            all.merge(&s);
        }
    }
    all.elapsed = start.elapsed();
    all
}

async fn warm(channels: &[Channel], requests: &Requests, options: &Options) {
    if options.warmup > 0 {
        let _ = run_once(channels, requests, options, None, Some(options.warmup), None).await;
    }
}

/// Flips probe keys' `Project` tag through one admin stream at `rate` per
/// second until `stop`, timing each acknowledgement and the first
/// Authorize after it that reflects the change.
async fn tag_changes(changes: TagChanges, target: String, mut stop: watch::Receiver<bool>) -> Result<Visibility, String> {
    let mut admin = AdminClient::new(connect(&changes.admin, 1).await?.remove(0));
    let mut probe = AuthorizerClient::new(connect(&target, 1).await?.remove(0));
    let (tx, rx) = mpsc::channel::<proto::ApplyRequest>(4);
    let mut request = Request::new(ReceiverStream::new(rx));
    if let Some(token) = &changes.token {
        let value = format!("Bearer {token}").parse().map_err(|_| "the admin token is not a valid header value".to_string())?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut acks = admin.apply(request).await.map_err(|s| format!("Admin.Apply: {}", s.message()))?.into_inner();
    let mut ack_h = histogram();
    let mut vis_h = histogram();
    let mut v = Visibility { rate: changes.rate, ..Visibility::default() };
    let interval = Duration::from_secs_f64(1.0 / changes.rate.max(0.001));
    let start = Instant::now();
    let ask = |key: &str| proto::AuthorizeRequest {
        principal: gen::PROBE_PRINCIPAL.to_string(),
        action: gen::PROBE_ACTION.to_string(),
        resource: key.to_string(),
        ..Default::default()
    };
    for n in 0u64.. {
        if *stop.borrow() {
            break;
        }
        let key = gen::probe_key(n as usize % gen::PROBE_KEYS);
        let now_allowed = match probe.authorize(ask(&key)).await {
            Ok(r) => r.get_ref().decision == proto::Decision::Allow as i32,
            Err(s) => return Err(format!("the probe's Authorize failed: {} (is this a generated world?)", s.message())),
        };
        let value = if now_allowed { gen::PROBE_OFF } else { gen::PROBE_ON };
        let update = proto::Update {
            op: Some(Op::SetTags(proto::SetTags {
                resource: key.clone(),
                tags: vec![proto::Tag { key: "Project".into(), value: value.into() }],
            })),
        };
        let sent = Instant::now();
        if tx.send(proto::ApplyRequest { id: n.to_string(), update: Some(update) }).await.is_err() {
            v.errors += 1;
            break;
        }
        let ack = tokio::select! {
            a = acks.message() => a,
            _ = stop.changed() => break,
        };
        let acked = Instant::now();
        match ack {
            Ok(Some(a)) if a.error.is_none() && a.id == n.to_string() => {}
            Ok(Some(a)) => {
                v.errors += 1;
                if let Some(e) = a.error {
                    return Err(format!("the tag change was refused: {}: {}", e.code, e.message));
                }
                continue;
            }
            Ok(None) => return Err("the admin stream ended".into()),
            Err(s) => return Err(format!("the admin stream failed: {}", s.message())),
        }
        let _ = ack_h.record((acked - sent).as_nanos().max(1) as u64);
        let mut seen = false;
        while acked.elapsed() < Duration::from_secs(2) {
            match probe.authorize(ask(&key)).await {
                Ok(r) if (r.get_ref().decision == proto::Decision::Allow as i32) != now_allowed => {
                    let _ = vis_h.record(acked.elapsed().as_nanos().max(1) as u64);
                    seen = true;
                    break;
                }
                Ok(_) => v.stale_probes += 1,
                Err(_) => {
                    v.errors += 1;
                    break;
                }
            }
        }
        if seen {
            v.changes += 1;
        } else {
            v.errors += 1;
        }
        let at = start + interval * (n as u32 + 1);
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = stop.changed() => break,
        }
    }
    drop(tx);
    v.ack_latency = Percentiles::of(&ack_h);
    v.visible_after_ack = Percentiles::of(&vis_h);
    Ok(v)
}

/// A run of the target, with tag changes alongside when asked.
async fn run_target(
    channels: &[Channel],
    plan: &Plan,
    rate: Option<f64>,
    with_changes: bool,
) -> Result<(Stats, Option<Visibility>), String> {
    let o = &plan.options;
    let changes = match (&plan.tag_changes, with_changes) {
        (Some(c), true) => {
            let (stop_tx, stop_rx) = watch::channel(false);
            let (c, target) = (c.clone(), plan.target.clone());
            // The changes and their probes run on a thread and runtime of
            // their own: on the load's runtime, each probe's answer would
            // also wait for the load workers' turns, which is the load
            // generator's queue, not the sidecar's visibility.
            let thread = std::thread::Builder::new().name("tag-changes".into()).spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start the tag changes' runtime: {e}"))?
                    .block_on(tag_changes(c, target, stop_rx))
            });
            let thread = thread.map_err(|e| format!("cannot start the tag changes' thread: {e}"))?;
            Some((stop_tx, tokio::task::spawn_blocking(move || thread.join())))
        }
        _ => None,
    };
    let stats = with_cpu(plan.target_pid, async { Ok(run_once(channels, &plan.requests, o, rate, o.total, o.duration).await) });
    let stats = match stats.await {
        Ok(s) => s,
        Err(e) => {
            if let Some((stop, _)) = &changes {
                let _ = stop.send(true);
            }
            return Err(e);
        }
    };
    let visibility = match changes {
        Some((stop, task)) => {
            let _ = stop.send(true);
            let joined = task.await.map_err(|e| format!("the tag-change task failed: {e}"))?;
            Some(joined.map_err(|_| "the tag-change thread panicked".to_string())??)
        }
        None => None,
    };
    Ok((stats, visibility))
}

/// Runs a whole plan and reports on the target (with the baseline, the
/// half-peak run and the tag changes under `tagward`).
pub async fn run(plan: &Plan) -> Result<Report, String> {
    let o = &plan.options;
    if o.total.is_none() && o.duration.is_none() {
        return Err("give a total or a duration".into());
    }
    let call = plan.requests.call();
    let target = connect(&plan.target, o.connections).await?;
    let baseline = match &plan.baseline {
        Some(addr) => Some(connect(addr, o.connections).await?),
        None => None,
    };
    warm(&target, &plan.requests, o).await;
    if let Some(b) = &baseline {
        warm(b, &plan.requests, o).await;
    }
    let rounds = plan.rounds.max(1);
    let changes_at_peak = plan.tag_changes.is_some() && !plan.half_peak;
    let (mut t_all, mut b_all) = (Stats::new(), Stats::new());
    let (mut t_time, mut b_time) = (Duration::ZERO, Duration::ZERO);
    let mut round_ratios = Vec::new();
    let mut round_cpu_ratios = Vec::new();
    let mut visibility: Option<Visibility> = None;
    for _ in 0..rounds {
        let mut b_rps = None;
        let mut b_cpu = None;
        if let Some(b) = &baseline {
            let s = with_cpu(plan.baseline_pid, async { Ok(run_once(b, &plan.requests, o, o.rate, o.total, o.duration).await) })
                .await?;
            b_time += s.elapsed;
            b_rps = Some(s.rps());
            b_cpu = s.cpu_per_call();
            b_all.merge(&s);
        }
        let (s, v) = run_target(&target, plan, o.rate, changes_at_peak).await?;
        if let Some(v) = v {
            visibility = Some(merge_visibility(visibility, v));
        }
        t_time += s.elapsed;
        if let Some(b) = b_rps.filter(|b| *b > 0.0) {
            round_ratios.push(s.rps() / b);
        }
        if let (Some(b), Some(t)) = (b_cpu, s.cpu_per_call().filter(|t| *t > 0.0)) {
            round_cpu_ratios.push(b / t);
        }
        t_all.merge(&s);
    }
    t_all.elapsed = t_time;
    b_all.elapsed = b_time;
    let mut out = report(&plan.name, &plan.target, call, o, o.rate, &t_all, rounds);
    out.tagward.visibility = visibility;
    if let Some(addr) = &plan.baseline {
        let b = report("baseline", addr, call, o, o.rate, &b_all, rounds);
        if b.rps > 0.0 {
            out.tagward.throughput_ratio = Some(out.rps / b.rps);
        }
        out.tagward.round_ratios = round_ratios;
        if let (Some(b), Some(t)) = (b.tagward.server_cpu_micros_per_request, out.tagward.server_cpu_micros_per_request) {
            if t > 0.0 {
                out.tagward.cpu_ratio = Some(b / t);
            }
        }
        out.tagward.round_cpu_ratios = round_cpu_ratios;
        out.tagward.baseline = Some(Box::new(b));
    }
    if plan.half_peak && out.rps > 0.0 {
        let rate = out.rps / 2.0;
        let (s, v) = run_target(&target, plan, Some(rate), plan.tag_changes.is_some()).await?;
        let mut half = report("half-peak", &plan.target, call, o, Some(rate), &s, 1);
        half.tagward.visibility = v;
        out.tagward.half_peak = Some(Box::new(half));
    }
    Ok(out)
}

fn merge_visibility(a: Option<Visibility>, b: Visibility) -> Visibility {
    // Rounds are reported by the last round's percentiles and the summed counts.
    match a {
        None => b,
        Some(a) => Visibility {
            changes: a.changes + b.changes,
            stale_probes: a.stale_probes + b.stale_probes,
            errors: a.errors + b.errors,
            ..b
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        // proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt
        // cminflt majflt cmajflt utime stime ...; the name may hold ") ".
        let stat = "4242 (tag ward) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 130 0 0 20 0 5 0 12345 0 0";
        assert_eq!(parse_cpu_time(stat).unwrap(), Duration::from_millis(3800));
        assert!(parse_cpu_time("4242 tagward S 1").unwrap_err().contains(")"));
        assert!(parse_cpu_time("4242 (tagward) S 1 2").unwrap_err().contains("utime"));
        let own = cpu_time(std::process::id()).unwrap();
        assert!(cpu_time(std::process::id()).unwrap() >= own);
    }

    #[test]
    fn ghz_data_reads_both_spellings() {
        let data = serde_json::json!([
            {"principal": "p", "action": "a", "resource": "r", "request_tags": [{"key": "K", "value": "V"}], "tag_keys": {"values": ["K"]}},
            {"principal": "p", "action": "a", "resource": "r", "requestTags": [{"key": "K", "value": "V"}], "tagKeys": {"values": ["K"]}}
        ]);
        let reqs = authorize_requests_from_json(&data).unwrap();
        assert_eq!(reqs[0], reqs[1]);
        assert_eq!(reqs[0].request_tags[0].key, "K");
        assert!(authorize_requests_from_json(&serde_json::json!([])).is_err());
        assert!(authorize_requests_from_json(&serde_json::json!([{"principal": 3}])).unwrap_err().contains("[0].principal"));
    }

    #[test]
    fn generated_data_round_trips() {
        let spec = gen::GenSpec { keys: 100, other_resources: 10, principals: 10, policies: 30, ..Default::default() };
        let mix = spec.mix(50);
        let json = Value::Array(mix.iter().map(|m| gen::authorize_json(&m.request)).collect());
        assert_eq!(authorize_requests_from_json(&json).unwrap(), authorize_requests(&mix));
        let batches = spec.batches(3, 5);
        let json = Value::Array(batches.iter().map(|(p, items)| gen::batch_json(p, items)).collect());
        assert_eq!(batch_requests_from_json(&json).unwrap(), batch_requests(&batches));
    }
}
