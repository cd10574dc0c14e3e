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
    /// The AWS error name, as scenario files and gRPC status details carry it.
    pub fn name(&self) -> &'static str {
        match self {
            TagError::BadRequest(_) => "ValidationException",
            TagError::NotFound(_) => "NotFoundException",
            TagError::AccessDenied { .. } => "AccessDeniedException",
            TagError::Validation { .. } => "ValidationException",
            TagError::UnsupportedOperation(_) => "UnsupportedOperationException",
            TagError::InvalidState(_) => "KMSInvalidStateException",
            TagError::Tag { .. } => "TagException",
            TagError::LimitExceeded(_) => "LimitExceededException",
            TagError::Unavailable(_) => "ServiceUnavailableException",
        }
    }
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
        "kms" => names("TagResource", "UntagResource", "ListResourceTags"),
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
    let decision = authorize(state, &request, false)?;
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
        TagOp::Tag(tags) => {
            for (i, (k, v)) in tags.iter().enumerate() {
                check_tag(k, v).map_err(|e| TagError::Tag { field: format!("tags[{i}]"), reason: e.to_string() })?;
            }
            current.with(tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(|e| match e {
                TagSetError::Rule(rule) => TagError::Tag { field: "tags".into(), reason: rule.to_string() },
                limit @ TagSetError::Limit { .. } => TagError::LimitExceeded(limit.to_string()),
            })?
        }
        TagOp::Untag(keys) => {
            for (i, k) in keys.iter().enumerate() {
                check_key(k).map_err(|e| TagError::Tag { field: format!("tag_keys[{i}]"), reason: e.to_string() })?;
            }
            current.without(keys.iter().map(String::as_str))
        }
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
