//! Decision time per request on a world of 1,000 managed ABAC policies and
//! 10,000 tagged KMS keys, each principal attaching ten of the policies (the
//! IAM default quota), plus a stress case of one principal that attaches all
//! 1,000. Run with `cargo bench --bench decision`; it prints nanoseconds per
//! decision, and the baseline in the same run is a bare `State` lookup of
//! the same principal and key, so the ratio shows what evaluation adds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

use tagward::engine::{authorize, Request};
use tagward_bench::decision_world::{requests, world, ACCOUNT};

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
