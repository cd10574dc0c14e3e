//! The gRPC layer: the only module that knows tonic and prost. Handlers are
//! thin (validate, convert, call the domain, convert back), and this file
//! holds the one mapping from domain errors to `Status`.

pub mod auth;
pub mod client;
pub mod codec;
pub mod convert;
pub mod decisions;
pub mod dial;
pub mod etcd;
pub mod identity;
pub mod peer;
pub mod repeat;
pub mod server;
pub mod service;
pub mod transport;

use std::collections::HashMap;

use tagward_core::ErrorCode;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::engine::{Decision, RequestError};
use crate::store::{RevisionTimeout, UpdateError};
use crate::tagging::TagError;

/// The generated code for `proto/tagward/v1/tagward.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tagward.v1");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tagward_descriptor.bin"));

    /// `google/protobuf/duration.proto`, imported by the `google.rpc` error
    /// details, for reflection.
    pub const DURATION_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/duration_descriptor.bin"));
}

/// Every gRPC status code, in the order of its number, with its two
/// spellings: the canonical one of the gRPC specification
/// (`INVALID_ARGUMENT`, Tagward's metric label) and grpc-go's
/// (`InvalidArgument`, the spelling ghz reports, which the load tool copies).
const CODE_NAMES: [(Code, &str, &str); 17] = [
    (Code::Ok, "OK", "OK"),
    (Code::Cancelled, "CANCELLED", "Canceled"),
    (Code::Unknown, "UNKNOWN", "Unknown"),
    (Code::InvalidArgument, "INVALID_ARGUMENT", "InvalidArgument"),
    (Code::DeadlineExceeded, "DEADLINE_EXCEEDED", "DeadlineExceeded"),
    (Code::NotFound, "NOT_FOUND", "NotFound"),
    (Code::AlreadyExists, "ALREADY_EXISTS", "AlreadyExists"),
    (Code::PermissionDenied, "PERMISSION_DENIED", "PermissionDenied"),
    (Code::ResourceExhausted, "RESOURCE_EXHAUSTED", "ResourceExhausted"),
    (Code::FailedPrecondition, "FAILED_PRECONDITION", "FailedPrecondition"),
    (Code::Aborted, "ABORTED", "Aborted"),
    (Code::OutOfRange, "OUT_OF_RANGE", "OutOfRange"),
    (Code::Unimplemented, "UNIMPLEMENTED", "Unimplemented"),
    (Code::Internal, "INTERNAL", "Internal"),
    (Code::Unavailable, "UNAVAILABLE", "Unavailable"),
    (Code::DataLoss, "DATA_LOSS", "DataLoss"),
    (Code::Unauthenticated, "UNAUTHENTICATED", "Unauthenticated"),
];

fn code_names(code: Code) -> (&'static str, &'static str) {
    match CODE_NAMES.get(code as usize) {
        Some(&(c, canonical, go)) if c == code => (canonical, go),
        _ => ("UNKNOWN", "Unknown"),
    }
}

/// The canonical name of a status code (`INVALID_ARGUMENT`).
pub fn code_name(code: Code) -> &'static str {
    code_names(code).0
}

/// The name grpc-go (and so ghz) gives a status code (`InvalidArgument`).
pub fn go_code_name(code: Code) -> &'static str {
    code_names(code).1
}

/// The `ErrorInfo.domain` of every Tagward error.
pub const ERROR_DOMAIN: &str = "tagward";

/// A status carrying the AWS-style error name as `google.rpc.ErrorInfo`.
pub fn status(code: Code, name: &str, message: impl Into<String>, metadata: HashMap<String, String>) -> Status {
    Status::with_error_details(code, message, ErrorDetails::with_error_info(name, ERROR_DOMAIN, metadata))
}

/// A bad request: INVALID_ARGUMENT naming the field.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    let mut meta = HashMap::new();
    meta.insert("field".to_string(), field.to_string());
    status(Code::InvalidArgument, ErrorCode::Validation.as_str(), format!("{field}: {reason}"), meta)
}

/// A refused request as INVALID_ARGUMENT naming the field.
pub fn request_status(e: RequestError) -> Status {
    {
        invalid(&e.field.to_string(), &e.reason)
    }
}

fn decision_metadata(d: &Decision) -> HashMap<String, String> {
    let mut meta = HashMap::new();
    meta.insert("reason".to_string(), d.reason.as_str().to_string());
    if !d.matched.is_empty() {
        let names: Vec<String> = d.matched.iter().map(ToString::to_string).collect();
        meta.insert("matched".to_string(), names.join(", "));
    }
    meta
}

/// A refused tag operation, with its AWS-style name in the details.
pub fn tag_status(e: TagError) -> Status {
    {
        let name = e.name();
        match e {
            TagError::BadRequest(r) => request_status(r),
            TagError::AccessDenied { ref decision, .. } => {
                let meta = decision_metadata(decision);
                status(Code::PermissionDenied, name, e.to_string(), meta)
            }
            TagError::NotFound(_) => status(Code::NotFound, name, e.to_string(), HashMap::new()),
            TagError::Validation { ref field, .. } | TagError::Tag { ref field, .. } => {
                let meta = HashMap::from([("field".to_string(), field.clone())]);
                status(Code::InvalidArgument, name, e.to_string(), meta)
            }
            TagError::UnsupportedOperation(_) | TagError::InvalidState(_) | TagError::LimitExceeded(_) => {
                status(Code::FailedPrecondition, name, e.to_string(), HashMap::new())
            }
            TagError::Unavailable(_) => status(Code::Unavailable, name, e.to_string(), HashMap::new()),
        }
    }
}

/// A refused KMS alias or grant operation, with its AWS-style name in the
/// details.
pub fn kms_status(e: tagward_core::kms_ops::KmsError) -> Status {
    use tagward_core::kms_ops::KmsError;
    let name = e.name();
    match e {
        KmsError::BadRequest(r) => request_status(r),
        KmsError::AccessDenied { ref decision, .. } => {
            let meta = decision_metadata(decision);
            status(Code::PermissionDenied, name, e.to_string(), meta)
        }
        KmsError::NotFound(_) => status(Code::NotFound, name, e.to_string(), HashMap::new()),
        KmsError::Validation { ref field, .. } => {
            let meta = HashMap::from([("field".to_string(), field.clone())]);
            status(Code::InvalidArgument, name, e.to_string(), meta)
        }
        KmsError::InvalidAliasName(_) => {
            let meta = HashMap::from([("field".to_string(), "alias_name".to_string())]);
            status(Code::InvalidArgument, name, e.to_string(), meta)
        }
        KmsError::AlreadyExists(_) => status(Code::AlreadyExists, name, e.to_string(), HashMap::new()),
        KmsError::InvalidState(_) | KmsError::Disabled(_) | KmsError::LimitExceeded(_) => {
            status(Code::FailedPrecondition, name, e.to_string(), HashMap::new())
        }
        KmsError::Unavailable(_) => status(Code::Unavailable, name, e.to_string(), HashMap::new()),
    }
}

/// A revision not reached in time: DEADLINE_EXCEEDED.
pub fn revision_status(e: RevisionTimeout) -> Status {
    {
        status(Code::DeadlineExceeded, ErrorCode::RevisionNotReached.as_str(), e.to_string(), HashMap::new())
    }
}

/// The AWS-style error name a status carries, if any.
pub fn error_name(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

/// A refused admin update on the wire.
pub fn update_error(e: UpdateError) -> proto::UpdateError {
    {
        proto::UpdateError { code: e.code.to_string(), message: e.message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_place_in_the_table() {
        for (i, (code, canonical, go)) in CODE_NAMES.iter().enumerate() {
            assert_eq!(*code as usize, i);
            assert_eq!(Code::from(i as i32), *code);
            assert_eq!((code_name(*code), go_code_name(*code)), (*canonical, *go));
        }
    }
}
