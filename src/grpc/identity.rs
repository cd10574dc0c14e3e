//! Who may write through the Tagging API, and as which principal.
//!
//! A Tagging write (TagResource, UntagResource) is authorized as the
//! principal the request names, so the sidecar must know the caller may act
//! as it: the caller's verified identity (the transport's [`Peer`]: mTLS
//! certificate URI and DNS SANs, a Unix socket peer's uid) is looked up in
//! the identity map (`--identity-map`), which lists the principal ARNs each
//! identity may act as. Without a map, local callers (plain TCP or TLS on
//! loopback, a Unix socket) are trusted to name any principal, and any
//! other caller is refused. Reads (ListResourceTags, GetResources) and
//! Authorize are not checked here: they state the principal they ask about.
//!
//! The map file is JSON or YAML:
//!
//! ```json
//! {"identities": [
//!   {"uri": "spiffe://example.org/ns/prod/sa/key-admin", "principals": ["arn:aws:iam::111122223333:role/KeyAdmin"]},
//!   {"dns": "ops.example.org", "principals": ["arn:aws:iam::111122223333:user/ops"]},
//!   {"uid": 1000, "principals": ["arn:aws:iam::111122223333:role/App*"]}
//! ]}
//! ```
//!
//! A principal pattern is an ARN in which `*` matches any run of characters
//! and `?` one character (case-sensitive, as IAM's `ArnLike`); a bare `*`
//! and patterns that do not start with `arn:` are refused when the file is
//! read.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Deserialize;
use tagward_core::document::{self, DocumentError};
use thiserror::Error;
use tracing::{info, warn};

use super::peer::Peer;

/// How much of the Tagging service is served (`--tagging`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaggingMode {
    /// Not served at all: only Authorize (UNIMPLEMENTED for Tagging).
    Off,
    /// ListResourceTags and GetResources only; writes are UNIMPLEMENTED.
    ReadOnly,
    /// Everything, writes as a verified caller.
    #[default]
    On,
}

/// The map file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    identities: Vec<EntryFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    dns: Option<String>,
    #[serde(default)]
    uid: Option<u32>,
    principals: Vec<String>,
}

/// A verified identity the map names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A certificate URI SAN (a SPIFFE ID).
    Uri(String),
    /// A certificate DNS SAN.
    Dns(String),
    /// A Unix socket peer's uid.
    Uid(u32),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Uri(u) => write!(f, "URI SAN {u}"),
            Identity::Dns(d) => write!(f, "DNS SAN {d}"),
            Identity::Uid(u) => write!(f, "uid {u}"),
        }
    }
}

/// Verified identities and the principals each may act as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityMap {
    entries: Vec<(Identity, Vec<String>)>,
}

/// `*` any run, `?` one character.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Why an identity map was refused: where in the file, and why.
#[derive(Debug, Error)]
pub enum IdentityMapError {
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error("{path}: {reason}")]
    Entry { path: String, reason: String },
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    #[error("cannot start the thread that reloads it: {0}")]
    Thread(std::io::Error),
}

impl IdentityMapError {
    fn entry(path: impl Into<String>, reason: impl Into<String>) -> IdentityMapError {
        IdentityMapError::Entry { path: path.into(), reason: reason.into() }
    }
}

impl IdentityMap {
    /// Parses a map document (JSON, or YAML when `yaml`); the error names
    /// the path in the document and the reason.
    pub fn parse(text: &str, yaml: bool) -> Result<IdentityMap, IdentityMapError> {
        let file: MapFile = document::parse(text, yaml)?;
        let mut entries = Vec::with_capacity(file.identities.len());
        for (i, e) in file.identities.into_iter().enumerate() {
            let at = format!("identities[{i}]");
            let identity = match (e.uri, e.dns, e.uid) {
                (Some(u), None, None) if !u.is_empty() => Identity::Uri(u),
                (None, Some(d), None) if !d.is_empty() => Identity::Dns(d.to_ascii_lowercase()),
                (None, None, Some(u)) => Identity::Uid(u),
                (None, None, None) => return Err(IdentityMapError::entry(at, "one of uri, dns or uid is required")),
                (Some(_), None, None) | (None, Some(_), None) => {
                    return Err(IdentityMapError::entry(at, "the identity is empty"))
                }
                _ => return Err(IdentityMapError::entry(at, "exactly one of uri, dns or uid, not several")),
            };
            if e.principals.is_empty() {
                return Err(IdentityMapError::entry(format!("{at}.principals"), "at least one principal ARN is required"));
            }
            for (j, p) in e.principals.iter().enumerate() {
                if !p.starts_with("arn:") {
                    return Err(IdentityMapError::entry(
                        format!("{at}.principals[{j}]"),
                        format!("{p:?} is not an ARN (arn:...)"),
                    ));
                }
            }
            entries.push((identity, e.principals));
        }
        Ok(IdentityMap { entries })
    }

    /// The identities of a peer that the map could name.
    fn identities(peer: &Peer) -> Vec<Identity> {
        match peer {
            Peer::Tcp { .. } => Vec::new(),
            Peer::Tls { uris, dns, .. } => uris
                .iter()
                .map(|u| Identity::Uri(u.clone()))
                .chain(dns.iter().map(|d| Identity::Dns(d.to_ascii_lowercase())))
                .collect(),
            Peer::Unix { uid, .. } => vec![Identity::Uid(*uid)],
        }
    }

    /// May any of `peer`'s identities act as `principal`?
    pub fn allows(&self, peer: &Peer, principal: &str) -> bool {
        let mine = IdentityMap::identities(peer);
        self.entries.iter().any(|(identity, principals)| {
            mine.contains(identity) && principals.iter().any(|p| glob(p.as_bytes(), principal.as_bytes()))
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How a caller is described in refusals and audit records.
pub fn describe(peer: &Peer) -> String {
    match peer {
        Peer::Tcp { addr } => format!("plain TCP caller {addr}"),
        Peer::Tls { addr, uris, dns } => {
            let sans: Vec<String> = uris.iter().chain(dns.iter()).cloned().collect();
            if sans.is_empty() {
                format!("TLS caller {addr} (no client certificate)")
            } else {
                format!("TLS caller {} ({addr})", sans.join(", "))
            }
        }
        Peer::Unix { uid, gid } => format!("Unix socket caller uid {uid} (gid {gid})"),
    }
}

/// Why a caller may not write as a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAllowed {
    /// The caller, as [`describe`] says.
    pub caller: String,
    pub principal: String,
    pub reason: String,
}

impl std::fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "principal: the {} may not act as {}: {}", self.caller, self.principal, self.reason)
    }
}

/// The identity check of Tagging writes: the map (when given), reloaded
/// when its file changes.
pub struct Callers {
    map: Option<ArcSwap<IdentityMap>>,
}

impl Callers {
    /// No map: local callers are trusted to name any principal.
    pub fn trusting_local() -> Arc<Callers> {
        Arc::new(Callers { map: None })
    }

    /// Checks with `map`.
    pub fn with_map(map: IdentityMap) -> Arc<Callers> {
        Arc::new(Callers { map: Some(ArcSwap::from_pointee(map)) })
    }

    /// Reads the map at `path`, and watches the file (polling every
    /// `every`) for as long as the returned value lives: a changed file
    /// that reads is the new map; one that does not is logged, and the old
    /// map stays.
    pub fn watching(path: &Path, every: Duration) -> Result<Arc<Callers>, IdentityMapError> {
        // One read: the map and the version the reload loop compares with
        // come from the same text.
        let (modified, text) = stamp(path).map_err(IdentityMapError::Read)?;
        let map = IdentityMap::parse(&text, document::is_yaml(path))?;
        info!(file = %path.display(), identities = map.len(), "identity map");
        let callers = Callers::with_map(map);
        let weak = Arc::downgrade(&callers);
        let path = path.to_path_buf();
        let seen = Some((modified, text));
        std::thread::Builder::new()
            .name("tagward-identity".into())
            .spawn(move || reload_loop(&weak, &path, every, seen))
            .map_err(IdentityMapError::Thread)?;
        Ok(callers)
    }

    /// Replaces the map (what a reload does).
    pub fn replace(&self, map: IdentityMap) {
        if let Some(current) = &self.map {
            current.store(Arc::new(map));
        }
    }

    /// May the caller on `peer` (none: a caller whose connection the
    /// transport did not describe, treated as plain TCP from an unknown
    /// address) write as `principal`?
    pub fn check(&self, peer: Option<&Peer>, principal: &str) -> Result<(), NotAllowed> {
        let caller = peer.map_or_else(|| "caller of unknown address".to_string(), describe);
        let refuse =
            |reason: &str| Err(NotAllowed { caller: caller.clone(), principal: principal.to_string(), reason: reason.into() });
        match (&self.map, peer) {
            (None, Some(p @ Peer::Tcp { .. })) if p.is_loopback_tcp() => Ok(()),
            (None, Some(Peer::Tls { addr, .. })) if addr.ip().is_loopback() => Ok(()),
            (None, Some(Peer::Unix { .. })) => Ok(()),
            (None, _) => refuse(
                "without an identity map (--identity-map) only local callers (loopback, a Unix socket) may write through the Tagging API",
            ),
            (Some(map), Some(p)) => {
                if map.load().allows(p, principal) {
                    Ok(())
                } else {
                    refuse("the identity map does not map this caller's verified identity to that principal")
                }
            }
            (Some(_), None) => refuse("the identity map names verified identities, and this caller has none"),
        }
    }
}

/// What identifies a version of the file: its modification time, length
/// and text.
fn stamp(path: &Path) -> std::io::Result<(Option<SystemTime>, String)> {
    let modified = std::fs::metadata(path).ok().and_then(|m| m.modified().ok());
    std::fs::read_to_string(path).map(|text| (modified, text))
}

fn reload_loop(callers: &Weak<Callers>, path: &Path, every: Duration, mut seen: Option<(Option<SystemTime>, String)>) {
    loop {
        std::thread::sleep(every);
        let Some(callers) = callers.upgrade() else { return };
        let now = stamp(path);
        let version = now.as_ref().ok().cloned();
        if version == seen {
            continue;
        }
        // The text just read is the one parsed: no second read that could
        // see a newer file than the version remembered.
        let parsed = now.map_err(IdentityMapError::Read).and_then(|(_, text)| IdentityMap::parse(&text, document::is_yaml(path)));
        match parsed {
            Ok(map) => {
                info!(file = %path.display(), identities = map.len(), "identity map reloaded");
                callers.replace(map);
            }
            Err(e) => warn!(file = %path.display(), error = %e, "identity map not reloaded; the previous one stays"),
        }
        seen = version;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#"{"identities": [
        {"uri": "spiffe://example.org/ns/prod/sa/key-admin", "principals": ["arn:aws:iam::111122223333:role/KeyAdmin"]},
        {"dns": "Ops.Example.org", "principals": ["arn:aws:iam::111122223333:user/ops"]},
        {"uid": 1000, "principals": ["arn:aws:iam::111122223333:role/App*"]}
    ]}"#;

    fn tls(uris: &[&str], dns: &[&str]) -> Peer {
        Peer::Tls {
            addr: "10.0.0.7:5000".parse().unwrap(),
            uris: uris.iter().map(|s| s.to_string()).collect(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn globs() {
        assert!(glob(b"arn:aws:iam::1:role/App*", b"arn:aws:iam::1:role/AppAlpha"));
        assert!(glob(b"arn:aws:iam::1:role/App*", b"arn:aws:iam::1:role/App"));
        assert!(!glob(b"arn:aws:iam::1:role/App*", b"arn:aws:iam::1:role/KeyAdmin"));
        assert!(glob(b"arn:aws:iam::?:role/*a*", b"arn:aws:iam::1:role/xay"));
        assert!(!glob(b"arn:aws:iam::1:role/App", b"arn:aws:iam::1:role/AppX"));
    }

    #[test]
    fn a_mapped_identity_acts_as_its_principals_only() {
        let map = IdentityMap::parse(MAP, false).unwrap();
        let admin = tls(&["spiffe://example.org/ns/prod/sa/key-admin"], &[]);
        assert!(map.allows(&admin, "arn:aws:iam::111122223333:role/KeyAdmin"));
        assert!(!map.allows(&admin, "arn:aws:iam::111122223333:root"));
        assert!(map.allows(&tls(&[], &["ops.example.ORG"]), "arn:aws:iam::111122223333:user/ops"), "DNS names fold case");
        let app = Peer::Unix { uid: 1000, gid: 1000 };
        assert!(map.allows(&app, "arn:aws:iam::111122223333:role/AppAlpha"));
        assert!(!map.allows(&app, "arn:aws:iam::111122223333:role/KeyAdmin"));
        assert!(!map.allows(&Peer::Unix { uid: 1001, gid: 1000 }, "arn:aws:iam::111122223333:role/AppAlpha"));
        assert!(!map.allows(&Peer::Tcp { addr: "127.0.0.1:1".parse().unwrap() }, "arn:aws:iam::111122223333:role/AppAlpha"));
    }

    #[test]
    fn without_a_map_only_local_callers_write() {
        let c = Callers::trusting_local();
        let root = "arn:aws:iam::111122223333:root";
        assert!(c.check(Some(&Peer::Tcp { addr: "127.0.0.1:9".parse().unwrap() }), root).is_ok());
        assert!(c.check(Some(&Peer::Tcp { addr: "[::1]:9".parse().unwrap() }), root).is_ok());
        assert!(c.check(Some(&Peer::Unix { uid: 5, gid: 5 }), root).is_ok());
        let far = c.check(Some(&Peer::Tcp { addr: "10.1.2.3:9".parse().unwrap() }), root).unwrap_err();
        assert_eq!(
            far.to_string(),
            "principal: the plain TCP caller 10.1.2.3:9 may not act as arn:aws:iam::111122223333:root: without an identity map (--identity-map) only local callers (loopback, a Unix socket) may write through the Tagging API"
        );
        assert!(c.check(None, root).is_err(), "no peer is an unknown address");
        assert!(c.check(Some(&tls(&["spiffe://x"], &[])), root).is_err());
    }

    #[test]
    fn with_a_map_loopback_is_not_enough() {
        let c = Callers::with_map(IdentityMap::parse(MAP, false).unwrap());
        let e = c.check(Some(&Peer::Tcp { addr: "127.0.0.1:9".parse().unwrap() }), "arn:aws:iam::111122223333:root").unwrap_err();
        assert!(e.to_string().contains("plain TCP caller 127.0.0.1:9 may not act as arn:aws:iam::111122223333:root"), "{e}");
        assert!(c.check(Some(&Peer::Unix { uid: 1000, gid: 0 }), "arn:aws:iam::111122223333:role/AppBeta").is_ok());
        c.replace(IdentityMap::default());
        assert!(c.check(Some(&Peer::Unix { uid: 1000, gid: 0 }), "arn:aws:iam::111122223333:role/AppBeta").is_err());
    }

    #[test]
    fn bad_maps_name_the_field() {
        let bad = |text: &str| IdentityMap::parse(text, false).unwrap_err().to_string();
        assert_eq!(bad(r#"{"identities": [{"principals": ["arn:x"]}]}"#), "identities[0]: one of uri, dns or uid is required");
        assert_eq!(
            bad(r#"{"identities": [{"uid": 1, "uri": "spiffe://a", "principals": ["arn:x"]}]}"#),
            "identities[0]: exactly one of uri, dns or uid, not several"
        );
        assert_eq!(
            bad(r#"{"identities": [{"uid": 1, "principals": []}]}"#),
            "identities[0].principals: at least one principal ARN is required"
        );
        assert_eq!(
            bad(r#"{"identities": [{"uid": 1, "principals": ["*"]}]}"#),
            "identities[0].principals[0]: \"*\" is not an ARN (arn:...)"
        );
        assert!(bad(r#"{"identities": [{"uid": 1, "principal": ["arn:x"]}]}"#).contains("unknown field"));
        let yaml = "identities:\n  - uid: 7\n    principals: [\"arn:aws:iam::1:role/A\"]\n";
        assert_eq!(IdentityMap::parse(yaml, true).unwrap().len(), 1);
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_bad_one_keeps_the_old_map() {
        let dir = std::env::temp_dir().join(format!("tagward-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("map.json");
        let arn = "arn:aws:iam::111122223333:role/AppAlpha";
        let unix = |uid| Peer::Unix { uid, gid: 0 };
        std::fs::write(&path, r#"{"identities": [{"uid": 1, "principals": ["arn:aws:iam::111122223333:role/App*"]}]}"#).unwrap();
        let c = Callers::watching(&path, Duration::from_millis(10)).unwrap();
        assert!(c.check(Some(&unix(1)), arn).is_ok());
        let wait = |ok: &dyn Fn() -> bool| {
            for _ in 0..300 {
                if ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        };
        std::fs::write(&path, r#"{"identities": [{"uid": 2, "principals": ["arn:aws:iam::111122223333:role/App*"]}]}"#).unwrap();
        assert!(wait(&|| c.check(Some(&unix(2)), arn).is_ok()), "the new map is used");
        assert!(c.check(Some(&unix(1)), arn).is_err());
        std::fs::write(&path, "{not json").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(c.check(Some(&unix(2)), arn).is_ok(), "a map that does not read keeps the old one");
    }
}
