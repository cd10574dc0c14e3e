//! Building the organization, sessions and VPC endpoints of the wider
//! chain from their specs (`crate::chain` holds what they are; this module
//! checks and compiles them like the rest of a world).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::arn::{is_account_id, Caller, CallerKind};
use crate::chain::{
    Endpoint, EndpointSpec, NamedPolicy, OrgAccount, OrgNodeSpec, Organization, OrganizationSpec, Session, SessionSpec,
};
use crate::error::ErrorCode;
use crate::path::FieldPath;
use crate::policy::{Policy, PolicyKind};
use crate::tags::TagSet;

use super::{compile_policy, WorldError};

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
