//! `tagward test`: scenario files (docs/scenarios.md) loaded, run step by step
//! against a [`Backend`], and compared with what each step expects.
//!
//! The file format is the wire form here (serde, `deny_unknown_fields`);
//! loading checks every step's shape up front, so a file either loads whole,
//! or fails with the file, the JSON path and the reason, and runs nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use tagward_core::document;
use tagward_core::ErrorCode;

use crate::engine::{authorize, ContextValue, Request};
use crate::state::State;
use crate::store::{Store, Ticket, Update};
use crate::tagging::{TagError, TagOp, TagRequest};
use crate::world::{GrantSpec, PrincipalSpec, ResourceSpec, WorldSpec};
use tagward_core::chain::{EndpointSpec, OrganizationSpec, SessionSpec};
use tagward_core::kms_ops::{KmsAnswer, KmsError, KmsOp, KmsRequest};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub policies: BTreeMap<String, Value>,
    #[serde(default)]
    pub principals: Vec<PrincipalSpec>,
    #[serde(default)]
    pub resources: Vec<ResourceSpec>,
    #[serde(default)]
    pub organization: Option<OrganizationSpec>,
    #[serde(default)]
    pub sessions: Vec<SessionSpec>,
    #[serde(default)]
    pub vpc_endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub authorize: Option<AuthorizeStep>,
    #[serde(default)]
    pub tag_resource: Option<TagStep>,
    #[serde(default)]
    pub untag_resource: Option<UntagStep>,
    #[serde(default)]
    pub list_resource_tags: Option<ListStep>,
    #[serde(default)]
    pub put_policy: Option<PutPolicyStep>,
    #[serde(default)]
    pub delete_policy: Option<DeletePolicyStep>,
    #[serde(default)]
    pub create_alias: Option<AliasStep>,
    #[serde(default)]
    pub update_alias: Option<AliasStep>,
    #[serde(default)]
    pub delete_alias: Option<DeleteAliasStep>,
    #[serde(default)]
    pub list_aliases: Option<ListAliasesStep>,
    #[serde(default)]
    pub create_grant: Option<CreateGrantStep>,
    #[serde(default)]
    pub retire_grant: Option<GrantIdStep>,
    #[serde(default)]
    pub revoke_grant: Option<GrantIdStep>,
    #[serde(default)]
    pub list_grants: Option<ListGrantsStep>,
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasStep {
    pub principal: String,
    pub alias: String,
    pub key: String,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteAliasStep {
    pub principal: String,
    pub alias: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListAliasesStep {
    pub principal: String,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGrantStep {
    pub principal: String,
    pub key: String,
    pub grant: GrantSpec,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantIdStep {
    pub principal: String,
    pub key: String,
    /// A grant id from the world file, or the name a `create_grant` step
    /// gave its grant (`expect.grant_id`).
    pub grant_id: String,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListGrantsStep {
    pub principal: String,
    pub key: String,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeStep {
    pub principal: String,
    pub action: String,
    pub resource: String,
    #[serde(default)]
    pub request_tags: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub tag_keys: Option<Vec<String>>,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagStep {
    pub principal: String,
    pub resource: String,
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UntagStep {
    pub principal: String,
    pub resource: String,
    pub tag_keys: Vec<String>,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListStep {
    pub principal: String,
    pub resource: String,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutPolicyStep {
    pub name: String,
    pub document: Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletePolicyStep {
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ExpectDecision {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ExpectReason {
    Allowed,
    ExplicitDeny,
    ImplicitDeny,
}

impl ExpectReason {
    fn as_str(self) -> &'static str {
        match self {
            ExpectReason::Allowed => "Allowed",
            ExpectReason::ExplicitDeny => "ExplicitDeny",
            ExpectReason::ImplicitDeny => "ImplicitDeny",
        }
    }
}

/// The errors a step may expect (docs/scenarios.md): the refusals a step can
/// meet, not every [`ErrorCode`] (a scenario cannot provoke a storage
/// failure or a revision timeout).
pub const EXPECTABLE_ERRORS: &[ErrorCode] = &[
    ErrorCode::AccessDenied,
    ErrorCode::NotFound,
    ErrorCode::Tag,
    ErrorCode::LimitExceeded,
    ErrorCode::KmsInvalidState,
    ErrorCode::UnsupportedOperation,
    ErrorCode::Validation,
    ErrorCode::MalformedPolicyDocument,
    ErrorCode::NoSuchEntity,
    ErrorCode::AlreadyExists,
    ErrorCode::InvalidAliasName,
    ErrorCode::Disabled,
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(default)]
    pub decision: Option<ExpectDecision>,
    #[serde(default)]
    pub reason: Option<ExpectReason>,
    #[serde(default)]
    pub matched: Option<Vec<String>>,
    #[serde(default)]
    pub ok: Option<bool>,
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub error: Option<String>,
    /// `list_aliases`: the alias names, as a set.
    #[serde(default)]
    pub aliases: Option<Vec<String>>,
    /// `list_grants`: the grant ids (or the names `create_grant` steps gave
    /// them), as a set.
    #[serde(default)]
    pub grants: Option<Vec<String>>,
    /// `create_grant` (with `ok`): the name later steps refer to the new
    /// grant by.
    #[serde(default)]
    pub grant_id: Option<String>,
}

/// One operation, built from a step.
#[derive(Debug, Clone)]
pub enum Operation {
    Authorize(Request),
    Tag(TagRequest),
    PutPolicy { name: String, document: Value },
    DeletePolicy { name: String },
    Kms(KmsRequest),
}

/// What a backend answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Decision {
        allowed: bool,
        reason: String,
        /// The deciding statements: a display form and the Sid, if any.
        matched: Vec<(String, Option<String>)>,
        /// Condition keys the request lacked.
        missing: Vec<String>,
    },
    Ok {
        tags: Option<BTreeMap<String, String>>,
    },
    /// A KMS operation's answer.
    Kms(KmsAnswer),
    Error {
        name: String,
        message: String,
    },
}

/// Where steps run: in-process, or (later) against a sidecar over gRPC.
pub trait Backend {
    /// Starts over with `world` as the whole state.
    fn load(&mut self, world: &WorldSpec) -> Result<(), String>;
    fn run(&mut self, op: &Operation) -> Observed;
}

/// The engine itself, on an in-memory [`Store`]: the same doors the gRPC
/// handlers use.
pub struct InProcess {
    store: Store,
}

impl Default for InProcess {
    fn default() -> InProcess {
        InProcess { store: Store::new(State::default(), 1024) }
    }
}

impl Backend for InProcess {
    fn load(&mut self, world: &WorldSpec) -> Result<(), String> {
        self.store = Store::new(world.build().map_err(|e| e.to_string())?, 1024);
        Ok(())
    }

    fn run(&mut self, op: &Operation) -> Observed {
        let admin = |update: Update| match self.store.apply(&update, "scenario").map(Ticket::wait) {
            Ok(Ok(_)) => Observed::Ok { tags: None },
            Ok(Err(e)) => Observed::Error { name: ErrorCode::StorageFailed.to_string(), message: e.to_string() },
            Err(e) => Observed::Error { name: e.code.to_string(), message: e.message },
        };
        match op {
            Operation::Authorize(req) => match authorize(&self.store.snapshot(), req, false) {
                Ok(d) => Observed::Decision {
                    allowed: d.allowed(),
                    reason: d.reason.as_str().to_string(),
                    matched: d.matched.iter().map(|s| (s.to_string(), s.sid.as_deref().map(str::to_string))).collect(),
                    missing: d.missing_keys.iter().map(|k| k.to_string()).collect(),
                },
                Err(e) => Observed::Error { name: ErrorCode::Validation.to_string(), message: e.to_string() },
            },
            Operation::Tag(req) => match self.store.tag(req).and_then(|(done, ticket)| {
                ticket.wait().map_err(|e| TagError::Unavailable(e.to_string()))?;
                Ok(done)
            }) {
                Ok(done) => {
                    Observed::Ok { tags: Some(done.outcome.tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()) }
                }
                Err(e) => tag_error(&e),
            },
            Operation::PutPolicy { name, document } => {
                admin(Update::PutPolicy { name: name.clone(), document: document.clone() })
            }
            Operation::DeletePolicy { name } => admin(Update::DeletePolicy { name: name.clone() }),
            Operation::Kms(req) => match self.store.kms(req).and_then(|(done, ticket)| {
                ticket.wait().map_err(|e| KmsError::Unavailable(e.to_string()))?;
                Ok(done)
            }) {
                Ok(done) => Observed::Kms(done.outcome.answer),
                Err(e) => kms_error(&e),
            },
        }
    }
}

fn kms_error(e: &KmsError) -> Observed {
    let mut message = e.to_string();
    if let KmsError::AccessDenied { decision, .. } = e {
        if !decision.matched.is_empty() {
            let names: Vec<String> = decision.matched.iter().map(ToString::to_string).collect();
            let _ = write!(message, "; denied by {}", names.join(", "));
        }
    }
    Observed::Error { name: e.name().to_string(), message }
}

fn tag_error(e: &TagError) -> Observed {
    let mut message = e.to_string();
    if let TagError::AccessDenied { decision, .. } = e {
        if !decision.matched.is_empty() {
            let names: Vec<String> = decision.matched.iter().map(ToString::to_string).collect();
            let _ = write!(message, "; denied by {}", names.join(", "));
        }
    }
    Observed::Error { name: e.name().to_string(), message }
}

/// A file that could not be loaded.
#[derive(Debug, Clone, Error)]
#[error("{file}: {path}{sep}{message}", sep = if path.is_empty() { "" } else { ": " })]
pub struct LoadError {
    pub file: String,
    pub path: String,
    pub message: String,
}

/// A loaded scenario: the world and the steps as operations.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub file: String,
    pub name: Option<String>,
    pub world: WorldSpec,
    pub steps: Vec<LoadedStep>,
}

#[derive(Debug, Clone)]
pub struct LoadedStep {
    pub name: Option<String>,
    pub op: Operation,
    pub expect: Expect,
}

fn context_values(path: &str, context: &BTreeMap<String, Value>) -> Result<Vec<(String, ContextValue)>, (String, String)> {
    context
        .iter()
        .map(|(k, v)| {
            let at = format!("{path}.context.{k}");
            let value = match v {
                Value::String(s) => ContextValue::One(s.clone()),
                Value::Number(n) => ContextValue::One(n.to_string()),
                Value::Bool(b) => ContextValue::One(b.to_string()),
                Value::Array(items) => ContextValue::Many(
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, item)| match item {
                            Value::String(s) => Ok(s.clone()),
                            other => Err((format!("{at}[{i}]"), format!("expected a string, found {other}"))),
                        })
                        .collect::<Result<_, _>>()?,
                ),
                other => return Err((at, format!("expected a string, number, boolean or list of strings, found {other}"))),
            };
            Ok((k.clone(), value))
        })
        .collect()
}

fn pairs(map: &BTreeMap<String, String>) -> Vec<(String, String)> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl Step {
    fn lower(&self, path: &str, home: Option<(&str, &str)>) -> Result<LoadedStep, (String, String)> {
        let given: Vec<&str> = [
            ("authorize", self.authorize.is_some()),
            ("tag_resource", self.tag_resource.is_some()),
            ("untag_resource", self.untag_resource.is_some()),
            ("list_resource_tags", self.list_resource_tags.is_some()),
            ("put_policy", self.put_policy.is_some()),
            ("delete_policy", self.delete_policy.is_some()),
            ("create_alias", self.create_alias.is_some()),
            ("update_alias", self.update_alias.is_some()),
            ("delete_alias", self.delete_alias.is_some()),
            ("list_aliases", self.list_aliases.is_some()),
            ("create_grant", self.create_grant.is_some()),
            ("retire_grant", self.retire_grant.is_some()),
            ("revoke_grant", self.revoke_grant.is_some()),
            ("list_grants", self.list_grants.is_some()),
        ]
        .iter()
        .filter(|(_, g)| *g)
        .map(|(n, _)| *n)
        .collect();
        if given.len() != 1 {
            return Err((
                path.to_string(),
                format!(
                    "a step needs exactly one of authorize, tag_resource, untag_resource, list_resource_tags, put_policy, delete_policy, create_alias, update_alias, delete_alias, list_aliases, create_grant, retire_grant, revoke_grant, list_grants; found {}",
                    if given.is_empty() { "none".to_string() } else { given.join(", ") }
                ),
            ));
        }
        let e = &self.expect;
        let expect_path = format!("{path}.expect");
        let decision_fields = e.decision.is_some() || e.reason.is_some() || e.matched.is_some();
        let outcome_fields = [e.ok.is_some(), e.tags.is_some(), e.error.is_some(), e.aliases.is_some(), e.grants.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if e.grant_id.is_some() && (self.create_grant.is_none() || e.ok.is_none()) {
            return Err((
                format!("{expect_path}.grant_id"),
                "grant_id names the grant of a create_grant step that expects ok".into(),
            ));
        }
        let wants = |field: &str, given: bool, here: bool| -> Result<(), (String, String)> {
            if given && !here {
                return Err((format!("{expect_path}.{field}"), format!("{field} belongs to {field} list steps")));
            }
            Ok(())
        };
        wants("aliases", e.aliases.is_some(), self.list_aliases.is_some())?;
        wants("grants", e.grants.is_some(), self.list_grants.is_some())?;
        if e.tags.is_some() && self.list_resource_tags.is_none() && self.tag_resource.is_none() && self.untag_resource.is_none() {
            return Err((format!("{expect_path}.tags"), "tags belong to tag steps".into()));
        }
        if let Some(name) = &e.error {
            if !name.parse::<ErrorCode>().is_ok_and(|code| EXPECTABLE_ERRORS.contains(&code)) {
                let names: Vec<&str> = EXPECTABLE_ERRORS.iter().map(|c| c.as_str()).collect();
                return Err((
                    format!("{expect_path}.error"),
                    format!("unknown error name {name:?}; expected one of {}", names.join(", ")),
                ));
            }
        }
        if e.ok == Some(false) {
            return Err((format!("{expect_path}.ok"), "only `true` is meaningful; expect an error by name instead".into()));
        }
        let op = if let Some(a) = &self.authorize {
            // A request the engine refuses (a malformed field, session tags
            // on a principal that is not a session) answers no decision.
            let refused = e.error.is_some() && !decision_fields && outcome_fields == 1;
            if refused && e.error.as_deref() != Some(ErrorCode::Validation.as_str()) {
                return Err((
                    format!("{expect_path}.error"),
                    "an authorize step can only be refused as a malformed request: expect \"ValidationException\"".into(),
                ));
            }
            if !refused && (e.decision.is_none() || outcome_fields > 0) {
                return Err((
                    expect_path,
                    "an authorize step expects a decision (and optionally reason and matched), or the error \"ValidationException\"".into(),
                ));
            }
            let at = format!("{path}.authorize");
            let mut req = Request {
                principal: a.principal.clone(),
                action: a.action.clone(),
                resource: a.resource.clone(),
                request_tags: a.request_tags.as_ref().map(pairs).unwrap_or_default(),
                tag_keys: a.tag_keys.clone(),
                session_tags: pairs(&a.principal_tags),
                context: context_values(&at, &a.context)?,
            };
            if a.request_tags.is_some() {
                req.derive_tag_keys();
            }
            Operation::Authorize(req)
        } else {
            if decision_fields {
                return Err((expect_path, "decision, reason and matched belong to authorize steps".into()));
            }
            if outcome_fields != 1 {
                return Err((expect_path, "expect one of ok, tags or error".into()));
            }
            let tag = |principal: &String,
                       resource: &String,
                       op: TagOp,
                       st: &BTreeMap<String, String>,
                       ctx: &BTreeMap<String, Value>,
                       at: String| {
                Ok::<_, (String, String)>(Operation::Tag(TagRequest {
                    principal: principal.clone(),
                    resource: resource.clone(),
                    op,
                    session_tags: pairs(st),
                    context: context_values(&at, ctx)?,
                }))
            };
            if let Some(t) = &self.tag_resource {
                tag(
                    &t.principal,
                    &t.resource,
                    TagOp::Tag(pairs(&t.tags)),
                    &t.principal_tags,
                    &t.context,
                    format!("{path}.tag_resource"),
                )?
            } else if let Some(t) = &self.untag_resource {
                tag(
                    &t.principal,
                    &t.resource,
                    TagOp::Untag(t.tag_keys.clone()),
                    &t.principal_tags,
                    &t.context,
                    format!("{path}.untag_resource"),
                )?
            } else if let Some(t) = &self.list_resource_tags {
                tag(&t.principal, &t.resource, TagOp::List, &t.principal_tags, &t.context, format!("{path}.list_resource_tags"))?
            } else if let Some(p) = &self.put_policy {
                Operation::PutPolicy { name: p.name.clone(), document: p.document.clone() }
            } else if let Some(d) = &self.delete_policy {
                Operation::DeletePolicy { name: d.name.clone() }
            } else {
                self.lower_kms(path, home)?
            }
        };
        Ok(LoadedStep { name: self.name.clone(), op, expect: self.expect.clone() })
    }

    /// The KMS alias and grant steps.
    fn lower_kms(&self, path: &str, home: Option<(&str, &str)>) -> Result<Operation, (String, String)> {
        let kms = |principal: &String, op: KmsOp, st: &BTreeMap<String, String>, ctx: &BTreeMap<String, Value>, at: &str| {
            Ok::<_, (String, String)>(Operation::Kms(KmsRequest {
                principal: principal.clone(),
                op,
                session_tags: pairs(st),
                context: context_values(&format!("{path}.{at}"), ctx)?,
            }))
        };
        if let Some(a) = &self.create_alias {
            kms(
                &a.principal,
                KmsOp::CreateAlias { alias: a.alias.clone(), key: a.key.clone() },
                &a.principal_tags,
                &a.context,
                "create_alias",
            )
        } else if let Some(a) = &self.update_alias {
            kms(
                &a.principal,
                KmsOp::UpdateAlias { alias: a.alias.clone(), key: a.key.clone() },
                &a.principal_tags,
                &a.context,
                "update_alias",
            )
        } else if let Some(d) = &self.delete_alias {
            let region = d.region.clone().or_else(|| home.map(|h| h.0.to_string()));
            let account = d.account.clone().or_else(|| home.map(|h| h.1.to_string()));
            kms(
                &d.principal,
                KmsOp::DeleteAlias { alias: d.alias.clone(), region, account },
                &d.principal_tags,
                &d.context,
                "delete_alias",
            )
        } else if let Some(l) = &self.list_aliases {
            kms(&l.principal, KmsOp::ListAliases { key: l.key.clone() }, &l.principal_tags, &l.context, "list_aliases")
        } else if let Some(c) = &self.create_grant {
            if !c.grant.id.is_empty() {
                return Err((
                    format!("{path}.create_grant.grant.id"),
                    "Tagward assigns a new grant's id; name it with expect.grant_id".into(),
                ));
            }
            kms(
                &c.principal,
                KmsOp::CreateGrant { key: c.key.clone(), grant: c.grant.clone() },
                &c.principal_tags,
                &c.context,
                "create_grant",
            )
        } else if let Some(g) = &self.retire_grant {
            let op = KmsOp::RetireGrant { key: g.key.clone(), grant_id: g.grant_id.clone() };
            kms(&g.principal, op, &g.principal_tags, &g.context, "retire_grant")
        } else if let Some(g) = &self.revoke_grant {
            let op = KmsOp::RevokeGrant { key: g.key.clone(), grant_id: g.grant_id.clone() };
            kms(&g.principal, op, &g.principal_tags, &g.context, "revoke_grant")
        } else if let Some(l) = &self.list_grants {
            kms(&l.principal, KmsOp::ListGrants { key: l.key.clone() }, &l.principal_tags, &l.context, "list_grants")
        } else {
            Err((path.to_string(), "no operation".into()))
        }
    }
}

/// Parses scenario text (JSON, or YAML when `yaml`) and checks its shape.
pub fn parse(file: &str, text: &str, yaml: bool) -> Result<Scenario, LoadError> {
    let fail = |path: &str, message: String| LoadError { file: file.to_string(), path: path.to_string(), message };
    let parsed: ScenarioFile = document::parse(text, yaml).map_err(|e| fail(&e.path, e.message))?;
    let world = WorldSpec {
        policies: parsed.policies,
        principals: parsed.principals,
        resources: parsed.resources,
        organization: parsed.organization,
        sessions: parsed.sessions,
        vpc_endpoints: parsed.vpc_endpoints,
    };
    // A delete_alias step without region and account: those of the first key.
    let home = world
        .resources
        .iter()
        .filter(|r| tagward_core::state::is_kms_key(&r.arn))
        .find_map(|r| tagward_core::arn::Arn::parse(&r.arn).map(|a| (a.region, a.account)));
    // Check the world now, so a broken policy fails the load, not step 1.
    world.build().map_err(|e| fail(&e.path.to_string(), e.message))?;
    let steps = parsed
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| s.lower(&format!("steps[{i}]"), home))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|(path, message)| fail(&path, message))?;
    Ok(Scenario { file: file.to_string(), name: parsed.name, world, steps })
}

/// Reads and parses one scenario file.
pub fn load(path: &Path) -> Result<Scenario, LoadError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| LoadError {
        file: file.clone(),
        path: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse(&file, &text, document::is_yaml(path))
}

/// The scenario files named by `paths`: files as given, directories
/// searched recursively for `*.json`, `*.yaml` and `*.yml`, sorted.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if document::is_yaml(&p) || p.extension().is_some_and(|e| e == "json") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        let fail = |message: String| LoadError { file: p.display().to_string(), path: String::new(), message };
        if p.is_dir() {
            let before = out.len();
            walk(p, &mut out).map_err(|e| fail(format!("cannot read directory: {e}")))?;
            if out.len() == before {
                return Err(fail("no scenario files (*.json, *.yaml, *.yml) in this directory".into()));
            }
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(fail("no such file or directory".into()));
        }
    }
    Ok(out)
}

/// The result of running one scenario.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub passed: usize,
    /// One line per failing step.
    pub failures: Vec<String>,
}

/// Runs a scenario's steps in order on `backend`, starting from its world.
pub fn run(scenario: &Scenario, backend: &mut dyn Backend) -> Report {
    let mut report = Report::default();
    if let Err(e) = backend.load(&scenario.world) {
        report.failures.push(format!("{}: the world could not be loaded: {e}", scenario.file));
        return report;
    }
    // Grant names from `expect.grant_id` to the ids the backend assigned.
    let mut grant_names: BTreeMap<String, String> = BTreeMap::new();
    for (i, step) in scenario.steps.iter().enumerate() {
        let observed = match named_grant(&step.op, &grant_names) {
            Some(op) => backend.run(&op),
            None => backend.run(&step.op),
        };
        if let (Some(name), Observed::Kms(KmsAnswer::GrantCreated { grant_id })) = (&step.expect.grant_id, &observed) {
            grant_names.insert(name.clone(), grant_id.clone());
        }
        let observed = with_grant_names(observed, &grant_names);
        match compare(&step.expect, &observed) {
            None => report.passed += 1,
            Some(diff) => {
                let name = step.name.as_deref().map(|n| format!(" {n:?}")).unwrap_or_default();
                report.failures.push(format!("{}: steps[{i}]{name}: {diff}", scenario.file));
            }
        }
    }
    report
}

/// The operation with a grant name (from an earlier `create_grant`) replaced
/// by the grant's id; `None` when nothing needs replacing.
fn named_grant(op: &Operation, names: &BTreeMap<String, String>) -> Option<Operation> {
    let Operation::Kms(req) = op else { return None };
    let (KmsOp::RetireGrant { grant_id, .. } | KmsOp::RevokeGrant { grant_id, .. }) = &req.op else { return None };
    let id = names.get(grant_id)?;
    let mut req = req.clone();
    if let KmsOp::RetireGrant { grant_id, .. } | KmsOp::RevokeGrant { grant_id, .. } = &mut req.op {
        *grant_id = id.clone();
    }
    Some(Operation::Kms(req))
}

/// An answer with the ids of named grants replaced by their names, so that
/// `expect` can compare them.
fn with_grant_names(observed: Observed, names: &BTreeMap<String, String>) -> Observed {
    if names.is_empty() {
        return observed;
    }
    let name_of = |id: &str| names.iter().find(|(_, v)| v.as_str() == id).map(|(k, _)| k.clone());
    match observed {
        Observed::Kms(KmsAnswer::Grants(grants)) => Observed::Kms(KmsAnswer::Grants(
            grants.into_iter().map(|g| GrantSpec { id: name_of(&g.id).unwrap_or(g.id.clone()), ..g }).collect(),
        )),
        Observed::Decision { allowed, reason, matched, missing } => Observed::Decision {
            allowed,
            reason,
            matched: matched.into_iter().map(|(d, sid)| (d, sid.map(|s| name_of(&s).unwrap_or(s)))).collect(),
            missing,
        },
        other => other,
    }
}

fn describe(observed: &Observed) -> String {
    match observed {
        Observed::Decision { allowed, reason, matched, missing } => {
            let mut s = format!("{} ({reason})", if *allowed { "Allow" } else { "Deny" });
            if !matched.is_empty() {
                let names: Vec<&str> = matched.iter().map(|(d, _)| d.as_str()).collect();
                let _ = write!(s, " decided by {}", names.join(", "));
            }
            if !missing.is_empty() {
                let _ = write!(s, "; the request lacked {}", missing.join(", "));
            }
            s
        }
        Observed::Ok { tags: Some(tags) } => format!("ok with tags {tags:?}"),
        Observed::Ok { tags: None } => "ok".to_string(),
        Observed::Kms(KmsAnswer::Done) => "ok".to_string(),
        Observed::Kms(KmsAnswer::GrantCreated { grant_id }) => format!("ok, grant {grant_id}"),
        Observed::Kms(KmsAnswer::Aliases(list)) => {
            format!("aliases {:?}", list.iter().map(|a| a.name.as_str()).collect::<Vec<_>>())
        }
        Observed::Kms(KmsAnswer::Grants(list)) => format!("grants {:?}", list.iter().map(|g| g.id.as_str()).collect::<Vec<_>>()),
        Observed::Error { name, message } => format!("{name} ({message})"),
    }
}

/// `None` when `observed` is what `expect` says; else what differs.
pub fn compare(expect: &Expect, observed: &Observed) -> Option<String> {
    let got = describe(observed);
    if let Some(decision) = expect.decision {
        let Observed::Decision { allowed, reason, matched, .. } = observed else {
            return Some(format!("expected a decision, got {got}"));
        };
        let want_allow = decision == ExpectDecision::Allow;
        let mut wanted = format!("{decision:?}");
        if let Some(r) = expect.reason {
            let _ = write!(wanted, " ({})", r.as_str());
        }
        if *allowed != want_allow || expect.reason.is_some_and(|r| r.as_str() != reason) {
            return Some(format!("expected {wanted}, got {got}"));
        }
        if let Some(want) = &expect.matched {
            let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
            let have: BTreeSet<&str> = matched.iter().filter_map(|(_, sid)| sid.as_deref()).collect();
            if want != have {
                return Some(format!("expected matched Sids {want:?}, got {have:?}: {got}"));
            }
        }
        return None;
    }
    if let Some(name) = &expect.error {
        return match observed {
            Observed::Error { name: n, .. } if n == name => None,
            _ => Some(format!("expected {name}, got {got}")),
        };
    }
    if let Some(want) = &expect.aliases {
        let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
        return match observed {
            Observed::Kms(KmsAnswer::Aliases(list)) if list.iter().map(|a| a.name.as_str()).collect::<BTreeSet<_>>() == want => {
                None
            }
            _ => Some(format!("expected aliases {want:?}, got {got}")),
        };
    }
    if let Some(want) = &expect.grants {
        let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
        return match observed {
            Observed::Kms(KmsAnswer::Grants(list)) if list.iter().map(|g| g.id.as_str()).collect::<BTreeSet<_>>() == want => None,
            _ => Some(format!("expected grants {want:?}, got {got}")),
        };
    }
    if let Some(want) = &expect.tags {
        return match observed {
            Observed::Ok { tags: Some(tags) } if tags == want => None,
            _ => Some(format!("expected tags {want:?}, got {got}")),
        };
    }
    match observed {
        Observed::Ok { .. } | Observed::Kms(_) => None,
        _ => Some(format!("expected ok, got {got}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_errors_name_the_path() {
        let e = parse("f.json", r#"{"steps": [{"authorize": {}, "expect": {"decision": "Allow"}}]}"#, false).unwrap_err();
        assert_eq!(e.path, "steps[0].authorize");
        assert!(e.message.contains("missing field `principal`"), "{e}");
        let e = parse("f.json", r#"{"steps": [{"expect": {"decision": "Permit"}}]}"#, false).unwrap_err();
        assert_eq!(e.path, "steps[0].expect.decision");
        let e = parse(
            "f.json",
            r#"{"policies": {"P": {"Statement": {"Effect": "Permit", "Action": "kms:*", "Resource": "*"}}}}"#,
            false,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), r#"f.json: policies.P.Statement.Effect: expected "Allow" or "Deny", found "Permit""#);
        let e = parse("f.json", r#"{"stepz": []}"#, false).unwrap_err();
        assert!(e.message.contains("unknown field `stepz`"), "{e}");
        let e = parse("f.yaml", "steps:\n  - expect: {ok: true}\n", true).unwrap_err();
        assert_eq!(e.path, "steps[0]");
    }
    #[test]
    fn tag_steps_have_no_action_override() {
        let step = r#"{"steps": [{"tag_resource": {"principal": "arn:aws:iam::111122223333:role/R", "resource": "arn:aws:iam::111122223333:role/R",
            "tags": {"a": "b"}, "action": "kms:Decrypt"}, "expect": {"ok": true}}]}"#;
        let e = parse("f.json", step, false).unwrap_err();
        assert_eq!(e.path, "steps[0].tag_resource.action");
        assert!(e.message.contains("unknown field `action`"), "{e}");
    }

    #[test]
    fn an_authorize_step_may_expect_only_a_validation_error() {
        let step = |expect: &str| {
            format!(
                r#"{{"steps": [{{"authorize": {{"principal": "arn:aws:iam::111122223333:role/R", "action": "kms:Decrypt", "resource": "*",
                "principal_tags": {{"a": "b"}}}}, "expect": {expect}}}]}}"#
            )
        };
        let s = parse("f.json", &step(r#"{"error": "ValidationException"}"#), false).unwrap();
        let report = run(&s, &mut InProcess::default());
        assert_eq!((report.passed, report.failures.len()), (1, 0), "{:?}", report.failures);
        let e = parse("f.json", &step(r#"{"error": "AccessDeniedException"}"#), false).unwrap_err();
        assert_eq!(e.path, "steps[0].expect.error");
        let e = parse("f.json", &step(r#"{"error": "ValidationException", "decision": "Deny"}"#), false).unwrap_err();
        assert_eq!(e.path, "steps[0].expect");
        let e = parse("f.json", &step(r#"{"ok": true}"#), false).unwrap_err();
        assert_eq!(e.path, "steps[0].expect");
    }
}
