//! Tag, untag and list as authorized operations (docs/semantics.md, "Tag
//! operations"; docs/scenarios.md, `tag_resource`).
//!
//! Order: a resource that does not exist answers `NotFoundException`; then
//! the request is authorized as the principal with the action the resource's
//! service uses; then `ValidationException`, `UnsupportedOperationException`,
//! `KMSInvalidStateException` (tag and untag only), `TagException` and
//! `LimitExceededException`, the first failure answering; then the change
//! is applied. A change that changes nothing keeps the revision.

use std::fmt;

use thiserror::Error;

use crate::arn::Arn;
use crate::engine::{authorize, ContextValue, Decision, Request, RequestError};
use crate::error::ErrorCode;
use crate::path::FieldPath;
use crate::state::{KeyManager, KeyState, State};
use crate::tags::{check_key, check_tag, TagSet, TagSetError};

/// What to do with the tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagOp {
    Tag(Vec<(String, String)>),
    Untag(Vec<String>),
    List,
}

impl TagOp {
    pub fn name(&self) -> &'static str {
        match self {
            TagOp::Tag(_) => "TagResource",
            TagOp::Untag(_) => "UntagResource",
            TagOp::List => "ListResourceTags",
        }
    }
}

/// A tag operation performed as a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRequest {
    pub principal: String,
    pub resource: String,
    pub op: TagOp,
    /// Session tags; only an assumed-role session may have them. (There is
    /// no action override: the operation is always authorized as the action
    /// the resource's service uses, so a principal with one unrelated
    /// permission cannot tag anything.)
    pub session_tags: Vec<(String, String)>,
    pub context: Vec<(String, ContextValue)>,
}

/// Why a tag operation failed; `name()` is the AWS error name.
#[derive(Debug, Clone, Error)]
pub enum TagError {
    #[error("{0}")]
    BadRequest(#[from] RequestError),
    #[error("resource {0:?} does not exist")]
    NotFound(String),
    #[error("{principal} is not authorized to perform {action} on {resource} ({})", .decision.reason)]
    AccessDenied { principal: String, action: String, resource: String, decision: Box<Decision> },
    /// A malformed request: the field, and why.
    #[error("{field}: {reason}")]
    Validation { field: String, reason: String },
    #[error("{0}")]
    UnsupportedOperation(String),
    #[error("{0}")]
    InvalidState(String),
    /// A tag that breaks a rule: the field (`tags[2]`), and which rule.
    #[error("{field}: {reason}")]
    Tag { field: String, reason: String },
    #[error("{0}")]
    LimitExceeded(String),
    /// The change could not be made durable.
    #[error("{0}")]
    Unavailable(String),
}

impl TagError {
    /// The AWS error, as scenario files and gRPC status details name it.
    pub fn code(&self) -> ErrorCode {
        match self {
            TagError::BadRequest(_) => ErrorCode::Validation,
            TagError::NotFound(_) => ErrorCode::NotFound,
            TagError::AccessDenied { .. } => ErrorCode::AccessDenied,
            TagError::Validation { .. } => ErrorCode::Validation,
            TagError::UnsupportedOperation(_) => ErrorCode::UnsupportedOperation,
            TagError::InvalidState(_) => ErrorCode::KmsInvalidState,
            TagError::Tag { .. } => ErrorCode::Tag,
            TagError::LimitExceeded(_) => ErrorCode::LimitExceeded,
            TagError::Unavailable(_) => ErrorCode::ServiceUnavailable,
        }
    }

    /// The AWS error name (`self.code().as_str()`).
    pub fn name(&self) -> &'static str {
        self.code().as_str()
    }
}

impl From<TagWriteError> for TagError {
    fn from(e: TagWriteError) -> TagError {
        match e.error {
            TagSetError::Rule(rule) => TagError::Tag { field: e.field.to_string(), reason: rule.to_string() },
            limit @ TagSetError::Limit { .. } => TagError::LimitExceeded(limit.to_string()),
        }
    }
}

/// A refused tag write: the request field (`tags[2]` for one tag's rule,
/// `tags` for the set as a whole) and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {error}")]
pub struct TagWriteError {
    pub field: FieldPath,
    pub error: TagSetError,
}

impl TagWriteError {
    /// `TagException` for a rule, `LimitExceededException` for the limit.
    pub fn code(&self) -> ErrorCode {
        match self.error {
            TagSetError::Rule(_) => ErrorCode::Tag,
            TagSetError::Limit { .. } => ErrorCode::LimitExceeded,
        }
    }
}

/// Checks every tag of a write against the rules; the error names the
/// first failing tag as `field[i]`.
pub fn check_tags(field: &str, tags: &[(String, String)]) -> Result<(), TagWriteError> {
    for (i, (k, v)) in tags.iter().enumerate() {
        check_tag(k, v).map_err(|e| TagWriteError { field: FieldPath::field(field).at(i), error: e.into() })?;
    }
    Ok(())
}

/// Checks every key of a removal against the rules (`field[i]`).
pub fn check_keys(field: &str, keys: &[String]) -> Result<(), TagWriteError> {
    for (i, k) in keys.iter().enumerate() {
        check_key(k).map_err(|e| TagWriteError { field: FieldPath::field(field).at(i), error: e.into() })?;
    }
    Ok(())
}

/// The one checked tag write: the rules on each tag ([`check_tags`], the
/// error at `field[i]`), then the set written onto `current` with the limit
/// and duplicate checks (the error at `field`).
pub fn write_tags(current: &TagSet, field: &str, tags: &[(String, String)]) -> Result<TagSet, TagWriteError> {
    check_tags(field, tags)?;
    current
        .with(tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|error| TagWriteError { field: FieldPath::field(field), error })
}

/// The one checked tag removal: the rules on each key (`field[i]`), then
/// the keys removed from `current`.
pub fn remove_tags(current: &TagSet, field: &str, keys: &[String]) -> Result<TagSet, TagWriteError> {
    check_keys(field, keys)?;
    Ok(current.without(keys.iter().map(String::as_str)))
}

/// A tag change, for the audit trail: who, what, the tags before and after.
#[derive(Debug, Clone)]
pub struct TagChange {
    pub principal: String,
    pub action: String,
    pub resource: String,
    pub before: TagSet,
    pub after: TagSet,
    pub revision: u64,
}

/// The result of a tag operation.
#[derive(Debug, Clone)]
pub struct TagOutcome {
    /// The decision that allowed the operation.
    pub decision: Decision,
    /// The resource's tags after the operation.
    pub tags: TagSet,
    /// The next state and the change, when something changed.
    pub change: Option<(State, TagChange)>,
}

/// The three actions that tag, untag and list tags on a resource, by the
/// resource's service and type; `None` for a resource that cannot be tagged.
pub fn tag_actions(resource: &str) -> Option<[String; 3]> {
    let arn = Arn::parse(resource)?;
    let svc = arn.service;
    let names =
        |tag: &str, untag: &str, list: &str| Some([format!("{svc}:{tag}"), format!("{svc}:{untag}"), format!("{svc}:{list}")]);
    match svc {
        // Only keys: "you cannot tag ... a custom key store, or an alias"
        // (AWS KMS API Reference, TagResource).
        "kms" if arn.resource_type() == "key" => names("TagResource", "UntagResource", "ListResourceTags"),
        "kms" => None,
        "ec2" => names("CreateTags", "DeleteTags", "DescribeTags"),
        "sqs" => names("TagQueue", "UntagQueue", "ListQueueTags"),
        "dynamodb" => names("TagResource", "UntagResource", "ListTagsOfResource"),
        "iam" => {
            let noun = match arn.resource_type() {
                "user" => "User",
                "role" => "Role",
                "policy" => "Policy",
                "instance-profile" => "InstanceProfile",
                "oidc-provider" => "OpenIDConnectProvider",
                "saml-provider" => "SAMLProvider",
                "server-certificate" => "ServerCertificate",
                "mfa" => "MFADevice",
                _ => return None,
            };
            names(&format!("Tag{noun}"), &format!("Untag{noun}"), &format!("List{noun}Tags"))
        }
        "sts" => None,
        _ => names("TagResource", "UntagResource", "ListTagsForResource"),
    }
}

/// Performs a tag operation against `state`.
pub fn perform(state: &State, req: &TagRequest) -> Result<TagOutcome, TagError> {
    let target = state.target(&req.resource).ok_or_else(|| TagError::NotFound(req.resource.clone()))?;
    let actions = tag_actions(&req.resource);
    let action = match (&actions, &req.op) {
        (Some([tag, _, _]), TagOp::Tag(_)) => tag.clone(),
        (Some([_, untag, _]), TagOp::Untag(_)) => untag.clone(),
        (Some([_, _, list]), TagOp::List) => list.clone(),
        (None, op) => {
            let svc = Arn::parse(&req.resource).map_or("unknown", |a| a.service);
            format!("{svc}:{}", op.name())
        }
    };
    let mut request = Request {
        principal: req.principal.clone(),
        action: action.clone(),
        resource: req.resource.clone(),
        session_tags: req.session_tags.clone(),
        context: req.context.clone(),
        ..Request::default()
    };
    match &req.op {
        TagOp::Tag(tags) => {
            request.request_tags = tags.clone();
            request.derive_tag_keys();
        }
        TagOp::Untag(keys) => request.tag_keys = Some(keys.clone()),
        TagOp::List => {}
    }
    let mut decision = authorize(state, &request, false)?;
    // "Cross-account use: No. You cannot perform this operation on a KMS key
    // in a different AWS account" (AWS KMS API Reference, TagResource,
    // UntagResource, ListResourceTags): a grant to another account has no
    // effect for these operations, so they are not allowed.
    let caller_account = crate::arn::Caller::parse(&req.principal).ok().map(|c| c.account);
    if decision.allowed() && target.key().is_some() && target.account() != caller_account {
        decision = Decision { reason: crate::engine::Reason::ImplicitDeny, matched: Vec::new(), ..decision };
    }
    if !decision.allowed() {
        return Err(TagError::AccessDenied {
            principal: req.principal.clone(),
            action,
            resource: req.resource.clone(),
            decision: Box::new(decision),
        });
    }
    let current = target.tags();
    let mutating = !matches!(req.op, TagOp::List);
    match &req.op {
        TagOp::Tag(tags) if tags.is_empty() => {
            return Err(TagError::Validation { field: "tags".into(), reason: "a tag request needs at least one tag".into() })
        }
        TagOp::Untag(keys) if keys.is_empty() => {
            return Err(TagError::Validation {
                field: "tag_keys".into(),
                reason: "an untag request needs at least one tag key".into(),
            })
        }
        _ => {}
    }
    if mutating {
        if actions.is_none() {
            return Err(TagError::UnsupportedOperation(format!("resource {:?} cannot be tagged", req.resource)));
        }
        if let Some(key) = target.key() {
            if key.manager == KeyManager::Aws {
                return Err(TagError::UnsupportedOperation(format!(
                    "{} is an AWS managed key; AWS managed keys cannot be tagged",
                    req.resource
                )));
            }
            if key.state == KeyState::PendingDeletion {
                return Err(TagError::InvalidState(format!("{} is pending deletion", req.resource)));
            }
        }
    }
    let next_tags = match &req.op {
        TagOp::List => return Ok(TagOutcome { decision, tags: current.clone(), change: None }),
        TagOp::Tag(tags) => write_tags(current, "tags", tags)?,
        TagOp::Untag(keys) => remove_tags(current, "tag_keys", keys)?,
    };
    let mut next = state.clone();
    let changed = next.replace_tags(&req.resource, next_tags.clone()).map_err(|_| TagError::NotFound(req.resource.clone()))?;
    let change = changed.then(|| {
        let revision = next.revision();
        let change = TagChange {
            principal: req.principal.clone(),
            action,
            resource: req.resource.clone(),
            before: current.clone(),
            after: next_tags.clone(),
            revision,
        };
        (next, change)
    });
    Ok(TagOutcome { decision, tags: next_tags, change })
}

impl fmt::Display for TagChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} on {}: {:?} -> {:?}", self.principal, self.action, self.resource, self.before, self.after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_checked_write_names_the_tag_then_the_set() {
        let current = TagSet::new(true);
        let e = write_tags(&current, "tags", &tags(&[("ok", "1"), ("aws:x", "2")])).unwrap_err();
        assert_eq!((e.field.to_string(), e.code()), ("tags[1]".to_string(), ErrorCode::Tag));
        assert_eq!(e.to_string(), "tags[1]: tag key \"aws:x\" begins with \"aws:\", which is reserved for AWS");
        let e = write_tags(&current, "tags", &tags(&[("Team", "a"), ("team", "b")])).unwrap_err();
        assert_eq!((e.field.to_string(), e.code()), ("tags".to_string(), ErrorCode::Tag));
        let many: Vec<(String, String)> = (0..51).map(|i| (format!("k{i}"), String::new())).collect();
        let e = write_tags(&current, "tags", &many).unwrap_err();
        assert_eq!(e.code(), ErrorCode::LimitExceeded);
        assert!(matches!(TagError::from(e), TagError::LimitExceeded(_)));
        let written = write_tags(&current, "tags", &tags(&[("Team", "a")])).unwrap();
        assert_eq!(remove_tags(&written, "tag_keys", &["TEAM".into()]).unwrap().len(), 0);
        assert_eq!(remove_tags(&written, "tag_keys", &["".into()]).unwrap_err().field.to_string(), "tag_keys[0]");
    }

    #[test]
    fn error_names_come_from_the_codes() {
        let e = TagError::InvalidState("x".into());
        assert_eq!((e.code(), e.name()), (ErrorCode::KmsInvalidState, "KMSInvalidStateException"));
    }
}
