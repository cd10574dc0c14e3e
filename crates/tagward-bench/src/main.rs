//! `tagward-bench`: the benchmark tools, kept out of the `tagward` binary:
//! `gen-world` (a seeded world and request mix), `load` (a ghz-like load
//! generator) and `baseline-server` (the empty Authorizer). BENCHMARKS.md
//! says how each figure is measured with them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};

use tagward::grpc::server::stop_signal;

#[derive(Parser)]
#[command(
    name = "tagward-bench",
    version,
    about = "Benchmark tools for Tagward: world generator, load generator, empty-handler baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a seeded, reproducible world (keys and buckets with tags,
    /// tagged roles, ABAC policies) and a matching request mix as ghz data
    /// files (see BENCHMARKS.md).
    GenWorld {
        /// The directory to write world.json, authorize.json, batch.json
        /// and spec.json into.
        #[arg(long, default_value = "bench-world")]
        out: PathBuf,
        #[command(flatten)]
        world: GenArgs,
        /// Authorize requests in authorize.json.
        #[arg(long, default_value_t = 10_000)]
        requests: usize,
        /// BatchAuthorize requests in batch.json.
        #[arg(long, default_value_t = 1_000)]
        batches: usize,
        /// Items per batch.
        #[arg(long, default_value_t = 10)]
        batch_size: usize,
    },
    /// Load-test a sidecar (ghz-like): Authorize or BatchAuthorize from a
    /// ghz data file or the generated mix; optionally side by side with the
    /// empty handler (`tagward-bench baseline-server`), at half of the measured
    /// peak, and with admin tag changes under load (see BENCHMARKS.md).
    Load(Box<LoadArgs>),
    /// Fleet mode on loopback: starts etcd and three `tagward serve --store
    /// etcd://...`, then measures how soon a change acknowledged by one
    /// sidecar is visible on the others, and write throughput through one
    /// and three sidecars (see BENCHMARKS.md).
    Fleet {
        /// The tagward binary (default: beside this one).
        #[arg(long)]
        tagward: Option<PathBuf>,
        /// The etcd binary.
        #[arg(long, default_value = "etcd")]
        etcd: String,
        /// Changes measured for visibility.
        #[arg(long, default_value_t = 1000)]
        changes: usize,
        /// Concurrent writers for the throughput runs (each on a key of its own).
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Writes per throughput run.
        #[arg(long, default_value_t = 4000)]
        writes: usize,
        /// Where etcd keeps its data (default: a temporary directory); a
        /// tmpfs such as /dev/shm takes the disk's fsync out of the figures.
        #[arg(long)]
        etcd_data: Option<PathBuf>,
    },
    /// Bench only: serve `tagward.v1.Authorizer` with empty handlers (the
    /// same messages, no decision), the baseline for `tagward-bench load`.
    BaselineServer {
        #[arg(long, default_value = "127.0.0.1:50053")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 4 * 1024 * 1024)]
        max_message_bytes: usize,
    },
}

/// The generated world's shape (`tagward gen-world`, `tagward-bench load`).
#[derive(clap::Args, Clone)]
struct GenArgs {
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// KMS keys.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// S3 buckets.
    #[arg(long, default_value_t = 1_000)]
    buckets: usize,
    /// Tags on every key and bucket.
    #[arg(long, default_value_t = 10)]
    tags: usize,
    /// Roles.
    #[arg(long, default_value_t = 100)]
    principals: usize,
    /// Managed ABAC policies.
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    /// Policies each role attaches.
    #[arg(long, default_value_t = 10)]
    attach: usize,
    /// Distinct Project tag values.
    #[arg(long, default_value_t = 50)]
    projects: usize,
}

impl GenArgs {
    fn spec(&self) -> tagward_bench::gen::GenSpec {
        tagward_bench::gen::GenSpec {
            seed: self.seed,
            keys: self.keys,
            other_resources: self.buckets,
            tags: self.tags,
            principals: self.principals,
            policies: self.policies,
            attach: self.attach,
            projects: self.projects,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LoadCall {
    Authorize,
    Batch,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// The sidecar's data-plane address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    target: String,
    #[arg(long, value_enum, default_value = "authorize")]
    call: LoadCall,
    /// A ghz data file (JSON: one request or a list, sent round-robin);
    /// without it, the generated mix for the world flags below.
    #[arg(long, short = 'D')]
    data: Option<PathBuf>,
    #[command(flatten)]
    world: GenArgs,
    /// Distinct requests generated (without --data).
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Items per batch (generated BatchAuthorize).
    #[arg(long, default_value_t = 10)]
    batch_size: usize,
    /// Concurrent workers.
    #[arg(long, short = 'c', default_value_t = 50)]
    concurrency: usize,
    /// HTTP/2 connections the workers share.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Requests per run (default 200 when no --duration).
    #[arg(long, short = 'n')]
    total: Option<u64>,
    /// Length of a run: 10s, 500ms, 2m.
    #[arg(long, short = 'z', value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Requests per second over all workers (default: unlimited).
    #[arg(long)]
    rate: Option<f64>,
    /// Requests sent to each address before measuring.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Per-call timeout.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    timeout: Duration,
    /// The empty Authorizer (`tagward-bench baseline-server`): the same load runs
    /// against it, alternating with the target, and the report gives the
    /// throughput ratio.
    #[arg(long)]
    baseline: Option<String>,
    /// Runs against the baseline and the target, alternating.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Then run the target at half its measured peak rate.
    #[arg(long)]
    half_peak: bool,
    /// The admin address, for --tag-changes-per-sec.
    #[arg(long)]
    admin: Option<String>,
    #[arg(long, env = "TAGWARD_ADMIN_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
    admin_token: Option<String>,
    /// Flip probe keys' tags on the admin stream at this rate during the
    /// load (the half-peak run when there is one) and time when Authorize
    /// sees each change.
    #[arg(long, requires = "admin")]
    tag_changes_per_sec: Option<f64>,
    /// The target server's process id (a server on this machine): its CPU
    /// time is read from /proc/PID/stat around each measured run, and the
    /// report gives the server CPU per call.
    #[arg(long)]
    target_pid: Option<u32>,
    /// The baseline server's process id, likewise; with --target-pid the
    /// report gives the CPU ratio (the baseline's CPU per call ÷ the
    /// target's). Use with --rate for the fixed-rate comparison.
    #[arg(long, requires = "baseline")]
    baseline_pid: Option<u32>,
    /// Worker threads of the load generator's runtime (default: all cores).
    #[arg(long)]
    cpus: Option<usize>,
    #[arg(long, value_enum, default_value = "text")]
    format: ReportFormat,
    /// Write the report here instead of standard output.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// A name for the report.
    #[arg(long, default_value = "")]
    name: String,
}

/// The sidecar's allocator (src/main.rs), so that `baseline-server` and the
/// load tool allocate the way `tagward serve` does.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::GenWorld { out, world, requests, batches, batch_size } => {
            gen_world(&out, &world.spec(), requests, batches, batch_size)
        }
        Command::Load(args) => load(*args),
        Command::BaselineServer { listen, max_message_bytes } => baseline_server(listen, max_message_bytes),
        Command::Fleet { tagward, etcd, changes, writers, writes, etcd_data } => {
            let tagward = tagward.unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("tagward")))
                    .unwrap_or_else(|| "tagward".into())
            });
            fleet(tagward_bench::fleet::FleetBench { tagward, etcd, changes, writers, writes, etcd_dir: etcd_data })
        }
    }
}

fn fleet(bench: tagward_bench::fleet::FleetBench) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tagward-bench fleet: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(tagward_bench::fleet::run(&bench)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tagward-bench fleet: {e}");
            ExitCode::from(1)
        }
    }
}

/// `10s`, `500ms`, `2m`, `1h`, or bare seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: f64 = number.parse().map_err(|_| format!("{text:?}: expected a duration like 10s, 500ms, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

fn gen_world(out: &Path, spec: &tagward_bench::gen::GenSpec, requests: usize, batches: usize, batch_size: usize) -> ExitCode {
    use std::io::Write as _;
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(out)?;
        let mut world = std::io::BufWriter::new(std::fs::File::create(out.join("world.json"))?);
        spec.write_world(&mut world)?;
        world.flush()?;
        let mix: Vec<serde_json::Value> =
            spec.mix(requests).iter().map(|m| tagward_bench::gen::authorize_json(&m.request)).collect();
        std::fs::write(out.join("authorize.json"), serde_json::to_string(&mix)? + "\n")?;
        let batch: Vec<serde_json::Value> =
            spec.batches(batches, batch_size).iter().map(|(p, items)| tagward_bench::gen::batch_json(p, items)).collect();
        std::fs::write(out.join("batch.json"), serde_json::to_string(&batch)? + "\n")?;
        std::fs::write(out.join("spec.json"), serde_json::to_string_pretty(spec)? + "\n")?;
        Ok(())
    };
    match write() {
        Ok(()) => {
            eprintln!(
                "wrote {}: world.json ({} keys, {} buckets, {} tags each, {} roles, {} policies), authorize.json ({requests} requests), batch.json ({batches} x {batch_size})",
                out.display(),
                spec.keys,
                spec.other_resources,
                spec.tags,
                spec.principals,
                spec.policies
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

fn load(args: LoadArgs) -> ExitCode {
    use tagward_bench::load;
    let requests = match (&args.data, args.call) {
        (Some(path), call) => {
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|e| format!("not valid JSON: {e}")))
                .and_then(|v| match call {
                    LoadCall::Authorize => load::authorize_requests_from_json(&v).map(|r| load::Requests::Authorize(Arc::new(r))),
                    LoadCall::Batch => load::batch_requests_from_json(&v).map(|r| load::Requests::Batch(Arc::new(r))),
                });
            match parsed {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
        }
        (None, LoadCall::Authorize) => {
            load::Requests::Authorize(Arc::new(load::authorize_requests(&args.world.spec().mix(args.requests))))
        }
        (None, LoadCall::Batch) => load::Requests::Batch(Arc::new(load::batch_requests(
            &args.world.spec().batches(args.requests.div_ceil(args.batch_size.max(1)), args.batch_size),
        ))),
    };
    let plan = load::Plan {
        target: args.target,
        requests,
        options: load::Options {
            concurrency: args.concurrency,
            connections: args.connections,
            total: args.total.or(if args.duration.is_none() { Some(200) } else { None }),
            duration: args.duration,
            rate: args.rate,
            warmup: args.warmup,
            timeout: args.timeout,
        },
        baseline: args.baseline,
        rounds: args.rounds,
        half_peak: args.half_peak,
        tag_changes: args.tag_changes_per_sec.zip(args.admin).map(|(rate, admin)| load::TagChanges {
            admin,
            token: args.admin_token,
            rate,
        }),
        name: args.name,
        target_pid: args.target_pid,
        baseline_pid: args.baseline_pid,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.cpus {
        runtime.worker_threads(n.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(load::run(&plan)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let text = match args.format {
        ReportFormat::Text => report.text(),
        ReportFormat::Json => serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
    };
    let written = match &args.output {
        Some(path) => std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display())),
        None => std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()).map_err(|e| e.to_string()),
    };
    if let Err(e) = written {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    let ok = report.status_code_distribution.get("OK").copied().unwrap_or(0);
    if ok == 0 || ok < report.count {
        eprintln!("{} of {} calls failed", report.count - ok, report.count);
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn baseline_server(listen: SocketAddr, max_message_bytes: usize) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TAGWARD_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let stop = stop_signal();
        match tagward_bench::baseline::start(listen, max_message_bytes).await {
            Ok(b) => {
                info!(addr = %b.addr, "serving the empty Authorizer (bench baseline: no decisions)");
                b.run_until(stop).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!("{e}");
                ExitCode::from(2)
            }
        }
    })
}
