//! Condition context keys, resolved once when a policy is compiled so that
//! evaluation dispatches on an enum instead of comparing key names.
//!
//! Key names are case-insensitive (`aws:ResourceTag/Owner` and
//! `AWS:resourcetag/Owner` are the same key); the tag key after the `/` keeps
//! the case it was written in, since the tag lookup itself prefers an exact
//! match before falling back to a case-insensitive one.

use smol_str::SmolStr;
use thiserror::Error;

/// A condition key as the engine knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyRef {
    ResourceTag(SmolStr),
    RequestTag(SmolStr),
    PrincipalTag(SmolStr),
    TagKeys,
    PrincipalArn,
    PrincipalAccount,
    Username,
    Userid,
    PrincipalType,
    ResourceAccount,
    CallerAccount,
    KeySpec,
    KeyUsage,
    KeyOrigin,
    CurrentTime,
    EpochTime,
    /// `aws:PrincipalOrgID`, `aws:PrincipalOrgPaths`, `aws:ResourceOrgID`,
    /// `aws:ResourceOrgPaths`: from the organization when the account is in
    /// it, else from the request's context like any other key.
    PrincipalOrgId,
    PrincipalOrgPaths,
    ResourceOrgId,
    ResourceOrgPaths,
    /// `kms:RequestAlias`: the alias the request named the key by.
    RequestAlias,
    /// `kms:ResourceAliases`: the key's aliases (multivalued).
    ResourceAliases,
    /// Any other key: supplied by the request's context. Stored lowercased.
    Context(SmolStr),
}

/// Why a key name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("empty condition key")]
    Empty,
    #[error("condition key {0:?} has leading or trailing white space")]
    WhiteSpace(String),
    #[error("condition key {0:?} names no tag key after the '/'")]
    NoTagKey(String),
}

impl KeyRef {
    /// Resolves a key name as written in a policy or a request context.
    pub fn parse(name: &str) -> Result<KeyRef, KeyError> {
        if name.is_empty() {
            return Err(KeyError::Empty);
        }
        if name.trim() != name {
            return Err(KeyError::WhiteSpace(name.to_string()));
        }
        for (prefix, make) in [
            ("aws:resourcetag/", KeyRef::ResourceTag as fn(SmolStr) -> KeyRef),
            ("aws:requesttag/", KeyRef::RequestTag),
            ("aws:principaltag/", KeyRef::PrincipalTag),
        ] {
            if let Some(head) = name.get(..prefix.len()) {
                if head.eq_ignore_ascii_case(prefix) {
                    let tag = &name[prefix.len()..];
                    if tag.is_empty() {
                        return Err(KeyError::NoTagKey(name.to_string()));
                    }
                    return Ok(make(tag.into()));
                }
            }
        }
        let lower = name.to_ascii_lowercase();
        Ok(match lower.as_str() {
            "aws:tagkeys" => KeyRef::TagKeys,
            "aws:principalarn" => KeyRef::PrincipalArn,
            "aws:principalaccount" => KeyRef::PrincipalAccount,
            "aws:username" => KeyRef::Username,
            "aws:userid" => KeyRef::Userid,
            "aws:principaltype" => KeyRef::PrincipalType,
            "aws:resourceaccount" => KeyRef::ResourceAccount,
            "kms:calleraccount" => KeyRef::CallerAccount,
            "kms:keyspec" => KeyRef::KeySpec,
            "kms:keyusage" => KeyRef::KeyUsage,
            "kms:keyorigin" => KeyRef::KeyOrigin,
            "aws:currenttime" => KeyRef::CurrentTime,
            "aws:epochtime" => KeyRef::EpochTime,
            "aws:principalorgid" => KeyRef::PrincipalOrgId,
            "aws:principalorgpaths" => KeyRef::PrincipalOrgPaths,
            "aws:resourceorgid" => KeyRef::ResourceOrgId,
            "aws:resourceorgpaths" => KeyRef::ResourceOrgPaths,
            "kms:requestalias" => KeyRef::RequestAlias,
            "kms:resourcealiases" => KeyRef::ResourceAliases,
            _ => KeyRef::Context(lower.into()),
        })
    }

    /// True for the keys that the service fills in from its own state; a
    /// request context may not supply them (the clock keys excepted, which
    /// `engine::ContextRules` governs).
    pub fn filled_by_service(&self) -> bool {
        !matches!(self, KeyRef::Context(_) | KeyRef::CurrentTime | KeyRef::EpochTime) && self.org_key_name().is_none()
    }

    /// The lowercased name of an organization key, which a request's
    /// context may supply for accounts outside the declared organization.
    pub fn org_key_name(&self) -> Option<&'static str> {
        match self {
            KeyRef::PrincipalOrgId => Some("aws:principalorgid"),
            KeyRef::PrincipalOrgPaths => Some("aws:principalorgpaths"),
            KeyRef::ResourceOrgId => Some("aws:resourceorgid"),
            KeyRef::ResourceOrgPaths => Some("aws:resourceorgpaths"),
            _ => None,
        }
    }

    /// True for `aws:CurrentTime` and `aws:EpochTime`: a context that sets
    /// them overrides the clock.
    pub fn is_clock(&self) -> bool {
        matches!(self, KeyRef::CurrentTime | KeyRef::EpochTime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_case_insensitive_but_tag_keys_keep_their_case() {
        assert_eq!(KeyRef::parse("AWS:ResourceTag/Owner").unwrap(), KeyRef::ResourceTag("Owner".into()));
        assert_eq!(KeyRef::parse("aws:resourcetag/Owner").unwrap(), KeyRef::ResourceTag("Owner".into()));
        assert_eq!(KeyRef::parse("aws:TAGKEYS").unwrap(), KeyRef::TagKeys);
        assert_eq!(KeyRef::parse("kms:ViaService").unwrap(), KeyRef::Context("kms:viaservice".into()));
        assert!(KeyRef::parse("aws:RequestTag/").is_err());
        assert!(KeyRef::parse("").is_err());
        assert!(KeyRef::parse(" aws:SourceIp").is_err());
    }

    #[test]
    fn only_context_and_time_keys_come_from_the_request() {
        assert!(KeyRef::parse("aws:PrincipalTag/team").unwrap().filled_by_service());
        assert!(!KeyRef::parse("aws:SourceIp").unwrap().filled_by_service());
        assert!(!KeyRef::parse("aws:CurrentTime").unwrap().filled_by_service());
        assert!(KeyRef::parse("AWS:epochtime").unwrap().is_clock());
        assert!(!KeyRef::parse("aws:SourceIp").unwrap().is_clock());
    }
}
