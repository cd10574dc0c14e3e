//! The decision cache: answers a request that this sidecar already decided
//! against the same snapshot without deciding it again.
//!
//! A decision is a function of the state and the request, except where a
//! condition read the time (`aws:CurrentTime`, `aws:EpochTime`); the engine
//! says when it did ([`authorize_noting_clock`]), and such decisions are
//! never kept. Every entry carries the revision of the snapshot it was
//! decided against and is used only by a request decided against that same
//! revision: a change publishes a new revision, so the very next decision
//! after it is made afresh, as without the cache. Nothing is served from an
//! older state, and there is nothing to invalidate.
//!
//! The key is the whole request, byte for byte (principal, action,
//! resource, request tags, tag keys, session tags and context, each with its
//! length), compared in full on every hit: two requests share an answer only
//! when they are the same request. An `Authorize` or `BatchAuthorize`
//! message is known by its encoded bytes instead ([`message_key`]), and its
//! answer is kept encoded, for `grpc::repeat` to send before the call is
//! decoded; the kinds of key start with different bytes and never meet. A
//! request whose key would be longer than [`MAX_KEY_BYTES`] and every
//! `explain` request are decided without the cache. The cache holds at
//! most its byte budget (`--decision-cache-bytes`; 0 turns it off) and
//! evicts with S3-FIFO (`quick_cache`), which keeps a scan of one-off
//! requests from pushing out the ones that repeat.
//!
//! Why it exists: in a server the decision runs between the transport's
//! work, which has pushed the state out of the CPU's caches; deciding a
//! request then costs several times its tight-loop figure (BENCHMARKS.md,
//! "What a decision costs inside the server, and the decision cache"),
//! while a hit reads a few cache lines.

use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::Weighter;
use smallvec::SmallVec;

use super::proto;
use crate::engine::{ContextValue, Decision, Reason, Request};

/// The longest key kept: a request with more in it (a large context, many
/// tags) is decided every time.
pub const MAX_KEY_BYTES: usize = 2048;

/// A request's key; most fit on the stack, so a hit allocates nothing for
/// it.
pub type Key = SmallVec<[u8; 512]>;

/// The default budget, in bytes (about 40,000 typical entries).
pub const DEFAULT_BYTES: u64 = 16 * 1024 * 1024;

/// What a hit gives back.
#[derive(Debug)]
pub struct Cached {
    pub revision: u64,
    pub reply: Reply,
    /// What the entry is charged against the budget, its key excluded.
    bytes: u64,
}

/// A remembered answer.
#[derive(Debug)]
pub enum Reply {
    /// To a request known by its fields ([`key`]): the decision (for the
    /// metrics and the decision log) and the response built from it.
    Message { decision: Decision, response: proto::AuthorizeResponse },
    /// To a call known by its message's bytes ([`message_key`]), answered
    /// before it is decoded (`grpc::repeat`): the reason of each decision
    /// in it (for the metrics) and the response's gRPC frame.
    Encoded { reasons: Box<[Reason]>, frame: bytes::Bytes },
}

/// The call a message was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Authorize,
    BatchAuthorize,
}

/// The first byte of a key made by [`key`]; a [`message_key`] starts with
/// its call's.
const BY_FIELDS: u8 = 0;

impl Call {
    fn key_byte(self) -> u8 {
        match self {
            Call::Authorize => 1,
            Call::BatchAuthorize => 2,
        }
    }
}

#[derive(Clone)]
struct Charge;

impl Weighter<Box<[u8]>, Arc<Cached>> for Charge {
    fn weight(&self, key: &Box<[u8]>, value: &Arc<Cached>) -> u64 {
        key.len() as u64 + value.bytes
    }
}

/// Remembered decisions, shared by every call of one server.
pub struct DecisionCache {
    entries: Cache<Box<[u8]>, Arc<Cached>, Charge>,
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache").field("entries", &self.entries.len()).field("bytes", &self.entries.weight()).finish()
    }
}

impl DecisionCache {
    /// A cache of at most `bytes`; none for 0.
    pub fn new(bytes: u64) -> Option<DecisionCache> {
        (bytes > 0).then(|| {
            let items = usize::try_from(bytes / 400).unwrap_or(usize::MAX).max(16);
            DecisionCache { entries: Cache::with_weighter(items, bytes, Charge) }
        })
    }

    /// The remembered answer to this request (its [`key`]) against the
    /// snapshot at `revision`, if there is one.
    pub fn get(&self, key: &[u8], revision: u64) -> Option<Arc<Cached>> {
        self.entries.get(key).filter(|c| c.revision == revision)
    }

    /// Remembers the answer to the request whose key is `key`, decided
    /// against the snapshot at `revision`, replacing an older one.
    pub fn put(&self, key: &[u8], revision: u64, reply: Reply) -> Arc<Cached> {
        let reply_bytes = match &reply {
            Reply::Message { decision, response } => {
                response.matched.iter().map(|s| 48 + s.policy.len() + s.sid.len()).sum::<usize>()
                    + response.missing_keys.iter().map(|k| 24 + k.len()).sum::<usize>()
                    + decision.matched.len() * 48
                    + decision.missing_keys.len() * 16
            }
            Reply::Encoded { reasons, frame } => 32 + reasons.len() + frame.len(),
        };
        let cached = Arc::new(Cached { revision, reply, bytes: 160 + reply_bytes as u64 });
        self.entries.insert(Box::from(key), cached.clone());
        cached
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// An encoded message as a key: its call, then its bytes, as they came. The
/// same bytes are the same request, so they have the same answer; the
/// same request encoded otherwise (fields in another order) is another
/// key, and is decided once more. None when the key would be longer than
/// [`MAX_KEY_BYTES`].
pub fn message_key(call: Call, message: &[u8]) -> Option<Key> {
    if 1 + message.len() > MAX_KEY_BYTES {
        return None;
    }
    let mut out = Key::with_capacity(1 + message.len());
    out.push(call.key_byte());
    out.extend_from_slice(message);
    Some(out)
}

/// The request as a key: every field, each string with its length before
/// it, each list with its count, so that no two different requests give
/// the same bytes (nor the bytes of a [`message_key`]). None when the key
/// would be longer than [`MAX_KEY_BYTES`] (counted before anything is
/// copied).
pub fn key(req: &Request) -> Option<Key> {
    let text = |s: &String| 4 + s.len();
    let pairs = |v: &[(String, String)]| 4 + v.iter().map(|(k, v)| text(k) + text(v)).sum::<usize>();
    let len = 1
        + text(&req.principal)
        + text(&req.action)
        + text(&req.resource)
        + pairs(&req.request_tags)
        + 1
        + req.tag_keys.as_ref().map_or(0, |k| 4 + k.iter().map(text).sum::<usize>())
        + pairs(&req.session_tags)
        + 4
        + req
            .context
            .iter()
            .map(|(k, v)| {
                text(k)
                    + 1
                    + match v {
                        ContextValue::One(s) => text(s),
                        ContextValue::Many(vs) => 4 + vs.iter().map(text).sum::<usize>(),
                    }
            })
            .sum::<usize>();
    if len > MAX_KEY_BYTES {
        return None;
    }
    let mut out = Key::with_capacity(len);
    let count = |out: &mut Key, n: usize| out.extend_from_slice(&(n as u32).to_le_bytes());
    let put = |out: &mut Key, s: &str| {
        count(out, s.len());
        out.extend_from_slice(s.as_bytes());
    };
    let put_pairs = |out: &mut Key, v: &[(String, String)]| {
        count(out, v.len());
        for (k, v) in v {
            put(out, k);
            put(out, v);
        }
    };
    out.push(BY_FIELDS);
    put(&mut out, &req.principal);
    put(&mut out, &req.action);
    put(&mut out, &req.resource);
    put_pairs(&mut out, &req.request_tags);
    match &req.tag_keys {
        None => out.push(0),
        Some(keys) => {
            out.push(1);
            count(&mut out, keys.len());
            for k in keys {
                put(&mut out, k);
            }
        }
    }
    put_pairs(&mut out, &req.session_tags);
    count(&mut out, req.context.len());
    for (k, v) in &req.context {
        put(&mut out, k);
        match v {
            ContextValue::One(s) => {
                out.push(0);
                put(&mut out, s);
            }
            ContextValue::Many(vs) => {
                out.push(1);
                count(&mut out, vs.len());
                for s in vs {
                    put(&mut out, s);
                }
            }
        }
    }
    debug_assert_eq!(out.len(), len);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            principal: "arn:aws:iam::111122223333:role/app".into(),
            action: "kms:Decrypt".into(),
            resource: "arn:aws:kms:us-east-1:111122223333:key/k1".into(),
            ..Request::default()
        }
    }

    fn reply(reason: Reason) -> Reply {
        let decision = Decision { reason, matched: Vec::new(), missing_keys: Vec::new(), considered: None };
        Reply::Message { decision, response: proto::AuthorizeResponse::default() }
    }

    fn reason(c: Arc<Cached>) -> Option<Reason> {
        match &c.reply {
            Reply::Message { decision, .. } => Some(decision.reason),
            Reply::Encoded { .. } => None,
        }
    }

    #[test]
    fn different_requests_have_different_keys() {
        let base = request();
        let variants = [
            Request { principal: "arn:aws:iam::111122223333:role/ap".into(), ..base.clone() },
            Request { action: "kms:Encrypt".into(), ..base.clone() },
            Request { request_tags: vec![("a".into(), "b".into())], ..base.clone() },
            Request { request_tags: vec![("ab".into(), String::new())], ..base.clone() },
            Request { tag_keys: Some(Vec::new()), ..base.clone() },
            Request { tag_keys: Some(vec!["a".into()]), ..base.clone() },
            Request { session_tags: vec![("a".into(), "b".into())], ..base.clone() },
            Request { context: vec![("aws:SourceIp".into(), ContextValue::One("10.0.0.1".into()))], ..base.clone() },
            Request { context: vec![("aws:SourceIp".into(), ContextValue::Many(vec!["10.0.0.1".into()]))], ..base.clone() },
        ];
        let mut keys = vec![key(&base)];
        keys.extend(variants.iter().map(key));
        for (i, a) in keys.iter().enumerate() {
            assert!(a.is_some());
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(key(&base), key(&request()), "the same request gives the same key");
    }

    #[test]
    fn a_message_key_is_never_a_request_key() {
        let fields = key(&request()).expect("a key");
        let one = message_key(Call::Authorize, &fields).expect("a key");
        let batch = message_key(Call::BatchAuthorize, &fields).expect("a key");
        assert!(fields[0] != one[0] && fields[0] != batch[0] && one[0] != batch[0]);
        assert_eq!(&one[1..], &fields[..]);
        assert_eq!(message_key(Call::Authorize, &vec![0u8; MAX_KEY_BYTES]), None, "too long");
    }

    #[test]
    fn a_long_request_has_no_key() {
        let mut req = request();
        req.context = vec![("app:blob".into(), ContextValue::One("x".repeat(MAX_KEY_BYTES)))];
        assert_eq!(key(&req), None);
    }

    #[test]
    fn an_entry_answers_only_its_own_revision() {
        let cache = DecisionCache::new(1 << 20).expect("a cache");
        let k = key(&request()).expect("a key");
        assert!(cache.get(&k, 7).is_none());
        cache.put(&k, 7, reply(Reason::Allowed));
        assert_eq!(cache.get(&k, 7).and_then(reason), Some(Reason::Allowed));
        assert!(cache.get(&k, 8).is_none(), "a newer snapshot is decided afresh");
        cache.put(&k, 8, reply(Reason::ImplicitDeny));
        assert_eq!(cache.get(&k, 8).and_then(reason), Some(Reason::ImplicitDeny));
        assert!(cache.get(&k, 7).is_none(), "replaced");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn the_budget_bounds_the_cache() {
        let cache = DecisionCache::new(64 * 1024).expect("a cache");
        for i in 0..10_000 {
            let req = Request { resource: format!("arn:aws:kms:us-east-1:111122223333:key/k{i}"), ..request() };
            let k = key(&req).expect("a key");
            cache.put(&k, 1, reply(Reason::Allowed));
        }
        assert!(cache.entries.weight() <= 64 * 1024, "{:?}", cache);
        assert!(cache.len() < 10_000 && !cache.is_empty(), "{:?}", cache);
        assert!(DecisionCache::new(0).is_none(), "0 turns it off");
    }
}
