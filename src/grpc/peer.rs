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
