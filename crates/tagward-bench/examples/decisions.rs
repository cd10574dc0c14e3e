//! Runs a fixed number of decisions, for counting instructions per decision
//! with callgrind, which gives the same figure however loaded the machine
//! is. By default the world is the decision bench's
//! (`tagward_bench::decision_world`: 1,000 managed ABAC policies, 10,000
//! tagged KMS keys, 100 roles attaching ten policies each):
//!
//! ```text
//! cargo build --release -p tagward-bench --example decisions
//! valgrind --tool=callgrind --toggle-collect='tagward_core::engine::authorize_noting_clock' \
//!     target/release/examples/decisions 20000
//! ```
//!
//! Only the instructions inside `authorize_noting_clock` (which holds the
//! decision; `authorize` and `authorize_with` jump into it) are counted;
//! divide the total by the number of decisions it prints. (A pattern that
//! also matches one of the jumping functions, such as `authorize*`, turns
//! collection off again at the jump: it counts two instructions a
//! decision.) Add `--cache-sim=yes --D1=32768,8,64 --LL=1048576,16,64`
//! with `THRASH` set to count the cache lines a decision fetches from
//! memory (callgrind's DLmr + DLmw). `decisions N stress` runs the stress
//! case instead (one role attaching all 1,000 policies). `decisions N
//! WORLD.json REQUESTS.json` runs a `gen-world` world and its Authorize
//! request file (the load check's workload). It prints the mean wall time
//! per decision as well; with `THRASH=BYTES` it writes to one cache line in
//! every 64 bytes of a buffer that size before each decision (not timed),
//! which shows what a decision costs when the transport around it has
//! pushed the state out of the CPU's caches, as it does in a server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a tool: a failure stops loudly

use std::hint::black_box;
use std::time::Instant;

use tagward_bench::decision_world::{requests, world, ACCOUNT};
use tagward_core::engine::{authorize, Request};
use tagward_core::state::State;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let stress = args.get(1).map(String::as_str) == Some("stress");
    let (state, reqs) = match (args.get(1), args.get(2)) {
        (Some(w), Some(r)) if !stress => generated(w, r),
        _ => {
            let mut reqs = requests();
            if stress {
                let r0 = format!("arn:aws:iam::{ACCOUNT}:role/r0");
                reqs = reqs.into_iter().map(|r| Request { principal: r0.clone(), ..r }).collect();
            }
            (world(stress), reqs)
        }
    };
    let mut allowed = 0usize;
    let thrash = std::env::var("THRASH").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    let mut junk = vec![0u8; thrash.max(1)];
    let mut spent = std::time::Duration::ZERO;
    for i in 0..n {
        if thrash > 0 {
            for j in (0..junk.len()).step_by(64) {
                junk[j] = junk[j].wrapping_add(1);
            }
        }
        let t = Instant::now();
        let d = authorize(&state, &reqs[i % reqs.len()], false).expect("decision");
        allowed += usize::from(d.allowed());
        black_box(d);
        spent += t.elapsed();
    }
    black_box(&junk);
    let per = spent.as_nanos() as f64 / n as f64;
    println!("{n} decisions ({allowed} allowed){}, {per:.0} ns each", if stress { ", stress case" } else { "" });
}

/// A `gen-world` world file and its request file (ghz's data format, read
/// as `tagward load` reads it and converted as the server converts it).
fn generated(world: &str, requests: &str) -> (State, Vec<Request>) {
    let spec: tagward_core::world::WorldSpec = tagward_core::document::read(std::path::Path::new(world)).expect("world file");
    let state = spec.build().expect("world");
    let text = std::fs::read_to_string(requests).expect("request file");
    let data: serde_json::Value = serde_json::from_str(&text).expect("request JSON");
    // Read as the load tool sends them, converted as the server does.
    let reqs = tagward_bench::load::authorize_requests_from_json(&data)
        .expect("Authorize requests")
        .into_iter()
        .map(|r| tagward::grpc::convert::authorize_request(r).expect("a valid request").0)
        .collect();
    (state, reqs)
}
