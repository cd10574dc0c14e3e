//! The one harness for `tagward` child processes: spawn `tagward serve` (or
//! any command) with a clean `TAGWARD_*` environment, collect its stderr on a
//! thread as it arrives, learn the bound addresses from the `serving
//! data_addr=... admin_addr=...` log line, signal it, and kill it on drop.
//!
//! `serve` is given `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0` unless
//! told otherwise, so the kernel picks the ports and no test races another
//! for a port it picked and released.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{channel, health_check, wait_for_exit, AdminClient, AuthorizerClient, HealthClient, TaggingClient, SERVING};
use tonic::transport::Channel;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tagward");

/// The package directory: relative paths in tests (deploy/world/...) start here.
pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `tagward` with the environment cleared of every `TAGWARD_*` variable
/// (and `TAGWARD_LOG=info`), run in the package directory.
pub fn command(args: &[String]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(manifest_dir()).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("TAGWARD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("TAGWARD_LOG", "info");
    cmd
}

/// How to start `tagward serve`.
pub struct Serve {
    listen: String,
    admin_listen: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
}

impl Default for Serve {
    fn default() -> Serve {
        Serve {
            listen: "127.0.0.1:0".into(),
            admin_listen: "127.0.0.1:0".into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: manifest_dir().to_path_buf(),
        }
    }
}

impl Serve {
    pub fn new() -> Serve {
        Serve::default()
    }

    /// The admin address instead of `127.0.0.1:0`.
    pub fn admin_listen(mut self, addr: &str) -> Serve {
        self.admin_listen = addr.to_string();
        self
    }

    /// More arguments after `serve --listen ... --admin-listen ...`.
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Serve {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// A sidecar for the scenario corpora over gRPC (`tagward test
    /// --server`): their time-key steps set `aws:CurrentTime` and
    /// `aws:EpochTime`, which a sidecar refuses unless started with
    /// `--allow-clock-override`.
    pub fn for_scenarios(self) -> Serve {
        self.args(["--allow-clock-override"])
    }

    /// An environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Serve {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The working directory (default: the package directory).
    pub fn cwd(mut self, dir: &Path) -> Serve {
        self.cwd = dir.to_path_buf();
        self
    }

    /// The whole command line after the binary's name.
    pub fn argv(&self) -> Vec<String> {
        let mut argv: Vec<String> = vec!["serve".into(), "--listen".into(), self.listen.clone()];
        argv.extend(["--admin-listen".into(), self.admin_listen.clone()]);
        argv.extend(self.args.iter().cloned());
        argv
    }

    /// Starts the process; it may still be starting (see [`Tagward::ready`]).
    pub fn spawn(&self) -> Tagward {
        let mut cmd = command(&self.argv());
        cmd.current_dir(&self.cwd).envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Tagward::spawn(cmd)
    }

    /// Starts the process and waits until it serves (see [`Tagward::ready`]);
    /// the error is the exit status and everything it wrote.
    pub async fn start(&self, limit: Duration) -> Result<Tagward, String> {
        let mut server = self.spawn();
        server.ready(limit).await?;
        Ok(server)
    }
}

/// The addresses of the `serving` log line (plain or JSON format).
pub fn serving_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("serving") {
        return None;
    }
    let field = |key: &str| -> Option<SocketAddr> {
        let plain = format!("{key}=");
        let json = format!("\"{key}\":\"");
        let (rest, end): (&str, &[char]) = if let Some(i) = line.find(&json) {
            (&line[i + json.len()..], &['"'])
        } else {
            let i = line.find(&plain)?;
            (&line[i + plain.len()..], &[' ', '\t'])
        };
        rest.split(end).next()?.parse().ok()
    };
    Some((field("data_addr")?, field("admin_addr")?))
}

/// A `tagward` child process with its stderr collected; killed if a test
/// fails before it exits.
pub struct Tagward {
    child: Child,
    stderr: Option<JoinHandle<String>>,
    serving: mpsc::Receiver<(SocketAddr, SocketAddr)>,
    addrs: Option<(SocketAddr, SocketAddr)>,
}

impl Tagward {
    /// Starts `cmd` with its stderr read line by line on a thread (the lines
    /// are kept for [`Tagward::stderr`]; the `serving` line's addresses are
    /// passed on as soon as it arrives).
    pub fn spawn(mut cmd: Command) -> Tagward {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start tagward");
        let pipe = child.stderr.take().expect("stderr is piped");
        let (tx, serving) = mpsc::channel();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            let mut reader = BufReader::new(pipe);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                if let Some(addrs) = serving_addrs(&line) {
                    let _ = tx.send(addrs);
                }
                all.push_str(&line);
                line.clear();
            }
            all
        });
        Tagward { child, stderr: Some(stderr), serving, addrs: None }
    }

    /// Waits for the `serving` log line, then for the data plane to answer
    /// health checks with SERVING. On failure the process is killed and the
    /// error holds its exit status and stderr.
    pub async fn ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let (data, _) = loop {
            match self.serving.try_recv() {
                Ok(addrs) => {
                    self.addrs = Some(addrs);
                    break addrs;
                }
                Err(mpsc::TryRecvError::Disconnected) => return Err(self.failed("exited before serving")),
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if Instant::now() >= deadline {
                return Err(self.failed(&format!("no `serving` line within {limit:?}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("exit status {status}\n{}", self.stderr()));
            }
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{data}"))
                .unwrap()
                .connect_timeout(Duration::from_millis(500));
            if let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(2), endpoint.connect()).await {
                if let Ok(Ok(SERVING)) =
                    tokio::time::timeout(Duration::from_secs(2), health_check(&mut HealthClient::new(ch), "")).await
                {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(self.failed(&format!("not SERVING on {data} within {limit:?}")));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Kills the process (if it still runs) and describes why it failed.
    fn failed(&mut self, why: &str) -> String {
        let _ = self.child.kill();
        let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
        format!("{why}; exit status {status}\n{}", self.stderr())
    }

    /// The data-plane address it serves on (after [`Tagward::ready`]).
    pub fn data(&self) -> SocketAddr {
        self.addrs.expect("the server is ready").0
    }

    /// The admin address it serves on (after [`Tagward::ready`]).
    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs.expect("the server is ready").1
    }

    pub async fn authz(&self) -> AuthorizerClient<Channel> {
        AuthorizerClient::new(channel(self.data()).await)
    }

    pub async fn tagging(&self) -> TaggingClient<Channel> {
        TaggingClient::new(channel(self.data()).await)
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(channel(self.admin_addr()).await)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Has it exited? (without waiting)
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_for_exit(&mut self.child, limit)
    }

    /// Everything the process wrote to stderr (once it has exited).
    pub fn stderr(&mut self) -> String {
        self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    }

    /// Sends a signal (`-TERM`, `-9`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().to_string();
        let ok = Command::new("kill").args([sig, &pid]).status().expect("run kill").success();
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// SIGTERM; insists on a clean exit within `limit` without a panic, and
    /// returns the stderr.
    pub fn term(&mut self, limit: Duration) -> String {
        self.signal("-TERM");
        let status = tokio::task::block_in_place(|| self.wait_for_exit(limit))
            .unwrap_or_else(|| panic!("tagward serve still running {limit:?} after SIGTERM"));
        let stderr = self.stderr();
        assert!(status.success(), "exit status {status} after SIGTERM:\n{stderr}");
        assert!(!stderr.contains("panicked"), "a panic:\n{stderr}");
        stderr
    }

    /// SIGKILL; insists that it died within `limit`, and returns the stderr.
    pub fn kill9(&mut self, limit: Duration) -> String {
        self.signal("-9");
        let status = tokio::task::block_in_place(|| self.wait_for_exit(limit)).expect("the process dies after SIGKILL");
        assert!(!status.success(), "{status}");
        self.stderr()
    }
}

impl Drop for Tagward {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
