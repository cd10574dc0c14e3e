//! The same ABAC workload decided by Tagward and by Cedar (the
//! `cedar-policy` crate), in one run, so the ratio is measured on one
//! machine state.
//!
//! The world is the generator's (seed 1): 1,000 managed policies in six
//! styles, 100 roles attaching 10 each, 10,000 KMS keys and 1,000 buckets
//! with 10 tags each. Each IAM policy is translated by hand (per style,
//! below) into Cedar policies scoped to `principal in Policy::"NAME"`; a
//! role's entity has its attached policies as parents, so "attaches" is
//! Cedar group membership. Tags are records (`resource.tags.Project`), the
//! request tags and `aws:TagKeys` are the context, `kms:*` is an action
//! group, action wildcards are expanded to the concrete actions the mix
//! uses, ARN patterns are `like` on an `arn` attribute. The default key
//! policy delegates to IAM, so Cedar gets the identity policies alone
//! (less work than Tagward does: it also evaluates each key's policy).
//! Both sides get requests built ahead of time; the bench first checks
//! that both decide every request of the mix the same way.
//!
//! `cargo bench --features cedar --bench cedar` (the feature compiles
//! cedar-policy, which CI does not).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::hint::black_box;
use std::str::FromStr;
use std::time::{Duration, Instant};

use cedar_policy::{Authorizer, Context, Decision, Entities, EntityUid, PolicySet, Request as CedarRequest};
use criterion::Criterion;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tagward::engine::{authorize, Request};
use tagward_bench::gen::{self, GenSpec, PolicyStyle, ACCOUNT, PROBE_POLICY};

const KMS: [&str; 14] = [
    "kms:Decrypt",
    "kms:Encrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:DescribeKey",
    "kms:ListResourceTags",
    "kms:Sign",
    "kms:Verify",
    "kms:GetPublicKey",
    "kms:ScheduleKeyDeletion",
    "kms:TagResource",
];

fn actions(list: &[&str]) -> String {
    let items: Vec<String> = list.iter().map(|a| format!("Action::\"{a}\"")).collect();
    format!("[{}]", items.join(", "))
}

const PROJECT_MATCH: &str = "resource has tags && resource.tags has Project && principal has tags && principal.tags has project && resource.tags.Project == principal.tags.project";

/// The Cedar text of generated policy `i` (see `GenSpec::policy`).
fn cedar_policy(spec: &GenSpec, i: usize) -> String {
    let group = format!("principal in Policy::\"{}\"", spec.policy_name(i));
    let keys = format!("resource has arn && resource.arn like \"arn:aws:kms:*:{ACCOUNT}:key/*\"");
    match spec.policy_style(i) {
        PolicyStyle::CryptoOnOwnProject => format!(
            "permit({group}, action in {}, resource) when {{ {keys} && {PROJECT_MATCH} }};",
            actions(&[
                "kms:Decrypt",
                "kms:Encrypt",
                "kms:GenerateDataKey",
                "kms:GenerateDataKeyPair",
                "kms:GenerateDataKeyWithoutPlaintext",
                "kms:ReEncryptFrom",
                "kms:ReEncryptTo"
            ])
        ),
        PolicyStyle::DenyReservedReadKeys => format!(
            "forbid({group}, action in Action::\"kms:*\", resource) when {{ resource has tags && resource.tags has Type && resource.tags.Type == \"Reserved\" }};\n\
             permit({group}, action in {}, resource);",
            actions(&["kms:DescribeKey", "kms:ListResourceTags", "kms:GetPublicKey"])
        ),
        PolicyStyle::TagOwnProject => format!(
            "permit({group}, action in {a}, resource) when {{ {keys} && [\"Project\", \"Owner\"].containsAll(context.tagKeys) && context.requestTags has Project && principal has tags && principal.tags has project && context.requestTags.Project == principal.tags.project }};\n\
             forbid({group}, action in {a}, resource) when {{ context.tagKeys.contains(\"Type\") }};",
            a = actions(&["kms:TagResource", "kms:UntagResource"])
        ),
        PolicyStyle::EverythingButKmsAndIam => format!(
            "permit({group}, action, resource) when {{ {PROJECT_MATCH} }} unless {{ action in Action::\"kms:*\" || action in Action::\"iam:*\" }};"
        ),
        PolicyStyle::SignInUsRegions => format!(
            "permit({group}, action in {}, resource) when {{ resource has arn && resource.arn like \"arn:aws:kms:us-*:{ACCOUNT}:key/*\" && resource has tags && resource.tags has Owner && resource.tags.Owner like \"team-1*\" }};",
            actions(&["kms:Sign", "kms:Verify"])
        ),
        PolicyStyle::DecryptOneProject => format!(
            "permit({group}, action == Action::\"kms:Decrypt\", resource) when {{ {keys} && resource has tags && resource.tags has Project && resource.tags.Project == \"{}\" && principal has tags && principal.tags has team && principal.tags.team == \"{}\" }};",
            spec.policy_project(i),
            spec.policy_team(i)
        ),
    }
}

fn uid(kind: &str, id: &str) -> Value {
    json!({"type": kind, "id": id})
}

fn entities(spec: &GenSpec) -> Value {
    let mut out = Vec::new();
    for a in KMS.iter().chain(["kms:UntagResource"].iter()) {
        out.push(json!({"uid": uid("Action", a), "attrs": {}, "parents": [uid("Action", "kms:*")]}));
    }
    for a in ["s3:ListBucket", "s3:GetBucketTagging", "s3:DeleteBucket"] {
        out.push(json!({"uid": uid("Action", a), "attrs": {}, "parents": [uid("Action", "s3:*")]}));
    }
    for g in ["kms:*", "s3:*", "iam:*"] {
        out.push(json!({"uid": uid("Action", g), "attrs": {}, "parents": []}));
    }
    for (name, _) in spec.policies() {
        out.push(json!({"uid": uid("Policy", &name), "attrs": {}, "parents": []}));
    }
    for p in spec.principals() {
        let parents: Vec<Value> = p.policies.iter().map(|n| uid("Policy", n)).collect();
        out.push(json!({"uid": uid("Role", &p.arn), "attrs": {"tags": p.tags}, "parents": parents}));
    }
    for r in spec.resources() {
        let kind = if r.arn.starts_with("arn:aws:kms:") { "Key" } else { "Bucket" };
        out.push(json!({"uid": uid(kind, &r.arn), "attrs": {"arn": r.arn, "tags": r.tags}, "parents": []}));
    }
    Value::Array(out)
}

fn entity(kind: &str, id: &str) -> EntityUid {
    EntityUid::from_str(&format!("{kind}::{}", Value::String(id.to_string()))).expect("entity uid")
}

fn cedar_request(r: &Request) -> CedarRequest {
    let kind = if r.resource.starts_with("arn:aws:kms:") { "Key" } else { "Bucket" };
    let tag_keys = r.tag_keys.clone().unwrap_or_default();
    let request_tags: serde_json::Map<String, Value> = r.request_tags.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let context = Context::from_json_value(json!({"tagKeys": tag_keys, "requestTags": request_tags}), None).expect("context");
    CedarRequest::new(entity("Role", &r.principal), entity("Action", &r.action), entity(kind, &r.resource), context, None)
        .expect("request")
}

fn distribution(name: &str, rounds: usize, n: usize, mut f: impl FnMut(usize)) -> (u64, f64) {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("histogram");
    for _ in 0..rounds {
        for i in 0..n {
            let t = Instant::now();
            f(i);
            let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
        }
    }
    println!(
        "{name:<34} p50 {:>8} ns  p90 {:>8} ns  p99 {:>8} ns  mean {:>9.0} ns",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.mean()
    );
    (h.value_at_quantile(0.5), h.mean())
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let policies: usize = std::env::var("TAGWARD_BENCH_POLICIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let spec = GenSpec { keys: 10_000, other_resources: 1_000, policies, ..GenSpec::default() };
    let state = spec.build_state().expect("state");
    let mut text: Vec<String> = (0..spec.policies).map(|i| cedar_policy(&spec, i)).collect();
    text.push(format!(
        "permit(principal in Policy::\"{PROBE_POLICY}\", action == Action::\"{}\", resource) when {{ {PROJECT_MATCH} }};",
        gen::PROBE_ACTION
    ));
    let policy_set = PolicySet::from_str(&text.join("\n")).expect("Cedar policies");
    let store = Entities::from_json_value(entities(&spec), None).expect("Cedar entities");
    let authorizer = Authorizer::new();

    let mix = spec.mix(2048);
    let reqs: Vec<Request> = mix.iter().map(|m| m.request.clone()).collect();
    let cedar_reqs: Vec<CedarRequest> = reqs.iter().map(cedar_request).collect();

    let mut agree = 0;
    let mut allowed = 0;
    for (i, (r, c)) in reqs.iter().zip(&cedar_reqs).enumerate() {
        let t = authorize(&state, r, false).map(|d| d.allowed()).unwrap_or(false);
        let answer = authorizer.is_authorized(c, &policy_set, &store);
        let c_allowed = answer.decision() == Decision::Allow;
        if t == c_allowed {
            agree += 1;
        } else if agree + 20 > i {
            eprintln!(
                "differ: {} {r:?}: tagward {t}, cedar {c_allowed} {:?}",
                mix[i].kind,
                answer.diagnostics().errors().collect::<Vec<_>>()
            );
        }
        allowed += t as usize;
    }
    println!(
        "== {} policies ({} Cedar policies), {} keys: the two agree on {agree} of {} requests ({allowed} allowed)",
        spec.policies,
        policy_set.policies().count(),
        spec.keys,
        reqs.len()
    );

    let rounds = if full { 10 } else { 1 };
    let (t50, tmean) = distribution("tagward: one decision", rounds, reqs.len(), |i| {
        black_box(authorize(&state, &reqs[i], false).map(|d| d.reason).ok());
    });
    let (c50, cmean) = distribution("cedar: one decision", rounds, reqs.len(), |i| {
        black_box(authorizer.is_authorized(&cedar_reqs[i], &policy_set, &store).decision());
    });
    println!("ratio cedar / tagward: p50 {:.1}x, mean {:.1}x", c50 as f64 / t50.max(1) as f64, cmean / tmean.max(1.0));

    let mut c = if full {
        Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5)).configure_from_args()
    } else {
        Criterion::default().configure_from_args()
    };
    let mut group = c.benchmark_group("cedar");
    let mut i = 0usize;
    group.bench_function(format!("tagward: {} policies", spec.policies), |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            black_box(authorize(&state, &reqs[i], false).map(|d| d.reason).ok())
        })
    });
    group.bench_function(format!("cedar: {} policies", spec.policies), |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            black_box(authorizer.is_authorized(&cedar_reqs[i], &policy_set, &store).decision())
        })
    });
    group.finish();
    c.final_summary();
}
