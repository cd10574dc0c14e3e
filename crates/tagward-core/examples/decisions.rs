//! Runs a fixed number of decisions on the world of the decision bench
//! (`crates/tagward-bench/benches/decision.rs`: 1,000 managed ABAC policies,
//! 10,000 tagged KMS keys, 100 roles attaching ten policies each), for
//! counting instructions per decision with callgrind, which gives the same
//! figure however loaded the machine is:
//!
//! ```text
//! cargo build --release -p tagward-core --example decisions
//! valgrind --tool=callgrind --toggle-collect='tagward_core::engine::authorize*' \
//!     target/release/examples/decisions 20000
//! ```
//!
//! Only the instructions inside `authorize` are counted; divide the total by
//! the number of decisions it prints. `decisions N stress` runs the stress
//! case instead (one role attaching all 1,000 policies).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a tool: a failure stops loudly

use std::hint::black_box;

use serde_json::{json, Value};
use tagward_core::engine::{authorize, Request};
use tagward_core::state::State;
use tagward_core::world::WorldSpec;

const ACCOUNT: &str = "111122223333";
const POLICIES: usize = 1_000;
const KEYS: usize = 10_000;
const PRINCIPALS: usize = 100;
const PROJECTS: usize = 50;

/// Policy `i`, as in the decision bench.
fn policy(i: usize) -> Value {
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

fn world(attach_all_to_first: bool) -> State {
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

fn requests(stress: bool) -> Vec<Request> {
    let actions = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKeyPair", "kms:Sign", "kms:ListKeys", "s3:GetObject"];
    (0..1024)
        .map(|i| Request {
            principal: format!("arn:aws:iam::{ACCOUNT}:role/r{}", if stress { 0 } else { (i * 7) % PRINCIPALS }),
            action: actions[i % actions.len()].to_string(),
            resource: format!("arn:aws:kms:us-east-1:{ACCOUNT}:key/{:08}", (i * 131) % KEYS),
            ..Request::default()
        })
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let stress = args.next().as_deref() == Some("stress");
    let state = world(stress);
    let reqs = requests(stress);
    let mut allowed = 0usize;
    for i in 0..n {
        let d = authorize(&state, &reqs[i % reqs.len()], false).expect("decision");
        allowed += usize::from(d.allowed());
        black_box(d);
    }
    println!("{n} decisions ({allowed} allowed){}", if stress { ", stress case" } else { "" });
}
