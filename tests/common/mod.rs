//! Helpers shared by the gRPC integration tests: a test world, a server on
//! loopback, clients, small builders for admin updates, and (in [`process`])
//! the harness for `tagward` child processes.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tagward::grpc::proto::{self, update::Op};
use tagward::grpc::server::{self, Config, Running};
use tagward::store::Store;
use tagward::world::WorldSpec;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use tonic_types::StatusExt;

pub use tagward::grpc::proto::admin_client::AdminClient;
pub use tagward::grpc::proto::authorizer_client::AuthorizerClient;
pub use tagward::grpc::proto::tagging_client::TaggingClient;
pub use tonic_health::pb::health_client::HealthClient;

pub mod etcd;
pub mod pki;
pub mod process;
#[allow(unused_imports)] // each test file uses its part
pub use process::{command, manifest_dir, Serve, Tagward, BIN};

pub const ALPHA_APP: &str = "arn:aws:iam::111122223333:role/AlphaApp";
pub const BETA_APP: &str = "arn:aws:iam::111122223333:role/BetaApp";
pub const KEY_ADMIN: &str = "arn:aws:iam::111122223333:role/KeyAdmin";
pub const OPS_USER: &str = "arn:aws:iam::111122223333:user/ops";
pub const KEY_ALPHA: &str = "arn:aws:kms:us-east-1:111122223333:key/alpha-0001";
pub const KEY_BETA: &str = "arn:aws:kms:us-east-1:111122223333:key/beta-0002";
pub const KEY_RESERVED: &str = "arn:aws:kms:us-east-1:111122223333:key/reserved-0003";
pub const KEY_DISABLED: &str = "arn:aws:kms:us-east-1:111122223333:key/disabled-0004";
pub const BUCKET: &str = "arn:aws:s3:::tagward-test-bucket";

/// The deploy example's policies and principals, plus keys, a user with an
/// inline policy, a key with its own key policy and a bucket with a
/// resource policy and an explicit account (so that Export has every kind
/// of field to carry).
pub const WORLD: &str = r#"{
  "policies": {
    "AlphaKeys": {"Version": "2012-10-17", "Statement": [
      {"Sid": "UseKeysOfMyProject", "Effect": "Allow", "Action": ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey*"],
       "Resource": "arn:aws:kms:*:111122223333:key/*",
       "Condition": {"StringEquals": {"aws:ResourceTag/Project": "${aws:PrincipalTag/project}"}}},
      {"Sid": "DenyReserved", "Effect": "Deny", "Action": "kms:*", "Resource": "arn:aws:kms:*:111122223333:key/*",
       "Condition": {"StringEquals": {"aws:ResourceTag/Type": "Reserved"}}}]},
    "KeyTagAdmin": {"Version": "2012-10-17", "Statement": [
      {"Sid": "ManageProjectTags", "Effect": "Allow", "Action": ["kms:TagResource", "kms:UntagResource", "kms:ListResourceTags"],
       "Resource": "arn:aws:kms:*:111122223333:key/*",
       "Condition": {"ForAllValues:StringEquals": {"aws:TagKeys": ["Project", "Type"]}}},
      {"Sid": "FindResourcesByTag", "Effect": "Allow", "Action": "tag:GetResources", "Resource": "*"}]}
  },
  "principals": [
    {"arn": "arn:aws:iam::111122223333:role/AlphaApp", "tags": {"project": "Alpha"}, "policies": ["AlphaKeys"]},
    {"arn": "arn:aws:iam::111122223333:role/BetaApp", "tags": {"project": "Beta"}, "policies": ["AlphaKeys"]},
    {"arn": "arn:aws:iam::111122223333:role/KeyAdmin", "policies": ["KeyTagAdmin"]},
    {"arn": "arn:aws:iam::111122223333:user/ops", "tags": {"team": "ops"},
     "inline_policies": {"NoS3": {"Version": "2012-10-17", "Statement": {"Effect": "Deny", "Action": "s3:*", "Resource": "*"}}}}
  ],
  "resources": [
    {"arn": "arn:aws:kms:us-east-1:111122223333:key/alpha-0001", "tags": {"Project": "Alpha", "Type": "General"}},
    {"arn": "arn:aws:kms:us-east-1:111122223333:key/beta-0002", "tags": {"Project": "Beta", "Type": "General"}},
    {"arn": "arn:aws:kms:us-east-1:111122223333:key/reserved-0003", "tags": {"Project": "Alpha", "Type": "Reserved"}},
    {"arn": "arn:aws:kms:us-east-1:111122223333:key/disabled-0004", "tags": {"Owner": "ops"}, "key_state": "Disabled",
     "key_policy": {"Version": "2012-10-17", "Statement": [{"Sid": "Root", "Effect": "Allow",
       "Principal": {"AWS": "arn:aws:iam::111122223333:root"}, "Action": "kms:*", "Resource": "*"}]}},
    {"arn": "arn:aws:s3:::tagward-test-bucket", "account": "111122223333", "tags": {"Owner": "ops"},
     "resource_policy": {"Version": "2012-10-17", "Statement": {"Effect": "Allow",
       "Principal": {"AWS": "arn:aws:iam::111122223333:role/AlphaApp"}, "Action": "s3:GetObject", "Resource": "*"}}}
  ]
}"#;

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A config on two free loopback ports with short timeouts.
pub fn config() -> Config {
    Config {
        listen: loopback().into(),
        admin_listen: loopback().into(),
        min_revision_wait: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    }
}

pub fn world(json: &str) -> WorldSpec {
    serde_json::from_str(json).expect("the test world parses")
}

/// Starts the real server on loopback with `world_json` loaded.
pub async fn start_with(world_json: &str, config: Config) -> Running {
    let state = world(world_json).build().expect("the test world builds");
    server::start(config, Arc::new(Store::new(state, 10_000))).await.expect("the server starts")
}

pub async fn start(config: Config) -> Running {
    start_with(WORLD, config).await
}

/// A plaintext channel to a TCP address (a `SocketAddr`, or a server's
/// `ListenAddr`, which prints as `IP:PORT`).
pub async fn channel(addr: impl std::fmt::Display) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

/// Clients of one running server.
pub struct Clients {
    pub authz: AuthorizerClient<Channel>,
    pub tagging: TaggingClient<Channel>,
    pub admin: AdminClient<Channel>,
    pub health: HealthClient<Channel>,
}

pub async fn clients(running: &Running) -> Clients {
    let data = channel(&running.data_addr).await;
    let admin = channel(&running.admin_addr).await;
    Clients {
        authz: AuthorizerClient::new(data.clone()),
        tagging: TaggingClient::new(data.clone()),
        admin: AdminClient::new(admin),
        health: HealthClient::new(data),
    }
}

/// The `field` the server named in a validation error.
pub fn field(status: &Status) -> Option<String> {
    status.get_details_error_info().and_then(|info| info.metadata.get("field").cloned())
}

pub fn error_name(status: &Status) -> Option<String> {
    tagward::grpc::error_name(status)
}

pub fn tag(k: &str, v: &str) -> proto::Tag {
    proto::Tag { key: k.to_string(), value: v.to_string() }
}

pub fn tags_of(tags: &[proto::Tag]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect();
    out.sort();
    out
}

pub fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    out.sort();
    out
}

pub fn update(op: Op) -> proto::Update {
    proto::Update { op: Some(op) }
}

pub fn set_tags(resource: &str, t: &[(&str, &str)]) -> proto::Update {
    update(Op::SetTags(proto::SetTags { resource: resource.to_string(), tags: t.iter().map(|(k, v)| tag(k, v)).collect() }))
}

pub fn put_policy(name: &str, document: &str) -> proto::Update {
    update(Op::PutPolicy(proto::PutPolicy { name: name.to_string(), document: document.to_string() }))
}

pub fn batch(updates: Vec<proto::Update>) -> proto::Update {
    update(Op::Batch(proto::Batch { updates }))
}

pub fn apply_request(id: &str, u: proto::Update) -> proto::ApplyRequest {
    proto::ApplyRequest { id: id.to_string(), update: Some(u) }
}

/// A request carrying the admin bearer token.
pub fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// Sends `updates` on one Apply stream and collects every answer.
pub async fn apply_all(admin: &mut AdminClient<Channel>, updates: Vec<proto::Update>) -> Vec<proto::ApplyResponse> {
    let reqs: Vec<proto::ApplyRequest> =
        updates.into_iter().enumerate().map(|(i, u)| apply_request(&format!("u{i}"), u)).collect();
    let n = reqs.len();
    let mut stream = admin.apply(tokio_stream::iter(reqs)).await.expect("Admin.Apply opens").into_inner();
    let mut out = Vec::with_capacity(n);
    while let Some(r) = stream.message().await.expect("Admin.Apply answers") {
        out.push(r);
    }
    assert_eq!(out.len(), n, "one answer per update");
    out
}

/// Applies one update and insists that it was accepted; returns the revision.
pub async fn apply_ok(admin: &mut AdminClient<Channel>, u: proto::Update) -> u64 {
    let r = apply_all(admin, vec![u]).await.pop().unwrap();
    assert!(r.error.is_none(), "update refused: {:?}", r.error);
    r.revision
}

pub fn authorize_req(principal: &str, action: &str, resource: &str) -> proto::AuthorizeRequest {
    proto::AuthorizeRequest {
        principal: principal.to_string(),
        action: action.to_string(),
        resource: resource.to_string(),
        ..Default::default()
    }
}

pub fn allowed(r: &proto::AuthorizeResponse) -> bool {
    r.decision == proto::Decision::Allow as i32
}

pub fn item(action: &str, resource: &str) -> proto::BatchItem {
    proto::BatchItem { action: action.to_string(), resource: resource.to_string(), ..Default::default() }
}

/// Reserves a free loopback port (bind to port 0, read it, release it).
/// Racy: another process may take the port before the server binds it. Only
/// for `--metrics-listen`, whose exporter binds its own listener and cannot
/// report the port it got; the data and admin listeners are given port 0 and
/// read back from the `serving` log line (see [`process`]).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// grpc.health.v1 Check on `service`: Ok(status as i32) or the error.
pub async fn health_check(health: &mut HealthClient<Channel>, service: &str) -> Result<i32, Status> {
    health.check(tonic_health::pb::HealthCheckRequest { service: service.to_string() }).await.map(|r| r.into_inner().status)
}

pub const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

/// A scratch directory under the system temp dir; removed at the end unless
/// the test failed (then its path is printed, for a look at the files).
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let p = std::env::temp_dir().join(format!("tagward-test-{name}-{}-{nanos}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside (not created).
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Waits for a child process to exit, at most `limit`.
pub fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One HTTP/2 connection spoken frame by frame.
pub async fn h2_connect(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

pub fn grpc_request(addr: std::net::SocketAddr, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// A gRPC message: the compression flag, the length, the protobuf bytes.
pub fn framed(msg: &impl prost::Message) -> bytes::Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend((body.len() as u32).to_be_bytes());
    out.extend(body);
    out.into()
}

/// One unary call spoken over `client` as raw HTTP/2: `body` sent in the
/// given pieces, each in a DATA frame of its own; the answer's status,
/// headers (less `date`), whole body and trailers.
pub async fn h2_unary(
    client: &h2::client::SendRequest<bytes::Bytes>,
    addr: std::net::SocketAddr,
    path: &str,
    pieces: &[&[u8]],
) -> (http::StatusCode, http::HeaderMap, Vec<u8>, Option<http::HeaderMap>) {
    let mut ready = client.clone().ready().await.unwrap();
    let (response, mut send) = ready.send_request(grpc_request(addr, path), false).unwrap();
    for (i, piece) in pieces.iter().enumerate() {
        send.send_data(bytes::Bytes::copy_from_slice(piece), i + 1 == pieces.len()).unwrap();
    }
    if pieces.is_empty() {
        send.send_data(bytes::Bytes::new(), true).unwrap();
    }
    let response = response.await.unwrap();
    let status = response.status();
    let mut headers = response.headers().clone();
    // hyper stamps each response with the time to the second; two answers
    // compared across a second's turn differ there and nowhere else.
    headers.remove(http::header::DATE);
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap();
    (status, headers, data, trailers)
}
