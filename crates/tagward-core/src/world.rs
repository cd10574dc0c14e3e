//! The world file: managed policies, principals and resources, as scenario
//! files and `tagward serve` describe them (docs/scenarios.md, "Top level",
//! "Principal", "Resource"). This is the wire form (serde,
//! `deny_unknown_fields`); [`WorldSpec::apply`] lowers it into a [`State`],
//! refusing the whole of it on the first error, which names the JSON path.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use crate::arn::Arn;
use crate::policy::{Policy, PolicyKind};
use crate::state::{is_kms_key, KeyInfo, KeyManager, KeyState, Principal, Resource, ResourceKind, State};
use crate::tags::TagSet;

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
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    pub arn: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default)]
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
}

/// A refused world: the JSON path and the reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}: {message}")]
pub struct WorldError {
    pub path: String,
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> WorldError {
    WorldError { path: path.into(), message: message.into() }
}

/// Compiles a policy document found at `path` (errors carry the full path).
pub fn compile_policy(path: &str, doc: &Value, kind: PolicyKind) -> Result<Arc<Policy>, WorldError> {
    Policy::compile(doc, kind).map(Arc::new).map_err(|e| {
        let path = if e.path.is_empty() { path.to_string() } else { format!("{path}.{}", e.path) };
        err(path, e.message)
    })
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

/// Builds resources, sharing one compiled default key policy per account.
#[derive(Default)]
pub struct ResourceBuilder {
    default_policies: HashMap<String, Arc<Policy>>,
    /// Key specs, usages and origins: a handful of distinct values shared
    /// by a million keys, so each is stored once.
    key_fields: HashMap<String, Arc<str>>,
}

impl ResourceBuilder {
    /// Lowers one resource spec; `path` prefixes every error.
    pub fn build(&mut self, path: &str, spec: &ResourceSpec) -> Result<Resource, WorldError> {
        let arn = Arn::parse(&spec.arn).ok_or_else(|| {
            err(format!("{path}.arn"), format!("{:?} is not an ARN (arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE)", spec.arn))
        })?;
        // Stored only when the ARN does not already say it.
        let account_override: Option<Arc<str>> = match &spec.account {
            Some(a) if a != arn.account => Some(Arc::from(a.as_str())),
            _ => None,
        };
        let account = account_override.as_deref().or(Some(arn.account).filter(|a| !a.is_empty()));
        let is_key = is_kms_key(&spec.arn);
        let tags = TagSet::from_tags(false, spec.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| err(format!("{path}.tags"), e.to_string()))?;
        let kind = if is_key {
            if spec.resource_policy.is_some() {
                return Err(err(format!("{path}.resource_policy"), "a KMS key has a key_policy, not a resource_policy"));
            }
            let key_fields = &mut self.key_fields;
            let mut parse = |field: &str, v: &Option<String>, default: &str| -> Result<Arc<str>, WorldError> {
                let text = match v.as_deref() {
                    Some("") => return Err(err(format!("{path}.{field}"), "empty")),
                    Some(v) => v,
                    None => default,
                };
                Ok(key_fields.entry(text.to_string()).or_insert_with(|| Arc::from(text)).clone())
            };
            let state = match &spec.key_state {
                Some(s) => s.parse::<KeyState>().map_err(|e| err(format!("{path}.key_state"), e.to_string()))?,
                None => KeyState::Enabled,
            };
            let manager = match &spec.key_manager {
                Some(s) => s.parse::<KeyManager>().map_err(|e| err(format!("{path}.key_manager"), e.to_string()))?,
                None => KeyManager::Customer,
            };
            let (policy, default_policy) = match &spec.key_policy {
                Some(doc) => (compile_policy(&format!("{path}.key_policy"), doc, PolicyKind::Key)?, false),
                None => {
                    let acct = account.unwrap_or_default().to_string();
                    let policy = match self.default_policies.get(&acct) {
                        Some(p) => p.clone(),
                        None => {
                            let p = compile_policy(
                                &format!("{path}.key_policy"),
                                &default_key_policy_document(&acct),
                                PolicyKind::Key,
                            )?;
                            self.default_policies.insert(acct, p.clone());
                            p
                        }
                    };
                    (policy, true)
                }
            };
            ResourceKind::Key(KeyInfo {
                state,
                spec: parse("key_spec", &spec.key_spec, "SYMMETRIC_DEFAULT")?,
                usage: parse("key_usage", &spec.key_usage, "ENCRYPT_DECRYPT")?,
                origin: parse("origin", &spec.origin, "AWS_KMS")?,
                manager,
                policy,
                default_policy,
            })
        } else {
            for (field, given) in [
                ("key_policy", spec.key_policy.is_some()),
                ("key_state", spec.key_state.is_some()),
                ("key_spec", spec.key_spec.is_some()),
                ("key_usage", spec.key_usage.is_some()),
                ("origin", spec.origin.is_some()),
                ("key_manager", spec.key_manager.is_some()),
            ] {
                if given {
                    return Err(err(format!("{path}.{field}"), "only KMS keys (arn:aws:kms:...:key/ID) have this field"));
                }
            }
            let policy = match &spec.resource_policy {
                Some(doc) => Some(compile_policy(&format!("{path}.resource_policy"), doc, PolicyKind::Resource)?),
                None => None,
            };
            ResourceKind::Other { policy }
        };
        Ok(Resource { arn: spec.arn.as_str().into(), account_override, tags, kind })
    }
}

/// Lowers a principal spec. With `require_policies` (a world file) every
/// name in `policies` must exist in `state` (a typo is an error); without
/// (the admin stream) a name may name a policy that comes later. Names in
/// `pending_policies` need not exist either way; they are attached after
/// `policies`.
pub fn build_principal(path: &str, spec: &PrincipalSpec, state: &State, require_policies: bool) -> Result<Principal, WorldError> {
    let mut principal = Principal::new(&spec.arn).map_err(|e| err(format!("{path}.arn"), e.to_string()))?;
    principal.tags = TagSet::from_tags(true, spec.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| err(format!("{path}.tags"), e.to_string()))?;
    for (i, name) in spec.policies.iter().enumerate() {
        if require_policies && state.policy(name).is_none() {
            return Err(err(format!("{path}.policies[{i}]"), format!("no managed policy named {name:?}")));
        }
        principal.managed.push(name.as_str().into());
    }
    for name in &spec.pending_policies {
        principal.managed.push(name.as_str().into());
    }
    for (name, doc) in &spec.inline_policies {
        let policy = compile_policy(&format!("{path}.inline_policies.{name}"), doc, PolicyKind::Identity)?;
        principal.inline.push((name.as_str().into(), policy));
    }
    Ok(principal)
}

impl WorldSpec {
    /// Adds everything to `state`; on error `state` may hold part of it, so
    /// callers apply to a copy and keep the original on failure.
    pub fn apply(&self, state: &mut State) -> Result<(), WorldError> {
        for (name, doc) in &self.policies {
            let policy = compile_policy(&format!("policies.{name}"), doc, PolicyKind::Identity)?;
            state.put_policy(name, policy).map_err(|e| err(format!("policies.{name}"), e.to_string()))?;
        }
        let mut seen: HashMap<&str, String> = HashMap::new();
        for (i, spec) in self.principals.iter().enumerate() {
            let path = format!("principals[{i}]");
            if let Some(first) = seen.insert(&spec.arn, path.clone()) {
                return Err(err(format!("{path}.arn"), format!("{:?} is already defined at {first}", spec.arn)));
            }
            let principal = build_principal(&path, spec, state, true)?;
            state.put_principal(principal).map_err(|e| err(format!("{path}.arn"), e.to_string()))?;
        }
        let mut builder = ResourceBuilder::default();
        for (i, spec) in self.resources.iter().enumerate() {
            let path = format!("resources[{i}]");
            if let Some(first) = seen.insert(&spec.arn, path.clone()) {
                return Err(err(format!("{path}.arn"), format!("{:?} is already defined at {first}", spec.arn)));
            }
            let resource = builder.build(&path, spec)?;
            state.put_resource(resource).map_err(|e| err(format!("{path}.arn"), e.to_string()))?;
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
    }
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
        WorldSpec { policies, principals, resources }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
