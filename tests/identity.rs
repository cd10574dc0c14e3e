//! Caller identity for Tagging writes, `--tagging`, and the audit of
//! refusals: through the real services on loopback. Until the transport
//! puts a `Peer` into every request, a test interceptor inserts one (from
//! test-only metadata) in front of the real Tagging service.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tagward::audit::AuditLog;
use tagward::grpc::identity::{Callers, IdentityMap, TaggingMode};
use tagward::grpc::peer::Peer;
use tagward::grpc::proto::{self, tagging_server::TaggingServer};
use tagward::grpc::server;
use tagward::grpc::service::{Shared, TaggingService};
use tagward::store::{Durability, Store};
use tokio::sync::watch;
use tonic::{Code, Request, Status};

const ROOT: &str = "arn:aws:iam::111122223333:root";
const ADMIN_SPIFFE: &str = "spiffe://example.org/ns/prod/sa/key-admin";
const APP_SPIFFE: &str = "spiffe://example.org/ns/prod/sa/alpha-app";

fn map() -> IdentityMap {
    IdentityMap::parse(
        &format!(
            r#"{{"identities": [
                {{"uri": "{ADMIN_SPIFFE}", "principals": ["{KEY_ADMIN}"]}},
                {{"uri": "{APP_SPIFFE}", "principals": ["arn:aws:iam::111122223333:role/Alpha*"]}},
                {{"uid": 1000, "principals": ["{KEY_ADMIN}"]}}
            ]}}"#
        ),
        false,
    )
    .unwrap()
}

/// The peer a test asks for: `x-test-uri` (mTLS), `x-test-uid` (a Unix
/// socket) or `x-test-addr` (plain TCP).
#[allow(clippy::result_large_err)]
fn test_peer(mut req: Request<()>) -> Result<Request<()>, Status> {
    let get = |k: &str| req.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let peer = if let Some(uri) = get("x-test-uri") {
        Some(Peer::Tls { addr: "10.0.0.7:40000".parse().unwrap(), uris: vec![uri], dns: Vec::new() })
    } else if let Some(uid) = get("x-test-uid") {
        Some(Peer::Unix { uid: uid.parse().unwrap(), gid: 0 })
    } else {
        get("x-test-addr").map(|a| Peer::Tcp { addr: a.parse().unwrap() })
    };
    if let Some(peer) = peer {
        req.extensions_mut().insert(peer);
    }
    Ok(req)
}

fn memory_store(audit: &Path, node: &str) -> Arc<Store> {
    let options = Durability { compact_after_bytes: u64::MAX, event_capacity: 100 };
    let audit = AuditLog::open(audit).unwrap().with_node(node);
    Store::open_memory(Some(&world(WORLD)), &options, Some(audit)).unwrap().0
}

/// The real Tagging service on loopback behind the test interceptor.
async fn tagging_with_peers(store: Arc<Store>, callers: Arc<Callers>) -> (SocketAddr, watch::Sender<bool>) {
    let (down, down_rx) = watch::channel(false);
    let shared = Shared {
        store,
        min_revision_wait: Duration::from_secs(1),
        max_batch: 100,
        shutdown: down_rx.clone(),
        decision_log: None,
        context_rules: Arc::new(tagward::engine::ContextRules::SERVER),
        callers,
        tagging: TaggingMode::On,
        evaluations: tagward::grpc::service::evaluation_slots(),
        meters: Arc::new(tagward::observe::Meters::new()),
        decisions: None,
    };
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut rx = down_rx;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TaggingServer::with_interceptor(TaggingService(shared), test_peer))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
                let _ = rx.wait_for(|d| *d).await;
            }),
    );
    (addr, down)
}

fn as_peer<T>(msg: T, key: &'static str, value: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(key, value.parse().unwrap());
    r
}

fn tag_req(principal: &str, resource: &str, t: &[(&str, &str)]) -> proto::TagResourceRequest {
    proto::TagResourceRequest {
        principal: principal.into(),
        resource: resource.into(),
        tags: t.iter().map(|(k, v)| tag(k, v)).collect(),
        ..Default::default()
    }
}

/// The audit trail once it holds at least `n` records.
async fn audit_records(path: &Path, n: usize) -> Vec<Value> {
    for _ in 0..500 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if records.len() >= n {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{} never held {n} records", path.display());
}

fn key_tags(store: &Store, key: &str) -> Vec<(String, String)> {
    tagward::change::pairs(store.snapshot().target(key).unwrap().tags())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claiming_the_root_or_the_key_admin_is_refused_unless_the_caller_is_mapped_to_it() {
    let scratch = Scratch::new("identity-escalation");
    let audit = scratch.join("audit.jsonl");
    let store = memory_store(&audit, "node-a");
    let (addr, _down) = tagging_with_peers(store.clone(), Callers::with_map(map())).await;
    let mut tagging = TaggingClient::new(channel(addr).await);
    let before = (store.revision(), key_tags(&store, KEY_BETA));

    // The escalation: an app's identity claims the root and the key
    // administrator, to retag a Beta key into its own project.
    for claimed in [ROOT, KEY_ADMIN] {
        let err = tagging
            .tag_resource(as_peer(tag_req(claimed, KEY_BETA, &[("Project", "Alpha")]), "x-test-uri", APP_SPIFFE))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert_eq!(error_name(&err).as_deref(), Some("CallerNotAllowed"), "{err:?}");
        assert_eq!(field(&err).as_deref(), Some("principal"));
        assert!(err.message().contains(APP_SPIFFE) && err.message().contains(&format!("may not act as {claimed}")), "{err:?}");
    }
    let err = tagging
        .untag_resource(as_peer(
            proto::UntagResourceRequest {
                principal: KEY_ADMIN.into(),
                resource: KEY_BETA.into(),
                tag_keys: vec!["Project".into()],
                ..Default::default()
            },
            "x-test-uid",
            "1001",
        ))
        .await
        .unwrap_err();
    assert_eq!(error_name(&err).as_deref(), Some("CallerNotAllowed"), "an unmapped uid: {err:?}");
    assert!(err.message().contains("uid 1001"), "{err:?}");
    // A loopback caller with no verified identity is not trusted once a map is given.
    let err = tagging.tag_resource(tag_req(KEY_ADMIN, KEY_BETA, &[("Project", "Alpha")])).await.unwrap_err();
    assert_eq!(error_name(&err).as_deref(), Some("CallerNotAllowed"), "{err:?}");
    assert_eq!((store.revision(), key_tags(&store, KEY_BETA)), before, "the key's tags are unchanged");

    // Each refusal is audited as a denied attempt, with no revision.
    let records = audit_records(&audit, 4).await;
    assert_eq!(records.len(), 4, "{records:#?}");
    for r in &records {
        assert_eq!(r["errorCode"], "CallerNotAllowed", "{r}");
        assert_eq!(r["additionalEventData"]["revision"], before.0);
        assert_eq!(r["additionalEventData"]["node"], "node-a");
    }
    assert_eq!(records[0]["userIdentity"]["type"], "Root");
    assert_eq!(records[0]["eventName"], "TagResource");
    assert_eq!(records[2]["eventName"], "UntagResource");
    assert!(records[0]["additionalEventData"]["caller"].as_str().unwrap().contains(APP_SPIFFE));

    // The mapped identities write as their principals.
    let ok = tagging
        .tag_resource(as_peer(tag_req(KEY_ADMIN, KEY_BETA, &[("Project", "Alpha")]), "x-test-uri", ADMIN_SPIFFE))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.changed && ok.revision > before.0, "{ok:?}");
    let ok = tagging
        .tag_resource(as_peer(tag_req(KEY_ADMIN, KEY_BETA, &[("Type", "Special")]), "x-test-uid", "1000"))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.changed, "{ok:?}");
    // Mapped but denied by policy: AccessDenied, audited too.
    let err = tagging
        .tag_resource(as_peer(tag_req(KEY_ADMIN, KEY_BETA, &[("Owner", "me")]), "x-test-uri", ADMIN_SPIFFE))
        .await
        .unwrap_err();
    assert_eq!(error_name(&err).as_deref(), Some("AccessDeniedException"), "{err:?}");
    let records = audit_records(&audit, 7).await;
    let last = records.last().unwrap();
    assert_eq!((last["errorCode"].as_str(), last["eventName"].as_str()), (Some("AccessDenied"), Some("TagResource")), "{last}");
    assert_eq!(last["requestParameters"]["tags"][0]["tagKey"], "Owner");
    assert_eq!(records[4]["eventName"], "TagResource");
    assert!(records[4].get("errorCode").is_none(), "the allowed change has no error: {}", records[4]);
    // Reads are not checked against the map: they state the principal.
    let l = tagging
        .list_resource_tags(proto::ListResourceTagsRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_BETA.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tags_of(&l.tags), pairs(&[("Project", "Alpha"), ("Type", "Special")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_map_local_callers_are_trusted_and_others_refused() {
    let store = Arc::new(Store::new(world(WORLD).build().unwrap(), 100));
    let (addr, _down) = tagging_with_peers(store.clone(), Callers::trusting_local()).await;
    let mut tagging = TaggingClient::new(channel(addr).await);
    let before = key_tags(&store, KEY_BETA);
    let err = tagging
        .tag_resource(as_peer(tag_req(KEY_ADMIN, KEY_BETA, &[("Project", "Alpha")]), "x-test-addr", "10.1.2.3:5555"))
        .await
        .unwrap_err();
    assert_eq!((err.code(), error_name(&err).as_deref()), (Code::PermissionDenied, Some("CallerNotAllowed")), "{err:?}");
    assert!(err.message().contains("plain TCP caller 10.1.2.3:5555 may not act as"), "{err:?}");
    assert_eq!(key_tags(&store, KEY_BETA), before);
    // A certificate from afar is no better without a map.
    let err = tagging
        .tag_resource(as_peer(tag_req(KEY_ADMIN, KEY_BETA, &[("Project", "Alpha")]), "x-test-uri", ADMIN_SPIFFE))
        .await
        .unwrap_err();
    assert_eq!(error_name(&err).as_deref(), Some("CallerNotAllowed"), "{err:?}");
    // Loopback (tonic's own record of the address) and a Unix socket are local.
    tagging.tag_resource(tag_req(KEY_ADMIN, KEY_BETA, &[("Project", "Alpha")])).await.unwrap();
    tagging.tag_resource(as_peer(tag_req(KEY_ADMIN, KEY_BETA, &[("Type", "X")]), "x-test-uid", "4242")).await.unwrap();
    assert_eq!(key_tags(&store, KEY_BETA), pairs(&[("Project", "Alpha"), ("Type", "X")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagging_off_is_unimplemented_and_read_only_serves_reads() {
    let running = start(server::Config { tagging: TaggingMode::Off, ..config() }).await;
    let Clients { mut authz, mut tagging, .. } = clients(&running).await;
    let err = tagging.tag_resource(tag_req(KEY_ADMIN, KEY_BETA, &[("Project", "Alpha")])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err = tagging
        .list_resource_tags(proto::ListResourceTagsRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_BETA.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(allowed(&authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap().into_inner()));
    running.shutdown().await;

    let running = start(server::Config { tagging: TaggingMode::ReadOnly, ..config() }).await;
    let Clients { mut tagging, .. } = clients(&running).await;
    let err = tagging.tag_resource(tag_req(KEY_ADMIN, KEY_BETA, &[("Project", "Alpha")])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(err.message().contains("--tagging read-only"), "{err:?}");
    let l = tagging
        .list_resource_tags(proto::ListResourceTagsRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_BETA.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tags_of(&l.tags), pairs(&[("Project", "Beta"), ("Type", "General")]));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_admin_update_is_one_audit_record_and_no_revision() {
    let scratch = Scratch::new("identity-admin-refusal");
    let audit = scratch.join("audit.jsonl");
    let store = memory_store(&audit, "node-a");
    let before = store.revision();
    let running = tagward::grpc::server::start(config(), store.clone()).await.unwrap();
    let Clients { mut admin, .. } = clients(&running).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut acks = admin.apply(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(proto::ApplyRequest { id: "bad".into(), update: Some(put_policy("Broken", "{\"Statement\": 3}")) }).await.unwrap();
    let ack = acks.message().await.unwrap().unwrap();
    let error = ack.error.expect("refused");
    assert_eq!(ack.revision, before);
    let records = audit_records(&audit, 1).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r["errorCode"].as_str(), Some(error.code.as_str()), "{r}");
    assert_eq!(r["eventName"], "PutPolicy");
    assert_eq!(r["eventSource"], "tagward");
    assert!(r["errorMessage"].as_str().unwrap().contains("put_policy"), "{r}");
    assert_eq!(r["additionalEventData"]["revision"], before);
    assert_eq!(store.revision(), before);
    drop(tx);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ids_differ_between_two_sidecars_for_the_same_revision() {
    let scratch = Scratch::new("identity-event-ids");
    let (pa, pb) = (scratch.join("a.jsonl"), scratch.join("b.jsonl"));
    let (a, b) = (memory_store(&pa, "pod-a"), memory_store(&pb, "pod-b"));
    let update = tagward::store::Update::SetTags { resource: KEY_ALPHA.into(), tags: vec![("Owner".into(), "x".into())] };
    let ra = a.apply(&update, "admin").unwrap().durable().await.unwrap();
    let rb = b.apply(&update, "admin").unwrap().durable().await.unwrap();
    assert_eq!(ra, rb, "the same revision on both");
    let (ea, eb) = (audit_records(&pa, 1).await, audit_records(&pb, 1).await);
    assert_eq!(ea[0]["additionalEventData"]["revision"], eb[0]["additionalEventData"]["revision"]);
    assert_ne!(ea[0]["eventID"], eb[0]["eventID"]);
    assert_eq!(
        (ea[0]["additionalEventData"]["node"].as_str(), eb[0]["additionalEventData"]["node"].as_str()),
        (Some("pod-a"), Some("pod-b"))
    );
}

/// The flags end to end: `--identity-map`, `--node-name`, `--tagging`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_an_identity_map_refuses_an_unmapped_loopback_writer_and_names_its_node() {
    let scratch = Scratch::new("identity-process");
    let map_path = scratch.join("identities.yaml");
    std::fs::write(&map_path, format!("identities:\n  - uid: 4242\n    principals: [\"{KEY_ADMIN}\"]\n")).unwrap();
    let audit = scratch.join("audit.jsonl");
    let (audit_s, map_s) = (audit.display().to_string(), map_path.display().to_string());
    let server = Serve::new()
        .args(["--ephemeral", "--world", "deploy/world/example.json", "--audit-log", &audit_s])
        .args(["--identity-map", &map_s, "--node-name", "pod-7"])
        .start(Duration::from_secs(20))
        .await
        .unwrap();
    let mut tagging = TaggingClient::new(channel(server.data()).await);
    let key = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let err = tagging.tag_resource(tag_req(KEY_ADMIN, key, &[("Project", "Beta")])).await.unwrap_err();
    assert_eq!(error_name(&err).as_deref(), Some("CallerNotAllowed"), "{err:?}");
    let records = audit_records(&audit, 1).await;
    assert_eq!(records[0]["errorCode"], "CallerNotAllowed");
    assert_eq!(records[0]["additionalEventData"]["node"], "pod-7");
    drop(server);

    let server = Serve::new()
        .args(["--ephemeral", "--world", "deploy/world/example.json", "--tagging", "off"])
        .start(Duration::from_secs(20))
        .await
        .unwrap();
    let mut tagging = TaggingClient::new(channel(server.data()).await);
    let err = tagging.tag_resource(tag_req(KEY_ADMIN, key, &[("Project", "Beta")])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}
