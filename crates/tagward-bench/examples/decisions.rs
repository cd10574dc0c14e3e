//! Runs a fixed number of decisions on the world of the decision bench
//! (`tagward_bench::decision_world`: 1,000 managed ABAC policies, 10,000
//! tagged KMS keys, 100 roles attaching ten policies each), for counting
//! instructions per decision with callgrind, which gives the same figure
//! however loaded the machine is:
//!
//! ```text
//! cargo build --release -p tagward-bench --example decisions
//! valgrind --tool=callgrind --toggle-collect='tagward_core::engine::authorize*' \
//!     target/release/examples/decisions 20000
//! ```
//!
//! Only the instructions inside `authorize` are counted; divide the total by
//! the number of decisions it prints. `decisions N stress` runs the stress
//! case instead (one role attaching all 1,000 policies).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a tool: a failure stops loudly

use std::hint::black_box;

use tagward_bench::decision_world::{requests, world, ACCOUNT};
use tagward_core::engine::{authorize, Request};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let stress = args.next().as_deref() == Some("stress");
    let state = world(stress);
    let mut reqs = requests();
    if stress {
        let r0 = format!("arn:aws:iam::{ACCOUNT}:role/r0");
        reqs = reqs.into_iter().map(|r| Request { principal: r0.clone(), ..r }).collect();
    }
    let mut allowed = 0usize;
    for i in 0..n {
        let d = authorize(&state, &reqs[i % reqs.len()], false).expect("decision");
        allowed += usize::from(d.allowed());
        black_box(d);
    }
    println!("{n} decisions ({allowed} allowed){}", if stress { ", stress case" } else { "" });
}
