//! The `tagward` command: thin wiring from the command line to the library.
//!
//! Each command's flags are a `clap::Args` struct (serve's in groups), turned
//! into the components' configurations with `TryFrom`; [`run`] does the
//! work and [`main`] is the one place that prints a failure and picks the
//! exit code (2: bad input or an unusable file, 1: a failed test step, a
//! Deny or an internal failure, 0: success).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};

use tagward::audit::default_node_name;
use tagward::audit::AuditLog;
use tagward::engine;
use tagward::grpc;
use tagward::grpc::client::GrpcBackend;
use tagward::grpc::dial::ClientTls;
use tagward::grpc::etcd::{EtcdTls, EtcdUrl};
use tagward::grpc::identity::{Callers, TaggingMode};
use tagward::grpc::proto;
use tagward::grpc::server::{self, stop_signal, Config};
use tagward::grpc::transport::{ListenAddr, TlsFiles};
use tagward::observe::{self, DecisionLog, DecisionLogConfig, LogMode};
use tagward::ops::{self, Failure, Question};
use tagward::scenario::InProcess;
use tagward::store::{Durability, OpenError, Opened, Store, MEMORY_COMPACT_AFTER};

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
    /// on --listen, Admin on --admin-listen, health alone on --health-listen.
    Serve(Box<ServeArgs>),
    /// Run scenario files (JSON or YAML; directories are searched
    /// recursively) and report every failing step. Exit code 0 when all
    /// steps pass, 1 when a step fails, 2 when a file cannot be loaded.
    Test(TestArgs),
    /// Write the whole state of a data directory (of a stopped sidecar, or
    /// a copy) as a world file, for backup and inspection.
    Export(ExportArgs),
    /// Replace the state of a data directory with a world file (the sidecar
    /// must be stopped); the revision keeps growing.
    Import(ImportArgs),
    /// Ask a running sidecar one question and print the answer. Exit code
    /// 0: Allow, 1: Deny, 2: the question could not be asked or answered.
    Authorize(AskArgs),
}

/// `tagward serve`, in groups (the help lists them in this order).
#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    listeners: Listeners,
    #[command(flatten)]
    callers: ContextArgs,
    #[command(flatten)]
    identity: Identity,
    #[command(flatten)]
    storage: Storage,
    #[command(flatten)]
    limits: Limits,
    #[command(flatten)]
    observability: Observability,
}

/// Where `serve` listens, TLS, and the admin token.
#[derive(clap::Args)]
struct Listeners {
    /// Data-plane address: IP:PORT or unix:///PATH (a Unix socket, mode
    /// 0660, whose callers are known by uid and gid).
    #[arg(long, env = "TAGWARD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: ListenAddr,
    /// Admin address (IP:PORT or unix:///PATH); beyond loopback it needs
    /// --admin-token or --admin-token-file.
    #[arg(long, env = "TAGWARD_ADMIN_LISTEN", default_value = "127.0.0.1:50052")]
    admin_listen: ListenAddr,
    /// A plaintext listener serving grpc.health.v1 only, for probes (IP:PORT
    /// or unix:///PATH); health is also served on --listen.
    #[arg(long, env = "TAGWARD_HEALTH_LISTEN")]
    health_listen: Option<ListenAddr>,
    /// TLS on the data listener: the certificate chain (PEM); reloaded
    /// when the file changes.
    #[arg(long, env = "TAGWARD_TLS_CERT", requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "TAGWARD_TLS_KEY", requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Require client certificates issued by these CAs (PEM) on the data
    /// listener (mTLS).
    #[arg(long, env = "TAGWARD_TLS_CLIENT_CA", requires = "tls_cert", value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
    /// TLS on the admin listener: the certificate chain (PEM); reloaded
    /// when the file changes.
    #[arg(long, env = "TAGWARD_ADMIN_TLS_CERT", requires = "admin_tls_key", value_name = "PEM")]
    admin_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --admin-tls-cert.
    #[arg(long, env = "TAGWARD_ADMIN_TLS_KEY", requires = "admin_tls_cert", value_name = "PEM")]
    admin_tls_key: Option<PathBuf>,
    /// Require client certificates issued by these CAs (PEM) on the admin
    /// listener (mTLS; beyond loopback the token is still required).
    #[arg(long, env = "TAGWARD_ADMIN_TLS_CLIENT_CA", requires = "admin_tls_cert", value_name = "PEM")]
    admin_tls_client_ca: Option<PathBuf>,
    /// Seconds between checks of the TLS files for a rotated certificate
    /// (SIGHUP checks at once).
    #[arg(long, env = "TAGWARD_TLS_RELOAD_SECS", default_value_t = 5)]
    tls_reload_secs: u64,
    /// Bearer token every admin call must carry (one writer, named
    /// `admin` in the audit trail).
    #[arg(long, env = "TAGWARD_ADMIN_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
    admin_token: Option<String>,
    /// Named admin tokens (a mounted Secret): `name: token` lines, `name
    /// (reader): token` for Export and Watch only; `#` comments. Re-read
    /// when it changes; the name is the actor of the changes it makes.
    #[arg(long, env = "TAGWARD_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    admin_token_file: Option<PathBuf>,
}

/// What data-plane callers may put in a request's context.
#[derive(clap::Args)]
struct ContextArgs {
    /// Accept aws:CurrentTime and aws:EpochTime in a request's context
    /// (they override the clock, so a caller chooses the time its
    /// conditions see): for `tagward test --server`, never in production.
    #[arg(long, env = "TAGWARD_ALLOW_CLOCK_OVERRIDE")]
    allow_clock_override: bool,
    /// The only context keys callers may supply: one per line (`#`
    /// comments), or a JSON or YAML list. Key names are case-insensitive;
    /// the keys Tagward fills in are refused whatever the list says.
    #[arg(long, env = "TAGWARD_CONTEXT_KEYS", value_name = "FILE")]
    context_keys: Option<PathBuf>,
}

/// `--tagging`: how much of the Tagging API is served.
#[derive(Clone, Copy, ValueEnum)]
enum TaggingArg {
    /// Not at all: Authorize only (Tagging calls are UNIMPLEMENTED).
    Off,
    /// ListResourceTags and GetResources only.
    ReadOnly,
    /// Everything; writes as a verified caller (see --identity-map).
    On,
}

/// Who `serve` is, and who may write tags through it as which principal.
#[derive(clap::Args)]
struct Identity {
    /// Maps verified caller identities (mTLS URI/DNS SANs, Unix socket
    /// uids) to the principal ARNs they may write tags as (JSON or YAML;
    /// reloaded when it changes). Without it, only local callers (loopback,
    /// a Unix socket) may write, as any principal.
    #[arg(long, env = "TAGWARD_IDENTITY_MAP")]
    identity_map: Option<PathBuf>,
    /// How often the identity map file is checked for changes, in
    /// milliseconds.
    #[arg(long, env = "TAGWARD_IDENTITY_MAP_POLL_MS", default_value_t = 2000)]
    identity_map_poll_ms: u64,
    /// How much of the Tagging API to serve.
    #[arg(long, env = "TAGWARD_TAGGING", value_enum, default_value = "on")]
    tagging: TaggingArg,
    /// This sidecar's name in every audit record (default: the host name).
    #[arg(long, env = "TAGWARD_NODE_NAME")]
    node_name: Option<String>,
}

/// Where `serve` keeps its state and what it starts from.
#[derive(clap::Args)]
struct Storage {
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
    /// Fleet mode: keep the state in etcd under a key prefix, shared by
    /// every sidecar started with the same URL
    /// (etcd://HOST:PORT[,HOST:PORT...]/PREFIX). --world then seeds an
    /// empty prefix only, once.
    #[arg(long, env = "TAGWARD_STORE", conflicts_with_all = ["ephemeral", "force_world"])]
    store: Option<EtcdUrl>,
    /// Fleet mode: health reports NOT_SERVING once the snapshot has not been
    /// known to be etcd's newest state for this many seconds (answers go on,
    /// from the last snapshot, with its revision).
    #[arg(long, env = "TAGWARD_MAX_STALENESS", default_value_t = 5.0)]
    max_staleness: f64,
    /// Fleet mode: how long one etcd request may take, in milliseconds.
    #[arg(long, env = "TAGWARD_ETCD_TIMEOUT_MS", default_value_t = 2000)]
    etcd_timeout_ms: u64,
    /// Fleet mode: at start, how many seconds to keep trying (with
    /// back-off) while etcd cannot be reached before exiting with the
    /// reason; 0 tries once.
    #[arg(long, env = "TAGWARD_ETCD_START_WAIT", default_value_t = 60.0)]
    etcd_start_wait: f64,
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,
}

/// TLS to etcd (fleet mode, import and export with --store).
#[derive(clap::Args, Clone)]
struct EtcdTlsArgs {
    /// The CA bundle (PEM) that signed etcd's certificate: talk to etcd over
    /// TLS.
    #[arg(long, env = "TAGWARD_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's --client-cert-auth; with --etcd-key.
    #[arg(long, env = "TAGWARD_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "TAGWARD_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
}

impl From<&EtcdTlsArgs> for EtcdTls {
    fn from(a: &EtcdTlsArgs) -> EtcdTls {
        EtcdTls { ca: a.etcd_ca.clone(), cert: a.etcd_cert.clone(), key: a.etcd_key.clone() }
    }
}

/// How much `serve` accepts, keeps and waits.
#[derive(clap::Args)]
struct Limits {
    /// How long a request with min_revision may wait, in milliseconds.
    #[arg(long, env = "TAGWARD_MIN_REVISION_WAIT_MS", default_value_t = 2000)]
    min_revision_wait_ms: u64,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "TAGWARD_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Most items in one BatchAuthorize.
    #[arg(long, env = "TAGWARD_MAX_BATCH", default_value_t = 1000)]
    max_batch: usize,
    /// Bytes of remembered decisions: a request decided before against the
    /// same snapshot is answered without deciding it again (never across a
    /// change, never for a decision that read the time). 0 turns it off.
    #[arg(long, env = "TAGWARD_DECISION_CACHE_BYTES", default_value_t = tagward::grpc::decisions::DEFAULT_BYTES)]
    decision_cache_bytes: u64,
    /// Change events kept for Admin.Watch resumption.
    #[arg(long, env = "TAGWARD_WATCH_EVENTS", default_value_t = 100_000)]
    watch_events: usize,
    /// Seconds in-flight calls get to finish at shutdown.
    #[arg(long, env = "TAGWARD_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Connections open at once on each listener; more are closed as they
    /// arrive (logged when the limit is reached).
    #[arg(long, env = "TAGWARD_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// HTTP/2 MAX_CONCURRENT_STREAMS: calls in flight on one connection.
    #[arg(long, env = "TAGWARD_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    max_concurrent_streams: u32,
    /// Seconds a call may take until its response starts (a unary call's
    /// request body included); then it ends CANCELLED.
    #[arg(long, env = "TAGWARD_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    request_timeout_secs: u64,
    /// Seconds between the server's HTTP/2 keepalive pings (0: none).
    #[arg(long, env = "TAGWARD_KEEPALIVE_SECS", default_value_t = 20)]
    keepalive_secs: u64,
    /// Seconds a keepalive ping waits for its answer before the
    /// connection is closed.
    #[arg(long, env = "TAGWARD_KEEPALIVE_TIMEOUT_SECS", default_value_t = 10)]
    keepalive_timeout_secs: u64,
    /// Seconds a connection may send nothing at all (no preface, no
    /// headers, no ping answer) before it is closed.
    #[arg(long, env = "TAGWARD_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    idle_timeout_secs: u64,
}

/// What `serve` logs, audits and measures.
#[derive(clap::Args)]
struct Observability {
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
    /// Bytes after which the audit trail moves to a new file (the full one
    /// becomes NAME.1, older ones NAME.2, ...); 0 never rotates.
    #[arg(long, env = "TAGWARD_AUDIT_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    audit_max_bytes: u64,
    /// Rotated audit files kept; the oldest beyond them is removed.
    #[arg(long, env = "TAGWARD_AUDIT_KEEP", default_value_t = 5)]
    audit_keep: usize,
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
}

/// `tagward test`.
#[derive(clap::Args)]
struct TestArgs {
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
    /// TLS to both addresses (each TCP one; a Unix socket is plaintext).
    #[command(flatten)]
    tls: ClientTlsArgs,
}

/// A client's TLS settings (`tagward test --server`, `tagward authorize`):
/// any of them, or an `https://` address, means TLS. The environment names
/// differ from `serve`'s TAGWARD_TLS_CERT/KEY, the server's certificate.
#[derive(clap::Args)]
struct ClientTlsArgs {
    /// Trust the server certificates these CAs issued (PEM); without it,
    /// the system's CA bundle.
    #[arg(long, env = "TAGWARD_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// The client certificate chain (PEM) for mTLS, with --tls-key.
    #[arg(long, env = "TAGWARD_CLIENT_TLS_CERT", requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "TAGWARD_CLIENT_TLS_KEY", requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// The name the server certificate must carry, when it is not the
    /// address's host (e.g. connecting to an IP address).
    #[arg(long, env = "TAGWARD_TLS_SERVER_NAME", value_name = "NAME")]
    tls_server_name: Option<String>,
}

impl From<ClientTlsArgs> for ClientTls {
    fn from(a: ClientTlsArgs) -> ClientTls {
        ClientTls { ca: a.tls_ca, cert: a.tls_cert, key: a.tls_key, server_name: a.tls_server_name }
    }
}

/// `tagward export`.
#[derive(clap::Args)]
struct ExportArgs {
    /// The data directory.
    #[arg(long, env = "TAGWARD_DATA_DIR", default_value = "tagward-data")]
    data_dir: PathBuf,
    /// Read a fleet's state from etcd instead (etcd://HOST:PORT/PREFIX).
    #[arg(long, env = "TAGWARD_STORE")]
    store: Option<EtcdUrl>,
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,
    /// Where to write (JSON); standard output when not given.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// `tagward import`.
#[derive(clap::Args)]
struct ImportArgs {
    #[arg(long, env = "TAGWARD_DATA_DIR", default_value = "tagward-data")]
    data_dir: PathBuf,
    /// Load the world into an empty etcd prefix instead
    /// (etcd://HOST:PORT/PREFIX); a prefix that holds state is refused.
    #[arg(long, env = "TAGWARD_STORE")]
    store: Option<EtcdUrl>,
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,
    /// The world file (JSON or YAML), e.g. from `tagward export`.
    world: PathBuf,
}

/// `tagward authorize`: one Authorize call.
#[derive(clap::Args)]
struct AskArgs {
    /// The sidecar's data-plane address: HOST:PORT, http://HOST:PORT,
    /// https://HOST:PORT or unix:///PATH.
    #[arg(long, env = "TAGWARD_ADDR", default_value = "127.0.0.1:50051")]
    server: String,
    #[command(flatten)]
    tls: ClientTlsArgs,
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

/// jemalloc, not the system allocator: glibc keeps what a burst of
/// connections freed, jemalloc's background threads hand it back.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` reports through its logs from the start; the other commands
    // write to standard error.
    let logs = matches!(cli.command, Command::Serve(_));
    match run(cli) {
        Ok(code) => code,
        Err(failure) => {
            report(&failure, logs);
            ExitCode::from(failure.exit_code())
        }
    }
}

/// The one place a failure is printed.
fn report(failure: &Failure, logs: bool) {
    if !logs {
        eprintln!("{failure}");
        return;
    }
    let message = &failure.message;
    match (&failure.file, &failure.error) {
        (Some(file), Some(e)) => error!(file = %file.display(), error = %e, "{message}"),
        (None, Some(e)) => error!(error = %e, "{message}"),
        _ => error!("{failure}"),
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Test(args) => {
            let summary = match (&args.server, &args.admin) {
                (Some(server), Some(admin)) => {
                    let mut backend =
                        GrpcBackend::connect(server, admin, &args.tls.into(), args.token).map_err(Failure::input)?;
                    ops::run_tests(&args.paths, &mut backend)
                }
                _ => ops::run_tests(&args.paths, &mut InProcess::default()),
            };
            Ok(if summary.load_failed {
                ExitCode::from(2)
            } else if summary.failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Export(args) => match &args.store {
            Some(url) => offline(grpc::etcd::export(url, &EtcdTls::from(&args.etcd_tls), args.output.as_deref())),
            None => ops::export(&args.data_dir, args.output.as_deref()).map(|()| ExitCode::SUCCESS),
        },
        Command::Import(args) => match &args.store {
            Some(url) => {
                let world = ops::load_world(&args.world)?;
                offline(grpc::etcd::import(url, &EtcdTls::from(&args.etcd_tls), &world, &args.world))
            }
            None => ops::import(&args.data_dir, &args.world).map(|()| ExitCode::SUCCESS),
        },
        Command::Authorize(args) => {
            let allowed = ops::authorize(Question::try_from(args)?)?;
            Ok(if allowed { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

/// Runs an offline command against etcd on a runtime of its own.
fn offline(work: impl std::future::Future<Output = Result<(), String>>) -> Result<ExitCode, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::internal("cannot start the runtime").error(e))?;
    runtime.block_on(work).map_err(Failure::input)?;
    Ok(ExitCode::SUCCESS)
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

/// The context keys of a `--context-keys` file: a JSON or YAML list of
/// strings, or one key per line (blank lines and `#` comments skipped).
fn context_keys(text: &str) -> Result<std::collections::BTreeSet<Box<str>>, String> {
    let first = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'));
    let names: Vec<String> = match first {
        Some(l) if l.starts_with('[') || l.starts_with('-') => {
            serde_norway::from_str(text).map_err(|e| format!("not a JSON or YAML list of key names: {e}"))?
        }
        _ => text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect(),
    };
    engine::ContextRules::allow_list(names.iter().map(String::as_str)).map_err(|e| e.to_string())
}

impl TryFrom<&ContextArgs> for engine::ContextRules {
    type Error = Failure;

    fn try_from(c: &ContextArgs) -> Result<engine::ContextRules, Failure> {
        let allowed = match &c.context_keys {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Failure::input("cannot read the context keys file").file(path).error(e))?;
                Some(context_keys(&text).map_err(|e| Failure::input(format!("{}: {e}", path.display())))?)
            }
        };
        Ok(engine::ContextRules { clock_override: c.allow_clock_override, allowed })
    }
}

/// The server's configuration; reads the context keys file (the server
/// reads the admin token file, and re-reads it).
impl TryFrom<&ServeArgs> for Config {
    type Error = Failure;

    fn try_from(args: &ServeArgs) -> Result<Config, Failure> {
        let Listeners {
            listen,
            admin_listen,
            health_listen,
            tls_cert,
            tls_key,
            tls_client_ca,
            admin_tls_cert,
            admin_tls_key,
            admin_tls_client_ca,
            tls_reload_secs,
            admin_token,
            admin_token_file,
        } = &args.listeners;
        let tls = |cert: &Option<PathBuf>, key: &Option<PathBuf>, client_ca: &Option<PathBuf>| match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: client_ca.clone() }),
            _ => None,
        };
        let limits = &args.limits;
        Ok(Config {
            listen: listen.clone(),
            admin_listen: admin_listen.clone(),
            tls: tls(tls_cert, tls_key, tls_client_ca),
            admin_tls: tls(admin_tls_cert, admin_tls_key, admin_tls_client_ca),
            tls_reload: Duration::from_secs((*tls_reload_secs).max(1)),
            health_listen: health_listen.clone(),
            admin_token: admin_token.clone(),
            admin_token_file: admin_token_file.clone(),
            admin_token_reload: Duration::from_secs(1),
            context_rules: engine::ContextRules::try_from(&args.callers)?,
            min_revision_wait: Duration::from_millis(limits.min_revision_wait_ms),
            max_message_bytes: limits.max_message_bytes,
            max_batch: limits.max_batch,
            decision_cache_bytes: limits.decision_cache_bytes,
            shutdown_grace: Duration::from_secs(limits.shutdown_grace_secs),
            decision_log: None,
            callers: match &args.identity.identity_map {
                Some(path) => Callers::watching(path, Duration::from_millis(args.identity.identity_map_poll_ms.max(10)))
                    .map_err(|e| Failure::input("cannot use the identity map").file(path).error(e))?,
                None => Callers::trusting_local(),
            },
            tagging: match args.identity.tagging {
                TaggingArg::Off => TaggingMode::Off,
                TaggingArg::ReadOnly => TaggingMode::ReadOnly,
                TaggingArg::On => TaggingMode::On,
            },
            limits: tagward::grpc::server::Limits {
                connections: tagward::grpc::transport::ConnLimits {
                    max_connections: limits.max_connections.max(1),
                    idle_timeout: Duration::from_secs(limits.idle_timeout_secs.max(1)),
                },
                max_concurrent_streams: limits.max_concurrent_streams.max(1),
                request_timeout: Duration::from_secs(limits.request_timeout_secs.max(1)),
                keepalive_interval: Duration::from_secs(limits.keepalive_secs),
                keepalive_timeout: Duration::from_secs(limits.keepalive_timeout_secs.max(1)),
            },
        })
    }
}

/// How `serve` keeps its state.
struct StoragePlan {
    world: Option<PathBuf>,
    data_dir: PathBuf,
    force_world: bool,
    /// `None`: in memory only (--ephemeral).
    durability: Option<Durability>,
    event_capacity: usize,
    audit_log: Option<PathBuf>,
    audit_rotation: tagward::audit::Rotation,
    /// Named in every audit record.
    node_name: String,
}

impl From<&ServeArgs> for StoragePlan {
    fn from(args: &ServeArgs) -> StoragePlan {
        let s = &args.storage;
        let event_capacity = args.limits.watch_events;
        StoragePlan {
            world: s.world.clone(),
            data_dir: s.data_dir.clone(),
            force_world: s.force_world,
            durability: (!s.ephemeral).then_some(Durability { compact_after_bytes: s.compact_after_bytes, event_capacity }),
            event_capacity,
            audit_log: args.observability.audit_log.clone().or_else(|| (!s.ephemeral).then(|| s.data_dir.join("audit.jsonl"))),
            audit_rotation: tagward::audit::Rotation {
                max_bytes: args.observability.audit_max_bytes,
                keep: args.observability.audit_keep,
            },
            node_name: args.identity.node_name.clone().filter(|n| !n.trim().is_empty()).unwrap_or_else(default_node_name),
        }
    }
}

impl From<&Observability> for observe::Settings {
    fn from(o: &Observability) -> observe::Settings {
        observe::Settings {
            decision_log: o.decision_log.clone().map(|path| DecisionLogConfig {
                path,
                mode: match o.decision_log_mode {
                    DecisionLogMode::All => LogMode::All,
                    DecisionLogMode::Deny => LogMode::DeniesOnly,
                    DecisionLogMode::Sample => LogMode::Sample(o.decision_log_sample.max(1)),
                },
                queue: o.decision_log_queue,
            }),
            metrics_listen: o.metrics_listen,
        }
    }
}

/// `tagward authorize`'s flags as the request to send.
impl TryFrom<AskArgs> for Question {
    type Error = Failure;

    fn try_from(args: AskArgs) -> Result<Question, Failure> {
        let request = ask_request(&args).map_err(Failure::input)?;
        Ok(Question { server: args.server, tls: args.tls.into(), request, json: args.json })
    }
}

fn serve(args: ServeArgs) -> Result<ExitCode, Failure> {
    init_logs(args.observability.log_format);
    let mut config = Config::try_from(&args)?;
    let plan = StoragePlan::from(&args);
    let settings = observe::Settings::from(&args.observability);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::internal("cannot start the runtime").error(e))?;
    for (flag, seconds) in [("--max-staleness", args.storage.max_staleness), ("--etcd-start-wait", args.storage.etcd_start_wait)]
    {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(Failure::input(format!("{flag}: {seconds} is not a number of seconds (0 or more)")));
        }
    }
    let fleet = args.storage.store.as_ref().map(|url| Fleet {
        url: url.clone(),
        tls: EtcdTls::from(&args.storage.etcd_tls),
        timeout: Duration::from_millis(args.storage.etcd_timeout_ms.max(1)),
        max_staleness: Duration::from_secs_f64(args.storage.max_staleness.clamp(0.05, 86_400.0)),
        start_wait: Duration::from_secs_f64(args.storage.etcd_start_wait.clamp(0.0, 86_400.0)),
    });
    let store = match &fleet {
        Some(fleet) => runtime.block_on(open_fleet(&plan, fleet))?,
        None => open_store(&plan)?,
    };
    let (policies, principals, resources) = store.snapshot().counts();
    info!(policies, principals, resources, revision = store.revision(), "state ready");
    runtime.block_on(async {
        if let Some(addr) = settings.metrics_listen {
            observe::install_exporter(addr).map_err(|e| Failure::input(e.to_string()))?;
            info!(%addr, "metrics at /metrics");
            observe::published(&store.snapshot());
            let ages = store.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    metrics::gauge!(observe::SNAPSHOT_AGE).set(ages.snapshot_age().as_secs_f64());
                }
            });
        }
        if let Some(DecisionLogConfig { path, mode, queue }) = &settings.decision_log {
            let log = DecisionLog::start(path, *mode, *queue)
                .map_err(|e| Failure::input("cannot open the decision log").file(path).error(e))?;
            info!(file = %path.display(), "decision log");
            config.decision_log = Some(log);
        }
        // Before the listeners: a SIGTERM during start-up must stop us cleanly.
        let stop = stop_signal();
        let running = server::start(config, store.clone()).await.map_err(|e| Failure::input(e.to_string()))?;
        let staleness = fleet.map(|f| tokio::spawn(fleet_health(store, running.health_reporter(), f.max_staleness)));
        let stop = async move {
            stop.await;
            // Shutdown's NOT_SERVING must not be turned back.
            if let Some(task) = staleness {
                task.abort();
            }
        };
        running.run_until(stop).await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Fleet mode's settings (`--store etcd://...`).
struct Fleet {
    url: EtcdUrl,
    tls: EtcdTls,
    timeout: Duration,
    max_staleness: Duration,
    /// How long to keep trying to reach etcd at start.
    start_wait: Duration,
}

/// Connects to etcd, seeds an empty prefix from the world file (once, for
/// the whole fleet), loads the prefix and follows it.
async fn open_fleet(plan: &StoragePlan, fleet: &Fleet) -> Result<Arc<Store>, Failure> {
    let seed = plan.world.as_deref().map(ops::load_world).transpose()?;
    let audit = open_audit(plan)?;
    let (etcd, loaded) =
        grpc::etcd::connect(&fleet.url, fleet.timeout, &fleet.tls, seed.as_ref(), &plan.node_name, fleet.start_wait)
            .await
            .map_err(Failure::internal)?;
    let options = Durability { compact_after_bytes: MEMORY_COMPACT_AFTER, event_capacity: plan.event_capacity };
    let store = Store::open_shared(Arc::new(etcd.clone()), &loaded.entries, loaded.revision, &options, audit, &plan.node_name)
        .map_err(|e| Failure::input(format!("{}: {e}", fleet.url)))?;
    info!(store = %fleet.url, revision = loaded.revision, read_at = loaded.read_at, "fleet mode: loaded the prefix, following it");
    let probe = (fleet.max_staleness / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    // Followed until the process exits.
    let _follower = grpc::etcd::follow(etcd, store.clone(), loaded.read_at + 1, probe);
    Ok(store)
}

/// Fleet mode's health: NOT_SERVING while the snapshot is older than
/// --max-staleness (etcd unreachable, or the watch behind) or the store
/// stopped following; SERVING again once it is current.
async fn fleet_health(store: Arc<Store>, health: tonic_health::server::HealthReporter, max_staleness: Duration) {
    let mut serving = true;
    let mut tick = tokio::time::interval((max_staleness / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    loop {
        tick.tick().await;
        let age = store.snapshot_age();
        let now = age <= max_staleness && store.stuck().is_none();
        if now != serving {
            serving = now;
            if serving {
                info!(revision = store.revision(), "the snapshot is current again: SERVING");
            } else {
                warn!(age_secs = age.as_secs_f64(), revision = store.revision(), stuck = ?store.stuck(),
                    "the snapshot is older than --max-staleness: NOT_SERVING (answers go on from it)");
            }
            server::set_health(&health, serving).await;
        }
    }
}

fn open_audit(plan: &StoragePlan) -> Result<Option<AuditLog>, Failure> {
    match &plan.audit_log {
        Some(path) => {
            let log = AuditLog::open(path)
                .map_err(|e| Failure::input("cannot open the audit log").file(path).error(e))?
                .with_node(plan.node_name.clone())
                .with_rotation(plan.audit_rotation);
            if log.cut_bytes() > 0 {
                warn!(file = %path.display(), bytes = log.cut_bytes(), "cut a torn last line off the audit trail (a write interrupted by a crash)");
            }
            info!(file = %path.display(), node = %plan.node_name, "audit trail");
            Ok(Some(log))
        }
        None => Ok(None),
    }
}

/// Loads the world file, opens the audit trail, then the store (in memory,
/// or the data directory, restored or seeded).
fn open_store(plan: &StoragePlan) -> Result<Arc<Store>, Failure> {
    let seed = plan.world.as_deref().map(ops::load_world).transpose()?;
    // Opened first: the store writes to it from the first change it makes
    // (a forced world file included).
    let audit = open_audit(plan)?;
    match &plan.durability {
        None => {
            let options = Durability { compact_after_bytes: MEMORY_COMPACT_AFTER, event_capacity: plan.event_capacity };
            let (store, _) = Store::open_memory(seed.as_ref(), &options, audit).map_err(|e| match e {
                OpenError::World(_) => Failure::input(e.to_string()),
                other => Failure::internal(other.to_string()),
            })?;
            info!("ephemeral: state is kept in memory only");
            Ok(store)
        }
        Some(options) => {
            let (store, opened) = Store::open_dir(&plan.data_dir, seed.as_ref(), plan.force_world, options, audit)
                .map_err(|e| Failure::input(format!("cannot open the data directory: {e}")))?;
            report_opened(&plan.data_dir, &opened, seed.is_some());
            Ok(store)
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_keys_file_is_lines_or_a_json_or_yaml_list() {
        let want: Vec<&str> = vec!["aws:sourceip", "kms:viaservice"];
        for text in [
            "# network\naws:SourceIp\n\nkms:ViaService\n",
            "[\"aws:SourceIp\", \"KMS:ViaService\"]",
            "# keys\n- aws:SourceIp\n- kms:ViaService\n",
        ] {
            let got = context_keys(text).unwrap();
            assert_eq!(got.iter().map(|k| &**k).collect::<Vec<_>>(), want, "{text:?}");
        }
        assert!(context_keys("aws:PrincipalTag/team\n").unwrap_err().contains("aws:PrincipalTag/team"));
        assert!(context_keys("[1, \"x\"").is_err());
    }
}
