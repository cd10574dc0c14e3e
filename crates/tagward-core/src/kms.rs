//! KMS aliases and grants as values: the alias name rules, grants with
//! their operations, grantee and encryption-context constraints, and how a
//! grant matches a request (docs/semantics.md, "KMS aliases and grants").
//!
//! The operations that change them (CreateAlias, CreateGrant, ...) are in
//! `kms_ops`; the engine reads grants through [`Grant::allows`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use thiserror::Error;

use crate::arn::{is_account_id, Arn, Caller, CallerKind};

/// Every alias name begins with this.
pub const ALIAS_PREFIX: &str = "alias/";
/// "The alias/aws/ prefix is reserved for AWS managed keys" (AWS KMS API
/// Reference, CreateAlias).
pub const RESERVED_ALIAS_PREFIX: &str = "alias/aws/";
/// At most this many characters after `alias/`.
pub const MAX_ALIAS_NAME: usize = 256;
/// AWS KMS quotas: "Aliases per KMS key: 50".
pub const MAX_ALIASES_PER_KEY: usize = 50;
/// AWS KMS quotas: "Grants for a KMS key: 50,000".
pub const MAX_GRANTS_PER_KEY: usize = 50_000;

/// Why an alias name breaks the rules.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AliasNameError {
    #[error("{0:?} does not begin with \"alias/\"")]
    NoPrefix(String),
    #[error("{0:?} has no name after \"alias/\"")]
    Empty(String),
    #[error("{0:?} is longer than 256 characters after \"alias/\"")]
    TooLong(String),
    #[error("{0:?} holds {1:?}: an alias name may hold only letters, digits, '/', '_' and '-'")]
    Character(String, char),
    #[error("{0:?} begins with \"alias/aws/\", which is reserved for AWS managed keys")]
    Reserved(String),
}

/// Checks an alias name (`alias/NAME`): 1-256 characters after `alias/`,
/// ASCII letters, digits, `/`, `_` and `-`, not beginning with `alias/aws/`
/// unless `aws_managed` (the aliases AWS gives its own keys).
pub fn check_alias_name(name: &str, aws_managed: bool) -> Result<(), AliasNameError> {
    let Some(rest) = name.strip_prefix(ALIAS_PREFIX) else {
        return Err(AliasNameError::NoPrefix(name.to_string()));
    };
    if rest.is_empty() {
        return Err(AliasNameError::Empty(name.to_string()));
    }
    if rest.chars().count() > MAX_ALIAS_NAME {
        return Err(AliasNameError::TooLong(name.to_string()));
    }
    if let Some(c) = rest.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-'))) {
        return Err(AliasNameError::Character(name.to_string(), c));
    }
    if !aws_managed && name.starts_with(RESERVED_ALIAS_PREFIX) {
        return Err(AliasNameError::Reserved(name.to_string()));
    }
    Ok(())
}

/// The ARN of alias `name` (`alias/NAME`) in the account and region of
/// `key` (a key ARN); `None` when `key` is not an ARN.
pub fn alias_arn(key: &str, name: &str) -> Option<String> {
    let arn = Arn::parse(key)?;
    Some(format!("arn:{}:kms:{}:{}:{name}", arn.partition, arn.region, arn.account))
}

/// The alias name of an alias ARN (`alias/NAME`), or `None` for any other text.
pub fn alias_of_arn(arn: &str) -> Option<&str> {
    let parsed = Arn::parse(arn)?;
    (parsed.service == "kms" && parsed.resource_type() == "alias").then_some(parsed.resource)
}

/// The grant operations, in the order AWS lists them.
pub const GRANT_OPERATIONS: &[&str] = &[
    "Decrypt",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom",
    "ReEncryptTo",
    "Sign",
    "Verify",
    "GetPublicKey",
    "CreateGrant",
    "RetireGrant",
    "DescribeKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
    "DeriveSharedSecret",
];

/// A set of grant operations (bit `i` is `GRANT_OPERATIONS[i]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct GrantOps(u32);

impl GrantOps {
    pub const EMPTY: GrantOps = GrantOps(0);

    fn bit(name: &str) -> Option<u32> {
        GRANT_OPERATIONS.iter().position(|n| *n == name).map(|i| 1 << i)
    }

    fn of(names: &[&str]) -> GrantOps {
        GrantOps(names.iter().filter_map(|n| GrantOps::bit(n)).fold(0, |a, b| a | b))
    }

    /// The operation named exactly (grant operation names are case-sensitive).
    pub fn named(name: &str) -> Option<GrantOps> {
        GrantOps::bit(name).map(GrantOps)
    }

    /// The operation a request's action performs: `kms:NAME`, the name
    /// compared ignoring case like every action.
    pub fn of_action(action: &str) -> Option<GrantOps> {
        let (svc, name) = action.split_once(':')?;
        if !svc.eq_ignore_ascii_case("kms") {
            return None;
        }
        GRANT_OPERATIONS.iter().position(|n| n.eq_ignore_ascii_case(name)).map(|i| GrantOps(1 << i))
    }

    pub fn contains(self, other: GrantOps) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn intersects(self, other: GrantOps) -> bool {
        self.0 & other.0 != 0
    }

    pub fn union(self, other: GrantOps) -> GrantOps {
        GrantOps(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The names, in `GRANT_OPERATIONS` order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        GRANT_OPERATIONS.iter().enumerate().filter(move |(i, _)| self.0 & (1 << i) != 0).map(|(_, n)| *n)
    }

    /// The operations that take no encryption context, so that a
    /// constraint does not apply to them: "Grants with grant constraints
    /// can include the DescribeKey and RetireGrant operations, but the
    /// constraint doesn't apply to these operations" (CreateGrant); for
    /// CreateGrant the constraint binds the grants created instead.
    pub fn unconstrained() -> GrantOps {
        GrantOps::of(&["DescribeKey", "RetireGrant", "CreateGrant"])
    }

    /// The operations that take an encryption context on a symmetric
    /// encryption key.
    pub fn with_encryption_context() -> GrantOps {
        GrantOps::of(&[
            "Decrypt",
            "Encrypt",
            "GenerateDataKey",
            "GenerateDataKeyWithoutPlaintext",
            "ReEncryptFrom",
            "ReEncryptTo",
            "GenerateDataKeyPair",
            "GenerateDataKeyPairWithoutPlaintext",
        ])
    }

    /// The operations a key of this spec and usage supports ("You can't
    /// create a grant with operations that the key doesn't support": Grants
    /// in AWS KMS, "Grant operations").
    pub fn supported_by(spec: &str, usage: &str) -> GrantOps {
        let common = GrantOps::of(&["CreateGrant", "RetireGrant", "DescribeKey"]);
        let own = match usage {
            "ENCRYPT_DECRYPT" if spec == "SYMMETRIC_DEFAULT" => GrantOps::with_encryption_context(),
            "ENCRYPT_DECRYPT" => GrantOps::of(&["Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo", "GetPublicKey"]),
            "SIGN_VERIFY" => GrantOps::of(&["Sign", "Verify", "GetPublicKey"]),
            "GENERATE_VERIFY_MAC" => GrantOps::of(&["GenerateMac", "VerifyMac"]),
            "KEY_AGREEMENT" => GrantOps::of(&["DeriveSharedSecret", "GetPublicKey"]),
            _ => GrantOps::EMPTY,
        };
        common.union(own)
    }
}

/// An encryption-context constraint: the pairs, sorted by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// The request's encryption context is exactly these pairs.
    Equals(Vec<(String, String)>),
    /// These pairs are among the request's encryption context.
    Subset(Vec<(String, String)>),
}

impl Constraint {
    /// `EncryptionContextEquals` or `EncryptionContextSubset`, as
    /// `kms:GrantConstraintType` spells it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Constraint::Equals(_) => "EncryptionContextEquals",
            Constraint::Subset(_) => "EncryptionContextSubset",
        }
    }

    pub fn pairs(&self) -> &[(String, String)] {
        match self {
            Constraint::Equals(p) | Constraint::Subset(p) => p,
        }
    }

    /// Does the request's encryption context (keys exactly as written)
    /// satisfy the constraint?
    pub fn holds<'a>(&self, context: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> bool {
        let found = |k: &str, v: &str| context.clone().any(|(ck, cv)| ck == k && cv == v);
        match self {
            Constraint::Subset(pairs) => pairs.iter().all(|(k, v)| found(k, v)),
            Constraint::Equals(pairs) => {
                pairs.iter().all(|(k, v)| found(k, v))
                    && context.clone().all(|(ck, cv)| pairs.iter().any(|(k, v)| k == ck && v == cv))
            }
        }
    }

    /// Is `self` (a new grant's constraint) at least as strict as `parent`
    /// (the constraint of the grant it is created through)? "the constraint
    /// requires that any grants created with the CreateGrant permission have
    /// an equally strict or stricter encryption context constraint"
    /// (CreateGrant).
    pub fn at_least_as_strict_as(this: Option<&Constraint>, parent: Option<&Constraint>) -> bool {
        let map = |p: &[(String, String)]| p.iter().cloned().collect::<BTreeMap<String, String>>();
        match (parent, this) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(Constraint::Equals(p)), Some(Constraint::Equals(c))) => map(p) == map(c),
            (Some(Constraint::Equals(_)), Some(Constraint::Subset(_))) => false,
            (Some(Constraint::Subset(p)), Some(c)) => {
                let have = map(c.pairs());
                p.iter().all(|(k, v)| have.get(k) == Some(v))
            }
        }
    }
}

/// Who a grant is for, read once from the grantee ARN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grantee {
    /// A user, an assumed-role session or a federated user: that ARN only.
    Exact(Arc<str>),
    /// A role: the role and its sessions.
    Role { arn: Arc<str>, account: Arc<str>, name: Arc<str> },
    /// An account root: the root itself, and the account's principals
    /// when their IAM policies allow too.
    Account { arn: Arc<str>, account: Arc<str> },
}

/// How a grantee matched the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GranteeMatch {
    /// The caller itself (or its role).
    Direct,
    /// Through the caller's account: an IAM allow is needed too.
    Account,
}

/// Why a grant principal was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0:?} is not a principal a grant can name: an account root, an IAM user or role, an assumed-role session or a federated user")]
pub struct BadGrantPrincipal(pub String);

impl Grantee {
    /// Reads a grantee ARN.
    pub fn parse(arn: &str) -> Result<Grantee, BadGrantPrincipal> {
        match Caller::parse(arn) {
            Ok(c) => Ok(match c.kind {
                CallerKind::Root => Grantee::Account { arn: arn.into(), account: c.account.into() },
                CallerKind::Role { name } => Grantee::Role { arn: arn.into(), account: c.account.into(), name: name.into() },
                CallerKind::User { .. } | CallerKind::Session { .. } => Grantee::Exact(arn.into()),
            }),
            Err(_) => {
                let federated = Arn::parse(arn).is_some_and(|a| {
                    a.service == "sts"
                        && a.region.is_empty()
                        && is_account_id(a.account)
                        && a.resource.strip_prefix("federated-user/").is_some_and(|n| !n.is_empty() && !n.contains('/'))
                });
                if federated {
                    Ok(Grantee::Exact(arn.into()))
                } else {
                    Err(BadGrantPrincipal(arn.to_string()))
                }
            }
        }
    }

    pub fn arn(&self) -> &Arc<str> {
        match self {
            Grantee::Exact(arn) | Grantee::Role { arn, .. } | Grantee::Account { arn, .. } => arn,
        }
    }

    /// Does the grantee name `caller`?
    pub fn matches(&self, caller: &Caller<'_>) -> Option<GranteeMatch> {
        match self {
            Grantee::Exact(arn) => (**arn == *caller.arn).then_some(GranteeMatch::Direct),
            Grantee::Role { arn, account, name } => {
                let session =
                    matches!(caller.kind, CallerKind::Session { role, .. } if role == &**name) && **account == *caller.account;
                (**arn == *caller.arn || session).then_some(GranteeMatch::Direct)
            }
            Grantee::Account { account, .. } => (**account == *caller.account).then_some(match caller.kind {
                CallerKind::Root => GranteeMatch::Direct,
                _ => GranteeMatch::Account,
            }),
        }
    }
}

/// A grant on a KMS key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Unique per key.
    pub id: Arc<str>,
    pub name: Option<Arc<str>>,
    pub grantee: Grantee,
    pub retiring: Option<Arc<str>>,
    pub operations: GrantOps,
    pub constraint: Option<Constraint>,
}

impl Grant {
    /// Does the grant allow `op` for a request with this encryption context
    /// (keys as written)? The grantee is checked by the caller.
    pub fn allows<'a>(&self, op: GrantOps, context: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> bool {
        if !self.operations.contains(op) {
            return false;
        }
        match &self.constraint {
            Some(c) if !GrantOps::unconstrained().contains(op) => c.holds(context),
            _ => true,
        }
    }

    /// Is `principal` the grant's retiring principal?
    pub fn retires(&self, principal: &Caller<'_>) -> bool {
        self.retiring.as_deref().is_some_and(|r| {
            r == principal.arn || Grantee::parse(r).ok().and_then(|g| g.matches(principal)) == Some(GranteeMatch::Direct)
        })
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "grant {} for {}", self.id, self.grantee.arn())
    }
}

/// A key's aliases and grants. Most keys have neither and carry no
/// `KeyExtras` at all, so a request on them checks one pointer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyExtras {
    /// Alias names (`alias/NAME`), sorted.
    pub aliases: Vec<String>,
    /// In creation order.
    pub grants: Vec<Grant>,
}

impl KeyExtras {
    pub fn is_empty(&self) -> bool {
        self.aliases.is_empty() && self.grants.is_empty()
    }

    pub fn grant(&self, id: &str) -> Option<&Grant> {
        self.grants.iter().find(|g| &*g.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_names_follow_the_rules() {
        assert!(check_alias_name("alias/app-alpha", false).is_ok());
        assert!(check_alias_name("alias/team/app_1", false).is_ok());
        assert!(matches!(check_alias_name("app", false), Err(AliasNameError::NoPrefix(_))));
        assert!(matches!(check_alias_name("alias/", false), Err(AliasNameError::Empty(_))));
        assert!(matches!(check_alias_name("alias/a b", false), Err(AliasNameError::Character(_, ' '))));
        assert!(matches!(check_alias_name("alias/aws/s3", false), Err(AliasNameError::Reserved(_))));
        assert!(check_alias_name("alias/aws/s3", true).is_ok());
        let long = format!("alias/{}", "a".repeat(256));
        assert!(check_alias_name(&long, false).is_ok());
        assert!(matches!(check_alias_name(&format!("{long}a"), false), Err(AliasNameError::TooLong(_))));
    }

    #[test]
    fn constraints_and_grantees() {
        let ctx = [("Dept", "IT"), ("Purpose", "x")];
        let eq = Constraint::Equals(vec![("Dept".into(), "IT".into())]);
        let sub = Constraint::Subset(vec![("Dept".into(), "IT".into())]);
        assert!(!eq.holds(ctx.iter().copied()));
        assert!(eq.holds(ctx[..1].iter().copied()));
        assert!(sub.holds(ctx.iter().copied()));
        assert!(!sub.holds([("dept", "IT")].iter().copied()), "keys compare exactly");
        assert!(Constraint::at_least_as_strict_as(Some(&eq), Some(&sub)));
        assert!(!Constraint::at_least_as_strict_as(Some(&sub), Some(&eq)));
        assert!(!Constraint::at_least_as_strict_as(None, Some(&sub)));
        let role = Grantee::parse("arn:aws:iam::111122223333:role/team/Dev").unwrap();
        let session = Caller::parse("arn:aws:sts::111122223333:assumed-role/Dev/s").unwrap();
        assert_eq!(role.matches(&session), Some(GranteeMatch::Direct));
        let other = Caller::parse("arn:aws:sts::444455556666:assumed-role/Dev/s").unwrap();
        assert_eq!(role.matches(&other), None);
        assert!(Grantee::parse("arn:aws:sts::111122223333:federated-user/bob").is_ok());
        assert!(Grantee::parse("bob").is_err());
        assert_eq!(GrantOps::of_action("KMS:decrypt"), GrantOps::named("Decrypt"));
        assert!(GrantOps::named("decrypt").is_none(), "grant operation names are exact");
        assert!(!GrantOps::supported_by("RSA_2048", "SIGN_VERIFY").contains(GrantOps::named("Decrypt").unwrap()));
    }
}
