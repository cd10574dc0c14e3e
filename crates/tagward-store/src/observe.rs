//! The metrics the store records, by name, through the `metrics` facade
//! (a no-op until the sidecar installs an exporter). Labels stay bounded:
//! origins, results and error codes, never a principal or a resource.

use tagward_core::error::ErrorCode;
use tagward_core::state::State;

pub const ADMIN_UPDATES: &str = "tagward_admin_updates_total";
pub const TAG_CHANGES: &str = "tagward_tag_changes_total";
pub const AUDIT_FAILURES: &str = "tagward_audit_write_failures_total";
pub const AUDIT_REFUSALS_DROPPED: &str = "tagward_audit_refusals_dropped_total";
pub const REVISION: &str = "tagward_snapshot_revision";
pub const PUBLISHED_AT: &str = "tagward_snapshot_published_timestamp_seconds";
pub const SNAPSHOT_AGE: &str = "tagward_snapshot_age_seconds";
/// Fleet mode: revisions the snapshot was behind the shared store (etcd)
/// when last looked at.
pub const REVISION_LAG: &str = "tagward_snapshot_revision_lag";
pub const POLICIES: &str = "tagward_policies";
pub const PRINCIPALS: &str = "tagward_principals";
pub const RESOURCES: &str = "tagward_resources";
pub const TAGS: &str = "tagward_tags";
/// 1 while the store refuses every change (a storage failure), else 0.
pub const STORE_FAILED: &str = "tagward_store_failed";

/// Counts published tag changes by origin: `tagging` (the Tagging API,
/// authorized as a principal) or `admin` (the admin stream).
pub fn tag_change(admin: bool) {
    let origin = if admin { "admin" } else { "tagging" };
    metrics::counter!(TAG_CHANGES, "origin" => origin).increment(1);
}

/// Counts an admin update, applied or rejected (with its error code).
pub fn admin_update(code: Option<ErrorCode>) {
    match code {
        None => metrics::counter!(ADMIN_UPDATES, "result" => "applied").increment(1),
        Some(code) => metrics::counter!(ADMIN_UPDATES, "result" => "rejected", "code" => code.as_str()).increment(1),
    }
}

/// Gauges of a newly published state.
pub fn published(state: &State) {
    let (policies, principals, resources) = state.counts();
    metrics::gauge!(REVISION).set(state.revision() as f64);
    metrics::gauge!(PUBLISHED_AT).set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
    metrics::gauge!(POLICIES).set(policies as f64);
    metrics::gauge!(PRINCIPALS).set(principals as f64);
    metrics::gauge!(RESOURCES).set(resources as f64);
    metrics::gauge!(TAGS).set(state.tag_count() as f64);
}
