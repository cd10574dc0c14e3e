//! Who may call the admin API, and as whom: named bearer tokens, each with a
//! role, from `--admin-token` (one writer named `admin`) or
//! `--admin-token-file` (re-read when it changes, no restart needed).
//!
//! The token file holds one `name: token` line per caller; `name (reader):
//! token` gives a read-only caller (Export and Watch), `name (writer): token`
//! spells out the default. Blank lines and lines starting with `#` are
//! skipped; a file of one bare token (no `:`) is the writer `admin`. A file
//! that does not parse (at start: the server does not start;
//! later: the previous tokens stay) is reported by line number and reason,
//! never with its text, since the text is secrets.
//!
//! The interceptor puts the authenticated [`AdminCaller`] into the request's
//! extensions; handlers take the actor of a change from it and check the
//! role with [`AdminCaller::require_writer`].

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use thiserror::Error;
use tonic::{Request, Status};
use tracing::{info, warn};

/// What an admin caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Export and Watch only.
    Reader,
    /// Everything, Apply included.
    Writer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated admin caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCaller {
    /// The token's name: the actor of the changes it makes.
    pub name: Arc<str>,
    pub role: Role,
}

/// The name of the single `--admin-token`, and of every caller when no token
/// is configured (loopback only).
pub const DEFAULT_NAME: &str = "admin";

impl AdminCaller {
    /// The caller of `request`, as the interceptor authenticated it; a
    /// request that did not pass the interceptor is nobody.
    pub fn of<T>(request: &Request<T>) -> Result<AdminCaller, Status> {
        request
            .extensions()
            .get::<AdminCaller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("authorization: this request was not authenticated by the admin interceptor"))
    }

    /// Refuses a caller without the writer role, naming the role.
    pub fn require_writer(&self, method: &str) -> Result<(), Status> {
        match self.role {
            Role::Writer => Ok(()),
            Role::Reader => Err(Status::permission_denied(format!(
                "authorization: {method} needs the writer role; the token {:?} has the {} role (Export and Watch only)",
                self.name, self.role
            ))),
        }
    }
}

/// One configured token. Its `Debug` never shows the secret.
#[derive(Clone)]
struct Entry {
    name: Arc<str>,
    role: Role,
    token: Box<[u8]>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry").field("name", &self.name).field("role", &self.role).field("token", &"<redacted>").finish()
    }
}

/// Why a token file (or token) was refused; never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokensError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("names no token (every line is blank or a comment)")]
    Empty,
    #[error("the admin token is empty")]
    EmptyToken,
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: String },
}

/// Parses a token file: `name: token` or `name (reader|writer): token` lines.
/// A file whose one line is a bare token (no `:`, the format before names)
/// is the writer `admin`, so that a mounted Secret holding only a token keeps
/// working.
fn parse(text: &str) -> Result<Vec<Entry>, TokensError> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    if let (Some(only), None) = (lines.next(), lines.next()) {
        if !only.contains(':') && !only.chars().any(char::is_whitespace) {
            return Ok(vec![Entry { name: Arc::from(DEFAULT_NAME), role: Role::Writer, token: only.as_bytes().into() }]);
        }
    }
    let mut entries: Vec<Entry> = Vec::new();
    let mut names: HashSet<Arc<str>> = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let bad = |reason: String| TokensError::Line { line, reason };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let Some((head, token)) = trimmed.split_once(':') else {
            return Err(bad("expected `name: token` or `name (reader): token`".into()));
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(bad("the token is empty".into()));
        }
        if token.chars().any(char::is_whitespace) {
            return Err(bad("the token has white space inside it".into()));
        }
        let head = head.trim();
        let (name, role) = match head.split_once('(') {
            None => (head, Role::Writer),
            Some((name, rest)) => {
                let role = match rest.trim().strip_suffix(')').map(str::trim) {
                    Some(r) if r.eq_ignore_ascii_case("reader") => Role::Reader,
                    Some(r) if r.eq_ignore_ascii_case("writer") => Role::Writer,
                    _ => return Err(bad("the role is `(reader)` or `(writer)`, before the `:`".into())),
                };
                (name.trim(), role)
            }
        };
        if name.is_empty() {
            return Err(bad("the name before the `:` is empty".into()));
        }
        if name.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '(' | ')')) {
            return Err(bad(format!("the name {name:?} has white space or parentheses")));
        }
        let name: Arc<str> = Arc::from(name);
        if !names.insert(name.clone()) {
            return Err(bad(format!("the name {name:?} is given twice")));
        }
        if entries.iter().any(|e| ct_eq(&e.token, token.as_bytes())) {
            return Err(bad(format!("the token of {name:?} is another name's token too; every name needs its own")));
        }
        entries.push(Entry { name, role, token: token.as_bytes().into() });
    }
    if entries.is_empty() {
        return Err(TokensError::Empty);
    }
    Ok(entries)
}

/// Constant-time equality: the time depends on the lengths only, never on
/// where the bytes differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..n {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

struct Inner {
    /// `None`: no token configured (loopback only): every caller is `admin`.
    tokens: Option<RwLock<Arc<Vec<Entry>>>>,
    file: Option<PathBuf>,
}

/// The admin plane's authentication, shared by the interceptor and the
/// file watcher.
#[derive(Clone)]
pub struct AdminAuth(Arc<Inner>);

impl fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminAuth").field("names", &self.names()).field("file", &self.0.file).finish()
    }
}

impl AdminAuth {
    /// No token: every caller is the writer `admin` (loopback only).
    pub fn open() -> AdminAuth {
        AdminAuth(Arc::new(Inner { tokens: None, file: None }))
    }

    /// One writer token named `admin` (`--admin-token`).
    pub fn token(token: &str) -> Result<AdminAuth, TokensError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokensError::EmptyToken);
        }
        let entry = Entry { name: Arc::from(DEFAULT_NAME), role: Role::Writer, token: token.as_bytes().into() };
        Ok(AdminAuth(Arc::new(Inner { tokens: Some(RwLock::new(Arc::new(vec![entry]))), file: None })))
    }

    /// The tokens of a token file (`--admin-token-file`); [`AdminAuth::watch`]
    /// re-reads it.
    pub fn file(path: &Path) -> Result<AdminAuth, TokensError> {
        let entries = parse(&read(path)?)?;
        Ok(AdminAuth(Arc::new(Inner { tokens: Some(RwLock::new(Arc::new(entries))), file: Some(path.to_path_buf()) })))
    }

    /// Whether a token is needed (false: every caller is `admin`).
    pub fn required(&self) -> bool {
        self.0.tokens.is_some()
    }

    /// The configured names and roles (for logs: never the tokens).
    pub fn names(&self) -> Vec<(Arc<str>, Role)> {
        self.current().map(|t| t.iter().map(|e| (e.name.clone(), e.role)).collect()).unwrap_or_default()
    }

    fn current(&self) -> Option<Arc<Vec<Entry>>> {
        let lock = self.0.tokens.as_ref()?;
        Some(match lock.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
    }

    /// Re-reads the token file every `every` while this `AdminAuth` (or a
    /// clone) lives; a change that parses replaces the tokens, one that does
    /// not is logged (line and reason) and the previous tokens stay. Needs a
    /// Tokio runtime; does nothing without a file.
    pub fn watch(&self, every: Duration) {
        let Some(path) = self.0.file.clone() else { return };
        let weak: Weak<Inner> = Arc::downgrade(&self.0);
        let mut last = read(&path).ok();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let text = match read(&path) {
                    Ok(text) => text,
                    Err(e) => {
                        // A Secret being swapped, say: keep what works.
                        if last.take().is_some() {
                            warn!(error = %e, "the admin token file cannot be read; keeping the previous tokens");
                        }
                        continue;
                    }
                };
                if last.as_deref() == Some(text.as_str()) {
                    continue;
                }
                match parse(&text) {
                    Ok(entries) => {
                        let names: Vec<String> = entries.iter().map(|e| format!("{} ({})", e.name, e.role)).collect();
                        if let Some(lock) = &inner.tokens {
                            let mut guard = match lock.write() {
                                Ok(g) => g,
                                Err(poisoned) => poisoned.into_inner(),
                            };
                            *guard = Arc::new(entries);
                        }
                        info!(file = %path.display(), names = %names.join(", "), "admin tokens reloaded");
                    }
                    Err(e) => warn!(
                        file = %path.display(),
                        error = %e,
                        "the admin token file does not parse; keeping the previous tokens"
                    ),
                }
                last = Some(text);
            }
        });
    }

    /// Who presents `authorization` (the header's value), if anyone.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<AdminCaller, Status> {
        let Some(tokens) = self.current() else {
            return Ok(AdminCaller { name: Arc::from(DEFAULT_NAME), role: Role::Writer });
        };
        let Some(value) = authorization else {
            return Err(Status::unauthenticated(
                "authorization: missing; the admin API needs `authorization: Bearer <token>` with a configured admin token",
            ));
        };
        let value = value.trim();
        let given = match value.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err(Status::unauthenticated("authorization: not a bearer token; expected `Bearer <token>`")),
        };
        // Every entry is compared, so that the time does not tell which one
        // (or whether an early one) matched.
        let mut found: Option<&Entry> = None;
        for e in tokens.iter() {
            if ct_eq(&e.token, given.as_bytes()) {
                found = Some(e);
            }
        }
        match found {
            Some(e) => Ok(AdminCaller { name: e.name.clone(), role: e.role }),
            None => Err(Status::unauthenticated("authorization: the bearer token is not one of the configured admin tokens")),
        }
    }

    /// The interceptor for the admin service: authenticates, and puts the
    /// [`AdminCaller`] into the request's extensions.
    pub fn interceptor(&self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        let auth = self.clone();
        move |mut req: Request<()>| {
            let header = req.metadata().get("authorization").map(|v| v.to_str().unwrap_or_default());
            let caller = auth.authenticate(header)?;
            req.extensions_mut().insert(caller);
            Ok(req)
        }
    }
}

fn read(path: &Path) -> Result<String, TokensError> {
    std::fs::read_to_string(path).map_err(|e| TokensError::Read { path: path.display().to_string(), error: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_names_its_callers_and_their_roles() {
        let entries = parse("# ops\n\nci: s3cret\n  dash (reader) : r34d:er\nops (Writer): w\n").unwrap();
        let got: Vec<(&str, Role, &[u8])> = entries.iter().map(|e| (&*e.name, e.role, &*e.token)).collect();
        assert_eq!(
            got,
            vec![("ci", Role::Writer, &b"s3cret"[..]), ("dash", Role::Reader, b"r34d:er"), ("ops", Role::Writer, b"w")]
        );
    }

    #[test]
    fn a_bad_file_is_refused_by_line_without_its_secrets() {
        for (text, line, why) in [
            ("a: x\njust-a-token\n", 2, "expected `name: token`"),
            ("a: x\nb:\n", 2, "empty"),
            ("a: x\na: y\n", 2, "twice"),
            ("a: x\nb: x\n", 2, "own"),
            ("a (admin): x\n", 1, "role"),
            ("a b: x\n", 1, "white space"),
            ("a: x y\n", 1, "white space"),
        ] {
            let e = parse(text).unwrap_err();
            let TokensError::Line { line: l, reason } = &e else { panic!("{text:?}: {e}") };
            assert_eq!(*l, line, "{text:?}");
            assert!(reason.contains(why), "{text:?}: {reason}");
            assert!(!e.to_string().contains("just-a-token") && !e.to_string().contains(": x"), "{e}");
        }
        assert_eq!(parse("# nothing\n\n").unwrap_err(), TokensError::Empty);
        // The format before names: one bare token is the writer `admin`.
        let old = parse("# a Secret\n0123abcd\n").unwrap();
        assert_eq!((&*old[0].name, old[0].role, &*old[0].token), ("admin", Role::Writer, &b"0123abcd"[..]));
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_picks_the_name() {
        let auth = AdminAuth(Arc::new(Inner {
            tokens: Some(RwLock::new(Arc::new(parse("ci: one\nview (reader): two\n").unwrap()))),
            file: None,
        }));
        for header in ["Bearer one", "bearer one", "BEARER   one "] {
            let c = auth.authenticate(Some(header)).unwrap();
            assert_eq!((&*c.name, c.role), ("ci", Role::Writer), "{header}");
        }
        let reader = auth.authenticate(Some("bearer two")).unwrap();
        assert_eq!(reader.role, Role::Reader);
        let denied = reader.require_writer("Admin.Apply").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("reader") && denied.message().contains("view"), "{}", denied.message());
        for header in [None, Some("Basic one"), Some("Bearer"), Some("Bearer onex"), Some("Bearer on")] {
            assert_eq!(auth.authenticate(header).unwrap_err().code(), tonic::Code::Unauthenticated, "{header:?}");
        }
        let open = AdminAuth::open().authenticate(None).unwrap();
        assert_eq!((&*open.name, open.role), ("admin", Role::Writer));
        assert!(AdminAuth::token("  ").is_err());
    }

    #[test]
    fn equality_takes_the_lengths_into_account() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abc\0"));
        assert!(!ct_eq(b"", b"a"));
    }
}
