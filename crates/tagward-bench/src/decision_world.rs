//! The decision bench's world (`benches/decision.rs`): 1,000 managed ABAC
//! policies, 10,000 tagged KMS keys, 100 roles attaching ten policies each
//! (the IAM default quota), and its request mix; also what
//! `examples/decisions.rs` runs under callgrind.
#![allow(clippy::expect_used)] // a bench fixture: a world that does not build stops loudly

use serde_json::{json, Value};
use tagward_core::engine::Request;
use tagward_core::state::State;
use tagward_core::world::WorldSpec;

pub const ACCOUNT: &str = "111122223333";
pub const POLICIES: usize = 1_000;
pub const KEYS: usize = 10_000;
pub const PRINCIPALS: usize = 100;
pub const PROJECTS: usize = 50;

/// Policy `i`, in the styles of the seed documents.
pub fn policy(i: usize) -> Value {
    let project = format!("p{}", i % PROJECTS);
    match i % 4 {
        0 => json!({"Version": "2012-10-17", "Statement": [{
            "Sid": format!("UseProject{i}"), "Effect": "Allow",
            "Action": ["kms:Decrypt", "kms:GenerateDataKey*", "kms:Encrypt"],
            "Resource": format!("arn:aws:kms:*:{ACCOUNT}:key/*"),
            "Condition": {"StringEquals": {"aws:ResourceTag/Project": "${aws:PrincipalTag/project}"}}}]}),
        1 => json!({"Version": "2012-10-17", "Statement": [
            {"Sid": "Crypto", "Effect": "Allow", "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*"],
             "Resource": format!("arn:aws:kms:*:{ACCOUNT}:key/*")},
            {"Sid": "DenyReserved", "Effect": "Deny", "Action": "kms:*", "Resource": "*",
             "Condition": {"StringEquals": {"aws:ResourceTag/Type": "Reserved"}}}]}),
        2 => json!({"Version": "2012-10-17", "Statement": [{
            "Sid": "TagProjectOnly", "Effect": "Allow", "Action": ["kms:TagResource", "kms:UntagResource"],
            "Resource": format!("arn:aws:kms:*:{ACCOUNT}:key/*"),
            "Condition": {"ForAllValues:StringEquals": {"aws:TagKeys": ["Project", "Owner"]},
                          "StringEquals": {"aws:RequestTag/Project": project}}}]}),
        _ => json!({"Version": "2012-10-17", "Statement": [
            {"Sid": "NotKms", "Effect": "Allow", "NotAction": "kms:*", "Resource": "*"},
            {"Sid": "ListOnly", "Effect": "Allow", "Action": "kms:List*", "Resource": "*"}]}),
    }
}

/// The world; with `attach_all_to_first`, role `r0` attaches all 1,000
/// policies (the stress case).
pub fn world(attach_all_to_first: bool) -> State {
    let policies: serde_json::Map<String, Value> = (0..POLICIES).map(|i| (format!("policy{i}"), policy(i))).collect();
    let principals: Vec<Value> = (0..PRINCIPALS)
        .map(|p| {
            let attached: Vec<String> = if attach_all_to_first && p == 0 {
                (0..POLICIES).map(|i| format!("policy{i}")).collect()
            } else {
                (0..10).map(|j| format!("policy{}", (p * 10 + j) % POLICIES)).collect()
            };
            json!({"arn": format!("arn:aws:iam::{ACCOUNT}:role/r{p}"),
                   "tags": {"project": format!("p{}", p % PROJECTS), "team": "t"},
                   "policies": attached})
        })
        .collect();
    let resources: Vec<Value> = (0..KEYS)
        .map(|k| {
            let mut tags = serde_json::Map::new();
            tags.insert("Project".into(), json!(format!("p{}", k % PROJECTS)));
            tags.insert("Type".into(), json!(if k % 7 == 0 { "Reserved" } else { "General" }));
            for t in 0..8 {
                tags.insert(format!("tag{t}"), json!(format!("value{t}")));
            }
            json!({"arn": format!("arn:aws:kms:us-east-1:{ACCOUNT}:key/{k:08}"), "tags": tags})
        })
        .collect();
    let spec: WorldSpec = serde_json::from_value(json!({"policies": policies, "principals": principals, "resources": resources}))
        .expect("world spec");
    spec.build().expect("world")
}

/// 1,024 requests spread over the roles, six actions and the keys.
pub fn requests() -> Vec<Request> {
    let actions = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKeyPair", "kms:Sign", "kms:ListKeys", "s3:GetObject"];
    (0..1024)
        .map(|i| Request {
            principal: format!("arn:aws:iam::{ACCOUNT}:role/r{}", (i * 7) % PRINCIPALS),
            action: actions[i % actions.len()].to_string(),
            resource: format!("arn:aws:kms:us-east-1:{ACCOUNT}:key/{:08}", (i * 131) % KEYS),
            ..Request::default()
        })
        .collect()
}
