//! The `tagward` command: thin wiring from the command line to the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};

use tagward::grpc::client::GrpcBackend;
use tagward::grpc::proto::authorizer_client::AuthorizerClient;
use tagward::grpc::proto::{self, Decision, Reason};
use tagward::grpc::server::{self, Config};
use tagward::scenario::{self, Backend, InProcess};
use tagward::audit::AuditLog;
use tagward::observe::{DecisionLog, LogMode};
use tagward::store::{Durability, Opened, Store};
use tagward::world::WorldSpec;

#[derive(Parser)]
#[command(name = "tagward", version, about = "An authorization sidecar that decides like AWS IAM and KMS with tag-based access control")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum DecisionLogMode {
    All,
    Deny,
    Sample,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: Authorizer and Tagging (plus health and reflection)
    /// on --listen, Admin on --admin-listen.
    Serve {
        /// Data-plane address.
        #[arg(long, env = "TAGWARD_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Admin address; beyond loopback it needs --admin-token.
        #[arg(long, env = "TAGWARD_ADMIN_LISTEN", default_value = "127.0.0.1:50052")]
        admin_listen: SocketAddr,
        /// Bearer token every admin call must carry.
        #[arg(long, env = "TAGWARD_ADMIN_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
        admin_token: Option<String>,
        /// A file holding the admin token (a mounted Secret).
        #[arg(long, env = "TAGWARD_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
        admin_token_file: Option<PathBuf>,
        /// The world to start from (JSON or YAML: policies, principals,
        /// resources). It seeds an empty data directory only; state the
        /// directory already holds is kept (see --force-world).
        #[arg(long, env = "TAGWARD_WORLD")]
        world: Option<PathBuf>,
        /// Where state is kept: every acknowledged change is synced here
        /// first, and a restart restores it.
        #[arg(long, env = "TAGWARD_DATA_DIR", default_value = "tagward-data", conflicts_with = "ephemeral")]
        data_dir: PathBuf,
        /// Replace the state the data directory holds with --world (as one
        /// logged change, so the revision still grows).
        #[arg(long, env = "TAGWARD_FORCE_WORLD", requires = "world")]
        force_world: bool,
        /// Keep state in memory only: a restart starts again from --world.
        #[arg(long, env = "TAGWARD_EPHEMERAL")]
        ephemeral: bool,
        /// Log bytes after which a snapshot is written and older files removed.
        #[arg(long, env = "TAGWARD_COMPACT_AFTER_BYTES", default_value_t = 64 * 1024 * 1024)]
        compact_after_bytes: u64,
        /// How long a request with min_revision may wait, in milliseconds.
        #[arg(long, env = "TAGWARD_MIN_REVISION_WAIT_MS", default_value_t = 2000)]
        min_revision_wait_ms: u64,
        /// Largest gRPC message accepted or sent, in bytes.
        #[arg(long, env = "TAGWARD_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
        max_message_bytes: usize,
        /// Most items in one BatchAuthorize.
        #[arg(long, env = "TAGWARD_MAX_BATCH", default_value_t = 1000)]
        max_batch: usize,
        /// Change events kept for Admin.Watch resumption.
        #[arg(long, env = "TAGWARD_WATCH_EVENTS", default_value_t = 100_000)]
        watch_events: usize,
        /// Seconds in-flight calls get to finish at shutdown.
        #[arg(long, env = "TAGWARD_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
        shutdown_grace_secs: u64,
        /// Log format; the level comes from TAGWARD_LOG (default info), an
        /// env filter such as `tagward=debug` (which also shows one span per
        /// RPC with its action and decision).
        #[arg(long, env = "TAGWARD_LOG_FORMAT", value_enum, default_value = "plain")]
        log_format: LogFormat,
        /// The audit trail (CloudTrail-shaped JSON lines, synced before each
        /// change is acknowledged). Default: audit.jsonl in the data
        /// directory; none with --ephemeral unless given.
        #[arg(long, env = "TAGWARD_AUDIT_LOG")]
        audit_log: Option<PathBuf>,
        /// Log decisions (JSON lines) to this file; off when not given.
        #[arg(long, env = "TAGWARD_DECISION_LOG")]
        decision_log: Option<PathBuf>,
        /// Which decisions to log.
        #[arg(long, env = "TAGWARD_DECISION_LOG_MODE", value_enum, default_value = "all")]
        decision_log_mode: DecisionLogMode,
        /// With --decision-log-mode sample: log one decision in N.
        #[arg(long, env = "TAGWARD_DECISION_LOG_SAMPLE", default_value_t = 100)]
        decision_log_sample: u64,
        /// Decision-log records that may wait to be written; more are
        /// dropped (and counted), never slowing Authorize.
        #[arg(long, env = "TAGWARD_DECISION_LOG_QUEUE", default_value_t = 65536)]
        decision_log_queue: usize,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
        /// 127.0.0.1:9464); off when not given.
        #[arg(long, env = "TAGWARD_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Run scenario files (JSON or YAML; directories are searched
    /// recursively) and report every failing step. Exit code 0 when all
    /// steps pass, 1 when a step fails, 2 when a file cannot be loaded.
    Test {
        /// Scenario files or directories.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Run the steps against a sidecar at this data-plane address
        /// instead of in-process (each scenario's world replaces the
        /// sidecar's state through the admin API).
        #[arg(long, requires = "admin")]
        server: Option<String>,
        /// The sidecar's admin address, with --server.
        #[arg(long, requires = "server")]
        admin: Option<String>,
        /// The admin token, with --server.
        #[arg(long, env = "TAGWARD_ADMIN_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
        token: Option<String>,
    },
    /// Write the whole state of a data directory (of a stopped sidecar, or
    /// a copy) as a world file, for backup and inspection.
    Export {
        /// The data directory.
        #[arg(long, env = "TAGWARD_DATA_DIR", default_value = "tagward-data")]
        data_dir: PathBuf,
        /// Where to write (JSON); standard output when not given.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Replace the state of a data directory with a world file (the sidecar
    /// must be stopped); the revision keeps growing.
    Import {
        #[arg(long, env = "TAGWARD_DATA_DIR", default_value = "tagward-data")]
        data_dir: PathBuf,
        /// The world file (JSON or YAML), e.g. from `tagward export`.
        world: PathBuf,
    },
    /// Ask a running sidecar one question and print the answer. Exit code
    /// 0: Allow, 1: Deny, 2: the question could not be asked or answered.
    Authorize(AskArgs),
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
    /// empty handler (`tagward baseline-server`), at half of the measured
    /// peak, and with admin tag changes under load (see BENCHMARKS.md).
    Load(LoadArgs),
    /// Bench only: serve `tagward.v1.Authorizer` with empty handlers (the
    /// same messages, no decision), the baseline for `tagward load`.
    BaselineServer {
        #[arg(long, default_value = "127.0.0.1:50053")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 4 * 1024 * 1024)]
        max_message_bytes: usize,
    },
}

/// `tagward authorize`: one Authorize call.
#[derive(clap::Args)]
struct AskArgs {
    /// The sidecar's data-plane address.
    #[arg(long, env = "TAGWARD_ADDR", default_value = "127.0.0.1:50051")]
    server: String,
    /// An IAM user, role, assumed-role session or account-root ARN.
    #[arg(long)]
    principal: String,
    /// service:Action, e.g. kms:Decrypt.
    #[arg(long)]
    action: String,
    /// An ARN, or "*" for actions without a resource.
    #[arg(long)]
    resource: String,
    /// A request tag KEY=VALUE, aws:RequestTag/KEY (repeatable).
    #[arg(long = "request-tag", value_name = "KEY=VALUE")]
    request_tags: Vec<String>,
    /// A key of aws:TagKeys (repeatable); without it, the request tags' keys.
    #[arg(long = "tag-key", value_name = "KEY")]
    tag_keys: Vec<String>,
    /// A session tag KEY=VALUE (repeatable; assumed-role sessions only).
    #[arg(long = "session-tag", value_name = "KEY=VALUE")]
    session_tags: Vec<String>,
    /// Any other condition key KEY=VALUE, e.g. aws:SourceIp=10.0.0.1
    /// (repeatable; a key given more than once becomes a multivalued key).
    #[arg(long = "context", value_name = "KEY=VALUE")]
    context: Vec<String>,
    /// Answer at this revision or a later one (the sidecar waits up to its
    /// --min-revision-wait-ms, then fails).
    #[arg(long, default_value_t = 0)]
    min_revision: u64,
    /// Show every statement considered.
    #[arg(long)]
    explain: bool,
    /// Print the answer as one JSON object.
    #[arg(long)]
    json: bool,
}

/// The generated world's shape (`tagward gen-world`, `tagward load`).
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
    fn spec(&self) -> tagward::gen::GenSpec {
        tagward::gen::GenSpec {
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
    /// The empty Authorizer (`tagward baseline-server`): the same load runs
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            admin_listen,
            admin_token,
            admin_token_file,
            world,
            data_dir,
            force_world,
            ephemeral,
            compact_after_bytes,
            min_revision_wait_ms,
            max_message_bytes,
            max_batch,
            watch_events,
            shutdown_grace_secs,
            log_format,
            audit_log,
            decision_log,
            decision_log_mode,
            decision_log_sample,
            decision_log_queue,
            metrics_listen,
        } => {
            init_logs(log_format);
            let admin_token = match (admin_token, admin_token_file) {
                (Some(t), _) => Some(t),
                (None, Some(path)) => match std::fs::read_to_string(&path) {
                    Ok(t) => Some(t.trim().to_string()),
                    Err(e) => {
                        error!(file = %path.display(), error = %e, "cannot read the admin token file");
                        return ExitCode::from(2);
                    }
                },
                (None, None) => None,
            };
            let config = Config {
                listen,
                admin_listen,
                admin_token,
                min_revision_wait: Duration::from_millis(min_revision_wait_ms),
                max_message_bytes,
                max_batch,
                shutdown_grace: Duration::from_secs(shutdown_grace_secs),
                decision_log: None,
            };
            let storage = (!ephemeral).then(|| Durability { compact_after_bytes, event_capacity: watch_events });
            let observe = Observe {
                audit_log: audit_log.or_else(|| (!ephemeral).then(|| data_dir.join("audit.jsonl"))),
                decision_log: decision_log.map(|path| {
                    let mode = match decision_log_mode {
                        DecisionLogMode::All => LogMode::All,
                        DecisionLogMode::Deny => LogMode::DeniesOnly,
                        DecisionLogMode::Sample => LogMode::Sample(decision_log_sample.max(1)),
                    };
                    (path, mode, decision_log_queue)
                }),
                metrics: metrics_listen,
            };
            serve(config, world.as_deref(), &data_dir, storage, force_world, watch_events, observe)
        }
        Command::Export { data_dir, output } => export(&data_dir, output.as_deref()),
        Command::Import { data_dir, world } => import(&data_dir, &world),
        Command::Test { paths, server, admin, token } => match (server, admin) {
            (Some(server), Some(admin)) => match GrpcBackend::connect(&server, &admin, token) {
                Ok(mut backend) => run_tests(&paths, &mut backend),
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            },
            _ => run_tests(&paths, &mut InProcess::default()),
        },
        Command::Authorize(args) => ask(args),
        Command::GenWorld { out, world, requests, batches, batch_size } => {
            gen_world(&out, &world.spec(), requests, batches, batch_size)
        }
        Command::Load(args) => load(args),
        Command::BaselineServer { listen, max_message_bytes } => baseline_server(listen, max_message_bytes),
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TAGWARD_LOG").unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Reads a world file (JSON, or YAML by extension).
fn load_world(path: &Path) -> Result<WorldSpec, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
    let value: serde_json::Value = if yaml {
        serde_norway::from_str(&text).map_err(|e| format!("{}: not valid YAML: {e}", path.display()))?
    } else {
        serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))?
    };
    serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}: {}", path.display(), e.path(), e.inner()))
}

/// Audit, decision log and metrics settings of `serve`.
struct Observe {
    audit_log: Option<PathBuf>,
    decision_log: Option<(PathBuf, LogMode, usize)>,
    metrics: Option<SocketAddr>,
}

fn serve(
    mut config: Config,
    world: Option<&Path>,
    data_dir: &Path,
    durability: Option<Durability>,
    force_world: bool,
    watch_events: usize,
    observe: Observe,
) -> ExitCode {
    let seed = match world.map(load_world).transpose() {
        Ok(seed) => seed,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    // Opened first: the store writes to it from the first change it makes
    // (a forced world file included).
    let audit = match &observe.audit_log {
        Some(path) => match AuditLog::open(path) {
            Ok(log) => {
                info!(file = %path.display(), "audit trail");
                Some(log)
            }
            Err(e) => {
                error!(file = %path.display(), error = %e, "cannot open the audit log");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let store = match durability {
        None => match seed.as_ref().map(WorldSpec::build).transpose() {
            Ok(state) => {
                info!("ephemeral: state is kept in memory only");
                match Store::ephemeral(state.unwrap_or_default(), watch_events, audit) {
                    Ok(store) => store,
                    Err(e) => {
                        error!("{e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            Err(e) => {
                error!("the world file: {e}");
                return ExitCode::from(2);
            }
        },
        Some(options) => match Store::open(data_dir, seed.as_ref(), force_world, &options, audit) {
            Ok((store, opened)) => {
                report_opened(data_dir, &opened, seed.is_some());
                store
            }
            Err(e) => {
                error!("cannot open the data directory: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let (policies, principals, resources) = store.snapshot().counts();
    info!(policies, principals, resources, revision = store.revision(), "state ready");
    let runtime = match multi_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        if let Some(addr) = observe.metrics {
            if let Err(e) = tagward::observe::install_exporter(addr) {
                error!("{e}");
                return ExitCode::from(2);
            }
            info!(%addr, "metrics at /metrics");
            tagward::observe::published(&store.snapshot());
            let ages = store.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    metrics::gauge!(tagward::observe::SNAPSHOT_AGE).set(ages.snapshot_age().as_secs_f64());
                }
            });
        }
        if let Some((path, mode, queue)) = &observe.decision_log {
            match DecisionLog::start(path, *mode, *queue) {
                Ok(log) => {
                    info!(file = %path.display(), "decision log");
                    config.decision_log = Some(log);
                }
                Err(e) => {
                    error!(file = %path.display(), error = %e, "cannot open the decision log");
                    return ExitCode::from(2);
                }
            }
        }
        let running = match server::start(config, store).await {
            Ok(r) => r,
            Err(e) => {
                error!("{e}");
                return ExitCode::from(2);
            }
        };
        running.run_until(stop_signal()).await;
        ExitCode::SUCCESS
    })
}

fn report_opened(dir: &Path, opened: &Opened, had_world: bool) {
    if let Some(cut) = &opened.cut {
        warn!(file = %cut.path.display(), offset = cut.offset, bytes = cut.bytes, reason = %cut.reason,
            "cut a torn tail off the log (a write interrupted by a crash; it was never acknowledged)");
    }
    match (opened.restored, opened.seeded, opened.replaced) {
        (Some(rev), _, true) => info!(dir = %dir.display(), restored = rev, "replaced the restored state with the world file (--force-world)"),
        (Some(rev), _, false) => {
            info!(dir = %dir.display(), revision = rev, replayed = opened.replayed, "restored the acknowledged state");
            if had_world {
                info!("the data directory already holds state, so the world file is not applied (--force-world replaces it)");
            }
        }
        (None, true, _) => info!(dir = %dir.display(), "seeded the empty data directory from the world file"),
        (None, false, _) => info!(dir = %dir.display(), "starting with an empty data directory"),
    }
}

fn offline_options() -> Durability {
    Durability { compact_after_bytes: u64::MAX, event_capacity: 1 }
}

fn export(dir: &Path, output: Option<&Path>) -> ExitCode {
    if !dir.is_dir() {
        eprintln!("{}: no such data directory", dir.display());
        return ExitCode::from(2);
    }
    let (store, _) = match Store::open(dir, None, false, &offline_options(), None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot open the data directory: {e}");
            return ExitCode::from(2);
        }
    };
    let state = store.snapshot();
    let text = match serde_json::to_string_pretty(&WorldSpec::from_state(&state)) {
        Ok(t) => t + "\n",
        Err(e) => {
            eprintln!("cannot encode the state: {e}");
            return ExitCode::FAILURE;
        }
    };
    let written = match output {
        Some(path) => std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display())),
        None => std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()).map_err(|e| e.to_string()),
    };
    match written {
        Ok(()) => {
            eprintln!("exported revision {} of {}", state.revision(), dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn import(dir: &Path, world: &Path) -> ExitCode {
    let seed = match load_world(world) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = seed.build() {
        eprintln!("{}: {e}", world.display());
        return ExitCode::from(2);
    }
    // The replacement is audited in the directory's default audit file, the
    // one `serve` writes by default.
    let audit_path = dir.join("audit.jsonl");
    let audit = match AuditLog::open(&audit_path) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("{}: cannot open the audit log: {e}", audit_path.display());
            return ExitCode::from(2);
        }
    };
    match Store::open(dir, Some(&seed), true, &offline_options(), Some(audit)) {
        Ok((store, _)) => {
            eprintln!("imported {} into {} at revision {}", world.display(), dir.display(), store.revision());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot import: {e}");
            ExitCode::from(2)
        }
    }
}

/// The multi-threaded runtime the servers run on, or the exit code after
/// logging why it could not start.
fn multi_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        error!(error = %e, "cannot start the runtime");
        ExitCode::FAILURE
    })
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn run_tests(paths: &[PathBuf], backend: &mut dyn Backend) -> ExitCode {
    let (files, mut load_failed) = match scenario::collect(paths) {
        Ok(files) => (files, false),
        Err(e) => {
            eprintln!("{e}");
            (Vec::new(), true)
        }
    };
    let (mut passed, mut failed) = (0usize, 0usize);
    for file in &files {
        match scenario::load(file) {
            Ok(s) => {
                let report = scenario::run(&s, backend);
                passed += report.passed;
                failed += report.failures.len();
                for line in &report.failures {
                    println!("{line}");
                }
            }
            Err(e) => {
                eprintln!("{e}");
                load_failed = true;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if load_failed {
        ExitCode::from(2)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `KEY=VALUE` from a repeatable flag.
fn key_value<'a>(flag: &str, text: &'a str) -> Result<(&'a str, &'a str), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k, v)),
        _ => Err(format!("--{flag} {text:?}: expected KEY=VALUE")),
    }
}

/// The Authorize request `tagward authorize` sends.
fn ask_request(args: &AskArgs) -> Result<proto::AuthorizeRequest, String> {
    let tags = |flag: &str, list: &[String]| -> Result<Vec<proto::Tag>, String> {
        list.iter()
            .map(|t| key_value(flag, t).map(|(k, v)| proto::Tag { key: k.to_string(), value: v.to_string() }))
            .collect()
    };
    let mut context: std::collections::HashMap<String, proto::ContextValue> = std::collections::HashMap::new();
    for entry in &args.context {
        let (k, v) = key_value("context", entry)?;
        use proto::context_value::Kind;
        let value = context.entry(k.to_string()).or_insert(proto::ContextValue { kind: None });
        value.kind = Some(match value.kind.take() {
            None => Kind::StringValue(v.to_string()),
            Some(Kind::StringValue(first)) => Kind::ListValue(proto::StringList { values: vec![first, v.to_string()] }),
            Some(Kind::ListValue(mut list)) => {
                list.values.push(v.to_string());
                Kind::ListValue(list)
            }
            Some(other) => other,
        });
    }
    Ok(proto::AuthorizeRequest {
        principal: args.principal.clone(),
        action: args.action.clone(),
        resource: args.resource.clone(),
        request_tags: tags("request-tag", &args.request_tags)?,
        tag_keys: (!args.tag_keys.is_empty()).then(|| proto::StringList { values: args.tag_keys.clone() }),
        session_tags: tags("session-tag", &args.session_tags)?,
        context,
        min_revision: args.min_revision,
        explain: args.explain,
    })
}

fn ask(args: AskArgs) -> ExitCode {
    let request = match ask_request(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let server = args.server.as_str();
    let uri = if server.contains("://") { server.to_string() } else { format!("http://{server}") };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let answer = runtime.block_on(async {
        let mut client = AuthorizerClient::connect(uri).await.map_err(|e| format!("cannot reach {server}: {e}"))?;
        client.authorize(request).await.map(|r| r.into_inner()).map_err(|s| {
            let name = tagward::grpc::error_name(&s).map(|n| format!(" {n}")).unwrap_or_default();
            format!("{:?}{name}: {}", s.code(), s.message())
        })
    });
    let r = match answer {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let allowed = r.decision == Decision::Allow as i32;
    let reason = Reason::try_from(r.reason).map(|x| x.as_str_name()).unwrap_or("REASON_UNSPECIFIED");
    let statement = |s: &proto::StatementRef| {
        serde_json::json!({"policy": s.policy, "index": s.index, "sid": s.sid, "effect": s.effect})
    };
    if args.json {
        let out = serde_json::json!({
            "decision": if allowed { "Allow" } else { "Deny" },
            "reason": reason,
            "revision": r.revision,
            "matched": r.matched.iter().map(statement).collect::<Vec<_>>(),
            "missing_keys": r.missing_keys,
            "considered": r.considered.iter().map(|c| serde_json::json!({
                "statement": c.statement.as_ref().map(statement),
                "outcome": c.outcome,
            })).collect::<Vec<_>>(),
        });
        println!("{out}");
    } else {
        println!("{} ({reason}) at revision {}", if allowed { "Allow" } else { "Deny" }, r.revision);
        for s in &r.matched {
            println!("  decided by {}[{}] {:?} ({})", s.policy, s.index, s.sid, s.effect);
        }
        if !r.missing_keys.is_empty() {
            println!("  missing condition keys: {}", r.missing_keys.join(", "));
        }
        for c in &r.considered {
            if let Some(s) = &c.statement {
                println!("  considered {}[{}] {:?}: {}", s.policy, s.index, s.sid, c.outcome);
            }
        }
    }
    if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
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

fn gen_world(out: &Path, spec: &tagward::gen::GenSpec, requests: usize, batches: usize, batch_size: usize) -> ExitCode {
    use std::io::Write as _;
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(out)?;
        let mut world = std::io::BufWriter::new(std::fs::File::create(out.join("world.json"))?);
        spec.write_world(&mut world)?;
        world.flush()?;
        let mix: Vec<serde_json::Value> = spec.mix(requests).iter().map(|m| tagward::gen::authorize_json(&m.request)).collect();
        std::fs::write(out.join("authorize.json"), serde_json::to_string(&mix)? + "\n")?;
        let batch: Vec<serde_json::Value> =
            spec.batches(batches, batch_size).iter().map(|(p, items)| tagward::gen::batch_json(p, items)).collect();
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
    use tagward::grpc::load;
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
        (None, LoadCall::Authorize) => load::Requests::Authorize(Arc::new(load::authorize_requests(&args.world.spec().mix(args.requests)))),
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
    init_logs(LogFormat::Plain);
    let runtime = match multi_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        match tagward::grpc::baseline::start(listen, max_message_bytes).await {
            Ok(b) => {
                info!(addr = %b.addr, "serving the empty Authorizer (bench baseline: no decisions)");
                b.run_until(stop_signal()).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!("{e}");
                ExitCode::from(2)
            }
        }
    })
}
