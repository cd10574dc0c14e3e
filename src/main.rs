//! The `tagward` command: thin wiring from the command line to the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};

use tagward::grpc::client::GrpcBackend;
use tagward::grpc::proto::authorizer_client::AuthorizerClient;
use tagward::grpc::proto::{self, Decision, Reason};
use tagward::grpc::server::{self, Config};
use tagward::scenario::{self, Backend, InProcess};
use tagward::store::Store;
use tagward::world::WorldSpec;

#[derive(Parser)]
#[command(name = "tagward", version, about = "An authorization sidecar that decides like AWS IAM and KMS with tag-based access control")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// resources); empty when not given.
        #[arg(long, env = "TAGWARD_WORLD")]
        world: Option<PathBuf>,
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
        /// env filter such as `tagward=debug`.
        #[arg(long, env = "TAGWARD_LOG_FORMAT", value_enum, default_value = "plain")]
        log_format: LogFormat,
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
    /// Ask a running sidecar one question and print the answer.
    Authorize {
        #[arg(long, default_value = "127.0.0.1:50051")]
        server: String,
        #[arg(long)]
        principal: String,
        #[arg(long)]
        action: String,
        #[arg(long)]
        resource: String,
        /// A request tag KEY=VALUE (repeatable).
        #[arg(long = "request-tag", value_name = "KEY=VALUE")]
        request_tags: Vec<String>,
        /// Show every statement considered.
        #[arg(long)]
        explain: bool,
    },
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
            min_revision_wait_ms,
            max_message_bytes,
            max_batch,
            watch_events,
            shutdown_grace_secs,
            log_format,
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
            };
            serve(config, world.as_deref(), watch_events)
        }
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
        Command::Authorize { server, principal, action, resource, request_tags, explain } => {
            ask(&server, principal, action, resource, request_tags, explain)
        }
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

fn serve(config: Config, world: Option<&Path>, watch_events: usize) -> ExitCode {
    let state = match world {
        None => Default::default(),
        Some(path) => match load_world(path).and_then(|w| w.build().map_err(|e| format!("{}: {e}", path.display()))) {
            Ok(state) => state,
            Err(e) => {
                error!("{e}");
                return ExitCode::from(2);
            }
        },
    };
    let (policies, principals, resources) = state.counts();
    info!(policies, principals, resources, revision = state.revision(), "world loaded");
    let store = Arc::new(Store::new(state, watch_events));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
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

fn ask(server: &str, principal: String, action: String, resource: String, tags: Vec<String>, explain: bool) -> ExitCode {
    let mut request_tags = Vec::new();
    for t in &tags {
        match t.split_once('=') {
            Some((k, v)) => request_tags.push(proto::Tag { key: k.to_string(), value: v.to_string() }),
            None => {
                eprintln!("--request-tag {t:?}: expected KEY=VALUE");
                return ExitCode::from(2);
            }
        }
    }
    let uri = if server.contains("://") { server.to_string() } else { format!("http://{server}") };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let answer = runtime.block_on(async {
        let mut client = AuthorizerClient::connect(uri).await.map_err(|e| format!("cannot reach {server}: {e}"))?;
        let request = proto::AuthorizeRequest { principal, action, resource, request_tags, explain, ..Default::default() };
        client.authorize(request).await.map(|r| r.into_inner()).map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    });
    match answer {
        Ok(r) => {
            let decision = if r.decision == Decision::Allow as i32 { "Allow" } else { "Deny" };
            let reason = Reason::try_from(r.reason).map(|x| x.as_str_name()).unwrap_or("REASON_UNSPECIFIED");
            println!("{decision} ({reason}) at revision {}", r.revision);
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
            if r.decision == Decision::Allow as i32 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}
