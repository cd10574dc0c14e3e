//! The AWS-style error names every refusal carries: one enum behind the
//! strings that scenario files expect, gRPC status details carry
//! (`google.rpc.ErrorInfo.reason`) and admin acknowledgements report.

use std::fmt;
use std::str::FromStr;

/// An error name. `as_str` is the wire and file spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// The principal is not authorized.
    AccessDenied,
    /// The resource does not exist.
    NotFound,
    /// A tag breaks a tag rule.
    Tag,
    /// A limit would be exceeded (50 tags per resource, ...).
    LimitExceeded,
    /// The KMS key's state does not allow the operation.
    KmsInvalidState,
    /// The resource does not support the operation (an AWS managed key).
    UnsupportedOperation,
    /// The request is malformed: a field is missing, empty or out of range.
    Validation,
    /// A policy document is malformed.
    MalformedPolicyDocument,
    /// A named entity (a managed policy, a principal) does not exist.
    NoSuchEntity,
    /// The change could not be made durable; no further change is accepted.
    StorageFailed,
    /// The service cannot take the request now.
    ServiceUnavailable,
    /// A revision was not reached in time.
    RevisionNotReached,
    /// Events after a revision are no longer kept.
    RevisionGone,
    /// Something failed inside Tagward.
    Internal,
    /// The caller's verified identity may not act as the principal its
    /// Tagging write names.
    CallerNotAllowed,
    /// A KMS alias name is taken in the account and region.
    AlreadyExists,
    /// A KMS alias name breaks the alias rules.
    InvalidAliasName,
    /// The KMS key is disabled (CreateGrant).
    Disabled,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::AccessDenied,
        ErrorCode::NotFound,
        ErrorCode::Tag,
        ErrorCode::LimitExceeded,
        ErrorCode::KmsInvalidState,
        ErrorCode::UnsupportedOperation,
        ErrorCode::Validation,
        ErrorCode::MalformedPolicyDocument,
        ErrorCode::NoSuchEntity,
        ErrorCode::StorageFailed,
        ErrorCode::ServiceUnavailable,
        ErrorCode::RevisionNotReached,
        ErrorCode::RevisionGone,
        ErrorCode::Internal,
        ErrorCode::CallerNotAllowed,
        ErrorCode::AlreadyExists,
        ErrorCode::InvalidAliasName,
        ErrorCode::Disabled,
    ];

    /// The name as scenario files, status details and acknowledgements spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AccessDenied => "AccessDeniedException",
            ErrorCode::NotFound => "NotFoundException",
            ErrorCode::Tag => "TagException",
            ErrorCode::LimitExceeded => "LimitExceededException",
            ErrorCode::KmsInvalidState => "KMSInvalidStateException",
            ErrorCode::UnsupportedOperation => "UnsupportedOperationException",
            ErrorCode::Validation => "ValidationException",
            ErrorCode::MalformedPolicyDocument => "MalformedPolicyDocumentException",
            ErrorCode::NoSuchEntity => "NoSuchEntityException",
            ErrorCode::StorageFailed => "StorageFailed",
            ErrorCode::ServiceUnavailable => "ServiceUnavailableException",
            ErrorCode::RevisionNotReached => "RevisionNotReached",
            ErrorCode::RevisionGone => "RevisionGone",
            ErrorCode::Internal => "InternalError",
            ErrorCode::CallerNotAllowed => "CallerNotAllowed",
            ErrorCode::AlreadyExists => "AlreadyExistsException",
            ErrorCode::InvalidAliasName => "InvalidAliasNameException",
            ErrorCode::Disabled => "DisabledException",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error name {0:?}")]
pub struct UnknownErrorCode(pub String);

impl FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    fn from_str(s: &str) -> Result<ErrorCode, UnknownErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == s).ok_or_else(|| UnknownErrorCode(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(*code));
        }
        assert!("AccessDenied".parse::<ErrorCode>().is_err());
    }
}
