//! The world Tagward decides over: managed policies, principals and
//! resources with their tags, as one immutable value with a revision.
//!
//! Every map is persistent (`imbl`): changing one resource among a million
//! copies a few tree nodes, not the map, so a writer can build the next
//! state while readers keep using the current one.
//!
//! INVARIANT: a `State` never changes after it is shared; every change goes
//! through the methods here, which return `Err` and leave `self` untouched
//! when they refuse, and bump `revision` exactly when something changed.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use thiserror::Error;

use crate::arn::{Arn, Caller, CallerKind};
use crate::chain::{Endpoint, Organization, Session};
use crate::error::ErrorCode;
use crate::kms::{alias_arn, Grant, KeyExtras};
use crate::policy::{Policy, PolicySet};
use crate::tags::{TagSet, TagSetError};

mod arn_set;
mod by_arn;
mod text_sort;
use arn_set::ArnSet;
use by_arn::ByArn;

/// An IAM user or role, with its tags and identity policies.
///
/// The ARN and what is read from it (account, user or role, name) are fixed
/// by [`Principal::new`]; tags and attachments are the caller's to set
/// before [`State::put_principal`].
#[derive(Debug, Clone)]
pub struct Principal {
    arn: Arc<str>,
    account: Arc<str>,
    is_role: bool,
    name: Arc<str>,
    /// Case-insensitive, case-preserving keys.
    pub tags: TagSet,
    /// Managed policies by name; a name with no policy is skipped.
    pub managed: Vec<Arc<str>>,
    pub inline: Vec<(Arc<str>, Arc<Policy>)>,
    /// The managed policy used as the permissions boundary, by name. A
    /// name with no policy bounds everything out (fails closed).
    pub boundary: Option<Arc<str>>,
    /// A role's trust policy (resource-style), consulted for
    /// `sts:AssumeRole` and its twins on the role's ARN.
    pub trust_policy: Option<Arc<Policy>>,
    /// The managed policies that exist, in `managed` order, resolved when
    /// the principal or a policy changes so that a decision looks up none.
    /// INVARIANT: maintained by [`State`] alone (see [`Principal::resolved`]).
    resolved: Vec<(Arc<str>, Arc<Policy>)>,
    /// `resolved` then `inline`, indexed by action as one for the decision.
    /// INVARIANT: rebuilt with `resolved`, by [`State`] alone.
    identity: Arc<PolicySet>,
}

impl Principal {
    /// A principal with no tags and no policies, for a user or role ARN.
    pub fn new(arn: &str) -> Result<Principal, StateError> {
        let caller = Caller::parse(arn).map_err(|e| StateError::Invalid(e.to_string()))?;
        let (is_role, name) = match caller.kind {
            CallerKind::User { name } => (false, name),
            CallerKind::Role { name } => (true, name),
            _ => {
                return Err(StateError::Invalid(format!(
                    "{arn:?} is not an IAM user or role; only users and roles are principals with policies"
                )))
            }
        };
        Ok(Principal {
            arn: arn.into(),
            account: caller.account.into(),
            is_role,
            name: name.into(),
            tags: TagSet::new(true),
            managed: Vec::new(),
            inline: Vec::new(),
            boundary: None,
            trust_policy: None,
            resolved: Vec::new(),
            identity: Arc::default(),
        })
    }

    pub fn arn(&self) -> &Arc<str> {
        &self.arn
    }

    pub fn account(&self) -> &Arc<str> {
        &self.account
    }

    /// A role (else a user).
    pub fn is_role(&self) -> bool {
        self.is_role
    }

    /// The user or role name (the last part of the ARN's path).
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// What [`Caller::parse`] makes of this principal's ARN, without
    /// parsing it again: [`Principal::new`] parsed it, and kept its
    /// account, name and kind (a user or a role, nothing else).
    pub fn caller(&self) -> Caller<'_> {
        let partition = self.arn.split(':').nth(1).unwrap_or_default();
        let name = &*self.name;
        let kind = if self.is_role { CallerKind::Role { name } } else { CallerKind::User { name } };
        Caller { arn: &self.arn, partition, account: &self.account, kind }
    }

    /// The attached managed policies that exist, in `managed` order, as of
    /// the state this principal was read from (empty before it is put).
    pub fn resolved(&self) -> &[(Arc<str>, Arc<Policy>)] {
        &self.resolved
    }

    /// The resolved managed policies then the inline ones, indexed by
    /// action together, as of the same state as [`Principal::resolved`].
    pub fn identity_policies(&self) -> &PolicySet {
        &self.identity
    }
}

/// A name that is none of an enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{found:?} is not one of {}", expected.join(", "))]
pub struct UnknownName {
    pub found: String,
    pub expected: &'static [&'static str],
}

macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [&'static str] = &[$($text),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownName { found: s.to_string(), expected: Self::ALL }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// The state of a KMS key.
    KeyState {
        Enabled = "Enabled",
        Disabled = "Disabled",
        PendingDeletion = "PendingDeletion",
        PendingImport = "PendingImport",
        PendingReplicaDeletion = "PendingReplicaDeletion",
        Unavailable = "Unavailable",
        Creating = "Creating",
        Updating = "Updating",
    }
);

string_enum!(
    /// Who manages a KMS key; AWS managed keys cannot be tagged.
    KeyManager {
        Customer = "CUSTOMER",
        Aws = "AWS",
    }
);

/// A short text that a million records share (a key's spec, usage or
/// origin): one pointer per record instead of the two of an `Arc<str>`.
/// Reads as a `&str`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SharedText(Arc<Box<str>>);

impl SharedText {
    pub fn new(text: &str) -> SharedText {
        SharedText(Arc::new(text.into()))
    }
}

impl std::ops::Deref for SharedText {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SharedText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl fmt::Debug for SharedText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// What a KMS key carries besides its tags.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub state: KeyState,
    pub spec: SharedText,
    pub usage: SharedText,
    pub origin: SharedText,
    pub manager: KeyManager,
    pub policy: Arc<Policy>,
    /// The key policy was not given: the default one applies.
    pub default_policy: bool,
    /// Aliases and grants; `None` when the key has neither (most keys), so
    /// that a request checks one pointer. INVARIANT: never `Some` of an
    /// empty value, and the aliases are in [`State`]'s alias index.
    pub extras: Option<Arc<KeyExtras>>,
}

impl KeyInfo {
    /// The key's alias names (`alias/NAME`), sorted.
    pub fn aliases(&self) -> &[String] {
        self.extras.as_deref().map_or(&[], |e| &e.aliases)
    }

    /// The key's grants, in creation order.
    pub fn grants(&self) -> &[Grant] {
        self.extras.as_deref().map_or(&[], |e| &e.grants)
    }
}

/// What kind of resource, and the policy it carries.
#[derive(Debug, Clone)]
pub enum ResourceKind {
    Key(KeyInfo),
    Other { policy: Option<Arc<Policy>> },
}

/// A taggable resource other than a principal.
#[derive(Debug, Clone)]
pub struct Resource {
    pub arn: Arc<str>,
    /// The owning account when the ARN does not say it (S3 buckets) or a
    /// world file gave another; otherwise the ARN's (see [`Resource::account`]).
    /// Not stored per resource when the ARN has it: a million keys would
    /// each carry a copy.
    pub account_override: Option<Arc<str>>,
    pub tags: TagSet,
    pub kind: ResourceKind,
}

impl Resource {
    /// The owning account: given, or the ARN's.
    pub fn account(&self) -> Option<&str> {
        match &self.account_override {
            Some(a) => Some(a),
            None => crate::arn::split_arn(&self.arn).map(|(head, _)| head[4]).filter(|a| !a.is_empty()),
        }
    }

    pub fn key(&self) -> Option<&KeyInfo> {
        match &self.kind {
            ResourceKind::Key(k) => Some(k),
            ResourceKind::Other { .. } => None,
        }
    }
}

/// True when the ARN names a KMS key.
pub fn is_kms_key(arn: &str) -> bool {
    Arn::parse(arn).is_some_and(|a| a.service == "kms" && a.resource_type() == "key")
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StateError {
    #[error("no managed policy named {0:?}")]
    NoSuchPolicy(String),
    #[error("no principal {0:?}")]
    NoSuchPrincipal(String),
    #[error("no resource {0:?}")]
    NoSuchResource(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tags(#[from] TagSetError),
    /// A session, an endpoint or the organization that is not there.
    #[error("{0}")]
    Missing(String),
    #[error("alias {alias:?} already exists (on {key:?})")]
    AliasTaken { alias: String, key: String },
    #[error("no alias {0:?}")]
    NoSuchAlias(String),
    #[error("{0:?} is not a KMS key")]
    NotAKey(String),
    #[error("key {key:?} has no grant {id:?}")]
    NoSuchGrant { key: String, id: String },
    #[error("key {key:?} already has a grant {id:?}")]
    GrantTaken { key: String, id: String },
}

impl StateError {
    /// The AWS error name for the refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            StateError::NoSuchPolicy(_) | StateError::NoSuchPrincipal(_) => ErrorCode::NoSuchEntity,
            StateError::NoSuchResource(_) => ErrorCode::NotFound,
            StateError::Invalid(_) => ErrorCode::Validation,
            StateError::Tags(TagSetError::Limit { .. }) => ErrorCode::LimitExceeded,
            StateError::Tags(TagSetError::Rule(_)) => ErrorCode::Tag,
            StateError::Missing(_) => ErrorCode::NoSuchEntity,
            StateError::AliasTaken { .. } | StateError::GrantTaken { .. } => ErrorCode::AlreadyExists,
            StateError::NoSuchAlias(_) | StateError::NoSuchGrant { .. } => ErrorCode::NotFound,
            StateError::NotAKey(_) => ErrorCode::Validation,
        }
    }
}

/// A persistent map keyed by name or ARN. foldhash: the keys are short
/// strings, and SipHash costs more than the rest of a lookup.
type Map<V> = imbl::GenericHashMap<Arc<str>, V, foldhash::fast::RandomState, imbl::shared_ptr::DefaultSharedPtr>;

/// An ARN in the tag index: one pointer, shared by the ten or so entries
/// of one resource, so that an entry costs 8 bytes instead of the 16 of an
/// `Arc<str>`. Ordered, compared and looked up as the ARN text.
#[derive(Clone)]
struct IndexedArn(Arc<Arc<str>>);

/// Bulk builds of more tagged entities than this build their tag index on
/// two threads.
const PARALLEL_INDEX_FROM: usize = 4_096;

/// A tag's run while the index is built: its key and value, and the ARNs
/// holding it in order.
type Run<'s> = (&'s str, &'s str, Vec<IndexedArn>);

/// The runs of `tagged` (in ARN order), one per tag. A tag's run is found
/// by the address of its key text: sets share a copy of each tag
/// (`tags::TagCache`, `tags::intern`), so hashing an address replaces
/// hashing both texts ten million times. The first time an address comes
/// up, the run is found by the tag's text, so that every copy of one tag
/// (one per builder that made them) shares one run, still in ARN order.
fn runs_of<'s>(tagged: &[(&'s Arc<str>, &'s TagSet)]) -> Vec<Run<'s>> {
    type ByAddress = std::collections::HashMap<usize, usize, foldhash::fast::RandomState>;
    type ByText<'s> = std::collections::HashMap<(&'s str, &'s str), usize, foldhash::fast::RandomState>;
    let (mut by_address, mut by_text) = (ByAddress::default(), ByText::default());
    let mut runs: Vec<Run<'s>> = Vec::new();
    for (arn, tags) in tagged {
        let handle = IndexedArn(Arc::new(Arc::clone(arn)));
        for (k, v) in tags.iter() {
            let at = *by_address.entry(k.as_ptr() as usize).or_insert_with(|| {
                *by_text.entry((k, v)).or_insert_with(|| {
                    runs.push((k, v, Vec::new()));
                    runs.len() - 1
                })
            });
            if let Some(run) = runs.get_mut(at) {
                run.2.push(handle.clone());
            }
        }
    }
    runs
}

/// Two lists in ARN order as one (no ARN is in both: a principal is never
/// a resource).
fn merged_by_arn<'s>(a: Vec<(&'s Arc<str>, &'s TagSet)>, b: Vec<(&'s Arc<str>, &'s TagSet)>) -> Vec<(&'s Arc<str>, &'s TagSet)> {
    if b.is_empty() {
        return a;
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.0 <= y.0 => a.next(),
            (Some(_), Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(entry) => out.push(entry),
            None => return out,
        }
    }
}

/// `a()` and `b()`, on two threads when `parallel` (a panic in either is
/// the caller's, as if both ran here).
fn both<A: Send, B: Send>(parallel: bool, a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    if !parallel {
        return (a(), b());
    }
    std::thread::scope(|scope| {
        let other = scope.spawn(b);
        let a = a();
        (a, other.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })
}

impl PartialEq for IndexedArn {
    fn eq(&self, other: &Self) -> bool {
        **self.0 == **other.0
    }
}

impl Eq for IndexedArn {}

impl PartialOrd for IndexedArn {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IndexedArn {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (**self.0).cmp(&**other.0)
    }
}

impl std::borrow::Borrow<str> for IndexedArn {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// The whole world at one revision.
#[derive(Clone, Default)]
pub struct State {
    revision: u64,
    policies: Map<Arc<Policy>>,
    principals: Map<Arc<Principal>>,
    /// `ACCOUNT:ROLE-NAME` to the role's ARN, for assumed-role sessions,
    /// whose ARNs drop the role's path.
    roles: Map<Arc<str>>,
    resources: ByArn<Arc<Resource>>,
    /// Managed policy name to the principals that attach it.
    attached_by: Map<imbl::HashSet<Arc<str>>>,
    /// Tag key (exact case) to tag value to the ARNs carrying that tag, for
    /// `GetResources`. INVARIANT: holds exactly the tags of every resource
    /// and principal.
    tag_index: Map<Map<ArnSet>>,
    /// Tags on all resources and principals.
    tag_count: usize,
    /// The tag index is left empty while a state is built from nothing and
    /// is built once at the end ([`State::bulk`]). INVARIANT: when set, no
    /// change has replaced or removed a tagged entity since it was set.
    index_deferred: bool,
    /// While the index is deferred: the tagged resources put, in the order
    /// they came (a snapshot's is ARN order, so the index needs no sort).
    /// Empty otherwise.
    bulk_resources: Vec<Arc<Resource>>,
    /// The organization (SCPs, RCPs), if any.
    organization: Option<Arc<Organization>>,
    /// Declared assumed-role sessions, by session ARN.
    sessions: Map<Arc<Session>>,
    /// VPC endpoints, by id.
    endpoints: Map<Arc<Endpoint>>,
    /// Alias ARN to the ARN of the key it points to. INVARIANT: holds
    /// exactly the aliases of every key (an alias ARN is unique per
    /// account and region by construction).
    aliases: Map<Arc<str>>,
}

impl by_arn::Named for Arc<Resource> {
    fn name(&self) -> &str {
        &self.arn
    }
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("revision", &self.revision)
            .field("policies", &self.policies.len())
            .field("principals", &self.principals.len())
            .field("resources", &self.resources.len())
            .finish()
    }
}

/// A resource as the engine and the tag operations see it: a resource or a
/// principal (users and roles are taggable resources too).
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Resource(&'a Resource),
    Principal(&'a Principal),
}

impl<'a> Target<'a> {
    pub fn tags(&self) -> &'a TagSet {
        match self {
            Target::Resource(r) => &r.tags,
            Target::Principal(p) => &p.tags,
        }
    }

    pub fn account(&self) -> Option<&'a str> {
        match self {
            Target::Resource(r) => r.account(),
            Target::Principal(p) => Some(&p.account),
        }
    }

    pub fn key(&self) -> Option<&'a KeyInfo> {
        match self {
            Target::Resource(r) => r.key(),
            Target::Principal(_) => None,
        }
    }

    /// The key policy or resource policy.
    pub fn policy(&self) -> Option<&'a Arc<Policy>> {
        match self {
            Target::Resource(Resource { kind: ResourceKind::Key(k), .. }) => Some(&k.policy),
            Target::Resource(Resource { kind: ResourceKind::Other { policy }, .. }) => policy.as_ref(),
            Target::Principal(_) => None,
        }
    }
}

impl State {
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn policy(&self, name: &str) -> Option<&Arc<Policy>> {
        self.policies.get(name)
    }

    pub fn principal(&self, arn: &str) -> Option<&Arc<Principal>> {
        self.principals.get(arn)
    }

    /// The role that an assumed-role session belongs to.
    /// Every session request asks this: the key `ACCOUNT:NAME` is built on
    /// the stack (an IAM role name has at most 64 characters; a longer one
    /// from a forged ARN spills to the heap), not allocated.
    pub fn role_by_name(&self, account: &str, name: &str) -> Option<&Arc<Principal>> {
        let mut buf: smallvec::SmallVec<[u8; 96]> = smallvec::SmallVec::new();
        buf.extend_from_slice(account.as_bytes());
        buf.push(b':');
        buf.extend_from_slice(name.as_bytes());
        // Two texts and a colon are text; the check cannot fail.
        let key = std::str::from_utf8(&buf).ok()?;
        self.roles.get(key).and_then(|arn| self.principals.get(arn))
    }

    pub fn resource(&self, arn: &str) -> Option<&Arc<Resource>> {
        self.resources.get(arn)
    }

    /// A resource or principal by ARN.
    pub fn target(&self, arn: &str) -> Option<Target<'_>> {
        if let Some(r) = self.resources.get(arn) {
            return Some(Target::Resource(r));
        }
        self.principals.get(arn).map(|p| Target::Principal(p))
    }

    pub fn policies(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<Policy>)> {
        self.policies.iter()
    }

    pub fn principals(&self) -> impl Iterator<Item = &Arc<Principal>> {
        self.principals.values()
    }

    pub fn resources(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.resources.values()
    }

    /// Every resource, in ARN order: what a snapshot writes, so that a
    /// restore builds its tag index without sorting (and the same state
    /// always writes the same snapshot).
    pub fn resources_by_arn(&self) -> impl Iterator<Item = &Arc<Resource>> {
        let all: Vec<&Arc<Resource>> = self.resources.values().collect();
        text_sort::sorted_by_text(&all, |r| r.arn.as_bytes()).into_iter()
    }

    pub fn organization(&self) -> Option<&Arc<Organization>> {
        self.organization.as_ref()
    }

    pub fn session(&self, arn: &str) -> Option<&Arc<Session>> {
        self.sessions.get(arn)
    }

    pub fn sessions(&self) -> impl Iterator<Item = &Arc<Session>> {
        self.sessions.values()
    }

    /// True when some session is declared (a decision looks sessions up
    /// only then).
    pub fn has_sessions(&self) -> bool {
        !self.sessions.is_empty()
    }

    pub fn endpoint(&self, id: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(id)
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints.values()
    }

    pub fn has_endpoints(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// Sets (or replaces) the organization.
    pub fn put_organization(&mut self, org: Organization) {
        self.organization = Some(Arc::new(org));
        self.bump();
    }

    pub fn delete_organization(&mut self) -> Result<(), StateError> {
        if self.organization.take().is_none() {
            return Err(StateError::Missing("there is no organization".into()));
        }
        self.bump();
        Ok(())
    }

    /// Adds or replaces a declared session.
    pub fn put_session(&mut self, session: Session) {
        self.sessions.insert(session.arn.clone(), Arc::new(session));
        self.bump();
    }

    pub fn delete_session(&mut self, arn: &str) -> Result<(), StateError> {
        if self.sessions.remove(arn).is_none() {
            return Err(StateError::Missing(format!("no session {arn:?}")));
        }
        self.bump();
        Ok(())
    }

    /// Adds or replaces a VPC endpoint.
    pub fn put_endpoint(&mut self, endpoint: Endpoint) {
        self.endpoints.insert(endpoint.id.clone(), Arc::new(endpoint));
        self.bump();
    }

    pub fn delete_endpoint(&mut self, id: &str) -> Result<(), StateError> {
        if self.endpoints.remove(id).is_none() {
            return Err(StateError::Missing(format!("no VPC endpoint {id:?}")));
        }
        self.bump();
        Ok(())
    }

    /// Tags on all resources and principals.
    pub fn tag_count(&self) -> usize {
        self.tag_count
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        (self.policies.len(), self.principals.len(), self.resources.len())
    }

    fn bump(&mut self) {
        self.revision += 1;
    }

    /// Sets the revision of a state rebuilt from a snapshot.
    pub fn set_revision(&mut self, revision: u64) {
        self.revision = revision;
    }

    /// Makes this state the successor of one at revision `previous`, so that
    /// a state built from scratch (a replaced world) keeps revisions growing.
    pub fn follow(&mut self, previous: u64) {
        self.revision = previous + 1;
    }

    /// Runs `build` on this state; when the state holds no resource and no
    /// principal yet (a world or a snapshot built from nothing), the tag
    /// index is built once at the end instead of one entry at a time: each
    /// value's ARNs are gathered in ARN order and filled into whole chunks.
    /// The index is complete when this returns, whatever `build` returned.
    pub fn bulk<T>(&mut self, build: impl FnOnce(&mut State) -> T) -> T {
        self.defer_tag_index();
        let out = build(self);
        self.complete_tag_index();
        out
    }

    /// Leaves the tag index empty until [`State::complete_tag_index`], when
    /// the state holds no resource and no principal (else nothing).
    pub fn defer_tag_index(&mut self) {
        if self.resources.is_empty() && self.principals.is_empty() {
            self.index_deferred = true;
        }
    }

    /// Builds the tag index deferred by [`State::defer_tag_index`] (nothing
    /// when none is).
    pub fn complete_tag_index(&mut self) {
        if !std::mem::take(&mut self.index_deferred) {
            return;
        }
        // Every entity put since the index was deferred is new (a
        // replacement or removal completes the index first), so the
        // resources listed as they came are all of them. In ARN order (a
        // snapshot's) they need no sort, and they are read in the order
        // they were allocated.
        let bulk = std::mem::take(&mut self.bulk_resources);
        let resources: Vec<(&Arc<str>, &TagSet)> = bulk.iter().map(|r| (&r.arn, &r.tags)).collect();
        let resources = if resources.windows(2).all(|w| w[0].0 < w[1].0) {
            resources
        } else {
            text_sort::sorted_by_text(&resources, |(arn, _)| arn.as_bytes())
        };
        let principals: Vec<(&Arc<str>, &TagSet)> =
            self.principals.values().map(|p| (&p.arn, &p.tags)).filter(|(_, tags)| !tags.is_empty()).collect();
        let principals = text_sort::sorted_by_text(&principals, |(arn, _)| arn.as_bytes());
        let tagged = merged_by_arn(resources, principals);
        // Each half of the ARNs gives its runs on a thread of its own, the
        // later half's appended to the earlier's: still in order.
        let parallel = tagged.len() >= PARALLEL_INDEX_FROM && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
        let (earlier, later) = tagged.split_at(if parallel { tagged.len() / 2 } else { tagged.len() });
        let (mut merged, more) = both(parallel, || runs_of(earlier), || runs_of(later));
        let mut by_text: std::collections::HashMap<(&str, &str), usize, foldhash::fast::RandomState> =
            merged.iter().enumerate().map(|(i, run)| ((run.0, run.1), i)).collect();
        for (k, v, arns) in more {
            match by_text.get(&(k, v)).and_then(|&i| merged.get_mut(i)) {
                Some(run) => run.2.extend(arns),
                None => {
                    by_text.insert((k, v), merged.len());
                    merged.push((k, v, arns));
                }
            }
        }
        merged.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        // The sets built on two threads, about half of the entries each.
        let total: usize = merged.iter().map(|r| r.2.len()).sum();
        let mut seen = 0;
        let cut = merged
            .iter()
            .position(|r| {
                seen += r.2.len();
                seen > total / 2
            })
            .unwrap_or(merged.len());
        let cut = if parallel { cut } else { merged.len() };
        let second = merged.split_off(cut);
        let sets = |runs: Vec<(&'_ str, &'_ str, Vec<IndexedArn>)>| -> Vec<(Arc<str>, Arc<str>, ArnSet)> {
            runs.into_iter().map(|(k, v, arns)| (Arc::from(k), Arc::from(v), ArnSet::from_sorted(arns))).collect()
        };
        let (first, second) = both(parallel, || sets(merged), || sets(second));
        let mut index: Map<Map<ArnSet>> = Map::default();
        for (k, v, set) in first.into_iter().chain(second) {
            index.entry(k).or_default().insert(v, set);
        }
        self.tag_index = index;
        self.resources = self.resources.compacted();
    }

    fn index_tags(&mut self, arn: &Arc<str>, old: Option<&TagSet>, new: Option<&TagSet>) {
        if self.index_deferred {
            if old.is_none() {
                self.tag_count += new.map_or(0, TagSet::len);
                return;
            }
            // A replacement or removal during a bulk build (a snapshot
            // never holds one): the index is completed first.
            self.complete_tag_index();
        }
        if let Some(old) = old {
            for (k, v) in old.iter() {
                if new.is_some_and(|n| n.get(k) == Some(v)) {
                    continue;
                }
                self.tag_count -= 1;
                if let Some(values) = self.tag_index.get_mut(k) {
                    if let Some(set) = values.get_mut(v) {
                        set.remove(arn);
                        if set.is_empty() {
                            values.remove(v);
                        }
                    }
                    if values.is_empty() {
                        self.tag_index.remove(k);
                    }
                }
            }
        }
        if let Some(new) = new {
            // One shared pointer for every entry this change adds.
            let mut handle: Option<IndexedArn> = None;
            for (k, v) in new.iter() {
                if old.is_some_and(|o| o.get(k) == Some(v)) {
                    continue;
                }
                self.tag_count += 1;
                let handle = handle.get_or_insert_with(|| IndexedArn(Arc::new(arn.clone()))).clone();
                // Look up before inserting: a key or value already indexed
                // (nearly always) costs no allocation.
                let values = match self.tag_index.get_mut(k) {
                    Some(values) => values,
                    None => self.tag_index.entry(Arc::from(k)).or_default(),
                };
                match values.get_mut(v) {
                    Some(set) => {
                        set.insert(handle);
                    }
                    None => {
                        values.insert(Arc::from(v), ArnSet::unit(handle));
                    }
                }
            }
        }
    }

    /// Resources and principals whose tags match every filter (a key, and
    /// any of the values or any value when none are given), in ARN order,
    /// after `after`, at most `limit`. The second value tells whether more
    /// follow.
    pub fn find_by_tags(&self, filters: &[(String, Vec<String>)], after: Option<&str>, limit: usize) -> (Vec<Arc<str>>, bool) {
        if self.index_deferred {
            // Not reached: a bulk build completes the index before the state
            // is shared. Answered correctly all the same.
            let mut complete = self.clone();
            complete.complete_tag_index();
            return complete.find_by_tags(filters, after, limit);
        }
        let Some(((first_key, first_values), rest)) = filters.split_first() else {
            return (Vec::new(), false);
        };
        let Some(values) = self.tag_index.get(first_key.as_str()) else {
            return (Vec::new(), false);
        };
        let sets: Vec<&ArnSet> = if first_values.is_empty() {
            values.values().collect()
        } else {
            // A value named twice must not list its resources twice.
            let wanted: std::collections::BTreeSet<&str> = first_values.iter().map(String::as_str).collect();
            wanted.into_iter().filter_map(|v| values.get(v)).collect()
        };
        // Sets under one key are disjoint (a resource has one value per key),
        // so a k-way merge gives each ARN once.
        let mut iters: Vec<_> = sets.iter().map(|s| s.after(after).peekable()).collect();
        let mut out = Vec::new();
        loop {
            let next = iters
                .iter_mut()
                .enumerate()
                .filter_map(|(i, it)| it.peek().map(|a| (i, Arc::clone(&*a.0))))
                .min_by(|a, b| a.1.cmp(&b.1));
            let Some((i, arn)) = next else { return (out, false) };
            iters[i].next();
            let tags = self.target(&arn).map(|t| t.tags());
            let matches_rest = rest.iter().all(|(k, vals)| {
                tags.and_then(|t| t.get(k)).is_some_and(|v| vals.is_empty() || vals.iter().any(|want| want == v))
            });
            if matches_rest {
                if out.len() == limit {
                    return (out, true);
                }
                out.push(arn);
            }
        }
    }

    fn resolve(&self, principal: &mut Principal) {
        principal.resolved =
            principal.managed.iter().filter_map(|n| self.policies.get(n).map(|p| (n.clone(), p.clone()))).collect();
        principal.identity = Arc::new(PolicySet::new(&principal.resolved, &principal.inline));
    }

    /// Re-resolves every principal that attaches `name`.
    fn reresolve_attachments(&mut self, name: &str) {
        let Some(arns) = self.attached_by.get(name).cloned() else { return };
        for arn in arns.iter() {
            if let Some(p) = self.principals.get(arn) {
                let mut next = Principal::clone(p);
                self.resolve(&mut next);
                self.principals.insert(arn.clone(), Arc::new(next));
            }
        }
    }

    fn detach_all(&mut self, principal: &Principal) {
        for name in &principal.managed {
            if let Some(set) = self.attached_by.get_mut(name) {
                set.remove(&principal.arn);
                if set.is_empty() {
                    self.attached_by.remove(name);
                }
            }
        }
    }

    /// Adds or replaces a managed policy.
    pub fn put_policy(&mut self, name: &str, policy: Arc<Policy>) -> Result<(), StateError> {
        if name.is_empty() {
            return Err(StateError::Invalid("policy name is empty".into()));
        }
        self.policies.insert(name.into(), policy);
        self.reresolve_attachments(name);
        self.bump();
        Ok(())
    }

    /// Removes a managed policy; principals that attach it lose it.
    pub fn delete_policy(&mut self, name: &str) -> Result<(), StateError> {
        if self.policies.remove(name).is_none() {
            return Err(StateError::NoSuchPolicy(name.to_string()));
        }
        self.reresolve_attachments(name);
        self.bump();
        Ok(())
    }

    /// Adds or replaces a principal. An ARN that is already a resource is
    /// refused, so that one ARN always names one thing.
    pub fn put_principal(&mut self, mut principal: Principal) -> Result<(), StateError> {
        if self.resources.contains_key(&principal.arn) {
            return Err(StateError::Invalid(format!("{:?} is already a resource", principal.arn)));
        }
        let role_key: Arc<str> = format!("{}:{}", principal.account, principal.name).into();
        if principal.is_role {
            if let Some(existing) = self.roles.get(&role_key) {
                if **existing != *principal.arn {
                    return Err(StateError::Invalid(format!(
                        "role name {:?} of account {} is already taken by {existing:?}",
                        principal.name, principal.account
                    )));
                }
            }
            self.roles.insert(role_key, principal.arn.clone());
        }
        let old = self.principals.get(&principal.arn).cloned();
        if let Some(old) = &old {
            self.detach_all(old);
        }
        self.index_tags(&principal.arn, old.as_ref().map(|o| &o.tags), Some(&principal.tags));
        for name in &principal.managed {
            let mut set = self.attached_by.get(name).cloned().unwrap_or_default();
            set.insert(principal.arn.clone());
            self.attached_by.insert(name.clone(), set);
        }
        self.resolve(&mut principal);
        self.principals.insert(principal.arn.clone(), Arc::new(principal));
        self.bump();
        Ok(())
    }

    pub fn delete_principal(&mut self, arn: &str) -> Result<(), StateError> {
        let removed = self.principals.remove(arn).ok_or_else(|| StateError::NoSuchPrincipal(arn.to_string()))?;
        self.detach_all(&removed);
        self.index_tags(&removed.arn, Some(&removed.tags), None);
        if removed.is_role {
            self.roles.remove(format!("{}:{}", removed.account, removed.name).as_str());
        }
        self.bump();
        Ok(())
    }

    /// Adds or replaces a resource.
    pub fn put_resource(&mut self, resource: Resource) -> Result<(), StateError> {
        if self.principals.contains_key(&*resource.arn) {
            return Err(StateError::Invalid(format!("{:?} is already a principal", resource.arn)));
        }
        let old = self.resources.get(&resource.arn).cloned();
        let new_aliases = resource.key().map(KeyInfo::aliases).unwrap_or_default();
        for name in new_aliases {
            let arn = alias_arn(&resource.arn, name).unwrap_or_default();
            if let Some(owner) = self.aliases.get(arn.as_str()) {
                if *owner != resource.arn {
                    return Err(StateError::AliasTaken { alias: arn, key: owner.to_string() });
                }
            }
        }
        if let Some(old) = &old {
            self.unindex_aliases(old);
        }
        for name in new_aliases {
            self.aliases.insert(alias_arn(&resource.arn, name).unwrap_or_default().into(), resource.arn.clone());
        }
        self.index_tags(&resource.arn, old.as_ref().map(|o| &o.tags), Some(&resource.tags));
        let resource = Arc::new(resource);
        if self.index_deferred && !resource.tags.is_empty() {
            self.bulk_resources.push(Arc::clone(&resource));
        }
        self.resources.insert(resource);
        self.bump();
        Ok(())
    }

    fn unindex_aliases(&mut self, resource: &Resource) {
        for name in resource.key().map(KeyInfo::aliases).unwrap_or_default() {
            self.aliases.remove(alias_arn(&resource.arn, name).unwrap_or_default().as_str());
        }
    }

    /// The key an alias ARN points to.
    pub fn alias_target(&self, alias_arn: &str) -> Option<&Arc<str>> {
        self.aliases.get(alias_arn)
    }

    /// Every alias: its ARN and its key's ARN, in no order.
    pub fn aliases(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<str>)> {
        self.aliases.iter()
    }

    /// Changes a key's aliases and grants with `change` (on a copy), one
    /// revision; the alias index follows. `Ok(false)` when nothing changed.
    fn change_extras(
        &mut self,
        key: &str,
        change: impl FnOnce(&mut KeyExtras) -> Result<(), StateError>,
    ) -> Result<bool, StateError> {
        let r = self.resources.get(key).cloned().ok_or_else(|| StateError::NoSuchResource(key.to_string()))?;
        let info = r.key().ok_or_else(|| StateError::NotAKey(key.to_string()))?;
        let mut extras = info.extras.as_deref().cloned().unwrap_or_default();
        change(&mut extras)?;
        if extras == info.extras.as_deref().cloned().unwrap_or_default() {
            return Ok(false);
        }
        let mut next = Resource::clone(&r);
        if let ResourceKind::Key(k) = &mut next.kind {
            k.extras = (!extras.is_empty()).then(|| Arc::new(extras));
        }
        self.unindex_aliases(&r);
        for name in next.key().map(KeyInfo::aliases).unwrap_or_default() {
            self.aliases.insert(alias_arn(&next.arn, name).unwrap_or_default().into(), next.arn.clone());
        }
        self.resources.insert(Arc::new(next));
        Ok(true)
    }

    /// Points alias `name` (`alias/NAME`) at `key`, taking it from the key
    /// it pointed to before in the same account and region (UpdateAlias),
    /// as one revision. Returns the key it pointed to before, if any.
    pub fn put_alias(&mut self, key: &str, name: &str) -> Result<Option<Arc<str>>, StateError> {
        let arn = alias_arn(key, name).ok_or_else(|| StateError::NotAKey(key.to_string()))?;
        let previous = self.aliases.get(arn.as_str()).cloned();
        if previous.as_deref() == Some(key) {
            return Ok(previous);
        }
        let mut next = self.clone();
        if let Some(old) = &previous {
            next.change_extras(old, |e| {
                e.aliases.retain(|a| a != name);
                Ok(())
            })?;
        }
        next.change_extras(key, |e| {
            e.aliases.push(name.to_string());
            e.aliases.sort();
            Ok(())
        })?;
        *self = next;
        self.bump();
        Ok(previous)
    }

    /// Removes an alias (by ARN). Returns the key it pointed to.
    pub fn delete_alias(&mut self, alias_arn: &str) -> Result<Arc<str>, StateError> {
        let key = self.aliases.get(alias_arn).cloned().ok_or_else(|| StateError::NoSuchAlias(alias_arn.to_string()))?;
        let name = crate::kms::alias_of_arn(alias_arn).unwrap_or_default().to_string();
        self.change_extras(&key, |e| {
            e.aliases.retain(|a| *a != name);
            Ok(())
        })?;
        self.bump();
        Ok(key)
    }

    /// Adds a grant to a key; its id must be new on the key.
    pub fn put_grant(&mut self, key: &str, grant: Grant) -> Result<(), StateError> {
        self.change_extras(key, |e| {
            if e.grant(&grant.id).is_some() {
                return Err(StateError::GrantTaken { key: key.to_string(), id: grant.id.to_string() });
            }
            e.grants.push(grant);
            Ok(())
        })?;
        self.bump();
        Ok(())
    }

    /// Removes a grant from a key (retired or revoked).
    pub fn delete_grant(&mut self, key: &str, id: &str) -> Result<Grant, StateError> {
        let mut removed = None;
        self.change_extras(key, |e| {
            let at = e.grants.iter().position(|g| &*g.id == id);
            let at = at.ok_or_else(|| StateError::NoSuchGrant { key: key.to_string(), id: id.to_string() })?;
            removed = Some(e.grants.remove(at));
            Ok(())
        })?;
        self.bump();
        removed.ok_or_else(|| StateError::NoSuchGrant { key: key.to_string(), id: id.to_string() })
    }

    pub fn delete_resource(&mut self, arn: &str) -> Result<(), StateError> {
        let removed = self.resources.remove(arn).ok_or_else(|| StateError::NoSuchResource(arn.to_string()))?;
        self.unindex_aliases(&removed);
        self.index_tags(&removed.arn, Some(&removed.tags), None);
        self.bump();
        Ok(())
    }

    /// Replaces the tag set of a resource or principal; a set equal to the
    /// current one changes nothing and keeps the revision.
    pub fn replace_tags(&mut self, arn: &str, tags: TagSet) -> Result<bool, StateError> {
        if let Some(r) = self.resources.get(arn) {
            if r.tags == tags {
                return Ok(false);
            }
            let mut next = Resource::clone(r);
            let old = std::mem::replace(&mut next.tags, tags);
            self.index_tags(&next.arn, Some(&old), Some(&next.tags));
            self.resources.insert(Arc::new(next));
        } else if let Some(p) = self.principals.get(arn) {
            if p.tags == tags {
                return Ok(false);
            }
            let mut next = Principal::clone(p);
            let old = std::mem::replace(&mut next.tags, tags);
            self.index_tags(&next.arn, Some(&old), Some(&next.tags));
            self.principals.insert(next.arn.clone(), Arc::new(next));
        } else {
            return Err(StateError::NoSuchResource(arn.to_string()));
        }
        self.bump();
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Arc<Policy> {
        Arc::new(
            Policy::from_json(
                r#"{"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}}"#,
                crate::policy::PolicyKind::Identity,
            )
            .unwrap(),
        )
    }

    #[test]
    fn a_principal_gives_the_caller_its_arn_parses_to() {
        for arn in [
            "arn:aws:iam::111122223333:user/alice",
            "arn:aws:iam::111122223333:user/division/team/richard-roe",
            "arn:aws:iam::111122223333:role/Dev",
            "arn:aws:iam::111122223333:role/service-role/path/Build",
            "arn:aws-cn:iam::444455556666:role/China",
            "arn:aws-us-gov:iam::444455556666:user/gov",
        ] {
            let p = Principal::new(arn).unwrap();
            assert_eq!(p.caller(), Caller::parse(arn).unwrap(), "{arn}");
        }
    }

    #[test]
    fn revisions_move_only_on_change() {
        let mut s = State::default();
        s.put_policy("P", policy()).unwrap();
        assert_eq!(s.revision(), 1);
        let before = s.clone();
        assert_eq!(s.delete_policy("Q"), Err(StateError::NoSuchPolicy("Q".into())));
        assert_eq!(s.revision(), 1);
        s.put_principal(Principal::new("arn:aws:iam::111122223333:role/team/Dev").unwrap()).unwrap();
        assert!(s.role_by_name("111122223333", "Dev").is_some());
        let tags = TagSet::from_tags(true, [("team", "qa")]).unwrap();
        assert!(s.replace_tags("arn:aws:iam::111122223333:role/team/Dev", tags.clone()).unwrap());
        assert!(!s.replace_tags("arn:aws:iam::111122223333:role/team/Dev", tags).unwrap());
        assert_eq!(s.revision(), 3);
        assert_eq!(before.revision(), 1, "an earlier state is untouched");
        assert!(before.principal("arn:aws:iam::111122223333:role/team/Dev").is_none());
    }

    #[test]
    fn managed_policies_resolve_on_every_change() {
        let mut s = State::default();
        let mut p = Principal::new("arn:aws:iam::111122223333:user/ann").unwrap();
        p.managed = vec!["A".into(), "B".into()];
        s.put_principal(p).unwrap();
        let names = |s: &State| -> Vec<String> {
            s.principal("arn:aws:iam::111122223333:user/ann").unwrap().resolved().iter().map(|(n, _)| n.to_string()).collect()
        };
        assert!(names(&s).is_empty());
        s.put_policy("B", policy()).unwrap();
        assert_eq!(names(&s), ["B"]);
        s.put_policy("A", policy()).unwrap();
        assert_eq!(names(&s), ["A", "B"]);
        s.delete_policy("B").unwrap();
        assert_eq!(names(&s), ["A"]);
        let mut p = Principal::new("arn:aws:iam::111122223333:user/ann").unwrap();
        p.managed = vec!["B".into()];
        s.put_principal(p).unwrap();
        s.put_policy("A", policy()).unwrap();
        assert!(names(&s).is_empty(), "ann no longer attaches A");
        s.put_policy("B", policy()).unwrap();
        assert_eq!(names(&s), ["B"]);
        s.delete_principal("arn:aws:iam::111122223333:user/ann").unwrap();
        s.put_policy("B", policy()).unwrap();
        assert!(s.principal("arn:aws:iam::111122223333:user/ann").is_none());
    }

    #[test]
    fn the_tag_index_follows_every_change() {
        let mut s = State::default();
        let mut builder = crate::world::ResourceBuilder::default();
        for (i, project) in ["Alpha", "Beta", "Alpha", "Gamma"].iter().enumerate() {
            let spec: crate::world::ResourceSpec = serde_json::from_value(serde_json::json!({
                "arn": format!("arn:aws:kms:us-east-1:111122223333:key/k{i}"), "tags": {"Project": project, "Team": "t"}}))
            .unwrap();
            s.put_resource(builder.build("r", &spec).unwrap()).unwrap();
        }
        let find = |s: &State, f: &[(&str, &[&str])], after: Option<&str>, limit| {
            let filters: Vec<(String, Vec<String>)> =
                f.iter().map(|(k, v)| (k.to_string(), v.iter().map(|x| x.to_string()).collect())).collect();
            let (arns, more) = s.find_by_tags(&filters, after, limit);
            (arns.iter().map(|a| a.rsplit('/').next().unwrap().to_string()).collect::<Vec<_>>(), more)
        };
        assert_eq!(find(&s, &[("Project", &["Alpha"])], None, 10), (vec!["k0".into(), "k2".into()], false));
        assert_eq!(find(&s, &[("Project", &["Alpha", "Alpha"])], None, 10).0, vec!["k0", "k2"], "a repeated value lists once");
        assert_eq!(find(&s, &[("Project", &[])], None, 3), (vec!["k0".into(), "k1".into(), "k2".into()], true));
        assert_eq!(
            find(&s, &[("Project", &[])], Some("arn:aws:kms:us-east-1:111122223333:key/k2"), 3),
            (vec!["k3".into()], false)
        );
        assert_eq!(
            find(&s, &[("Team", &[]), ("Project", &["Beta", "Gamma"])], None, 10),
            (vec!["k1".into(), "k3".into()], false)
        );
        let k0 = "arn:aws:kms:us-east-1:111122223333:key/k0";
        s.replace_tags(k0, TagSet::from_tags(false, [("Project", "Beta")]).unwrap()).unwrap();
        assert_eq!(find(&s, &[("Project", &["Beta"])], None, 10).0, vec!["k0", "k1"]);
        assert_eq!(find(&s, &[("Team", &[])], None, 10).0, vec!["k1", "k2", "k3"]);
        s.delete_resource(k0).unwrap();
        assert_eq!(find(&s, &[("Project", &["Beta"])], None, 10).0, vec!["k1"]);
        assert_eq!(find(&s, &[("project", &[])], None, 10).0, Vec::<String>::new(), "keys are exact");
    }

    #[test]
    fn a_bulk_build_indexes_tags_as_one_at_a_time_does_on_one_thread_or_two() {
        // 700 entities build the index on one thread; 9,000 on two
        // (`PARALLEL_INDEX_FROM`).
        const { assert!(700 < PARALLEL_INDEX_FROM && PARALLEL_INDEX_FROM <= 9_000) };
        // In ARN order (a snapshot's: no sort) or not (a world file's), with
        // tagged principals whose ARNs fall between the resources'.
        for (count, in_order) in [(700, false), (700, true), (9_000, false), (9_000, true)] {
            let mut specs: Vec<crate::world::ResourceSpec> = (0..count)
                .map(|i| {
                    let region = ["us-east-1", "eu-west-1", "ap-south-1"][i % 3];
                    let mut tags = serde_json::json!({"Project": format!("p{}", i % 7), "Team": "t"});
                    if i % 5 == 0 {
                        tags = serde_json::json!({"Owner": format!("o{}", i % 2)});
                    }
                    serde_json::from_value(
                        serde_json::json!({"arn": format!("arn:aws:kms:{region}:111122223333:key/k{:05}", (i * 7_919) % 10_007), "tags": tags}),
                    )
                    .unwrap()
                })
                .chain([serde_json::from_value(serde_json::json!({
                    "arn": "arn:aws:dynamodb:us-east-1:111122223333:table/t", "tags": {"Project": "p1"}}))
                .unwrap()])
                .collect();
            if in_order {
                specs.sort_by(|a, b| a.arn.cmp(&b.arn));
            }
            let build = |s: &mut State| {
                for name in ["b", "a", "c"] {
                    let mut role = Principal::new(&format!("arn:aws:iam::111122223333:role/{name}")).unwrap();
                    role.tags = TagSet::from_tags(true, [("Project", "p1")]).unwrap();
                    s.put_principal(role).unwrap();
                }
                // Two builders, as a restore's two threads: each has its
                // own copy of a tag, and both copies index as one tag.
                let mut builders = [crate::world::ResourceBuilder::default(), crate::world::ResourceBuilder::default()];
                for (i, spec) in specs.iter().enumerate() {
                    s.put_resource(builders[(i / 32) % 2].build("r", spec).unwrap()).unwrap();
                }
            };
            // A resource put again with other tags: the later one stays.
            let again: crate::world::ResourceSpec =
                serde_json::from_value(serde_json::json!({"arn": specs[1].arn, "tags": {"Project": "p8", "Other": "x"}}))
                    .unwrap();
            let put_again = |s: &mut State| {
                s.put_resource(crate::world::ResourceBuilder::default().build("r", &again).unwrap()).unwrap();
            };
            let mut one_by_one = State::default();
            build(&mut one_by_one);
            put_again(&mut one_by_one);
            let mut bulk = State::default();
            bulk.bulk(|s| {
                build(s);
                // A replacement inside the build completes the index first.
                put_again(s);
                let arn = format!("arn:aws:kms:us-east-1:111122223333:key/k{:05}", 0);
                s.replace_tags(&arn, TagSet::from_tags(false, [("Project", "p9")]).unwrap()).unwrap();
            });
            one_by_one
                .replace_tags(
                    "arn:aws:kms:us-east-1:111122223333:key/k00000",
                    TagSet::from_tags(false, [("Project", "p9")]).unwrap(),
                )
                .unwrap();
            assert_eq!(bulk.tag_count(), one_by_one.tag_count());
            let filters: Vec<Vec<(String, Vec<String>)>> = vec![
                vec![("Project".into(), vec![])],
                vec![("Project".into(), vec!["p3".into(), "p9".into()])],
                vec![("Team".into(), vec![]), ("Project".into(), vec!["p1".into()])],
                vec![("Owner".into(), vec!["o1".into()])],
                vec![("Other".into(), vec![])],
                vec![("Project".into(), vec!["p8".into()])],
            ];
            for f in &filters {
                let mut after: Option<Arc<str>> = None;
                loop {
                    let a = bulk.find_by_tags(f, after.as_deref(), 37);
                    assert_eq!(a, one_by_one.find_by_tags(f, after.as_deref(), 37), "{f:?} after {after:?}");
                    if !a.1 {
                        break;
                    }
                    after = a.0.last().cloned();
                }
            }
            // Both go on changing alike.
            let mut fresh = State::default();
            fresh.bulk(build);
            fresh.delete_resource("arn:aws:kms:us-east-1:111122223333:key/k00000").unwrap();
            one_by_one.delete_resource("arn:aws:kms:us-east-1:111122223333:key/k00000").unwrap();
            assert_eq!(fresh.find_by_tags(&filters[0], None, 1_000), one_by_one.find_by_tags(&filters[0], None, 1_000));
        }
    }

    #[test]
    fn one_arn_names_one_thing() {
        let mut s = State::default();
        s.put_principal(Principal::new("arn:aws:iam::111122223333:role/Dev").unwrap()).unwrap();
        assert!(s.put_principal(Principal::new("arn:aws:iam::111122223333:role/other/Dev").unwrap()).is_err());
        assert!(Principal::new("arn:aws:sts::111122223333:assumed-role/Dev/s").is_err());
    }
}
