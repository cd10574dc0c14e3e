//! The Rust clients over TLS, mTLS and Unix sockets: `tagward authorize`
//! and `tagward test --server/--admin` as a user runs them (the real binary)
//! against in-process sidecars on loopback with throwaway certificates, and
//! their refusals, each naming the flag.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::path::PathBuf;

use common::pki::{self, Ca, Leaf};
use common::*;
use tagward::grpc::transport::ListenAddr;

const SPIFFE: &str = "spiffe://example.org/ns/default/sa/tagward-cli";

/// Runs `tagward ARGS` with a clean `TAGWARD_*` environment plus `env`:
/// the exit code, standard output and standard error.
async fn tagward(args: Vec<String>, env: Vec<(&'static str, String)>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = command(&args).envs(env).output().expect("run tagward");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `tagward authorize --server SERVER EXTRA... ` for AlphaApp decrypting its key.
fn ask(server: &str, extra: &[&str]) -> Vec<String> {
    let mut a = argv(&["authorize", "--server", server, "--principal", ALPHA_APP, "--action", "kms:Decrypt"]);
    a.extend(argv(&["--resource", KEY_ALPHA]));
    a.extend(argv(extra));
    a
}

fn write(dir: &Scratch, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The client's files: the CA to trust, and a client certificate and key.
fn client_files(dir: &Scratch, ca: &Ca, client: &Leaf) -> (String, String, String) {
    (write(dir, "client-ca.crt", &ca.pem), write(dir, "client.crt", &client.cert), write(dir, "client.key", &client.key))
}

#[tokio::test(flavor = "multi_thread")]
async fn authorize_over_tls_trusting_the_given_ca() {
    let dir = Scratch::new("clients-tls");
    let ca = Ca::new("test CA");
    let mut cfg = config();
    cfg.tls = Some(pki::write_files(&dir.join("server"), &ca.server("data"), None));
    let running = start(cfg).await;
    let port = pki::tcp(&running.data_addr).port();
    let ca_file = write(&dir, "ca.crt", &ca.pem);

    // https:// with --tls-ca: Allow, exit 0.
    let (code, out, err) = tagward(ask(&format!("https://127.0.0.1:{port}"), &["--tls-ca", &ca_file]), vec![]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("Allow (ALLOWED)"), "{out}");
    // HOST:PORT with the CA from TAGWARD_TLS_CA: a TLS setting means TLS, and
    // the certificate's DNS name checks out with --tls-server-name.
    let (code, out, err) = tagward(
        ask(&format!("127.0.0.1:{port}"), &["--tls-server-name", "localhost"]),
        vec![("TAGWARD_TLS_CA", ca_file.clone())],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    // A name the certificate does not carry fails the handshake.
    let (code, out, err) =
        tagward(ask(&format!("127.0.0.1:{port}"), &["--tls-ca", &ca_file, "--tls-server-name", "elsewhere"]), vec![]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("cannot reach"), "{err}");

    // Another CA: not trusted, exit 2 naming the address.
    let other = write(&dir, "other.crt", &Ca::new("other CA").pem);
    let (code, out, err) = tagward(ask(&format!("https://127.0.0.1:{port}"), &["--tls-ca", &other]), vec![]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(&format!("cannot reach https://127.0.0.1:{port}")), "{err}");
    // Plaintext to the TLS listener: no answer.
    let (code, out, err) = tagward(ask(&format!("127.0.0.1:{port}"), &[]), vec![]).await;
    assert_eq!(code, 2, "{out}{err}");

    // Refusals name the flag and the reason.
    let (code, _, err) = tagward(ask(&format!("http://127.0.0.1:{port}"), &["--tls-ca", &ca_file]), vec![]).await;
    assert_eq!(code, 2);
    assert!(err.starts_with(&format!("--tls-ca: http://127.0.0.1:{port} is plaintext")), "{err}");
    let (code, _, err) = tagward(ask(&format!("127.0.0.1:{port}"), &["--tls-ca", "/nonexistent/ca.crt"]), vec![]).await;
    assert_eq!(code, 2);
    assert!(err.starts_with("--tls-ca: cannot read /nonexistent/ca.crt"), "{err}");
    let (code, _, err) =
        tagward(ask(&format!("127.0.0.1:{port}"), &["--tls-ca", &write(&dir, "junk.crt", "junk")]), vec![]).await;
    assert_eq!(code, 2);
    assert!(err.starts_with("--tls-ca:") && err.contains("no PEM certificate"), "{err}");
    let (code, _, err) = tagward(ask(&format!("127.0.0.1:{port}"), &["--tls-cert", &ca_file]), vec![]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--tls-key"), "clap names the missing flag: {err}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn authorize_over_mtls_with_a_client_certificate() {
    let dir = Scratch::new("clients-mtls");
    let ca = Ca::new("test CA");
    let mut cfg = config();
    cfg.tls = Some(pki::write_files(&dir.join("server"), &ca.server("data"), Some(&ca)));
    let running = start(cfg).await;
    let server = format!("https://{}", running.data_addr);
    let (ca_file, cert, key) = client_files(&dir, &ca, &ca.client(SPIFFE));

    let (code, out, err) = tagward(
        ask(&server, &["--json"]),
        vec![("TAGWARD_TLS_CA", ca_file.clone()), ("TAGWARD_CLIENT_TLS_CERT", cert), ("TAGWARD_CLIENT_TLS_KEY", key.clone())],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"decision\":\"Allow\""), "{out}");
    // Without a client certificate the sidecar refuses the connection.
    let (code, out, err) = tagward(ask(&server, &["--tls-ca", &ca_file]), vec![]).await;
    assert_eq!(code, 2, "{out}{err}");
    // A key that is not one.
    let (code, _, err) =
        tagward(ask(&server, &["--tls-ca", &ca_file, "--tls-cert", &ca_file, "--tls-key", &ca_file]), vec![]).await;
    assert_eq!(code, 2);
    assert!(err.starts_with("--tls-key:") && err.contains("not a PEM private key"), "{err}");
    running.shutdown().await;
}

fn unix(dir: &Scratch, name: &str) -> (PathBuf, ListenAddr) {
    let path = dir.join(name);
    (path.clone(), format!("unix://{}", path.display()).parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn authorize_and_test_over_unix_sockets() {
    let dir = Scratch::new("clients-unix");
    let (_, data) = unix(&dir, "data.sock");
    let (_, admin) = unix(&dir, "admin.sock");
    let mut cfg = config();
    cfg.listen = data.clone();
    cfg.admin_listen = admin.clone();
    let running = start(cfg).await;
    let (data, admin) = (data.to_string(), admin.to_string());

    let (code, out, err) = tagward(ask(&data, &[]), vec![]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("Allow (ALLOWED)"), "{out}");
    // TLS on a Unix socket is refused: the sidecar serves none there.
    let (code, _, err) = tagward(ask(&data, &["--tls-ca", "/etc/hostname"]), vec![]).await;
    assert_eq!(code, 2);
    assert!(err.starts_with(&format!("--tls-ca: {data} is a Unix socket")), "{err}");
    let (code, _, err) = tagward(ask("unix://relative.sock", &[]), vec![]).await;
    assert_eq!(code, 2);
    assert!(err.contains("three slashes"), "{err}");

    // `tagward test` with both planes on Unix sockets (no token needed there).
    let (code, out, err) =
        tagward(argv(&["test", "--server", &data, "--admin", &admin, "tests/scenarios/service-keys.json"]), vec![]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenarios_run_against_a_sidecar_over_mtls() {
    let dir = Scratch::new("clients-test-mtls");
    let ca = Ca::new("test CA");
    let mut cfg = config();
    cfg.tls = Some(pki::write_files(&dir.join("data"), &ca.server("data"), Some(&ca)));
    cfg.admin_tls = Some(pki::write_files(&dir.join("admin"), &ca.server("admin"), Some(&ca)));
    let running = start(cfg).await;
    let (ca_file, cert, key) = client_files(&dir, &ca, &ca.client(SPIFFE));
    let (data, admin) = (running.data_addr.to_string(), format!("https://{}", running.admin_addr));
    let scenario = "tests/scenarios/service-keys.json";

    // HOST:PORT and https:// both go over TLS with the flags, on both planes.
    let mut args = argv(&["test", "--server", &data, "--admin", &admin, "--tls-ca", &ca_file]);
    args.extend(argv(&["--tls-cert", &cert, "--tls-key", &key, scenario]));
    let (code, out, err) = tagward(args, vec![]).await;
    assert_eq!(code, 0, "{out}{err}");
    let passed: usize = out.lines().last().unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(passed > 0 && out.trim_end().ends_with(" passed, 0 failed"), "{out}");

    // Without the client certificate the sidecar refuses: a TLS 1.3 client
    // learns it at its first call, so the world does not load.
    let (code, out, err) =
        tagward(argv(&["test", "--server", &data, "--admin", &admin, "--tls-ca", &ca_file, scenario]), vec![]).await;
    assert_ne!(code, 0, "{out}{err}");
    assert!(out.contains("could not be loaded") || err.contains("cannot reach"), "{out}{err}");
    running.shutdown().await;
}
