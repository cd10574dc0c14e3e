//! The decision: a request evaluated against one immutable [`State`].
//!
//! Order of evaluation (docs/semantics.md, "Evaluating a request"): collect the
//! principal's identity policies and the resource's key or resource policy;
//! find the statements that apply; any applicable `Deny` denies; a KMS key is
//! allowed only through its key policy (directly, or by delegating to IAM
//! through the account root, in which case an identity policy must allow
//! too); other resources in the caller's account are allowed by either side;
//! cross-account requests need both sides. Nothing allowed: implicit deny.
//!
//! The wider chain ("The whole chain") is a set of guards around that core,
//! each its own function called from `Eval::decide` (private): the SCPs of the
//! caller's account and the RCPs of the resource's, the permissions
//! boundary, the session policies of a declared session and the policy of
//! the VPC endpoint the request came through. Their denies deny; the SCPs,
//! the boundary, the session policies and the endpoint policy must also
//! allow. A request that meets none of them checks a few emptinesses and
//! evaluates as before. Role trust policies take the key policy's place
//! for `sts:AssumeRole` and its twins; `sts:GetCallerIdentity` is always
//! allowed.
//!
//! Evaluation is pure and synchronous and touches no JSON. It allocates only
//! for the lists in the answer.

use std::borrow::Cow;
use std::cell::{Cell, OnceCell, RefCell};
use std::fmt;
use std::sync::Arc;

use smallvec::SmallVec;
use smol_str::SmolStr;
use thiserror::Error;

use crate::arn::{Arn, ArnError, Caller, CallerKind};
use crate::chain::{is_service_linked_role, rcp_covers, Endpoint, OrgAccount, Session, TRUST_ACTIONS};
use crate::path::FieldPath;
use crate::policy::condition::{parse_date, ArnParts, Context, Values};
use crate::policy::keys::KeyRef;
use crate::policy::pattern::{same_bytes, Resolve};
use crate::policy::{ActionKey, Effect, Policy, PolicyKind, PrincipalEntry, Statement};
use crate::state::{is_kms_key, KeyManager, Principal, State, Target};
use crate::tags::keys_equal_ignoring_case;

/// A context value: one string or a list (a multivalued key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextValue {
    One(String),
    Many(Vec<String>),
}

/// "May `principal` do `action` on `resource`?"
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// A user, role, assumed-role session or account-root ARN.
    pub principal: String,
    /// `service:Action`.
    pub action: String,
    /// An ARN, or `*` for actions without a resource.
    pub resource: String,
    /// `aws:RequestTag/K`.
    pub request_tags: Vec<(String, String)>,
    /// `aws:TagKeys`; `None` means absent (not an empty list).
    pub tag_keys: Option<Vec<String>>,
    /// Session tags: override the session's role's tags with the same key.
    /// Only an assumed-role session may have them.
    pub session_tags: Vec<(String, String)>,
    /// Any other condition key, by name.
    pub context: Vec<(String, ContextValue)>,
}

impl Request {
    /// Sets `aws:TagKeys` from the request tags when it was not given.
    pub fn derive_tag_keys(&mut self) {
        if self.tag_keys.is_none() {
            self.tag_keys = Some(self.request_tags.iter().map(|(k, _)| k.clone()).collect());
        }
    }

    /// Checks the request's shape; every error names the field. The context
    /// is checked with [`ContextRules::TRUSTED`] (the clock keys allowed):
    /// the in-process caller owns the clock. A server checks what its
    /// callers send with [`Request::validate_with`].
    pub fn validate(&self) -> Result<Caller<'_>, RequestError> {
        self.validate_with(&ContextRules::TRUSTED)
    }

    /// Checks the request's shape, and its context against `rules`.
    pub fn validate_with(&self, rules: &ContextRules) -> Result<Caller<'_>, RequestError> {
        self.checked(rules, None).map(|(caller, _)| caller)
    }

    /// [`Request::validate_with`], also giving the resource ARN split (the
    /// decision reuses the split it checked: `None` for `*`). `known` is
    /// the caller of the principal the state holds under this request's
    /// principal ARN, if any: what parsing that ARN gives, already parsed.
    fn checked<'s>(
        &'s self,
        rules: &ContextRules,
        known: Option<Caller<'s>>,
    ) -> Result<(Caller<'s>, Option<ArnParts<'s>>), RequestError> {
        let caller = match known {
            Some(caller) => caller,
            None => Caller::parse(&self.principal).map_err(|e| RequestError::new("principal", e.to_string()))?,
        };
        let action = self.action.as_bytes();
        let well_formed_action = match action.iter().position(|&b| b == b':') {
            Some(colon) => colon > 0 && colon + 1 < action.len() && !action.iter().any(|&b| matches!(b, b'*' | b'?' | b' ')),
            None => false,
        };
        if !well_formed_action {
            return Err(RequestError::new("action", format!("{:?} is not an action: expected service:Action", self.action)));
        }
        let parts = if self.resource == "*" {
            None
        } else {
            match ArnParts::split(&self.resource).filter(ArnParts::is_arn) {
                Some(parts) => Some(parts),
                None => return Err(RequestError::new("resource", ArnError::Malformed(self.resource.clone()).to_string())),
            }
        };
        check_session_tags(&caller, &self.session_tags)?;
        rules.check(&self.context)?;
        Ok((caller, parts))
    }
}

/// What a caller may put in a request's context, beyond the keys Tagward
/// fills in itself (which no caller may supply, whatever the rules).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextRules {
    /// Whether `aws:CurrentTime` and `aws:EpochTime` may override the clock.
    /// A caller that may set them chooses the time that `DateLessThan` and
    /// friends see, so a sidecar refuses them unless told otherwise.
    pub clock_override: bool,
    /// When set, the only other context keys a caller may supply, as
    /// lowercased names (key names are case-insensitive).
    pub allowed: Option<std::collections::BTreeSet<Box<str>>>,
}

/// A key that may not be on a context-key allow-list.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AllowListError {
    #[error(transparent)]
    Key(#[from] crate::policy::keys::KeyError),
    #[error("{0:?} is a clock key: whether callers may set it is --allow-clock-override's business, not the list's")]
    Clock(String),
    #[error("{0:?} is filled in by Tagward from its own state; no caller may supply it")]
    FilledIn(String),
}

impl ContextRules {
    /// For a caller that owns the clock (the in-process runner, `tagward
    /// test`, a library user): the clock keys allowed, every other key too.
    pub const TRUSTED: ContextRules = ContextRules { clock_override: true, allowed: None };

    /// A sidecar's default: the clock keys refused, every other key allowed.
    pub const SERVER: ContextRules = ContextRules { clock_override: false, allowed: None };

    /// The allow-list of [`ContextRules::allowed`] from key names (however
    /// a file spelled them). Every name is checked like a condition key; a
    /// key Tagward fills in, or a clock key (governed by
    /// [`ContextRules::clock_override`] alone), is refused, naming it.
    pub fn allow_list<'a>(
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<std::collections::BTreeSet<Box<str>>, AllowListError> {
        let mut out = std::collections::BTreeSet::new();
        for name in names {
            match KeyRef::parse(name).map_err(AllowListError::Key)? {
                KeyRef::Context(lower) => {
                    out.insert(Box::from(lower.as_str()));
                }
                key if key.org_key_name().is_some() => {
                    out.insert(key.org_key_name().unwrap_or_default().into());
                }
                key if key.is_clock() => return Err(AllowListError::Clock(name.to_string())),
                _ => return Err(AllowListError::FilledIn(name.to_string())),
            }
        }
        Ok(out)
    }

    /// Checks every key of a request's context; the error names the key.
    pub fn check(&self, context: &[(String, ContextValue)]) -> Result<(), RequestError> {
        for (name, _) in context {
            let field = || FieldPath::field("context").key(name.as_str());
            let key = KeyRef::parse(name).map_err(|e| RequestError::new(field(), e.to_string()))?;
            match &key {
                k if k.is_clock() && !self.clock_override => {
                    return Err(RequestError::new(
                        field(),
                        "the clock keys are Tagward's own: a caller may not choose the time its conditions see (a sidecar started with --allow-clock-override accepts them, for tests)",
                    ));
                }
                k if k.is_clock() => {}
                KeyRef::Context(_)
                | KeyRef::PrincipalOrgId
                | KeyRef::PrincipalOrgPaths
                | KeyRef::ResourceOrgId
                | KeyRef::ResourceOrgPaths => {
                    let lower = match &key {
                        KeyRef::Context(lower) => &**lower,
                        other => other.org_key_name().unwrap_or_default(),
                    };
                    if let Some(allowed) = &self.allowed {
                        if !allowed.contains(lower) {
                            return Err(RequestError::new(
                                field(),
                                "this key is not on the sidecar's list of context keys callers may supply (--context-keys)",
                            ));
                        }
                    }
                }
                _ => {
                    return Err(RequestError::new(
                        field(),
                        "this key is filled in by Tagward from its own state; give request tags, tag keys or session tags in their own fields",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Session tags exist only on assumed-role sessions: on any other principal
/// they would let the caller rewrite its own `aws:PrincipalTag`.
pub fn check_session_tags(caller: &Caller<'_>, session_tags: &[(String, String)]) -> Result<(), RequestError> {
    if session_tags.is_empty() || matches!(caller.kind, CallerKind::Session { .. }) {
        return Ok(());
    }
    Err(RequestError::new(
        "session_tags",
        format!(
            "{} is not an assumed-role session (arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION); only sessions have session tags",
            caller.arn
        ),
    ))
}

/// A request that cannot be evaluated: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {reason}")]
pub struct RequestError {
    pub field: FieldPath,
    pub reason: String,
}

impl RequestError {
    pub fn new(field: impl Into<FieldPath>, reason: impl Into<String>) -> RequestError {
        RequestError { field: field.into(), reason: reason.into() }
    }
}

/// Why the answer is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Allowed,
    ExplicitDeny,
    ImplicitDeny,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "Allowed",
            Reason::ExplicitDeny => "ExplicitDeny",
            Reason::ImplicitDeny => "ImplicitDeny",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which policy a statement belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyRef {
    Managed(Arc<str>),
    Inline(Arc<str>),
    KeyPolicy,
    ResourcePolicy,
    /// A service control policy of the organization, by name.
    Scp(Arc<str>),
    /// A resource control policy of the organization, by name.
    Rcp(Arc<str>),
    /// The principal's permissions boundary (a managed policy), by name.
    Boundary(Arc<str>),
    /// A declared session's inline session policy.
    SessionPolicy,
    /// A declared session's managed session policy, by name.
    SessionManaged(Arc<str>),
    /// The policy of a VPC endpoint, by endpoint id.
    EndpointPolicy(Arc<str>),
    /// A role's trust policy.
    TrustPolicy,
    /// A KMS grant, by id.
    Grant(Arc<str>),
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyRef::Managed(name) => write!(f, "{name}"),
            PolicyRef::Inline(name) => write!(f, "inline:{name}"),
            PolicyRef::KeyPolicy => f.write_str("key-policy"),
            PolicyRef::ResourcePolicy => f.write_str("resource-policy"),
            PolicyRef::Scp(name) => write!(f, "scp:{name}"),
            PolicyRef::Rcp(name) => write!(f, "rcp:{name}"),
            PolicyRef::Boundary(name) => write!(f, "boundary:{name}"),
            PolicyRef::SessionPolicy => f.write_str("session-policy"),
            PolicyRef::SessionManaged(name) => write!(f, "session-policy:{name}"),
            PolicyRef::EndpointPolicy(id) => write!(f, "endpoint-policy:{id}"),
            PolicyRef::TrustPolicy => f.write_str("trust-policy"),
            PolicyRef::Grant(id) => write!(f, "grant:{id}"),
        }
    }
}

/// A statement named in an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementRef {
    pub policy: PolicyRef,
    pub index: usize,
    pub sid: Option<Arc<str>>,
    pub effect: Effect,
}

impl fmt::Display for StatementRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let PolicyRef::Grant(_) = self.policy {
            return write!(f, "{}", self.policy);
        }
        write!(f, "{}[{}]", self.policy, self.index)?;
        if let Some(sid) = &self.sid {
            write!(f, " {sid:?}")?;
        }
        Ok(())
    }
}

/// What became of one statement the engine looked at (explain mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applies,
    ActionDoesNotMatch,
    PrincipalDoesNotMatch,
    ResourceDoesNotMatch,
    ConditionFailed { operator: Arc<str>, key: Arc<str> },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Applies => f.write_str("applies"),
            Outcome::ActionDoesNotMatch => f.write_str("action does not match"),
            Outcome::PrincipalDoesNotMatch => f.write_str("principal does not match"),
            Outcome::ResourceDoesNotMatch => f.write_str("resource does not match"),
            Outcome::ConditionFailed { operator, key } => write!(f, "condition {operator} on {key} does not hold"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Considered {
    pub statement: StatementRef,
    pub outcome: Outcome,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// The statements that decided: every applicable `Deny` for an explicit
    /// deny, every applicable `Allow` for an allow, none otherwise.
    pub matched: Vec<StatementRef>,
    /// Condition keys that evaluated conditions looked for and the request
    /// did not have.
    pub missing_keys: Vec<Arc<str>>,
    /// With explain: every statement looked at, and what became of it.
    pub considered: Option<Vec<Considered>>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.reason == Reason::Allowed
    }
}

/// Actions that do not act on an existing resource: `aws:ResourceTag` is not
/// available to them (lowercased).
const NO_EXISTING_RESOURCE: &[&str] = &["kms:createkey", "kms:listkeys", "kms:listaliases"];

/// How a key or resource policy statement's principal matched the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Grant {
    /// Through the caller's account: delegates to the caller's IAM policies.
    Account,
    /// The role of the calling session, named by its role ARN: as far as a
    /// boundary or a session policy goes, like the role's own policies.
    ViaRole,
    /// The caller itself (or `*`).
    Direct,
}

/// How a policy's statements count: the core (identity, resource, key or
/// trust policy) collects its allows; a guard (SCP, RCP, boundary,
/// session, endpoint) only says whether one of its allows applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Core,
    Guard,
}

/// What the action index already says about a candidate statement's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActionHit {
    /// One of its exact patterns is the action.
    Known,
    /// None of its exact patterns is the action (a [`crate::policy::PolicySet`] candidate
    /// that is not an exact hit): only its wildcard patterns may cover it.
    NotExact,
    /// Nothing known: every pattern is tried.
    Unknown,
}

/// Why a statement did not apply, as [`Eval::check`] finds it: an
/// [`Outcome`] without its names, which only explain mode builds (a
/// decision that is not explained copies no operator or key name).
#[derive(Debug, Clone, Copy)]
enum Miss<'s> {
    Action,
    Principal,
    Resource,
    Condition(&'s crate::policy::condition::Condition),
}

impl Miss<'_> {
    fn outcome(self) -> Outcome {
        match self {
            Miss::Action => Outcome::ActionDoesNotMatch,
            Miss::Principal => Outcome::PrincipalDoesNotMatch,
            Miss::Resource => Outcome::ResourceDoesNotMatch,
            Miss::Condition(cond) => Outcome::ConditionFailed { operator: cond.operator.clone(), key: cond.key_name.clone() },
        }
    }
}

/// What the guards of the chain allow; `true` where a guard does not apply.
struct Guards {
    scp: bool,
    boundary: bool,
    session: bool,
    endpoint: bool,
}

struct Eval<'a> {
    state: &'a State,
    req: &'a Request,
    /// The resource decided on: the request's, or the key an alias ARN in
    /// the request points to.
    resource: &'a str,
    /// `kms:RequestAlias`: the alias (`alias/NAME`) a key operation named
    /// its key by.
    request_alias: Option<&'a str>,
    caller: Caller<'a>,
    principal: Option<&'a Principal>,
    target: Option<Target<'a>>,
    /// The request's resource ARN, split once for every statement.
    resource_parts: Option<ArnParts<'a>>,
    resource_account: Option<&'a str>,
    resource_tags_available: bool,
    /// The action is a `kms:` action: AWS KMS sets its own condition keys
    /// (`kms:CallerAccount`, `kms:KeySpec`, ...) only on KMS requests.
    kms_action: bool,
    in_key_policy: Cell<bool>,
    /// `sts:AssumeRole` (or a twin) on a role: its trust policy decides.
    trust: bool,
    /// The declared session the caller is, if any.
    session: Option<&'a Session>,
    /// The VPC endpoint named by `aws:SourceVpce`, if listed.
    endpoint: Option<&'a Endpoint>,
    /// The organization's view of the caller's and the resource's account.
    principal_org: Option<&'a OrgAccount>,
    resource_org: Option<&'a OrgAccount>,
    org_id: Option<&'a str>,
    /// Set while a resource-style policy of a principal with a boundary is
    /// evaluated: a `Deny` with `NotPrincipal` then applies to it whatever
    /// the element lists (AWS, "Permissions boundaries for IAM entities").
    deny_not_principal: Cell<bool>,
    time: OnceCell<(String, String)>,
    /// Policy variables that had no value (and no default).
    missing_variables: RefCell<SmallVec<[Arc<str>; 2]>>,
    /// Tag values this request already looked up: the same few keys come
    /// up statement after statement (a key and a variable in each).
    tag_memo: RefCell<SmallVec<[Remembered<'a>; TAG_MEMO]>>,
}

/// One looked-up tag: whose, its key as the condition names it, its value.
type Remembered<'a> = (TagSide, SmolStr, Option<&'a str>);

/// How many looked-up tags a request remembers; past that it looks again.
const TAG_MEMO: usize = 4;

/// Whose tag a remembered lookup was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagSide {
    Resource,
    Principal,
}

/// Decides `req` against `state`. `explain` adds every statement looked at.
/// The request's context is checked with [`ContextRules::TRUSTED`]; see
/// [`authorize_with`].
pub fn authorize(state: &State, req: &Request, explain: bool) -> Result<Decision, RequestError> {
    authorize_with(state, req, explain, &ContextRules::TRUSTED)
}

/// Decides `req` against `state`, its context checked against `rules` (what
/// a server's callers may supply).
pub fn authorize_with(state: &State, req: &Request, explain: bool, rules: &ContextRules) -> Result<Decision, RequestError> {
    authorize_noting_clock(state, req, explain, rules).map(|(d, _)| d)
}

/// As [`authorize_with`], and says whether the decision read the time
/// (`aws:CurrentTime`, `aws:EpochTime`, given or from the clock). A decision
/// that did not is a function of the state and the request alone: the same
/// request against the same state gets the same answer at any moment, which
/// is what lets a server remember it (see the sidecar's decision cache).
pub fn authorize_noting_clock(
    state: &State,
    req: &Request,
    explain: bool,
    rules: &ContextRules,
) -> Result<(Decision, bool), RequestError> {
    // A user or role the state holds is found by the request's principal
    // ARN as it stands, and its ARN needs no parsing: the principal kept
    // what parsing it gave. Any other ARN is parsed (and checked) here.
    let known = state.principal(&req.principal).map(|p| &**p);
    let (caller, request_parts) = req.checked(rules, known.map(Principal::caller))?;
    let principal = match caller.kind {
        // Looked up above by the same text (`caller.arn` is the request's).
        CallerKind::User { .. } | CallerKind::Role { .. } => known,
        CallerKind::Session { role, .. } => state.role_by_name(caller.account, role).map(|p| &**p),
        CallerKind::Root => None,
    };
    let mut action_buf: SmallVec<[u8; 64]> = SmallVec::from_slice(req.action.as_bytes());
    action_buf.make_ascii_lowercase();
    let action_lower = std::str::from_utf8(&action_buf).unwrap_or(&req.action);
    let (resource, request_alias) = resolve_alias(state, &req.resource, action_lower);
    let target = if resource == "*" { None } else { state.target(resource) };
    // The request's split, unless an alias put another ARN in its place.
    let resource_parts = if std::ptr::eq(resource, req.resource.as_str()) { request_parts } else { ArnParts::split(resource) };
    let arn_account = || resource_parts.map(|p| p.account()).filter(|a| !a.is_empty());
    let resource_account = match target {
        // As `Resource::account`: the override, else the ARN's.
        Some(Target::Resource(r)) => r.account_override.as_deref().or_else(arn_account),
        Some(Target::Principal(p)) => Some(&**p.account()),
        // As `Arn::parse`: only a well-formed ARN has an account.
        None => resource_parts.filter(ArnParts::is_arn).map(|p| p.account()).filter(|a| !a.is_empty()),
    };
    let trust = action_lower.starts_with("sts:")
        && TRUST_ACTIONS.contains(&action_lower)
        && Arn::parse(&req.resource).is_some_and(|a| a.service == "iam" && a.resource_type() == "role");
    let session = if state.has_sessions() && matches!(caller.kind, CallerKind::Session { .. }) {
        state.session(caller.arn).map(|s| &**s)
    } else {
        None
    };
    let endpoint = if state.has_endpoints() { source_vpce(req).and_then(|id| state.endpoint(id)).map(|e| &**e) } else { None };
    let (principal_org, resource_org, org_id) = match state.organization() {
        Some(org) => (org.account(caller.account), resource_account.and_then(|a| org.account(a)), org.id.as_deref()),
        None => (None, None, None),
    };
    let ev = Eval {
        state,
        req,
        resource,
        request_alias,
        caller,
        principal,
        target,
        resource_parts,
        resource_account,
        resource_tags_available: resource != "*" && !NO_EXISTING_RESOURCE.contains(&action_lower),
        kms_action: action_lower.starts_with("kms:"),
        in_key_policy: Cell::new(false),
        trust,
        session,
        endpoint,
        principal_org,
        resource_org,
        org_id,
        deny_not_principal: Cell::new(false),
        time: OnceCell::new(),
        missing_variables: RefCell::new(SmallVec::new()),
        tag_memo: RefCell::new(SmallVec::new()),
    };
    let decision = ev.decide(&ActionKey::new(action_lower), explain);
    Ok((decision, ev.time.get().is_some()))
}

/// The alias operations, which act on the alias itself (lowercased).
const ALIAS_OPERATIONS: &[&str] = &["kms:createalias", "kms:updatealias", "kms:deletealias", "kms:listaliases"];

/// A key operation on an alias ARN is decided on the key the alias points
/// to, with `kms:RequestAlias` set; an unknown alias is decided as a key
/// that does not exist. Other requests are decided on their resource.
fn resolve_alias<'a>(state: &'a State, resource: &'a str, action_lower: &str) -> (&'a str, Option<&'a str>) {
    // Cheap test first: most resources are no alias.
    if !resource.contains(":alias/") || ALIAS_OPERATIONS.contains(&action_lower) {
        return (resource, None);
    }
    let Some(name) = crate::kms::alias_of_arn(resource) else { return (resource, None) };
    match state.alias_target(resource) {
        Some(key) => (key, Some(name)),
        None => (resource, Some(name)),
    }
}

struct Collector {
    denies: SmallVec<[StatementRef; 2]>,
    identity_allows: SmallVec<[StatementRef; 4]>,
    resource_allows: SmallVec<[(StatementRef, Grant); 4]>,
    missing: SmallVec<[Arc<str>; 4]>,
    considered: Option<Vec<Considered>>,
}

impl<'a> Eval<'a> {
    fn decide(&self, action: &ActionKey<'_>, explain: bool) -> Decision {
        // AWS: no permissions are required for GetCallerIdentity, and an
        // explicit deny of it has no effect.
        if action.lower == "sts:getcalleridentity" {
            return Decision {
                reason: Reason::Allowed,
                matched: Vec::new(),
                missing_keys: Vec::new(),
                considered: explain.then(Vec::new),
            };
        }
        let mut c = Collector {
            denies: SmallVec::new(),
            identity_allows: SmallVec::new(),
            resource_allows: SmallVec::new(),
            missing: SmallVec::new(),
            considered: explain.then(Vec::new),
        };
        if let Some(p) = self.principal {
            // Managed then inline policies, one action lookup for all.
            let set = p.identity_policies();
            for cand in set.candidates(action) {
                let Some((name, _, inline)) = set.policy(cand.member.policy()) else { continue };
                let name = || if inline { PolicyRef::Inline(name.clone()) } else { PolicyRef::Managed(name.clone()) };
                let hit = if cand.covers { ActionHit::Known } else { ActionHit::NotExact };
                self.run_statement(cand.statement, cand.kind, hit, name, action, &mut c, Layer::Core);
            }
        }
        let is_key = match self.target {
            Some(t) => t.key().is_some(),
            None => self.request_alias.is_some() || is_kms_key(self.resource),
        };
        // The key policy or a trust policy must allow; other resource
        // policies may.
        let mandatory = is_key || self.trust;
        let boundary = self.principal.and_then(|p| p.boundary.as_ref());
        self.deny_not_principal.set(boundary.is_some());
        if self.trust {
            if let Some(policy) = self.trust_policy() {
                self.run_policy(policy, || PolicyRef::TrustPolicy, action, &mut c, Layer::Core);
            }
        } else if let Some(policy) = self.target.and_then(|t| t.policy()) {
            self.in_key_policy.set(is_key);
            let which = if is_key { PolicyRef::KeyPolicy } else { PolicyRef::ResourcePolicy };
            self.run_policy(policy, || which.clone(), action, &mut c, Layer::Core);
            self.in_key_policy.set(false);
        }
        self.deny_not_principal.set(false);
        let guards = Guards {
            scp: self.scps(action, &mut c),
            boundary: boundary.is_none_or(|name| self.boundary(name, action, &mut c)),
            session: self.session_policies(action, &mut c),
            endpoint: self.endpoint_policy(action, &mut c),
        };
        self.rcps(action, &mut c);
        let allowed = self.core_allows(&c, mandatory, &guards) && guards.scp && guards.endpoint;

        let mut missing_keys = c.missing.into_vec();
        for name in self.missing_variables.take() {
            if !missing_keys.contains(&name) {
                missing_keys.push(name);
            }
        }
        if !c.denies.is_empty() {
            return Decision {
                reason: Reason::ExplicitDeny,
                matched: c.denies.into_vec(),
                missing_keys,
                considered: c.considered,
            };
        }
        let grants = match self.target.and_then(|t| t.key()) {
            // A grant allows within the organization's and the endpoint's
            // bounds; an account grantee needs an IAM allow, as far as the
            // boundary and session policies let it.
            Some(key) if !key.grants().is_empty() && guards.scp && guards.endpoint => {
                let identity = !c.identity_allows.is_empty() && guards.boundary && guards.session;
                self.grant_allows(key.grants(), action, identity, &mut c.considered)
            }
            _ => SmallVec::new(),
        };
        if !allowed && grants.is_empty() {
            return Decision { reason: Reason::ImplicitDeny, matched: Vec::new(), missing_keys, considered: c.considered };
        }
        if !allowed {
            // Grants alone allowed: statements that applied without
            // allowing (a key policy delegating to IAM) did not decide.
            return Decision { reason: Reason::Allowed, matched: grants.into_vec(), missing_keys, considered: c.considered };
        }
        // One allocation for all three (the identity allows' own, grown
        // for the others, was two in most allowed decisions).
        let mut matched = Vec::with_capacity(c.identity_allows.len() + c.resource_allows.len() + grants.len());
        matched.extend(c.identity_allows);
        matched.extend(c.resource_allows.into_iter().map(|(s, _)| s));
        matched.extend(grants);
        Decision { reason: Reason::Allowed, matched, missing_keys, considered: c.considered }
    }

    /// Do the identity, resource, key or trust policies allow, as far as
    /// the boundary and the session policies let them? Same account: a
    /// resource-policy statement naming the user or the session itself (or
    /// `*`) allows on its own, unbounded (AWS: "The resource-based policy
    /// permissions are not limited by the session policy"); one naming the
    /// role is bounded like the role's own policies; the account root
    /// delegates to IAM. Cross-account: both sides.
    fn core_allows(&self, c: &Collector, mandatory: bool, g: &Guards) -> bool {
        let limits = g.boundary && g.session;
        let identity = !c.identity_allows.is_empty() && limits;
        let (mut unbounded, mut bounded, mut any) = (false, false, false);
        for (_, grant) in &c.resource_allows {
            any = true;
            match grant {
                Grant::Direct if matches!(self.caller.kind, CallerKind::User { .. } | CallerKind::Session { .. }) => {
                    unbounded = true
                }
                Grant::Direct | Grant::ViaRole => bounded = true,
                Grant::Account => {}
            }
        }
        let direct = unbounded || (bounded && limits);
        let same_account = self.resource_account.is_none_or(|a| a == self.caller.account);
        match (mandatory, same_account) {
            (true, true) => direct || (any && identity),
            (false, true) => identity || direct,
            (_, false) => any && identity,
        }
    }

    /// The trust policy of the role named by the request: its principal's,
    /// or the resource policy of a role listed only as a resource.
    fn trust_policy(&self) -> Option<&'a Policy> {
        match self.target? {
            Target::Principal(p) => p.trust_policy.as_deref(),
            t => t.policy().map(|p| &**p),
        }
    }

    /// SCPs of the caller's account: every level of its path must allow.
    /// Not for the management account nor service-linked roles.
    fn scps(&self, action: &ActionKey<'_>, c: &mut Collector) -> bool {
        let Some(account) = self.principal_org.filter(|a| !a.management) else { return true };
        if self.principal.is_some_and(|p| is_service_linked_role(p.arn())) {
            return true;
        }
        let mut allowed = true;
        for level in &account.scp_levels {
            let mut level_allows = false;
            for (name, policy) in level {
                // Every policy runs: its denies count even once one allowed.
                level_allows |= self.run_policy(policy, || PolicyRef::Scp(name.clone()), action, c, Layer::Guard);
            }
            allowed &= level_allows;
        }
        allowed
    }

    /// RCPs of the resource's account: they only deny, and only requests
    /// to the services that support them (not `kms:RetireGrant`); not for
    /// the management account's resources, AWS managed keys or
    /// service-linked roles.
    fn rcps(&self, action: &ActionKey<'_>, c: &mut Collector) {
        let Some(account) = self.resource_org.filter(|a| !a.management && !a.rcps.is_empty()) else { return };
        if !rcp_covers(action.lower)
            || self.target.and_then(|t| t.key()).is_some_and(|k| k.manager == KeyManager::Aws)
            || self.principal.is_some_and(|p| is_service_linked_role(p.arn()))
        {
            return;
        }
        for (name, policy) in &account.rcps {
            self.run_policy(policy, || PolicyRef::Rcp(name.clone()), action, c, Layer::Guard);
        }
    }

    /// The permissions boundary must allow what identity policies allow. A
    /// boundary naming a policy that no longer exists allows nothing.
    fn boundary(&self, name: &Arc<str>, action: &ActionKey<'_>, c: &mut Collector) -> bool {
        match self.state.policy(name) {
            Some(policy) => self.run_policy(policy, || PolicyRef::Boundary(name.clone()), action, c, Layer::Guard),
            None => false,
        }
    }

    /// A declared session's session policies (inline and managed): one of
    /// them must allow too.
    fn session_policies(&self, action: &ActionKey<'_>, c: &mut Collector) -> bool {
        let Some(session) = self.session.filter(|s| s.has_policies()) else { return true };
        let mut allowed = false;
        if let Some(policy) = &session.inline {
            allowed |= self.run_policy(policy, || PolicyRef::SessionPolicy, action, c, Layer::Guard);
        }
        for name in &session.managed {
            if let Some(policy) = self.state.policy(name) {
                allowed |= self.run_policy(policy, || PolicyRef::SessionManaged(name.clone()), action, c, Layer::Guard);
            }
        }
        allowed
    }

    /// The policy of the VPC endpoint the request came through must allow
    /// (no policy: the endpoint allows all).
    fn endpoint_policy(&self, action: &ActionKey<'_>, c: &mut Collector) -> bool {
        let Some(endpoint) = self.endpoint else { return true };
        let Some(policy) = &endpoint.policy else { return true };
        self.run_policy(policy, || PolicyRef::EndpointPolicy(endpoint.id.clone()), action, c, Layer::Guard)
    }

    /// The grants that allow the request (docs/semantics.md, "KMS aliases
    /// and grants"): the grantee is the caller (a role's grant covers its
    /// sessions; an account's grant needs an IAM allow too), the operations
    /// include the action, and the constraint holds for the request's
    /// encryption context (the `kms:EncryptionContext:KEY` context keys,
    /// KEY as written).
    fn grant_allows(
        &self,
        grants: &[crate::kms::Grant],
        action: &ActionKey<'_>,
        identity: bool,
        considered: &mut Option<Vec<Considered>>,
    ) -> SmallVec<[StatementRef; 1]> {
        let mut out = SmallVec::new();
        let op = crate::kms::GrantOps::of_action(action.lower);
        const PREFIX: &str = "kms:encryptioncontext:";
        let context = self.req.context.iter().filter_map(|(k, v)| match v {
            ContextValue::One(v)
                if k.len() > PREFIX.len()
                    && k.is_char_boundary(PREFIX.len())
                    && k[..PREFIX.len()].eq_ignore_ascii_case(PREFIX) =>
            {
                Some((&k[PREFIX.len()..], v.as_str()))
            }
            _ => None,
        });
        for g in grants {
            let grantee = match g.grantee.matches(&self.caller) {
                Some(crate::kms::GranteeMatch::Direct) => true,
                Some(crate::kms::GranteeMatch::Account) => identity,
                None => false,
            };
            let outcome = match op {
                None => Outcome::ActionDoesNotMatch,
                Some(op) if !g.operations.contains(op) => Outcome::ActionDoesNotMatch,
                Some(_) if !grantee => Outcome::PrincipalDoesNotMatch,
                Some(op) if !g.allows(op, context.clone()) => Outcome::ConditionFailed {
                    operator: g.constraint.as_ref().map_or("", |c| c.type_name()).into(),
                    key: "kms:EncryptionContext".into(),
                },
                Some(_) => Outcome::Applies,
            };
            let sref =
                StatementRef { policy: PolicyRef::Grant(g.id.clone()), index: 0, sid: Some(g.id.clone()), effect: Effect::Allow };
            if let Some(list) = considered.as_mut() {
                list.push(Considered { statement: sref.clone(), outcome: outcome.clone() });
            }
            if outcome == Outcome::Applies {
                out.push(sref);
            }
        }
        out
    }

    /// Runs one policy's candidate statements; denies are collected, core
    /// allows too. Returns whether some `Allow` applied.
    fn run_policy(
        &self,
        policy: &Policy,
        name: impl Fn() -> PolicyRef,
        action: &ActionKey<'_>,
        c: &mut Collector,
        layer: Layer,
    ) -> bool {
        let mut allowed = false;
        for &i in policy.candidates(action) {
            if let Some(st) = policy.statements().get(i as usize) {
                allowed |= self.run_statement(st, policy.kind(), ActionHit::Unknown, &name, action, c, layer);
            }
        }
        allowed
    }

    /// Runs one candidate statement; a deny is collected, a core allow too.
    /// Returns whether it is an `Allow` that applied.
    #[allow(clippy::too_many_arguments)]
    fn run_statement(
        &self,
        st: &Statement,
        kind: PolicyKind,
        hit: ActionHit,
        name: impl Fn() -> PolicyRef,
        action: &ActionKey<'_>,
        c: &mut Collector,
        layer: Layer,
    ) -> bool {
        let grant = self.check(st, kind, hit, action, c);
        let applies = grant.is_ok();
        if !applies && c.considered.is_none() {
            return false;
        }
        let sref = StatementRef { policy: name(), index: st.index, sid: st.sid.clone(), effect: st.effect };
        if let Some(list) = c.considered.as_mut() {
            if let Err(miss) = &grant {
                list.push(Considered { statement: sref, outcome: miss.outcome() });
                return false;
            }
            list.push(Considered { statement: sref.clone(), outcome: Outcome::Applies });
        }
        let Ok(grant) = grant else { return false };
        match (st.effect, layer, kind) {
            (Effect::Deny, _, _) => c.denies.push(sref),
            (Effect::Allow, Layer::Guard, _) => {}
            (Effect::Allow, Layer::Core, PolicyKind::Identity) => c.identity_allows.push(sref),
            (Effect::Allow, Layer::Core, _) => c.resource_allows.push((sref, grant)),
        }
        st.effect == Effect::Allow
    }

    /// Does the statement apply? `Ok` with how the principal matched.
    fn check<'s>(
        &self,
        st: &'s Statement,
        kind: PolicyKind,
        hit: ActionHit,
        action: &ActionKey<'_>,
        c: &mut Collector,
    ) -> Result<Grant, Miss<'s>> {
        let covers = match hit {
            ActionHit::Known => true,
            ActionHit::NotExact => st.covers_by_wildcards(action),
            ActionHit::Unknown => st.covers(action),
        };
        if !covers {
            return Err(Miss::Action);
        }
        let grant = match (&st.principal, kind) {
            (Some(p), PolicyKind::Key | PolicyKind::Resource) => {
                if p.negated {
                    let always = st.effect == Effect::Deny && self.deny_not_principal.get();
                    let listed = !always && p.entries.iter().any(|e| self.lists(e));
                    if listed {
                        return Err(Miss::Principal);
                    }
                    Grant::Direct
                } else {
                    p.entries.iter().filter_map(|e| self.grant(e)).max().ok_or(Miss::Principal)?
                }
            }
            _ => Grant::Direct,
        };
        let resource_hit =
            st.resources.patterns.iter().any(|p| p.matches_split(self.resource_parts.as_ref(), self)) != st.resources.negated;
        if !resource_hit {
            return Err(Miss::Resource);
        }
        for cond in &st.conditions {
            let out = cond.evaluate(self);
            if out.missing && !c.missing.contains(&cond.key_name) {
                c.missing.push(cond.key_name.clone());
            }
            if !out.holds {
                return Err(Miss::Condition(cond));
            }
        }
        Ok(grant)
    }

    /// How a `Principal` entry matches the caller.
    fn grant(&self, entry: &PrincipalEntry) -> Option<Grant> {
        let caller = &self.caller;
        match entry {
            PrincipalEntry::Any => Some(Grant::Direct),
            PrincipalEntry::Account(a) if **a == *caller.account => {
                Some(if caller.kind == CallerKind::Root { Grant::Direct } else { Grant::Account })
            }
            PrincipalEntry::Role { .. } if matches!(caller.kind, CallerKind::Session { .. }) => {
                self.lists(entry).then_some(Grant::ViaRole)
            }
            _ => self.lists(entry).then_some(Grant::Direct),
        }
    }

    /// Is the caller itself listed by the entry? (For `NotPrincipal`: an
    /// account entry lists only the account root, not the account's users.)
    fn lists(&self, entry: &PrincipalEntry) -> bool {
        let caller = &self.caller;
        match entry {
            PrincipalEntry::Any => true,
            PrincipalEntry::Account(a) => caller.kind == CallerKind::Root && **a == *caller.account,
            PrincipalEntry::User(arn) | PrincipalEntry::Session(arn) | PrincipalEntry::Other(arn) => **arn == *caller.arn,
            PrincipalEntry::Role { account, name } => {
                **account == *caller.account && caller.role_name().is_some_and(|r| r == &**name)
            }
        }
    }

    fn time(&self) -> &(String, String) {
        self.time.get_or_init(|| {
            let given = |name: &str| {
                self.req.context.iter().find_map(|(k, v)| match v {
                    ContextValue::One(s) if k.eq_ignore_ascii_case(name) => Some(s.as_str()),
                    _ => None,
                })
            };
            let millis = given("aws:CurrentTime")
                .or_else(|| given("aws:EpochTime"))
                .and_then(parse_date)
                .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
            let iso = given("aws:CurrentTime").map(str::to_string).unwrap_or_else(|| {
                chrono::DateTime::from_timestamp_millis(millis)
                    .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_default()
            });
            let epoch = given("aws:EpochTime").map(str::to_string).unwrap_or_else(|| (millis / 1000).to_string());
            (iso, epoch)
        })
    }
}

/// Looks a tag up in an unsorted list: the exact key, else the key equal
/// ignoring case that sorts first in byte order.
fn lookup_unsorted<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    if let Some((_, v)) = pairs.iter().find(|(k, _)| k == key) {
        return Some(v);
    }
    pairs.iter().filter(|(k, _)| keys_equal_ignoring_case(k, key)).min_by(|a, b| a.0.cmp(&b.0)).map(|(_, v)| v.as_str())
}

impl Context for Eval<'_> {
    fn values(&self, key: &KeyRef) -> Values<'_> {
        fn one(v: Option<&str>) -> Values<'_> {
            match v {
                Some(v) => Values::One(Cow::Borrowed(v)),
                None => Values::Missing,
            }
        }
        match key {
            KeyRef::ResourceTag(k) => {
                if !self.resource_tags_available || self.in_key_policy.get() {
                    return Values::Missing;
                }
                one(self.remembered(TagSide::Resource, k, || self.target.and_then(|t| t.tags().lookup(k))))
            }
            KeyRef::RequestTag(k) => one(lookup_unsorted(&self.req.request_tags, k)),
            KeyRef::PrincipalTag(k) => one(self.remembered(TagSide::Principal, k, || {
                lookup_unsorted(&self.req.session_tags, k)
                    .or_else(|| self.session.and_then(|s| s.tags.lookup(k)))
                    .or_else(|| self.principal.and_then(|p| p.tags.lookup(k)))
            })),
            KeyRef::TagKeys => match &self.req.tag_keys {
                Some(list) => Values::Many(list),
                None => Values::Missing,
            },
            KeyRef::PrincipalArn => match (self.caller.kind, self.principal) {
                (CallerKind::Session { .. }, Some(role)) => Values::One(Cow::Borrowed(role.arn())),
                (CallerKind::Session { role, .. }, None) => {
                    Values::One(Cow::Owned(format!("arn:{}:iam::{}:role/{role}", self.caller.partition, self.caller.account)))
                }
                _ => one(Some(self.caller.arn)),
            },
            KeyRef::PrincipalAccount => one(Some(self.caller.account)),
            // The kms: keys exist only on KMS requests: for any other service
            // they are missing (so a negated operator on them holds).
            KeyRef::CallerAccount | KeyRef::KeySpec | KeyRef::KeyUsage | KeyRef::KeyOrigin if !self.kms_action => Values::Missing,
            KeyRef::CallerAccount => one(Some(self.caller.account)),
            KeyRef::Username => match self.caller.kind {
                CallerKind::User { name } => one(Some(name)),
                _ => Values::Missing,
            },
            KeyRef::Userid => match self.caller.kind {
                CallerKind::User { name } | CallerKind::Role { name } => one(Some(name)),
                CallerKind::Session { role, session } => Values::One(Cow::Owned(format!("{role}:{session}"))),
                CallerKind::Root => one(Some(self.caller.account)),
            },
            KeyRef::PrincipalType => one(Some(self.caller.principal_type())),
            KeyRef::ResourceAccount => one(self.resource_account),
            KeyRef::KeySpec => one(self.target.and_then(|t| t.key()).map(|k| &*k.spec)),
            KeyRef::KeyUsage => one(self.target.and_then(|t| t.key()).map(|k| &*k.usage)),
            KeyRef::KeyOrigin => one(self.target.and_then(|t| t.key()).map(|k| &*k.origin)),
            KeyRef::RequestAlias if !self.kms_action => Values::Missing,
            KeyRef::RequestAlias => one(self.request_alias),
            // IAM policies only, like aws:ResourceTag, and only for a key
            // that exists.
            KeyRef::ResourceAliases => {
                if !self.kms_action || !self.resource_tags_available || self.in_key_policy.get() {
                    return Values::Missing;
                }
                match self.target.and_then(|t| t.key()).map(|k| k.aliases()) {
                    Some(aliases) if !aliases.is_empty() => Values::Many(aliases),
                    _ => Values::Missing,
                }
            }
            KeyRef::CurrentTime => one(Some(&self.time().0)),
            KeyRef::EpochTime => one(Some(&self.time().1)),
            KeyRef::PrincipalOrgId => match self.principal_org {
                Some(_) => one(self.org_id),
                None => self.context(key),
            },
            KeyRef::ResourceOrgId => match self.resource_org {
                Some(_) => one(self.org_id),
                None => self.context(key),
            },
            KeyRef::PrincipalOrgPaths | KeyRef::ResourceOrgPaths => {
                let account = if *key == KeyRef::PrincipalOrgPaths { self.principal_org } else { self.resource_org };
                match account {
                    Some(a) if a.paths.is_empty() => Values::Missing,
                    Some(a) => Values::Many(&a.paths),
                    None => self.context(key),
                }
            }
            KeyRef::Context(_) => self.context(key),
        }
    }
}

impl<'a> Eval<'a> {
    /// A tag's value, looked up once per request and side.
    fn remembered(&self, side: TagSide, key: &SmolStr, find: impl FnOnce() -> Option<&'a str>) -> Option<&'a str> {
        let hit =
            self.tag_memo.borrow().iter().find(|(s, k, _)| *s == side && same_bytes(k.as_bytes(), key.as_bytes())).map(|e| e.2);
        if let Some(found) = hit {
            return found;
        }
        let found = find();
        let mut memo = self.tag_memo.borrow_mut();
        if memo.len() < TAG_MEMO {
            memo.push((side, key.clone(), found));
        }
        found
    }

    /// A key from the request's context, by its lowercased name.
    fn context(&self, key: &KeyRef) -> Values<'_> {
        let name = match key {
            KeyRef::Context(name) => &**name,
            other => other.org_key_name().unwrap_or_default(),
        };
        match self.req.context.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
            Some((_, ContextValue::One(v))) => Values::One(Cow::Borrowed(v)),
            Some((_, ContextValue::Many(list))) => Values::Many(list),
            None => Values::Missing,
        }
    }
}

/// The request's `aws:SourceVpce`, if it gave one.
fn source_vpce(req: &Request) -> Option<&str> {
    req.context.iter().find_map(|(k, v)| match v {
        ContextValue::One(id) if k.eq_ignore_ascii_case("aws:SourceVpce") => Some(id.as_str()),
        _ => None,
    })
}

impl Resolve for Eval<'_> {
    fn single(&self, key: &KeyRef) -> Option<Cow<'_, str>> {
        match self.values(key) {
            Values::One(v) => Some(v),
            _ => None,
        }
    }

    fn missing_variable(&self, name: &str) {
        let mut list = self.missing_variables.borrow_mut();
        if !list.iter().any(|n| &**n == name) {
            list.push(name.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::WorldSpec;
    use serde_json::json;

    fn state() -> State {
        let world: WorldSpec = serde_json::from_value(json!({
            "policies": {"P": {"Version": "2012-10-17", "Statement": [
                {"Sid": "Mine", "Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*",
                 "Condition": {"StringEquals": {"aws:ResourceTag/Project": "${aws:PrincipalTag/project}"}}},
                {"Sid": "Mfa", "Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*",
                 "Condition": {"Bool": {"aws:MultiFactorAuthPresent": "true"}}}]}},
            "principals": [{"arn": "arn:aws:iam::111122223333:role/NoTags", "policies": ["P"]}],
            "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "tags": {"Project": "Alpha"}}]
        }))
        .unwrap();
        world.build().unwrap()
    }

    fn ask(action: &str, explain: bool) -> Decision {
        let req = Request {
            principal: "arn:aws:iam::111122223333:role/NoTags".into(),
            action: action.into(),
            resource: "arn:aws:kms:us-east-1:111122223333:key/k1".into(),
            ..Request::default()
        };
        authorize(&state(), &req, explain).unwrap()
    }

    #[test]
    fn missing_keys_include_variables_without_a_value() {
        let d = ask("kms:Decrypt", false);
        assert_eq!(d.reason, Reason::ImplicitDeny);
        assert_eq!(d.missing_keys, vec![Arc::<str>::from("aws:PrincipalTag/project")]);
        let d = ask("kms:Encrypt", false);
        assert_eq!(d.missing_keys, vec![Arc::<str>::from("aws:MultiFactorAuthPresent")]);
    }

    #[test]
    fn explain_lists_what_became_of_each_statement() {
        let d = ask("kms:Encrypt", true);
        let considered = d.considered.unwrap();
        let outcomes: Vec<String> = considered.iter().map(|c| format!("{} {}", c.statement, c.outcome)).collect();
        assert_eq!(
            outcomes,
            vec![
                "P[1] \"Mfa\" condition Bool on aws:MultiFactorAuthPresent does not hold".to_string(),
                "key-policy[0] \"Enable IAM User Permissions\" applies".to_string(),
            ]
        );
        assert!(ask("kms:Encrypt", false).considered.is_none());
    }

    #[test]
    fn a_grant_decides_by_id_and_explain_says_what_became_of_each_grant() {
        let world: WorldSpec = serde_json::from_value(json!({
            "principals": [{"arn": "arn:aws:iam::111122223333:role/App"}],
            "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "aliases": ["alias/app"], "grants": [
                {"id": "mine", "grantee_principal": "arn:aws:iam::111122223333:role/App", "operations": ["Decrypt"],
                 "constraints": {"encryption_context_subset": {"Dept": "IT"}}},
                {"id": "theirs", "grantee_principal": "arn:aws:iam::111122223333:role/Other", "operations": ["Decrypt"]}]}]
        }))
        .unwrap();
        let state = world.build().unwrap();
        let mut req = Request {
            principal: "arn:aws:sts::111122223333:assumed-role/App/s".into(),
            action: "kms:Decrypt".into(),
            resource: "arn:aws:kms:us-east-1:111122223333:alias/app".into(),
            context: vec![("kms:EncryptionContext:Dept".into(), ContextValue::One("IT".into()))],
            ..Request::default()
        };
        let d = authorize(&state, &req, true).unwrap();
        assert_eq!(d.reason, Reason::Allowed);
        assert_eq!(
            d.matched.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["grant:mine"],
            "the delegating key policy did not decide"
        );
        let outcomes: Vec<String> = d.considered.unwrap().iter().map(|c| format!("{} {}", c.statement, c.outcome)).collect();
        assert!(outcomes.contains(&"grant:mine applies".to_string()), "{outcomes:?}");
        assert!(outcomes.contains(&"grant:theirs principal does not match".to_string()), "{outcomes:?}");
        req.context.clear();
        let d = authorize(&state, &req, true).unwrap();
        assert_eq!(d.reason, Reason::ImplicitDeny);
        let outcomes: Vec<String> = d.considered.unwrap().iter().map(|c| format!("{} {}", c.statement, c.outcome)).collect();
        assert!(
            outcomes.contains(&"grant:mine condition EncryptionContextSubset on kms:EncryptionContext does not hold".to_string()),
            "{outcomes:?}"
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let mut req = Request {
            principal: "arn:aws:iam::111122223333:role/NoTags".into(),
            action: "kms:Decrypt".into(),
            resource: "key/1".into(),
            ..Request::default()
        };
        assert_eq!(authorize(&state(), &req, false).unwrap_err().field, "resource");
        req.resource = "*".into();
        req.action = "Decrypt".into();
        assert_eq!(authorize(&state(), &req, false).unwrap_err().field, "action");
        req.action = "kms:Decrypt".into();
        req.context = vec![("aws:ResourceTag/Project".into(), ContextValue::One("Alpha".into()))];
        assert_eq!(authorize(&state(), &req, false).unwrap_err().field, "context[\"aws:ResourceTag/Project\"]");
        req.context.clear();
        req.principal = "bob".into();
        assert_eq!(authorize(&state(), &req, false).unwrap_err().field, "principal");
    }
    #[test]
    fn a_server_refuses_the_clock_keys_unless_told_and_the_allow_list_names_the_key() {
        let world: WorldSpec = serde_json::from_value(json!({
            "policies": {"P": {"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*",
                "Condition": {"DateLessThan": {"aws:CurrentTime": "2020-01-01T00:00:00Z"}}}]}},
            "principals": [{"arn": "arn:aws:iam::111122223333:role/App", "policies": ["P"]}]
        }))
        .unwrap();
        let state = world.build().unwrap();
        let mut req = Request {
            principal: "arn:aws:iam::111122223333:role/App".into(),
            action: "kms:ListKeys".into(),
            resource: "*".into(),
            context: vec![("AWS:currenttime".into(), ContextValue::One("2019-06-01T00:00:00Z".into()))],
            ..Request::default()
        };
        // The expired grant: only a forged clock allows it.
        assert!(authorize(&state, &req, false).unwrap().allowed());
        let e = authorize_with(&state, &req, false, &ContextRules::SERVER).unwrap_err();
        assert_eq!(e.field, "context[\"AWS:currenttime\"]");
        assert!(e.reason.contains("--allow-clock-override"), "{}", e.reason);
        let clock = ContextRules { clock_override: true, ..ContextRules::SERVER };
        assert!(authorize_with(&state, &req, false, &clock).unwrap().allowed());
        req.context = vec![("aws:EpochTime".into(), ContextValue::One("1".into()))];
        assert_eq!(authorize_with(&state, &req, false, &ContextRules::SERVER).unwrap_err().field, "context[\"aws:EpochTime\"]");

        let listed = ContextRules { allowed: Some(ContextRules::allow_list(["aws:SourceIp"]).unwrap()), ..ContextRules::SERVER };
        req.context = vec![("AWS:SOURCEIP".into(), ContextValue::One("10.0.0.1".into()))];
        assert!(authorize_with(&state, &req, false, &listed).is_ok());
        req.context = vec![("kms:ViaService".into(), ContextValue::One("s3".into()))];
        let e = authorize_with(&state, &req, false, &listed).unwrap_err();
        assert_eq!(e.field, "context[\"kms:ViaService\"]");
        assert!(e.reason.contains("--context-keys"), "{}", e.reason);
        // Keys Tagward fills in stay refused, and cannot be listed.
        req.context = vec![("aws:PrincipalTag/team".into(), ContextValue::One("x".into()))];
        assert!(authorize_with(&state, &req, false, &ContextRules::TRUSTED).is_err());
        assert!(ContextRules::allow_list(["aws:PrincipalTag/team"]).unwrap_err().to_string().contains("filled in by Tagward"));
        assert!(ContextRules::allow_list(["aws:CurrentTime"]).unwrap_err().to_string().contains("--allow-clock-override"));
        assert!(ContextRules::allow_list([" aws:SourceIp"]).is_err());
    }

    #[test]
    fn kms_keys_are_set_only_for_kms_actions() {
        let world: WorldSpec = serde_json::from_value(json!({
            "policies": {"P": {"Statement": [
                {"Sid": "Own", "Effect": "Deny", "Action": "*", "Resource": "*",
                 "Condition": {"StringNotEquals": {"kms:CallerAccount": "111122223333"}}},
                {"Effect": "Allow", "Action": "*", "Resource": "*"}]}},
            "principals": [{"arn": "arn:aws:iam::111122223333:role/App", "policies": ["P"]}],
            "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1"}, {"arn": "arn:aws:sqs:us-east-1:111122223333:q"}]
        }))
        .unwrap();
        let state = world.build().unwrap();
        let ask = |action: &str, resource: &str| {
            let req = Request {
                principal: "arn:aws:iam::111122223333:role/App".into(),
                action: action.into(),
                resource: resource.into(),
                ..Request::default()
            };
            authorize(&state, &req, false).unwrap()
        };
        let sqs = ask("sqs:SendMessage", "arn:aws:sqs:us-east-1:111122223333:q");
        assert_eq!(sqs.reason, Reason::ExplicitDeny, "kms:CallerAccount is missing, so StringNotEquals holds");
        assert_eq!(sqs.missing_keys, vec![Arc::<str>::from("kms:CallerAccount")]);
        assert_eq!(ask("kms:Decrypt", "arn:aws:kms:us-east-1:111122223333:key/k1").reason, Reason::Allowed);
        assert_eq!(
            ask("KMS:Decrypt", "arn:aws:kms:us-east-1:111122223333:key/k1").reason,
            Reason::Allowed,
            "the service prefix is case-insensitive"
        );
    }

    #[test]
    fn session_tags_are_a_request_error_except_on_sessions() {
        let tags = vec![("project".to_string(), "Alpha".to_string())];
        for principal in
            ["arn:aws:iam::111122223333:role/NoTags", "arn:aws:iam::111122223333:user/bob", "arn:aws:iam::111122223333:root"]
        {
            let req = Request {
                principal: principal.into(),
                action: "kms:Decrypt".into(),
                resource: "arn:aws:kms:us-east-1:111122223333:key/k1".into(),
                session_tags: tags.clone(),
                ..Request::default()
            };
            let e = authorize(&state(), &req, false).unwrap_err();
            assert_eq!(e.field, "session_tags", "{principal}: {e}");
            assert!(e.reason.contains("not an assumed-role session"), "{e}");
        }
        let req = Request {
            principal: "arn:aws:sts::111122223333:assumed-role/NoTags/s1".into(),
            action: "kms:Decrypt".into(),
            resource: "arn:aws:kms:us-east-1:111122223333:key/k1".into(),
            session_tags: tags,
            ..Request::default()
        };
        assert_eq!(authorize(&state(), &req, false).unwrap().reason, Reason::Allowed, "a session's tags apply");
    }
}
