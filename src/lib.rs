//! Tagward: an authorization sidecar that decides requests the way AWS IAM
//! and KMS do with tag-based access control (ABAC).
//!
//! Layers, from the bottom: [`arn`] and [`tags`] (the vocabulary),
//! [`policy`] (the IAM policy language, compiled), [`state`] (the world at
//! one revision), [`engine`] (a request against a state, a decision with its
//! reasons), [`tagging`] (tag operations, authorized), [`world`] (the world
//! file) and [`scenario`] (the `tagward test` runner). None of them knows
//! about any transport.

pub mod arn;
pub mod audit;
pub mod engine;
pub mod gen;
pub mod grpc;
pub mod observe;
pub mod policy;
pub mod scenario;
pub mod state;
pub mod storage;
pub mod store;
pub mod tagging;
pub mod tags;
pub mod world;
