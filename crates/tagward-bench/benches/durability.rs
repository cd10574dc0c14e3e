//! What durability costs, measured: admin updates per second with every
//! change synced before its acknowledgement (group commit), next to the same
//! workload in memory in the same run; and the time to restore a data
//! directory of N resources with 10 tags each (the generated world:
//! 1,000 policies, 100 roles, N keys), and the time to load the same world
//! from a world file the way `tagward serve --world` does (read, build, and
//! for a data directory the first snapshot).
//!
//! `cargo bench --bench durability` runs the full sizes (1,000,000 resources;
//! set TAGWARD_BENCH_RESOURCES to change it); without `--bench` (as
//! `cargo test --bench durability` runs it) it is a small smoke run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tagward::state::State;
use tagward::storage::{Backend, FileBackend};
use tagward::store::{write_snapshot, Durability, Store, Ticket, Update};
use tagward::world::WorldSpec;
use tagward_bench::gen::GenSpec;

/// The sidecar's allocator (src/main.rs), with the same `.cargo/config.toml`
/// settings, so that the figures are the sidecar's. Built with
/// `--features system-alloc`, the bench uses the system allocator instead.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const ALLOCATOR_NAME: &str = if cfg!(feature = "system-alloc") { "system allocator" } else { "jemalloc" };

const KEYS: usize = 1_000;

fn world(resources: usize, tags: usize) -> WorldSpec {
    let resources: Vec<_> = (0..resources)
        .map(|k| {
            let tags: serde_json::Map<String, serde_json::Value> =
                (0..tags).map(|t| (format!("tag{t}"), json!(format!("value-{}", (k + t) % 97)))).collect();
            json!({"arn": format!("arn:aws:kms:us-east-1:111122223333:key/{k:08}"), "tags": tags})
        })
        .collect();
    serde_json::from_value(json!({"resources": resources})).expect("world")
}

fn update(i: usize) -> Update {
    Update::SetTags {
        resource: format!("arn:aws:kms:us-east-1:111122223333:key/{:08}", i % KEYS),
        tags: vec![("Seq".into(), i.to_string())],
    }
}

/// Updates per second from `writers` threads that each wait for their
/// acknowledgement before sending the next (like separate clients).
fn acked_one_by_one(store: &Arc<Store>, writers: usize, per_writer: usize) -> f64 {
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..per_writer {
                    store.apply(&update(w * 1_000_003 + i), "bench").expect("apply").wait().expect("durable");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer");
    }
    (writers * per_writer) as f64 / start.elapsed().as_secs_f64()
}

/// Updates per second from one pipelined stream: send all, then collect the
/// acknowledgements in order (what one Admin.Apply stream does).
fn pipelined(store: &Arc<Store>, count: usize) -> f64 {
    let start = Instant::now();
    let tickets: Vec<Ticket> = (0..count).map(|i| store.apply(&update(7_000_000 + i), "bench").expect("apply")).collect();
    for t in tickets {
        t.wait().expect("durable");
    }
    count as f64 / start.elapsed().as_secs_f64()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tagward-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let resources: usize = if full {
        std::env::var("TAGWARD_BENCH_RESOURCES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
    } else {
        2_000
    };
    let scale = if full { 1 } else { 20 };
    let options = Durability { compact_after_bytes: u64::MAX, event_capacity: 1024 };

    println!("== update throughput ({} keys, SetTags of one tag; {ALLOCATOR_NAME})", KEYS);
    let seed = world(KEYS, 2);
    let memory = Arc::new(Store::new(seed.build().expect("state"), 1024));
    let dir = temp_dir("throughput");
    let (durable, _) = Store::open_dir(&dir, Some(&seed), false, &options, None).expect("open");
    let mem_pipe = pipelined(&memory, 20_000 / scale);
    let disk_pipe = pipelined(&durable, 20_000 / scale);
    println!(
        "one pipelined stream:   in memory {mem_pipe:>10.0}/s   durable {disk_pipe:>8.0}/s   ratio {:.3}",
        disk_pipe / mem_pipe
    );
    for writers in [1, 16, 64] {
        let per = (2_000 / scale / writers).max(5);
        let mem = acked_one_by_one(&memory, writers, per * 10);
        let disk = acked_one_by_one(&durable, writers, per);
        println!("{writers:>3} writers, each waits: in memory {mem:>10.0}/s   durable {disk:>8.0}/s   ratio {:.3}", disk / mem);
    }
    drop(durable);
    let _ = std::fs::remove_dir_all(&dir);

    // The world of the memory bench: 1,000 policies, 100 roles, N keys x 10 tags.
    let spec = GenSpec { keys: resources, other_resources: 0, tags: 10, principals: 100, policies: 1_000, ..GenSpec::default() };
    println!("== restore: {resources} keys x 10 tags, 1,000 policies, 100 roles ({ALLOCATOR_NAME})");
    let build = Instant::now();
    let state: State = spec.build_state().expect("state");
    println!("build the state in memory: {:.2?}", build.elapsed());
    let dir = temp_dir("restore");
    let mut backend = FileBackend::open(&dir, u64::MAX).expect("dir");
    backend.recover(&mut |_| Ok(())).expect("empty");
    let write = Instant::now();
    write_snapshot(&mut backend, &state).expect("snapshot");
    drop(backend);
    let snap = dir.join(format!("snap-{:020}.tws", state.revision()));
    let size = std::fs::metadata(&snap).map(|m| m.len()).unwrap_or(0);
    println!("write the snapshot: {:.2?} ({:.1} MiB)", write.elapsed(), size as f64 / (1 << 20) as f64);
    drop(state);
    let open = Instant::now();
    let (store, opened) = Store::open_dir(&dir, None, false, &options, None).expect("restore");
    let took: Duration = open.elapsed();
    println!(
        "restore (Store::open_dir): {took:.2?} for revision {:?}, {} resources",
        opened.restored,
        store.snapshot().counts().2
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);

    println!("== world file: the same world");
    let file = temp_dir("world").with_extension("json");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file).expect("world file"));
        spec.write_world(&mut out).expect("write world");
        // On disk before it is read, as the snapshot is (written durably):
        // else the read below also waits for the kernel writing the file
        // back (about 3 s of a 9 s load on the machine of 2026-12-04).
        out.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all()).expect("sync world file");
    }
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let read = Instant::now();
    let world: WorldSpec = tagward_core::document::read(&file).expect("read world");
    let parsed = read.elapsed();
    let state = world.build().expect("build world");
    let built = read.elapsed();
    println!(
        "read {:.1} MiB: {parsed:.2?}; built: {built:.2?} ({} resources) — what `serve --world --ephemeral` waits for",
        size as f64 / (1 << 20) as f64,
        state.counts().2
    );
    drop(state);
    let _ = std::fs::remove_file(&file);
    let dir = temp_dir("seed");
    let seed = Instant::now();
    let (store, _) = Store::open_dir(&dir, Some(&world), false, &options, None).expect("seed");
    println!("seed an empty data directory (build + first snapshot): {:.2?}", seed.elapsed());
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
