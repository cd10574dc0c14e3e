//! A real etcd for the fleet tests: `etcd` (Debian's `etcd-server`) on
//! loopback ports of its own, its data in the test's scratch directory,
//! killed when dropped. Where `etcd` is not on the PATH, [`Etcd::available`]
//! says so loudly and the test returns; with `CI=true` that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tagward::grpc::etcd::{Etcd as Client, EtcdTls, EtcdUrl};

pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client: u16,
    peer: u16,
    /// Served over TLS with client certificates required: the server's
    /// (cert, key) and the files a client needs.
    tls: Option<(PathBuf, PathBuf, EtcdTls)>,
    /// More flags for etcd (limits).
    extra: Vec<String>,
}

/// Is `etcd` on the PATH? If not, prints why the test did not run (and
/// fails under `CI=true`, where `.ci/run` installs it).
pub fn available(test: &str) -> bool {
    let found = Command::new("etcd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        let message = format!(
            "\n!!!!! FLEET TEST {test} DID NOT RUN: `etcd` is not on the PATH.\n!!!!! Install it with deploy/install-etcd.sh (Debian's etcd-server package).\n"
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}(CI=true: a fleet test that cannot run is a failure)");
        }
        eprintln!("{message}");
    }
    found
}

impl Etcd {
    /// Starts etcd with its data under `scratch` and waits until it answers.
    pub async fn start(scratch: &Path) -> Etcd {
        Etcd::start_with(scratch, None).await
    }

    /// Starts etcd serving clients over TLS only, requiring a client
    /// certificate from `client.ca` (`--client-cert-auth`).
    pub async fn start_tls(scratch: &Path, server_cert: PathBuf, server_key: PathBuf, client: EtcdTls) -> Etcd {
        Etcd::start_with(scratch, Some((server_cert, server_key, client))).await
    }

    /// An etcd with its ports chosen but not started yet: [`Etcd::url`]
    /// names it, [`Etcd::restart`] starts it.
    pub fn unstarted(scratch: &Path) -> Etcd {
        let (client, peer) = (super::free_port(), super::free_port());
        Etcd { child: None, dir: scratch.join("etcd"), client, peer, tls: None, extra: Vec::new() }
    }

    /// Starts etcd with more flags (`--max-request-bytes N`, say).
    pub async fn start_args(scratch: &Path, extra: &[&str]) -> Etcd {
        let etcd = Etcd {
            child: None,
            dir: scratch.join("etcd"),
            client: super::free_port(),
            peer: super::free_port(),
            tls: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        etcd.launch().await
    }

    async fn start_with(scratch: &Path, tls: Option<(PathBuf, PathBuf, EtcdTls)>) -> Etcd {
        let (client, peer) = (super::free_port(), super::free_port());
        Etcd { child: None, dir: scratch.join("etcd"), client, peer, tls, extra: Vec::new() }.launch().await
    }

    /// Starts etcd and waits until it answers, on fresh ports when it could
    /// not bind the ones chosen: [`super::free_port`] finds a port that was
    /// free a moment ago, and tests running beside this one take ports too.
    async fn launch(mut self) -> Etcd {
        for _ in 0..5 {
            self.spawn();
            if self.answered().await {
                return self;
            }
            self.kill9();
            let _ = std::fs::remove_dir_all(&self.dir);
            (self.client, self.peer) = (super::free_port(), super::free_port());
        }
        panic!("etcd exited before answering five times; see {}", self.dir.with_extension("log").display());
    }

    fn spawn(&mut self) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .expect("open the etcd log");
        let mut cmd = Command::new("etcd");
        if let Some((cert, key, client)) = &self.tls {
            cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
            cmd.arg("--trusted-ca-file").arg(client.ca.as_ref().expect("a client CA")).arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "fleet-test", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("fleet-test={peer}")])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) {
        assert!(self.answered().await, "etcd exited before answering; see {}", self.dir.with_extension("log").display());
    }

    /// Waits until etcd answers (true) or its process has exited (false).
    async fn answered(&mut self) -> bool {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if client.newest().await.is_ok() {
                return true;
            }
            if self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 30 s; see {}",
                self.dir.with_extension("log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `etcd://127.0.0.1:PORT/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.client)
    }

    /// A client of this etcd (for a prefix that does not matter).
    pub fn client(&self) -> Client {
        self.client_for("fleet")
    }

    pub fn client_for(&self, prefix: &str) -> Client {
        let url: EtcdUrl = self.url(prefix).parse().expect("an etcd URL");
        let tls = self.tls.as_ref().map(|(_, _, c)| c.clone()).unwrap_or_default();
        Client::with_tls(&url, Duration::from_secs(2), &tls).expect("an etcd client")
    }

    /// SIGKILL, and wait for the exit.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready().await;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill9();
    }
}
