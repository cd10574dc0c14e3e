//! The offline and client commands behind `tagward export`, `import`,
//! `test` and `authorize`: what they do, with the exit code of a failure
//! carried by [`Failure`]. The `tagward` binary only parses the command line,
//! calls these, and prints a failure in one place.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::audit::AuditLog;
use crate::grpc::convert::reason_wire_name;
use crate::grpc::dial::{ClientTls, Target};
use crate::grpc::error_name;
use crate::grpc::proto::authorizer_client::AuthorizerClient;
use crate::grpc::proto::{self, Decision};
use crate::scenario::{self, Backend};
use crate::store::{Durability, Store};
use crate::world::WorldSpec;
use tagward_core::document;

/// What kind of failure, which decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Bad input or an unusable file, address or runtime: exit code 2.
    Input,
    /// Something failed that the input did not cause: exit code 1.
    Internal,
}

/// A command that could not do its work: the message, optionally the file
/// and the underlying error (which `serve` logs as fields of the line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    pub file: Option<PathBuf>,
    pub error: Option<String>,
}

impl Failure {
    /// Bad input or an unusable file (exit code 2).
    pub fn input(message: impl Into<String>) -> Failure {
        Failure { kind: FailureKind::Input, message: message.into(), file: None, error: None }
    }

    /// A failure the input did not cause (exit code 1).
    pub fn internal(message: impl Into<String>) -> Failure {
        Failure { kind: FailureKind::Internal, message: message.into(), file: None, error: None }
    }

    /// The file the failure is about.
    pub fn file(mut self, path: &Path) -> Failure {
        self.file = Some(path.to_path_buf());
        self
    }

    /// The underlying error.
    pub fn error(mut self, error: impl fmt::Display) -> Failure {
        self.error = Some(error.to_string());
        self
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            FailureKind::Input => 2,
            FailureKind::Internal => 1,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        f.write_str(&self.message)?;
        if let Some(error) = &self.error {
            write!(f, ": {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// Reads a world file (JSON, or YAML by extension); the error names the
/// file, the JSON path and the reason.
pub fn load_world(path: &Path) -> Result<WorldSpec, Failure> {
    document::read(path).map_err(|e| Failure::input(format!("{}: {e}", path.display())))
}

/// The store options of the offline commands: never compact, keep no events.
fn offline_options() -> Durability {
    Durability { compact_after_bytes: u64::MAX, event_capacity: 1 }
}

/// `tagward export`: writes the whole state of `dir` as a world file to
/// `output` (standard output when none).
pub fn export(dir: &Path, output: Option<&Path>) -> Result<(), Failure> {
    if !dir.is_dir() {
        return Err(Failure::input(format!("{}: no such data directory", dir.display())));
    }
    let (store, _) = Store::open_dir(dir, None, false, &offline_options(), None)
        .map_err(|e| Failure::input(format!("cannot open the data directory: {e}")))?;
    let state = store.snapshot();
    let text = serde_json::to_string_pretty(&WorldSpec::from_state(&state))
        .map_err(|e| Failure::internal(format!("cannot encode the state: {e}")))?
        + "\n";
    match output {
        Some(path) => std::fs::write(path, text).map_err(|e| Failure::internal(format!("{}: {e}", path.display())))?,
        None => {
            std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()).map_err(|e| Failure::internal(e.to_string()))?
        }
    }
    eprintln!("exported revision {} of {}", state.revision(), dir.display());
    Ok(())
}

/// `tagward import`: replaces the state of `dir` with the world file (as one
/// audited change; the revision keeps growing).
pub fn import(dir: &Path, world: &Path) -> Result<(), Failure> {
    let seed = load_world(world)?;
    seed.build().map_err(|e| Failure::input(format!("{}: {e}", world.display())))?;
    // The replacement is audited in the directory's default audit file, the
    // one `serve` writes by default.
    let audit_path = dir.join("audit.jsonl");
    let audit = AuditLog::open(&audit_path)
        .map_err(|e| Failure::input(format!("{}: cannot open the audit log: {e}", audit_path.display())))?;
    let (store, _) = Store::open_dir(dir, Some(&seed), true, &offline_options(), Some(audit))
        .map_err(|e| Failure::input(format!("cannot import: {e}")))?;
    eprintln!("imported {} into {} at revision {}", world.display(), dir.display(), store.revision());
    Ok(())
}

/// What `tagward test` found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestSummary {
    pub passed: usize,
    pub failed: usize,
    /// A file could not be found or loaded.
    pub load_failed: bool,
}

/// `tagward test`: runs every scenario file under `paths` against `backend`,
/// printing each failing step (standard output), each file that does not
/// load (standard error) and the totals.
pub fn run_tests(paths: &[PathBuf], backend: &mut dyn Backend) -> TestSummary {
    let mut summary = TestSummary::default();
    let files = scenario::collect(paths).unwrap_or_else(|e| {
        eprintln!("{e}");
        summary.load_failed = true;
        Vec::new()
    });
    for file in &files {
        match scenario::load(file) {
            Ok(s) => {
                let report = scenario::run(&s, backend);
                summary.passed += report.passed;
                summary.failed += report.failures.len();
                for line in &report.failures {
                    println!("{line}");
                }
            }
            Err(e) => {
                eprintln!("{e}");
                summary.load_failed = true;
            }
        }
    }
    println!("{} passed, {} failed", summary.passed, summary.failed);
    summary
}

/// `tagward authorize`: one question for a running sidecar.
#[derive(Debug, Clone)]
pub struct Question {
    /// The data-plane address (`HOST:PORT`, `http://`, `https://` or
    /// `unix:///PATH`).
    pub server: String,
    /// The client's TLS settings (any of them asks for TLS).
    pub tls: ClientTls,
    pub request: proto::AuthorizeRequest,
    /// Print the answer as one JSON object.
    pub json: bool,
}

/// Asks the question, prints the answer, and says whether it was Allow.
pub fn authorize(question: Question) -> Result<bool, Failure> {
    let Question { server, tls, request, json } = question;
    let target = Target::new(&server, &tls).map_err(Failure::input)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::input(format!("cannot start a runtime: {e}")))?;
    let r = runtime
        .block_on(async {
            let mut client = AuthorizerClient::new(target.connect().await?);
            client.authorize(request).await.map(|r| r.into_inner()).map_err(|s| {
                let name = error_name(&s).map(|n| format!(" {n}")).unwrap_or_default();
                format!("{:?}{name}: {}", s.code(), s.message())
            })
        })
        .map_err(Failure::input)?;
    let allowed = r.decision == Decision::Allow as i32;
    print_answer(&r, allowed, json);
    Ok(allowed)
}

fn print_answer(r: &proto::AuthorizeResponse, allowed: bool, json: bool) {
    let decision = if allowed { "Allow" } else { "Deny" };
    let reason = reason_wire_name(r.reason);
    let statement =
        |s: &proto::StatementRef| serde_json::json!({"policy": s.policy, "index": s.index, "sid": s.sid, "effect": s.effect});
    if json {
        let out = serde_json::json!({
            "decision": decision,
            "reason": reason,
            "revision": r.revision,
            "matched": r.matched.iter().map(statement).collect::<Vec<_>>(),
            "missing_keys": r.missing_keys,
            "considered": r.considered.iter().map(|c| serde_json::json!({
                "statement": c.statement.as_ref().map(statement),
                "outcome": c.outcome,
            })).collect::<Vec<_>>(),
        });
        println!("{out}");
        return;
    }
    println!("{decision} ({reason}) at revision {}", r.revision);
    for s in &r.matched {
        println!("  decided by {}[{}] {:?} ({})", s.policy, s.index, s.sid, s.effect);
    }
    if !r.missing_keys.is_empty() {
        println!("  missing condition keys: {}", r.missing_keys.join(", "));
    }
    for c in &r.considered {
        if let Some(s) = &c.statement {
            println!("  considered {}[{}] {:?}: {}", s.policy, s.index, s.sid, c.outcome);
        }
    }
}
