//! TLS on the listeners: plaintext refused, server-only TLS, mTLS (no
//! certificate, a certificate from another CA, the right one, and the
//! `Peer::Tls` a handler sees), certificate rotation without a restart, and
//! the start-up errors. Everything on 127.0.0.1 with throwaway certificates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{self, Ca};
use common::*;
use tagward::grpc::peer::Peer;
use tagward::grpc::proto;
use tagward::grpc::server::{self, ServeError};
use tagward::grpc::transport::TlsFiles;
use tagward::store::Store;
use tonic::transport::Channel;

const SPIFFE: &str = "spiffe://example.org/ns/default/sa/app";

async fn ask(channel: Channel) -> Result<bool, tonic::Status> {
    let mut authz = AuthorizerClient::new(channel);
    authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.map(|r| allowed(r.get_ref()))
}

/// A plaintext call to a TLS listener: refused (connecting or calling).
async fn plaintext_refused(addr: impl std::fmt::Display) {
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_timeout(Duration::from_secs(5));
    if let Ok(channel) = endpoint.connect().await {
        let r = tokio::time::timeout(Duration::from_secs(5), ask(channel)).await.expect("a refusal, not a hang");
        assert!(r.is_err(), "plaintext must not be served on a TLS listener: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_listener_refuses_plaintext_and_serves_tls() {
    let dir = Scratch::new("tls-plain");
    let ca = Ca::new("test CA");
    let mut cfg = config();
    cfg.tls = Some(pki::write_files(dir.path(), &ca.server("data"), None));
    cfg.admin_tls = Some(pki::write_files(&dir.join("admin"), &ca.server("admin"), None));
    let running = start(cfg).await;

    plaintext_refused(&running.data_addr).await;
    assert!(ask(pki::tls_channel(&running.data_addr, &ca, None).await.unwrap()).await.unwrap());
    // A client that does not trust the server's CA does not connect.
    let other = Ca::new("other CA");
    let r = match pki::tls_channel(&running.data_addr, &other, None).await {
        Ok(channel) => ask(channel).await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(r.is_err(), "an untrusted server certificate must fail the client");

    // The admin listener: TLS too, and plaintext refused.
    plaintext_refused(&running.admin_addr).await;
    let mut admin = AdminClient::new(pki::tls_channel(&running.admin_addr, &ca, None).await.unwrap());
    let mut export = admin.export(proto::ExportRequest::default()).await.unwrap().into_inner();
    assert!(export.message().await.unwrap().is_some());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_needs_a_certificate_from_the_client_ca() {
    let dir = Scratch::new("tls-mutual");
    let ca = Ca::new("test CA");
    let mut cfg = config();
    cfg.tls = Some(pki::write_files(dir.path(), &ca.server("data"), Some(&ca)));
    let running = start(cfg).await;
    let addr = running.data_addr.clone();

    let refused = |what: &'static str, r: Result<Result<bool, tonic::Status>, tonic::transport::Error>| {
        assert!(!matches!(r, Ok(Ok(_))), "{what}: must be refused, got {r:?}");
    };
    let attempt = |client: Option<common::pki::Leaf>| {
        let (addr, ca) = (addr.clone(), &ca);
        async move {
            match pki::tls_channel(&addr, ca, client.as_ref()).await {
                Ok(channel) => Ok(tokio::time::timeout(Duration::from_secs(5), ask(channel)).await.expect("no hang")),
                Err(e) => Err(e),
            }
        }
    };
    refused("no client certificate", attempt(None).await);
    refused("a certificate from another CA", attempt(Some(Ca::new("other CA").client(SPIFFE))).await);
    plaintext_refused(&addr).await;
    assert!(attempt(Some(ca.client(SPIFFE))).await.unwrap().unwrap(), "the right CA's client is served");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_sees_the_client_certificate_sans() {
    let dir = Scratch::new("tls-peer");
    let ca = Ca::new("test CA");
    let files = pki::write_files(dir.path(), &ca.server("probe"), Some(&ca));
    let probe = pki::peer_probe(loopback().into(), Some(files)).await;
    let channel = pki::tls_channel(&probe.addr, &ca, Some(&ca.client(SPIFFE))).await.unwrap();
    let mut health = HealthClient::new(channel);
    health_check(&mut health, "").await.unwrap();
    let seen = probe.seen.lock().unwrap().clone();
    match seen.as_slice() {
        [Some(Peer::Tls { addr, uris, dns })] => {
            assert!(addr.ip().is_loopback());
            assert_eq!(uris, &[SPIFFE.to_string()]);
            assert!(dns.is_empty(), "{dns:?}");
        }
        other => panic!("expected one Peer::Tls, saw {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_tcp_requests_carry_a_tcp_peer() {
    let probe = pki::peer_probe(loopback().into(), None).await;
    let mut health = HealthClient::new(channel(&probe.addr).await);
    health_check(&mut health, "").await.unwrap();
    let seen = probe.seen.lock().unwrap().clone();
    assert!(matches!(seen.as_slice(), [Some(p @ Peer::Tcp { .. })] if p.is_loopback_tcp()), "{seen:?}");
}

/// The certificate the server presents to a new connection (a raw rustls
/// handshake trusting `ca`).
async fn presented(addr: std::net::SocketAddr, ca: &Ca) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_certificate_reaches_new_connections_without_a_restart() {
    let dir = Scratch::new("tls-rotate");
    let ca = Ca::new("test CA");
    let (first, second) = (ca.server("first"), ca.server("second"));
    let mut cfg = config();
    cfg.tls_reload = Duration::from_millis(100);
    let files = pki::write_files(dir.path(), &first, None);
    cfg.tls = Some(files.clone());
    let running = start(cfg).await;
    let addr = pki::tcp(&running.data_addr);
    let old = pki::tls_channel(&running.data_addr, &ca, None).await.unwrap();
    assert_eq!(presented(addr, &ca).await, first.der);

    pki::replace(&files, &second);
    let deadline = Instant::now() + Duration::from_secs(10);
    while presented(addr, &ca).await != second.der {
        assert!(Instant::now() < deadline, "the new certificate was not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection made before the rotation keeps working.
    assert!(ask(old).await.unwrap());

    // A broken rotation (a certificate that is not PEM) keeps the last good one.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(presented(addr, &ca).await, second.der);
    assert!(ask(pki::tls_channel(&running.data_addr, &ca, None).await.unwrap()).await.unwrap());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unusable_tls_files_stop_the_start_naming_the_file() {
    let dir = Scratch::new("tls-bad");
    let ca = Ca::new("test CA");
    let good = pki::write_files(dir.path(), &ca.server("data"), None);
    let store = || Arc::new(Store::new(Default::default(), 16));
    let cases = [
        (TlsFiles { cert: dir.join("missing.crt"), ..good.clone() }, "missing.crt"),
        (TlsFiles { cert: good.key.clone(), ..good.clone() }, "no PEM certificate"),
        (TlsFiles { key: good.cert.clone(), ..good.clone() }, "private key"),
        (TlsFiles { key: pki::write_files(&dir.join("other"), &ca.server("x"), None).key, ..good.clone() }, "tls.crt"),
        (TlsFiles { client_ca: Some(good.key.clone()), ..good.clone() }, "tls.key"),
    ];
    for (files, expect) in cases {
        let mut cfg = config();
        cfg.admin_tls = Some(files);
        match server::start(cfg, store()).await {
            Err(e @ ServeError::Tls { .. }) => {
                let text = e.to_string();
                assert!(text.contains("admin listener") && text.contains(expect), "{text}");
            }
            Err(e) => panic!("expected a TLS error, got {e}"),
            Ok(_) => panic!("a listener with unusable TLS files must not start ({expect})"),
        }
    }
}

#[test]
fn a_certificate_without_its_key_is_a_start_up_error_naming_the_flag() {
    for (flag, missing) in
        [("--tls-cert", "--tls-key"), ("--admin-tls-key", "--admin-tls-cert"), ("--tls-client-ca", "--tls-cert")]
    {
        let out = command(&["serve".into(), "--ephemeral".into(), flag.into(), "x.pem".into()]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(missing), "{flag} without {missing}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rereads_the_certificate_at_once() {
    let dir = Scratch::new("tls-hup");
    let ca = Ca::new("test CA");
    let (first, second) = (ca.server("first"), ca.server("second"));
    let mut cfg = config();
    // Far beyond the test: only the signal can make it reread.
    cfg.tls_reload = Duration::from_secs(3600);
    let files = pki::write_files(dir.path(), &first, None);
    cfg.tls = Some(files.clone());
    let running = start(cfg).await;
    let addr = pki::tcp(&running.data_addr);
    assert_eq!(presented(addr, &ca).await, first.der);
    pki::replace(&files, &second);
    let me = std::process::id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &me]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while presented(addr, &ca).await != second.der {
        assert!(Instant::now() < deadline, "SIGHUP did not reload the certificate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await;
}
