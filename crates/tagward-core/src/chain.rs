//! The wider authorization chain's state (docs/semantics.md, "The whole
//! chain"): the organization with its service and resource control
//! policies, assumed-role sessions declared with session policies and
//! session tags, and VPC endpoints with their endpoint policies.
//!
//! Each has a serde wire form (`*Spec`, as world files and the admin stream
//! write it) lowered by a fallible builder into the compiled form the
//! engine reads. The organization is lowered once into one entry per
//! account (the SCPs of every level of its path, its RCPs, its
//! `aws:PrincipalOrgPaths` value), so a decision walks no tree.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::arn::{is_account_id, Caller, CallerKind};
use crate::error::ErrorCode;
use crate::path::FieldPath;
use crate::policy::{Policy, PolicyKind};
use crate::tags::TagSet;
use crate::world::{compile_policy, WorldError};

/// An AWS Organizations organization, as a world file writes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrganizationSpec {
    /// The organization id (`o-...`), for `aws:PrincipalOrgID`,
    /// `aws:ResourceOrgID` and the first part of the org paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// No SCP applies to its principals and no RCP to its resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_account: Option<String>,
    /// SCP and RCP documents by name.
    #[serde(default)]
    pub policies: BTreeMap<String, Value>,
    /// The root (no parent, exactly one) and the organizational units.
    #[serde(default)]
    pub units: Vec<OrgNodeSpec>,
    /// Member accounts.
    #[serde(default)]
    pub accounts: Vec<OrgNodeSpec>,
}

/// The root, a unit or an account of an organization.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgNodeSpec {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default)]
    pub scps: Vec<String>,
    #[serde(default)]
    pub rcps: Vec<String>,
}

/// An assumed-role session that carries session policies or session tags.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    /// `arn:aws:sts::ACCOUNT:assumed-role/ROLE/NAME`.
    pub arn: String,
    /// The inline session policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Value>,
    /// Managed session policies, by name among the managed policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// A VPC endpoint and its endpoint policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// The endpoint id, as `aws:SourceVpce` names it.
    pub id: String,
    /// Absent: the endpoint allows everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Value>,
}

/// A policy with the name it is known by in answers.
pub type NamedPolicy = (Arc<str>, Arc<Policy>);

/// What the organization means for one account.
#[derive(Debug, Clone)]
pub struct OrgAccount {
    /// The management account: exempt from SCPs (its principals) and RCPs
    /// (its resources).
    pub management: bool,
    /// The SCPs of each level of the account's path, root first, the
    /// account last. INVARIANT: no level is empty for a member account.
    pub scp_levels: Vec<Vec<NamedPolicy>>,
    /// The RCPs of every level of the path (they only deny, so levels need
    /// not be told apart).
    pub rcps: Vec<NamedPolicy>,
    /// `aws:PrincipalOrgPaths` / `aws:ResourceOrgPaths`: one
    /// `o-ID/r-ROOT/ou-.../` entry when the organization has an id, else
    /// none (the key is then missing).
    pub paths: Vec<String>,
}

/// An organization lowered for the engine.
#[derive(Debug, Clone)]
pub struct Organization {
    /// The organization as given, for export.
    pub spec: OrganizationSpec,
    pub id: Option<Arc<str>>,
    accounts: HashMap<Box<str>, Arc<OrgAccount>>,
}

impl Organization {
    /// The account's place in the organization; `None` outside it.
    pub fn account(&self, id: &str) -> Option<&OrgAccount> {
        self.accounts.get(id).map(|a| &**a)
    }
}

fn invalid(path: FieldPath, message: impl Into<String>) -> WorldError {
    WorldError::new(ErrorCode::Validation, path, message)
}

fn unknown_policy(path: FieldPath, name: &str) -> WorldError {
    WorldError::new(ErrorCode::MalformedPolicyDocument, path, format!("no organization policy named {name:?}"))
}

impl OrganizationSpec {
    /// Checks the tree and the attachments and compiles the policies;
    /// `path` prefixes every error (`organization`).
    pub fn build(&self, path: &FieldPath) -> Result<Organization, WorldError> {
        if let Some(id) = &self.id {
            if id.is_empty() {
                return Err(invalid(path.then("id"), "empty: an organization id looks like o-a1b2c3d4e5"));
            }
        }
        if let Some(m) = &self.management_account {
            if !is_account_id(m) {
                return Err(invalid(path.then("management_account"), format!("{m:?} is not a 12-digit account id")));
            }
        }
        // Compiled lazily per use: an SCP is an identity-style policy (no
        // Principal), an RCP a resource-style one (Principal required).
        let mut scps: HashMap<String, Arc<Policy>> = HashMap::new();
        let mut rcps: HashMap<String, Arc<Policy>> = HashMap::new();
        let mut compile = |field: FieldPath, name: &str, rcp: bool| -> Result<NamedPolicy, WorldError> {
            let doc = self.policies.get(name).ok_or_else(|| unknown_policy(field, name))?;
            let cache = if rcp { &mut rcps } else { &mut scps };
            if let Some(p) = cache.get(name) {
                return Ok((name.into(), p.clone()));
            }
            let kind = if rcp { PolicyKind::Resource } else { PolicyKind::Identity };
            let policy = compile_policy(path.then("policies").then(name), doc, kind)?;
            cache.insert(name.to_string(), policy.clone());
            Ok((name.into(), policy))
        };

        // Units: ids unique, exactly one root, parents known, no cycle.
        let mut units: HashMap<&str, usize> = HashMap::new();
        for (i, u) in self.units.iter().enumerate() {
            let at = path.then("units").at(i);
            if u.id.is_empty() {
                return Err(invalid(at.then("id"), "empty"));
            }
            if units.insert(u.id.as_str(), i).is_some() {
                return Err(invalid(at.then("id"), format!("{:?} is listed twice", u.id)));
            }
        }
        let roots: Vec<usize> = self.units.iter().enumerate().filter(|(_, u)| u.parent.is_none()).map(|(i, _)| i).collect();
        match roots.as_slice() {
            [_] => {}
            [] if self.units.is_empty() && self.accounts.is_empty() => {}
            [] => return Err(invalid(path.then("units"), "no root: exactly one unit has no parent")),
            [_, second, ..] => {
                return Err(invalid(
                    path.then("units").at(*second).then("parent"),
                    "a second root: exactly one unit has no parent",
                ))
            }
        }
        // Each unit's levels (root first) of compiled SCPs and its RCPs.
        let mut unit_levels: Vec<UnitPath> = Vec::with_capacity(self.units.len());
        for start in 0..self.units.len() {
            // Walk up to the root, refusing cycles.
            let mut chain = vec![start];
            let mut seen: HashSet<usize> = HashSet::from([start]);
            let mut at = start;
            while let Some(parent) = &self.units[at].parent {
                let field = path.then("units").at(at).then("parent");
                let &p = units.get(parent.as_str()).ok_or_else(|| invalid(field.clone(), format!("no unit {parent:?}")))?;
                if !seen.insert(p) {
                    return Err(invalid(field, format!("{parent:?} makes a cycle")));
                }
                chain.push(p);
                at = p;
            }
            chain.reverse();
            let mut levels = Vec::with_capacity(chain.len());
            let mut all_rcps = Vec::new();
            let mut ids = Vec::with_capacity(chain.len());
            for &u in &chain {
                let node = &self.units[u];
                let at = path.then("units").at(u);
                levels.push(attach(&at, node, &mut compile, &mut all_rcps)?);
                ids.push(node.id.clone());
            }
            unit_levels.push((levels, all_rcps, ids));
        }

        let mut accounts: HashMap<Box<str>, Arc<OrgAccount>> = HashMap::new();
        let org_path = |ids: &[String]| -> Vec<String> {
            let Some(id) = self.id.as_ref() else { return Vec::new() };
            let mut s = format!("{id}/");
            for unit in ids {
                s.push_str(unit);
                s.push('/');
            }
            vec![s]
        };
        for (i, a) in self.accounts.iter().enumerate() {
            let at = path.then("accounts").at(i);
            if !is_account_id(&a.id) {
                return Err(invalid(at.then("id"), format!("{:?} is not a 12-digit account id", a.id)));
            }
            if accounts.contains_key(a.id.as_str()) {
                return Err(invalid(at.then("id"), format!("{:?} is listed twice", a.id)));
            }
            let parent =
                a.parent.as_deref().ok_or_else(|| invalid(at.then("parent"), "missing: an account's parent is a unit"))?;
            let &u = units.get(parent).ok_or_else(|| invalid(at.then("parent"), format!("no unit {parent:?}")))?;
            let Some((levels, rcps, ids)) = unit_levels.get(u) else {
                return Err(invalid(at.then("parent"), format!("no unit {parent:?}")));
            };
            let (mut levels, mut rcps, ids) = (levels.clone(), rcps.clone(), ids.clone());
            levels.push(attach(&at, a, &mut compile, &mut rcps)?);
            let management = self.management_account.as_deref() == Some(a.id.as_str());
            if !management {
                // INVARIANT of OrgAccount::scp_levels.
                if let Some(level) = levels.iter().position(Vec::is_empty) {
                    let (field, which) = if level + 1 == levels.len() {
                        (at.then("scps"), format!("account {:?}", a.id))
                    } else {
                        let unit = ids.get(level).cloned().unwrap_or_default();
                        (
                            path.then("units").at(units.get(unit.as_str()).copied().unwrap_or(0)).then("scps"),
                            format!("unit {unit:?}"),
                        )
                    };
                    return Err(invalid(
                        field,
                        format!("{which} attaches no SCP: every level of a member account's path needs at least one (AWS attaches FullAWSAccess by default)"),
                    ));
                }
            }
            accounts.insert(
                a.id.as_str().into(),
                Arc::new(OrgAccount { management, scp_levels: levels, rcps, paths: org_path(&ids) }),
            );
        }
        if let Some(m) = &self.management_account {
            if !accounts.contains_key(m.as_str()) {
                let ids = roots.first().map(|&r| vec![self.units[r].id.clone()]).unwrap_or_default();
                accounts.insert(
                    m.as_str().into(),
                    Arc::new(OrgAccount { management: true, scp_levels: Vec::new(), rcps: Vec::new(), paths: org_path(&ids) }),
                );
            }
        }
        Ok(Organization { spec: self.clone(), id: self.id.as_deref().map(Arc::from), accounts })
    }
}

/// A unit's path from the root: the SCPs of each level, the RCPs of all
/// levels, the unit ids.
type UnitPath = (Vec<Vec<NamedPolicy>>, Vec<NamedPolicy>, Vec<String>);

/// One level's SCPs (returned) and RCPs (appended to `rcps`).
fn attach(
    at: &FieldPath,
    node: &OrgNodeSpec,
    compile: &mut impl FnMut(FieldPath, &str, bool) -> Result<NamedPolicy, WorldError>,
    rcps: &mut Vec<NamedPolicy>,
) -> Result<Vec<NamedPolicy>, WorldError> {
    let mut level = Vec::with_capacity(node.scps.len());
    for (j, name) in node.scps.iter().enumerate() {
        level.push(compile(at.then("scps").at(j), name, false)?);
    }
    for (j, name) in node.rcps.iter().enumerate() {
        let named = compile(at.then("rcps").at(j), name, true)?;
        if !rcps.iter().any(|(n, _)| *n == named.0) {
            rcps.push(named);
        }
    }
    Ok(level)
}

/// A declared assumed-role session.
#[derive(Debug, Clone)]
pub struct Session {
    pub arn: Arc<str>,
    pub inline: Option<Arc<Policy>>,
    /// Managed session policies by name; looked up per decision (a name
    /// with no policy is skipped).
    pub managed: Vec<Arc<str>>,
    /// Session tags: a request's own session tags override them.
    pub tags: TagSet,
}

impl Session {
    /// True when the session was given any session policy: identity-based
    /// permissions must then be allowed by one of them too.
    pub fn has_policies(&self) -> bool {
        self.inline.is_some() || !self.managed.is_empty()
    }
}

impl SessionSpec {
    /// Lowers the session; the role must be checked by the caller (the
    /// world file requires it, the admin stream does not).
    pub fn build(&self, path: &FieldPath) -> Result<Session, WorldError> {
        let caller = Caller::parse(&self.arn).map_err(|e| invalid(path.then("arn"), e.to_string()))?;
        if !matches!(caller.kind, CallerKind::Session { .. }) {
            return Err(invalid(
                path.then("arn"),
                format!("{:?} is not an assumed-role session (arn:aws:sts::ACCOUNT:assumed-role/ROLE/NAME)", self.arn),
            ));
        }
        let inline = match &self.policy {
            Some(doc) => Some(compile_policy(path.then("policy"), doc, PolicyKind::Identity)?),
            None => None,
        };
        let tags = TagSet::from_tags(true, self.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| WorldError::new(ErrorCode::Tag, path.then("tags"), e.to_string()))?;
        Ok(Session {
            arn: self.arn.as_str().into(),
            inline,
            managed: self.policies.iter().map(|n| Arc::from(n.as_str())).collect(),
            tags,
        })
    }

    /// The session's account and role name.
    pub fn role(&self) -> Option<(&str, &str)> {
        match Caller::parse(&self.arn) {
            Ok(Caller { account, kind: CallerKind::Session { role, .. }, .. }) => Some((account, role)),
            _ => None,
        }
    }
}

/// A VPC endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub id: Arc<str>,
    pub policy: Option<Arc<Policy>>,
}

impl EndpointSpec {
    pub fn build(&self, path: &FieldPath) -> Result<Endpoint, WorldError> {
        if self.id.is_empty() || self.id.trim() != self.id {
            return Err(invalid(path.then("id"), format!("{:?} is not an endpoint id such as vpce-0a1b2c3d4e5f67890", self.id)));
        }
        let policy = match &self.policy {
            Some(doc) => Some(compile_policy(path.then("policy"), doc, PolicyKind::Resource)?),
            None => None,
        };
        Ok(Endpoint { id: self.id.as_str().into(), policy })
    }
}

/// The services whose resources RCPs restrict (AWS Organizations, "List of
/// AWS services that support RCPs"), as action prefixes.
pub const RCP_SERVICES: &[&str] =
    &["s3", "sts", "kms", "sqs", "secretsmanager", "cognito-identity", "logs", "dynamodb", "ecr", "aoss"];

/// Does an RCP restrict this action (lowercased)? Only the listed services,
/// and never `kms:RetireGrant`.
pub fn rcp_covers(action_lower: &str) -> bool {
    let service = action_lower.split_once(':').map_or(action_lower, |(s, _)| s);
    RCP_SERVICES.contains(&service) && action_lower != "kms:retiregrant"
}

/// The actions a role's trust policy decides (lowercased).
pub const TRUST_ACTIONS: &[&str] =
    &["sts:assumerole", "sts:assumerolewithwebidentity", "sts:assumerolewithsaml", "sts:tagsession", "sts:setsourceidentity"];

/// True for a service-linked role (`role/aws-service-role/...`), to which
/// SCPs and RCPs do not apply.
pub fn is_service_linked_role(role_arn: &str) -> bool {
    role_arn.split_once(":role/").is_some_and(|(_, rest)| rest.starts_with("aws-service-role/"))
}
