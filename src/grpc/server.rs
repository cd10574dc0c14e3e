//! The listeners: the data plane (Authorizer, Tagging, health,
//! reflection), the admin plane (Admin) and, when asked for, a plaintext
//! health-only listener for probes; and their graceful shutdown. Each is TCP
//! or a Unix socket, the first two optionally TLS (see [`super::transport`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use super::auth::{AdminAuth, TokensError};
use super::identity::{Callers, TaggingMode};
use super::proto::admin_server::AdminServer;
use super::proto::authorizer_server::AuthorizerServer;
use super::proto::kms_server::KmsServer;
use super::proto::tagging_server::TaggingServer;
use super::proto::{DURATION_DESCRIPTOR_SET, FILE_DESCRIPTOR_SET};
use super::service::{AdminService, AuthorizerService, KmsService, Shared, TaggingService};
use super::transport::{self, ListenAddr, Tls, TlsError, TlsFiles};
use crate::engine::ContextRules;
use crate::store::Store;

/// How the server runs.
#[derive(Clone)]
pub struct Config {
    pub listen: ListenAddr,
    pub admin_listen: ListenAddr,
    /// TLS on the data listener.
    pub tls: Option<TlsFiles>,
    /// TLS on the admin listener.
    pub admin_tls: Option<TlsFiles>,
    /// How often the TLS files are checked for a new certificate.
    pub tls_reload: Duration,
    /// A plaintext listener serving grpc.health.v1 only (for probes).
    pub health_listen: Option<ListenAddr>,
    /// Required on every admin call when set (one writer named `admin`);
    /// this or `admin_token_file` must be set when the admin listener is not
    /// on loopback.
    pub admin_token: Option<String>,
    /// Named admin tokens with roles (see `grpc::auth`), re-read when the
    /// file changes; instead of `admin_token`.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// How often `admin_token_file` is checked for changes.
    pub admin_token_reload: Duration,
    /// What callers may put in a request's context.
    pub context_rules: ContextRules,
    pub min_revision_wait: Duration,
    pub max_message_bytes: usize,
    pub max_batch: usize,
    /// Bytes the decision cache may hold (0: no cache); see
    /// `grpc::decisions`.
    pub decision_cache_bytes: u64,
    /// How long shutdown waits for in-flight calls.
    pub shutdown_grace: Duration,
    /// Where decisions are logged, when enabled.
    pub decision_log: Option<crate::observe::DecisionLog>,
    /// Who may write through the Tagging API as which principal
    /// (`--identity-map`); by default, local callers.
    pub callers: Arc<Callers>,
    /// How much of the Tagging API is served (`--tagging`).
    pub tagging: TaggingMode,
    /// Connections, streams, timeouts and keepalive on every listener.
    pub limits: Limits,
}

/// What every listener holds its connections and calls to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections per listener, and how long a silent one stays open.
    pub connections: transport::ConnLimits,
    /// HTTP/2 `MAX_CONCURRENT_STREAMS`: calls in flight on one connection.
    pub max_concurrent_streams: u32,
    /// How long a call may take until its response starts (for a unary
    /// call, its whole request, body included); then it ends `CANCELLED`.
    /// A stream's later messages are not bounded by it.
    pub request_timeout: Duration,
    /// How often the server pings each connection (zero: never), and how
    /// long it waits for the answer before closing it.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections: transport::ConnLimits::default(),
            max_concurrent_streams: 100,
            request_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// HTTP/2 flow control. h2 closes a connection with `GOAWAY
/// ENHANCE_YOUR_CALM "too_many_data_frames"` when the small DATA frames it
/// holds unread cost more than half the connection window (each frame of
/// under 256 bytes costs 256 minus its length, given back once the frame
/// is read). hyper's default windows (1 MiB per stream and connection) let
/// a client that sends each `Admin.Apply` update in a frame of its own park
/// thousands of them unread and trip it. A 64 KiB stream window bounds what
/// one stream can have unread, and a 16 MiB connection window makes the
/// budget 8 MiB: messages of 30 bytes or more on a stream cost at most
/// 64 KiB / 30 × 226 ≈ 0.5 MiB of it. (The same guard in the client's h2
/// is why the acknowledgements are batched: see `service::Acks`.)
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// The largest header block a request may send.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// A tonic server builder with `limits` and the flow control above: every
/// listener's, and the bench baseline's (`tagward-bench baseline-server`),
/// so that a comparison with it measures handlers, not transports.
pub fn builder(limits: &Limits) -> tonic::transport::Server {
    let keepalive = |d: Duration| (!d.is_zero()).then_some(d);
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams.max(1))
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(keepalive(limits.keepalive_interval))
        .http2_keepalive_timeout(keepalive(limits.keepalive_timeout))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)).into(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 50052)).into(),
            tls: None,
            admin_tls: None,
            tls_reload: Duration::from_secs(5),
            health_listen: None,
            admin_token: None,
            admin_token_file: None,
            admin_token_reload: Duration::from_secs(1),
            context_rules: ContextRules::SERVER,
            min_revision_wait: Duration::from_secs(2),
            max_message_bytes: 4 * 1024 * 1024,
            max_batch: 1000,
            decision_cache_bytes: super::decisions::DEFAULT_BYTES,
            shutdown_grace: Duration::from_secs(10),
            decision_log: None,
            callers: Callers::trusting_local(),
            tagging: TaggingMode::On,
            limits: Limits::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(
        "the admin listener {0} is not on loopback; set an admin token (--admin-token or --admin-token-file) to listen there"
    )]
    AdminWithoutToken(ListenAddr),
    #[error("the admin token is empty")]
    EmptyToken,
    #[error("the admin token file {file}: {error}")]
    TokenFile { file: String, error: TokensError },
    #[error("give the admin token or the admin token file, not both")]
    TwoTokenSources,
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: ListenAddr, source: std::io::Error },
    #[error("TLS on the {listener} listener: {source}")]
    Tls { listener: &'static str, source: TlsError },
}

/// A running server.
pub struct Running {
    pub data_addr: ListenAddr,
    pub admin_addr: ListenAddr,
    pub health_addr: Option<ListenAddr>,
    shutdown: watch::Sender<bool>,
    health: HealthReporter,
    grace: Duration,
    /// The servers, by listener name.
    servers: Vec<(&'static str, JoinHandle<Result<(), tonic::transport::Error>>)>,
    /// The accept loops and certificate watchers: they end at shutdown (and
    /// a Unix socket file is removed when its accept loop ends).
    helpers: Vec<JoinHandle<()>>,
}

/// The reflection services themselves, listed on both listeners.
const REFLECTION_SERVICES: [&str; 2] = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

/// What the data listener serves, and so what its reflection lists.
pub const DATA_SERVICES: &[&str] = &["tagward.v1.Authorizer", "tagward.v1.Tagging", "tagward.v1.Kms", "grpc.health.v1.Health"];

/// What the admin listener serves.
pub const ADMIN_SERVICES: &[&str] = &["tagward.v1.Admin"];

/// The health name for liveness probes: `SERVING` from start to shutdown,
/// whatever the store or etcd say, so that a failed disk or an etcd outage
/// (which restarting cannot fix) never gets the sidecar restarted in a loop.
pub const LIVENESS: &str = "liveness";

/// Reflection (v1 for grpcurl, v1alpha for older tools) that lists exactly
/// `services` and the reflection service itself, and knows every message they
/// use, including the `google.rpc` error details (`ErrorInfo`) that statuses
/// carry, so that grpcurl can print them.
#[allow(clippy::type_complexity)]
pub fn reflection(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
    ),
    ServeError,
> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(DURATION_DESCRIPTOR_SET);
        for name in services.iter().chain(REFLECTION_SERVICES.iter()) {
            b = b.with_service_name(*name);
        }
        b
    };
    let error = |e: tonic_reflection::server::Error| ServeError::Reflection(e.to_string());
    Ok((builder().build_v1().map_err(error)?, builder().build_v1alpha().map_err(error)?))
}

/// The admin plane's authentication; an admin listener beyond loopback
/// needs a token.
fn admin_auth(config: &Config) -> Result<AdminAuth, ServeError> {
    let auth = match (&config.admin_token, &config.admin_token_file) {
        (Some(_), Some(_)) => return Err(ServeError::TwoTokenSources),
        (Some(token), None) => AdminAuth::token(token).map_err(|_| ServeError::EmptyToken)?,
        (None, Some(file)) => {
            AdminAuth::file(file).map_err(|error| ServeError::TokenFile { file: file.display().to_string(), error })?
        }
        (None, None) => AdminAuth::open(),
    };
    if !auth.required() && !config.admin_listen.is_local() {
        return Err(ServeError::AdminWithoutToken(config.admin_listen.clone()));
    }
    Ok(auth)
}

async fn bind(addr: &ListenAddr) -> Result<(transport::Bound, ListenAddr), ServeError> {
    transport::bind(addr).await.map_err(|source| ServeError::Bind { addr: addr.clone(), source })
}

fn load_tls(listener: &'static str, files: &Option<TlsFiles>) -> Result<Option<Arc<Tls>>, ServeError> {
    files.clone().map(Tls::load).transpose().map_err(|source| ServeError::Tls { listener, source })
}

/// Binds the listeners and starts serving `store`.
pub async fn start(config: Config, store: Arc<Store>) -> Result<Running, ServeError> {
    let admin_auth = admin_auth(&config)?;
    let data_tls = load_tls("data", &config.tls)?;
    let admin_tls = load_tls("admin", &config.admin_tls)?;
    let (data_listener, data_addr) = bind(&config.listen).await?;
    let (admin_listener, admin_addr) = bind(&config.admin_listen).await?;
    let health_listener = match &config.health_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };

    let (shutdown, shutdown_rx) = watch::channel(false);
    let failures = store.failures();
    let shared = Shared {
        store,
        min_revision_wait: config.min_revision_wait,
        max_batch: config.max_batch,
        shutdown: shutdown_rx.clone(),
        decision_log: config.decision_log.clone(),
        context_rules: Arc::new(config.context_rules.clone()),
        callers: config.callers.clone(),
        tagging: config.tagging,
        evaluations: super::service::evaluation_slots(),
        // After the exporter is installed (`serve` does that first).
        meters: Arc::new(crate::observe::Meters::new()),
        decisions: super::decisions::DecisionCache::new(config.decision_cache_bytes).map(Arc::new),
    };
    let serve_tagging = config.tagging != TaggingMode::Off;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AuthorizerServer<AuthorizerService>>().await;
    if serve_tagging {
        health.set_serving::<TaggingServer<TaggingService>>().await;
        health.set_serving::<KmsServer<KmsService>>().await;
    }
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    health.set_service_status(LIVENESS, tonic_health::ServingStatus::Serving).await;
    health.set_service_status(ADMIN_SERVICES[0], tonic_health::ServingStatus::Serving).await;
    // The Kms service (alias and grant operations) goes with Tagging.
    let data_services: Vec<&str> = DATA_SERVICES
        .iter()
        .copied()
        .filter(|s| serve_tagging || (*s != "tagward.v1.Tagging" && *s != "tagward.v1.Kms"))
        .collect();
    let data_reflection = reflection(&data_services)?;
    let admin_reflection = reflection(ADMIN_SERVICES)?;

    let max = config.max_message_bytes;
    // Repeated Authorize calls are answered in front of the service (see
    // `grpc::repeat`).
    let authorizer = super::repeat::Repeat::new(
        AuthorizerServer::new(AuthorizerService(shared.clone())).max_decoding_message_size(max).max_encoding_message_size(max),
        shared.clone(),
    );
    let tagging = serve_tagging.then(|| {
        TaggingServer::new(TaggingService(shared.clone())).max_decoding_message_size(max).max_encoding_message_size(max)
    });
    let kms = serve_tagging
        .then(|| KmsServer::new(KmsService(shared.clone())).max_decoding_message_size(max).max_encoding_message_size(max));
    let admin = tonic::service::interceptor::InterceptedService::new(
        AdminServer::new(AdminService(shared)).max_decoding_message_size(max).max_encoding_message_size(max),
        admin_auth.interceptor(),
    );
    admin_auth.watch(config.admin_token_reload);

    let signal = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|down| *down).await;
    };
    let mut helpers = Vec::new();
    helpers.push(follow_store_health(failures, health.clone(), serve_tagging, shutdown_rx.clone()));
    for (name, tls) in [("data", &data_tls), ("admin", &admin_tls)] {
        if let Some(tls) = tls {
            helpers.push(tls.clone().watch(name, config.tls_reload, shutdown_rx.clone()));
        }
    }
    let mut servers = Vec::new();
    let (incoming, accept) =
        transport::incoming("data", data_listener, data_tls.clone(), config.limits.connections, shutdown_rx.clone());
    helpers.push(accept);
    servers.push((
        "data",
        tokio::spawn(
            builder(&config.limits)
                .add_service(health_service.clone())
                .add_service(data_reflection.0)
                .add_service(data_reflection.1)
                .add_service(authorizer)
                .add_optional_service(tagging)
                .add_optional_service(kms)
                .serve_with_incoming_shutdown(incoming, signal(shutdown_rx.clone())),
        ),
    ));
    let (incoming, accept) =
        transport::incoming("admin", admin_listener, admin_tls.clone(), config.limits.connections, shutdown_rx.clone());
    helpers.push(accept);
    servers.push((
        "admin",
        tokio::spawn(
            builder(&config.limits)
                .add_service(admin_reflection.0)
                .add_service(admin_reflection.1)
                .add_service(admin)
                .serve_with_incoming_shutdown(incoming, signal(shutdown_rx.clone())),
        ),
    ));
    let health_addr = match health_listener {
        Some((listener, addr)) => {
            let (incoming, accept) =
                transport::incoming("health", listener, None, config.limits.connections, shutdown_rx.clone());
            helpers.push(accept);
            servers.push((
                "health",
                tokio::spawn(
                    builder(&config.limits)
                        .add_service(health_service)
                        .serve_with_incoming_shutdown(incoming, signal(shutdown_rx.clone())),
                ),
            ));
            Some(addr)
        }
        None => None,
    };
    let names: Vec<String> = admin_auth.names().iter().map(|(n, r)| format!("{n} ({r})")).collect();
    info!(
        %data_addr,
        %admin_addr,
        token = admin_auth.required(),
        admin_names = %names.join(", "),
        tls = tls_mode(&data_tls),
        admin_tls = tls_mode(&admin_tls),
        health_addr = health_addr.as_ref().map(tracing::field::display),
        "serving"
    );
    Ok(Running { data_addr, admin_addr, health_addr, shutdown, health, grace: config.shutdown_grace, servers, helpers })
}

/// Health follows the store: while it refuses every change (a storage
/// failure such as a full disk), the overall status (`""`), Tagging and
/// `tagward.v1.Admin` are `NOT_SERVING` (reads still work, so Authorizer
/// stays `SERVING`), the reason is logged and `tagward_store_failed` is 1;
/// when the store takes changes again, they are `SERVING` again.
fn follow_store_health(
    mut failures: watch::Receiver<Option<String>>,
    health: HealthReporter,
    tagging: bool,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut failed = false;
        loop {
            let now = failures.borrow_and_update().clone();
            match (&now, failed) {
                (Some(reason), false) => {
                    tracing::error!(reason = %reason, "the store refuses every change: health is NOT_SERVING for writers (\"\", Tagging, Admin)");
                    metrics::gauge!(crate::observe::STORE_FAILED).set(1.0);
                    set_writers(&health, tagging, tonic_health::ServingStatus::NotServing).await;
                    failed = true;
                }
                (None, true) => {
                    info!("the store takes changes again: health is SERVING");
                    metrics::gauge!(crate::observe::STORE_FAILED).set(0.0);
                    set_writers(&health, tagging, tonic_health::ServingStatus::Serving).await;
                    failed = false;
                }
                _ => {}
            }
            tokio::select! {
                changed = failures.changed() => if changed.is_err() { return },
                _ = shutdown.wait_for(|down| *down) => return,
            }
        }
    })
}

async fn set_writers(health: &HealthReporter, tagging: bool, status: tonic_health::ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(ADMIN_SERVICES[0], status).await;
    if tagging {
        health.set_service_status("tagward.v1.Tagging", status).await;
        health.set_service_status("tagward.v1.Kms", status).await;
    }
}

fn tls_mode(tls: &Option<Arc<Tls>>) -> &'static str {
    match tls {
        None => "off",
        Some(t) if t.mutual() => "mutual",
        Some(_) => "on",
    }
}

/// Sets the data plane's health (the Authorizer and the server as a whole).
pub async fn set_health(health: &HealthReporter, serving: bool) {
    let status = if serving { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
    health.set_service_status("tagward.v1.Authorizer", status).await;
    health.set_service_status("", status).await;
}

impl Running {
    /// The health reporter, for whatever else decides health (fleet mode's
    /// staleness).
    pub fn health_reporter(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Health goes NOT_SERVING, streams end, listeners stop accepting, and
    /// in-flight calls get up to the grace period to finish.
    pub async fn shutdown(self) {
        self.health.set_not_serving::<AuthorizerServer<AuthorizerService>>().await;
        self.health.set_not_serving::<TaggingServer<TaggingService>>().await;
        self.health.set_not_serving::<KmsServer<KmsService>>().await;
        self.health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        self.health.set_service_status(LIVENESS, tonic_health::ServingStatus::NotServing).await;
        self.health.set_service_status(ADMIN_SERVICES[0], tonic_health::ServingStatus::NotServing).await;
        let _ = self.shutdown.send(true);
        let (helpers, servers) = (self.helpers, self.servers);
        let all = async move {
            // The accept loops stop at the signal (closing the listeners and
            // removing Unix socket files); the servers once in-flight calls end.
            for helper in helpers {
                let _ = helper.await;
            }
            for (name, server) in servers {
                match server.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(listener = name, error = %e, "listener ended with an error"),
                    Err(e) => warn!(listener = name, error = %e, "listener task failed"),
                }
            }
        };
        if tokio::time::timeout(self.grace, all).await.is_err() {
            warn!(grace = ?self.grace, "in-flight calls did not finish within the grace period");
        }
        info!("stopped");
    }

    /// Serves until `signal` completes, then shuts down.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        info!("shutting down");
        self.shutdown().await;
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is
/// called (inside the runtime), not when the future is first polled, so a
/// signal that arrives while the server is still starting is not lost to the
/// default action: call it before starting the server.
pub fn stop_signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                    one.recv().await;
                }
                (Err(_), Err(_)) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
