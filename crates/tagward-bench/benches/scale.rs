//! Decision time at scale, and the cost of one tag change at that scale.
//!
//! One generated world (`tagward_bench::gen`, seed 1) of 1,000,000 KMS keys with
//! 10 tags each is built once; then for 10, 1,000 and 10,000 managed ABAC
//! policies (100 roles attaching 10 each) the same request mix is decided.
//! The baseline in the same run is a bare lookup of the request's principal
//! and resource, so "what a decision adds" is a ratio. Two passes each:
//! every request timed on its own (p50/p90/p99 of single decisions, with
//! the ~20 ns of the clock reads included), then Criterion's mean.
//!
//! The tag change is measured twice: `State` clone + `replace_tags` (the
//! copy-on-write cost of the persistent maps), and `Store::apply` of an
//! admin `SetTags` in memory, through publication (the real write path
//! without the disk; `benches/durability.rs` has the disk).
//!
//! `cargo bench --bench scale` (TAGWARD_BENCH_KEYS changes the key count);
//! `cargo test --bench scale` is a quick smoke run on 10,000 keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use hdrhistogram::Histogram;
use tagward::engine::{authorize, Request};
use tagward::state::State;
use tagward::store::{Store, Update};
use tagward::tags::TagSet;
use tagward_bench::gen::GenSpec;

fn spec(keys: usize, policies: usize) -> GenSpec {
    GenSpec { keys, other_resources: 1_000, tags: 10, principals: 100, policies, attach: 10, ..GenSpec::default() }
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Every request timed alone, `rounds` times over the mix.
fn distribution(name: &str, rounds: usize, reqs: &[Request], mut f: impl FnMut(&Request)) -> u64 {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("histogram");
    for _ in 0..rounds {
        for r in reqs {
            let t = Instant::now();
            f(r);
            let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
        }
    }
    println!(
        "{name:<52} p50 {:>7} ns  p90 {:>7} ns  p99 {:>7} ns  mean {:>8.0} ns  ({} timed)",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.mean(),
        h.len()
    );
    h.value_at_quantile(0.5)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let keys: usize =
        if full { std::env::var("TAGWARD_BENCH_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000) } else { 10_000 };
    let rounds = if full { 20 } else { 1 };
    let mut c = if full {
        Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).configure_from_args()
    } else {
        Criterion::default().configure_from_args()
    };

    let before = rss_mib();
    let t = Instant::now();
    let mut keys_only = State::default();
    spec(keys, 0).add_resources(&mut keys_only).expect("resources");
    println!(
        "== world: {keys} keys + 1000 buckets, 10 tags each: built in {:.1?}, resident {:.0} MiB more",
        t.elapsed(),
        rss_mib() - before
    );

    let mix_spec = spec(keys, 1_000);
    let mix = mix_spec.mix(4096);
    let reqs: Vec<Request> = mix.iter().map(|m| m.request.clone()).collect();

    let mut group = c.benchmark_group("scale");
    let mut i = 0usize;
    let base = distribution("baseline: principal + resource lookup", rounds, &reqs, |r| {
        black_box((keys_only.principal(&r.principal).is_some(), keys_only.target(&r.resource).is_some()));
    });
    group.bench_function(format!("baseline: lookup, {keys} keys"), |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            let r = &reqs[i];
            black_box((keys_only.principal(&r.principal).is_some(), keys_only.target(&r.resource).is_some()))
        })
    });
    let mut states = Vec::new();
    for policies in [10usize, 1_000, 10_000] {
        let mut state = keys_only.clone();
        spec(keys, policies).add_policies(&mut state).expect("policies");
        let allowed = reqs.iter().filter(|r| authorize(&state, r, false).map(|d| d.allowed()).unwrap_or(false)).count();
        let name = format!("decision: {policies} policies, {keys} keys");
        println!("-- {name}: {allowed} of {} requests allowed", reqs.len());
        let p50 = distribution(&name, rounds, &reqs, |r| {
            black_box(authorize(&state, r, false).map(|d| d.reason).ok());
        });
        println!("   p50 ratio to the lookup baseline: {:.1}x", p50 as f64 / base.max(1) as f64);
        group.bench_function(&name, |b| {
            b.iter(|| {
                i = (i + 1) % reqs.len();
                black_box(authorize(&state, &reqs[i], false).map(|d| d.reason).ok())
            })
        });
        states.push(state);
    }

    // One tag change at this size.
    let state = states.swap_remove(1);
    let arns: Vec<String> = (0..1024).map(|k| mix_spec.key_arn(k * (keys / 1024).max(1) % keys)).collect();
    let mut n = 0u64;
    group.bench_function(format!("tag change: State clone + replace_tags, {keys} keys"), |b| {
        b.iter(|| {
            n += 1;
            let mut next = state.clone();
            let tags = TagSet::from_tags(false, [("Project", "p1"), ("Seq", n.to_string().as_str())]).expect("tags");
            black_box(next.replace_tags(&arns[n as usize % arns.len()], tags).expect("replace"))
        })
    });
    let store = Store::new(state, 1024);
    group.bench_function(format!("tag change: Store::apply(SetTags) in memory, {keys} keys"), |b| {
        b.iter(|| {
            n += 1;
            let update =
                Update::SetTags { resource: arns[n as usize % arns.len()].clone(), tags: vec![("Seq".into(), n.to_string())] };
            black_box(store.apply(&update, "bench").expect("apply").wait().expect("applied"))
        })
    });
    group.finish();
    c.final_summary();
}
