//! Who is on the other end of a connection, as the transport established
//! it: the listener puts a [`Peer`] into every request's extensions (as its
//! connect info), so that handlers decide on facts the caller cannot forge
//! rather than on what a request says.

use std::net::SocketAddr;

/// The verified facts about a caller's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Plain TCP from this address (no identity beyond the address).
    Tcp { addr: SocketAddr },
    /// TLS from this address; with client certificates (mTLS), the verified
    /// certificate's URI SANs (e.g. SPIFFE IDs) and DNS SANs, else empty.
    Tls { addr: SocketAddr, uris: Vec<String>, dns: Vec<String> },
    /// A Unix domain socket: the peer process's credentials (SO_PEERCRED).
    Unix { uid: u32, gid: u32 },
}

impl Peer {
    /// The peer of a request, when the listener recorded one.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Peer> {
        request.extensions().get::<Peer>()
    }

    /// A TCP peer on a loopback address (the local, trusted-by-default case).
    pub fn is_loopback_tcp(&self) -> bool {
        matches!(self, Peer::Tcp { addr } if addr.ip().is_loopback())
    }
}

/// A client certificate whose names cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanError {
    #[error("not an X.509 certificate: {0}")]
    NotX509(String),
    #[error("bad subjectAltName extension: {0}")]
    BadSan(String),
}

/// The URI SANs (e.g. SPIFFE IDs) and DNS SANs of a DER certificate, in
/// the certificate's order.
pub fn sans(der: &[u8]) -> Result<(Vec<String>, Vec<String>), SanError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| SanError::NotX509(e.to_string()))?;
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    let san = cert.subject_alternative_name().map_err(|e| SanError::BadSan(e.to_string()))?;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        match name {
            GeneralName::URI(u) => uris.push((*u).to_string()),
            GeneralName::DNSName(d) => dns.push((*d).to_string()),
            _ => {}
        }
    }
    Ok((uris, dns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sans_of_a_client_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["app.default.svc".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI("spiffe://example.org/ns/default/sa/app".try_into().unwrap()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (uris, dns) = sans(cert.der()).unwrap();
        assert_eq!(uris, ["spiffe://example.org/ns/default/sa/app"]);
        assert_eq!(dns, ["app.default.svc"]);
        assert!(sans(b"not a certificate").unwrap_err().to_string().contains("X.509"));
    }
}
