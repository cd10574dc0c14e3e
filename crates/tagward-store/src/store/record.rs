//! Snapshot records: how a snapshot holds each entity of a state.
//!
//! A resource, nearly every record of a large state, is a binary record:
//! the byte [`RESOURCE`], then its fields in postcard's format (lengths as
//! varints, strings as their bytes), read in place: no string is copied
//! until the resource keeps it. Its policy documents and grants, which few
//! resources have, are JSON text inside it.
//!
//! Every other entity is the JSON of its change (`{"put_policy":...}`),
//! which starts with `{`; so is every record of snapshots written before
//! binary records, resources included, and those still load.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use tagward_core::change::{build_resource, build_resource_fields, Change};
use tagward_core::state::Resource;
use tagward_core::world::{GrantSpec, ResourceBuilder, ResourceFields, ResourceSpec};

/// The first byte of a binary resource record. postcard's records carry
/// no field names, so a change to [`ResourceRecord`]'s fields needs a new
/// first byte (and a reader kept for this one): snapshots already written
/// must go on loading.
const RESOURCE: u8 = 1;

/// A resource as its binary record holds it.
#[derive(Serialize, Deserialize)]
struct ResourceRecord<'a> {
    arn: &'a str,
    #[serde(borrow)]
    account: Option<&'a str>,
    /// In key order.
    #[serde(borrow)]
    tags: Vec<(&'a str, &'a str)>,
    #[serde(borrow)]
    key_state: Option<&'a str>,
    #[serde(borrow)]
    key_spec: Option<&'a str>,
    #[serde(borrow)]
    key_usage: Option<&'a str>,
    #[serde(borrow)]
    origin: Option<&'a str>,
    #[serde(borrow)]
    key_manager: Option<&'a str>,
    /// JSON text.
    #[serde(borrow)]
    key_policy: Option<&'a str>,
    /// JSON text.
    #[serde(borrow)]
    resource_policy: Option<&'a str>,
    #[serde(borrow)]
    aliases: Vec<&'a str>,
    /// JSON text of the grants, when there are any.
    #[serde(borrow)]
    grants: Option<&'a str>,
}

/// A snapshot record decoded, and lowered when it is a resource.
pub(super) enum Decoded {
    Resource(Resource),
    Change(Change),
}

/// The snapshot record of `change`.
pub(super) fn encode(change: &Change) -> Result<Vec<u8>, String> {
    match change {
        Change::PutResource(spec) => encode_resource(spec),
        change => serde_json::to_vec(change).map_err(|e| e.to_string()),
    }
}

fn encode_resource(spec: &ResourceSpec) -> Result<Vec<u8>, String> {
    let json = |v: &Value| serde_json::to_string(v).map_err(|e| e.to_string());
    let key_policy = spec.key_policy.as_ref().map(json).transpose()?;
    let resource_policy = spec.resource_policy.as_ref().map(json).transpose()?;
    let grants = match spec.grants.as_slice() {
        [] => None,
        grants => Some(serde_json::to_string(grants).map_err(|e| e.to_string())?),
    };
    let record = ResourceRecord {
        arn: &spec.arn,
        account: spec.account.as_deref(),
        tags: spec.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        key_state: spec.key_state.as_deref(),
        key_spec: spec.key_spec.as_deref(),
        key_usage: spec.key_usage.as_deref(),
        origin: spec.origin.as_deref(),
        key_manager: spec.key_manager.as_deref(),
        key_policy: key_policy.as_deref(),
        resource_policy: resource_policy.as_deref(),
        aliases: spec.aliases.iter().map(String::as_str).collect(),
        grants: grants.as_deref(),
    };
    postcard::to_extend(&record, vec![RESOURCE]).map_err(|e| e.to_string())
}

/// Reads a snapshot record (either kind), lowering a resource with
/// `resources`.
pub(super) fn decode(resources: &mut ResourceBuilder, bytes: &[u8]) -> Result<Decoded, String> {
    if let Some(record) = bytes.strip_prefix(&[RESOURCE]) {
        return decode_resource(resources, record).map(Decoded::Resource);
    }
    // One UTF-8 check of the whole record, then a reader that checks no
    // string again (serde_json's byte reader checks each one on its own).
    // A record that is not UTF-8 is read as bytes, for the byte reader's
    // own error and its place.
    let decoded = match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str::<Change>(text),
        Err(_) => serde_json::from_slice::<Change>(bytes),
    };
    let change = decoded.map_err(|e| format!("the record is not a snapshot record: {e}"))?;
    match change {
        Change::PutResource(spec) => {
            build_resource(resources, &spec).map(Decoded::Resource).map_err(|e| format!("the snapshot does not load: {e}"))
        }
        change => Ok(Decoded::Change(change)),
    }
}

fn decode_resource(resources: &mut ResourceBuilder, bytes: &[u8]) -> Result<Resource, String> {
    let not_a_record = |e: &dyn std::fmt::Display| format!("the record is not a resource record: {e}");
    let (record, rest) = postcard::take_from_bytes::<ResourceRecord<'_>>(bytes).map_err(|e| not_a_record(&e))?;
    if !rest.is_empty() {
        return Err(not_a_record(&format_args!("{} bytes follow its last field", rest.len())));
    }
    let document = |field: &str, text: Option<&str>| {
        text.map(serde_json::from_str::<Value>)
            .transpose()
            .map_err(|e| format!("the snapshot does not load: put_resource.{field}: not JSON: {e}"))
    };
    let key_policy = document("key_policy", record.key_policy)?;
    let resource_policy = document("resource_policy", record.resource_policy)?;
    let grants: Vec<GrantSpec> = match record.grants {
        Some(text) => serde_json::from_str(text).map_err(|e| format!("the snapshot does not load: put_resource.grants: {e}"))?,
        None => Vec::new(),
    };
    let aliases: Vec<String> = record.aliases.iter().map(|a| a.to_string()).collect();
    let fields = ResourceFields {
        arn: record.arn,
        account: record.account,
        tags: record.tags.iter().copied(),
        key_policy: key_policy.as_ref(),
        key_state: record.key_state,
        key_spec: record.key_spec,
        key_usage: record.key_usage,
        origin: record.origin,
        key_manager: record.key_manager,
        resource_policy: resource_policy.as_ref(),
        aliases: &aliases,
        grants: &grants,
    };
    build_resource_fields(resources, fields).map_err(|e| format!("the snapshot does not load: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use std::collections::BTreeMap;
    use tagward_core::world::ConstraintSpec;

    fn lowered(bytes: &[u8]) -> Result<Resource, String> {
        match decode(&mut ResourceBuilder::default(), bytes)? {
            Decoded::Resource(r) => Ok(r),
            Decoded::Change(c) => Err(format!("not a resource: {}", c.describe())),
        }
    }

    /// What a resource is, compared: the spec a snapshot would write of it.
    fn spec_of(resource: &Resource) -> Value {
        let mut state = tagward_core::state::State::default();
        state.put_resource(resource.clone()).unwrap();
        let first = tagward_core::change::state_changes(&state).next();
        match first {
            Some(Change::PutResource(spec)) => serde_json::to_value(spec).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn key(tags: &[(&str, &str)]) -> ResourceSpec {
        ResourceSpec {
            arn: "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab".into(),
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..ResourceSpec::default()
        }
    }

    #[test]
    fn a_resource_is_written_as_a_binary_record_and_reads_back_as_its_json_did() {
        let mut spec = key(&[("Project", "alpha"), ("Owner", "team-1"), ("empty", "")]);
        spec.account = Some("444455556666".into());
        spec.key_state = Some("Disabled".into());
        spec.key_usage = Some("ENCRYPT_DECRYPT".into());
        spec.origin = Some("EXTERNAL".into());
        spec.aliases = vec!["alias/b".into(), "alias/a".into()];
        spec.key_policy = Some(json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::111122223333:root"}, "Action": "kms:*", "Resource": "*"}]}));
        spec.grants = vec![GrantSpec {
            id: "g1".into(),
            grantee_principal: "arn:aws:iam::111122223333:role/app".into(),
            operations: vec!["Decrypt".into(), "Encrypt".into()],
            constraints: Some(ConstraintSpec {
                encryption_context_equals: Some(BTreeMap::from([("a".into(), "b".into())])),
                encryption_context_subset: None,
            }),
            ..GrantSpec::default()
        }];
        let binary = encode(&Change::PutResource(spec.clone())).unwrap();
        assert_eq!(binary[0], RESOURCE);
        let json = serde_json::to_vec(&Change::PutResource(spec.clone())).unwrap();
        assert!(binary.len() < json.len(), "{} bytes, JSON {}", binary.len(), json.len());
        let (from_binary, from_json) = (lowered(&binary).unwrap(), lowered(&json).unwrap());
        assert_eq!(spec_of(&from_binary), spec_of(&from_json));
        assert_eq!(spec_of(&from_binary)["grants"], serde_json::to_value(&spec.grants).unwrap());
    }

    #[test]
    fn other_entities_stay_json() {
        let change = Change::PutPolicy { name: "P".into(), document: json!({"Statement": []}) };
        assert_eq!(encode(&change).unwrap(), serde_json::to_vec(&change).unwrap());
    }

    #[test]
    fn a_damaged_binary_record_is_refused_with_its_reason() {
        let good = encode(&Change::PutResource(key(&[("a", "b")]))).unwrap();
        let cut = lowered(&good[..good.len() - 3]).unwrap_err();
        assert!(cut.starts_with("the record is not a resource record: "), "{cut}");
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(lowered(&longer).unwrap_err(), "the record is not a resource record: 1 bytes follow its last field");
        // A string that is not UTF-8: the ARN's first byte.
        let mut bad = good.clone();
        bad[2] = 0xff;
        assert!(lowered(&bad).unwrap_err().starts_with("the record is not a resource record: "));
    }

    #[test]
    fn a_binary_record_is_checked_as_a_world_file_is() {
        let bad_tag = encode(&Change::PutResource(key(&[("aws:x", "b")]))).unwrap();
        let err = lowered(&bad_tag).unwrap_err();
        assert!(err.starts_with("the snapshot does not load: TagException: put_resource.tags: "), "{err}");
        let mut not_an_arn = key(&[]);
        not_an_arn.arn = "nope".into();
        let err = lowered(&encode(&Change::PutResource(not_an_arn)).unwrap()).unwrap_err();
        assert!(err.starts_with("the snapshot does not load: ValidationException: put_resource.arn: "), "{err}");
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-zA-Z0-9 _.:/=+@-]{1,12}", "\\PC{0,6}"]
    }

    proptest! {
        /// Whatever a resource's fields, its binary record and its JSON
        /// lower to the same resource, or are refused with the same error.
        #[test]
        fn binary_and_json_records_agree(
            tags in proptest::collection::btree_map(text(), text(), 0..6),
            account in proptest::option::of(text()),
            key_state in proptest::option::of(prop_oneof![Just("Enabled".to_string()), Just("PendingDeletion".to_string()), text()]),
            origin in proptest::option::of(text()),
            aliases in proptest::collection::vec("alias/[a-z]{1,4}", 0..3),
            is_key in any::<bool>(),
        ) {
            let mut spec = key(&[]);
            if !is_key {
                spec.arn = "arn:aws:s3:::bucket".into();
            }
            spec.tags = tags;
            spec.account = account;
            spec.key_state = key_state;
            spec.origin = origin;
            spec.aliases = aliases;
            let change = Change::PutResource(spec);
            let binary = lowered(&encode(&change).unwrap()).map(|r| spec_of(&r));
            let json = lowered(&serde_json::to_vec(&change).unwrap()).map(|r| spec_of(&r));
            prop_assert_eq!(binary, json);
        }
    }
}
