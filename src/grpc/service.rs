//! The three gRPC services: thin handlers over the [`Store`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, field, warn, Instrument, Span};

use super::auth::AdminCaller;
use super::decisions::{self, Call, DecisionCache, Reply};
use super::identity::{describe, Callers, TaggingMode};
use super::peer::Peer;
use super::proto::admin_server::Admin;
use super::proto::authorizer_server::Authorizer;
use super::proto::kms_server::Kms;
use super::proto::tagging_server::Tagging;
use super::repeat::{self, EncodedRequest};
use super::{convert, invalid, kms_status, proto, request_status, revision_status, status, tag_status, update_error};
use crate::engine::{authorize, authorize_noting_clock, ContextRules, Decision, RequestError};
use crate::observe::{self, DecisionLog};
use crate::state::State;
use crate::store::tag_refusal;
use crate::store::{Store, Ticket, UpdateError, WatchRefused};
use crate::tagging::{perform, tag_actions, TagError, TagOp, TagRequest};
use crate::world::WorldSpec;
use tagward_core::kms_ops::{KmsAnswer, KmsOp, KmsRequest};
use tagward_core::ErrorCode;

/// What every handler shares.
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<Store>,
    /// How long a request with `min_revision` may wait.
    pub min_revision_wait: Duration,
    /// Items per `BatchAuthorize`.
    pub max_batch: usize,
    /// Turns true when the server shuts down: streams end.
    pub shutdown: watch::Receiver<bool>,
    /// Where decisions are logged, when enabled.
    pub decision_log: Option<DecisionLog>,
    /// What callers may put in a request's context.
    pub context_rules: Arc<ContextRules>,
    /// Who may write through the Tagging API as which principal.
    pub callers: Arc<Callers>,
    /// How much of the Tagging API is served.
    pub tagging: TaggingMode,
    /// Batch evaluations running at once on the blocking pool (see
    /// [`AuthorizerService::batch_authorize`]).
    pub evaluations: Arc<tokio::sync::Semaphore>,
    /// The request path's metric handles.
    pub meters: Arc<observe::Meters>,
    /// Decisions already made against the current snapshot
    /// (`--decision-cache-bytes`; none when 0).
    pub decisions: Option<Arc<DecisionCache>>,
}

/// Batch evaluations at once: one fewer than the cores (at least one), so
/// that batches queue for each other and a core stays for the async
/// workers that serve everyone else.
pub fn evaluation_slots() -> Arc<tokio::sync::Semaphore> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    Arc::new(tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1)))
}

/// Runs `work` on tokio's blocking pool in the current span: work that may
/// take long (evaluating a batch, waiting for the writer lock) never runs on
/// the async workers, which serve every other caller.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    let span = Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
        .await
        .map_err(|e| Status::internal(format!("the request's task failed: {e}")))?
}

/// The codes Tagward answers with, labelled by their canonical name; any
/// other is `OTHER`, so that the label stays bounded.
const LABELLED_CODES: [Code; 10] = [
    Code::Ok,
    Code::InvalidArgument,
    Code::PermissionDenied,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::DeadlineExceeded,
    Code::Unavailable,
    Code::Unauthenticated,
    Code::OutOfRange,
    Code::ResourceExhausted,
];

/// The gRPC code as a bounded metric label, with its index among the
/// labels (`OTHER` last).
pub(super) fn code_label(code: Code) -> (usize, &'static str) {
    match LABELLED_CODES.iter().position(|c| *c == code) {
        Some(i) => (i, super::code_name(code)),
        None => (LABELLED_CODES.len(), "OTHER"),
    }
}

/// An RPC's span: the RPC, the action, and later the decision. A disabled
/// level (the default, info) makes it a no-op that records nothing.
fn rpc_span(rpc: &'static str, action: &str) -> Span {
    tracing::debug_span!("rpc", rpc = %rpc, action = %action, decision = field::Empty)
}

/// Runs a handler in its span (see [`rpc_span`]) and records its latency
/// and status code.
async fn observed<T>(
    shared: &Shared,
    rpc: &'static str,
    action: &str,
    handler: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    observed_in(shared, rpc, rpc_span(rpc, action), handler).await
}

/// [`observed`] in a span made beforehand (for a handler that takes its
/// request, action included).
async fn observed_in<T>(
    shared: &Shared,
    rpc: &'static str,
    span: Span,
    handler: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let started = Instant::now();
    let result = if span.is_disabled() { handler.await } else { handler.instrument(span.clone()).await };
    let (index, code) = code_label(result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok));
    shared.meters.rpc(rpc, started.elapsed(), index, code);
    // One line per RPC at debug level, with the span's rpc, action and
    // decision: `TAGWARD_LOG=tagward=debug`.
    if !span.is_disabled() {
        span.in_scope(|| debug!(code = %code, micros = started.elapsed().as_micros() as u64, "rpc finished"));
    }
    result
}

/// Counts a decision, notes it on the RPC's span (when spans at debug
/// level can be on at all), and logs it if enabled.
fn decided(shared: &Shared, req: &crate::engine::Request, d: &Decision, revision: u64, started: Instant) {
    shared.meters.decision(d);
    if tracing::level_enabled!(tracing::Level::DEBUG) {
        Span::current().record("decision", field::display(d.reason.as_str()));
    }
    if let Some(log) = &shared.decision_log {
        log.offer(req, d, revision, started.elapsed());
    }
}

/// Items of a `BatchAuthorize` converted and checked on the async worker;
/// a longer batch is converted, checked and decided on the blocking pool
/// (see [`AuthorizerService::batch_authorize`]).
const INLINE_BATCH_ITEMS: usize = 64;

/// How long a batch's items are decided on the async worker before the
/// rest move to the blocking pool: a small batch never pays the hop to the
/// pool, a long one (large policies) holds a worker for about this long.
const INLINE_BATCH_BUDGET: Duration = Duration::from_micros(200);

/// The items still to decide, with their index.
type Items = std::iter::Peekable<std::iter::Enumerate<std::vec::IntoIter<crate::engine::Request>>>;

/// What is left of a batch for the blocking pool.
enum Rest {
    /// Items converted, checked and partly decided on the async worker.
    Decide(Items),
    /// A long batch, not converted yet.
    Convert(proto::BatchAuthorizeRequest),
}

/// A batch's answers so far.
struct Batch {
    results: Vec<proto::AuthorizeResponse>,
    reasons: Vec<crate::engine::Reason>,
    /// Whether every answer so far may be given again (see [`Decided`]).
    repeatable: bool,
}

impl Batch {
    fn with_capacity(n: usize) -> Batch {
        Batch { results: Vec::with_capacity(n), reasons: Vec::with_capacity(n), repeatable: true }
    }
}

/// Decides `items` in order into `out` until they run out (true) or, with
/// a `budget`, until it is spent with items left (false).
fn decide_items(
    shared: &Shared,
    state: &State,
    items: &mut Items,
    explain: bool,
    started: Instant,
    budget: Option<Duration>,
    out: &mut Batch,
) -> Result<bool, Status> {
    let begun = Instant::now();
    while let Some((i, req)) = items.next() {
        // The items' contexts were checked against the server's rules when
        // they were converted.
        let d = decide(shared, state, &req, None, explain, &ContextRules::TRUSTED, started)
            .map_err(|e| invalid(&format!("items[{i}].{}", e.field), e.reason))?;
        out.results.push(d.response);
        out.reasons.push(d.reason);
        out.repeatable &= d.repeatable;
        if budget.is_some_and(|b| begun.elapsed() >= b) && items.peek().is_some() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One request's answer, as [`decide`] gives it.
struct Decided {
    response: proto::AuthorizeResponse,
    reason: crate::engine::Reason,
    /// Whether the same request may be given this answer again at this
    /// revision (the decision did not read the time, nor was it explained).
    repeatable: bool,
}

/// Decides one request against `state` and builds its response: from the
/// decision cache when this request was decided against this very
/// snapshot before, else by the engine (and then remembered, unless the
/// decision read the time). An `Authorize` call that `grpc::repeat` could
/// not answer comes with its encoded `message`: it was looked up by those
/// bytes already, and its answer is kept under them, encoded, for that
/// layer to send.
fn decide(
    shared: &Shared,
    state: &State,
    req: &crate::engine::Request,
    message: Option<&[u8]>,
    explain: bool,
    rules: &ContextRules,
    started: Instant,
) -> Result<Decided, RequestError> {
    let revision = state.revision();
    let cache = shared.decisions.as_deref().filter(|_| !explain);
    let by_message = cache.and(message).and_then(|m| decisions::message_key(Call::Authorize, m));
    let key = if by_message.is_some() { None } else { cache.and_then(|_| decisions::key(req)) };
    if let (Some(cache), Some(key)) = (cache, &key) {
        let hit = cache.get(key, revision);
        shared.meters.decision_cache(hit.is_some());
        if let Some(hit) = hit {
            if let Reply::Message { decision, response } = &hit.reply {
                decided(shared, req, decision, revision, started);
                return Ok(Decided { response: response.clone(), reason: decision.reason, repeatable: true });
            }
        }
    }
    let (decision, read_clock) = authorize_noting_clock(state, req, explain, rules)?;
    decided(shared, req, &decision, revision, started);
    let response = convert::decision(&decision, revision);
    let (reason, repeatable) = (decision.reason, !explain && !read_clock);
    if let (Some(cache), true) = (cache, repeatable) {
        if let Some(k) = &by_message {
            if let Some(frame) = repeat::framed(&response) {
                cache.put(k, revision, Reply::Encoded { reasons: Box::new([reason]), frame });
            }
        } else if let Some(k) = &key {
            cache.put(k, revision, Reply::Message { decision, response: response.clone() });
        }
    }
    Ok(Decided { response, reason, repeatable })
}

/// Keeps a whole `BatchAuthorize` answer, encoded, under the bytes of its
/// request `message` (see `grpc::repeat`); `reasons` are its items'. Only
/// for a batch whose every answer may be given again.
fn remember_batch(
    shared: &Shared,
    message: Option<&[u8]>,
    reasons: Vec<crate::engine::Reason>,
    response: &proto::BatchAuthorizeResponse,
) {
    let (Some(cache), Some(key)) =
        (shared.decisions.as_deref(), message.and_then(|m| decisions::message_key(Call::BatchAuthorize, m)))
    else {
        return;
    };
    if let Some(frame) = repeat::framed(response) {
        cache.put(&key, response.revision, Reply::Encoded { reasons: reasons.into_boxed_slice(), frame });
    }
}

impl Shared {
    async fn snapshot(&self, min_revision: u64) -> Result<Arc<State>, Status> {
        if min_revision == 0 {
            return Ok(self.store.snapshot());
        }
        self.store.snapshot_at_least(min_revision, self.min_revision_wait).await.map_err(revision_status)
    }
}

pub struct AuthorizerService(pub Shared);
pub struct TaggingService(pub Shared);
pub struct AdminService(pub Shared);
pub struct KmsService(pub Shared);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Authorizer for AuthorizerService {
    async fn authorize(&self, request: Request<proto::AuthorizeRequest>) -> Result<Response<proto::AuthorizeResponse>, Status> {
        let (_, extensions, r) = request.into_parts();
        let message = extensions.get::<EncodedRequest>().map(|m| &m.0[..]);
        let span = rpc_span("Authorize", &r.action);
        observed_in(&self.0, "Authorize", span, async {
            let started = Instant::now();
            let (req, min_revision, explain) = convert::authorize_request(r)?;
            let state = self.0.snapshot(min_revision).await?;
            // Validates the request once: its shape, and its context
            // against what this server's callers may supply (a cached
            // answer is to the same request, checked when it was decided).
            let decided =
                decide(&self.0, &state, &req, message, explain, &self.0.context_rules, started).map_err(request_status)?;
            Ok(Response::new(decided.response))
        })
        .await
    }

    async fn batch_authorize(
        &self,
        request: Request<proto::BatchAuthorizeRequest>,
    ) -> Result<Response<proto::BatchAuthorizeResponse>, Status> {
        let (_, extensions, r) = request.into_parts();
        let message = extensions.get::<EncodedRequest>().map(|m| m.0.clone());
        observed(&self.0, "BatchAuthorize", "batch", async {
            let started = Instant::now();
            let state = self.0.snapshot(r.min_revision).await?;
            let explain = r.explain;
            let revision = state.revision();
            let answer = |shared: &Shared, batch: Batch| {
                let response = proto::BatchAuthorizeResponse { results: batch.results, revision };
                if batch.repeatable {
                    remember_batch(shared, message.as_deref(), batch.reasons, &response);
                }
                Response::new(response)
            };
            // A short batch is converted and decided here, on the async
            // worker, for as long as the budget lasts; a long one (many
            // items, or items against large policies) goes on, or is done
            // entirely, off the async workers, a bounded number at once.
            let (rest, mut batch) = if r.items.len() <= INLINE_BATCH_ITEMS {
                let reqs = convert::batch_requests(r, self.0.max_batch, &self.0.context_rules)?;
                let mut batch = Batch::with_capacity(reqs.len());
                let mut items = reqs.into_iter().enumerate().peekable();
                if decide_items(&self.0, &state, &mut items, explain, started, Some(INLINE_BATCH_BUDGET), &mut batch)? {
                    return Ok(answer(&self.0, batch));
                }
                (Rest::Decide(items), batch)
            } else {
                (Rest::Convert(r), Batch::with_capacity(0))
            };
            let _slot = self.0.evaluations.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
            let shared = self.0.clone();
            let decided = blocking(move || {
                let mut items = match rest {
                    Rest::Decide(items) => items,
                    Rest::Convert(r) => {
                        let reqs = convert::batch_requests(r, shared.max_batch, &shared.context_rules)?;
                        batch.results.reserve(reqs.len());
                        batch.reasons.reserve(reqs.len());
                        reqs.into_iter().enumerate().peekable()
                    }
                };
                decide_items(&shared, &state, &mut items, explain, started, None, &mut batch)?;
                Ok(batch)
            })
            .await?;
            Ok(answer(&self.0, decided))
        })
        .await
    }
}

fn tags_of(tags: &crate::tags::TagSet) -> Vec<proto::Tag> {
    convert::to_tags(tags.iter())
}

/// The caller's connection: the transport's [`Peer`], else the TCP address
/// tonic recorded, else none (an unknown address).
fn peer_of<T>(request: &Request<T>) -> Option<Peer> {
    Peer::of(request).cloned().or_else(|| request.remote_addr().map(|addr| Peer::Tcp { addr }))
}

/// The action a tag operation is authorized as (`kms:TagResource`).
fn tag_action(req: &TagRequest) -> String {
    let i = match req.op {
        TagOp::Tag(_) => 0,
        TagOp::Untag(_) => 1,
        TagOp::List => 2,
    };
    tag_actions(&req.resource).map_or_else(
        || format!("{}:{}", crate::arn::Arn::parse(&req.resource).map_or("unknown", |a| a.service), req.op.name()),
        |a| a[i].clone(),
    )
}

impl TaggingService {
    /// A Tagging write: converting a large request and waiting for the
    /// writer lock happen off the async workers; a fleet store commits
    /// through etcd afterwards, without holding a worker either.
    async fn write<T: Send + Sync + 'static>(
        &self,
        request: Request<T>,
        convert: fn(&T, &ContextRules) -> Result<TagRequest, Status>,
    ) -> Result<crate::store::Tagged, Status> {
        let peer = peer_of(&request);
        let this = TaggingService(self.0.clone());
        let shared = self.0.store.is_shared();
        let (req, local) = blocking(move || {
            let req = convert(request.get_ref(), &this.0.context_rules)?;
            this.may_write(peer.as_ref(), &req)?;
            let local = if shared { None } else { Some(this.0.store.tag(&req).map_err(tag_status)?) };
            Ok((req, local))
        })
        .await?;
        match local {
            Some((done, ticket)) => {
                ticket.durable().await.map_err(|e| tag_status(TagError::Unavailable(e.to_string())))?;
                Ok(done)
            }
            None => self.0.store.tag_acked(&req).await.map_err(tag_status),
        }
    }
}

impl TaggingService {
    /// A Tagging write goes ahead only when it is served and its caller
    /// may act as the principal it names; a caller refused is audited.
    fn may_write(&self, peer: Option<&Peer>, req: &TagRequest) -> Result<(), Status> {
        if self.0.tagging != TaggingMode::On {
            return Err(Status::unimplemented(format!("{}: Tagging writes are not served (--tagging read-only)", req.op.name())));
        }
        let Err(refused) = self.0.callers.check(peer, &req.principal) else { return Ok(()) };
        let message = refused.to_string();
        let caller = peer.map_or_else(|| refused.caller.clone(), describe);
        let store = &self.0.store;
        let code = ErrorCode::CallerNotAllowed.as_str();
        store.audit_refusal(tag_refusal(req, &tag_action(req), Some(caller.clone()), store.revision(), code, message.clone()));
        let meta = std::collections::HashMap::from([
            ("field".to_string(), "principal".to_string()),
            ("caller".to_string(), caller),
            ("principal".to_string(), req.principal.clone()),
        ]);
        Err(status(Code::PermissionDenied, code, message, meta))
    }
}

impl KmsService {
    /// A KMS write goes ahead on the Tagging service's terms: served only
    /// with `--tagging on`, and only when the caller may act as the
    /// principal it names (the identity map); a caller refused is audited.
    fn may_write(&self, peer: Option<&Peer>, req: &KmsRequest) -> Result<(), Status> {
        if self.0.tagging != TaggingMode::On {
            return Err(Status::unimplemented(format!("{}: KMS writes are not served (--tagging read-only)", req.op.name())));
        }
        let Err(refused) = self.0.callers.check(peer, &req.principal) else { return Ok(()) };
        let message = refused.to_string();
        let caller = peer.map_or_else(|| refused.caller.clone(), describe);
        let store = &self.0.store;
        let code = ErrorCode::CallerNotAllowed.as_str();
        let resource = match &req.op {
            KmsOp::CreateAlias { key, .. }
            | KmsOp::UpdateAlias { key, .. }
            | KmsOp::CreateGrant { key, .. }
            | KmsOp::RetireGrant { key, .. }
            | KmsOp::RevokeGrant { key, .. }
            | KmsOp::ListGrants { key } => key.clone(),
            KmsOp::DeleteAlias { alias, .. } => alias.clone(),
            KmsOp::ListAliases { .. } => "*".to_string(),
        };
        store.audit_refusal(crate::store::kms_refusal(
            req,
            &resource,
            Some(caller.clone()),
            store.revision(),
            code,
            message.clone(),
        ));
        let meta = std::collections::HashMap::from([
            ("field".to_string(), "principal".to_string()),
            ("caller".to_string(), caller),
            ("principal".to_string(), req.principal.clone()),
        ]);
        Err(status(Code::PermissionDenied, code, message, meta))
    }

    /// Performs a write: checks the caller, applies it, waits until it is
    /// durable, and answers the revision.
    async fn write(&self, peer: Option<Peer>, req: KmsRequest) -> Result<(crate::store::KmsDone, u64), Status> {
        self.may_write(peer.as_ref(), &req)?;
        let done = self.0.store.kms_acked(&req).await.map_err(kms_status)?;
        Span::current().record("decision", field::display(done.outcome.decision.reason.as_str()));
        let revision = done.revision;
        Ok((done, revision))
    }

    /// Performs a list on a snapshot at `min_revision` or later.
    async fn read(&self, req: KmsRequest, min_revision: u64) -> Result<(KmsAnswer, u64), Status> {
        let state = self.0.snapshot(min_revision).await?;
        let outcome = tagward_core::kms_ops::perform(&state, &req).map_err(kms_status)?;
        Ok((outcome.answer, state.revision()))
    }
}

fn kms_written(done: &crate::store::KmsDone) -> proto::KmsWriteResponse {
    proto::KmsWriteResponse { revision: done.revision, changed: done.changed }
}

#[tonic::async_trait]
impl Kms for KmsService {
    async fn create_alias(
        &self,
        request: Request<proto::CreateAliasRequest>,
    ) -> Result<Response<proto::KmsWriteResponse>, Status> {
        observed(&self.0, "CreateAlias", "kms:CreateAlias", async {
            let r = request.get_ref();
            let op = KmsOp::CreateAlias { alias: r.alias_name.clone(), key: r.target_key.clone() };
            let req = convert::kms_request(&r.principal, &r.session_tags, &r.context, &self.0.context_rules, op)?;
            let (done, _) = self.write(peer_of(&request), req).await?;
            Ok(Response::new(kms_written(&done)))
        })
        .await
    }

    async fn update_alias(
        &self,
        request: Request<proto::UpdateAliasRequest>,
    ) -> Result<Response<proto::KmsWriteResponse>, Status> {
        observed(&self.0, "UpdateAlias", "kms:UpdateAlias", async {
            let r = request.get_ref();
            let op = KmsOp::UpdateAlias { alias: r.alias_name.clone(), key: r.target_key.clone() };
            let req = convert::kms_request(&r.principal, &r.session_tags, &r.context, &self.0.context_rules, op)?;
            let (done, _) = self.write(peer_of(&request), req).await?;
            Ok(Response::new(kms_written(&done)))
        })
        .await
    }

    async fn delete_alias(
        &self,
        request: Request<proto::DeleteAliasRequest>,
    ) -> Result<Response<proto::KmsWriteResponse>, Status> {
        observed(&self.0, "DeleteAlias", "kms:DeleteAlias", async {
            let r = request.get_ref();
            let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
            let op = KmsOp::DeleteAlias { alias: r.alias.clone(), region: opt(&r.region), account: opt(&r.account) };
            let req = convert::kms_request(&r.principal, &r.session_tags, &r.context, &self.0.context_rules, op)?;
            let (done, _) = self.write(peer_of(&request), req).await?;
            Ok(Response::new(kms_written(&done)))
        })
        .await
    }

    async fn list_aliases(
        &self,
        request: Request<proto::ListAliasesRequest>,
    ) -> Result<Response<proto::ListAliasesResponse>, Status> {
        observed(&self.0, "ListAliases", "kms:ListAliases", async {
            let r = request.get_ref();
            let op = KmsOp::ListAliases { key: (!r.key.is_empty()).then(|| r.key.clone()) };
            let req = convert::kms_request(&r.principal, &r.session_tags, &r.context, &self.0.context_rules, op)?;
            let (answer, revision) = self.read(req, r.min_revision).await?;
            let aliases = match answer {
                KmsAnswer::Aliases(list) => list
                    .into_iter()
                    .map(|a| proto::AliasEntry { alias_name: a.name, alias_arn: a.arn, target_key: a.key })
                    .collect(),
                _ => Vec::new(),
            };
            Ok(Response::new(proto::ListAliasesResponse { aliases, revision }))
        })
        .await
    }

    async fn create_grant(
        &self,
        request: Request<proto::CreateGrantRequest>,
    ) -> Result<Response<proto::CreateGrantResponse>, Status> {
        observed(&self.0, "CreateGrant", "kms:CreateGrant", async {
            let r = request.get_ref();
            let grant = r.grant.as_ref().map(convert::grant_from_proto).ok_or_else(|| invalid("grant", "required"))?;
            let op = KmsOp::CreateGrant { key: r.key.clone(), grant };
            let req = convert::kms_request(&r.principal, &r.session_tags, &r.context, &self.0.context_rules, op)?;
            let (done, revision) = self.write(peer_of(&request), req).await?;
            let grant_id = match done.outcome.answer {
                KmsAnswer::GrantCreated { grant_id } => grant_id,
                _ => String::new(),
            };
            Ok(Response::new(proto::CreateGrantResponse { grant_id, revision }))
        })
        .await
    }

    async fn retire_grant(&self, request: Request<proto::GrantIdRequest>) -> Result<Response<proto::KmsWriteResponse>, Status> {
        observed(&self.0, "RetireGrant", "kms:RetireGrant", async {
            let r = request.get_ref();
            let op = KmsOp::RetireGrant { key: r.key.clone(), grant_id: r.grant_id.clone() };
            let req = convert::kms_request(&r.principal, &r.session_tags, &r.context, &self.0.context_rules, op)?;
            let (done, _) = self.write(peer_of(&request), req).await?;
            Ok(Response::new(kms_written(&done)))
        })
        .await
    }

    async fn revoke_grant(&self, request: Request<proto::GrantIdRequest>) -> Result<Response<proto::KmsWriteResponse>, Status> {
        observed(&self.0, "RevokeGrant", "kms:RevokeGrant", async {
            let r = request.get_ref();
            let op = KmsOp::RevokeGrant { key: r.key.clone(), grant_id: r.grant_id.clone() };
            let req = convert::kms_request(&r.principal, &r.session_tags, &r.context, &self.0.context_rules, op)?;
            let (done, _) = self.write(peer_of(&request), req).await?;
            Ok(Response::new(kms_written(&done)))
        })
        .await
    }

    async fn list_grants(
        &self,
        request: Request<proto::ListGrantsRequest>,
    ) -> Result<Response<proto::ListGrantsResponse>, Status> {
        observed(&self.0, "ListGrants", "kms:ListGrants", async {
            let r = request.get_ref();
            let op = KmsOp::ListGrants { key: r.key.clone() };
            let req = convert::kms_request(&r.principal, &r.session_tags, &r.context, &self.0.context_rules, op)?;
            let (answer, revision) = self.read(req, r.min_revision).await?;
            let grants = match answer {
                KmsAnswer::Grants(list) => list.iter().map(convert::grant_to_proto).collect(),
                _ => Vec::new(),
            };
            Ok(Response::new(proto::ListGrantsResponse { grants, revision }))
        })
        .await
    }
}

#[tonic::async_trait]
impl Tagging for TaggingService {
    async fn tag_resource(
        &self,
        request: Request<proto::TagResourceRequest>,
    ) -> Result<Response<proto::TagResourceResponse>, Status> {
        observed(&self.0, "TagResource", "TagResource", async {
            let done = self.write(request, convert::tag_resource).await?;
            Span::current().record("decision", field::display(done.outcome.decision.reason.as_str()));
            Ok(Response::new(proto::TagResourceResponse {
                revision: done.revision,
                tags: tags_of(&done.outcome.tags),
                changed: done.changed,
            }))
        })
        .await
    }

    async fn untag_resource(
        &self,
        request: Request<proto::UntagResourceRequest>,
    ) -> Result<Response<proto::UntagResourceResponse>, Status> {
        observed(&self.0, "UntagResource", "UntagResource", async {
            let done = self.write(request, convert::untag_resource).await?;
            Span::current().record("decision", field::display(done.outcome.decision.reason.as_str()));
            Ok(Response::new(proto::UntagResourceResponse {
                revision: done.revision,
                tags: tags_of(&done.outcome.tags),
                changed: done.changed,
            }))
        })
        .await
    }

    async fn list_resource_tags(
        &self,
        request: Request<proto::ListResourceTagsRequest>,
    ) -> Result<Response<proto::ListResourceTagsResponse>, Status> {
        let r = request.get_ref();
        observed(&self.0, "ListResourceTags", "ListResourceTags", async {
            let req = convert::list_resource_tags(r, &self.0.context_rules)?;
            let state = self.0.snapshot(r.min_revision).await?;
            let outcome = perform(&state, &req).map_err(tag_status)?;
            Ok(Response::new(proto::ListResourceTagsResponse { tags: tags_of(&outcome.tags), revision: state.revision() }))
        })
        .await
    }

    async fn get_resources(
        &self,
        request: Request<proto::GetResourcesRequest>,
    ) -> Result<Response<proto::GetResourcesResponse>, Status> {
        observed(&self.0, "GetResources", "tag:GetResources", self.get_resources_inner(request.get_ref())).await
    }
}

impl TaggingService {
    async fn get_resources_inner(&self, r: &proto::GetResourcesRequest) -> Result<Response<proto::GetResourcesResponse>, Status> {
        const DEFAULT_PAGE: usize = 100;
        const MAX_PAGE: usize = 1000;
        let auth = convert::get_resources(r, &self.0.context_rules)?;
        if r.tag_filters.is_empty() {
            return Err(invalid("tag_filters", "at least one filter is needed"));
        }
        for (i, f) in r.tag_filters.iter().enumerate() {
            if f.key.is_empty() {
                return Err(invalid(&format!("tag_filters[{i}].key"), "required"));
            }
        }
        let page = match r.page_size as usize {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => return Err(invalid("page_size", format!("{n}; at most {MAX_PAGE}"))),
            n => n,
        };
        let after = match r.page_token.as_str() {
            "" => None,
            token => Some(
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(token)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| invalid("page_token", "not a token from a previous response"))?,
            ),
        };
        let state = self.0.snapshot(r.min_revision).await?;
        let decision = authorize(&state, &auth, false).map_err(request_status)?;
        if !decision.allowed() {
            return Err(tag_status(TagError::AccessDenied {
                principal: auth.principal,
                action: auth.action,
                resource: auth.resource,
                decision: Box::new(decision),
            }));
        }
        let filters: Vec<(String, Vec<String>)> = r.tag_filters.iter().map(|f| (f.key.clone(), f.values.clone())).collect();
        let (arns, more) = state.find_by_tags(&filters, after.as_deref(), page);
        let next_page_token = match (more, arns.last()) {
            (true, Some(last)) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last.as_bytes()),
            _ => String::new(),
        };
        let resources = arns
            .iter()
            .map(|arn| proto::ResourceTags {
                resource: arn.to_string(),
                tags: state.target(arn).map(|t| tags_of(t.tags())).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(proto::GetResourcesResponse { resources, next_page_token, revision: state.revision() }))
    }
}

/// Applies one update from the stream; the ticket (or the refusal) goes to
/// the task that acknowledges in order.
/// `actor` is the authenticated admin caller's name, the change's actor.
fn accept_one(store: &Store, req: &proto::ApplyRequest, actor: &str) -> Result<Ticket, UpdateError> {
    let converted = match &req.update {
        None => Err(UpdateError { code: ErrorCode::Validation, message: "required".into() }),
        Some(u) => convert::update(u, ""),
    };
    let result = match converted {
        // Store::apply counts what reaches it; refusals before it count here.
        Ok(update) => store.apply(&update, actor),
        Err(e) => {
            observe::admin_update(Some(e.code));
            store.audit_refusal(crate::audit::Refusal {
                time_unix_ms: crate::change::now_ms(),
                actor: actor.to_string(),
                caller: None,
                revision: store.revision(),
                what: crate::audit::Refused::Update { update: "update".to_string() },
                error_code: e.code.as_str().to_string(),
                error_message: e.message.clone(),
            });
            Err(e)
        }
    };
    // Every message is a path inside the update, then the reason.
    result.map_err(|mut e| {
        e.message =
            if e.message.starts_with("required") { format!("update: {}", e.message) } else { format!("update.{}", e.message) };
        e
    })
}

/// An update from the stream as accepted: a ticket to wait for (a local
/// store), or the answer already (a fleet store).
enum Accepted {
    Ticket(Result<Ticket, UpdateError>),
    Done(Result<u64, UpdateError>),
}

/// A fleet store's update from the stream: converted, committed through
/// etcd and held here; errors name the path inside the update.
async fn accept_shared(store: &Store, req: &proto::ApplyRequest, actor: &str) -> Result<u64, UpdateError> {
    let converted = match &req.update {
        None => Err(UpdateError { code: ErrorCode::Validation, message: "required".into() }),
        Some(u) => convert::update(u, ""),
    };
    let result = match converted {
        Ok(update) => store.apply_acked(&update, actor).await,
        Err(e) => {
            observe::admin_update(Some(e.code));
            Err(e)
        }
    };
    result.map_err(|mut e| {
        e.message =
            if e.message.starts_with("required") { format!("update: {}", e.message) } else { format!("update.{}", e.message) };
        e
    })
}

type ApplyStream = Acks;

/// Answers that go out together at most: about 2 KiB of acknowledgements.
const MAX_ACK_BATCH: usize = 64;

/// How long answers ready to go wait for the next one while the reader is
/// still handling it.
const ACK_BATCH_WAIT: Duration = Duration::from_millis(2);

/// An update's answer once its change is durable (or refused).
async fn answer(store: &Store, id: String, accepted: Accepted) -> proto::ApplyResponse {
    let result = match accepted {
        Accepted::Ticket(result) => result,
        Accepted::Done(Ok(revision)) => return proto::ApplyResponse { id, revision, error: None },
        Accepted::Done(Err(e)) => Err(e),
    };
    match result {
        Ok(ticket) => match ticket.durable().await {
            Ok(revision) => proto::ApplyResponse { id, revision, error: None },
            Err(e) => proto::ApplyResponse {
                id,
                revision: store.revision(),
                error: Some(proto::UpdateError { code: ErrorCode::StorageFailed.to_string(), message: e.to_string() }),
            },
        },
        Err(e) => {
            debug!(id = %id, code = e.code.as_str(), "admin update refused");
            proto::ApplyResponse { id, revision: store.revision(), error: Some(update_error(e)) }
        }
    }
}

/// `Admin.Apply`'s answers, handed over in batches: tonic encodes every
/// answer a stream has ready into one chunk (one DATA frame where the
/// window allows), so a producer that sends many small updates before
/// reading gets its acknowledgements in frames of several hundred bytes
/// rather than one tiny frame each. h2 on the client counts unread DATA
/// frames under 256 bytes against half its connection window and closes
/// the connection (`GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames"`) when
/// they exceed it.
pub struct Acks {
    rx: mpsc::Receiver<Result<Vec<proto::ApplyResponse>, Status>>,
    ready: std::vec::IntoIter<proto::ApplyResponse>,
}

impl Stream for Acks {
    type Item = Result<proto::ApplyResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        loop {
            if let Some(ack) = self.ready.next() {
                return Poll::Ready(Some(Ok(ack)));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(batch))) => self.ready = batch.into_iter(),
                Poll::Ready(Some(Err(status))) => return Poll::Ready(Some(Err(status))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
type WatchStream = ReceiverStream<Result<proto::WatchEvent, Status>>;

/// The admin RPCs are observed like the others (counted, timed until the
/// stream is set up, one debug line each).
#[tonic::async_trait]
impl Admin for AdminService {
    type ApplyStream = ApplyStream;
    type ExportStream = BoxStream<proto::ExportItem>;
    type WatchStream = WatchStream;

    async fn apply(&self, request: Request<Streaming<proto::ApplyRequest>>) -> Result<Response<ApplyStream>, Status> {
        observed(&self.0, "Apply", "admin:Apply", self.apply_stream(request)).await
    }

    async fn export(&self, _request: Request<proto::ExportRequest>) -> Result<Response<Self::ExportStream>, Status> {
        observed(&self.0, "Export", "admin:Export", self.export_stream()).await
    }

    async fn watch(&self, request: Request<proto::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        observed(&self.0, "Watch", "admin:Watch", self.watch_stream(request)).await
    }
}

impl AdminService {
    async fn apply_stream(&self, request: Request<Streaming<proto::ApplyRequest>>) -> Result<Response<ApplyStream>, Status> {
        let caller = AdminCaller::of(&request)?;
        caller.require_writer("Admin.Apply")?;
        let actor = caller.name;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        // Accepted updates wait here for their durability, in order: the
        // reader keeps accepting meanwhile, so one sync covers many updates.
        let (accepted_tx, mut accepted) = mpsc::channel::<Result<(String, Accepted), Status>>(1024);
        let store = self.0.store.clone();
        let mut shutdown = self.0.shutdown.clone();
        // Whether the reader holds an update it has not handed on yet: the
        // acknowledger then waits a little for it, to send both together.
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reading = busy.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = inbound.message() => Some(next),
                    _ = shutdown.wait_for(|down| *down) => None,
                };
                let Some(next) = next else {
                    // Every update read so far is answered first; the stream
                    // then ends UNAVAILABLE, never OK, since the client may
                    // have sent updates that were not read.
                    let _ = accepted_tx
                        .send(Err(Status::unavailable(
                            "the sidecar is shutting down: updates after the last one answered on this stream were not read; send them again",
                        )))
                        .await;
                    break;
                };
                match next {
                    // A fleet store commits each update through etcd and
                    // answers it once this sidecar holds it, in order.
                    Ok(Some(req)) if store.is_shared() => {
                        reading.store(true, std::sync::atomic::Ordering::SeqCst);
                        let id = req.id.clone();
                        let result = Accepted::Done(accept_shared(&store, &req, &actor).await);
                        let sent = accepted_tx.send(Ok((id, result))).await;
                        reading.store(false, std::sync::atomic::Ordering::SeqCst);
                        if sent.is_err() {
                            break;
                        }
                    }
                    Ok(Some(req)) => {
                        reading.store(true, std::sync::atomic::Ordering::SeqCst);
                        let store = store.clone();
                        let actor = actor.clone();
                        // Compiling a large world is CPU work: keep it off the
                        // async workers.
                        let id = req.id.clone();
                        let result =
                            tokio::task::spawn_blocking(move || accept_one(&store, &req, &actor)).await.unwrap_or_else(|e| {
                                Err(UpdateError { code: ErrorCode::Internal, message: format!("the update task failed: {e}") })
                            });
                        let sent = accepted_tx.send(Ok((id, Accepted::Ticket(result)))).await;
                        reading.store(false, std::sync::atomic::Ordering::SeqCst);
                        if sent.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        // After the acks of what came before it.
                        warn!(code = ?status.code(), "admin stream ended with an error");
                        let _ = accepted_tx.send(Err(status)).await;
                        break;
                    }
                }
            }
        });
        let store = self.0.store.clone();
        tokio::spawn(async move {
            while let Some(first) = accepted.recv().await {
                // The answers of every update already read go out together,
                // so that they share DATA frames (see `Acks`).
                let mut batch = Vec::new();
                let mut next = Some(first);
                loop {
                    let item = match next.take().or_else(|| accepted.try_recv().ok()) {
                        Some(item) => item,
                        // More is coming (the reader holds an update, or the
                        // channel was just refilled): wait a moment for it
                        // rather than send a lone small frame.
                        None if batch.len() < MAX_ACK_BATCH && busy.load(std::sync::atomic::Ordering::SeqCst) => {
                            match tokio::time::timeout(ACK_BATCH_WAIT, accepted.recv()).await {
                                Ok(Some(item)) => item,
                                Ok(None) | Err(_) => break,
                            }
                        }
                        None => break,
                    };
                    match item {
                        Ok((id, result)) => batch.push(answer(&store, id, result).await),
                        Err(status) => {
                            let _ = tx.send(Ok(batch)).await;
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    }
                    if batch.len() >= MAX_ACK_BATCH {
                        break;
                    }
                }
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Acks { rx, ready: Vec::new().into_iter() }))
    }

    async fn export_stream(&self) -> Result<Response<BoxStream<proto::ExportItem>>, Status> {
        let state = self.0.store.snapshot();
        let items = tokio::task::spawn_blocking(move || convert::export(&WorldSpec::from_state(&state), state.revision()))
            .await
            .map_err(|e| Status::internal(format!("export failed: {e}")))?;
        Ok(Response::new(Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))))
    }

    async fn watch_stream(&self, request: Request<proto::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let from = request.get_ref().from_revision;
        let watched = self.0.store.watch_all(from).await.map_err(|e| match e {
            WatchRefused::Unavailable { .. } => Status::unavailable(e.to_string()),
            _ => status(Code::OutOfRange, ErrorCode::RevisionGone.as_str(), e.to_string(), Default::default()),
        })?;
        let (older, backlog, mut live) = (watched.older, watched.kept, watched.live);
        let (tx, rx) = mpsc::channel(256);
        let mut shutdown = self.0.shutdown.clone();
        tokio::spawn(async move {
            let _open = observe::WatchStreamGauge::open();
            // A fleet sidecar's older events, from etcd's history first.
            if let Some(mut older) = older {
                loop {
                    let next = tokio::select! {
                        next = older.recv() => next,
                        _ = shutdown.wait_for(|down| *down) => return,
                        _ = tx.closed() => return,
                    };
                    let sent = match next {
                        None => break,
                        Some(Ok(e)) => tx.send(Ok(convert::event(&e))).await,
                        Some(Err(reason)) => {
                            let _ = tx.send(Err(Status::unavailable(reason))).await;
                            return;
                        }
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            }
            for e in backlog {
                if tx.send(Ok(convert::event(&e))).await.is_err() {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    next = live.recv() => next,
                    _ = shutdown.wait_for(|down| *down) => return,
                    // A caller that went away frees its stream now, not at
                    // the next change (an idle sidecar may see none for hours).
                    _ = tx.closed() => return,
                };
                match next {
                    // Asked for events after a revision not reached yet: the
                    // ones up to it are not after it.
                    Ok(e) if e.revision <= from => {}
                    Ok(e) => {
                        if tx.send(Ok(convert::event(&e))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "a watcher fell behind");
                        let _ = tx
                            .send(Err(Status::aborted(format!(
                                "this watcher fell behind and missed {n} events; watch again from the last revision it received"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
