//! The bench-only baseline: `tagward.v1.Authorizer` with empty handlers.
//!
//! It speaks exactly the same service, methods and messages as the real
//! Authorizer (a client, ghz or `tagward-bench load` cannot tell them apart by
//! the wire), decodes the request the same way and answers a fixed
//! `ALLOW`/`ALLOWED` response (one per item for `BatchAuthorize`) without
//! looking at it. The server is built like the real data plane (the same
//! tonic settings, `TCP_NODELAY`, message limits, reflection), so a
//! throughput ratio Authorize / baseline measured by the same load
//! generator in one run shows what Tagward adds over gRPC itself.
//!
//! Run it with `tagward-bench baseline-server`; never in production.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use tagward::grpc::proto;
use tagward::grpc::proto::authorizer_server::{Authorizer, AuthorizerServer};
use tagward::grpc::server::reflection;

/// The empty Authorizer.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmptyAuthorizer;

fn fixed() -> proto::AuthorizeResponse {
    proto::AuthorizeResponse {
        decision: proto::Decision::Allow as i32,
        reason: proto::Reason::Allowed as i32,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Authorizer for EmptyAuthorizer {
    async fn authorize(&self, _request: Request<proto::AuthorizeRequest>) -> Result<Response<proto::AuthorizeResponse>, Status> {
        Ok(Response::new(fixed()))
    }

    async fn batch_authorize(
        &self,
        request: Request<proto::BatchAuthorizeRequest>,
    ) -> Result<Response<proto::BatchAuthorizeResponse>, Status> {
        let results = request.get_ref().items.iter().map(|_| fixed()).collect();
        Ok(Response::new(proto::BatchAuthorizeResponse { results, revision: 0 }))
    }
}

/// A running baseline server.
pub struct Baseline {
    pub addr: SocketAddr,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Baseline {
    /// Stops accepting and waits for the server to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }

    /// Serves until `signal` completes.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }
}

/// Binds `addr` and serves the empty Authorizer (plus reflection, so ghz
/// needs no `.proto` for it either).
pub async fn start(addr: SocketAddr, max_message_bytes: usize) -> Result<Baseline, String> {
    let listener = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (reflection, reflection_alpha) = reflection(&["tagward.v1.Authorizer"]).map_err(|e| e.to_string())?;
    let service = AuthorizerServer::new(EmptyAuthorizer)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
                let _ = stopped.await;
            }),
    );
    Ok(Baseline { addr, task, stop })
}
