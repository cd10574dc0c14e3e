//! Decision time per request on a world of 1,000 managed ABAC policies and
//! 10,000 tagged KMS keys, each principal attaching ten of the policies (the
//! IAM default quota), plus a stress case of one principal that attaches all
//! 1,000. Run with `cargo bench --bench decision`; it prints nanoseconds per
//! decision, and the baseline in the same run is a bare `State` lookup of
//! the same principal and key, so the ratio shows what evaluation adds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};

use tagward::engine::{authorize, Request};
use tagward::state::State;
use tagward::world::WorldSpec;

const ACCOUNT: &str = "111122223333";
const POLICIES: usize = 1_000;
const KEYS: usize = 10_000;
const PRINCIPALS: usize = 100;
const PROJECTS: usize = 50;

/// Policy `i`, in the styles of the seed documents.
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

fn requests() -> Vec<Request> {
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

fn bench(c: &mut Criterion) {
    let state = world(false);
    let reqs = requests();
    let allowed = reqs.iter().filter(|r| authorize(&state, r, false).map(|d| d.allowed()).unwrap_or(false)).count();
    eprintln!("request mix: {allowed} of {} allowed", reqs.len());
    let mut group = c.benchmark_group("decision");
    let mut i = 0;
    group.bench_function("baseline: principal and key lookup only", |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            let r = &reqs[i];
            black_box((state.principal(&r.principal).is_some(), state.target(&r.resource).is_some()))
        })
    });
    group.bench_function("1000 policies, 10 attached, 10000 keys", |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            black_box(authorize(&state, &reqs[i], false).map(|d| d.reason))
        })
    });
    let stress = world(true);
    let heavy: Vec<Request> =
        reqs.iter().map(|r| Request { principal: format!("arn:aws:iam::{ACCOUNT}:role/r0"), ..r.clone() }).collect();
    group.bench_function("stress: one principal attaching all 1000 policies", |b| {
        b.iter(|| {
            i = (i + 1) % heavy.len();
            black_box(authorize(&stress, &heavy[i], false).map(|d| d.reason))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
