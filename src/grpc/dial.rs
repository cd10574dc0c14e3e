//! How every Rust client reaches a sidecar (`tagward authorize`, `tagward
//! test --server/--admin`, the load tool): an address that is `HOST:PORT`,
//! `http://HOST:PORT`, `https://HOST:PORT` or `unix:///PATH`, plus the
//! client's TLS settings. `https://` or any TLS setting means TLS; a Unix
//! socket is always plaintext (the sidecar serves no TLS there).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// The client's TLS settings: the flags `--tls-ca`, `--tls-cert`,
/// `--tls-key` and `--tls-server-name` (every error names the flag).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA bundle (PEM) to trust; without it, the system bundle.
    pub ca: Option<PathBuf>,
    /// The client certificate chain (PEM), for mTLS; with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM); with `cert`.
    pub key: Option<PathBuf>,
    /// The name the server certificate must carry, instead of the host.
    pub server_name: Option<String>,
}

impl ClientTls {
    /// The first TLS flag given, if any.
    pub fn flag(&self) -> Option<&'static str> {
        if self.ca.is_some() {
            Some("--tls-ca")
        } else if self.cert.is_some() {
            Some("--tls-cert")
        } else if self.key.is_some() {
            Some("--tls-key")
        } else if self.server_name.is_some() {
            Some("--tls-server-name")
        } else {
            None
        }
    }

    /// Whether any TLS setting is given (which asks for TLS).
    pub fn is_set(&self) -> bool {
        self.flag().is_some()
    }
}

/// Where the system's CA bundle usually is, when `--tls-ca` is not given
/// (`SSL_CERT_FILE` first).
const SYSTEM_BUNDLES: [&str; 4] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem", "/etc/ssl/ca-bundle.pem"];

/// A sidecar address, parsed and with its TLS files read: connect with
/// [`Target::connect`] or [`Target::connect_endpoint`].
#[derive(Debug, Clone)]
pub struct Target {
    addr: String,
    endpoint: Endpoint,
    unix: Option<PathBuf>,
    tls: bool,
}

impl Target {
    /// Parses `addr` and reads the TLS files of `tls` (refusing an unusable
    /// combination, naming the flag and the reason).
    pub fn new(addr: &str, tls: &ClientTls) -> Result<Target, String> {
        if let Some(path) = addr.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("{addr:?}: a Unix socket is unix:///ABSOLUTE/PATH (three slashes)"));
            }
            if let Some(flag) = tls.flag() {
                return Err(format!("{flag}: {addr} is a Unix socket, which the sidecar serves without TLS"));
            }
            return Ok(Target {
                addr: addr.to_string(),
                endpoint: Endpoint::from_static("http://localhost"),
                unix: Some(PathBuf::from(path)),
                tls: false,
            });
        }
        let (authority, https) = if let Some(rest) = addr.strip_prefix("https://") {
            (rest, true)
        } else if let Some(rest) = addr.strip_prefix("http://") {
            if let Some(flag) = tls.flag() {
                return Err(format!("{flag}: {addr} is plaintext (http://); give https://HOST:PORT or HOST:PORT for TLS"));
            }
            (rest, false)
        } else if addr.contains("://") {
            return Err(format!("{addr:?}: expected HOST:PORT, http://HOST:PORT, https://HOST:PORT or unix:///PATH"));
        } else {
            (addr, tls.is_set())
        };
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        let uri: Uri = format!("{}://{authority}", if https { "https" } else { "http" }).parse().map_err(|e| {
            format!("{addr:?} is not an address ({e}): expected HOST:PORT, http://HOST:PORT, https://HOST:PORT or unix:///PATH")
        })?;
        if uri.host().is_none_or(str::is_empty) || uri.port().is_none() || uri.path() != "/" {
            return Err(format!("{addr:?}: expected HOST:PORT, http://HOST:PORT, https://HOST:PORT or unix:///PATH"));
        }
        let mut endpoint = Endpoint::from(uri);
        if https {
            endpoint = endpoint.tls_config(client_config(addr, tls)?).map_err(|e| format!("{addr}: {}", chain(&e)))?;
        }
        Ok(Target { addr: addr.to_string(), endpoint, unix: None, tls: https })
    }

    /// The address as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The Unix socket, for a `unix://` address.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_deref()
    }

    /// The endpoint, to tune (timeouts, window sizes) before
    /// [`Target::connect_endpoint`].
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    /// One connection, with a 5-second connect timeout.
    pub async fn connect(&self) -> Result<Channel, String> {
        self.connect_endpoint(self.endpoint().connect_timeout(Duration::from_secs(5))).await
    }

    /// One connection through `endpoint` (from [`Target::endpoint`]): over
    /// the Unix socket for a `unix://` address.
    pub async fn connect_endpoint(&self, endpoint: Endpoint) -> Result<Channel, String> {
        let result = match &self.unix {
            None => endpoint.connect().await,
            Some(path) => {
                let path = path.clone();
                endpoint
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                    }))
                    .await
            }
        };
        result.map_err(|e| format!("cannot reach {}: {}", self.addr, chain(&e)))
    }
}

/// An error and its sources (tonic's own message is only "transport error").
pub fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))
}

/// The certificates of a PEM file, refused when it holds none.
fn certificates(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    let pem = read(flag, path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(pem),
        Ok(_) => Err(format!("{flag}: {} holds no PEM certificate", path.display())),
        Err(e) => Err(format!("{flag}: {} is not PEM certificates: {e}", path.display())),
    }
}

fn client_config(addr: &str, tls: &ClientTls) -> Result<ClientTlsConfig, String> {
    let ca = match &tls.ca {
        Some(path) => certificates("--tls-ca", path)?,
        None => system_bundle(addr)?,
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let cert = certificates("--tls-cert", cert)?;
            let pem = read("--tls-key", key)?;
            PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| format!("--tls-key: {} is not a PEM private key: {e}", key.display()))?;
            config = config.identity(Identity::from_pem(cert, pem));
        }
        (Some(_), None) => return Err("--tls-cert: needs --tls-key (the client certificate's private key)".to_string()),
        (None, Some(_)) => return Err("--tls-key: needs --tls-cert (the client certificate it belongs to)".to_string()),
        (None, None) => {}
    }
    if let Some(name) = &tls.server_name {
        ServerName::try_from(name.as_str())
            .map_err(|e| format!("--tls-server-name: {name:?} is not a DNS name or an IP address: {e}"))?;
        config = config.domain_name(name);
    }
    Ok(config)
}

/// The system's CA bundle, when `--tls-ca` is not given.
fn system_bundle(addr: &str) -> Result<Vec<u8>, String> {
    if let Some(path) = std::env::var_os("SSL_CERT_FILE") {
        return certificates("SSL_CERT_FILE", Path::new(&path));
    }
    for path in SYSTEM_BUNDLES {
        if Path::new(path).is_file() {
            return certificates("the system CA bundle", Path::new(path));
        }
    }
    Err(format!(
        "--tls-ca: {addr} is TLS and no CA bundle is given, nor found on this system (SSL_CERT_FILE, {})",
        SYSTEM_BUNDLES.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(addr: &str, tls: &ClientTls) -> String {
        Target::new(addr, tls).map(|t| t.addr().to_string()).unwrap_err()
    }

    #[test]
    fn addresses_without_a_scheme_are_plaintext_unless_tls_is_asked_for() {
        let plain = Target::new("127.0.0.1:50051", &ClientTls::default()).unwrap();
        assert!(!plain.is_tls());
        assert_eq!(plain.endpoint().uri().to_string(), "http://127.0.0.1:50051/");
        let unix = Target::new("unix:///run/tagward/data.sock", &ClientTls::default()).unwrap();
        assert_eq!(unix.unix_path(), Some(Path::new("/run/tagward/data.sock")));
        let named = ClientTls { server_name: Some("sidecar".into()), ..ClientTls::default() };
        // A TLS flag asks for TLS (the CA then comes from the system, if any).
        if let Ok(t) = Target::new("sidecar:443", &named) {
            assert!(t.is_tls());
        }
    }

    #[test]
    fn unusable_combinations_are_refused_naming_the_flag() {
        let ca = ClientTls { ca: Some("/nonexistent/ca.pem".into()), ..ClientTls::default() };
        assert!(refused("unix:///tmp/s.sock", &ca).starts_with("--tls-ca: unix:///tmp/s.sock is a Unix socket"));
        assert!(refused("http://127.0.0.1:1", &ca).starts_with("--tls-ca: http://127.0.0.1:1 is plaintext"));
        assert!(refused("127.0.0.1:1", &ca).starts_with("--tls-ca: cannot read /nonexistent/ca.pem"));
        assert!(refused("unix://relative.sock", &ClientTls::default()).contains("three slashes"));
        for bad in ["ftp://host:1", "127.0.0.1", "host:1/path", "http://"] {
            assert!(refused(bad, &ClientTls::default()).contains("expected HOST:PORT"), "{bad}");
        }
    }

    fn file(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("tagward-dial-{}-{name}.pem", std::process::id()));
        std::fs::write(&path, "not pem").unwrap();
        path
    }

    #[test]
    fn files_that_are_not_pem_are_refused() {
        let tls = ClientTls { ca: Some(file("notpem")), ..ClientTls::default() };
        let e = refused("https://127.0.0.1:1", &tls);
        assert!(e.starts_with("--tls-ca:") && e.contains("no PEM certificate"), "{e}");
    }
}
