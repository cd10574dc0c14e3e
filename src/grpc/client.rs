//! The scenario runner's gRPC backend: `tagward test --server ADDR --admin
//! ADDR` loads each scenario's world through `Admin.Apply` and sends every
//! step over gRPC to a running sidecar.

use std::collections::BTreeMap;

use tokio::runtime::Runtime;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::dial::{ClientTls, Target};
use super::proto::admin_client::AdminClient;
use super::proto::authorizer_client::AuthorizerClient;
use super::proto::kms_client::KmsClient;
use super::proto::tagging_client::TaggingClient;
use super::proto::update::Op;
use super::{convert, error_name, proto};
use crate::engine::Reason;
use crate::scenario::{Backend, Observed, Operation};
use crate::tagging::TagOp;
use crate::world::WorldSpec;
use tagward_core::kms_ops::{AliasEntry, KmsAnswer, KmsOp, KmsRequest};

type TokenInterceptor = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;

/// A sidecar reached over gRPC.
pub struct GrpcBackend {
    runtime: Runtime,
    authorizer: AuthorizerClient<Channel>,
    tagging: TaggingClient<Channel>,
    kms: KmsClient<Channel>,
    admin: AdminClient<InterceptedService<Channel, TokenInterceptor>>,
}

/// The two addresses with the TLS settings: they apply to each TCP address;
/// a Unix socket is plaintext, and TLS settings with two Unix sockets are
/// refused (they would apply to nothing).
fn targets(server: &str, admin: &str, tls: &ClientTls) -> Result<(Target, Target), String> {
    let is_unix = |a: &str| a.starts_with("unix://");
    let none = ClientTls::default();
    let for_addr = |a: &str| if is_unix(a) && !(is_unix(server) && is_unix(admin)) { &none } else { tls };
    Ok((Target::new(server, for_addr(server))?, Target::new(admin, for_addr(admin))?))
}

fn observed_error(status: &Status) -> Observed {
    Observed::Error {
        name: error_name(status).unwrap_or_else(|| format!("{:?}", status.code())),
        message: status.message().to_string(),
    }
}

impl GrpcBackend {
    /// Connects to the data-plane and admin addresses (`HOST:PORT`,
    /// `http://`, `https://` or `unix:///PATH`), with the TLS settings on
    /// each TCP address.
    pub fn connect(server: &str, admin: &str, tls: &ClientTls, token: Option<String>) -> Result<GrpcBackend, String> {
        let (server, admin) = targets(server, admin, tls)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        let (data, admin_channel) = runtime.block_on(async {
            let data = server.connect().await?;
            let admin_channel = admin.connect().await?;
            Ok::<_, String>((data, admin_channel))
        })?;
        let header = match token {
            Some(t) => Some(
                MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| "the admin token has characters a header cannot carry".to_string())?,
            ),
            None => None,
        };
        let interceptor: TokenInterceptor = Box::new(move |mut req: Request<()>| {
            if let Some(h) = &header {
                req.metadata_mut().insert("authorization", h.clone());
            }
            Ok(req)
        });
        Ok(GrpcBackend {
            runtime,
            authorizer: AuthorizerClient::new(data.clone()),
            tagging: TaggingClient::new(data.clone()),
            kms: KmsClient::new(data),
            admin: AdminClient::with_interceptor(admin_channel, interceptor),
        })
    }

    /// Sends one admin update on its own stream and returns its answer.
    fn apply(&mut self, op: Op) -> Result<proto::ApplyResponse, Status> {
        let request = proto::ApplyRequest { id: "scenario".into(), update: Some(proto::Update { op: Some(op) }) };
        let admin = &mut self.admin;
        self.runtime.block_on(async {
            let mut responses = admin.apply(tokio_stream::iter(vec![request])).await?.into_inner();
            responses.message().await?.ok_or_else(|| Status::unavailable("the admin stream closed without an answer"))
        })
    }

    fn admin_outcome(&mut self, op: Op) -> Observed {
        match self.apply(op) {
            Ok(proto::ApplyResponse { error: Some(e), .. }) => Observed::Error { name: e.code, message: e.message },
            Ok(_) => Observed::Ok { tags: None },
            Err(status) => observed_error(&status),
        }
    }
}

impl GrpcBackend {
    /// A KMS alias or grant operation over the Kms service.
    fn kms(&mut self, req: &KmsRequest) -> Observed {
        let (principal, session_tags, context) = convert::kms_caller(req);
        let client = &mut self.kms;
        let result = self.runtime.block_on(async {
            Ok::<_, Status>(match &req.op {
                KmsOp::CreateAlias { alias, key } => {
                    client
                        .create_alias(proto::CreateAliasRequest {
                            principal,
                            session_tags,
                            context,
                            alias_name: alias.clone(),
                            target_key: key.clone(),
                        })
                        .await?;
                    KmsAnswer::Done
                }
                KmsOp::UpdateAlias { alias, key } => {
                    client
                        .update_alias(proto::UpdateAliasRequest {
                            principal,
                            session_tags,
                            context,
                            alias_name: alias.clone(),
                            target_key: key.clone(),
                        })
                        .await?;
                    KmsAnswer::Done
                }
                KmsOp::DeleteAlias { alias, region, account } => {
                    client
                        .delete_alias(proto::DeleteAliasRequest {
                            principal,
                            session_tags,
                            context,
                            alias: alias.clone(),
                            region: region.clone().unwrap_or_default(),
                            account: account.clone().unwrap_or_default(),
                        })
                        .await?;
                    KmsAnswer::Done
                }
                KmsOp::ListAliases { key } => {
                    let r = client
                        .list_aliases(proto::ListAliasesRequest {
                            principal,
                            session_tags,
                            context,
                            key: key.clone().unwrap_or_default(),
                            min_revision: 0,
                        })
                        .await?
                        .into_inner();
                    KmsAnswer::Aliases(
                        r.aliases
                            .into_iter()
                            .map(|a| AliasEntry { name: a.alias_name, arn: a.alias_arn, key: a.target_key })
                            .collect(),
                    )
                }
                KmsOp::CreateGrant { key, grant } => {
                    let r = client
                        .create_grant(proto::CreateGrantRequest {
                            principal,
                            session_tags,
                            context,
                            key: key.clone(),
                            grant: Some(convert::grant_to_proto(grant)),
                        })
                        .await?
                        .into_inner();
                    KmsAnswer::GrantCreated { grant_id: r.grant_id }
                }
                KmsOp::RetireGrant { key, grant_id } => {
                    let msg =
                        proto::GrantIdRequest { principal, session_tags, context, key: key.clone(), grant_id: grant_id.clone() };
                    client.retire_grant(msg).await?;
                    KmsAnswer::Done
                }
                KmsOp::RevokeGrant { key, grant_id } => {
                    let msg =
                        proto::GrantIdRequest { principal, session_tags, context, key: key.clone(), grant_id: grant_id.clone() };
                    client.revoke_grant(msg).await?;
                    KmsAnswer::Done
                }
                KmsOp::ListGrants { key } => {
                    let r = client
                        .list_grants(proto::ListGrantsRequest {
                            principal,
                            session_tags,
                            context,
                            key: key.clone(),
                            min_revision: 0,
                        })
                        .await?
                        .into_inner();
                    KmsAnswer::Grants(r.grants.iter().map(convert::grant_from_proto).collect())
                }
            })
        });
        match result {
            Ok(answer) => Observed::Kms(answer),
            Err(status) => observed_error(&status),
        }
    }
}

fn tag_map(tags: &[proto::Tag]) -> BTreeMap<String, String> {
    tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect()
}

impl Backend for GrpcBackend {
    fn load(&mut self, world: &WorldSpec) -> Result<(), String> {
        let world_json = serde_json::to_string(world).map_err(|e| e.to_string())?;
        match self.apply(Op::ReplaceWorld(proto::ReplaceWorld { world_json })) {
            Ok(proto::ApplyResponse { error: Some(e), .. }) => Err(format!("{}: {}", e.code, e.message)),
            Ok(_) => Ok(()),
            Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
        }
    }

    fn run(&mut self, op: &Operation) -> Observed {
        match op {
            Operation::Authorize(req) => {
                let msg = convert::request_to_proto(req);
                let client = &mut self.authorizer;
                match self.runtime.block_on(client.authorize(msg)) {
                    Ok(resp) => {
                        let r = resp.into_inner();
                        Observed::Decision {
                            allowed: r.decision == proto::Decision::Allow as i32,
                            reason: convert::reason_from_proto(r.reason).map_or("Unspecified", Reason::as_str).to_string(),
                            matched: r
                                .matched
                                .iter()
                                .map(|s| (format!("{}[{}]", s.policy, s.index), (!s.sid.is_empty()).then(|| s.sid.clone())))
                                .collect(),
                            missing: r.missing_keys,
                        }
                    }
                    Err(status) => observed_error(&status),
                }
            }
            Operation::Tag(req) => {
                let session_tags = convert::to_tags(req.session_tags.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                let context = convert::context_to_proto(&req.context);
                let client = &mut self.tagging;
                let result = self.runtime.block_on(async {
                    match &req.op {
                        TagOp::Tag(tags) => client
                            .tag_resource(proto::TagResourceRequest {
                                principal: req.principal.clone(),
                                resource: req.resource.clone(),
                                tags: convert::to_tags(tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                                session_tags,
                                context,
                            })
                            .await
                            .map(|r| r.into_inner().tags),
                        TagOp::Untag(keys) => client
                            .untag_resource(proto::UntagResourceRequest {
                                principal: req.principal.clone(),
                                resource: req.resource.clone(),
                                tag_keys: keys.clone(),
                                session_tags,
                                context,
                            })
                            .await
                            .map(|r| r.into_inner().tags),
                        TagOp::List => client
                            .list_resource_tags(proto::ListResourceTagsRequest {
                                principal: req.principal.clone(),
                                resource: req.resource.clone(),
                                session_tags,
                                context,
                                min_revision: 0,
                            })
                            .await
                            .map(|r| r.into_inner().tags),
                    }
                });
                match result {
                    Ok(tags) => Observed::Ok { tags: Some(tag_map(&tags)) },
                    Err(status) => observed_error(&status),
                }
            }
            Operation::PutPolicy { name, document } => self.admin_outcome(Op::PutPolicy(proto::PutPolicy {
                name: name.clone(),
                document: serde_json::to_string(document).unwrap_or_default(),
            })),
            Operation::DeletePolicy { name } => self.admin_outcome(Op::DeletePolicy(proto::DeletePolicy { name: name.clone() })),
            Operation::Kms(req) => self.kms(req),
        }
    }
}
