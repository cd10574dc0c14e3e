//! The KMS alias and grant operations as authorized operations
//! (docs/semantics.md, "KMS aliases and grants"; docs/scenarios.md,
//! `create_alias` ... `list_grants`): CreateAlias, UpdateAlias, DeleteAlias,
//! ListAliases, CreateGrant, RetireGrant, RevokeGrant and ListGrants.
//!
//! Like the tag operations: a key (or alias, or grant) that does not exist
//! answers `NotFoundException` first; then the request is authorized as the
//! principal with the operation's own action on every resource AWS names
//! for it; then the rules are checked in the order of each operation's
//! function, the first failure answering; then the change is applied to a
//! copy of the state, at one revision.

use std::fmt;
use std::hash::{Hash, Hasher};

use thiserror::Error;

use crate::arn::{Arn, Caller};
use crate::engine::{authorize, ContextValue, Decision, PolicyRef, Reason, Request, RequestError, StatementRef};
use crate::error::ErrorCode;
use crate::kms::{alias_arn, alias_of_arn, check_alias_name, Constraint, Grant, MAX_ALIASES_PER_KEY, MAX_GRANTS_PER_KEY};
use crate::path::FieldPath;
use crate::policy::Effect;
use crate::state::{KeyInfo, KeyManager, KeyState, State};
use crate::world::{build_grant, grant_spec, GrantSpec};

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KmsOp {
    /// `alias` is `alias/NAME` (or the alias ARN); `key` a key ARN.
    CreateAlias {
        alias: String,
        key: String,
    },
    UpdateAlias {
        alias: String,
        key: String,
    },
    /// `alias` is `alias/NAME` with `region` and `account`, or the alias ARN.
    DeleteAlias {
        alias: String,
        region: Option<String>,
        account: Option<String>,
    },
    /// The caller's account's aliases, or those of one key.
    ListAliases {
        key: Option<String>,
    },
    /// The grant's `id` must be empty: Tagward assigns it.
    CreateGrant {
        key: String,
        grant: GrantSpec,
    },
    RetireGrant {
        key: String,
        grant_id: String,
    },
    RevokeGrant {
        key: String,
        grant_id: String,
    },
    ListGrants {
        key: String,
    },
}

impl KmsOp {
    /// The AWS operation name (also the action after `kms:`).
    pub fn name(&self) -> &'static str {
        match self {
            KmsOp::CreateAlias { .. } => "CreateAlias",
            KmsOp::UpdateAlias { .. } => "UpdateAlias",
            KmsOp::DeleteAlias { .. } => "DeleteAlias",
            KmsOp::ListAliases { .. } => "ListAliases",
            KmsOp::CreateGrant { .. } => "CreateGrant",
            KmsOp::RetireGrant { .. } => "RetireGrant",
            KmsOp::RevokeGrant { .. } => "RevokeGrant",
            KmsOp::ListGrants { .. } => "ListGrants",
        }
    }

    /// The action the operation is authorized as.
    pub fn action(&self) -> String {
        format!("kms:{}", self.name())
    }

    /// Does the operation change anything when it succeeds?
    pub fn mutating(&self) -> bool {
        !matches!(self, KmsOp::ListAliases { .. } | KmsOp::ListGrants { .. })
    }
}

/// A KMS alias or grant operation performed as a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsRequest {
    pub principal: String,
    pub op: KmsOp,
    /// Session tags; only an assumed-role session may have them.
    pub session_tags: Vec<(String, String)>,
    /// Other condition keys. The keys a CreateGrant request fills in from
    /// the grant (`kms:GrantOperations`, ...) may not be given here.
    pub context: Vec<(String, ContextValue)>,
}

/// Why a KMS operation failed; `code()` is the AWS error.
#[derive(Debug, Clone, Error)]
pub enum KmsError {
    #[error("{0}")]
    BadRequest(#[from] RequestError),
    #[error("{0}")]
    NotFound(String),
    #[error("{principal} is not authorized to perform {action} on {resource} ({})", .decision.reason)]
    AccessDenied { principal: String, action: String, resource: String, decision: Box<Decision> },
    #[error("{field}: {reason}")]
    Validation { field: String, reason: String },
    #[error("{0}")]
    InvalidAliasName(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    Disabled(String),
    #[error("{0}")]
    LimitExceeded(String),
    /// The change could not be made durable.
    #[error("{0}")]
    Unavailable(String),
}

impl KmsError {
    pub fn code(&self) -> ErrorCode {
        match self {
            KmsError::BadRequest(_) | KmsError::Validation { .. } => ErrorCode::Validation,
            KmsError::NotFound(_) => ErrorCode::NotFound,
            KmsError::AccessDenied { .. } => ErrorCode::AccessDenied,
            KmsError::InvalidAliasName(_) => ErrorCode::InvalidAliasName,
            KmsError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            KmsError::InvalidState(_) => ErrorCode::KmsInvalidState,
            KmsError::Disabled(_) => ErrorCode::Disabled,
            KmsError::LimitExceeded(_) => ErrorCode::LimitExceeded,
            KmsError::Unavailable(_) => ErrorCode::ServiceUnavailable,
        }
    }

    pub fn name(&self) -> &'static str {
        self.code().as_str()
    }
}

fn validation(field: impl Into<String>, reason: impl Into<String>) -> KmsError {
    KmsError::Validation { field: field.into(), reason: reason.into() }
}

/// What an accepted change did, as the log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KmsEffect {
    /// Alias `alias` (`alias/NAME`) now points to `key`; it pointed to
    /// `previous` before (UpdateAlias).
    PutAlias {
        key: String,
        alias: String,
        previous: Option<String>,
    },
    DeleteAlias {
        key: String,
        alias: String,
    },
    PutGrant {
        key: String,
        grant: GrantSpec,
    },
    DeleteGrant {
        key: String,
        grant_id: String,
    },
}

/// An accepted change, for the log, `Watch` and the audit trail.
#[derive(Debug, Clone)]
pub struct KmsChange {
    pub principal: String,
    /// `kms:CreateAlias`, ...
    pub action: String,
    pub effect: KmsEffect,
    pub revision: u64,
}

impl fmt::Display for KmsChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {:?}", self.principal, self.action, self.effect)
    }
}

/// One alias in a ListAliases answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasEntry {
    /// `alias/NAME`.
    pub name: String,
    pub arn: String,
    pub key: String,
}

/// What a successful operation answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KmsAnswer {
    Done,
    /// CreateGrant: the id Tagward assigned.
    GrantCreated {
        grant_id: String,
    },
    Aliases(Vec<AliasEntry>),
    Grants(Vec<GrantSpec>),
}

/// The result of an operation.
#[derive(Debug, Clone)]
pub struct KmsOutcome {
    /// The decision that allowed it (for a RetireGrant, the grant's rule).
    pub decision: Decision,
    pub answer: KmsAnswer,
    /// The next state and the change, when something changed.
    pub change: Option<(State, KmsChange)>,
}

/// The condition keys CreateGrant fills in from the grant; no caller may
/// supply them to an operation (they would describe another grant).
const GRANT_KEYS: &[&str] = &[
    "kms:GrantOperations",
    "kms:GranteePrincipal",
    "kms:RetiringPrincipal",
    "kms:GrantConstraintType",
    "kms:EncryptionContextKeys",
    "kms:GrantIsForAWSResource",
];

fn check_context(context: &[(String, ContextValue)]) -> Result<(), KmsError> {
    for (name, _) in context {
        if GRANT_KEYS.iter().any(|k| k.eq_ignore_ascii_case(name)) {
            return Err(validation(
                FieldPath::field("context").key(name.as_str()).to_string(),
                "this key is filled in from the operation's own parameters; the caller may not supply it",
            ));
        }
    }
    Ok(())
}

struct Ctx<'a> {
    state: &'a State,
    req: &'a KmsRequest,
    action: String,
}

impl Ctx<'_> {
    /// Authorizes the operation's action on `resource`, with `extra`
    /// context keys; a denial is the operation's `AccessDeniedException`.
    fn allow(&self, resource: &str, extra: Vec<(String, ContextValue)>) -> Result<Decision, KmsError> {
        let decision = self.decide(resource, extra)?;
        if decision.allowed() {
            Ok(decision)
        } else {
            Err(self.denied(resource, decision))
        }
    }

    fn decide(&self, resource: &str, extra: Vec<(String, ContextValue)>) -> Result<Decision, KmsError> {
        let mut context = self.req.context.clone();
        context.extend(extra);
        let request = Request {
            principal: self.req.principal.clone(),
            action: self.action.clone(),
            resource: resource.to_string(),
            session_tags: self.req.session_tags.clone(),
            context,
            ..Request::default()
        };
        Ok(authorize(self.state, &request, false)?)
    }

    fn denied(&self, resource: &str, decision: Decision) -> KmsError {
        KmsError::AccessDenied {
            principal: self.req.principal.clone(),
            action: self.action.clone(),
            resource: resource.to_string(),
            decision: Box::new(decision),
        }
    }

    fn caller(&self) -> Result<Caller<'_>, KmsError> {
        Caller::parse(&self.req.principal).map_err(|e| KmsError::BadRequest(RequestError::new("principal", e.to_string())))
    }

    /// The key `arn`, or `NotFoundException`.
    fn key(&self, arn: &str) -> Result<&KeyInfo, KmsError> {
        self.state.resource(arn).and_then(|r| r.key()).ok_or_else(|| KmsError::NotFound(format!("key {arn:?} does not exist")))
    }

    /// "Cross-account use: No" (CreateAlias, UpdateAlias, DeleteAlias,
    /// ListAliases): a caller from another account is refused, whatever
    /// the policies say.
    fn same_account(&self, key: &str, decision: Decision) -> Result<Decision, KmsError> {
        let caller = self.caller()?;
        if Arn::parse(key).map(|a| a.account) == Some(caller.account) {
            Ok(decision)
        } else {
            Err(self.denied(key, Decision { reason: Reason::ImplicitDeny, matched: Vec::new(), ..decision }))
        }
    }

    fn merge(mut a: Decision, b: Decision) -> Decision {
        for s in b.matched {
            if !a.matched.contains(&s) {
                a.matched.push(s);
            }
        }
        a
    }
}

/// The alias ARN an operation names: `alias/NAME` in the account and
/// region of `key`, or an alias ARN given whole (which must be in the key's
/// account and region).
fn alias_for_key(alias: &str, key: &str) -> Result<(String, String), KmsError> {
    if alias.starts_with("arn:") {
        let name = alias_of_arn(alias).ok_or_else(|| validation("alias", format!("{alias:?} is not an alias ARN")))?;
        let expected = alias_arn(key, name).unwrap_or_default();
        if expected != alias {
            return Err(validation(
                "alias",
                format!("{alias:?} is not in the account and Region of {key:?}: an alias and its key are always in the same account and Region"),
            ));
        }
        return Ok((name.to_string(), alias.to_string()));
    }
    if !alias.starts_with(crate::kms::ALIAS_PREFIX) {
        // No alias ARN can be formed from it, so nothing to authorize on.
        return Err(KmsError::InvalidAliasName(format!("{alias:?} does not begin with \"alias/\"")));
    }
    let arn = alias_arn(key, alias).ok_or_else(|| validation("key", format!("{key:?} is not a key ARN")))?;
    Ok((alias.to_string(), arn))
}

/// Performs a KMS operation against `state`.
pub fn perform(state: &State, req: &KmsRequest) -> Result<KmsOutcome, KmsError> {
    check_context(&req.context)?;
    let cx = Ctx { state, req, action: req.op.action() };
    match &req.op {
        KmsOp::CreateAlias { alias, key } => create_alias(&cx, alias, key),
        KmsOp::UpdateAlias { alias, key } => update_alias(&cx, alias, key),
        KmsOp::DeleteAlias { alias, region, account } => delete_alias(&cx, alias, region.as_deref(), account.as_deref()),
        KmsOp::ListAliases { key } => list_aliases(&cx, key.as_deref()),
        KmsOp::CreateGrant { key, grant } => create_grant(&cx, key, grant),
        KmsOp::RetireGrant { key, grant_id } => retire_grant(&cx, key, grant_id),
        KmsOp::RevokeGrant { key, grant_id } => revoke_grant(&cx, key, grant_id),
        KmsOp::ListGrants { key } => list_grants(&cx, key),
    }
}

fn changed(cx: &Ctx<'_>, next: State, effect: KmsEffect, decision: Decision, answer: KmsAnswer) -> KmsOutcome {
    let change = KmsChange { principal: cx.req.principal.clone(), action: cx.action.clone(), effect, revision: next.revision() };
    KmsOutcome { decision, answer, change: Some((next, change)) }
}

fn state_refused(e: crate::state::StateError) -> KmsError {
    match e.code() {
        ErrorCode::AlreadyExists => KmsError::AlreadyExists(e.to_string()),
        ErrorCode::NotFound => KmsError::NotFound(e.to_string()),
        _ => validation("key", e.to_string()),
    }
}

/// "To create an alias, the principal needs the following permissions for
/// both the alias and for the associated KMS key" (Controlling access to
/// aliases): `kms:CreateAlias` on the alias ARN, then on the key.
fn create_alias(cx: &Ctx<'_>, alias: &str, key: &str) -> Result<KmsOutcome, KmsError> {
    let info = cx.key(key)?;
    let (name, arn) = alias_for_key(alias, key)?;
    let decision = Ctx::merge(cx.allow(&arn, Vec::new())?, cx.allow(key, Vec::new())?);
    let decision = cx.same_account(key, decision)?;
    check_alias_name(&name, false).map_err(|e| KmsError::InvalidAliasName(e.to_string()))?;
    if let Some(owner) = cx.state.alias_target(&arn) {
        return Err(KmsError::AlreadyExists(format!("alias {arn:?} already exists (on {owner:?})")));
    }
    if info.state == KeyState::PendingDeletion {
        return Err(KmsError::InvalidState(format!("{key} is pending deletion")));
    }
    if info.aliases().len() >= MAX_ALIASES_PER_KEY {
        return Err(KmsError::LimitExceeded(format!("{key} already has {MAX_ALIASES_PER_KEY} aliases")));
    }
    let mut next = cx.state.clone();
    next.put_alias(key, &name).map_err(state_refused)?;
    let effect = KmsEffect::PutAlias { key: key.to_string(), alias: name, previous: None };
    Ok(changed(cx, next, effect, decision, KmsAnswer::Done))
}

/// UpdateAlias: `kms:UpdateAlias` on the alias, on the key it points to now
/// and on the new key (Controlling access to aliases).
fn update_alias(cx: &Ctx<'_>, alias: &str, key: &str) -> Result<KmsOutcome, KmsError> {
    let info = cx.key(key)?;
    let (name, arn) = alias_for_key(alias, key)?;
    let current =
        cx.state.alias_target(&arn).cloned().ok_or_else(|| KmsError::NotFound(format!("alias {arn:?} does not exist")))?;
    let mut decision = cx.allow(&arn, Vec::new())?;
    decision = Ctx::merge(decision, cx.allow(&current, Vec::new())?);
    decision = Ctx::merge(decision, cx.allow(key, Vec::new())?);
    let decision = cx.same_account(key, decision)?;
    let old = cx.key(&current)?;
    // "The current and new KMS key must be the same type (both symmetric or
    // both asymmetric or both HMAC), and they must have the same key usage"
    // (UpdateAlias).
    let family = |spec: &str| match spec {
        "SYMMETRIC_DEFAULT" => "symmetric",
        s if s.starts_with("HMAC_") => "HMAC",
        _ => "asymmetric",
    };
    if family(&old.spec) != family(&info.spec) || old.usage != info.usage {
        return Err(validation(
            "key",
            format!(
                "{key} ({}, {}) is not the same type and key usage as the alias's current key ({}, {})",
                info.spec, info.usage, old.spec, old.usage
            ),
        ));
    }
    if info.state == KeyState::PendingDeletion {
        return Err(KmsError::InvalidState(format!("{key} is pending deletion")));
    }
    if *current != *key && info.aliases().len() >= MAX_ALIASES_PER_KEY {
        return Err(KmsError::LimitExceeded(format!("{key} already has {MAX_ALIASES_PER_KEY} aliases")));
    }
    if *current == *key {
        return Ok(KmsOutcome { decision, answer: KmsAnswer::Done, change: None });
    }
    let mut next = cx.state.clone();
    let previous = next.put_alias(key, &name).map_err(state_refused)?;
    let effect = KmsEffect::PutAlias { key: key.to_string(), alias: name, previous: previous.map(|p| p.to_string()) };
    Ok(changed(cx, next, effect, decision, KmsAnswer::Done))
}

/// DeleteAlias: `kms:DeleteAlias` on the alias and on its key.
fn delete_alias(cx: &Ctx<'_>, alias: &str, region: Option<&str>, account: Option<&str>) -> Result<KmsOutcome, KmsError> {
    let arn = if alias.starts_with("arn:") {
        alias_of_arn(alias).ok_or_else(|| validation("alias", format!("{alias:?} is not an alias ARN")))?;
        alias.to_string()
    } else {
        let (Some(region), Some(account)) = (region, account) else {
            return Err(validation("alias", "an alias name needs its region and account (or give the alias ARN)"));
        };
        let partition = Caller::parse(&cx.req.principal).map(|c| c.partition).unwrap_or("aws");
        format!("arn:{partition}:kms:{region}:{account}:{alias}")
    };
    let key = cx.state.alias_target(&arn).cloned().ok_or_else(|| KmsError::NotFound(format!("alias {arn:?} does not exist")))?;
    let decision = Ctx::merge(cx.allow(&arn, Vec::new())?, cx.allow(&key, Vec::new())?);
    let decision = cx.same_account(&key, decision)?;
    let mut next = cx.state.clone();
    next.delete_alias(&arn).map_err(state_refused)?;
    let name = alias_of_arn(&arn).unwrap_or_default().to_string();
    let effect = KmsEffect::DeleteAlias { key: key.to_string(), alias: name };
    Ok(changed(cx, next, effect, decision, KmsAnswer::Done))
}

/// ListAliases: `kms:ListAliases` on `*` (it acts on no existing
/// resource); the caller's own account only.
fn list_aliases(cx: &Ctx<'_>, key: Option<&str>) -> Result<KmsOutcome, KmsError> {
    if let Some(k) = key {
        cx.key(k)?;
    }
    let decision = cx.allow("*", Vec::new())?;
    let caller = cx.caller()?;
    if let Some(k) = key {
        cx.same_account(k, decision.clone())?;
    }
    let mut aliases: Vec<AliasEntry> = cx
        .state
        .aliases()
        .filter(|(_, target)| match key {
            Some(k) => ***target == *k,
            None => Arn::parse(target).is_some_and(|a| a.account == caller.account),
        })
        .map(|(arn, target)| AliasEntry {
            name: alias_of_arn(arn).unwrap_or_default().to_string(),
            arn: arn.to_string(),
            key: target.to_string(),
        })
        .collect();
    aliases.sort_by(|a, b| a.arn.cmp(&b.arn));
    Ok(KmsOutcome { decision, answer: KmsAnswer::Aliases(aliases), change: None })
}

fn is_false() -> ContextValue {
    ContextValue::One("false".into())
}

/// A new grant id: 64 hex digits, from the key, the revision it is created
/// at and the grant, so that it is new on the key.
fn new_grant_id(key: &str, revision: u64, spec: &GrantSpec, taken: impl Fn(&str) -> bool) -> String {
    let mut salt = 0u64;
    loop {
        let id: String = (0..4u64)
            .map(|part| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (key, revision, &spec.grantee_principal, &spec.operations, part, salt).hash(&mut h);
                format!("{:016x}", h.finish())
            })
            .collect();
        if !taken(&id) {
            return id;
        }
        salt += 1;
    }
}

/// The grant decisions that allowed a request, when only grants did.
fn only_grants(decision: &Decision) -> Option<Vec<&str>> {
    let ids: Vec<&str> = decision
        .matched
        .iter()
        .map(|s| match &s.policy {
            PolicyRef::Grant(id) => Some(&**id),
            _ => None,
        })
        .collect::<Option<_>>()?;
    (!ids.is_empty()).then_some(ids)
}

/// CreateGrant: `kms:CreateGrant` on the key, with the grant's condition
/// keys and `kms:GrantIsForAWSResource` false (a direct call).
fn create_grant(cx: &Ctx<'_>, key: &str, spec: &GrantSpec) -> Result<KmsOutcome, KmsError> {
    let info = cx.key(key)?;
    if !spec.id.is_empty() {
        return Err(validation("grant.id", "Tagward assigns a new grant's id"));
    }
    let mut extra = vec![
        ("kms:GrantOperations".to_string(), ContextValue::Many(spec.operations.clone())),
        ("kms:GranteePrincipal".to_string(), ContextValue::One(spec.grantee_principal.clone())),
        ("kms:GrantIsForAWSResource".to_string(), is_false()),
    ];
    if let Some(r) = &spec.retiring_principal {
        extra.push(("kms:RetiringPrincipal".to_string(), ContextValue::One(r.clone())));
    }
    if let Some(c) = &spec.constraints {
        let (kind, map) = match (&c.encryption_context_equals, &c.encryption_context_subset) {
            (Some(m), _) => ("EncryptionContextEquals", m),
            (None, Some(m)) => ("EncryptionContextSubset", m),
            (None, None) => {
                return Err(validation("grant.constraints", "give encryption_context_equals or encryption_context_subset"))
            }
        };
        extra.push(("kms:GrantConstraintType".to_string(), ContextValue::One(kind.to_string())));
        extra.push(("kms:EncryptionContextKeys".to_string(), ContextValue::Many(map.keys().cloned().collect())));
    }
    let decision = cx.allow(key, extra)?;
    let grant = build_grant(&FieldPath::field("grant"), spec, "", &info.spec, &info.usage)
        .map_err(|e| validation(e.path.to_string(), e.message))?;
    // Created through a grant alone: "the grantee can create a grant only
    // for some or all of the operations in its own grant", with an equally
    // strict or stricter encryption context constraint (CreateGrant).
    if let Some(ids) = only_grants(&decision) {
        let within = ids.iter().filter_map(|id| info.grants().iter().find(|g| &*g.id == *id)).any(|parent| {
            parent.operations.contains(grant.operations)
                && Constraint::at_least_as_strict_as(grant.constraint.as_ref(), parent.constraint.as_ref())
        });
        if !within {
            let refused = Decision { reason: Reason::ImplicitDeny, matched: Vec::new(), ..decision };
            return Err(cx.denied(key, refused));
        }
    }
    match info.state {
        KeyState::Disabled => return Err(KmsError::Disabled(format!("{key} is disabled"))),
        KeyState::PendingDeletion | KeyState::PendingReplicaDeletion => {
            return Err(KmsError::InvalidState(format!("{key} is pending deletion")))
        }
        KeyState::PendingImport => return Err(KmsError::InvalidState(format!("{key} is pending import"))),
        _ => {}
    }
    if info.grants().len() >= MAX_GRANTS_PER_KEY {
        return Err(KmsError::LimitExceeded(format!("{key} already has {MAX_GRANTS_PER_KEY} grants")));
    }
    let id = new_grant_id(key, cx.state.revision() + 1, spec, |id| info.grants().iter().any(|g| &*g.id == id));
    let grant = Grant { id: id.as_str().into(), ..grant };
    let stored = grant_spec(&grant);
    let mut next = cx.state.clone();
    next.put_grant(key, grant).map_err(state_refused)?;
    let effect = KmsEffect::PutGrant { key: key.to_string(), grant: stored };
    Ok(changed(cx, next, effect, decision, KmsAnswer::GrantCreated { grant_id: id }))
}

fn grant_ref(id: &str) -> StatementRef {
    StatementRef { policy: PolicyRef::Grant(id.into()), index: 0, sid: Some(id.into()), effect: Effect::Allow }
}

/// RetireGrant: the grant decides who may retire it, "the retiring
/// principal, and the grantee principal if the grant includes the
/// RetireGrant operation"; an explicit `Deny` of `kms:RetireGrant` still
/// denies, and `kms:RetireGrant` permission alone does not allow it.
fn retire_grant(cx: &Ctx<'_>, key: &str, grant_id: &str) -> Result<KmsOutcome, KmsError> {
    let info = cx.key(key)?;
    let grant = info
        .grants()
        .iter()
        .find(|g| &*g.id == grant_id)
        .ok_or_else(|| KmsError::NotFound(format!("key {key:?} has no grant {grant_id:?}")))?;
    let decision = cx.decide(key, Vec::new())?;
    if decision.reason == Reason::ExplicitDeny {
        return Err(cx.denied(key, decision));
    }
    let caller = cx.caller()?;
    let retire = crate::kms::GrantOps::named("RetireGrant").unwrap_or_default();
    let as_grantee =
        grant.operations.contains(retire) && grant.grantee.matches(&caller) == Some(crate::kms::GranteeMatch::Direct);
    if !(grant.retires(&caller) || as_grantee) {
        let refused = Decision { reason: Reason::ImplicitDeny, matched: Vec::new(), ..decision };
        return Err(cx.denied(key, refused));
    }
    let decision = Decision { reason: Reason::Allowed, matched: vec![grant_ref(grant_id)], ..decision };
    let mut next = cx.state.clone();
    next.delete_grant(key, grant_id).map_err(state_refused)?;
    let effect = KmsEffect::DeleteGrant { key: key.to_string(), grant_id: grant_id.to_string() };
    Ok(changed(cx, next, effect, decision, KmsAnswer::Done))
}

/// RevokeGrant: `kms:RevokeGrant` on the key, `kms:GrantIsForAWSResource`
/// false.
fn revoke_grant(cx: &Ctx<'_>, key: &str, grant_id: &str) -> Result<KmsOutcome, KmsError> {
    cx.key(key)?;
    let decision = cx.allow(key, vec![("kms:GrantIsForAWSResource".to_string(), is_false())])?;
    let mut next = cx.state.clone();
    next.delete_grant(key, grant_id).map_err(state_refused)?;
    let effect = KmsEffect::DeleteGrant { key: key.to_string(), grant_id: grant_id.to_string() };
    Ok(changed(cx, next, effect, decision, KmsAnswer::Done))
}

/// ListGrants: `kms:ListGrants` on the key, `kms:GrantIsForAWSResource`
/// false.
fn list_grants(cx: &Ctx<'_>, key: &str) -> Result<KmsOutcome, KmsError> {
    let info = cx.key(key)?;
    let decision = cx.allow(key, vec![("kms:GrantIsForAWSResource".to_string(), is_false())])?;
    let grants = info.grants().iter().map(grant_spec).collect();
    Ok(KmsOutcome { decision, answer: KmsAnswer::Grants(grants), change: None })
}

/// Refuses admin writes that would put an alias on an AWS managed key
/// with a customer name, or the reverse; shared by the admin stream.
pub fn check_admin_alias(info: &KeyInfo, name: &str) -> Result<(), crate::kms::AliasNameError> {
    check_alias_name(name, info.manager == KeyManager::Aws)
}
