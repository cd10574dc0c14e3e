//! Tagward's core: deciding requests the way AWS IAM and KMS do with
//! tag-based access control, as pure functions over immutable values.
//!
//! Layers, from the bottom: [`arn`] and [`tags`] (the vocabulary),
//! [`policy`] (the IAM policy language, compiled once), [`state`] (the world
//! at one revision), [`engine`] (a request against a state: a decision with
//! its reasons), [`tagging`] (tag operations, authorized), [`world`] (the
//! world file) and [`change`] (the vocabulary of changes: commands, log
//! records, events); [`error`] and [`path`] say which error and where.
//! Nothing here knows about an async runtime, a transport,
//! logging or metrics.

pub mod arn;
pub mod chain;
pub mod change;
pub mod document;
pub mod engine;
pub mod error;
pub mod kms;
pub mod kms_ops;
pub mod path;
pub mod policy;
pub mod state;
pub mod tagging;
pub mod tags;
pub mod world;

// The names most callers need, by layer; everything else is reached
// through its module.
pub use engine::{authorize, ContextValue, Decision, Reason, Request, RequestError};
pub use error::ErrorCode;
pub use path::FieldPath;
pub use policy::{Policy, PolicyError, PolicyKind};
pub use state::{Principal, Resource, State, StateError};
pub use tagging::{perform, TagError, TagOp, TagRequest, TagWriteError};
pub use tags::{TagSet, TagSetError};
pub use world::{WorldBuilder, WorldError, WorldSpec};
