//! Tagward: an authorization sidecar that decides requests the way AWS IAM
//! and KMS do with tag-based access control (ABAC).
//!
//! This package is the sidecar itself: [`grpc`] (the only place that knows
//! tonic and prost), [`scenario`] (the `tagward test` runner), [`observe`]
//! (metrics and the decision log), [`ops`] (what `tagward export`,
//! `import`, `test` and `authorize` do) and the `tagward` command, which
//! only wires. The decision lives in `tagward-core`, the live store and its backends in
//! `tagward-store`; their modules are re-exported here under the names they
//! have always had.

pub mod grpc;
pub mod observe;
pub mod ops;
pub mod scenario;

pub use tagward_core::{arn, change, engine, kms, kms_ops, policy, state, tagging, tags, world};
pub use tagward_store::{audit, storage, store};
