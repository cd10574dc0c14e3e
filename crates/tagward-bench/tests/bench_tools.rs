//! The bench tools work: the generator is reproducible for a seed, and the
//! load generator runs against a real in-process server (and the empty
//! baseline) on loopback, reporting with ghz's JSON field names. Timings are
//! never asserted: the machine is shared and small.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tagward::engine::authorize;
use tagward::grpc::server::{self, Config};
use tagward::store::Store;
use tagward_bench::gen::{self, GenSpec};
use tagward_bench::load::{self, Options, Plan, Requests, TagChanges};

fn small() -> GenSpec {
    GenSpec { seed: 7, keys: 300, other_resources: 30, principals: 20, policies: 60, ..GenSpec::default() }
}

#[test]
fn the_generator_is_reproducible_for_a_seed() {
    let spec = small();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    spec.write_world(&mut a).unwrap();
    spec.clone().write_world(&mut b).unwrap();
    assert_eq!(a, b, "the same seed writes the same world file");
    assert_eq!(spec.mix(500), spec.clone().mix(500));
    assert_eq!(spec.batches(20, 5), spec.clone().batches(20, 5));

    let mut c = Vec::new();
    GenSpec { seed: 8, ..small() }.write_world(&mut c).unwrap();
    assert_ne!(a, c, "another seed, another world");

    // The file is a valid world, and every generated request is valid for it.
    let world: tagward::world::WorldSpec = serde_json::from_slice(&a).unwrap();
    let state = world.build().unwrap();
    let kinds: std::collections::BTreeSet<&str> = spec.mix(1000).iter().map(|m| m.kind).collect();
    assert_eq!(kinds.len(), 7, "{kinds:?}");
    for m in spec.mix(1000) {
        authorize(&state, &m.request, false).unwrap_or_else(|e| panic!("{m:?}: {e}"));
    }
}

async fn serve(spec: &GenSpec) -> server::Running {
    let state = spec.build_state().unwrap();
    let config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)).into(),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)).into(),
        ..Config::default()
    };
    server::start(config, Arc::new(Store::new(state, 1024))).await.unwrap()
}

fn plan(target: impl std::fmt::Display, requests: Requests) -> Plan {
    Plan {
        target: target.to_string(),
        requests,
        options: Options { concurrency: 4, connections: 2, total: Some(300), warmup: 20, ..Options::default() },
        baseline: None,
        rounds: 1,
        half_peak: false,
        tag_changes: None,
        name: "smoke".into(),
        target_pid: None,
        baseline_pid: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_reports_like_ghz_against_a_real_server() {
    let spec = small();
    let running = serve(&spec).await;
    let baseline = tagward_bench::baseline::start(SocketAddr::from(([127, 0, 0, 1], 0)), 4 << 20).await.unwrap();

    let mix = spec.mix(200);
    let mut p = plan(&running.data_addr, Requests::Authorize(Arc::new(load::authorize_requests(&mix))));
    p.baseline = Some(baseline.addr.to_string());
    p.rounds = 2;
    p.half_peak = true;
    p.tag_changes = Some(TagChanges { admin: running.admin_addr.to_string(), token: None, rate: 200.0 });
    // Both servers run in this process: its CPU time stands for theirs.
    p.target_pid = Some(std::process::id());
    p.baseline_pid = Some(std::process::id());
    let report = load::run(&p).await.unwrap();

    assert_eq!(report.count, 600, "two rounds of 300");
    assert_eq!(report.status_code_distribution.get("OK"), Some(&600));
    let decisions: u64 = report.tagward.decisions.values().sum();
    assert_eq!(decisions, 600);
    assert!(report.tagward.decisions.contains_key("ALLOWED") && report.tagward.decisions.contains_key("IMPLICIT_DENY"));
    let base = report.tagward.baseline.as_ref().expect("baseline measured");
    assert_eq!(base.count, 600);
    assert_eq!(base.tagward.decisions.get("ALLOWED"), Some(&600), "the empty handler allows everything");
    assert!(report.tagward.throughput_ratio.is_some());
    assert_eq!(report.tagward.round_ratios.len(), 2);
    let half = report.tagward.half_peak.as_ref().expect("half-peak run");
    assert_eq!(half.count, 300);
    let vis = half.tagward.visibility.as_ref().expect("tag changes ran during the half-peak run");
    assert_eq!(vis.errors, 0);
    assert_eq!(vis.stale_probes, 0, "published before acknowledged");

    // ghz's field names and types.
    let json: Value = serde_json::to_value(&report).unwrap();
    for field in ["date", "count", "total", "average", "fastest", "slowest", "rps", "options"] {
        assert!(json.get(field).is_some(), "{field} in {json}");
    }
    for field in ["errorDistribution", "statusCodeDistribution", "histogram", "details"] {
        assert!(json.get(field).is_some(), "{field}");
    }
    assert!(json["count"].is_u64() && json["total"].is_u64() && json["rps"].is_f64());
    let dist = json["latencyDistribution"].as_array().unwrap();
    let percentages: Vec<u64> = dist.iter().map(|d| d["percentage"].as_u64().unwrap()).collect();
    assert_eq!(percentages, [10, 25, 50, 75, 90, 95, 99]);
    assert!(dist.iter().all(|d| d["latency"].is_u64()));
    let buckets = json["histogram"].as_array().unwrap();
    assert_eq!(buckets.len(), 11);
    assert_eq!(buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum::<u64>(), 600);
    assert!(buckets.iter().all(|b| b["mark"].is_f64() && b["frequency"].is_f64()));
    assert_eq!(json["options"]["call"], "tagward.v1.Authorizer.Authorize");
    assert_eq!(json["options"]["concurrency"], 4);
    assert!(json["options"]["CPUs"].is_u64());
    assert!(json["tagward"]["latency"]["p99.9"].is_u64());
    assert!(json["tagward"]["halfPeak"]["tagward"]["visibility"]["visibleAfterAck"]["p99"].is_u64());
    assert!(!report.text().is_empty());

    // Server CPU from /proc, for both sides, and their ratio when both are
    // measurable (the clock ticks are 10 ms).
    let cpu = report.tagward.server_cpu_seconds.expect("target CPU read");
    let base_cpu = base.tagward.server_cpu_seconds.expect("baseline CPU read");
    assert!(cpu >= 0.0 && base_cpu >= 0.0);
    assert!(json["tagward"]["serverCpuMicrosPerRequest"].is_f64());
    assert!(json["tagward"]["baseline"]["tagward"]["serverCpuMicrosPerRequest"].is_f64());
    if cpu > 0.0 && base_cpu > 0.0 {
        let ratio = report.tagward.cpu_ratio.expect("a ratio when both used CPU");
        let per = |r: &load::Report| r.tagward.server_cpu_micros_per_request.unwrap();
        assert!((ratio - per(base) / per(&report)).abs() < 1e-9);
        assert!(report.text().contains("Server CPU ratio"));
    }

    baseline.shutdown().await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_load_from_ghz_data_and_errors_are_counted() {
    let spec = small();
    let running = serve(&spec).await;
    let data = Value::Array(spec.batches(10, 4).iter().map(|(p, items)| gen::batch_json(p, items)).collect());
    let batches = load::batch_requests_from_json(&data).unwrap();
    let report = load::run(&plan(&running.data_addr, Requests::Batch(Arc::new(batches)))).await.unwrap();
    assert_eq!(report.count, 300);
    assert_eq!(report.tagward.decisions.values().sum::<u64>(), 1200, "four answers per call");
    assert_eq!(report.options.call, "tagward.v1.Authorizer.BatchAuthorize");

    // A bad request is a counted InvalidArgument, as ghz counts it.
    let bad = vec![tagward::grpc::proto::AuthorizeRequest { principal: "nope".into(), ..Default::default() }];
    let mut p = plan(&running.data_addr, Requests::Authorize(Arc::new(bad)));
    p.options.total = Some(10);
    p.options.duration = Some(Duration::from_secs(5));
    let report = load::run(&p).await.unwrap();
    assert_eq!(report.status_code_distribution.get("InvalidArgument"), Some(&10));
    assert_eq!(report.error_distribution.values().sum::<u64>(), 10);
    assert!(report.latency_distribution.is_empty(), "ghz lists latencies of successful calls only");
    running.shutdown().await;
}
