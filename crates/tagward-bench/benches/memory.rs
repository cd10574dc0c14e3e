//! Resident memory of a world of 1,000,000 KMS keys with 10 tags each (plus
//! 1,000 managed ABAC policies and 100 roles), read from /proc/self/status
//! (VmRSS, and VmHWM for the peak) before and after building the state.
//! The state is built one entity at a time by the generator, so the
//! figure is the state itself (its maps, tag sets and the `GetResources`
//! tag index), not a world file's text.
//!
//! `cargo bench --bench memory` (TAGWARD_BENCH_KEYS changes the count);
//! `cargo test --bench memory` is a quick smoke run on 10,000 keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::time::Instant;

use tagward_bench::gen::GenSpec;

/// The sidecar's allocator (src/main.rs), with the same `.cargo/config.toml`
/// settings, so that the figures are the sidecar's. Built with
/// `--features system-alloc`, the bench uses the system allocator instead.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const ALLOCATOR_NAME: &str = if cfg!(feature = "system-alloc") { "system allocator" } else { "jemalloc" };

fn status(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let keys: usize =
        if full { std::env::var("TAGWARD_BENCH_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000) } else { 10_000 };
    // TAGWARD_BENCH_TAGS and TAGWARD_BENCH_POLICIES split the figure (per key, per tag).
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let tags = env("TAGWARD_BENCH_TAGS", 10);
    let spec = GenSpec {
        keys,
        other_resources: 0,
        tags,
        principals: 100,
        policies: env("TAGWARD_BENCH_POLICIES", 1_000),
        ..GenSpec::default()
    };
    let before = status("VmRSS:");
    let t = Instant::now();
    let state = spec.build_state().expect("state");
    let built = t.elapsed();
    let peak = status("VmHWM:");
    // jemalloc's background threads hand pages freed during the build back
    // to the kernel within about a second (.cargo/config.toml): the
    // sidecar's resident figure once it is serving is the settled one.
    let unsettled = status("VmRSS:");
    if !cfg!(feature = "system-alloc") {
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    let after = status("VmRSS:");
    let (policies, principals, resources) = state.counts();
    println!(
        "== memory: {resources} resources x {tags} tags, {policies} policies, {principals} principals (built in {built:.1?}; {ALLOCATOR_NAME})"
    );
    println!("VmRSS before:  {before:>8.1} MiB");
    println!(
        "VmRSS after:   {after:>8.1} MiB   (the state: {:.1} MiB, {:.0} bytes per key)",
        after - before,
        (after - before) * 1048576.0 / keys as f64
    );
    println!("VmRSS right after the build: {unsettled:.1} MiB");
    println!("VmHWM (peak):  {peak:>8.1} MiB");
    if keys == 1_000_000 && tags == 10 {
        println!(
            "target (issue 15): at most 512 MiB resident with 1,000,000 keys x 10 tags: {}",
            if after <= 512.0 { "met" } else { "missed" }
        );
    }
    // One tag change on a copy of the state (what a write costs before it
    // is published): the persistent maps copy a path, the tag index one
    // chunk per changed value. CPU time over many changes, spread over the keys.
    let changes = 2_000;
    let cpu = std::time::Instant::now();
    for i in 0..changes {
        let mut next = state.clone();
        let value = format!("v{i}");
        let tags = tagward::tags::TagSet::from_tags(false, [("Project", value.as_str())]).expect("tags");
        next.replace_tags(&spec.key_arn(i * 7_919 % keys), tags).expect("change");
        std::hint::black_box(&next);
    }
    println!(
        "clone + replace_tags of one key: {:.1} us per change (mean of {changes})",
        cpu.elapsed().as_secs_f64() * 1e6 / changes as f64
    );
    // Another resident figure after a tag change: structural sharing keeps both states mostly shared.
    let mut next = state.clone();
    let tags = tagward::tags::TagSet::from_tags(false, [("Project", "p1")]).expect("tags");
    next.replace_tags(&spec.key_arn(0), tags).expect("change");
    println!("VmRSS with a second revision alive: {:.1} MiB", status("VmRSS:"));
    drop(next);
    drop(state);
}
