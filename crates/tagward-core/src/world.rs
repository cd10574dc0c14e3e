//! The world file: managed policies, principals and resources, as scenario
//! files and `tagward serve` describe them (docs/scenarios.md, "Top level",
//! "Principal", "Resource"). This is the wire form (serde,
//! `deny_unknown_fields`); [`WorldSpec::apply`] lowers it into a [`State`],
//! refusing the whole of it on the first error, which names the JSON path.

mod lower_chain;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use crate::arn::Arn;
use crate::chain::{EndpointSpec, OrganizationSpec, SessionSpec};
use crate::error::ErrorCode;
use crate::kms::{check_alias_name, Constraint, Grant, GrantOps, Grantee, KeyExtras, MAX_ALIASES_PER_KEY, MAX_GRANTS_PER_KEY};
use crate::path::FieldPath;
use crate::policy::{Policy, PolicyKind};
use crate::state::{is_kms_key, KeyInfo, KeyManager, KeyState, Principal, Resource, ResourceKind, SharedText, State, StateError};
use crate::tags::{TagCache, TagSet, TagSetError};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldSpec {
    /// Managed identity policies by name.
    #[serde(default)]
    pub policies: BTreeMap<String, Value>,
    #[serde(default)]
    pub principals: Vec<PrincipalSpec>,
    #[serde(default)]
    pub resources: Vec<ResourceSpec>,
    /// SCPs and RCPs (docs/scenarios.md, "The wider authorization chain").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<OrganizationSpec>,
    /// Assumed-role sessions with session policies or session tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<SessionSpec>,
    /// VPC endpoints and their endpoint policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vpc_endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSpec {
    pub arn: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Managed policies by name; in a world file each must exist.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Managed policy names attached before a policy of that name exists
    /// (the admin stream allows it): kept, and applying once the policy is
    /// put. A world file accepts them, so an export always imports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_policies: Vec<String>,
    #[serde(default)]
    pub inline_policies: BTreeMap<String, Value>,
    /// The name of a managed policy used as the permissions boundary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions_boundary: Option<String>,
    /// Roles only: the trust policy (a resource policy with `Principal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_policy: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    pub arn: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, deserialize_with = "read_tag_map")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_policy: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_spec: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_usage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_manager: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_policy: Option<Value>,
    /// KMS keys: alias names (`alias/NAME`), unique per account and region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// KMS keys: grants, ids unique per key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<GrantSpec>,
}

/// Reads a tag map as serde's own `BTreeMap` does (the same errors, a later
/// duplicate key wins), but collects the entries before building the map in
/// one pass: tags arrive in key order (a snapshot's, a world file's), and
/// inserting them one by one compared each key with its neighbours again,
/// ten million times in a restore.
fn read_tag_map<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = BTreeMap<String, String>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
            while let Some(entry) = map.next_entry::<String, String>()? {
                entries.push(entry);
            }
            // A stable sort, then the last of equal keys kept: as inserting.
            Ok(entries.into_iter().collect())
        }
    }
    deserializer.deserialize_map(Entries)
}

/// A grant in the world-file shape (docs/scenarios.md, "Grant").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    /// Unique per key; a world file must give it, CreateGrant assigns it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub grantee_principal: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_principal: Option<String>,
    /// KMS operation names without the `kms:` prefix.
    pub operations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<ConstraintSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A grant's encryption-context constraint: exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstraintSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_context_equals: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_context_subset: Option<BTreeMap<String, String>>,
}

/// Lowers a grant for a key of `key_spec` and `key_usage`, with `id`;
/// every error names the field under `path` and is a `ValidationException`.
pub fn build_grant(path: &FieldPath, spec: &GrantSpec, id: &str, key_spec: &str, key_usage: &str) -> Result<Grant, WorldError> {
    let grantee = Grantee::parse(&spec.grantee_principal).map_err(|e| invalid(path.then("grantee_principal"), e.to_string()))?;
    if let Some(r) = &spec.retiring_principal {
        Grantee::parse(r).map_err(|e| invalid(path.then("retiring_principal"), e.to_string()))?;
    }
    if spec.operations.is_empty() {
        return Err(invalid(path.then("operations"), "a grant needs at least one operation"));
    }
    let supported = GrantOps::supported_by(key_spec, key_usage);
    let mut operations = GrantOps::EMPTY;
    for (i, name) in spec.operations.iter().enumerate() {
        let op = GrantOps::named(name).ok_or_else(|| {
            invalid(
                path.then("operations").at(i),
                format!("{name:?} is not a grant operation; expected one of {}", crate::kms::GRANT_OPERATIONS.join(", ")),
            )
        })?;
        if !supported.contains(op) {
            return Err(invalid(
                path.then("operations").at(i),
                format!("a {key_spec} key for {key_usage} does not support {name}, so a grant cannot allow it"),
            ));
        }
        operations = operations.union(op);
    }
    let constraint = match &spec.constraints {
        None => None,
        Some(c) => {
            let at = path.then("constraints");
            let pairs = |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>();
            let constraint = match (&c.encryption_context_equals, &c.encryption_context_subset) {
                (Some(m), None) => Constraint::Equals(pairs(m)),
                (None, Some(m)) => Constraint::Subset(pairs(m)),
                _ => return Err(invalid(at, "give exactly one of encryption_context_equals and encryption_context_subset")),
            };
            // "The encryption context grant constraints are supported only on
            // grant operations that include an EncryptionContext parameter"
            // (CreateGrant).
            let allowed = GrantOps::with_encryption_context().union(GrantOps::unconstrained());
            let symmetric = key_spec == "SYMMETRIC_DEFAULT" && key_usage == "ENCRYPT_DECRYPT";
            if !symmetric || !allowed.contains(operations) {
                return Err(invalid(
                    at,
                    "an encryption context constraint needs a symmetric encryption key and only operations that take an encryption context (and DescribeKey, RetireGrant, CreateGrant)",
                ));
            }
            Some(constraint)
        }
    };
    if let Some(name) = &spec.name {
        let ok = !name.is_empty()
            && name.chars().count() <= 256
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '/' | '_' | '-'));
        if !ok {
            return Err(invalid(
                path.then("name"),
                format!("{name:?} is not a grant name: 1-256 letters, digits, ':', '/', '_', '-'"),
            ));
        }
    }
    Ok(Grant {
        id: id.into(),
        name: spec.name.as_deref().map(Arc::from),
        grantee,
        retiring: spec.retiring_principal.as_deref().map(Arc::from),
        operations,
        constraint,
    })
}

/// A grant in the world-file shape.
pub fn grant_spec(g: &Grant) -> GrantSpec {
    let map = |p: &[(String, String)]| p.iter().cloned().collect::<BTreeMap<String, String>>();
    GrantSpec {
        id: g.id.to_string(),
        grantee_principal: g.grantee.arn().to_string(),
        retiring_principal: g.retiring.as_deref().map(str::to_string),
        operations: g.operations.names().map(str::to_string).collect(),
        constraints: g.constraint.as_ref().map(|c| match c {
            Constraint::Equals(p) => ConstraintSpec { encryption_context_equals: Some(map(p)), ..Default::default() },
            Constraint::Subset(p) => ConstraintSpec { encryption_context_subset: Some(map(p)), ..Default::default() },
        }),
        name: g.name.as_deref().map(str::to_string),
    }
}

/// The aliases and grants of a key spec, checked.
fn key_extras(
    path: &FieldPath,
    aliases: &[String],
    grants: &[GrantSpec],
    manager: KeyManager,
    key_spec: &str,
    key_usage: &str,
) -> Result<Option<Arc<KeyExtras>>, WorldError> {
    if aliases.is_empty() && grants.is_empty() {
        return Ok(None);
    }
    let mut extras = KeyExtras::default();
    for (i, name) in aliases.iter().enumerate() {
        check_alias_name(name, manager == KeyManager::Aws)
            .map_err(|e| WorldError::new(ErrorCode::InvalidAliasName, path.then("aliases").at(i), e.to_string()))?;
        if extras.aliases.contains(name) {
            return Err(WorldError::new(
                ErrorCode::AlreadyExists,
                path.then("aliases").at(i),
                format!("{name:?} is listed twice"),
            ));
        }
        extras.aliases.push(name.clone());
    }
    if extras.aliases.len() > MAX_ALIASES_PER_KEY {
        return Err(WorldError::new(
            ErrorCode::LimitExceeded,
            path.then("aliases"),
            format!("a key has at most {MAX_ALIASES_PER_KEY} aliases"),
        ));
    }
    extras.aliases.sort();
    for (i, g) in grants.iter().enumerate() {
        let at = path.then("grants").at(i);
        if g.id.is_empty() {
            return Err(invalid(at.then("id"), "a grant in a world file needs an id"));
        }
        if extras.grant(&g.id).is_some() {
            return Err(WorldError::new(
                ErrorCode::AlreadyExists,
                at.then("id"),
                format!("grant id {:?} is used twice on this key", g.id),
            ));
        }
        extras.grants.push(build_grant(&at, g, &g.id, key_spec, key_usage)?);
    }
    if extras.grants.len() > MAX_GRANTS_PER_KEY {
        return Err(WorldError::new(
            ErrorCode::LimitExceeded,
            path.then("grants"),
            format!("a key has at most {MAX_GRANTS_PER_KEY} grants"),
        ));
    }
    Ok(Some(Arc::new(extras)))
}

/// A refused world: the JSON path, the reason, and which AWS error it is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}: {message}")]
pub struct WorldError {
    pub path: FieldPath,
    pub message: String,
    code: ErrorCode,
}

impl WorldError {
    pub fn new(code: ErrorCode, path: FieldPath, message: impl Into<String>) -> WorldError {
        WorldError { path, message: message.into(), code }
    }

    /// Which error this is, decided where it arose: a policy document (or a
    /// policy attachment or name) is `MalformedPolicyDocumentException`, a
    /// tag set `TagException` (its limit included), anything else
    /// `ValidationException`.
    pub fn code(&self) -> ErrorCode {
        self.code
    }
}

fn invalid(path: FieldPath, message: impl Into<String>) -> WorldError {
    WorldError::new(ErrorCode::Validation, path, message)
}

fn malformed_policy(path: FieldPath, message: impl Into<String>) -> WorldError {
    WorldError::new(ErrorCode::MalformedPolicyDocument, path, message)
}

fn bad_tags(path: FieldPath, e: TagSetError) -> WorldError {
    WorldError::new(ErrorCode::Tag, path, e.to_string())
}

/// Compiles a policy document found at `path` (errors carry the full path).
pub fn compile_policy(path: impl Into<FieldPath>, doc: &Value, kind: PolicyKind) -> Result<Arc<Policy>, WorldError> {
    Policy::compile(doc, kind).map(Arc::new).map_err(|e| malformed_policy(path.into().join(&e.path), e.message))
}

/// Compiles a role's trust policy. Trust policies name no `Resource` (the
/// role is the resource): a statement without `Resource` or `NotResource`
/// covers the role. The document is kept as given, for export.
pub fn compile_trust_policy(path: impl Into<FieldPath>, doc: &Value) -> Result<Arc<Policy>, WorldError> {
    let mut patched = doc.clone();
    let statements = match patched.get_mut("Statement") {
        Some(Value::Array(items)) => items.iter_mut().collect::<Vec<_>>(),
        Some(one @ Value::Object(_)) => vec![one],
        _ => Vec::new(),
    };
    for st in statements {
        if let Value::Object(fields) = st {
            if !fields.contains_key("Resource") && !fields.contains_key("NotResource") {
                fields.insert("Resource".into(), Value::String("*".into()));
            }
        }
    }
    let mut policy =
        Policy::compile(&patched, PolicyKind::Resource).map_err(|e| malformed_policy(path.into().join(&e.path), e.message))?;
    policy.source = Arc::new(doc.clone());
    Ok(Arc::new(policy))
}

/// The key policy a KMS key gets when none is given: the account's root may
/// do everything, which lets IAM policies grant access.
pub fn default_key_policy_document(account: &str) -> Value {
    json!({
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [{
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": format!("arn:aws:iam::{account}:root")},
            "Action": "kms:*",
            "Resource": "*"
        }]
    })
}

/// A resource's fields, borrowed: what [`ResourceBuilder::build_fields`]
/// lowers. A [`ResourceSpec`] lends its own ([`ResourceSpec::fields`]); a
/// snapshot record read in place lends the record's bytes.
pub struct ResourceFields<'a, T> {
    pub arn: &'a str,
    pub account: Option<&'a str>,
    /// The tags, in key order when they come from a map or a snapshot.
    pub tags: T,
    pub key_policy: Option<&'a Value>,
    pub key_state: Option<&'a str>,
    pub key_spec: Option<&'a str>,
    pub key_usage: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub key_manager: Option<&'a str>,
    pub resource_policy: Option<&'a Value>,
    pub aliases: &'a [String],
    pub grants: &'a [GrantSpec],
}

impl ResourceSpec {
    /// This spec's fields, borrowed, for [`ResourceBuilder::build_fields`].
    pub fn fields(&self) -> ResourceFields<'_, impl Iterator<Item = (&str, &str)> + '_> {
        ResourceFields {
            arn: &self.arn,
            account: self.account.as_deref(),
            tags: self.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            key_policy: self.key_policy.as_ref(),
            key_state: self.key_state.as_deref(),
            key_spec: self.key_spec.as_deref(),
            key_usage: self.key_usage.as_deref(),
            origin: self.origin.as_deref(),
            key_manager: self.key_manager.as_deref(),
            resource_policy: self.resource_policy.as_ref(),
            aliases: &self.aliases,
            grants: &self.grants,
        }
    }
}

/// Builds resources, sharing one compiled default key policy per account.
#[derive(Default)]
pub struct ResourceBuilder {
    default_policies: HashMap<String, Arc<Policy>>,
    /// Key specs, usages and origins: a handful of distinct values shared
    /// by a million keys, so each is stored once.
    key_fields: HashMap<String, SharedText>,
    /// Tags checked and interned, for the next resource that carries them.
    tags: TagCache,
}

impl ResourceBuilder {
    /// Lowers one resource spec; `path` prefixes every error.
    pub fn build(&mut self, path: impl Into<FieldPath>, spec: &ResourceSpec) -> Result<Resource, WorldError> {
        self.build_fields(path, spec.fields())
    }

    /// Lowers a resource's fields, borrowed from wherever they were read:
    /// what [`ResourceBuilder::build`] does with a spec's, with the same
    /// checks and errors.
    pub fn build_fields<'a>(
        &mut self,
        path: impl Into<FieldPath>,
        spec: ResourceFields<'a, impl IntoIterator<Item = (&'a str, &'a str)>>,
    ) -> Result<Resource, WorldError> {
        let path = path.into();
        let arn = Arn::parse(spec.arn).ok_or_else(|| {
            invalid(path.then("arn"), format!("{:?} is not an ARN (arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE)", spec.arn))
        })?;
        // Stored only when the ARN does not already say it.
        let account_override: Option<Arc<str>> = match spec.account {
            Some(a) if a != arn.account => Some(Arc::from(a)),
            _ => None,
        };
        let account = account_override.as_deref().or(Some(arn.account).filter(|a| !a.is_empty()));
        let is_key = is_kms_key(spec.arn);
        let tags = TagSet::from_tags_cached(&mut self.tags, spec.tags).map_err(|e| bad_tags(path.then("tags"), e))?;
        let kind = if is_key {
            if spec.resource_policy.is_some() {
                return Err(malformed_policy(path.then("resource_policy"), "a KMS key has a key_policy, not a resource_policy"));
            }
            let key_fields = &mut self.key_fields;
            let mut parse = |field: &str, v: Option<&str>, default: &str| -> Result<SharedText, WorldError> {
                let text = match v {
                    Some("") => return Err(invalid(path.then(field), "empty")),
                    Some(v) => v,
                    None => default,
                };
                if let Some(shared) = key_fields.get(text) {
                    return Ok(shared.clone());
                }
                Ok(key_fields.entry(text.to_string()).or_insert_with(|| SharedText::new(text)).clone())
            };
            let state = match spec.key_state {
                Some(s) => s.parse::<KeyState>().map_err(|e| invalid(path.then("key_state"), e.to_string()))?,
                None => KeyState::Enabled,
            };
            let manager = match spec.key_manager {
                Some(s) => s.parse::<KeyManager>().map_err(|e| invalid(path.then("key_manager"), e.to_string()))?,
                None => KeyManager::Customer,
            };
            let (policy, default_policy) = match spec.key_policy {
                Some(doc) => (compile_policy(path.then("key_policy"), doc, PolicyKind::Key)?, false),
                None => {
                    let acct = account.unwrap_or_default().to_string();
                    let policy = match self.default_policies.get(&acct) {
                        Some(p) => p.clone(),
                        None => {
                            let p =
                                compile_policy(path.then("key_policy"), &default_key_policy_document(&acct), PolicyKind::Key)?;
                            self.default_policies.insert(acct, p.clone());
                            p
                        }
                    };
                    (policy, true)
                }
            };
            let key_spec = parse("key_spec", spec.key_spec, "SYMMETRIC_DEFAULT")?;
            let usage = parse("key_usage", spec.key_usage, "ENCRYPT_DECRYPT")?;
            let extras = key_extras(&path, spec.aliases, spec.grants, manager, &key_spec, &usage)?;
            ResourceKind::Key(KeyInfo {
                state,
                spec: key_spec,
                usage,
                origin: parse("origin", spec.origin, "AWS_KMS")?,
                manager,
                policy,
                default_policy,
                extras,
            })
        } else {
            for (field, given) in [
                ("key_policy", spec.key_policy.is_some()),
                ("key_state", spec.key_state.is_some()),
                ("key_spec", spec.key_spec.is_some()),
                ("key_usage", spec.key_usage.is_some()),
                ("origin", spec.origin.is_some()),
                ("key_manager", spec.key_manager.is_some()),
                ("aliases", !spec.aliases.is_empty()),
                ("grants", !spec.grants.is_empty()),
            ] {
                if given {
                    let message = "only KMS keys (arn:aws:kms:...:key/ID) have this field";
                    // A key policy is a policy document in the wrong place.
                    return Err(if field == "key_policy" {
                        malformed_policy(path.then(field), message)
                    } else {
                        invalid(path.then(field), message)
                    });
                }
            }
            let policy = match spec.resource_policy {
                // An IAM role's resource policy is its trust policy.
                Some(doc) if arn.service == "iam" && arn.resource_type() == "role" => {
                    Some(compile_trust_policy(path.then("resource_policy"), doc)?)
                }
                Some(doc) => Some(compile_policy(path.then("resource_policy"), doc, PolicyKind::Resource)?),
                None => None,
            };
            ResourceKind::Other { policy }
        };
        Ok(Resource { arn: spec.arn.into(), account_override, tags, kind })
    }
}

/// Lowers a principal spec. With `require_policies` (a world file) every
/// name in `policies` must exist in `state` (a typo is an error); without
/// (the admin stream) a name may name a policy that comes later. Names in
/// `pending_policies` need not exist either way; they are attached after
/// `policies`.
pub fn build_principal(
    path: impl Into<FieldPath>,
    spec: &PrincipalSpec,
    state: &State,
    require_policies: bool,
) -> Result<Principal, WorldError> {
    let path = path.into();
    let mut principal = Principal::new(&spec.arn).map_err(|e| invalid(path.then("arn"), e.to_string()))?;
    principal.tags = TagSet::from_tags(true, spec.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| bad_tags(path.then("tags"), e))?;
    for (i, name) in spec.policies.iter().enumerate() {
        if require_policies && state.policy(name).is_none() {
            // Reported as a policy problem, as it always was.
            return Err(malformed_policy(path.then("policies").at(i), format!("no managed policy named {name:?}")));
        }
        principal.managed.push(name.as_str().into());
    }
    for name in &spec.pending_policies {
        principal.managed.push(name.as_str().into());
    }
    for (name, doc) in &spec.inline_policies {
        let policy = compile_policy(path.then("inline_policies").then(name.as_str()), doc, PolicyKind::Identity)?;
        principal.inline.push((name.as_str().into(), policy));
    }
    if let Some(name) = &spec.permissions_boundary {
        if name.is_empty() || (require_policies && state.policy(name).is_none()) {
            return Err(malformed_policy(path.then("permissions_boundary"), format!("no managed policy named {name:?}")));
        }
        principal.boundary = Some(name.as_str().into());
    }
    if let Some(doc) = &spec.trust_policy {
        if !principal.is_role() {
            return Err(malformed_policy(path.then("trust_policy"), "only roles have a trust policy"));
        }
        principal.trust_policy = Some(compile_trust_policy(path.then("trust_policy"), doc)?);
    }
    Ok(principal)
}

/// Lowers world-file entities into a [`State`] one at a time, in the
/// world file's order (policies, then principals, then resources), naming
/// each by its world-file path (`policies.NAME`, `principals[i]`,
/// `resources[i]`). [`WorldSpec::apply`] feeds it a whole world; a
/// generator can stream entities into it without holding their description.
///
/// Principals must name policies added before them. On error the state may
/// hold part of what was added, so callers build on a copy.
pub struct WorldBuilder<'s> {
    state: &'s mut State,
    resources: ResourceBuilder,
    /// The path that first defined each ARN; `None` when the caller
    /// guarantees unique ARNs (a million keys need not be remembered).
    seen: Option<HashMap<String, FieldPath>>,
    principals: usize,
    resource_count: usize,
}

impl<'s> WorldBuilder<'s> {
    pub fn new(state: &'s mut State) -> WorldBuilder<'s> {
        WorldBuilder {
            state,
            resources: ResourceBuilder::default(),
            seen: Some(HashMap::new()),
            principals: 0,
            resource_count: 0,
        }
    }

    /// Skips the check that no ARN is defined twice (a later definition
    /// then replaces an earlier one), for callers that make ARNs unique.
    pub fn trusting_unique_arns(mut self) -> WorldBuilder<'s> {
        self.seen = None;
        self
    }

    fn first_definition(&mut self, arn: &str, path: &FieldPath) -> Result<(), WorldError> {
        if let Some(seen) = &mut self.seen {
            if let Some(first) = seen.get(arn) {
                return Err(invalid(path.then("arn"), format!("{arn:?} is already defined at {first}")));
            }
            seen.insert(arn.to_string(), path.clone());
        }
        Ok(())
    }

    /// Adds (or replaces) managed policy `name`.
    pub fn policy(&mut self, name: &str, doc: &Value) -> Result<(), WorldError> {
        let path = FieldPath::field("policies").then(name);
        let policy = compile_policy(path.clone(), doc, PolicyKind::Identity)?;
        self.state.put_policy(name, policy).map_err(|e| malformed_policy(path, e.to_string()))
    }

    /// Adds the next principal.
    pub fn principal(&mut self, spec: &PrincipalSpec) -> Result<(), WorldError> {
        let path = FieldPath::field("principals").at(self.principals);
        self.principals += 1;
        self.first_definition(&spec.arn, &path)?;
        let principal = build_principal(path.clone(), spec, self.state, true)?;
        self.state.put_principal(principal).map_err(|e| invalid(path.then("arn"), e.to_string()))
    }

    /// Adds the next resource.
    pub fn resource(&mut self, spec: &ResourceSpec) -> Result<(), WorldError> {
        let path = FieldPath::field("resources").at(self.resource_count);
        self.resource_count += 1;
        self.first_definition(&spec.arn, &path)?;
        let resource = self.resources.build(path.clone(), spec)?;
        self.state.put_resource(resource).map_err(|e| match e {
            StateError::AliasTaken { .. } => WorldError::new(ErrorCode::AlreadyExists, path.then("aliases"), e.to_string()),
            e => invalid(path.then("arn"), e.to_string()),
        })
    }
}

impl WorldSpec {
    /// Adds everything to `state`; on error `state` may hold part of it, so
    /// callers apply to a copy and keep the original on failure.
    pub fn apply(&self, state: &mut State) -> Result<(), WorldError> {
        state.bulk(|state| self.apply_entities(state))
    }

    fn apply_entities(&self, state: &mut State) -> Result<(), WorldError> {
        // A role listed under resources with a resource_policy beside the
        // same role under principals: that policy is the role's trust policy.
        let mut trust: HashMap<usize, &Value> = HashMap::new();
        let mut merged: Vec<bool> = vec![false; self.resources.len()];
        for (i, r) in self.resources.iter().enumerate() {
            let Some(doc) = &r.resource_policy else { continue };
            let Some(p) = self.principals.iter().position(|p| p.arn == r.arn) else { continue };
            if !r.arn.contains(":role/") || !r.tags.is_empty() || r.account.is_some() {
                continue;
            }
            if self.principals[p].trust_policy.is_some() {
                return Err(malformed_policy(
                    FieldPath::field("resources").at(i).then("resource_policy"),
                    format!("{:?} already has a trust_policy at principals[{p}]; give one or the other", r.arn),
                ));
            }
            trust.insert(p, doc);
            merged[i] = true;
        }
        let mut builder = WorldBuilder::new(state);
        for (name, doc) in &self.policies {
            builder.policy(name, doc)?;
        }
        for (i, spec) in self.principals.iter().enumerate() {
            match trust.get(&i) {
                Some(doc) => builder.principal(&PrincipalSpec { trust_policy: Some(Value::clone(doc)), ..spec.clone() })?,
                None => builder.principal(spec)?,
            }
        }
        for (i, spec) in self.resources.iter().enumerate() {
            if merged[i] {
                builder.resource_count += 1;
                continue;
            }
            builder.resource(spec)?;
        }
        self.apply_chain(state)
    }

    /// The organization, the sessions and the endpoints, after the
    /// principals (a session's role must be one of them).
    fn apply_chain(&self, state: &mut State) -> Result<(), WorldError> {
        if let Some(org) = &self.organization {
            let org = org.build(&FieldPath::field("organization"))?;
            state.put_organization(org);
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, spec) in self.sessions.iter().enumerate() {
            let path = FieldPath::field("sessions").at(i);
            let session = spec.build(&path)?;
            if let Some(first) = seen.insert(spec.arn.as_str(), i) {
                return Err(invalid(path.then("arn"), format!("{:?} is already declared at sessions[{first}]", spec.arn)));
            }
            let known = spec.role().is_some_and(|(account, role)| state.role_by_name(account, role).is_some());
            if !known {
                return Err(invalid(path.then("arn"), format!("the role of session {:?} is not a listed principal", spec.arn)));
            }
            for (j, name) in spec.policies.iter().enumerate() {
                if state.policy(name).is_none() {
                    return Err(malformed_policy(path.then("policies").at(j), format!("no managed policy named {name:?}")));
                }
            }
            state.put_session(session);
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, spec) in self.vpc_endpoints.iter().enumerate() {
            let path = FieldPath::field("vpc_endpoints").at(i);
            let endpoint = spec.build(&path)?;
            if let Some(first) = seen.insert(spec.id.as_str(), i) {
                return Err(invalid(path.then("id"), format!("{:?} is already listed at vpc_endpoints[{first}]", spec.id)));
            }
            state.put_endpoint(endpoint);
        }
        Ok(())
    }

    /// A new state holding this world.
    pub fn build(&self) -> Result<State, WorldError> {
        let mut state = State::default();
        self.apply(&mut state)?;
        Ok(state)
    }
}

/// A principal in the world-file shape: attachments whose policy exists
/// under `policies`, dangling ones under `pending_policies`, so that the
/// result always loads as a world file (a backup always restores).
///
/// Order: each list keeps the principal's attachment order, and loading
/// attaches `policies` first, then `pending_policies`. A dangling name that
/// was attached before an existing one therefore moves behind it on a round
/// trip. That changes no decision (every attached policy is evaluated; the
/// order only orders the statements named in an answer), and a second
/// export of the rebuilt principal gives the same lists.
pub fn principal_spec(p: &Principal) -> PrincipalSpec {
    let (policies, pending): (Vec<&Arc<str>>, Vec<&Arc<str>>) =
        p.managed.iter().partition(|name| p.resolved().iter().any(|(r, _)| r == *name));
    PrincipalSpec {
        arn: p.arn().to_string(),
        tags: tag_map(&p.tags),
        policies: policies.into_iter().map(|n| n.to_string()).collect(),
        pending_policies: pending.into_iter().map(|n| n.to_string()).collect(),
        inline_policies: p.inline.iter().map(|(n, pol)| (n.to_string(), Value::clone(&pol.source))).collect(),
        permissions_boundary: p.boundary.as_deref().map(str::to_string),
        trust_policy: p.trust_policy.as_ref().map(|t| Value::clone(&t.source)),
    }
}

/// A declared session in the world-file shape.
pub fn session_spec(s: &crate::chain::Session) -> SessionSpec {
    SessionSpec {
        arn: s.arn.to_string(),
        policy: s.inline.as_ref().map(|p| Value::clone(&p.source)),
        policies: s.managed.iter().map(|n| n.to_string()).collect(),
        tags: tag_map(&s.tags),
    }
}

/// A VPC endpoint in the world-file shape.
pub fn endpoint_spec(e: &crate::chain::Endpoint) -> EndpointSpec {
    EndpointSpec { id: e.id.to_string(), policy: e.policy.as_ref().map(|p| Value::clone(&p.source)) }
}

/// A resource in the world-file shape (the default key policy stays
/// implicit).
pub fn resource_spec(r: &Resource) -> ResourceSpec {
    let mut spec = ResourceSpec { arn: r.arn.to_string(), tags: tag_map(&r.tags), ..ResourceSpec::default() };
    spec.account = r.account_override.as_deref().map(str::to_string);
    match &r.kind {
        ResourceKind::Key(k) => {
            if !k.default_policy {
                spec.key_policy = Some(Value::clone(&k.policy.source));
            }
            spec.key_state = Some(k.state.to_string());
            spec.key_spec = Some(k.spec.to_string());
            spec.key_usage = Some(k.usage.to_string());
            spec.origin = Some(k.origin.to_string());
            spec.key_manager = Some(k.manager.to_string());
            spec.aliases = k.aliases().to_vec();
            spec.grants = k.grants().iter().map(grant_spec).collect();
        }
        ResourceKind::Other { policy } => {
            spec.resource_policy = policy.as_ref().map(|p| Value::clone(&p.source));
        }
    }
    spec
}

fn tag_map(t: &TagSet) -> BTreeMap<String, String> {
    t.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl WorldSpec {
    /// The whole of `state` in the world-file shape: applying it to an empty
    /// state rebuilds the same policies, principals, resources and tags.
    pub fn from_state(state: &State) -> WorldSpec {
        let policies = state.policies().map(|(name, p)| (name.to_string(), Value::clone(&p.source))).collect();
        let mut principals: Vec<PrincipalSpec> = state.principals().map(|p| principal_spec(p)).collect();
        principals.sort_by(|a, b| a.arn.cmp(&b.arn));
        let mut resources: Vec<ResourceSpec> = state.resources().map(|r| resource_spec(r)).collect();
        resources.sort_by(|a, b| a.arn.cmp(&b.arn));
        let mut sessions: Vec<SessionSpec> = state.sessions().map(|s| session_spec(s)).collect();
        sessions.sort_by(|a, b| a.arn.cmp(&b.arn));
        let mut vpc_endpoints: Vec<EndpointSpec> = state.endpoints().map(|e| endpoint_spec(e)).collect();
        vpc_endpoints.sort_by(|a, b| a.id.cmp(&b.id));
        WorldSpec {
            policies,
            principals,
            resources,
            organization: state.organization().map(|o| o.spec.clone()),
            sessions,
            vpc_endpoints,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_s_tags_read_as_serde_s_own_map_reads_them() {
        #[derive(Deserialize)]
        struct Plain {
            #[allow(dead_code)]
            arn: String,
            tags: BTreeMap<String, String>,
        }
        let texts = [
            r#"{"arn": "a", "tags": {}}"#,
            r#"{"arn": "a", "tags": {"B": "2", "A": "1", "C": "3"}}"#,
            r#"{"arn": "a", "tags": {"A": "1", "B": "2", "A": "3"}}"#,
            r#"{"arn": "a", "tags": {"A": "\u00e9t\u00e9", "\u0042": "x"}}"#,
            r#"{"arn": "a", "tags": {"A": 1}}"#,
            r#"{"arn": "a", "tags": ["A", "1"]}"#,
            r#"{"arn": "a", "tags": null}"#,
            r#"{"arn": "a", "tags": {"A": "1",}}"#,
        ];
        for text in texts {
            let ours = serde_json::from_str::<ResourceSpec>(text).map(|r| r.tags).map_err(|e| e.to_string());
            let serdes = serde_json::from_str::<Plain>(text).map(|r| r.tags).map_err(|e| e.to_string());
            assert_eq!(ours, serdes, "{text}");
        }
        let last = serde_json::from_str::<ResourceSpec>(texts[2]).map(|r| r.tags);
        assert_eq!(last.ok().and_then(|t| t.get("A").cloned()).as_deref(), Some("3"), "a later duplicate wins");
        let absent = serde_json::from_str::<ResourceSpec>(r#"{"arn": "a"}"#).map(|r| r.tags.len());
        assert_eq!(absent.ok(), Some(0), "no tags is no tags");
    }

    /// How change.rs classified a world error by sniffing its path text.
    fn code_from_path_text(path: &str) -> ErrorCode {
        if path.contains("polic") && !path.ends_with(".arn") {
            ErrorCode::MalformedPolicyDocument
        } else if path.contains(".tags") {
            ErrorCode::Tag
        } else {
            ErrorCode::Validation
        }
    }

    #[test]
    fn error_codes_come_from_where_the_error_arose_and_agree_with_the_old_text_rule() {
        let key = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let ok_policy = json!({"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}});
        let many_tags: serde_json::Map<String, Value> = (0..51).map(|i| (format!("k{i}"), json!("v"))).collect();
        let cases = [
            (json!({"policies": {"P": {"Statement": {"Effect": "Permit"}}}}), ErrorCode::MalformedPolicyDocument),
            (json!({"policies": {"": ok_policy}}), ErrorCode::MalformedPolicyDocument),
            (
                json!({"principals": [{"arn": "arn:aws:iam::111122223333:user/a", "policies": ["Nope"]}]}),
                ErrorCode::MalformedPolicyDocument,
            ),
            (
                json!({"principals": [{"arn": "arn:aws:iam::111122223333:user/a", "inline_policies": {"I": {"Statement": []}}}]}),
                ErrorCode::MalformedPolicyDocument,
            ),
            (json!({"principals": [{"arn": "arn:aws:sts::111122223333:assumed-role/R/s"}]}), ErrorCode::Validation),
            (json!({"principals": [{"arn": "arn:aws:iam::111122223333:user/a", "tags": {"aws:x": "1"}}]}), ErrorCode::Tag),
            (
                json!({"principals": [{"arn": "arn:aws:iam::111122223333:user/a"}, {"arn": "arn:aws:iam::111122223333:user/a"}]}),
                ErrorCode::Validation,
            ),
            (json!({"resources": [{"arn": "not-an-arn"}]}), ErrorCode::Validation),
            (json!({"resources": [{"arn": key, "tags": many_tags}]}), ErrorCode::Tag),
            (
                json!({"resources": [{"arn": key, "key_policy": {"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}}}]}),
                ErrorCode::MalformedPolicyDocument,
            ),
            (json!({"resources": [{"arn": key, "resource_policy": ok_policy}]}), ErrorCode::MalformedPolicyDocument),
            (json!({"resources": [{"arn": key, "key_state": "Melting"}]}), ErrorCode::Validation),
            (json!({"resources": [{"arn": key, "key_manager": "ME"}]}), ErrorCode::Validation),
            (json!({"resources": [{"arn": key, "key_spec": ""}]}), ErrorCode::Validation),
            (json!({"resources": [{"arn": "arn:aws:s3:::b", "key_policy": ok_policy}]}), ErrorCode::MalformedPolicyDocument),
            (json!({"resources": [{"arn": "arn:aws:s3:::b", "key_state": "Enabled"}]}), ErrorCode::Validation),
            (
                json!({"principals": [{"arn": "arn:aws:iam::111122223333:role/R"}], "resources": [{"arn": "arn:aws:iam::111122223333:role/R"}]}),
                ErrorCode::Validation,
            ),
        ];
        for (world, code) in cases {
            let world: WorldSpec = serde_json::from_value(world).unwrap();
            let e = world.build().unwrap_err();
            assert_eq!(e.code(), code, "{e}");
            assert_eq!(e.code(), code_from_path_text(&e.path.to_string()), "{e}");
        }
        let mut builder = ResourceBuilder::default();
        let spec = ResourceSpec { arn: key.into(), tags: [("aws:x".to_string(), "1".to_string())].into(), ..Default::default() };
        let e = builder.build("put_resource", &spec).unwrap_err();
        assert_eq!((e.path.to_string(), e.code()), ("put_resource.tags".to_string(), ErrorCode::Tag));
    }

    #[test]
    fn aliases_and_grants_load_checked_and_export_back() {
        let key = |id: &str| format!("arn:aws:kms:us-east-1:111122223333:key/{id}");
        let grant = json!({"id": "g1", "grantee_principal": "arn:aws:iam::111122223333:role/R", "operations": ["Decrypt"],
                           "constraints": {"encryption_context_equals": {"Dept": "IT"}}, "name": "n"});
        let world: WorldSpec = serde_json::from_value(json!({"resources": [
            {"arn": key("k1"), "aliases": ["alias/b", "alias/a"], "grants": [grant]},
            {"arn": "arn:aws:kms:us-west-2:111122223333:key/k2", "aliases": ["alias/a"]},
            {"arn": key("aws"), "key_manager": "AWS", "aliases": ["alias/aws/s3"]}]}))
        .unwrap();
        let state = world.build().unwrap();
        assert_eq!(state.resource(&key("k1")).unwrap().key().unwrap().aliases(), ["alias/a", "alias/b"]);
        assert_eq!(
            state.alias_target("arn:aws:kms:us-west-2:111122223333:alias/a").map(|k| k.to_string()),
            Some("arn:aws:kms:us-west-2:111122223333:key/k2".to_string()),
            "the same name in another Region is another alias"
        );
        let exported = WorldSpec::from_state(&state);
        let again = WorldSpec::from_state(&exported.build().unwrap());
        assert_eq!(serde_json::to_value(&exported).unwrap(), serde_json::to_value(&again).unwrap());
        assert_eq!(exported.resources.iter().find(|r| r.arn == key("k1")).unwrap().grants.len(), 1);

        let refused =
            |resources: Value| WorldSpec::build(&serde_json::from_value(json!({"resources": resources})).unwrap()).unwrap_err();
        let e = refused(json!([{"arn": key("k1"), "aliases": ["alias/a"]}, {"arn": key("k2"), "aliases": ["alias/a"]}]));
        assert_eq!((e.path.to_string(), e.code()), ("resources[1].aliases".to_string(), ErrorCode::AlreadyExists), "{e}");
        let e = refused(json!([{"arn": key("k1"), "aliases": ["alias/aws/s3"]}]));
        assert_eq!((e.path.to_string(), e.code()), ("resources[0].aliases[0]".to_string(), ErrorCode::InvalidAliasName), "{e}");
        let e = refused(json!([{"arn": "arn:aws:s3:::b", "aliases": ["alias/a"]}]));
        assert_eq!(e.path.to_string(), "resources[0].aliases", "{e}");
        let g = |ops: Value| json!({"id": "g", "grantee_principal": "arn:aws:iam::111122223333:user/u", "operations": ops});
        let e = refused(json!([{"arn": key("k1"), "grants": [g(json!(["Decrypt"])), g(json!(["Encrypt"]))]}]));
        assert_eq!((e.path.to_string(), e.code()), ("resources[0].grants[1].id".to_string(), ErrorCode::AlreadyExists), "{e}");
        let e = refused(json!([{"arn": key("k1"), "grants": [g(json!(["Decrypt", "Sign"]))]}]));
        assert_eq!(e.path.to_string(), "resources[0].grants[0].operations[1]", "{e}");
        let e =
            refused(json!([{"arn": key("k1"), "grants": [{"id": "g", "grantee_principal": "bob", "operations": ["Decrypt"]}]}]));
        assert_eq!(e.path.to_string(), "resources[0].grants[0].grantee_principal", "{e}");
    }

    #[test]
    fn export_rebuilds_the_same_world() {
        let world: WorldSpec = serde_json::from_value(json!({
            "policies": {"P": {"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}}},
            "principals": [{"arn": "arn:aws:iam::111122223333:role/Dev", "tags": {"team": "a"}, "policies": ["P"],
                            "inline_policies": {"I": {"Statement": {"Effect": "Deny", "Action": "s3:*", "Resource": "*"}}}}],
            "resources": [
                {"arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "tags": {"Project": "Alpha"}, "key_state": "Disabled"},
                {"arn": "arn:aws:s3:::bucket", "account": "111122223333",
                 "resource_policy": {"Statement": {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "*"}}}]
        }))
        .unwrap();
        let exported = WorldSpec::from_state(&world.build().unwrap());
        let again = WorldSpec::from_state(&exported.build().unwrap());
        assert_eq!(serde_json::to_value(&exported).unwrap(), serde_json::to_value(&again).unwrap());
        assert_eq!(exported.resources[1].account.as_deref(), Some("111122223333"));
        assert!(exported.resources[0].key_policy.is_none(), "the default key policy stays implicit");
        assert_eq!(exported.resources[0].key_state.as_deref(), Some("Disabled"));
        assert_eq!(exported.principals[0].inline_policies.len(), 1);
    }

    #[test]
    fn the_chain_fields_refuse_what_docs_scenarios_md_lists_naming_the_field() {
        let full = json!({"Statement": {"Effect": "Allow", "Action": "*", "Resource": "*"}});
        let org = |units: Value, accounts: Value| json!({"organization": {"id": "o-a1b2c3d4e5", "policies": {"Full": full}, "units": units, "accounts": accounts}});
        let root = json!({"id": "r-ab12", "scps": ["Full"]});
        let cases = [
            (org(json!([root, {"id": "ou-1", "parent": "ou-9", "scps": ["Full"]}]), json!([])), "organization.units[1].parent"),
            (
                org(
                    json!([root, {"id": "ou-1", "parent": "ou-2", "scps": ["Full"]}, {"id": "ou-2", "parent": "ou-1", "scps": ["Full"]}]),
                    json!([]),
                ),
                "organization.units[2].parent",
            ),
            (org(json!([{"id": "r-ab12", "scps": ["Nope"]}]), json!([])), "organization.units[0].scps[0]"),
            (org(json!([root, {"id": "r-cd34", "scps": ["Full"]}]), json!([])), "organization.units[1].parent"),
            (org(json!([root]), json!([{"id": "111122223333", "parent": "r-ab12"}])), "organization.accounts[0].scps"),
            (
                org(json!([{"id": "r-ab12"}]), json!([{"id": "111122223333", "parent": "r-ab12", "scps": ["Full"]}])),
                "organization.units[0].scps",
            ),
            (
                org(json!([root]), json!([{"id": "111122223333", "parent": "ou-x", "scps": ["Full"]}])),
                "organization.accounts[0].parent",
            ),
            (json!({"sessions": [{"arn": "arn:aws:sts::111122223333:assumed-role/Ghost/s"}]}), "sessions[0].arn"),
            (
                json!({"principals": [{"arn": "arn:aws:iam::111122223333:role/R"}],
                       "sessions": [{"arn": "arn:aws:sts::111122223333:assumed-role/R/s", "policies": ["Nope"]}]}),
                "sessions[0].policies[0]",
            ),
            (
                json!({"principals": [{"arn": "arn:aws:iam::111122223333:user/u", "permissions_boundary": "Nope"}]}),
                "principals[0].permissions_boundary",
            ),
            (
                json!({"principals": [{"arn": "arn:aws:iam::111122223333:user/u",
                       "trust_policy": {"Statement": {"Effect": "Allow", "Principal": "*", "Action": "sts:AssumeRole"}}}]}),
                "principals[0].trust_policy",
            ),
            (
                json!({"principals": [{"arn": "arn:aws:iam::111122223333:role/R",
                       "trust_policy": {"Statement": {"Effect": "Allow", "Principal": "*", "Action": "sts:AssumeRole"}}}],
                       "resources": [{"arn": "arn:aws:iam::111122223333:role/R",
                       "resource_policy": {"Statement": {"Effect": "Allow", "Principal": "*", "Action": "sts:AssumeRole"}}}]}),
                "resources[0].resource_policy",
            ),
            (json!({"vpc_endpoints": [{"id": "vpce-1"}, {"id": "vpce-1"}]}), "vpc_endpoints[1].id"),
        ];
        for (world, path) in cases {
            let spec: WorldSpec = serde_json::from_value(world.clone()).unwrap();
            let e = spec.build().expect_err(&world.to_string());
            assert_eq!(e.path.to_string(), path, "{e}");
        }
    }

    #[test]
    fn the_chain_fields_export_and_rebuild() {
        let world: WorldSpec = serde_json::from_value(json!({
            "policies": {"B": {"Statement": {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}}},
            "principals": [{"arn": "arn:aws:iam::111122223333:role/R", "permissions_boundary": "B",
                            "trust_policy": {"Statement": {"Effect": "Allow", "Principal": "*", "Action": "sts:AssumeRole"}}}],
            "organization": {"id": "o-a1b2c3d4e5", "management_account": "999988887777",
                             "policies": {"Full": {"Statement": {"Effect": "Allow", "Action": "*", "Resource": "*"}}},
                             "units": [{"id": "r-ab12", "scps": ["Full"]}],
                             "accounts": [{"id": "111122223333", "parent": "r-ab12", "scps": ["Full"]}]},
            "sessions": [{"arn": "arn:aws:sts::111122223333:assumed-role/R/s", "policies": ["B"], "tags": {"team": "a"}}],
            "vpc_endpoints": [{"id": "vpce-1", "policy": {"Statement": {"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*"}}}]
        }))
        .unwrap();
        let exported = WorldSpec::from_state(&world.build().unwrap());
        let again = WorldSpec::from_state(&exported.build().unwrap());
        assert_eq!(serde_json::to_value(&exported).unwrap(), serde_json::to_value(&again).unwrap());
        assert_eq!(serde_json::to_value(&exported.organization).unwrap(), serde_json::to_value(&world.organization).unwrap());
        assert_eq!(exported.sessions, world.sessions);
        assert_eq!(exported.vpc_endpoints, world.vpc_endpoints);
        assert_eq!(exported.principals[0].permissions_boundary.as_deref(), Some("B"));
        assert!(exported.principals[0].trust_policy.as_ref().is_some_and(|t| t.get("Statement").is_some()));
    }
}
