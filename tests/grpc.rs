//! The sidecar over gRPC: the real server in-process on loopback, real tonic
//! clients over TCP, checked against the contract in
//! `proto/tagward/v1/tagward.proto`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tagward::grpc::proto::{self, context_value::Kind, update::Op, watch_event::Event as WatchKind};
use tagward::grpc::server::{self, Config, ServeError};
use tagward::store::Store;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const STEP: Duration = Duration::from_secs(5);

fn assert_invalid(status: &tonic::Status, want_field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field(status).as_deref(), Some(want_field), "{status:?}");
    assert!(status.message().starts_with(&format!("{want_field}:")), "the message names the field: {status:?}");
    assert_eq!(error_name(status).as_deref(), Some("ValidationException"), "{status:?}");
    let info = tonic_types::StatusExt::get_details_error_info(status).unwrap();
    assert_eq!(info.domain, "tagward", "{status:?}");
}

async fn current_revision(authz: &mut AuthorizerClient<tonic::transport::Channel>) -> u64 {
    authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap().into_inner().revision
}

// ------------------------------------------------------------------ 1

/// One admin Batch swaps the Project tags of two keys, so any consistent
/// snapshot lets AlphaApp decrypt with exactly one of them. Readers batch
/// both questions in a loop while hundreds of swaps land.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_authorize_never_sees_a_half_applied_batch() {
    const FLIPS: usize = 300;
    const READERS: usize = 3;
    let running = start(config()).await;
    let data_addr = running.data_addr.tcp().unwrap();
    let Clients { mut admin, mut authz, .. } = clients(&running).await;
    let initial = current_revision(&mut authz).await;

    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let done = done.clone();
        readers.push(tokio::spawn(async move {
            let mut authz = AuthorizerClient::new(channel(data_addr).await);
            let deadline = Instant::now() + Duration::from_secs(15);
            let (mut last, mut calls) = (0u64, 0usize);
            // Revision -> "key A allowed" as this reader saw it.
            let mut seen = BTreeMap::new();
            while !done.load(Ordering::Acquire) && Instant::now() < deadline && calls < 20_000 {
                let r = authz
                    .batch_authorize(proto::BatchAuthorizeRequest {
                        principal: ALPHA_APP.into(),
                        items: vec![item("kms:Decrypt", KEY_ALPHA), item("kms:Decrypt", KEY_BETA)],
                        ..Default::default()
                    })
                    .await
                    .expect("BatchAuthorize answers")
                    .into_inner();
                assert_eq!(r.results.len(), 2);
                assert!(r.results.iter().all(|x| x.revision == r.revision), "both items at the batch's revision: {r:?}");
                let (a, b) = (allowed(&r.results[0]), allowed(&r.results[1]));
                assert!(a ^ b, "a mixed snapshot at revision {}: key A allowed={a}, key B allowed={b}", r.revision);
                assert!(r.revision >= last, "revision went backwards: {} after {last}", r.revision);
                last = r.revision;
                calls += 1;
                if let Some(before) = seen.insert(r.revision, a) {
                    assert_eq!(before, a, "revision {} answered both ways", r.revision);
                }
            }
            (calls, seen)
        }));
    }

    // The flipper: one Apply stream, one swap at a time, each acked in turn.
    let (tx, rx) = mpsc::channel(4);
    let mut acks = admin.apply(ReceiverStream::new(rx)).await.unwrap().into_inner();
    // The published revisions and, at each, whether key A is AlphaApp's.
    let mut published = BTreeMap::from([(initial, true)]);
    let mut last = initial;
    for i in 0..FLIPS {
        let (a, b) = if i % 2 == 0 { ("Beta", "Alpha") } else { ("Alpha", "Beta") };
        let flip = batch(vec![set_tags(KEY_ALPHA, &[("Project", a)]), set_tags(KEY_BETA, &[("Project", b)])]);
        tx.send(apply_request(&format!("flip{i}"), flip)).await.unwrap();
        let ack = timeout(STEP, acks.message()).await.expect("ack in time").unwrap().expect("an ack");
        assert_eq!(ack.id, format!("flip{i}"));
        assert!(ack.error.is_none(), "{ack:?}");
        assert!(ack.revision > last, "revision grows: {} after {last}", ack.revision);
        last = ack.revision;
        published.insert(ack.revision, i % 2 == 1);
        if i % 8 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    done.store(true, Ordering::Release);
    drop(tx);
    assert!(timeout(STEP, acks.message()).await.unwrap().unwrap().is_none(), "the stream ends after the last ack");

    let (mut alpha_total, mut beta_total, mut distinct) = (0, 0, 0);
    for r in readers {
        let (calls, seen) = r.await.unwrap();
        assert!(calls > 0);
        for (rev, a) in &seen {
            // A Batch is one snapshot: the revisions inside it are never seen.
            let want = published.get(rev).unwrap_or_else(|| panic!("revision {rev} was never published by an ack"));
            assert_eq!(a, want, "revision {rev}: key A allowed={a}");
            if *a {
                alpha_total += 1;
            } else {
                beta_total += 1;
            }
        }
        distinct = distinct.max(seen.len());
    }
    eprintln!("{FLIPS} swaps; readers saw {alpha_total} A-side and {beta_total} B-side revisions, up to {distinct} each");
    assert!(alpha_total > 0 && beta_total > 0, "readers saw both sides of the swap ({alpha_total}/{beta_total})");
    assert!(distinct > 1, "readers ran while updates landed");
}

// ------------------------------------------------------------------ 2

#[tokio::test(flavor = "multi_thread")]
async fn min_revision_waits_for_the_update() {
    let running = start(config()).await; // min_revision_wait: 2 s
    let Clients { mut authz, mut admin, .. } = clients(&running).await;
    let now = current_revision(&mut authz).await;
    let wanted = now + 1;

    // BetaApp may not use the Alpha key yet; the update that allows it lands
    // while the request waits.
    let mut waiting = authz.clone();
    let started = Instant::now();
    let waiter = tokio::spawn(async move {
        let mut req = authorize_req(BETA_APP, "kms:Decrypt", KEY_ALPHA);
        req.min_revision = wanted;
        let r = waiting.authorize(req).await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the request waits for revision {wanted}");
    let landed = apply_ok(&mut admin, set_tags(KEY_ALPHA, &[("Project", "Beta")])).await;
    assert!(landed >= wanted);
    let (answer, took) = timeout(STEP, waiter).await.unwrap().unwrap();
    let answer = answer.expect("answered once the revision landed").into_inner();
    assert!(answer.revision >= wanted, "{answer:?}");
    assert!(allowed(&answer), "the new decision: {answer:?}");
    assert!(took >= Duration::from_millis(290), "it waited: {took:?}");

    // A revision already reached answers at once.
    let mut req = authorize_req(BETA_APP, "kms:Decrypt", KEY_ALPHA);
    req.min_revision = now;
    assert!(authz.authorize(req).await.unwrap().into_inner().revision >= landed);
}

#[tokio::test(flavor = "multi_thread")]
async fn min_revision_not_reached_is_deadline_exceeded() {
    let mut cfg = config();
    cfg.min_revision_wait = Duration::from_millis(200);
    let running = start(cfg).await;
    let Clients { mut authz, mut tagging, .. } = clients(&running).await;
    let now = current_revision(&mut authz).await;

    let mut req = authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA);
    req.min_revision = now + 1;
    let started = Instant::now();
    let err = authz.authorize(req).await.expect_err("no update: the revision never comes");
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(2), "bounded by min_revision_wait: {took:?}");

    let err = authz
        .batch_authorize(proto::BatchAuthorizeRequest {
            principal: ALPHA_APP.into(),
            items: vec![item("kms:Decrypt", KEY_ALPHA)],
            min_revision: now + 10,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    let err = tagging
        .list_resource_tags(proto::ListResourceTagsRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_ALPHA.into(),
            min_revision: now + 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    // The server still answers at the current revision.
    assert_eq!(current_revision(&mut authz).await, now);
}

// ------------------------------------------------------------------ 3

#[tokio::test(flavor = "multi_thread")]
async fn batch_authorize_answers_in_item_order_and_checks_items() {
    let mut cfg = config();
    cfg.max_batch = 8;
    let running = start(cfg).await;
    let mut authz = clients(&running).await.authz;

    use proto::Reason::{Allowed, ExplicitDeny, ImplicitDeny};
    let cases = [
        ("kms:Decrypt", KEY_ALPHA, Allowed),
        ("kms:Decrypt", KEY_BETA, ImplicitDeny),
        ("kms:Encrypt", KEY_ALPHA, Allowed),
        ("kms:Decrypt", KEY_RESERVED, ExplicitDeny),
        ("kms:Encrypt", KEY_BETA, ImplicitDeny),
        ("kms:GenerateDataKey", KEY_ALPHA, Allowed),
        ("kms:ScheduleKeyDeletion", KEY_ALPHA, ImplicitDeny),
        ("kms:GenerateDataKeyWithoutPlaintext", KEY_ALPHA, Allowed),
    ];
    let batch_of =
        |items: Vec<proto::BatchItem>| proto::BatchAuthorizeRequest { principal: ALPHA_APP.into(), items, ..Default::default() };
    let r = authz.batch_authorize(batch_of(cases.iter().map(|(a, res, _)| item(a, res)).collect())).await.unwrap().into_inner();
    assert_eq!(r.results.len(), cases.len());
    for (i, ((action, resource, reason), got)) in cases.iter().zip(&r.results).enumerate() {
        assert_eq!(got.reason, *reason as i32, "item {i}: {action} on {resource}: {got:?}");
        let want = if *reason == Allowed { proto::Decision::Allow } else { proto::Decision::Deny };
        assert_eq!(got.decision, want as i32, "item {i}: {action} on {resource}");
        assert_eq!(got.revision, r.revision);
        // The same question alone gets the same answer.
        let single = authz.authorize(authorize_req(ALPHA_APP, action, resource)).await.unwrap().into_inner();
        assert_eq!((single.decision, single.reason), (got.decision, got.reason), "item {i}");
    }
    let reserved = &r.results[3];
    assert_eq!(reserved.matched.iter().map(|s| s.sid.as_str()).collect::<Vec<_>>(), vec!["DenyReserved"]);

    let err = authz.batch_authorize(batch_of(vec![])).await.unwrap_err();
    assert_invalid(&err, "items");
    let err = authz.batch_authorize(batch_of(vec![item("kms:Decrypt", KEY_ALPHA); 9])).await.unwrap_err();
    assert_invalid(&err, "items");
    // Exactly the limit is fine.
    let r = authz.batch_authorize(batch_of(vec![item("kms:Decrypt", KEY_ALPHA); 8])).await.unwrap().into_inner();
    assert_eq!(r.results.len(), 8);

    let mut items: Vec<proto::BatchItem> = (0..5).map(|_| item("kms:Decrypt", KEY_ALPHA)).collect();
    items[3].resource = "arn:aws:kms:no-account".into();
    let err = authz.batch_authorize(batch_of(items.clone())).await.unwrap_err();
    assert_invalid(&err, "items[3].resource");
    items[3].resource = KEY_ALPHA.into();
    items[1].action = "Decrypt".into();
    let err = authz.batch_authorize(batch_of(items.clone())).await.unwrap_err();
    assert_invalid(&err, "items[1].action");
    items[1].action = "kms:Decrypt".into();
    items[4].request_tags = vec![tag("a", "1"), tag("a", "2")];
    let err = authz.batch_authorize(batch_of(items)).await.unwrap_err();
    assert_invalid(&err, "items[4].request_tags[1].key");
}

// ------------------------------------------------------------------ 4

#[tokio::test(flavor = "multi_thread")]
async fn admin_token_guards_the_admin_plane_only() {
    const TOKEN: &str = "correct-horse-battery-staple";
    let mut cfg = config();
    cfg.admin_token = Some(TOKEN.into());
    let running = start(cfg).await;
    let Clients { mut authz, mut admin, mut tagging, .. } = clients(&running).await;

    // No token, a wrong one, a wrong scheme: UNAUTHENTICATED on every admin call.
    let err = admin.export(proto::ExportRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = admin.export(with_token(proto::ExportRequest {}, "wrong-token")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = admin.export(with_token(proto::ExportRequest {}, &format!("{TOKEN}x"))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut basic = tonic::Request::new(proto::ExportRequest {});
    basic.metadata_mut().insert("authorization", format!("Basic {TOKEN}").parse().unwrap());
    assert_eq!(admin.export(basic).await.unwrap_err().code(), Code::Unauthenticated);
    let err = admin.watch(proto::WatchRequest { from_revision: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let before = current_revision(&mut authz).await;
    let update = tokio_stream::iter(vec![apply_request("x", set_tags(KEY_ALPHA, &[("Stolen", "yes")]))]);
    match admin.apply(update).await {
        Err(err) => assert_eq!(err.code(), Code::Unauthenticated, "{err:?}"),
        Ok(resp) => {
            let first = resp.into_inner().message().await;
            assert!(matches!(&first, Err(e) if e.code() == Code::Unauthenticated), "{first:?}");
        }
    }
    assert_eq!(current_revision(&mut authz).await, before, "the refused update changed nothing");

    // With the token: every admin call works.
    let items: Vec<proto::ExportItem> = {
        let mut s = admin.export(with_token(proto::ExportRequest {}, TOKEN)).await.unwrap().into_inner();
        let mut v = Vec::new();
        while let Some(i) = s.message().await.unwrap() {
            v.push(i);
        }
        v
    };
    assert!(!items.is_empty());
    let update = tokio_stream::iter(vec![apply_request("ok", set_tags(KEY_ALPHA, &[("Checked", "yes")]))]);
    let mut acks = admin.apply(with_token(update, TOKEN)).await.unwrap().into_inner();
    let ack = acks.message().await.unwrap().unwrap();
    assert!(ack.error.is_none() && ack.revision > before, "{ack:?}");
    admin.watch(with_token(proto::WatchRequest { from_revision: before }, TOKEN)).await.unwrap();

    // The data plane needs no token.
    assert!(allowed(&authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap().into_inner()));
    tagging
        .list_resource_tags(proto::ListResourceTagsRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_ALPHA.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_beyond_loopback_needs_a_token() {
    let store = || Arc::new(Store::new(Default::default(), 16));
    let mut cfg = config();
    cfg.admin_listen = "0.0.0.0:0".parse().unwrap();
    match server::start(cfg.clone(), store()).await {
        Err(ServeError::AdminWithoutToken(addr)) => assert_eq!(addr, cfg.admin_listen),
        Err(e) => panic!("expected AdminWithoutToken, got {e}"),
        Ok(_) => panic!("an admin listener on 0.0.0.0 without a token must not start"),
    }
    cfg.admin_token = Some("   ".into());
    assert!(matches!(server::start(cfg, store()).await, Err(ServeError::EmptyToken)), "a blank token is refused");
}

// ------------------------------------------------------------------ 5

async fn next_ack(acks: &mut tonic::Streaming<proto::ApplyResponse>) -> proto::ApplyResponse {
    timeout(STEP, acks.message()).await.expect("ack in time").expect("the stream is healthy").expect("an ack")
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_apply_acks_each_update_in_order() {
    let running = start(config()).await;
    let Clients { mut authz, mut admin, mut tagging, .. } = clients(&running).await;
    let start_rev = current_revision(&mut authz).await;

    let (tx, rx) = mpsc::channel(16);
    let mut acks = admin.apply(ReceiverStream::new(rx)).await.unwrap().into_inner();

    // Several updates at once: one ack each, in order, growing revisions.
    let good = [
        set_tags(KEY_ALPHA, &[("Step", "1")]),
        put_policy(
            "Extra",
            r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}}"#,
        ),
        set_tags(KEY_BETA, &[("Step", "3")]),
        update(Op::DeletePolicy(proto::DeletePolicy { name: "Extra".into() })),
    ];
    for (i, u) in good.into_iter().enumerate() {
        tx.send(apply_request(&format!("good{i}"), u)).await.unwrap();
    }
    let mut last = start_rev;
    for i in 0..4 {
        let ack = next_ack(&mut acks).await;
        assert_eq!(ack.id, format!("good{i}"));
        assert!(ack.error.is_none(), "{ack:?}");
        assert!(ack.revision > last, "ack {i}: revision {} after {last}", ack.revision);
        last = ack.revision;
    }

    // A malformed policy: an UpdateError, the revision unchanged.
    let refused = [
        (
            "permit",
            put_policy("Bad", r#"{"Version": "2012-10-17", "Statement": {"Effect": "Permit", "Action": "*", "Resource": "*"}}"#),
            "MalformedPolicyDocumentException",
        ),
        ("notjson", put_policy("Bad", r#"{"Statement": ["#), "MalformedPolicyDocumentException"),
        (
            "noaction",
            put_policy("Bad", r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Resource": "*"}}"#),
            "MalformedPolicyDocumentException",
        ),
        ("nokey", set_tags("arn:aws:kms:us-east-1:111122223333:key/nope", &[("a", "b")]), "NotFoundException"),
        ("reserved", set_tags(KEY_ALPHA, &[("aws:x", "b")]), "TagException"),
        ("nopolicy", update(Op::DeletePolicy(proto::DeletePolicy { name: "Nope".into() })), "NoSuchEntityException"),
        (
            "badworld",
            update(Op::ReplaceWorld(proto::ReplaceWorld { world_json: r#"{"policies": {}, "bogus": 1}"#.into() })),
            "ValidationException",
        ),
    ];
    for (id, u, code) in refused {
        tx.send(apply_request(id, u)).await.unwrap();
        let ack = next_ack(&mut acks).await;
        assert_eq!(ack.id, id);
        let e = ack.error.as_ref().unwrap_or_else(|| panic!("{id}: expected {code}, got {ack:?}"));
        assert_eq!(e.code, code, "{id}: {e:?}");
        assert!(!e.message.is_empty());
        assert_eq!(ack.revision, last, "{id}: a refused update keeps the revision");
    }
    tx.send(proto::ApplyRequest { id: "empty".into(), update: None }).await.unwrap();
    let ack = next_ack(&mut acks).await;
    assert_eq!(ack.error.as_ref().map(|e| e.code.as_str()), Some("ValidationException"), "{ack:?}");
    assert_eq!(ack.revision, last);

    // A Batch with one bad update changes nothing.
    let bad_batch = batch(vec![
        set_tags(KEY_ALPHA, &[("Project", "Beta")]),
        put_policy("Fine", r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}}"#),
        set_tags("arn:aws:kms:us-east-1:111122223333:key/nope", &[("a", "b")]),
    ]);
    tx.send(apply_request("badbatch", bad_batch)).await.unwrap();
    let ack = next_ack(&mut acks).await;
    let e = ack.error.as_ref().expect("the batch is refused");
    assert_eq!(e.code, "NotFoundException", "{e:?}");
    assert!(e.message.contains("updates[2]"), "the message names the bad update: {e:?}");
    assert_eq!(ack.revision, last);
    assert_eq!(current_revision(&mut authz).await, last);
    let tags = tagging
        .list_resource_tags(proto::ListResourceTagsRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_ALPHA.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tags_of(&tags.tags), pairs(&[("Project", "Alpha"), ("Step", "1"), ("Type", "General")]));
    assert!(allowed(&authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap().into_inner()));

    // The stream still works after the errors.
    tx.send(apply_request("after", set_tags(KEY_ALPHA, &[("Step", "after")]))).await.unwrap();
    let ack = next_ack(&mut acks).await;
    assert_eq!(ack.id, "after");
    assert!(ack.error.is_none() && ack.revision > last, "{ack:?}");
    // A no-op keeps the revision and is no error.
    let noop_rev = ack.revision;
    tx.send(apply_request("noop", set_tags(KEY_ALPHA, &[("Step", "after")]))).await.unwrap();
    let ack = next_ack(&mut acks).await;
    assert!(ack.error.is_none() && ack.revision == noop_rev, "{ack:?}");
    drop(tx);
    assert!(timeout(STEP, acks.message()).await.unwrap().unwrap().is_none());
}

// ------------------------------------------------------------------ 6

#[tokio::test(flavor = "multi_thread")]
async fn tagging_is_authorized_checked_and_visible_at_once() {
    let running = start(config()).await;
    let Clients { mut authz, mut tagging, .. } = clients(&running).await;
    let tag_req = |principal: &str, resource: &str, t: &[(&str, &str)]| proto::TagResourceRequest {
        principal: principal.into(),
        resource: resource.into(),
        tags: t.iter().map(|(k, v)| tag(k, v)).collect(),
        ..Default::default()
    };
    let before = authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_BETA)).await.unwrap().into_inner();
    assert!(!allowed(&before));

    // Allowed: KeyAdmin may write Project and Type; the next request sees it.
    let r = tagging.tag_resource(tag_req(KEY_ADMIN, KEY_BETA, &[("Project", "Alpha")])).await.unwrap().into_inner();
    assert!(r.changed && r.revision > before.revision, "{r:?}");
    assert_eq!(tags_of(&r.tags), pairs(&[("Project", "Alpha"), ("Type", "General")]));
    let after = authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_BETA)).await.unwrap().into_inner();
    assert!(allowed(&after) && after.revision >= r.revision, "the change is visible to the next Authorize: {after:?}");
    let again = tagging.tag_resource(tag_req(KEY_ADMIN, KEY_BETA, &[("Project", "Alpha")])).await.unwrap().into_inner();
    assert!(!again.changed && again.revision == r.revision, "a no-op keeps the revision: {again:?}");

    // Denied: a key the policy does not allow, and a principal without rights.
    for (principal, t) in [(KEY_ADMIN, ("Owner", "me")), (ALPHA_APP, ("Project", "Alpha"))] {
        let err = tagging.tag_resource(tag_req(principal, KEY_ALPHA, &[t])).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{principal}: {err:?}");
        assert_eq!(error_name(&err).as_deref(), Some("AccessDeniedException"), "{err:?}");
    }
    // Tag rules: TagException is INVALID_ARGUMENT.
    let err = tagging.tag_resource(tag_req(KEY_ADMIN, KEY_ALPHA, &[("Project", "aws:reserved")])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(error_name(&err).as_deref(), Some("TagException"), "{err:?}");
    let err = tagging.tag_resource(tag_req(KEY_ADMIN, KEY_ALPHA, &[("Project", "semi;colon")])).await.unwrap_err();
    assert_eq!(error_name(&err).as_deref(), Some("TagException"), "{err:?}");
    // No such resource.
    let err = tagging
        .tag_resource(tag_req(KEY_ADMIN, "arn:aws:kms:us-east-1:111122223333:key/missing", &[("Project", "Alpha")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(error_name(&err).as_deref(), Some("NotFoundException"), "{err:?}");
    assert_eq!(current_revision(&mut authz).await, r.revision, "refused tag operations change nothing");

    // Untag, then list.
    let u = tagging
        .untag_resource(proto::UntagResourceRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_BETA.into(),
            tag_keys: vec!["Project".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.changed && u.revision > r.revision);
    assert_eq!(tags_of(&u.tags), pairs(&[("Type", "General")]));
    assert!(!allowed(&authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_BETA)).await.unwrap().into_inner()));
    let l = tagging
        .list_resource_tags(proto::ListResourceTagsRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_BETA.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((tags_of(&l.tags), l.revision), (pairs(&[("Type", "General")]), u.revision));
    let err = tagging
        .list_resource_tags(proto::ListResourceTagsRequest {
            principal: ALPHA_APP.into(),
            resource: KEY_BETA.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread")]
async fn get_resources_filters_and_paginates() {
    let running = start(config()).await;
    let mut tagging = clients(&running).await.tagging;
    let filter =
        |key: &str, values: &[&str]| proto::TagFilter { key: key.into(), values: values.iter().map(|v| v.to_string()).collect() };
    let req = |filters: Vec<proto::TagFilter>, page_size: u32, page_token: String| proto::GetResourcesRequest {
        principal: KEY_ADMIN.into(),
        tag_filters: filters,
        page_size,
        page_token,
        ..Default::default()
    };

    // Three keys carry Type: one per page, the tokens chaining, sorted by ARN.
    let mut token = String::new();
    let mut seen = Vec::new();
    for page in 0..3 {
        let r = tagging.get_resources(req(vec![filter("Type", &[])], 1, token.clone())).await.unwrap().into_inner();
        assert_eq!(r.resources.len(), 1, "page {page}: {r:?}");
        seen.push(r.resources[0].resource.clone());
        if page < 2 {
            assert!(!r.next_page_token.is_empty(), "page {page} has a next page");
        } else {
            assert!(r.next_page_token.is_empty(), "the last page has no token: {r:?}");
        }
        token = r.next_page_token;
    }
    assert_eq!(seen, vec![KEY_ALPHA, KEY_BETA, KEY_RESERVED]);

    // A page that holds everything has no token either; tags come along.
    let r = tagging.get_resources(req(vec![filter("Type", &[])], 3, String::new())).await.unwrap().into_inner();
    assert_eq!(r.resources.len(), 3);
    assert!(r.next_page_token.is_empty());
    assert_eq!(tags_of(&r.resources[2].tags), pairs(&[("Project", "Alpha"), ("Type", "Reserved")]));

    // Values are alternatives; filters all hold.
    let arns = |r: proto::GetResourcesResponse| r.resources.into_iter().map(|x| x.resource).collect::<Vec<_>>();
    let r = tagging.get_resources(req(vec![filter("Project", &["Alpha"])], 0, String::new())).await.unwrap().into_inner();
    assert_eq!(arns(r), vec![KEY_ALPHA, KEY_RESERVED]);
    let r = tagging.get_resources(req(vec![filter("Project", &["Alpha", "Beta"])], 0, String::new())).await.unwrap().into_inner();
    assert_eq!(arns(r), vec![KEY_ALPHA, KEY_BETA, KEY_RESERVED]);
    let r = tagging
        .get_resources(req(vec![filter("Project", &["Alpha"]), filter("Type", &["Reserved"])], 0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(arns(r), vec![KEY_RESERVED]);
    let r = tagging.get_resources(req(vec![filter("Owner", &[])], 0, String::new())).await.unwrap().into_inner();
    assert_eq!(arns(r), vec![KEY_DISABLED, BUCKET], "any resource kind, sorted by ARN");
    let r = tagging.get_resources(req(vec![filter("project", &[])], 0, String::new())).await.unwrap().into_inner();
    assert!(!arns(r).iter().any(|a| a.starts_with("arn:aws:kms")), "keys are case-sensitive");
    let r = tagging.get_resources(req(vec![filter("Nothing", &[])], 1, String::new())).await.unwrap().into_inner();
    assert!(r.resources.is_empty() && r.next_page_token.is_empty());

    // Bad requests name the field; a principal without tag:GetResources is denied.
    assert_invalid(&tagging.get_resources(req(vec![], 0, String::new())).await.unwrap_err(), "tag_filters");
    assert_invalid(&tagging.get_resources(req(vec![filter("", &[])], 0, String::new())).await.unwrap_err(), "tag_filters[0].key");
    assert_invalid(&tagging.get_resources(req(vec![filter("Type", &[])], 5000, String::new())).await.unwrap_err(), "page_size");
    assert_invalid(&tagging.get_resources(req(vec![filter("Type", &[])], 1, "%%%".into())).await.unwrap_err(), "page_token");
    let mut denied = req(vec![filter("Type", &[])], 0, String::new());
    denied.principal = ALPHA_APP.into();
    let err = tagging.get_resources(denied).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(error_name(&err).as_deref(), Some("AccessDeniedException"));
}

/// "Resources whose tags match every filter ... sorted by ARN": a value
/// repeated in one filter must not list a resource twice.
#[tokio::test(flavor = "multi_thread")]
async fn get_resources_with_a_repeated_filter_value_lists_each_resource_once() {
    let running = start(config()).await;
    let mut tagging = clients(&running).await.tagging;
    let r = tagging
        .get_resources(proto::GetResourcesRequest {
            principal: KEY_ADMIN.into(),
            tag_filters: vec![proto::TagFilter { key: "Project".into(), values: vec!["Alpha".into(), "Alpha".into()] }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let arns: Vec<String> = r.resources.into_iter().map(|x| x.resource).collect();
    assert_eq!(arns, vec![KEY_ALPHA, KEY_RESERVED]);
}

/// TagResourceResponse/UntagResourceResponse.changed: a tag operation that
/// leaves the tags as they were did not change anything, whatever other
/// writers do meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_no_op_tag_call_reports_unchanged_during_concurrent_updates() {
    let running = start(config()).await;
    let data_addr = running.data_addr.tcp().unwrap();
    let Clients { mut admin, mut tagging, .. } = clients(&running).await;
    // From here on, tagging Project=Alpha and untagging Type change nothing.
    let u = tagging
        .untag_resource(proto::UntagResourceRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_ALPHA.into(),
            tag_keys: vec!["Type".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.changed);
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut tagging = TaggingClient::new(channel(data_addr).await);
            let mut wrong = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done.load(Ordering::Acquire) && Instant::now() < deadline {
                let t = tagging
                    .tag_resource(proto::TagResourceRequest {
                        principal: KEY_ADMIN.into(),
                        resource: KEY_ALPHA.into(),
                        tags: vec![tag("Project", "Alpha")],
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let u = tagging
                    .untag_resource(proto::UntagResourceRequest {
                        principal: KEY_ADMIN.into(),
                        resource: KEY_ALPHA.into(),
                        tag_keys: vec!["Type".into()],
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if t.changed {
                    wrong.push(format!("TagResource no-op at revision {} said changed", t.revision));
                }
                if u.changed {
                    wrong.push(format!("UntagResource no-op at revision {} said changed", u.revision));
                }
            }
            wrong
        }));
    }
    let updates: Vec<proto::Update> = (0..400).map(|i| set_tags(KEY_BETA, &[("n", &i.to_string())])).collect();
    apply_all(&mut admin, updates).await;
    done.store(true, Ordering::Release);
    let mut wrong = Vec::new();
    for t in tasks {
        wrong.extend(t.await.unwrap());
    }
    assert!(wrong.is_empty(), "{} no-op tag calls said changed, e.g. {:?}", wrong.len(), &wrong[..wrong.len().min(3)]);
}

// ------------------------------------------------------------------ 7

async fn next_event(stream: &mut tonic::Streaming<proto::WatchEvent>) -> proto::WatchEvent {
    timeout(STEP, stream.message()).await.expect("an event in time").expect("the watch stream is healthy").expect("an event")
}

fn tag_change(e: &proto::WatchEvent) -> &proto::TagChange {
    match &e.event {
        Some(WatchKind::TagChange(t)) => t,
        other => panic!("expected a tag change, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_sends_the_backlog_then_live_changes() {
    let running = start(config()).await;
    let Clients { mut authz, mut tagging, mut admin, .. } = clients(&running).await;
    let r0 = current_revision(&mut authz).await;

    let t = tagging
        .tag_resource(proto::TagResourceRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_ALPHA.into(),
            tags: vec![tag("Type", "Special")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r2 = apply_ok(&mut admin, set_tags(KEY_BETA, &[("Owner", "ops")])).await;
    let r3 = apply_ok(
        &mut admin,
        put_policy(
            "Extra",
            r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}}"#,
        ),
    )
    .await;
    assert_eq!((t.revision, r2, r3), (r0 + 1, r0 + 2, r0 + 3));

    let mut from_start = admin.watch(proto::WatchRequest { from_revision: r0 }).await.unwrap().into_inner();
    let mut only_new = admin.watch(proto::WatchRequest { from_revision: 0 }).await.unwrap().into_inner();
    let mut from_mid = admin.watch(proto::WatchRequest { from_revision: r0 + 2 }).await.unwrap().into_inner();

    let e = next_event(&mut from_start).await;
    assert_eq!((e.revision, e.actor.as_str()), (r0 + 1, KEY_ADMIN));
    assert!(e.time_unix_ms > 1_600_000_000_000, "{e:?}");
    let c = tag_change(&e);
    assert_eq!((c.resource.as_str(), c.action.as_str()), (KEY_ALPHA, "kms:TagResource"));
    assert_eq!(tags_of(&c.before), pairs(&[("Project", "Alpha"), ("Type", "General")]));
    assert_eq!(tags_of(&c.after), pairs(&[("Project", "Alpha"), ("Type", "Special")]));
    let e = next_event(&mut from_start).await;
    assert_eq!((e.revision, e.actor.as_str()), (r0 + 2, "admin"));
    let c = tag_change(&e);
    assert_eq!((c.resource.as_str(), c.action.as_str()), (KEY_BETA, "admin"));
    assert_eq!(tags_of(&c.after), pairs(&[("Owner", "ops"), ("Project", "Beta"), ("Type", "General")]));
    let e = next_event(&mut from_start).await;
    assert_eq!(e.revision, r0 + 3);
    assert_eq!(
        e.event,
        Some(WatchKind::EntityChange(proto::EntityChange { kind: "policy".into(), name: "Extra".into(), change: "put".into() }))
    );
    assert_eq!(next_event(&mut from_mid).await.revision, r0 + 3, "only events after the revision asked for");

    // Live: an untag by KeyAdmin reaches every watcher with before/after.
    let u = tagging
        .untag_resource(proto::UntagResourceRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_ALPHA.into(),
            tag_keys: vec!["Type".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for stream in [&mut from_start, &mut only_new, &mut from_mid] {
        let e = next_event(stream).await;
        assert_eq!((e.revision, e.actor.as_str()), (u.revision, KEY_ADMIN));
        let c = tag_change(&e);
        assert_eq!((c.resource.as_str(), c.action.as_str()), (KEY_ALPHA, "kms:UntagResource"));
        assert_eq!(tags_of(&c.before), pairs(&[("Project", "Alpha"), ("Type", "Special")]));
        assert_eq!(tags_of(&c.after), pairs(&[("Project", "Alpha")]));
    }
    // A refused or no-op change sends nothing.
    apply_all(&mut admin, vec![set_tags(KEY_ALPHA, &[("Project", "Alpha")]), set_tags(KEY_ALPHA, &[("aws:x", "y")])]).await;
    let r = apply_ok(&mut admin, set_tags(KEY_RESERVED, &[("Marker", "last")])).await;
    let e = next_event(&mut only_new).await;
    assert_eq!((e.revision, tag_change(&e).resource.as_str()), (r, KEY_RESERVED));
}

/// "Fails with OUT_OF_RANGE when the server no longer keeps them."
#[tokio::test(flavor = "multi_thread")]
async fn watch_from_a_revision_no_longer_kept_is_out_of_range() {
    let state = world(WORLD).build().unwrap();
    let running = server::start(config(), Arc::new(Store::new(state, 3))).await.unwrap();
    let Clients { mut authz, mut admin, .. } = clients(&running).await;
    let r0 = current_revision(&mut authz).await;
    for i in 0..5 {
        apply_ok(&mut admin, set_tags(KEY_ALPHA, &[("n", &i.to_string())])).await;
    }
    let err = admin.watch(proto::WatchRequest { from_revision: r0 }).await.map(|_| ()).unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // The last three are kept: from r0 + 2 works and starts at r0 + 3.
    let mut s = admin.watch(proto::WatchRequest { from_revision: r0 + 2 }).await.unwrap().into_inner();
    let revs = [next_event(&mut s).await.revision, next_event(&mut s).await.revision, next_event(&mut s).await.revision];
    assert_eq!(revs, [r0 + 3, r0 + 4, r0 + 5]);
}

/// WatchRequest.from_revision: "Send the events after this revision first".
/// Asked from a revision the server has not reached (a watcher resuming
/// against a restarted sidecar, say), it must not send events at or below
/// that revision as if they came after it: either refuse (OUT_OF_RANGE) or
/// start after it.
#[tokio::test(flavor = "multi_thread")]
async fn watch_from_a_revision_not_reached_sends_nothing_at_or_below_it() {
    let running = start(config()).await;
    let Clients { mut authz, mut admin, .. } = clients(&running).await;
    let r0 = current_revision(&mut authz).await;
    let mut s = match admin.watch(proto::WatchRequest { from_revision: r0 + 3 }).await {
        Err(e) => {
            assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
            return;
        }
        Ok(s) => s.into_inner(),
    };
    for i in 0..4 {
        apply_ok(&mut admin, set_tags(KEY_ALPHA, &[("n", &i.to_string())])).await;
    }
    let e = next_event(&mut s).await;
    assert_eq!(e.revision, r0 + 4, "the first event after revision {}", r0 + 3);
}

async fn export_all(admin: &mut AdminClient<tonic::transport::Channel>) -> Vec<proto::ExportItem> {
    let mut s = admin.export(proto::ExportRequest {}).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(i) = timeout(STEP, s.message()).await.unwrap().unwrap() {
        out.push(i);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn export_applied_to_a_fresh_server_exports_the_same() {
    let running = start(config()).await;
    let Clients { mut admin, mut tagging, mut authz, .. } = clients(&running).await;
    // Some history first, so the export is not just the world file.
    tagging
        .tag_resource(proto::TagResourceRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_BETA.into(),
            tags: vec![tag("Project", "Alpha")],
            ..Default::default()
        })
        .await
        .unwrap();
    apply_ok(
        &mut admin,
        put_policy(
            "Extra",
            r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}}"#,
        ),
    )
    .await;
    let rev = current_revision(&mut authz).await;

    let items = export_all(&mut admin).await;
    assert!(items.iter().all(|i| i.revision == rev), "every item carries the exported revision {rev}");
    let kinds: Vec<u8> = items
        .iter()
        .map(|i| match i.update.as_ref().and_then(|u| u.op.as_ref()) {
            Some(Op::PutPolicy(_)) => 0,
            Some(Op::PutPrincipal(_)) => 1,
            Some(Op::PutResource(_)) => 2,
            other => panic!("unexpected export item {other:?}"),
        })
        .collect();
    assert!(kinds.windows(2).all(|w| w[0] <= w[1]), "policies, then principals, then resources: {kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == 0).count(), 3);
    assert_eq!(kinds.iter().filter(|k| **k == 1).count(), 4);
    assert_eq!(kinds.iter().filter(|k| **k == 2).count(), 5);

    let fresh = start_with("{}", config()).await;
    let Clients { admin: mut fresh_admin, authz: mut fresh_authz, .. } = clients(&fresh).await;
    let acks = apply_all(&mut fresh_admin, items.iter().map(|i| i.update.clone().unwrap()).collect()).await;
    assert!(acks.iter().all(|a| a.error.is_none()), "{acks:?}");
    let again = export_all(&mut fresh_admin).await;
    let updates = |v: &[proto::ExportItem]| v.iter().map(|i| i.update.clone()).collect::<Vec<_>>();
    assert_eq!(updates(&again), updates(&items), "the same world");

    // And it decides the same.
    for (p, a, r) in [
        (ALPHA_APP, "kms:Decrypt", KEY_BETA),
        (ALPHA_APP, "kms:Decrypt", KEY_RESERVED),
        (BETA_APP, "kms:Decrypt", KEY_BETA),
        (ALPHA_APP, "s3:GetObject", BUCKET),
        (OPS_USER, "s3:GetObject", BUCKET),
        (OPS_USER, "kms:Decrypt", KEY_DISABLED),
    ] {
        let x = authz.authorize(authorize_req(p, a, r)).await.unwrap().into_inner();
        let y = fresh_authz.authorize(authorize_req(p, a, r)).await.unwrap().into_inner();
        assert_eq!((x.decision, x.reason, x.matched), (y.decision, y.reason, y.matched), "{p} {a} {r}");
    }
}

// ------------------------------------------------------------------ 8

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let mut cfg = config();
    cfg.max_message_bytes = 64 * 1024;
    let running = start(cfg).await;
    let Clients { mut authz, mut tagging, mut admin, .. } = clients(&running).await;

    let ctx = |k: &str, kind: Option<Kind>| HashMap::from([(k.to_string(), proto::ContextValue { kind })]);
    let cases: Vec<(proto::AuthorizeRequest, &str)> = vec![
        (authorize_req("", "kms:Decrypt", KEY_ALPHA), "principal"),
        (authorize_req("not-an-arn", "kms:Decrypt", KEY_ALPHA), "principal"),
        (authorize_req("arn:aws:iam::111122223333", "kms:Decrypt", KEY_ALPHA), "principal"),
        (authorize_req(ALPHA_APP, "", KEY_ALPHA), "action"),
        (authorize_req(ALPHA_APP, "kms:*", KEY_ALPHA), "action"),
        (authorize_req(ALPHA_APP, "Decrypt", KEY_ALPHA), "action"),
        (authorize_req(ALPHA_APP, "kms:Decrypt", ""), "resource"),
        (authorize_req(ALPHA_APP, "kms:Decrypt", "arn:aws:kms"), "resource"),
        (authorize_req(ALPHA_APP, "kms:Decrypt", "key/alpha-0001"), "resource"),
        (
            proto::AuthorizeRequest {
                request_tags: vec![tag("Env", "a"), tag("Env", "b")],
                ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)
            },
            "request_tags[1].key",
        ),
        (
            proto::AuthorizeRequest {
                session_tags: vec![tag("t", "a"), tag("t", "b")],
                ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)
            },
            "session_tags[1].key",
        ),
        (
            proto::AuthorizeRequest {
                context: ctx("aws:PrincipalTag/x", Some(Kind::StringValue("Alpha".into()))),
                ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)
            },
            r#"context["aws:PrincipalTag/x"]"#,
        ),
        (
            proto::AuthorizeRequest {
                context: ctx("aws:ResourceTag/Project", Some(Kind::StringValue("Alpha".into()))),
                ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_BETA)
            },
            r#"context["aws:ResourceTag/Project"]"#,
        ),
        (
            proto::AuthorizeRequest { context: ctx("aws:SourceIp", None), ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA) },
            r#"context["aws:SourceIp"]"#,
        ),
        (
            proto::AuthorizeRequest {
                context: ctx("kms:x", Some(Kind::NumberValue(f64::NAN))),
                ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)
            },
            r#"context["kms:x"]"#,
        ),
    ];
    for (req, want) in cases {
        let err = authz.authorize(req.clone()).await.expect_err(&format!("{req:?} is refused"));
        assert_invalid(&err, want);
    }

    // The tagging API too.
    let err = tagging
        .tag_resource(proto::TagResourceRequest {
            principal: String::new(),
            resource: KEY_ALPHA.into(),
            tags: vec![tag("Project", "x")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "principal");
    let err = tagging
        .tag_resource(proto::TagResourceRequest {
            principal: "nobody".into(),
            resource: KEY_ALPHA.into(),
            tags: vec![tag("Project", "x")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "principal");
    let err = tagging
        .list_resource_tags(proto::ListResourceTagsRequest { principal: KEY_ADMIN.into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_invalid(&err, "resource");
    let err = tagging
        .untag_resource(proto::UntagResourceRequest {
            principal: KEY_ADMIN.into(),
            resource: KEY_ALPHA.into(),
            tag_keys: vec!["Project".into()],
            context: ctx("aws:TagKeys", Some(Kind::ListValue(proto::StringList { values: vec!["Project".into()] }))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, r#"context["aws:TagKeys"]"#);

    // Too large a message: refused as too large, and the server carries on.
    let huge = "x".repeat(100 * 1024);
    let big = proto::AuthorizeRequest {
        context: ctx("kms:EncryptionContext:blob", Some(Kind::StringValue(huge.clone()))),
        ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)
    };
    let err = authz.authorize(big).await.unwrap_err();
    assert!(matches!(err.code(), Code::ResourceExhausted | Code::OutOfRange), "{err:?}");
    assert!(allowed(&authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap().into_inner()));
    let update = tokio_stream::iter(vec![apply_request("huge", set_tags(KEY_ALPHA, &[("Blob", &huge)]))]);
    let outcome = match admin.apply(update).await {
        Err(e) => Err(e),
        Ok(r) => r.into_inner().message().await,
    };
    assert!(matches!(&outcome, Err(e) if matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange)), "{outcome:?}");
    apply_ok(&mut admin, set_tags(KEY_ALPHA, &[("Small", "ok")])).await;
    let mut req = authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA);
    req.explain = true;
    let r = authz.authorize(req).await.unwrap().into_inner();
    assert!(allowed(&r) && !r.considered.is_empty());
}

// ------------------------------------------------------------------ 9

#[tokio::test(flavor = "multi_thread")]
async fn health_serves_until_shutdown() {
    let running = start(config()).await;
    let Clients { mut health, mut admin, .. } = clients(&running).await;
    for service in ["", "tagward.v1.Authorizer", "tagward.v1.Tagging"] {
        assert_eq!(health_check(&mut health, service).await.unwrap(), SERVING, "{service:?}");
    }
    assert_eq!(health_check(&mut health, "no.such.Service").await.unwrap_err().code(), Code::NotFound);

    let data_addr = running.data_addr.tcp().unwrap();
    let mut watch = admin.watch(proto::WatchRequest { from_revision: 0 }).await.unwrap().into_inner();
    let stopping = Instant::now();
    timeout(Duration::from_secs(4), running.shutdown()).await.expect("shutdown does not wait for open streams' grace");
    let took = stopping.elapsed();
    let ended = timeout(STEP, watch.message()).await.expect("the watch stream ends");
    eprintln!("shutdown took {took:?}; the watch stream ended with {ended:?}");
    assert!(!matches!(ended, Ok(Some(_))), "no event after shutdown: {ended:?}");

    for service in ["", "tagward.v1.Authorizer"] {
        let status = health_check(&mut health, service).await;
        assert!(!matches!(status, Ok(SERVING)), "{service:?} still serving after shutdown: {status:?}");
    }
    let reconnect = tonic::transport::Endpoint::from_shared(format!("http://{data_addr}")).unwrap().connect().await;
    if let Ok(ch) = reconnect {
        let status = health_check(&mut HealthClient::new(ch), "").await;
        assert!(!matches!(status, Ok(SERVING)), "a new connection after shutdown: {status:?}");
    }
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// One reflection exchange on `channel` (reflection v1, as grpcurl speaks it).
async fn reflect(
    channel: tonic::transport::Channel,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1::server_reflection_response::MessageResponse {
    use tonic_reflection::pb::v1::{server_reflection_client::ServerReflectionClient, ServerReflectionRequest};
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut answers =
        client.server_reflection_info(tokio_stream::iter(vec![req])).await.expect("reflection answers").into_inner();
    let answer = answers.message().await.expect("a reflection response").expect("one response");
    answer.message_response.expect("a response body")
}

/// The services a listener lists over reflection, sorted.
async fn listed(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    match reflect(channel, MessageRequest::ListServices(String::new())).await {
        MessageResponse::ListServicesResponse(list) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("expected a service list, got {other:?}"),
    }
}

/// Every file a symbol needs, fetched as grpcurl does: the file holding the
/// symbol, then each dependency by name, until nothing is missing.
async fn resolve_symbol(channel: tonic::transport::Channel, symbol: &str) -> Vec<String> {
    use prost::Message;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut wanted = vec![MessageRequest::FileContainingSymbol(symbol.to_string())];
    let mut have: Vec<String> = Vec::new();
    while let Some(request) = wanted.pop() {
        let asked = format!("{request:?}");
        match reflect(channel.clone(), request).await {
            MessageResponse::FileDescriptorResponse(files) => {
                for raw in files.file_descriptor_proto {
                    let file = prost_types::FileDescriptorProto::decode(raw.as_slice()).expect("a file descriptor");
                    let name = file.name.clone().unwrap_or_default();
                    if have.contains(&name) {
                        continue;
                    }
                    have.push(name);
                    for dep in file.dependency {
                        if !have.contains(&dep) {
                            wanted.push(MessageRequest::FileByFilename(dep));
                        }
                    }
                }
            }
            other => panic!("{asked}: expected file descriptors, got {other:?}"),
        }
    }
    have
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_exactly_what_each_listener_serves() {
    let running = start(config()).await;
    let data = channel(&running.data_addr).await;
    let admin = channel(&running.admin_addr).await;
    let reflection = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];
    let mut want_data: Vec<String> = ["tagward.v1.Authorizer", "tagward.v1.Tagging", "tagward.v1.Kms", "grpc.health.v1.Health"]
        .iter()
        .chain(reflection.iter())
        .map(|s| s.to_string())
        .collect();
    want_data.sort();
    let mut want_admin: Vec<String> = ["tagward.v1.Admin"].iter().chain(reflection.iter()).map(|s| s.to_string()).collect();
    want_admin.sort();
    assert_eq!(listed(data.clone()).await, want_data);
    assert_eq!(listed(admin.clone()).await, want_admin);
    // The error details every status carries resolve on both listeners, with
    // their imports (google.protobuf.Duration), as grpcurl needs to print them.
    for ch in [data.clone(), admin.clone()] {
        let files = resolve_symbol(ch.clone(), "google.rpc.ErrorInfo").await;
        assert!(files.iter().any(|f| f.ends_with("error_details.proto")), "{files:?}");
        assert!(files.iter().any(|f| f == "google/protobuf/duration.proto"), "{files:?}");
    }
    let admin_files = resolve_symbol(admin, "tagward.v1.Admin").await;
    assert!(admin_files.iter().any(|f| f == "tagward/v1/tagward.proto"), "{admin_files:?}");
    resolve_symbol(data, "tagward.v1.Authorizer").await;
    running.shutdown().await;
}

// ------------------------------------------------------------------ decision cache

/// The decision cache (on by default) never answers across a change: the
/// same request, asked again and again, follows every tag and policy change
/// at once, through Authorize and through BatchAuthorize items alike; and a
/// server without the cache gives the same answers.
#[tokio::test(flavor = "multi_thread")]
async fn remembered_decisions_follow_every_change() {
    let mut answers = Vec::new();
    for cache_bytes in [tagward::grpc::decisions::DEFAULT_BYTES, 0] {
        let mut seen = Vec::new();
        let running = start(Config { decision_cache_bytes: cache_bytes, ..config() }).await;
        let Clients { mut admin, mut authz, .. } = clients(&running).await;
        let ask = |authz: &mut AuthorizerClient<tonic::transport::Channel>| {
            let mut authz = authz.clone();
            async move {
                let one = authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap().into_inner();
                let batch = proto::BatchAuthorizeRequest {
                    principal: ALPHA_APP.to_string(),
                    items: vec![item("kms:Decrypt", KEY_ALPHA)],
                    ..Default::default()
                };
                let b = authz.batch_authorize(batch).await.unwrap().into_inner();
                assert_eq!(allowed(&one), allowed(&b.results[0]), "{one:?} {b:?}");
                assert_eq!(one.revision, b.revision, "{one:?} {b:?}");
                (allowed(&one), one.matched.clone(), one.missing_keys.clone())
            }
        };
        for _ in 0..3 {
            seen.push(ask(&mut authz).await);
            assert!(seen.last().unwrap().0, "cache {cache_bytes}");
        }
        apply_ok(&mut admin, set_tags(KEY_ALPHA, &[("Project", "Beta"), ("Type", "General")])).await;
        for _ in 0..3 {
            seen.push(ask(&mut authz).await);
            assert!(!seen.last().unwrap().0, "the tag change is seen at once (cache {cache_bytes})");
        }
        apply_ok(&mut admin, set_tags(KEY_ALPHA, &[("Project", "Alpha"), ("Type", "General")])).await;
        seen.push(ask(&mut authz).await);
        assert!(seen.last().unwrap().0, "cache {cache_bytes}");
        let no_decrypt = r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:Encrypt",
            "Resource": "arn:aws:kms:*:111122223333:key/*"}]}"#;
        apply_ok(&mut admin, put_policy("AlphaKeys", no_decrypt)).await;
        for _ in 0..3 {
            seen.push(ask(&mut authz).await);
            assert!(!seen.last().unwrap().0, "the policy change is seen at once (cache {cache_bytes})");
        }
        running.shutdown().await;
        answers.push(seen);
    }
    assert_eq!(answers[0], answers[1], "the same answers, statements and missing keys with and without the cache");
}

/// A decision that read the time is never remembered: a policy that allows
/// until a moment a few seconds ahead denies the same request once that
/// moment has passed, with no change to the state in between.
#[tokio::test(flavor = "multi_thread")]
async fn a_decision_that_read_the_clock_is_decided_every_time() {
    let until = chrono::Utc::now() + chrono::Duration::seconds(3);
    let world_json = format!(
        r#"{{"policies": {{"Until": {{"Version": "2012-10-17", "Statement": [{{"Effect": "Allow", "Action": "kms:Decrypt",
            "Resource": "*", "Condition": {{"DateLessThan": {{"aws:CurrentTime": "{}"}}}}}}]}}}},
          "principals": [{{"arn": "{ALPHA_APP}", "policies": ["Until"]}}],
          "resources": [{{"arn": "{KEY_ALPHA}"}}]}}"#,
        until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let running = start_with(&world_json, config()).await;
    let Clients { mut authz, .. } = clients(&running).await;
    // A batch with one item that reads the time and one that does not.
    let batch = || proto::BatchAuthorizeRequest {
        principal: ALPHA_APP.to_string(),
        items: vec![item("kms:Decrypt", KEY_ALPHA), item("kms:Encrypt", KEY_ALPHA)],
        ..Default::default()
    };
    let first = authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap().into_inner();
    assert!(allowed(&first), "before the moment: {first:?}");
    for _ in 0..3 {
        assert!(allowed(&authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap().into_inner()));
        let b = authz.batch_authorize(batch()).await.unwrap().into_inner();
        assert!(allowed(&b.results[0]) && !allowed(&b.results[1]), "{b:?}");
    }
    while chrono::Utc::now() < until + chrono::Duration::milliseconds(500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let later = authz.authorize(authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)).await.unwrap().into_inner();
    assert!(!allowed(&later), "after the moment, at the same revision: {later:?}");
    assert_eq!(later.revision, first.revision, "no change in between");
    let b = authz.batch_authorize(batch()).await.unwrap().into_inner();
    assert!(!allowed(&b.results[0]) && !allowed(&b.results[1]), "the batch too: {b:?}");
    assert_eq!(b.revision, first.revision);
    running.shutdown().await;
}

/// An `Authorize` call spoken as raw HTTP/2, reduced to what a client sees:
/// the HTTP status, the content type, `grpc-status` and `grpc-message`,
/// and the decoded answer (none for an error).
type Seen = (u16, Option<String>, Option<String>, Option<String>, Option<proto::AuthorizeResponse>);

fn seen_of(raw: (http::StatusCode, http::HeaderMap, Vec<u8>, Option<http::HeaderMap>)) -> Seen {
    let (status, headers, body, trailers) = raw;
    let text = |v: &http::HeaderValue| v.to_str().unwrap().to_string();
    // In the trailers, or in the headers of a trailers-only answer.
    let trailer = |name: &str| trailers.as_ref().and_then(|t| t.get(name)).or(headers.get(name)).map(text);
    let answer = (body.len() > 5).then(|| <proto::AuthorizeResponse as prost::Message>::decode(&body[5..]).unwrap());
    (status.as_u16(), headers.get("content-type").map(text), trailer("grpc-status"), trailer("grpc-message"), answer)
}

/// A repeated `Authorize` is answered from the bytes of its message
/// (`grpc::repeat`) exactly as the handler answers it, byte for byte (the
/// same status, headers, message and trailers), however the message is cut
/// into DATA frames; a change is seen at once; and what the layer does not
/// answer (two messages in one call, a cut-off message, one that does not
/// decode, an `explain` request) gets the same answer as from a server
/// without the cache, where the layer is off. `BatchAuthorize` likewise.
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_call_is_answered_from_its_bytes_as_the_handler_answers() {
    let path = "/tagward.v1.Authorizer/Authorize";
    let mut outcomes: Vec<Vec<Seen>> = Vec::new();
    for cache_bytes in [tagward::grpc::decisions::DEFAULT_BYTES, 0] {
        let running = start(Config { decision_cache_bytes: cache_bytes, ..config() }).await;
        let Clients { mut admin, .. } = clients(&running).await;
        let addr = running.data_addr.tcp().unwrap();
        let client = h2_connect(addr).await;
        let msg = framed(&authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA));
        let first = h2_unary(&client, addr, path, &[&msg]).await;
        for _ in 0..3 {
            assert_eq!(h2_unary(&client, addr, path, &[&msg]).await, first, "cache {cache_bytes}");
            let cut = h2_unary(&client, addr, path, &[&msg[..1], &msg[1..7], &msg[7..]]).await;
            assert_eq!(cut, first, "cache {cache_bytes}");
        }
        let mut seen = vec![seen_of(first)];
        apply_ok(&mut admin, set_tags(KEY_ALPHA, &[("Project", "Beta"), ("Type", "General")])).await;
        for _ in 0..2 {
            seen.push(seen_of(h2_unary(&client, addr, path, &[&msg]).await));
        }
        let two: Vec<u8> = [&msg[..], &msg[..]].concat();
        let junk = [0u8, 0, 0, 0, 3, 0x0a, 0x7f, b'x'];
        let explain = framed(&proto::AuthorizeRequest { explain: true, ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA) });
        for _ in 0..2 {
            seen.push(seen_of(h2_unary(&client, addr, path, &[&two]).await));
            seen.push(seen_of(h2_unary(&client, addr, path, &[&msg[..msg.len() - 1]]).await));
            seen.push(seen_of(h2_unary(&client, addr, path, &[&junk]).await));
            seen.push(seen_of(h2_unary(&client, addr, path, &[&explain]).await));
            seen.push(seen_of(h2_unary(&client, addr, path, &[]).await));
        }
        // A batch, the same way: the same bytes as the handler's answer, cut
        // or whole, and the change already seen.
        let batch_path = "/tagward.v1.Authorizer/BatchAuthorize";
        let batch = framed(&proto::BatchAuthorizeRequest {
            principal: ALPHA_APP.to_string(),
            items: vec![item("kms:Decrypt", KEY_ALPHA), item("kms:Encrypt", KEY_ALPHA)],
            ..Default::default()
        });
        let first_batch = h2_unary(&client, addr, batch_path, &[&batch]).await;
        for _ in 0..2 {
            assert_eq!(h2_unary(&client, addr, batch_path, &[&batch]).await, first_batch, "cache {cache_bytes}");
            assert_eq!(h2_unary(&client, addr, batch_path, &[&batch[..9], &batch[9..]]).await, first_batch);
        }
        let (status, _, body, trailers) = first_batch;
        let b = <proto::BatchAuthorizeResponse as prost::Message>::decode(&body[5..]).unwrap();
        assert_eq!(status, 200);
        assert_eq!(trailers.and_then(|t| t.get("grpc-status").cloned()).unwrap(), "0");
        assert!(!allowed(&b.results[0]) && b.results.len() == 2, "the change is seen by the batch too: {b:?}");
        seen.push((200, None, None, None, Some(proto::AuthorizeResponse { revision: b.revision, ..b.results[0].clone() })));
        let answers = || seen.iter().filter_map(|s| s.4.as_ref());
        assert!(allowed(seen[0].4.as_ref().unwrap()), "{seen:?}");
        assert!(!allowed(seen[1].4.as_ref().unwrap()) && seen[1] == seen[2], "the change is seen at once: {seen:?}");
        assert!(answers().any(|a| !a.considered.is_empty()), "explained: {seen:?}");
        assert!(seen.iter().any(|s| s.2.as_deref() == Some("3")), "an INVALID_ARGUMENT: {seen:?}");
        running.shutdown().await;
        outcomes.push(seen);
    }
    assert_eq!(outcomes[0], outcomes[1], "with the cache as without it");
}
