//! Fleet mode against a real etcd (tests/common/etcd.rs): several
//! `tagward serve --store etcd://...` processes on loopback sharing one
//! prefix. Where `etcd` is not installed these tests say so loudly and pass
//! (under `CI=true` they fail); deploy/install-etcd.sh installs it. The
//! conflicting-writers test makes 300 writes per sidecar by default;
//! `TAGWARD_FLEET_WRITES=1000` runs the full 1,000 each (about 30 s).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd::{self, Etcd};
use common::*;
use tagward::grpc::proto;
use tonic::Code;

const START: Duration = Duration::from_secs(30);

/// A sidecar on `url` seeded (once, for the fleet) from the test world.
fn sidecar(scratch: &Scratch, url: &str, name: &str) -> Serve {
    let world = scratch.join("world.json");
    if !world.exists() {
        std::fs::write(&world, WORLD).unwrap();
    }
    Serve::new().args([
        "--store",
        url,
        "--world",
        world.to_str().unwrap(),
        "--audit-log",
        scratch.join(&format!("{name}-audit.jsonl")).to_str().unwrap(),
        "--node-name",
        name,
        "--max-staleness",
        "1",
    ])
}

fn retag(project: &str) -> proto::TagResourceRequest {
    proto::TagResourceRequest {
        principal: KEY_ADMIN.into(),
        resource: KEY_ALPHA.into(),
        tags: vec![tag("Project", project)],
        ..Default::default()
    }
}

fn decrypt(min_revision: u64) -> proto::AuthorizeRequest {
    proto::AuthorizeRequest { min_revision, ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA) }
}

/// Every event `Watch` streams from `from` until it has reached `until`.
async fn history(server: &Tagward, from: u64, until: u64) -> Vec<(u64, Vec<(String, String)>)> {
    let mut admin = server.admin().await;
    let mut stream = admin.watch(proto::WatchRequest { from_revision: from }).await.unwrap().into_inner();
    let mut out = Vec::new();
    if until <= from {
        return out;
    }
    while let Some(event) =
        tokio::time::timeout(Duration::from_secs(20), stream.message()).await.expect("the watch stalled").unwrap()
    {
        if let Some(proto::watch_event::Event::TagChange(change)) = &event.event {
            out.push((event.revision, tags_of(&change.after)));
        }
        if event.revision >= until {
            break;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn three_sidecars_share_one_state_and_min_revision_means_the_same_on_each() {
    if !etcd::available("three_sidecars_share_one_state") {
        return;
    }
    let scratch = Scratch::new("fleet-three");
    let etcd = Etcd::start(scratch.path()).await;
    let url = etcd.url("three");
    // Started together: one of them seeds the prefix, the others find it seeded.
    let (sa, sb, sc) = (sidecar(&scratch, &url, "a"), sidecar(&scratch, &url, "b"), sidecar(&scratch, &url, "c"));
    let (a, b, c) = tokio::join!(sa.start(START), sb.start(START), sc.start(START));
    let mut fleet = vec![a.unwrap(), b.unwrap(), c.unwrap()];
    let seed_rev = {
        let r = fleet[0].authz().await.authorize(decrypt(0)).await.unwrap().into_inner();
        assert!(allowed(&r), "the seeded world allows AlphaApp: {r:?}");
        r.revision
    };
    for s in &fleet {
        let r = s.authz().await.authorize(decrypt(seed_rev)).await.unwrap().into_inner();
        assert_eq!(r.revision, seed_rev, "every sidecar loaded the same seeded state");
    }

    // A write on each sidecar, visible on the other two with its revision.
    let mut last = seed_rev;
    for (i, project) in ["Beta", "Alpha", "Gamma"].into_iter().enumerate() {
        let done = fleet[i].tagging().await.tag_resource(retag(project)).await.unwrap().into_inner();
        assert!(done.changed && done.revision > last, "{done:?} after {last}");
        last = done.revision;
        for (j, other) in fleet.iter().enumerate() {
            let r = other.authz().await.authorize(decrypt(done.revision)).await.unwrap().into_inner();
            assert!(r.revision >= done.revision, "sidecar {j} answered at {} for min_revision {}", r.revision, done.revision);
            assert_eq!(allowed(&r), project == "Alpha", "sidecar {j} after Project={project} at revision {}", done.revision);
            let listed = other
                .tagging()
                .await
                .list_resource_tags(proto::ListResourceTagsRequest {
                    principal: KEY_ADMIN.into(),
                    resource: KEY_ALPHA.into(),
                    min_revision: done.revision,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(tags_of(&listed.tags).contains(&("Project".to_string(), project.to_string())), "{listed:?}");
        }
    }
    // An admin update through the admin stream is shared the same way.
    let rev = apply_ok(&mut fleet[2].admin().await, set_tags(KEY_ALPHA, &[("Project", "Alpha"), ("Type", "General")])).await;
    assert!(rev > last);
    let r = fleet[0].authz().await.authorize(decrypt(rev)).await.unwrap().into_inner();
    assert!(allowed(&r) && r.revision >= rev, "{r:?}");

    // A revision nobody made yet: DEADLINE_EXCEEDED, not a stale answer.
    let err = fleet[1].authz().await.authorize(decrypt(rev + 1000)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    // Every sidecar's Watch streams every change, whoever made it.
    for s in &fleet {
        let seen = history(s, seed_rev, rev).await;
        assert_eq!(seen.len(), 4, "{seen:?}");
    }
    // Each change is audited once, by the sidecar that made it.
    for s in &mut fleet {
        s.term(Duration::from_secs(10));
    }
    let mut names = BTreeMap::new();
    for name in ["a", "b", "c"] {
        let text = std::fs::read_to_string(scratch.join(&format!("{name}-audit.jsonl"))).unwrap_or_default();
        let events: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["eventName"].as_str().unwrap_or_default().to_string())
            .collect();
        names.insert(name, events);
    }
    assert_eq!(names["a"], vec!["TagResource"], "{names:?}");
    assert_eq!(names["b"], vec!["TagResource"], "{names:?}");
    assert_eq!(names["c"].len(), 2, "{names:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sidecars_retagging_one_key_agree_on_the_tags_and_the_history() {
    if !etcd::available("two_sidecars_retagging_one_key") {
        return;
    }
    let writes: usize = std::env::var("TAGWARD_FLEET_WRITES").ok().and_then(|n| n.parse().ok()).unwrap_or(300);
    let scratch = Scratch::new("fleet-conflict");
    let etcd = Etcd::start(scratch.path()).await;
    let url = etcd.url("conflict");
    let a = sidecar(&scratch, &url, "a").start(START).await.unwrap();
    let b = sidecar(&scratch, &url, "b").start(START).await.unwrap();
    let start = a.authz().await.authorize(decrypt(0)).await.unwrap().into_inner().revision;
    let writer = |mut client: TaggingClient<tonic::transport::Channel>, who: &'static str| {
        async move {
            let mut acked = Vec::new();
            for i in 0..writes {
                let value = format!("{who}-{i}");
                match client.tag_resource(retag(&value)).await {
                    Ok(done) => acked.push((done.into_inner().revision, value)),
                    // Refused (gave up after the bounded retries): not acknowledged.
                    Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
                }
            }
            acked
        }
    };
    let (from_a, from_b) = tokio::join!(writer(a.tagging().await, "a"), writer(b.tagging().await, "b"));
    let mut acked: Vec<(u64, String)> = from_a.into_iter().chain(from_b).collect();
    acked.sort();
    assert!(acked.len() * 10 >= writes * 2 * 9, "most writes are acknowledged: {} of {}", acked.len(), writes * 2);
    let revisions: std::collections::BTreeSet<u64> = acked.iter().map(|(r, _)| *r).collect();
    assert_eq!(revisions.len(), acked.len(), "every acknowledged write has a revision of its own");
    let newest = acked.last().unwrap().0;

    // Both sidecars hold the same history and it holds every acknowledged write.
    let (ha, hb) = tokio::join!(history(&a, start, newest), history(&b, start, newest));
    assert_eq!(ha, hb, "the two sidecars saw different histories");
    let by_rev: BTreeMap<u64, Vec<(String, String)>> = ha.into_iter().collect();
    for (rev, value) in &acked {
        let tags = by_rev.get(rev).unwrap_or_else(|| panic!("acknowledged revision {rev} is missing from the history"));
        assert!(tags.contains(&("Project".to_string(), value.clone())), "revision {rev}: {tags:?}, wrote {value}");
    }
    // And the same final tags, those of the last acknowledged write.
    for s in [&a, &b] {
        let listed = s
            .tagging()
            .await
            .list_resource_tags(proto::ListResourceTagsRequest {
                principal: KEY_ADMIN.into(),
                resource: KEY_ALPHA.into(),
                min_revision: newest,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(tags_of(&listed.tags).contains(&("Project".to_string(), acked.last().unwrap().1.clone())), "{listed:?}");
    }
    eprintln!("{} of {} conflicting writes acknowledged, revisions {start}..{newest}", acked.len(), writes * 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_killed_and_restarted_under_load() {
    if !etcd::available("etcd_killed_and_restarted_under_load") {
        return;
    }
    let scratch = Scratch::new("fleet-etcd-kill");
    let mut etcd = Etcd::start(scratch.path()).await;
    let url = etcd.url("outage");
    let a = sidecar(&scratch, &url, "a").start(START).await.unwrap();
    let b = sidecar(&scratch, &url, "b").start(START).await.unwrap();
    let before = a.tagging().await.tag_resource(retag("Beta")).await.unwrap().into_inner().revision;
    let r = b.authz().await.authorize(decrypt(before)).await.unwrap().into_inner();
    assert!(!allowed(&r));

    // Authorize keeps going on both sidecars through the outage.
    let load = |mut client: AuthorizerClient<tonic::transport::Channel>| async move {
        let mut answers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while answers.len() < 400 && Instant::now() < deadline {
            let r = client.authorize(decrypt(0)).await.expect("Authorize answers during the outage").into_inner();
            answers.push((r.revision, allowed(&r)));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        answers
    };
    let (load_a, load_b) = (tokio::spawn(load(a.authz().await)), tokio::spawn(load(b.authz().await)));
    etcd.kill9();
    let err = a.tagging().await.tag_resource(retag("Alpha")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "a write while etcd is down: {err:?}");
    // Health goes NOT_SERVING once the snapshot is older than --max-staleness (1 s).
    let mut health = HealthClient::new(channel(a.data()).await);
    let mut status = SERVING;
    for _ in 0..200 {
        status = health_check(&mut health, "").await.unwrap();
        if status != SERVING {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(status, SERVING, "health still SERVING with etcd down");
    let during = a.authz().await.authorize(decrypt(0)).await.unwrap().into_inner();
    assert_eq!((during.revision, allowed(&during)), (before, false), "answers from the last snapshot, at its revision");

    etcd.restart().await;
    // Writes resume once the sidecar reconnects.
    let mut after = None;
    for _ in 0..400 {
        match a.tagging().await.tag_resource(retag("Alpha")).await {
            Ok(done) => {
                after = Some(done.into_inner().revision);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let after = after.expect("writes never resumed after etcd came back");
    assert!(after > before);
    let r = b.authz().await.authorize(decrypt(after)).await.unwrap().into_inner();
    assert!(allowed(&r) && r.revision >= after, "B resumed its watch: {r:?}");
    for _ in 0..200 {
        status = health_check(&mut health, "").await.unwrap();
        if status == SERVING {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, SERVING, "health SERVING again once current");

    // No sidecar served a state etcd never had: at `before` the key was
    // Beta (deny), from `after` Alpha (allow), nothing in between.
    for answers in [load_a.await.unwrap(), load_b.await.unwrap()] {
        assert!(!answers.is_empty());
        let mut last = 0;
        for (rev, allow) in answers {
            assert!(rev >= last, "revisions only grow");
            last = rev;
            assert!(rev == before || rev >= after, "an answer at revision {rev}, neither {before} nor after {after}");
            assert_eq!(allow, rev >= after, "at revision {rev}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_killed_and_restarted_catches_up_and_a_compaction_makes_a_lagging_one_reload() {
    if !etcd::available("a_sidecar_killed_and_restarted_catches_up") {
        return;
    }
    let scratch = Scratch::new("fleet-restart");
    let mut etcd = Etcd::start(scratch.path()).await;
    let url = etcd.url("restart");
    let a = sidecar(&scratch, &url, "a").start(START).await.unwrap();
    let mut b = sidecar(&scratch, &url, "b").start(START).await.unwrap();

    // B is killed; A writes; B comes back and catches up.
    b.kill9(Duration::from_secs(10));
    let rev = a.tagging().await.tag_resource(retag("Beta")).await.unwrap().into_inner().revision;
    let b = sidecar(&scratch, &url, "b").start(START).await.unwrap();
    let r = b.authz().await.authorize(decrypt(rev)).await.unwrap().into_inner();
    assert!(!allowed(&r) && r.revision >= rev, "{r:?}");

    // B stops (SIGSTOP) and etcd restarts, so B's watch is gone with
    // nothing of what follows in flight; A writes and etcd compacts its
    // history; B continues and must make its watch again from a compacted
    // revision.
    b.signal("-STOP");
    etcd.restart().await;
    let mut newest = rev;
    for project in ["Alpha", "Beta", "Alpha"] {
        newest = write_until_ok(&a, project).await;
    }
    etcd.client().compact(newest).await.unwrap();
    b.signal("-CONT");
    let mut seen = None;
    for _ in 0..600 {
        match b.authz().await.authorize(decrypt(newest)).await {
            Ok(r) => {
                seen = Some(r.into_inner());
                break;
            }
            Err(e) => assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}"),
        }
    }
    let r = seen.expect("B never reached the newest revision after the compaction");
    assert!(allowed(&r) && r.revision >= newest, "{r:?}");
    let mut b = b;
    let log = b.term(Duration::from_secs(10));
    assert!(log.contains("reloading the prefix") && log.contains("reloaded the prefix"), "B reloaded:\n{log}");
}

/// A TagResource through `server`, tried again while it is UNAVAILABLE
/// (etcd restarting); its revision.
async fn write_until_ok(server: &Tagward, project: &str) -> u64 {
    for _ in 0..400 {
        match server.tagging().await.tag_resource(retag(project)).await {
            Ok(done) => return done.into_inner().revision,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("writes never resumed");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_scenario_corpus_runs_against_an_etcd_backed_sidecar() {
    if !etcd::available("the_scenario_corpus_runs_against_an_etcd_backed_sidecar") {
        return;
    }
    let scratch = Scratch::new("fleet-scenarios");
    let etcd = Etcd::start(scratch.path()).await;
    let server = Serve::new()
        .for_scenarios()
        .args(["--store", &etcd.url("scenarios"), "--world", "deploy/world/example.json"])
        .start(START)
        .await
        .unwrap();
    let (d, a) = (server.data().to_string(), server.admin_addr().to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["test", "--server", &d, "--admin", &a, "tests/scenarios"])
            .current_dir(manifest_dir())
            .env_remove("TAGWARD_ADMIN_TOKEN")
            .output()
            .expect("run tagward test")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "tagward test --server against etcd failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let re = regex::Regex::new(r"^(\d+) passed, 0 failed$").unwrap();
    let passed: usize = re.captures(last).unwrap_or_else(|| panic!("last line {last:?}\n{stdout}"))[1].parse().unwrap();
    assert!(passed >= 504, "only {passed} steps ran:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn import_fills_an_empty_prefix_once_and_export_reads_it_back() {
    if !etcd::available("import_fills_an_empty_prefix_once") {
        return;
    }
    let scratch = Scratch::new("fleet-import");
    let etcd = Etcd::start(scratch.path()).await;
    let url = etcd.url("imported");
    let world = scratch.join("world.json");
    std::fs::write(&world, WORLD).unwrap();
    let run = |args: Vec<String>| tokio::task::spawn_blocking(move || command(&args).output().expect("run tagward"));
    let import = vec!["import".to_string(), "--store".into(), url.clone(), world.to_string_lossy().into_owned()];
    let first = run(import.clone()).await.unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let again = run(import).await.unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("already holds state"), "{stderr}");

    let out = scratch.join("export.json");
    let export = vec!["export".to_string(), "--store".into(), url.clone(), "--output".into(), out.to_string_lossy().into_owned()];
    let exported = run(export).await.unwrap();
    assert!(exported.status.success(), "{}", String::from_utf8_lossy(&exported.stderr));
    let back: tagward::world::WorldSpec = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let want = tagward::world::WorldSpec::from_state(&common::world(WORLD).build().unwrap());
    assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&want).unwrap());

    // A sidecar without a world file serves what was imported.
    let server = Serve::new().args(["--store", &url]).start(START).await.unwrap();
    let r = server.authz().await.authorize(decrypt(0)).await.unwrap().into_inner();
    assert!(allowed(&r), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fleet_mode_reaches_etcd_over_tls_with_a_client_certificate() {
    if !etcd::available("fleet_mode_reaches_etcd_over_tls") {
        return;
    }
    let scratch = Scratch::new("fleet-tls");
    let ca = common::pki::Ca::new("etcd test CA");
    let (server, client) = (ca.server("etcd"), ca.client("spiffe://test/tagward"));
    let file = |name: &str, text: &str| {
        let path = scratch.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let tls = tagward::grpc::etcd::EtcdTls {
        ca: Some(file("ca.pem", &ca.pem)),
        cert: Some(file("client.pem", &client.cert)),
        key: Some(file("client.key", &client.key)),
    };
    let etcd =
        Etcd::start_tls(scratch.path(), file("server.pem", &server.cert), file("server.key", &server.key), tls.clone()).await;
    let url = etcd.url("tls");
    let flags = |with_cert: bool| {
        let mut args = vec!["--etcd-ca".to_string(), tls.ca.as_ref().unwrap().to_string_lossy().into_owned()];
        if with_cert {
            args.extend(["--etcd-cert".into(), tls.cert.as_ref().unwrap().to_string_lossy().into_owned()]);
            args.extend(["--etcd-key".into(), tls.key.as_ref().unwrap().to_string_lossy().into_owned()]);
        }
        args
    };
    let a = sidecar(&scratch, &url, "a").args(flags(true)).start(START).await.unwrap();
    let done = a.tagging().await.tag_resource(retag("Beta")).await.unwrap().into_inner();
    let r = a.authz().await.authorize(decrypt(done.revision)).await.unwrap().into_inner();
    assert!(!allowed(&r) && r.revision >= done.revision, "{r:?}");

    // Without the client certificate etcd refuses the connection: the
    // sidecar does not start, and says why.
    let mut refused =
        sidecar(&scratch, &url, "b").args(flags(false)).args(["--etcd-timeout-ms", "1000", "--etcd-start-wait", "0"]).spawn();
    let status = tokio::task::block_in_place(|| refused.wait_for_exit(Duration::from_secs(30))).expect("it exits");
    let stderr = refused.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("cannot seed the prefix") || stderr.contains("cannot load the prefix"), "{stderr}");
    // A half-given client identity is refused before anything is dialled.
    let mut half = sidecar(&scratch, &url, "c").args(flags(false)).args(["--etcd-cert", "x.pem"]).spawn();
    let status = tokio::task::block_in_place(|| half.wait_for_exit(Duration::from_secs(30))).expect("it exits");
    let stderr = half.stderr();
    assert!(!status.success() && stderr.contains("--etcd-cert"), "{stderr}");
}

/// Every event one `Watch` stream from `from` yields until it has reached
/// `until`, as (revision, event); the stream stays open for more.
async fn watch_until(stream: &mut tonic::Streaming<proto::WatchEvent>, until: u64, out: &mut Vec<proto::WatchEvent>) {
    while out.last().is_none_or(|e| e.revision < until) {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("the watch stalled")
            .expect("the watch failed")
            .expect("the watch ended");
        out.push(event);
    }
}

fn tag_revisions(events: &[proto::WatchEvent]) -> Vec<u64> {
    events.iter().filter(|e| matches!(e.event, Some(proto::watch_event::Event::TagChange(_)))).map(|e| e.revision).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_started_later_watches_the_whole_history_and_a_compacted_revision_is_out_of_range() {
    if !etcd::available("a_sidecar_started_later_watches_the_whole_history") {
        return;
    }
    let scratch = Scratch::new("fleet-history");
    let etcd = Etcd::start(scratch.path()).await;
    let url = etcd.url("history");
    let a = sidecar(&scratch, &url, "a").start(START).await.unwrap();
    let mut revs = Vec::new();
    for project in ["Beta", "Alpha", "Gamma", "Alpha"] {
        revs.push(a.tagging().await.tag_resource(retag(project)).await.unwrap().into_inner().revision);
    }
    // B loads the prefix after those changes, then one more is made: B
    // keeps that one itself, the older ones come from etcd's history.
    let b = sidecar(&scratch, &url, "b").start(START).await.unwrap();
    revs.push(a.tagging().await.tag_resource(retag("Beta")).await.unwrap().into_inner().revision);
    let r = b.authz().await.authorize(decrypt(revs[4])).await.unwrap().into_inner();
    assert!(r.revision >= revs[4], "{r:?}");

    let mut on_b = b.admin().await.watch(proto::WatchRequest { from_revision: 1 }).await.unwrap().into_inner();
    let mut seen = Vec::new();
    watch_until(&mut on_b, revs[4], &mut seen).await;
    assert_eq!(tag_revisions(&seen), revs, "every tag change, once, in order: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0].revision <= w[1].revision), "revisions only grow: {seen:?}");
    assert!(
        matches!(&seen[0].event, Some(proto::watch_event::Event::EntityChange(c)) if c.kind == "world"),
        "the history starts with the seeding: {seen:?}"
    );
    // The same stream goes on into live events: the next change, nothing
    // repeated and nothing skipped at the seam.
    revs.push(a.tagging().await.tag_resource(retag("Alpha")).await.unwrap().into_inner().revision);
    watch_until(&mut on_b, revs[5], &mut seen).await;
    assert_eq!(tag_revisions(&seen), revs, "{seen:?}");
    // A (which seeded the prefix) streams the same history from revision 1.
    let mut on_a = a.admin().await.watch(proto::WatchRequest { from_revision: 1 }).await.unwrap().into_inner();
    let mut seen_a = Vec::new();
    watch_until(&mut on_a, revs[5], &mut seen_a).await;
    assert_eq!(seen_a, seen, "both sidecars stream one history");

    // After a compaction, a revision before it is OUT_OF_RANGE, and the
    // message names the oldest retained revision; from there it works.
    etcd.client().compact(revs[2]).await.unwrap();
    let err = b.admin().await.watch(proto::WatchRequest { from_revision: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains(&format!("oldest retained revision is {}", revs[2])), "{err:?}");
    let mut later = b.admin().await.watch(proto::WatchRequest { from_revision: revs[2] - 1 }).await.unwrap().into_inner();
    let mut seen = Vec::new();
    watch_until(&mut later, revs[5], &mut seen).await;
    assert_eq!(tag_revisions(&seen), revs[2..].to_vec(), "{seen:?}");
    // A watch from B's own kept events does not touch etcd's history.
    let mut kept = b.admin().await.watch(proto::WatchRequest { from_revision: revs[4] }).await.unwrap().into_inner();
    let mut seen = Vec::new();
    watch_until(&mut kept, revs[5], &mut seen).await;
    assert_eq!(tag_revisions(&seen), vec![revs[5]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_started_before_etcd_waits_for_it_and_gives_up_after_its_start_wait() {
    if !etcd::available("a_sidecar_started_before_etcd_waits_for_it") {
        return;
    }
    let scratch = Scratch::new("fleet-start-wait");
    let mut etcd = Etcd::unstarted(scratch.path());
    let url = etcd.url("late");
    // Nothing answers on etcd's port: with a short --etcd-start-wait the
    // sidecar tries, then exits with the reason.
    let mut gave_up = sidecar(&scratch, &url, "early").args(["--etcd-start-wait", "1", "--etcd-timeout-ms", "200"]).spawn();
    let status = tokio::task::block_in_place(|| gave_up.wait_for_exit(Duration::from_secs(30))).expect("it exits");
    let stderr = gave_up.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("trying again") && stderr.contains("still unreachable after"), "{stderr}");

    // With the default wait, a sidecar started first comes up once etcd
    // does, seeded and serving.
    let waiting = sidecar(&scratch, &url, "a").args(["--etcd-timeout-ms", "200"]);
    let (started, ()) = tokio::join!(waiting.start(START), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        etcd.restart().await;
    });
    let mut a = started.unwrap();
    let r = a.authz().await.authorize(decrypt(0)).await.unwrap().into_inner();
    assert!(allowed(&r), "{r:?}");
    let done = a.tagging().await.tag_resource(retag("Beta")).await.unwrap().into_inner();
    assert!(done.changed);
    let log = a.term(Duration::from_secs(10));
    assert!(log.contains("etcd is not reachable yet; trying again"), "it did wait:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_world_too_large_for_one_etcd_transaction_is_refused_at_once_with_the_limit_named() {
    if !etcd::available("a_world_too_large_for_one_etcd_transaction") {
        return;
    }
    let scratch = Scratch::new("fleet-large-seed");
    let etcd = Etcd::start(scratch.path()).await;
    let url = etcd.url("large");
    let resources: Vec<serde_json::Value> = (0..200)
        .map(|i| serde_json::json!({"arn": format!("arn:aws:kms:us-east-1:111122223333:key/k{i}"), "tags": {"n": i.to_string()}}))
        .collect();
    let world = scratch.join("large.json");
    std::fs::write(&world, serde_json::json!({ "resources": resources }).to_string()).unwrap();
    // Not an outage: the sidecar does not wait out --etcd-start-wait (60 s by
    // default) but exits at once, naming the operation count and etcd's flag.
    let mut server = Serve::new().args(["--store", &url, "--world", world.to_str().unwrap()]).spawn();
    let status = tokio::task::block_in_place(|| server.wait_for_exit(Duration::from_secs(30))).expect("it exits");
    let stderr = server.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot seed the prefix") && stderr.contains("201 operations") && stderr.contains("--max-txn-ops"),
        "{stderr}"
    );
    assert!(!stderr.contains("trying again"), "{stderr}");
    // import says the same.
    let args = vec!["import".to_string(), "--store".into(), url.clone(), world.to_string_lossy().into_owned()];
    let out = tokio::task::spawn_blocking(move || command(&args).output().unwrap()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--max-txn-ops"), "{stderr}");
    assert_eq!(etcd.client_for("large").newest().await.unwrap(), 0, "nothing was written");
}

#[test]
fn durations_in_seconds_that_are_not_numbers_are_refused_before_anything_starts() {
    for (flag, value) in [("--etcd-start-wait", "NaN"), ("--etcd-start-wait", "-1"), ("--max-staleness", "inf")] {
        let given = format!("{flag}={value}");
        let args: Vec<String> =
            ["serve", "--listen", "127.0.0.1:0", "--store", "etcd://127.0.0.1:9/x", &given].map(String::from).to_vec();
        let out = command(&args).output().expect("run tagward");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains("not a number of seconds"), "{flag} {value}: {stderr}");
    }
}
