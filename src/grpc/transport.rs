//! The listeners' transport: where a listener is (`HOST:PORT` or
//! `unix:///PATH`), TLS with certificates that are reloaded when their files
//! change, and the accepted connections, each carrying the [`Peer`] that
//! handlers find in every request's extensions.
//!
//! Accepting and the TLS handshake happen here, off tonic's accept loop: a
//! slow or broken client only costs its own task, and a refused connection
//! (plaintext on a TLS listener, a missing or untrusted client certificate,
//! unreadable peer credentials) is logged with the reason and dropped; it
//! never reaches tonic and never stops the listener.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use super::peer::Peer;

/// Where a listener listens: a TCP address, or a Unix domain socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// Loopback TCP or a Unix socket: reachable from this host only.
    pub fn is_local(&self) -> bool {
        match self {
            ListenAddr::Tcp(addr) => addr.ip().is_loopback(),
            ListenAddr::Unix(_) => true,
        }
    }

    /// The TCP address, unless this is a Unix socket.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            ListenAddr::Tcp(addr) => Some(*addr),
            ListenAddr::Unix(_) => None,
        }
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> ListenAddr {
        ListenAddr::Tcp(addr)
    }
}

/// `HOST:PORT` as it was given (a TCP address prints as before), a Unix
/// socket as `unix:///PATH`.
impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => addr.fmt(f),
            ListenAddr::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// An address that is neither `IP:PORT` nor `unix:///PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ListenAddrError {
    #[error("{0:?}: a Unix socket is unix:///ABSOLUTE/PATH (three slashes)")]
    RelativeUnix(String),
    #[error("{0:?}: expected IP:PORT (e.g. 127.0.0.1:50051, [::1]:50051; port 0 picks a free one) or unix:///PATH")]
    NotAnAddress(String),
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<ListenAddr, ListenAddrError> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(ListenAddrError::RelativeUnix(s.to_string()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| ListenAddrError::NotAnAddress(s.to_string()))
    }
}

/// The PEM files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate issued by one of these
    /// CAs (mTLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: no PEM certificate in it{}", path.display(), detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    NoCertificate { path: PathBuf, detail: Option<String> },
    #[error("{}: no usable PEM private key in it ({detail})", path.display())]
    Key { path: PathBuf, detail: String },
    #[error("{}: not a usable CA bundle: {detail}", path.display())]
    ClientCa { path: PathBuf, detail: String },
    #[error("{} and {} do not make a TLS configuration: {detail}", cert.display(), key.display())]
    Config { cert: PathBuf, key: PathBuf, detail: String },
}

/// The bytes of a listener's TLS files, as last read.
#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

impl Contents {
    fn read(files: &TlsFiles) -> Result<Contents, TlsError> {
        Ok(Contents {
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            client_ca: files.client_ca.as_deref().map(read).transpose()?,
        })
    }
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(TlsError::NoCertificate { path: path.to_path_buf(), detail: None }),
        Err(e) => Err(TlsError::NoCertificate { path: path.to_path_buf(), detail: Some(e.to_string()) }),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(files: &TlsFiles, contents: &Contents) -> Result<ServerConfig, TlsError> {
    let certs = certificates(&files.cert, &contents.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&contents.key)
        .map_err(|e| TlsError::Key { path: files.key.clone(), detail: e.to_string() })?;
    let config_error =
        |e: rustls::Error| TlsError::Config { cert: files.cert.clone(), key: files.key.clone(), detail: e.to_string() };
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(config_error)?;
    let builder = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let ca_error = |detail: String| TlsError::ClientCa { path: path.clone(), detail };
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(path, pem)? {
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| ca_error(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(config_error)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A listener's TLS configuration, swapped for a new one when its files
/// change; new connections get the current one.
pub struct Tls {
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
    loaded: std::sync::Mutex<Contents>,
    /// The last reload failure, so that it is logged once, not every tick.
    failed: std::sync::Mutex<Option<String>>,
}

impl Tls {
    /// Reads and checks the files: a start-up error names the file and why.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let contents = Contents::read(&files)?;
        let config = server_config(&files, &contents)?;
        Ok(Arc::new(Tls {
            files,
            current: ArcSwap::from_pointee(config),
            loaded: std::sync::Mutex::new(contents),
            failed: std::sync::Mutex::new(None),
        }))
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Rereads the files; when they changed and make a good configuration,
    /// new connections get it. A bad one keeps the old configuration and is
    /// logged (once per distinct failure). Returns whether it swapped.
    pub fn reload(&self, listener: &str) -> bool {
        let outcome = Contents::read(&self.files).and_then(|contents| {
            let same = self.loaded.lock().map(|loaded| *loaded == contents).unwrap_or(false);
            if same {
                return Ok(None);
            }
            server_config(&self.files, &contents).map(|config| Some((config, contents)))
        });
        let mut failed = self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match outcome {
            Ok(None) => false,
            Ok(Some((config, contents))) => {
                self.current.store(Arc::new(config));
                if let Ok(mut loaded) = self.loaded.lock() {
                    *loaded = contents;
                }
                *failed = None;
                info!(listener, cert = %self.files.cert.display(), "reloaded the TLS certificate; new connections use it");
                true
            }
            Err(e) => {
                let why = e.to_string();
                if failed.as_deref() != Some(why.as_str()) {
                    warn!(listener, error = %why, "cannot reload the TLS files; new connections keep the previous certificate");
                    *failed = Some(why);
                }
                false
            }
        }
    }

    /// Reloads every `interval` and on SIGHUP until `shutdown`.
    pub fn watch(
        self: Arc<Tls>,
        listener: &'static str,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        // Installed before this returns: a SIGHUP from then on rereads the
        // files (and no longer ends the process).
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| warn!(listener, error = %e, "cannot handle SIGHUP; the TLS files are still reread periodically"))
            .ok();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let hangup = async |hup: &mut Option<tokio::signal::unix::Signal>| match hup {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            };
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|down| *down) => return,
                    _ = tick.tick() => {}
                    _ = hangup(&mut hup) => debug!(listener, "SIGHUP: rereading the TLS files"),
                }
                self.reload(listener);
            }
        })
    }
}

/// What a listener's connections are held to.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections open at once; one more is accepted and closed at once,
    /// with a log line when the limit is first reached.
    pub max_connections: usize,
    /// A connection from which nothing was read for this long is closed: a
    /// client that never finishes its preface or headers, or one gone
    /// silent. A live HTTP/2 client answers the server's keepalive pings,
    /// so it is never idle this long while the keepalive interval is
    /// shorter.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> ConnLimits {
        ConnLimits { max_connections: 1024, idle_timeout: Duration::from_secs(60) }
    }
}

/// Closes a connection that has been silent for too long.
struct Idle {
    limit: Duration,
    last_read: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Idle {
    fn new(limit: Duration) -> Idle {
        let now = tokio::time::Instant::now();
        Idle { limit, last_read: now, timer: Box::pin(tokio::time::sleep_until(now + limit)) }
    }

    /// Called when a read is pending: an error once the connection has been
    /// silent for the limit.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.last_read + self.limit;
            if deadline <= tokio::time::Instant::now() {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "nothing read from the connection for too long"));
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

/// An accepted connection and who is on the other end.
pub struct Connection {
    io: Io,
    peer: Peer,
    idle: Idle,
    /// Its place under the listener's connection limit, given back when
    /// the connection is dropped.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

enum Io {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.io {
            Io::Tcp($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
            Io::Unix($io) => {
                let $io = Pin::new($io);
                $e
            }
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match delegate!(this, io => io.poll_read(cx, buf)) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.idle.last_read = tokio::time::Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match this.idle.poll_expired(cx) {
                Poll::Ready(e) => {
                    debug!(peer = ?this.peer, "closing a connection: nothing read for {:?}", this.idle.limit);
                    Poll::Ready(Err(e))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        delegate!(this, io => io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        delegate!(this, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        delegate!(this, io => io.poll_shutdown(cx))
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        delegate!(this, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tcp(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
            Io::Unix(io) => io.is_write_vectored(),
        }
    }
}

/// A Unix socket file, removed when dropped (at shutdown).
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(path = %self.0.display(), error = %e, "cannot remove the Unix socket file");
            }
        }
    }
}

/// A bound listener.
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFileGuard),
}

/// Removes the socket file when the listener is done with it.
pub struct SocketFileGuard(#[allow(dead_code)] SocketFile);

/// The mode of a Unix socket file: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// Binds `addr`; returns the listener and its actual address (port 0
/// resolved). A Unix socket file left by a previous run is removed first
/// (one that something still answers on, or a path that is not a socket,
/// is an error instead), and gets mode 0660.
pub async fn bind(addr: &ListenAddr) -> io::Result<(Bound, ListenAddr)> {
    match addr {
        ListenAddr::Tcp(a) => {
            let listener = TcpListener::bind(a).await?;
            let local = listener.local_addr()?;
            Ok((Bound::Tcp(listener), ListenAddr::Tcp(local)))
        }
        ListenAddr::Unix(path) => {
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_socket() => {
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(io::Error::new(io::ErrorKind::AddrInUse, "another process is serving on this socket"));
                    }
                    std::fs::remove_file(path)?;
                    info!(path = %path.display(), "removed a stale Unix socket file");
                }
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "the path exists and is not a socket; not removing it",
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let listener = UnixListener::bind(path)?;
            let guard = SocketFileGuard(SocketFile(path.clone()));
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
            Ok((Bound::Unix(listener, guard), addr.clone()))
        }
    }
}

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in progress at once on one listener.
const MAX_HANDSHAKES: usize = 256;

/// Accepts connections on `bound` until `shutdown` (or until the server
/// stops taking them), does the TLS handshake when `tls` is set, and yields
/// each connection with its [`Peer`]. The returned task ends after the
/// listener is closed (and a Unix socket file removed).
pub fn incoming(
    listener: &'static str,
    bound: Bound,
    tls: Option<Arc<Tls>>,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) -> (ReceiverStream<Result<Connection, io::Error>>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Result<Connection, io::Error>>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let task = tokio::spawn(async move {
        // Whether the connection limit is reached (logged once per episode),
        // and how many accepts in a row failed.
        let mut full = false;
        let mut failures = 0u32;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|down| *down) => break,
                _ = tx.closed() => break,
                accepted = accept(&bound) => accepted,
            };
            let accepted = match accepted {
                Ok(accepted) => {
                    if failures > 0 {
                        info!(listener, failures, "accepting connections again");
                        failures = 0;
                    }
                    accepted
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS and the like: the pending
                    // connection stays queued, so back off (5 ms doubling
                    // to 1 s) rather than spin, and say so once.
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        warn!(listener, error = %e, "cannot accept connections (out of file descriptors?); backing off until it works again");
                    }
                    let delay = Duration::from_millis(5u64 << failures.min(8)).min(Duration::from_secs(1));
                    tokio::select! {
                        _ = shutdown.wait_for(|down| *down) => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    if full && slots.available_permits() * 10 >= limits.max_connections {
                        info!(listener, "below the connection limit again");
                        full = false;
                    }
                    slot
                }
                Err(_) => {
                    if !full {
                        warn!(
                            listener,
                            limit = limits.max_connections,
                            "connection limit reached: new connections are closed until some of the open ones end (--max-connections)"
                        );
                        full = true;
                    }
                    drop(accepted);
                    continue;
                }
            };
            let idle = limits.idle_timeout;
            match accepted {
                Accepted::Tcp(stream, addr) => {
                    let _ = stream.set_nodelay(true);
                    match &tls {
                        None => {
                            let conn =
                                Connection { io: Io::Tcp(stream), peer: Peer::Tcp { addr }, idle: Idle::new(idle), _slot: slot };
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Some(tls) => {
                            // At most MAX_HANDSHAKES at a time: more wait to be accepted.
                            let Ok(permit) = handshakes.clone().acquire_owned().await else { break };
                            let config = tls.current.load_full();
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                let conn = handshake(listener, config, stream, addr).await;
                                drop(permit);
                                if let Some((io, peer)) = conn {
                                    let _ = tx.send(Ok(Connection { io, peer, idle: Idle::new(idle), _slot: slot })).await;
                                }
                            });
                        }
                    }
                }
                Accepted::Unix(stream) => match stream.peer_cred() {
                    Ok(cred) => {
                        let peer = Peer::Unix { uid: cred.uid(), gid: cred.gid() };
                        let _ = tx.send(Ok(Connection { io: Io::Unix(stream), peer, idle: Idle::new(idle), _slot: slot })).await;
                    }
                    Err(e) => warn!(listener, error = %e, "refused a Unix socket connection: cannot read its peer credentials"),
                },
            }
        }
        drop(bound);
    });
    (ReceiverStream::new(rx), task)
}

enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

async fn accept(bound: &Bound) -> io::Result<Accepted> {
    match bound {
        Bound::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        Bound::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

async fn handshake(listener: &'static str, config: Arc<ServerConfig>, stream: TcpStream, addr: SocketAddr) -> Option<(Io, Peer)> {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            info!(listener, %addr, error = %e, "refused a connection: the TLS handshake failed (plaintext, no or an untrusted client certificate, or no common protocol)");
            return None;
        }
        Err(_) => {
            info!(listener, %addr, "refused a connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
            return None;
        }
    };
    let (uris, dns) = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => (Vec::new(), Vec::new()),
        Some(cert) => match super::peer::sans(cert.as_ref()) {
            Ok(sans) => sans,
            Err(e) => {
                warn!(listener, %addr, error = %e, "refused a connection: cannot read the client certificate's names");
                return None;
            }
        },
    };
    Some((Io::Tls(Box::new(stream)), Peer::Tls { addr, uris, dns }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_as_given() {
        let tcp: ListenAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(tcp, ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))));
        assert_eq!(tcp.to_string(), "127.0.0.1:0");
        assert!(tcp.is_local());
        let unix: ListenAddr = "unix:///run/tagward/data.sock".parse().unwrap();
        assert_eq!(unix, ListenAddr::Unix(PathBuf::from("/run/tagward/data.sock")));
        assert_eq!(unix.to_string(), "unix:///run/tagward/data.sock");
        assert!(unix.is_local());
        assert!(!"0.0.0.0:1".parse::<ListenAddr>().unwrap().is_local());
        assert!("unix://relative.sock".parse::<ListenAddr>().unwrap_err().to_string().contains("three slashes"));
        assert!("localhost".parse::<ListenAddr>().unwrap_err().to_string().contains("IP:PORT"));
    }
}
