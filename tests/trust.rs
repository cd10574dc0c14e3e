//! Trust at the boundaries: what a data-plane caller may put in a request's
//! context (the clock keys, the allow-list), and who an admin caller is
//! (named tokens with roles, re-read without a restart, as the actor of the
//! changes they make). The real server in-process on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tagward::audit::AuditLog;
use tagward::engine::ContextRules;
use tagward::grpc::proto;
use tagward::grpc::server::{self, Config, Running};
use tagward::store::{Durability, Store};
use tonic::Code;

/// A role whose only grant expired in 2020; and a key admin for tagging.
const EXPIRED: &str = r#"{
  "policies": {
    "Expired": {"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*",
      "Condition": {"DateLessThan": {"aws:CurrentTime": "2020-01-01T00:00:00Z"}}}]}
  },
  "principals": [{"arn": "arn:aws:iam::111122223333:role/Late", "policies": ["Expired"]}],
  "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "tags": {"Project": "Alpha"}}]
}"#;
const LATE: &str = "arn:aws:iam::111122223333:role/Late";
const K1: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";

fn text(s: &str) -> proto::ContextValue {
    proto::ContextValue { kind: Some(proto::context_value::Kind::StringValue(s.into())) }
}

fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, proto::ContextValue> {
    pairs.iter().map(|(k, v)| (k.to_string(), text(v))).collect()
}

fn in_2019(key: &str) -> HashMap<String, proto::ContextValue> {
    ctx(&[(key, if key.eq_ignore_ascii_case("aws:EpochTime") { "1559347200" } else { "2019-06-01T00:00:00Z" })])
}

fn asked(context: HashMap<String, proto::ContextValue>) -> proto::AuthorizeRequest {
    proto::AuthorizeRequest { context, ..authorize_req(LATE, "kms:Decrypt", K1) }
}

fn refused(status: &tonic::Status, key: &str, why: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field(status).as_deref(), Some(format!("context[{key:?}]").as_str()), "{status:?}");
    assert!(status.message().contains(why), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_refuses_a_forged_clock_unless_started_to_allow_it() {
    let running = start_with(EXPIRED, config()).await;
    let Clients { mut authz, mut tagging, .. } = clients(&running).await;
    // Today's clock: the grant has expired.
    assert!(!allowed(&authz.authorize(authorize_req(LATE, "kms:Decrypt", K1)).await.unwrap().into_inner()));
    for key in ["aws:CurrentTime", "aws:EpochTime", "AWS:currenttime"] {
        let e = authz.authorize(asked(in_2019(key))).await.unwrap_err();
        refused(&e, key, "--allow-clock-override");
        let e = authz
            .batch_authorize(proto::BatchAuthorizeRequest {
                principal: LATE.into(),
                items: vec![item("kms:Decrypt", K1)],
                context: in_2019(key),
                ..Default::default()
            })
            .await
            .unwrap_err();
        refused(&e, key, "--allow-clock-override");
        let e = tagging
            .tag_resource(proto::TagResourceRequest {
                principal: LATE.into(),
                resource: K1.into(),
                tags: vec![tag("Project", "Beta")],
                context: in_2019(key),
                ..Default::default()
            })
            .await
            .unwrap_err();
        refused(&e, key, "--allow-clock-override");
        let e = tagging
            .list_resource_tags(proto::ListResourceTagsRequest {
                principal: LATE.into(),
                resource: K1.into(),
                context: in_2019(key),
                ..Default::default()
            })
            .await
            .unwrap_err();
        refused(&e, key, "--allow-clock-override");
    }

    let mut cfg = config();
    cfg.context_rules.clock_override = true;
    let trusting = start_with(EXPIRED, cfg).await;
    let Clients { mut authz, mut tagging, .. } = clients(&trusting).await;
    let r = authz.authorize(asked(in_2019("aws:CurrentTime"))).await.unwrap().into_inner();
    assert!(allowed(&r), "with --allow-clock-override the stated time is the time: {r:?}");
    let done = tagging
        .tag_resource(proto::TagResourceRequest {
            principal: LATE.into(),
            resource: K1.into(),
            tags: vec![tag("Project", "Beta")],
            context: in_2019("aws:EpochTime"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.changed);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_context_allow_list_refuses_an_unlisted_key_and_accepts_a_listed_one() {
    let mut cfg = config();
    cfg.context_rules =
        ContextRules { allowed: Some(ContextRules::allow_list(["aws:SourceIp"]).unwrap()), ..ContextRules::SERVER };
    let running = start(cfg).await;
    let Clients { mut authz, .. } = clients(&running).await;
    let listed = proto::AuthorizeRequest {
        context: ctx(&[("AWS:SourceIP", "10.0.0.1")]),
        ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)
    };
    assert!(allowed(&authz.authorize(listed).await.unwrap().into_inner()), "a listed key, in any case");
    let unlisted = proto::AuthorizeRequest {
        context: ctx(&[("aws:SourceIp", "10.0.0.1"), ("kms:ViaService", "s3.amazonaws.com")]),
        ..authorize_req(ALPHA_APP, "kms:Decrypt", KEY_ALPHA)
    };
    refused(&authz.authorize(unlisted).await.unwrap_err(), "kms:ViaService", "--context-keys");
    // Keys Tagward fills in stay refused, listed or not.
    let filled = proto::AuthorizeRequest {
        context: ctx(&[("aws:PrincipalTag/project", "Beta")]),
        ..authorize_req(BETA_APP, "kms:Decrypt", KEY_ALPHA)
    };
    refused(&authz.authorize(filled).await.unwrap_err(), "aws:PrincipalTag/project", "filled in by Tagward");
}

// ------------------------------------------------------------------ admin

fn write(path: &std::path::Path, text: &str) {
    // Write then rename, as a Secret update does: the reader never sees
    // half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A server whose admin plane uses the token file `tokens`, re-read every
/// 100 ms, with an audit trail at `audit`.
async fn start_with_tokens(tokens: &std::path::Path, audit: &std::path::Path) -> Running {
    let options = Durability { compact_after_bytes: 1 << 20, event_capacity: 1000 };
    let (store, _) = Store::open_memory(Some(&world(WORLD)), &options, Some(AuditLog::open(audit).unwrap())).unwrap();
    let cfg = Config { admin_token_file: Some(tokens.to_path_buf()), admin_token_reload: Duration::from_millis(100), ..config() };
    server::start(cfg, store).await.expect("the server starts")
}

async fn export(
    admin: &mut AdminClient<tonic::transport::Channel>,
    req: tonic::Request<proto::ExportRequest>,
) -> Result<usize, tonic::Status> {
    let mut s = admin.export(req).await?.into_inner();
    let mut n = 0;
    while s.message().await?.is_some() {
        n += 1;
    }
    Ok(n)
}

fn bearer<T>(msg: T, header: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", header.parse().unwrap());
    req
}

async fn apply_as(
    admin: &mut AdminClient<tonic::transport::Channel>,
    token: &str,
    u: proto::Update,
) -> Result<proto::ApplyResponse, tonic::Status> {
    let mut acks = admin.apply(with_token(tokio_stream::iter(vec![apply_request("a", u)]), token)).await?.into_inner();
    acks.message().await?.ok_or_else(|| tonic::Status::internal("no ack"))
}

#[tokio::test(flavor = "multi_thread")]
async fn named_admin_tokens_have_roles_and_become_the_actor() {
    let scratch = Scratch::new("admin-roles");
    let (tokens, audit) = (scratch.join("tokens"), scratch.join("audit.jsonl"));
    write(&tokens, "# who may administer\nci-deploy: w-123\n\ndashboard (reader): r-456\n");
    let running = start_with_tokens(&tokens, &audit).await;
    let Clients { mut admin, .. } = clients(&running).await;

    // The reader may Export and Watch, not Apply.
    assert!(export(&mut admin, with_token(proto::ExportRequest {}, "r-456")).await.unwrap() > 0);
    let mut watch = admin.watch(with_token(proto::WatchRequest { from_revision: 0 }, "r-456")).await.unwrap().into_inner();
    let e = apply_as(&mut admin, "r-456", set_tags(KEY_ALPHA, &[("Stolen", "yes")])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("reader") && e.message().contains("dashboard"), "{e:?}");

    // The scheme is case-insensitive; the writer's name is the actor.
    let mut acks = admin
        .apply(bearer(tokio_stream::iter(vec![apply_request("a", set_tags(KEY_ALPHA, &[("Checked", "yes")]))]), "bearer w-123"))
        .await
        .unwrap()
        .into_inner();
    let ack = acks.message().await.unwrap().unwrap();
    assert!(ack.error.is_none(), "{ack:?}");
    let event = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(event.actor, "ci-deploy", "{event:?}");
    let trail = std::fs::read_to_string(&audit).unwrap();
    let last: serde_json::Value = serde_json::from_str(trail.lines().last().unwrap()).unwrap();
    assert_eq!(last["userIdentity"]["principalId"], "ci-deploy", "{last}");
    assert!(!trail.contains("w-123"), "no token in the audit trail");

    // No token, an unknown one: UNAUTHENTICATED.
    assert_eq!(export(&mut admin, tonic::Request::new(proto::ExportRequest {})).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(export(&mut admin, with_token(proto::ExportRequest {}, "w-12")).await.unwrap_err().code(), Code::Unauthenticated);
}

/// Polls `ok` until it holds, at most `limit`.
async fn eventually<F: std::future::Future<Output = bool>>(limit: Duration, mut ok: impl FnMut() -> F) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewritten_token_file_takes_effect_without_a_restart() {
    let scratch = Scratch::new("admin-rotation");
    let (tokens, audit) = (scratch.join("tokens"), scratch.join("audit.jsonl"));
    write(&tokens, "ci: old-token\n");
    let running = start_with_tokens(&tokens, &audit).await;
    let admin = clients(&running).await.admin;
    assert!(export(&mut admin.clone(), with_token(proto::ExportRequest {}, "old-token")).await.is_ok());

    write(&tokens, "ci: new-token\n");
    let rotated = eventually(Duration::from_secs(10), || {
        let mut a = admin.clone();
        async move {
            export(&mut a, with_token(proto::ExportRequest {}, "new-token")).await.is_ok()
                && export(&mut a, with_token(proto::ExportRequest {}, "old-token")).await.map_err(|e| e.code())
                    == Err(Code::Unauthenticated)
        }
    })
    .await;
    assert!(rotated, "the new token works and the old one stops working");

    // A file that does not parse keeps the previous tokens.
    write(&tokens, "this line has no name\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(export(&mut admin.clone(), with_token(proto::ExportRequest {}, "new-token")).await.is_ok());
    // And a good one after it is taken again.
    write(&tokens, "ci (reader): newer-token\n");
    let taken = eventually(Duration::from_secs(10), || {
        let mut a = admin.clone();
        async move { export(&mut a, with_token(proto::ExportRequest {}, "newer-token")).await.is_ok() }
    })
    .await;
    assert!(taken);
    let e = apply_as(&mut admin.clone(), "newer-token", set_tags(KEY_ALPHA, &[("X", "y")])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_listener_beyond_loopback_needs_a_token_file_or_flag() {
    let scratch = Scratch::new("admin-beyond");
    let store = || Arc::new(Store::new(Default::default(), 16));
    let mut cfg = config();
    cfg.admin_listen = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(server::start(cfg.clone(), store()).await, Err(server::ServeError::AdminWithoutToken(_))));
    let tokens = scratch.join("tokens");
    write(&tokens, "# nobody\n");
    cfg.admin_token_file = Some(tokens.clone());
    match server::start(cfg.clone(), store()).await {
        Err(e @ server::ServeError::TokenFile { .. }) => assert!(e.to_string().contains("names no token"), "{e}"),
        Err(e) => panic!("expected TokenFile, got {e}"),
        Ok(_) => panic!("a token file without tokens must not start"),
    }
    write(&tokens, "ops: s3cret-value\n");
    let running = server::start(cfg, store()).await.expect("a token file is a token");
    running.shutdown().await;
}
