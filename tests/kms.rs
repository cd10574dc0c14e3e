//! KMS aliases and grants through every door but the scenario files (which
//! `tests/scenarios.rs` and `tests/process.rs` run): the Kms gRPC service
//! on loopback with its error mapping, the admin updates, `Watch`, Export
//! into a fresh sidecar, `--tagging read-only`, and the store's data
//! directory reopened after the changes (log and snapshot).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::time::Duration;

use common::*;
use tagward::grpc::identity::TaggingMode;
use tagward::grpc::proto::{self, kms_client::KmsClient, update::Op, watch_event::Event as WatchKind};
use tagward::store::{Durability, Store};
use tagward_core::kms_ops::{KmsAnswer, KmsOp, KmsRequest};
use tagward_core::world::GrantSpec;
use tokio::time::timeout;
use tonic::Code;

const STEP: Duration = Duration::from_secs(5);
const ADMIN: &str = "arn:aws:iam::111122223333:role/KmsAdmin";
const APP: &str = "arn:aws:iam::111122223333:role/App";
const K1: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";
const K2: &str = "arn:aws:kms:us-east-1:111122223333:key/k2";
const OFF: &str = "arn:aws:kms:us-east-1:111122223333:key/off";
const ALIAS_A: &str = "arn:aws:kms:us-east-1:111122223333:alias/app-a";

const KMS_WORLD: &str = r#"{
  "policies": {"Admin": {"Version": "2012-10-17", "Statement": [
    {"Sid": "All", "Effect": "Allow", "Action": ["kms:CreateAlias", "kms:UpdateAlias", "kms:DeleteAlias", "kms:ListAliases",
      "kms:CreateGrant", "kms:RevokeGrant", "kms:ListGrants"], "Resource": "*"}]}},
  "principals": [
    {"arn": "arn:aws:iam::111122223333:role/KmsAdmin", "policies": ["Admin"]},
    {"arn": "arn:aws:iam::111122223333:role/App"}
  ],
  "resources": [
    {"arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "aliases": ["alias/app-a"],
     "grants": [{"id": "g0", "grantee_principal": "arn:aws:iam::111122223333:role/App", "operations": ["Encrypt"]}]},
    {"arn": "arn:aws:kms:us-east-1:111122223333:key/k2"},
    {"arn": "arn:aws:kms:us-east-1:111122223333:key/off", "key_state": "Disabled"}
  ]
}"#;

fn grant(grantee: &str, ops: &[&str]) -> proto::Grant {
    proto::Grant {
        grantee_principal: grantee.into(),
        operations: ops.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn assert_kms_error(status: &tonic::Status, code: Code, name: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(error_name(status).as_deref(), Some(name), "{status:?}");
}

async fn next_event(stream: &mut tonic::Streaming<proto::WatchEvent>) -> proto::WatchEvent {
    timeout(STEP, stream.message()).await.expect("an event in time").expect("the stream answers").expect("an event")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kms_service_changes_what_the_next_request_sees_and_names_each_error() {
    let running = start_with(KMS_WORLD, config()).await;
    let Clients { mut authz, mut admin, .. } = clients(&running).await;
    let mut kms = KmsClient::new(channel(&running.data_addr).await);
    let mut watch = admin.watch(proto::WatchRequest { from_revision: 0 }).await.unwrap().into_inner();

    // An alias resolves to its key; the grant on k1 allows Encrypt.
    let r = authz.authorize(authorize_req(APP, "kms:Encrypt", ALIAS_A)).await.unwrap().into_inner();
    assert!(allowed(&r), "{r:?}");
    assert_eq!((r.matched[0].policy.as_str(), r.matched[0].sid.as_str()), ("grant:g0", "g0"), "{r:?}");

    // UpdateAlias moves it; the next request through the alias is on k2.
    let moved = kms
        .update_alias(proto::UpdateAliasRequest {
            principal: ADMIN.into(),
            alias_name: "alias/app-a".into(),
            target_key: K2.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(moved.changed);
    let mut ask = authorize_req(APP, "kms:Encrypt", ALIAS_A);
    ask.min_revision = moved.revision;
    assert!(!allowed(&authz.authorize(ask).await.unwrap().into_inner()), "k2 has no grant");
    let e = next_event(&mut watch).await;
    match e.event {
        Some(WatchKind::AliasChange(a)) => {
            assert_eq!((a.action.as_str(), a.alias_name.as_str(), a.key.as_str()), ("kms:UpdateAlias", "alias/app-a", K2));
            assert_eq!((a.previous_key.as_str(), a.change.as_str()), (K1, "put"));
            assert_eq!(e.actor, ADMIN);
        }
        other => panic!("expected an alias change, got {other:?}"),
    }

    // CreateGrant answers the new id, which a Watch event and ListGrants show.
    let created = kms
        .create_grant(proto::CreateGrantRequest {
            principal: ADMIN.into(),
            key: K2.into(),
            grant: Some(grant(APP, &["Encrypt", "Decrypt"])),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.grant_id.len(), 64, "{created:?}");
    let mut ask = authorize_req(APP, "kms:Decrypt", K2);
    ask.min_revision = created.revision;
    let r = authz.authorize(ask).await.unwrap().into_inner();
    assert!(allowed(&r));
    assert_eq!(r.matched[0].sid, created.grant_id);
    match next_event(&mut watch).await.event {
        Some(WatchKind::GrantChange(g)) => {
            assert_eq!(
                (g.action.as_str(), g.grant_id.as_str(), g.change.as_str()),
                ("kms:CreateGrant", created.grant_id.as_str(), "put")
            );
            assert_eq!(g.grant.unwrap().operations, ["Decrypt", "Encrypt"]);
        }
        other => panic!("expected a grant change, got {other:?}"),
    }
    let listed =
        kms.list_grants(proto::ListGrantsRequest { principal: ADMIN.into(), key: K2.into(), ..Default::default() }).await;
    let ids: Vec<String> = listed.unwrap().into_inner().grants.into_iter().map(|g| g.id).collect();
    assert_eq!(ids, [created.grant_id.as_str()]);
    let aliases = kms.list_aliases(proto::ListAliasesRequest { principal: ADMIN.into(), ..Default::default() }).await;
    let aliases = aliases.unwrap().into_inner().aliases;
    assert_eq!(aliases.len(), 1);
    assert_eq!((aliases[0].alias_arn.as_str(), aliases[0].target_key.as_str()), (ALIAS_A, K2));

    // Every refusal: the status code and the KMS error name.
    let create = |alias: &str, key: &str, principal: &str| proto::CreateAliasRequest {
        principal: principal.into(),
        alias_name: alias.into(),
        target_key: key.into(),
        ..Default::default()
    };
    let e = kms.create_alias(create("alias/app-a", K1, ADMIN)).await.unwrap_err();
    assert_kms_error(&e, Code::AlreadyExists, "AlreadyExistsException");
    let e = kms.create_alias(create("alias/aws/x", K1, ADMIN)).await.unwrap_err();
    assert_kms_error(&e, Code::InvalidArgument, "InvalidAliasNameException");
    let e = kms.create_alias(create("alias/b", K1, APP)).await.unwrap_err();
    assert_kms_error(&e, Code::PermissionDenied, "AccessDeniedException");
    let e = kms.create_alias(create("alias/b", "arn:aws:kms:us-east-1:111122223333:key/none", ADMIN)).await.unwrap_err();
    assert_kms_error(&e, Code::NotFound, "NotFoundException");
    let e = kms
        .create_grant(proto::CreateGrantRequest {
            principal: ADMIN.into(),
            key: OFF.into(),
            grant: Some(grant(APP, &["Decrypt"])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_kms_error(&e, Code::FailedPrecondition, "DisabledException");
    let e = kms
        .create_grant(proto::CreateGrantRequest {
            principal: ADMIN.into(),
            key: K1.into(),
            grant: Some(grant(APP, &["Fly"])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_kms_error(&e, Code::InvalidArgument, "ValidationException");
    assert_eq!(field(&e).as_deref(), Some("grant.operations[0]"), "{e:?}");
    let mut forged = proto::CreateGrantRequest {
        principal: ADMIN.into(),
        key: K1.into(),
        grant: Some(grant(APP, &["Decrypt"])),
        ..Default::default()
    };
    forged.context.insert(
        "kms:GrantOperations".into(),
        proto::ContextValue { kind: Some(proto::context_value::Kind::StringValue("Decrypt".into())) },
    );
    let e = kms.create_grant(forged).await.unwrap_err();
    assert_kms_error(&e, Code::InvalidArgument, "ValidationException");
    let e = kms
        .retire_grant(proto::GrantIdRequest {
            principal: APP.into(),
            key: K1.into(),
            grant_id: "g0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_kms_error(&e, Code::PermissionDenied, "AccessDeniedException");
    let e = kms
        .revoke_grant(proto::GrantIdRequest {
            principal: ADMIN.into(),
            key: K1.into(),
            grant_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_kms_error(&e, Code::NotFound, "NotFoundException");
    let e = kms.create_alias(proto::CreateAliasRequest { alias_name: "alias/x".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(field(&e).as_deref(), Some("principal"));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_updates_put_and_delete_aliases_and_grants_and_export_carries_them() {
    let running = start_with(KMS_WORLD, config()).await;
    let Clients { mut admin, mut authz, .. } = clients(&running).await;
    apply_ok(&mut admin, update(Op::PutAlias(proto::PutAlias { key: K2.into(), alias_name: "alias/app-b".into() }))).await;
    let mut g = grant(APP, &["Decrypt"]);
    g.id = "admin-grant".into();
    g.constraints = Some(proto::GrantConstraints {
        kind: Some(proto::grant_constraints::Kind::EncryptionContextSubset(proto::EncryptionContext {
            pairs: [("Dept".to_string(), "IT".to_string())].into(),
        })),
    });
    apply_ok(&mut admin, update(Op::PutGrant(proto::PutGrant { key: K2.into(), grant: Some(g) }))).await;
    let refused = apply_all(
        &mut admin,
        vec![
            update(Op::PutAlias(proto::PutAlias { key: K1.into(), alias_name: "alias/aws/s3".into() })),
            update(Op::PutGrant(proto::PutGrant {
                key: K2.into(),
                grant: Some(proto::Grant { id: "admin-grant".into(), ..grant(APP, &["Decrypt"]) }),
            })),
            update(Op::DeleteAlias(proto::DeleteAliasArn { alias_arn: "arn:aws:kms:us-east-1:111122223333:alias/none".into() })),
        ],
    )
    .await;
    let codes: Vec<&str> = refused.iter().map(|a| a.error.as_ref().map_or("", |e| e.code.as_str())).collect();
    assert_eq!(codes, ["InvalidAliasNameException", "AlreadyExistsException", "NotFoundException"]);

    let mut ask = authorize_req(APP, "kms:Decrypt", "arn:aws:kms:us-east-1:111122223333:alias/app-b");
    ask.context.insert(
        "kms:EncryptionContext:Dept".into(),
        proto::ContextValue { kind: Some(proto::context_value::Kind::StringValue("IT".into())) },
    );
    assert!(allowed(&authz.authorize(ask.clone()).await.unwrap().into_inner()));

    // Export into a fresh sidecar: the aliases and grants come along.
    let mut s = admin.export(proto::ExportRequest {}).await.unwrap().into_inner();
    let mut items = Vec::new();
    while let Some(i) = timeout(STEP, s.message()).await.unwrap().unwrap() {
        items.push(i);
    }
    let fresh = start_with("{}", config()).await;
    let Clients { admin: mut fresh_admin, authz: mut fresh_authz, .. } = clients(&fresh).await;
    let acks = apply_all(&mut fresh_admin, items.iter().map(|i| i.update.clone().unwrap()).collect()).await;
    assert!(acks.iter().all(|a| a.error.is_none()), "{acks:?}");
    assert!(allowed(&fresh_authz.authorize(ask.clone()).await.unwrap().into_inner()));

    apply_ok(&mut admin, update(Op::DeleteGrant(proto::DeleteGrant { key: K2.into(), grant_id: "admin-grant".into() }))).await;
    apply_ok(
        &mut admin,
        update(Op::DeleteAlias(proto::DeleteAliasArn { alias_arn: "arn:aws:kms:us-east-1:111122223333:alias/app-b".into() })),
    )
    .await;
    assert!(!allowed(&authz.authorize(ask).await.unwrap().into_inner()));
    running.shutdown().await;
    fresh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_tagging_refuses_kms_writes_but_lists() {
    let mut cfg = config();
    cfg.tagging = TaggingMode::ReadOnly;
    let running = start_with(KMS_WORLD, cfg).await;
    let mut kms = KmsClient::new(channel(&running.data_addr).await);
    let e = kms
        .create_alias(proto::CreateAliasRequest {
            principal: ADMIN.into(),
            alias_name: "alias/b".into(),
            target_key: K1.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    let listed =
        kms.list_grants(proto::ListGrantsRequest { principal: ADMIN.into(), key: K1.into(), ..Default::default() }).await;
    assert_eq!(listed.unwrap().into_inner().grants.len(), 1);
    running.shutdown().await;
}

fn kms(store: &Store, principal: &str, op: KmsOp) -> KmsAnswer {
    let req = KmsRequest { principal: principal.into(), op, session_tags: Vec::new(), context: Vec::new() };
    let (done, ticket) = store.kms(&req).unwrap();
    ticket.wait().unwrap();
    done.outcome.answer
}

#[test]
fn alias_and_grant_changes_survive_a_restart_from_the_log_and_from_a_snapshot() {
    for compact_after_bytes in [64 << 20, 1] {
        let dir = Scratch::new("kms-durable");
        let seed = world(KMS_WORLD);
        let options = Durability { compact_after_bytes, event_capacity: 100 };
        let revision = {
            let (store, _) = Store::open_dir(dir.path(), Some(&seed), false, &options, None).unwrap();
            kms(&store, ADMIN, KmsOp::CreateAlias { alias: "alias/app-b".into(), key: K2.into() });
            kms(&store, ADMIN, KmsOp::UpdateAlias { alias: "alias/app-a".into(), key: K2.into() });
            let spec = GrantSpec { grantee_principal: APP.into(), operations: vec!["Decrypt".into()], ..Default::default() };
            kms(&store, ADMIN, KmsOp::CreateGrant { key: K2.into(), grant: spec });
            kms(&store, ADMIN, KmsOp::RevokeGrant { key: K1.into(), grant_id: "g0".into() });
            store.revision()
        };
        let (store, opened) = Store::open_dir(dir.path(), None, false, &options, None).unwrap();
        assert_eq!(opened.restored, Some(revision), "compact after {compact_after_bytes}");
        let state = store.snapshot();
        let k2 = state.resource(K2).unwrap().key().unwrap();
        assert_eq!(k2.aliases(), ["alias/app-a", "alias/app-b"]);
        assert_eq!(k2.grants().len(), 1);
        assert!(state.resource(K1).unwrap().key().unwrap().grants().is_empty());
        assert_eq!(state.alias_target(ALIAS_A).map(|k| k.to_string()).as_deref(), Some(K2));
        match kms(&store, ADMIN, KmsOp::ListAliases { key: Some(K1.into()) }) {
            KmsAnswer::Aliases(list) => assert!(list.is_empty()),
            other => panic!("{other:?}"),
        }
    }
}
