//! Tagward's live store: the current [`State`](tagward_core::State) behind
//! an atomic pointer, one writer that applies changes all or nothing,
//! revisions readers can wait for, the change events `Watch` streams, the
//! durable backends and the audit trail.

pub mod audit;
pub mod observe;
pub mod storage;
pub mod store;

pub use audit::AuditLog;
pub use store::{Durability, Opened, Store, Ticket};
