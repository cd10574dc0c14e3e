//! The `tagward` command: thin wiring from the command line to the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};

use tagward::audit::AuditLog;
use tagward::grpc::client::GrpcBackend;
use tagward::grpc::proto::authorizer_client::AuthorizerClient;
use tagward::grpc::proto::{self, Decision, Reason};
use tagward::grpc::server::{self, stop_signal, Config};
use tagward::observe::{DecisionLog, LogMode};
use tagward::scenario::{self, Backend, InProcess};
use tagward::store::{Durability, OpenError, Opened, Store, MEMORY_COMPACT_AFTER};
use tagward::world::WorldSpec;

#[derive(Parser)]
#[command(
    name = "tagward",
    version,
    about = "An authorization sidecar that decides like AWS IAM and KMS with tag-based access control"
)]
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
            let storage = (!ephemeral).then_some(Durability { compact_after_bytes, event_capacity: watch_events });
            let observe = Observe {
                audit_log: audit_log.or_else(|| (!ephemeral).then_some(data_dir.join("audit.jsonl"))),
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
        None => {
            let options = Durability { compact_after_bytes: MEMORY_COMPACT_AFTER, event_capacity: watch_events };
            match Store::open_memory(seed.as_ref(), &options, audit) {
                Ok((store, _)) => {
                    info!("ephemeral: state is kept in memory only");
                    store
                }
                Err(e @ OpenError::World(_)) => {
                    error!("{e}");
                    return ExitCode::from(2);
                }
                Err(e) => {
                    error!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Some(options) => match Store::open_dir(data_dir, seed.as_ref(), force_world, &options, audit) {
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
        (Some(rev), _, true) => {
            info!(dir = %dir.display(), restored = rev, "replaced the restored state with the world file (--force-world)")
        }
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
    let (store, _) = match Store::open_dir(dir, None, false, &offline_options(), None) {
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
    match Store::open_dir(dir, Some(&seed), true, &offline_options(), Some(audit)) {
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
        list.iter().map(|t| key_value(flag, t).map(|(k, v)| proto::Tag { key: k.to_string(), value: v.to_string() })).collect()
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
    let statement =
        |s: &proto::StatementRef| serde_json::json!({"policy": s.policy, "index": s.index, "sid": s.sid, "effect": s.effect});
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
