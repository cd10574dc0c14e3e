//! Throwaway certificates (rcgen) for the TLS tests, written as PEM files,
//! and a harness that serves health through the real listener transport and
//! records the `Peer` each request carried.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tagward::grpc::peer::Peer;
use tagward::grpc::transport::{self, ListenAddr, Tls, TlsFiles};
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A certificate authority.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, as PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A server certificate for localhost and 127.0.0.1, with `cn`.
    pub fn server(&self, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, cn);
        self.sign(params)
    }

    /// A client certificate with a URI SAN (a SPIFFE ID).
    pub fn client(&self, uri: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names.push(SanType::URI(uri.try_into().unwrap()));
        params.distinguished_name.push(DnType::CommonName, "client");
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem(), der: cert.der().to_vec() }
    }
}

/// Writes `leaf` (and `client_ca`) into `dir` as the listener's files.
pub fn write_files(dir: &Path, leaf: &Leaf, client_ca: Option<&Ca>) -> TlsFiles {
    std::fs::create_dir_all(dir).unwrap();
    let files =
        TlsFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key"), client_ca: client_ca.map(|_| dir.join("ca.crt")) };
    replace(&files, leaf);
    if let (Some(path), Some(ca)) = (&files.client_ca, client_ca) {
        std::fs::write(path, &ca.pem).unwrap();
    }
    files
}

/// Replaces the certificate and key files (each atomically, by rename).
pub fn replace(files: &TlsFiles, leaf: &Leaf) {
    for (path, text) in [(&files.cert, &leaf.cert), (&files.key, &leaf.key)] {
        let tmp = PathBuf::from(format!("{}.tmp", path.display()));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

/// A TLS channel to `addr` trusting `ca`, with a client certificate or not.
pub async fn tls_channel(
    addr: impl std::fmt::Display,
    ca: &Ca,
    client: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem)).domain_name("localhost");
    if let Some(leaf) = client {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
}

/// Serves grpc.health.v1 on `addr` through the listener transport (with
/// `tls`), recording the `Peer` of every request.
pub struct PeerProbe {
    pub addr: ListenAddr,
    pub seen: Arc<Mutex<Vec<Option<Peer>>>>,
    _stop: watch::Sender<bool>,
}

pub async fn peer_probe(addr: ListenAddr, tls: Option<TlsFiles>) -> PeerProbe {
    let tls = tls.map(|files| Tls::load(files).unwrap());
    let (bound, addr) = transport::bind(&addr).await.unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let (incoming, _accept) = transport::incoming("probe", bound, tls, transport::ConnLimits::default(), stop_rx.clone());
    let (_reporter, health) = tonic_health::server::health_reporter();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let health = tonic::service::interceptor::InterceptedService::new(health, move |req: tonic::Request<()>| {
        record.lock().unwrap().push(Peer::of(&req).cloned());
        Ok(req)
    });
    let mut rx = stop_rx;
    tokio::spawn(tonic::transport::Server::builder().add_service(health).serve_with_incoming_shutdown(incoming, async move {
        let _ = rx.wait_for(|down| *down).await;
    }));
    PeerProbe { addr, seen, _stop: stop }
}

/// The TCP address of a listener.
pub fn tcp(addr: &ListenAddr) -> SocketAddr {
    addr.tcp().expect("a TCP listener")
}
