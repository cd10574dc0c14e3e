//! The listeners beyond plain TCP: Unix domain sockets (peer credentials,
//! file mode, a stale file, removal at shutdown) and the health-only
//! listener for probes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use hyper_util::rt::TokioIo;
use tagward::grpc::peer::Peer;
use tagward::grpc::proto;
use tagward::grpc::transport::ListenAddr;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// A gRPC channel over the Unix socket at `path`.
async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

fn socket(dir: &Scratch, name: &str) -> (PathBuf, ListenAddr) {
    let path = dir.join(name);
    (path.clone(), format!("unix://{}", path.display()).parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn both_planes_serve_on_unix_sockets() {
    let dir = Scratch::new("unix");
    let (data, data_listen) = socket(&dir, "data.sock");
    let (admin, admin_listen) = socket(&dir, "admin.sock");
    // A socket file left by a previous run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&data).unwrap());
    assert!(data.exists());
    let mut cfg = config();
    cfg.listen = data_listen.clone();
    cfg.admin_listen = admin_listen.clone();
    let running = start(cfg).await;
    assert_eq!(running.data_addr, data_listen);
    assert_eq!(running.data_addr.to_string(), format!("unix://{}", data.display()));
    for path in [&data, &admin] {
        assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o660, "{}", path.display());
    }

    let mut authz = AuthorizerClient::new(unix_channel(&data).await);
    let r = authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap();
    assert!(allowed(r.get_ref()));
    // The admin plane on a Unix socket needs no token: the file mode guards it.
    let mut admin_client = AdminClient::new(unix_channel(&admin).await);
    let mut export = admin_client.export(proto::ExportRequest::default()).await.unwrap().into_inner();
    assert!(export.message().await.unwrap().is_some());

    running.shutdown().await;
    assert!(!data.exists() && !admin.exists(), "the socket files are removed at shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unix_socket_peer_is_known_by_uid_and_gid() {
    let dir = Scratch::new("unix-peer");
    let (path, listen) = socket(&dir, "probe.sock");
    let probe = pki::peer_probe(listen, None).await;
    let mut health = HealthClient::new(unix_channel(&path).await);
    health_check(&mut health, "").await.unwrap();
    // This process created the socket file, so its owner is our uid and gid.
    let meta = std::fs::metadata(&path).unwrap();
    let seen = probe.seen.lock().unwrap().clone();
    assert_eq!(seen, [Some(Peer::Unix { uid: meta.uid(), gid: meta.gid() })]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_that_is_not_a_socket_is_left_alone() {
    let dir = Scratch::new("unix-file");
    let (path, listen) = socket(&dir, "data.sock");
    std::fs::write(&path, "precious").unwrap();
    let mut cfg = config();
    cfg.listen = listen;
    let store = std::sync::Arc::new(tagward::store::Store::new(Default::default(), 16));
    let e = tagward::grpc::server::start(cfg, store).await.err().expect("must not start");
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_health_listener_serves_health_only_and_follows_the_data_plane() {
    let mut cfg = config();
    cfg.health_listen = Some(loopback().into());
    let running = start(cfg).await;
    let health_addr = running.health_addr.clone().expect("a health listener");
    let probe = channel(&health_addr).await;
    let mut health = HealthClient::new(probe.clone());
    for service in ["", "tagward.v1.Authorizer", "tagward.v1.Tagging"] {
        assert_eq!(health_check(&mut health, service).await.unwrap(), SERVING, "{service:?}");
    }
    let mut authz = AuthorizerClient::new(probe);
    let e = authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    // Health is still on the data listener too.
    let Clients { health: mut data_health, .. } = clients(&running).await;
    assert_eq!(health_check(&mut data_health, "").await.unwrap(), SERVING);

    // Shutting down: the probe sees NOT_SERVING (or the listener gone).
    let mut watch = health.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, SERVING);
    let stopping = tokio::spawn(running.shutdown());
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.expect("the watch answers");
    if let Ok(Some(r)) = next {
        assert_ne!(r.status, SERVING);
    }
    drop((watch, health, authz, data_health));
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_takes_unix_addresses_and_a_health_port_from_the_command_line() {
    let dir = Scratch::new("unix-cli");
    let (data, _) = socket(&dir, "data.sock");
    let args: Vec<String> = ["serve", "--ephemeral", "--world", "deploy/world/example.json", "--health-listen", "127.0.0.1:0"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--listen".into(), format!("unix://{}", data.display()), "--admin-listen".into(), "127.0.0.1:0".into()])
        .collect();
    let mut server = Tagward::spawn(command(&args));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !data.exists() {
        assert!(server.try_wait().is_none(), "exited: {}", server.stderr());
        assert!(std::time::Instant::now() < deadline, "no socket file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut health = HealthClient::new(unix_channel(&data).await);
    assert_eq!(health_check(&mut health, "").await.unwrap(), SERVING);
    drop(health);
    let logs = server.term(Duration::from_secs(10));
    assert!(logs.contains(&format!("data_addr=unix://{}", data.display())), "{logs}");
    assert!(logs.contains("health_addr=127.0.0.1:"), "{logs}");
    assert!(!data.exists(), "the socket file is removed at shutdown");
}
