//! Writes the durability bench's restore state to a data directory, or
//! restores one, on its own, so that a profiler sees the restore and
//! nothing else:
//!
//! ```text
//! cargo build --release -p tagward-bench --example restore
//! target/release/examples/restore write /tmp/restore 1000000   # build the state, write its snapshot
//! perf record -e cpu-clock -g target/release/examples/restore open /tmp/restore
//! target/release/examples/restore write-world /tmp/world.json 1000000
//! perf record -e cpu-clock -g target/release/examples/restore load-world /tmp/world.json
//! ```
//!
//! The state is the memory and durability benches' (`GenSpec` with N keys
//! of 10 tags, 1,000 policies, 100 roles). `open` prints the time
//! `Store::open_dir` took and the resources it restored; `load-world`
//! the time to read the world file and to build its state, as `tagward
//! serve --world` does. Allocates with jemalloc, as the sidecar does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a tool: a failure stops loudly

use std::time::Instant;

use tagward::storage::{Backend, FileBackend};
use tagward::store::{write_snapshot, Durability, Store};
use tagward::world::WorldSpec;
use tagward_bench::gen::GenSpec;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The memory and durability benches' world with `keys` keys.
fn spec(keys: usize) -> GenSpec {
    GenSpec { keys, other_resources: 0, tags: 10, principals: 100, policies: 1_000, ..GenSpec::default() }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: restore write DIR KEYS | restore open DIR | restore write-world FILE KEYS | restore load-world FILE";
    let dir = std::path::PathBuf::from(args.get(1).expect(usage));
    match args.first().map(String::as_str) {
        Some("write") => {
            let keys: usize = args.get(2).and_then(|k| k.parse().ok()).expect(usage);
            let spec = spec(keys);
            let started = Instant::now();
            let state = spec.build_state().expect("state");
            println!("built {keys} keys in {:.2?}", started.elapsed());
            let _ = std::fs::remove_dir_all(&dir);
            let mut backend = FileBackend::open(&dir, u64::MAX).expect("dir");
            backend.recover(&mut |_| Ok(())).expect("empty");
            let started = Instant::now();
            write_snapshot(&mut backend, &state).expect("snapshot");
            println!("wrote the snapshot in {:.2?}", started.elapsed());
        }
        Some("open") => {
            let options = Durability { compact_after_bytes: u64::MAX, event_capacity: 1024 };
            let started = Instant::now();
            let (store, opened) = Store::open_dir(&dir, None, false, &options, None).expect("restore");
            println!(
                "restore (Store::open_dir): {:.2?} for revision {:?}, {} resources",
                started.elapsed(),
                opened.restored,
                store.snapshot().counts().2
            );
            // Not torn down: a profile of the restore should not hold the
            // state's destruction.
            std::mem::forget(store);
        }
        Some("write-world") => {
            let keys: usize = args.get(2).and_then(|k| k.parse().ok()).expect(usage);
            let spec = spec(keys);
            let mut out = std::io::BufWriter::new(std::fs::File::create(&dir).expect("world file"));
            spec.write_world(&mut out).expect("write world");
            // Synced, so that a `load-world` right after it does not also
            // wait for the kernel writing the file back.
            out.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all()).expect("sync world file");
        }
        Some("load-world") => {
            let started = Instant::now();
            let world: WorldSpec = tagward_core::document::read(&dir).expect("read world");
            let read = started.elapsed();
            let state = world.build().expect("build world");
            println!("world file: read {read:.2?}, read and built {:.2?}, {} resources", started.elapsed(), state.counts().2);
            std::mem::forget(state);
            std::mem::forget(world);
        }
        _ => panic!("{usage}"),
    }
}
