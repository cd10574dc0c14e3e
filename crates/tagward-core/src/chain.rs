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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::arn::{Caller, CallerKind};
use crate::policy::Policy;
use crate::tags::TagSet;

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
    pub(crate) accounts: HashMap<Box<str>, Arc<OrgAccount>>,
}

impl Organization {
    /// The account's place in the organization; `None` outside it.
    pub fn account(&self, id: &str) -> Option<&OrgAccount> {
        self.accounts.get(id).map(|a| &**a)
    }
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
