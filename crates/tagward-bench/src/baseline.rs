//! The bench-only baseline: `tagward.v1.Authorizer` with empty handlers.
//!
//! It speaks exactly the same service, methods and messages as the real
//! Authorizer (a client, ghz or `tagward-bench load` cannot tell them apart by
//! the wire), decodes the request the same way and answers a fixed
//! `ALLOW`/`ALLOWED` response (one per item for `BatchAuthorize`) without
//! looking at it. The server is built like the real data plane (the same
//! accept loop and connection wrapper, tonic and HTTP/2 settings, request
//! timeout, message limits and reflection as `tagward serve`'s defaults),
//! so a throughput or CPU ratio Authorize / baseline measured by the same
//! load generator in one run shows what Tagward's handler adds over gRPC
//! itself.
//!
//! Run it with `tagward-bench baseline-server`; never in production.

use std::future::Future;
use std::net::SocketAddr;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use tagward::grpc::proto;
use tagward::grpc::proto::authorizer_server::{Authorizer, AuthorizerServer};
use tagward::grpc::server::{builder, reflection, Limits};
use tagward::grpc::transport::{self, ListenAddr};

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
    accept: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Baseline {
    /// Stops accepting and waits for the server to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.accept.await;
        let _ = self.task.await;
    }

    /// Serves until `signal` completes.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }
}

/// Binds `addr` and serves the empty Authorizer (plus reflection, so ghz
/// needs no `.proto` for it either) on exactly the transport `tagward
/// serve` uses with its default limits: the same accept loop and
/// connection wrapper (connection limit, idle timeout, `TCP_NODELAY`), the
/// same HTTP/2 settings (windows, header list size, concurrent streams,
/// keepalive) and the same request timeout.
pub async fn start(addr: SocketAddr, max_message_bytes: usize) -> Result<Baseline, String> {
    let limits = Limits::default();
    let (bound, addr) = transport::bind(&ListenAddr::Tcp(addr)).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let addr = addr.tcp().ok_or("the baseline listens on TCP")?;
    let (reflection, reflection_alpha) = reflection(&["tagward.v1.Authorizer"]).map_err(|e| e.to_string())?;
    let service = AuthorizerServer::new(EmptyAuthorizer)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let (stop, stopped) = watch::channel(false);
    let (incoming, accept) = transport::incoming("baseline", bound, None, limits.connections, stopped.clone());
    let mut stopped = stopped;
    let task = tokio::spawn(
        builder(&limits).add_service(reflection).add_service(reflection_alpha).add_service(service).serve_with_incoming_shutdown(
            incoming,
            async move {
                let _ = stopped.wait_for(|down| *down).await;
            },
        ),
    );
    Ok(Baseline { addr, task, accept, stop })
}
