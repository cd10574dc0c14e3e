//! The wider authorization chain over gRPC: the admin stream puts and
//! deletes the organization, sessions, endpoints, boundaries and trust
//! policies; each change is visible to the next Authorize, shows up on
//! Watch, and Export rebuilds the same decisions on a fresh server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

mod common;

use std::time::Duration;

use common::*;
use tagward::grpc::proto::{self, update::Op, watch_event::Event as WatchKind};
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(5);
const DEV: &str = "arn:aws:iam::111122223333:role/Dev";
const SESSION: &str = "arn:aws:sts::111122223333:assumed-role/Dev/job";
const ALICE: &str = "arn:aws:iam::111122223333:user/alice";
const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";
const VPCE: &str = "vpce-0a1b2c3d4e5f67890";

const WORLD: &str = r#"{
  "policies": {
    "All": {"Version": "2012-10-17", "Statement": {"Sid": "All", "Effect": "Allow", "Action": "*", "Resource": "*"}},
    "KmsOnly": {"Version": "2012-10-17", "Statement": {"Sid": "KmsOnly", "Effect": "Allow", "Action": "kms:*", "Resource": "*"}}
  },
  "principals": [{"arn": "arn:aws:iam::111122223333:role/Dev", "policies": ["All"]},
                 {"arn": "arn:aws:iam::111122223333:user/alice"}],
  "resources": [{"arn": "arn:aws:kms:us-east-1:111122223333:key/k1"}]
}"#;

async fn decide(
    authz: &mut tagward::grpc::proto::authorizer_client::AuthorizerClient<tonic::transport::Channel>,
    principal: &str,
    action: &str,
    resource: &str,
    vpce: bool,
) -> (bool, Vec<String>) {
    let mut req = authorize_req(principal, action, resource);
    if vpce {
        req.context.insert(
            "aws:SourceVpce".into(),
            proto::ContextValue { kind: Some(proto::context_value::Kind::StringValue(VPCE.into())) },
        );
    }
    let r = authz.authorize(req).await.unwrap().into_inner();
    (allowed(&r), r.matched.iter().map(|m| format!("{} {}", m.policy, m.sid)).collect())
}

fn entity(e: &proto::WatchEvent) -> (String, String, String) {
    match &e.event {
        Some(WatchKind::EntityChange(c)) => (c.kind.clone(), c.name.clone(), c.change.clone()),
        other => panic!("expected an entity change, got {other:?}"),
    }
}

fn put_org(json: &str) -> proto::Update {
    update(Op::PutOrganization(proto::PutOrganization { organization_json: json.into() }))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chain_is_put_watched_exported_and_deleted_over_the_admin_stream() {
    let running = start_with(WORLD, config()).await;
    let Clients { mut authz, mut admin, .. } = clients(&running).await;
    let mut watch = admin.watch(proto::WatchRequest { from_revision: 0 }).await.unwrap().into_inner();

    assert!(decide(&mut authz, DEV, "ec2:RunInstances", "*", false).await.0);

    // An SCP that allows only KMS: ec2 is implicitly denied for Dev.
    let org = r#"{"id": "o-a1b2c3d4e5", "policies": {
        "KmsScp": {"Statement": {"Effect": "Allow", "Action": ["kms:*", "sts:AssumeRole"], "Resource": "*"}},
        "NoDisable": {"Statement": {"Sid": "NoDisable", "Effect": "Deny", "Action": "kms:DisableKey", "Resource": "*"}}},
        "units": [{"id": "r-ab12", "scps": ["KmsScp", "NoDisable"]}],
        "accounts": [{"id": "111122223333", "parent": "r-ab12", "scps": ["KmsScp"]}]}"#;
    apply_ok(&mut admin, put_org(org)).await;
    assert!(!decide(&mut authz, DEV, "ec2:RunInstances", "*", false).await.0);
    assert_eq!(decide(&mut authz, DEV, "kms:DisableKey", KEY, false).await, (false, vec!["scp:NoDisable NoDisable".to_string()]));
    // A bad organization is refused, naming the field, and changes nothing.
    let bad = apply_all(&mut admin, vec![put_org(r#"{"units": [{"id": "r-1", "scps": ["Missing"]}]}"#)]).await;
    let e = bad[0].error.as_ref().expect("refused");
    assert_eq!(e.code, "MalformedPolicyDocumentException");
    assert!(e.message.contains("put_organization.units[0].scps[0]"), "{}", e.message);
    assert!(decide(&mut authz, DEV, "kms:Decrypt", KEY, false).await.0);

    // A session policy narrows a session of Dev.
    let session = proto::Session {
        arn: SESSION.into(),
        policy: r#"{"Statement": {"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*"}}"#.into(),
        ..Default::default()
    };
    apply_ok(&mut admin, update(Op::PutSession(session))).await;
    assert!(decide(&mut authz, SESSION, "kms:Encrypt", KEY, false).await.0);
    assert!(!decide(&mut authz, SESSION, "kms:Decrypt", KEY, false).await.0);

    // An endpoint policy that lets only alice through.
    let endpoint = proto::Endpoint {
        id: VPCE.into(),
        policy: r#"{"Statement": {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:user/alice"}, "Action": "*", "Resource": "*"}}"#.into(),
    };
    apply_ok(&mut admin, update(Op::PutEndpoint(endpoint))).await;
    assert!(!decide(&mut authz, DEV, "kms:Decrypt", KEY, true).await.0);

    // Alice gets a boundary and may assume Dev through its trust policy.
    let alice = proto::Principal {
        arn: ALICE.into(),
        policies: vec!["All".into()],
        permissions_boundary: "KmsOnly".into(),
        ..Default::default()
    };
    apply_ok(&mut admin, update(Op::PutPrincipal(alice))).await;
    let dev = proto::Principal {
        arn: DEV.into(),
        policies: vec!["All".into()],
        trust_policy: r#"{"Statement": {"Sid": "TrustAlice", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:user/alice"}, "Action": "sts:AssumeRole"}}"#.into(),
        ..Default::default()
    };
    apply_ok(&mut admin, update(Op::PutPrincipal(dev))).await;
    assert_eq!(
        decide(&mut authz, ALICE, "sts:AssumeRole", DEV, false).await,
        (true, vec!["All All".to_string(), "trust-policy TrustAlice".to_string()])
    );
    assert!(decide(&mut authz, ALICE, "kms:Decrypt", KEY, true).await.0);
    assert!(!decide(&mut authz, ALICE, "s3:GetObject", "arn:aws:s3:::b/o", false).await.0, "outside the boundary");

    // Watch saw every kind (the refused organization left no event).
    let mut kinds = Vec::new();
    while kinds.len() < 5 {
        let e = timeout(STEP, watch.message()).await.unwrap().unwrap().unwrap();
        kinds.push(entity(&e));
    }
    let want: Vec<(String, String, String)> = [
        ("organization", "", "put"),
        ("session", SESSION, "put"),
        ("endpoint", VPCE, "put"),
        ("principal", ALICE, "put"),
        ("principal", DEV, "put"),
    ]
    .iter()
    .map(|(k, n, c)| (k.to_string(), n.to_string(), c.to_string()))
    .collect();
    assert_eq!(kinds, want);

    // Export onto a fresh server decides the same.
    let mut s = admin.export(proto::ExportRequest {}).await.unwrap().into_inner();
    let mut items = Vec::new();
    while let Some(i) = timeout(STEP, s.message()).await.unwrap().unwrap() {
        items.push(i.update.unwrap());
    }
    let fresh = start_with("{}", config()).await;
    let Clients { authz: mut fresh_authz, admin: mut fresh_admin, .. } = clients(&fresh).await;
    let acks = apply_all(&mut fresh_admin, items).await;
    assert!(acks.iter().all(|a| a.error.is_none()), "{acks:?}");
    for (p, a, r, v) in [
        (DEV, "ec2:RunInstances", "*", false),
        (DEV, "kms:DisableKey", KEY, false),
        (SESSION, "kms:Encrypt", KEY, false),
        (SESSION, "kms:Decrypt", KEY, false),
        (DEV, "kms:Decrypt", KEY, true),
        (ALICE, "sts:AssumeRole", DEV, false),
        (ALICE, "s3:GetObject", "arn:aws:s3:::b/o", false),
    ] {
        assert_eq!(decide(&mut authz, p, a, r, v).await, decide(&mut fresh_authz, p, a, r, v).await, "{p} {a} {r}");
    }

    // Deletes undo each kind; deleting again is NoSuchEntityException.
    apply_ok(&mut admin, update(Op::DeleteOrganization(proto::DeleteOrganization {}))).await;
    apply_ok(&mut admin, update(Op::DeleteSession(proto::DeleteEntity { arn: SESSION.into() }))).await;
    apply_ok(&mut admin, update(Op::DeleteEndpoint(proto::DeleteEndpoint { id: VPCE.into() }))).await;
    assert!(decide(&mut authz, DEV, "ec2:RunInstances", "*", true).await.0);
    assert!(decide(&mut authz, SESSION, "kms:Decrypt", KEY, false).await.0);
    let again = apply_all(
        &mut admin,
        vec![
            update(Op::DeleteOrganization(proto::DeleteOrganization {})),
            update(Op::DeleteSession(proto::DeleteEntity { arn: SESSION.into() })),
            update(Op::DeleteEndpoint(proto::DeleteEndpoint { id: VPCE.into() })),
        ],
    )
    .await;
    for a in &again {
        assert_eq!(a.error.as_ref().map(|e| e.code.as_str()), Some("NoSuchEntityException"), "{a:?}");
    }
}
