//! Conversions between the protobuf messages and the domain types, with the
//! field checks the wire form needs (the domain checks the rest).

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use tonic::Status;

use super::{invalid, proto};
use crate::engine::{ContextRules, ContextValue, Decision, Reason, Request};
use crate::policy::Effect;
use crate::store::{Event, EventKind, Update, UpdateError};
use crate::tagging::{TagOp, TagRequest};
use crate::world::{ConstraintSpec, GrantSpec, PrincipalSpec, ResourceSpec, WorldSpec};
use tagward_core::chain::{EndpointSpec, OrganizationSpec, SessionSpec};
use tagward_core::kms_ops::{KmsOp, KmsRequest};
use tagward_core::ErrorCode;

/// The longest string a request field may hold (a principal, action or
/// resource, a tag key or value, a context value or list element), in bytes.
/// Checked before any other work on the request, so that one caller cannot
/// make matching or hashing take long.
pub const MAX_FIELD_BYTES: usize = 16 * 1024;

/// The most entries a list in one request may hold (request tags, tag keys,
/// session tags, a context key's values, the tags of a tag or untag request,
/// and of an admin `set_tags`, `remove_tags` or entity put).
pub const MAX_LIST_ITEMS: usize = 1000;

/// Refuses a list over [`MAX_LIST_ITEMS`].
fn list_limit(field: &str, len: usize) -> Result<(), Status> {
    if len > MAX_LIST_ITEMS {
        return Err(invalid(field, format!("{len} entries; at most {MAX_LIST_ITEMS} are allowed in one request")));
    }
    Ok(())
}

/// Refuses a string over [`MAX_FIELD_BYTES`].
fn text_limit(field: &str, text: &str) -> Result<(), Status> {
    if text.len() > MAX_FIELD_BYTES {
        return Err(invalid(field, format!("{} bytes; at most {MAX_FIELD_BYTES} are allowed", text.len())));
    }
    Ok(())
}

/// Refuses a list of tags over the limits (count, then each key and value).
fn tags_limit(field: &str, tags: &[proto::Tag]) -> Result<(), Status> {
    list_limit(field, tags.len())?;
    for (i, t) in tags.iter().enumerate() {
        text_limit(&format!("{field}[{i}].key"), &t.key)?;
        text_limit(&format!("{field}[{i}].value"), &t.value)?;
    }
    Ok(())
}

/// Refuses a list of strings over the limits.
fn strings_limit(field: &str, values: &[String]) -> Result<(), Status> {
    list_limit(field, values.len())?;
    for (i, v) in values.iter().enumerate() {
        text_limit(&format!("{field}[{i}]"), v)?;
    }
    Ok(())
}

/// The limits as an admin update's error (a `Validation` refusal).
fn update_limit(check: Result<(), Status>) -> Result<(), UpdateError> {
    check.map_err(|s| bad(s.message().to_string()))
}

pub fn pairs(tags: &[proto::Tag]) -> Vec<(String, String)> {
    tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect()
}

pub fn to_tags<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<proto::Tag> {
    pairs.into_iter().map(|(k, v)| proto::Tag { key: k.to_string(), value: v.to_string() }).collect()
}

/// Request or session tags: keys must be unique (exactly; case is the
/// engine's business).
fn unique_tags(field: &str, tags: &[proto::Tag]) -> Result<Vec<(String, String)>, Status> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tags.iter().enumerate() {
        if let Some(first) = seen.insert(&t.key, i) {
            return Err(invalid(&format!("{field}[{i}].key"), format!("{:?} repeats {field}[{first}]", t.key)));
        }
    }
    Ok(pairs(tags))
}

fn number_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// A request's context, checked against what this server's callers may
/// supply (`rules`: the clock keys, the allow-list).
fn context(
    field: &str,
    map: &HashMap<String, proto::ContextValue>,
    rules: &ContextRules,
) -> Result<Vec<(String, ContextValue)>, Status> {
    list_limit(field, map.len())?;
    for (k, v) in map {
        text_limit(&format!("{field}[{k:?}] (the key)"), k)?;
        match &v.kind {
            Some(proto::context_value::Kind::StringValue(s)) => text_limit(&format!("{field}[{k:?}]"), s)?,
            Some(proto::context_value::Kind::ListValue(l)) => strings_limit(&format!("{field}[{k:?}]"), &l.values)?,
            _ => {}
        }
    }
    let mut out: Vec<(String, ContextValue)> = Vec::with_capacity(map.len());
    for (k, v) in map {
        let value = match &v.kind {
            Some(proto::context_value::Kind::StringValue(s)) => ContextValue::One(s.clone()),
            Some(proto::context_value::Kind::NumberValue(n)) if n.is_finite() => ContextValue::One(number_text(*n)),
            Some(proto::context_value::Kind::NumberValue(_)) => {
                return Err(invalid(&format!("{field}[{k:?}]"), "the number is not finite"))
            }
            Some(proto::context_value::Kind::BoolValue(b)) => ContextValue::One(b.to_string()),
            Some(proto::context_value::Kind::ListValue(l)) => ContextValue::Many(l.values.clone()),
            None => return Err(invalid(&format!("{field}[{k:?}]"), "no value")),
        };
        out.push((k.clone(), value));
    }
    // Deterministic order: a map's order is not.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    rules.check(&out).map_err(|e| invalid(&e.field.to_string(), e.reason))?;
    Ok(out)
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(invalid(field, "required"))
    } else {
        Ok(())
    }
}

/// Builds an engine request from borrowed fields (GetResources' own); the
/// engine checks its shape when it decides.
fn request(
    principal: &str,
    action: &str,
    resource: &str,
    session_tags: &[proto::Tag],
    ctx: &HashMap<String, proto::ContextValue>,
    rules: &ContextRules,
) -> Result<Request, Status> {
    required("principal", principal)?;
    required("action", action)?;
    required("resource", resource)?;
    text_limit("principal", principal)?;
    text_limit("action", action)?;
    text_limit("resource", resource)?;
    tags_limit("session_tags", session_tags)?;
    Ok(Request {
        principal: principal.to_string(),
        action: action.to_string(),
        resource: resource.to_string(),
        request_tags: Vec::new(),
        tag_keys: None,
        session_tags: unique_tags("session_tags", session_tags)?,
        context: context("context", ctx, rules)?,
    })
}

/// Where a request's fields are: the request itself, or a batch item
/// (`items[3].action`). Field names are only spelled out for an error.
#[derive(Debug, Clone, Copy)]
enum At {
    Top,
    Item(usize),
}

impl At {
    /// The name of `field` of an item's own fields (action, resource,
    /// request tags, tag keys); the caller's fields have no prefix.
    fn item(self, field: &str) -> String {
        match self {
            At::Top => field.to_string(),
            At::Item(i) => format!("items[{i}].{field}"),
        }
    }
}

/// Whether a string is within [`MAX_FIELD_BYTES`].
fn fits(text: &str) -> bool {
    text.len() <= MAX_FIELD_BYTES
}

/// Whether tags are within the list and string limits.
fn tags_fit(tags: &[proto::Tag]) -> bool {
    tags.len() <= MAX_LIST_ITEMS && tags.iter().all(|t| fits(&t.key) && fits(&t.value))
}

/// Whether strings are within the list and string limits.
fn strings_fit(values: &[String]) -> bool {
    values.len() <= MAX_LIST_ITEMS && values.iter().all(|v| fits(v))
}

/// [`unique_tags`], taking the tags: keys must be unique (exactly). A short
/// list is compared pairwise, without a map.
fn unique_tags_owned(field: impl Fn() -> String, tags: Vec<proto::Tag>) -> Result<Vec<(String, String)>, Status> {
    if tags.len() <= 16 {
        for (i, t) in tags.iter().enumerate() {
            if let Some(first) = tags[..i].iter().position(|u| u.key == t.key) {
                let field = field();
                return Err(invalid(&format!("{field}[{i}].key"), format!("{:?} repeats {field}[{first}]", t.key)));
            }
        }
    } else {
        unique_tags(&field(), &tags)?;
    }
    Ok(tags.into_iter().map(|t| (t.key, t.value)).collect())
}

/// The context, taking the map: the same checks and result as [`context`]
/// but the callers' rules, which the engine checks (once) when it decides.
fn context_owned(map: HashMap<String, proto::ContextValue>) -> Result<Vec<(String, ContextValue)>, Status> {
    if map.is_empty() {
        return Ok(Vec::new());
    }
    list_limit("context", map.len())?;
    for (k, v) in &map {
        text_limit(&format!("context[{k:?}] (the key)"), k)?;
        match &v.kind {
            Some(proto::context_value::Kind::StringValue(s)) => text_limit(&format!("context[{k:?}]"), s)?,
            Some(proto::context_value::Kind::ListValue(l)) => strings_limit(&format!("context[{k:?}]"), &l.values)?,
            _ => {}
        }
    }
    let mut out: Vec<(String, ContextValue)> = Vec::with_capacity(map.len());
    for (k, v) in map {
        let value = match v.kind {
            Some(proto::context_value::Kind::StringValue(s)) => ContextValue::One(s),
            Some(proto::context_value::Kind::NumberValue(n)) if n.is_finite() => ContextValue::One(number_text(n)),
            Some(proto::context_value::Kind::NumberValue(_)) => {
                return Err(invalid(&format!("context[{k:?}]"), "the number is not finite"))
            }
            Some(proto::context_value::Kind::BoolValue(b)) => ContextValue::One(b.to_string()),
            Some(proto::context_value::Kind::ListValue(l)) => ContextValue::Many(l.values),
            None => return Err(invalid(&format!("context[{k:?}]"), "no value")),
        };
        out.push((k, value));
    }
    // Deterministic order: a map's order is not.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The fields of one engine request as they come off the wire.
struct Fields {
    principal: String,
    action: String,
    resource: String,
    request_tags: Vec<proto::Tag>,
    tag_keys: Option<proto::StringList>,
    session_tags: Vec<proto::Tag>,
    context: HashMap<String, proto::ContextValue>,
}

/// Builds an engine request from its fields, taking them (no string is
/// copied), with the checks and errors of [`request`] in the same order,
/// except the context's rules: the caller checks those.
fn request_owned(at: At, f: Fields) -> Result<Request, Status> {
    if f.principal.is_empty() {
        return Err(invalid("principal", "required"));
    }
    if f.action.is_empty() {
        return Err(invalid(&at.item("action"), "required"));
    }
    if f.resource.is_empty() {
        return Err(invalid(&at.item("resource"), "required"));
    }
    text_limit("principal", &f.principal)?;
    if !fits(&f.action) {
        text_limit(&at.item("action"), &f.action)?;
    }
    if !fits(&f.resource) {
        text_limit(&at.item("resource"), &f.resource)?;
    }
    if !tags_fit(&f.request_tags) {
        tags_limit(&at.item("request_tags"), &f.request_tags)?;
    }
    if let Some(keys) = f.tag_keys.as_ref().filter(|k| !strings_fit(&k.values)) {
        strings_limit(&at.item("tag_keys"), &keys.values)?;
    }
    if !tags_fit(&f.session_tags) {
        tags_limit("session_tags", &f.session_tags)?;
    }
    let request_tags = unique_tags_owned(|| at.item("request_tags"), f.request_tags)?;
    let session_tags = unique_tags_owned(|| "session_tags".to_string(), f.session_tags)?;
    let mut req = Request {
        principal: f.principal,
        action: f.action,
        resource: f.resource,
        request_tags,
        tag_keys: f.tag_keys.map(|l| l.values),
        session_tags,
        context: context_owned(f.context)?,
    };
    if !req.request_tags.is_empty() {
        req.derive_tag_keys();
    }
    Ok(req)
}

/// An Authorize request as an engine request, taking its strings. The
/// context is not checked against the callers' rules here: decide it with
/// `engine::authorize_with` and those rules, which validates the request
/// once (shape, session tags, context). Returns the request, its
/// `min_revision` and `explain`.
pub fn authorize_request(r: proto::AuthorizeRequest) -> Result<(Request, u64, bool), Status> {
    let (min_revision, explain) = (r.min_revision, r.explain);
    let req = request_owned(
        At::Top,
        Fields {
            principal: r.principal,
            action: r.action,
            resource: r.resource,
            request_tags: r.request_tags,
            tag_keys: r.tag_keys,
            session_tags: r.session_tags,
            context: r.context,
        },
    )?;
    Ok((req, min_revision, explain))
}

/// A batch's items as engine requests, each validated (so that no item is
/// decided before every item is known to be well-formed), taking the
/// items' strings; the caller's fields (principal, session tags, context)
/// are copied into each.
pub fn batch_requests(r: proto::BatchAuthorizeRequest, max_items: usize, rules: &ContextRules) -> Result<Vec<Request>, Status> {
    if r.items.is_empty() {
        return Err(invalid("items", "at least one item is needed"));
    }
    if r.items.len() > max_items {
        return Err(invalid("items", format!("{} items; at most {max_items} are allowed in one batch", r.items.len())));
    }
    let mut out = Vec::with_capacity(r.items.len());
    for (i, item) in r.items.into_iter().enumerate() {
        let at = At::Item(i);
        let req = request_owned(
            at,
            Fields {
                principal: r.principal.clone(),
                action: item.action,
                resource: item.resource,
                request_tags: item.request_tags,
                tag_keys: item.tag_keys,
                session_tags: r.session_tags.clone(),
                context: r.context.clone(),
            },
        )?;
        // The caller's context is the same for every item: checked against
        // the rules with the first item, where an error would first show.
        if i == 0 {
            rules.check(&req.context).map_err(|e| invalid(&e.field.to_string(), e.reason))?;
        }
        req.validate().map_err(|e| {
            let field = e.field.to_string();
            let at_item = field == "action" || field == "resource";
            invalid(&if at_item { at.item(&field) } else { field }, e.reason)
        })?;
        out.push(req);
    }
    Ok(out)
}

fn effect(e: Effect) -> String {
    match e {
        Effect::Allow => "Allow",
        Effect::Deny => "Deny",
    }
    .to_string()
}

/// The one mapping between the engine's reasons and the wire's (both ways).
pub fn reason_to_proto(r: Reason) -> proto::Reason {
    match r {
        Reason::Allowed => proto::Reason::Allowed,
        Reason::ExplicitDeny => proto::Reason::ExplicitDeny,
        Reason::ImplicitDeny => proto::Reason::ImplicitDeny,
    }
}

/// The engine's reason behind a wire reason; none for `REASON_UNSPECIFIED`
/// or a number this build does not know.
pub fn reason_from_proto(r: i32) -> Option<Reason> {
    match proto::Reason::try_from(r).ok()? {
        proto::Reason::Allowed => Some(Reason::Allowed),
        proto::Reason::ExplicitDeny => Some(Reason::ExplicitDeny),
        proto::Reason::ImplicitDeny => Some(Reason::ImplicitDeny),
        proto::Reason::Unspecified => None,
    }
}

/// A wire reason as the protobuf enum spells it (`EXPLICIT_DENY`), as
/// `tagward authorize` prints it.
pub fn reason_wire_name(r: i32) -> &'static str {
    proto::Reason::try_from(r).unwrap_or(proto::Reason::Unspecified).as_str_name()
}

/// A statement's policy as the wire names it (a managed policy by its
/// name, without formatting).
fn policy_name(p: &crate::engine::PolicyRef) -> String {
    match p {
        crate::engine::PolicyRef::Managed(name) => String::from(&**name),
        other => other.to_string(),
    }
}

pub fn decision(d: &Decision, revision: u64) -> proto::AuthorizeResponse {
    let sref = |s: &crate::engine::StatementRef| proto::StatementRef {
        policy: policy_name(&s.policy),
        index: s.index as u32,
        sid: s.sid.as_deref().map(String::from).unwrap_or_default(),
        effect: effect(s.effect),
    };
    proto::AuthorizeResponse {
        decision: if d.allowed() { proto::Decision::Allow } else { proto::Decision::Deny } as i32,
        reason: reason_to_proto(d.reason) as i32,
        matched: d.matched.iter().map(sref).collect(),
        missing_keys: d.missing_keys.iter().map(|k| String::from(&**k)).collect(),
        revision,
        considered: d
            .considered
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|c| proto::Considered { statement: Some(sref(&c.statement)), outcome: c.outcome.to_string() })
            .collect(),
    }
}

fn tag_request(
    principal: &str,
    resource: &str,
    op: TagOp,
    session_tags: &[proto::Tag],
    ctx: &HashMap<String, proto::ContextValue>,
    rules: &ContextRules,
) -> Result<TagRequest, Status> {
    required("principal", principal)?;
    required("resource", resource)?;
    text_limit("principal", principal)?;
    text_limit("resource", resource)?;
    tags_limit("session_tags", session_tags)?;
    Ok(TagRequest {
        principal: principal.to_string(),
        resource: resource.to_string(),
        op,
        session_tags: unique_tags("session_tags", session_tags)?,
        context: context("context", ctx, rules)?,
    })
}

pub fn tag_resource(r: &proto::TagResourceRequest, rules: &ContextRules) -> Result<TagRequest, Status> {
    tags_limit("tags", &r.tags)?;
    tag_request(&r.principal, &r.resource, TagOp::Tag(pairs(&r.tags)), &r.session_tags, &r.context, rules)
}

pub fn untag_resource(r: &proto::UntagResourceRequest, rules: &ContextRules) -> Result<TagRequest, Status> {
    strings_limit("tag_keys", &r.tag_keys)?;
    tag_request(&r.principal, &r.resource, TagOp::Untag(r.tag_keys.clone()), &r.session_tags, &r.context, rules)
}

pub fn list_resource_tags(r: &proto::ListResourceTagsRequest, rules: &ContextRules) -> Result<TagRequest, Status> {
    tag_request(&r.principal, &r.resource, TagOp::List, &r.session_tags, &r.context, rules)
}

/// The authorization request behind `GetResources`.
pub fn get_resources(r: &proto::GetResourcesRequest, rules: &ContextRules) -> Result<Request, Status> {
    request(&r.principal, "tag:GetResources", "*", &r.session_tags, &r.context, rules)
}

fn json(field: &str, text: &str) -> Result<Value, UpdateError> {
    serde_json::from_str(text).map_err(|e| UpdateError {
        code: if field.contains("polic") { ErrorCode::MalformedPolicyDocument } else { ErrorCode::Validation },
        message: format!("{field}: not valid JSON: {e}"),
    })
}

fn bad(message: impl Into<String>) -> UpdateError {
    UpdateError { code: ErrorCode::Validation, message: message.into() }
}

fn tag_map(field: &str, tags: &[proto::Tag]) -> Result<BTreeMap<String, String>, UpdateError> {
    update_limit(tags_limit(field, tags))?;
    let mut map = BTreeMap::new();
    for (i, t) in tags.iter().enumerate() {
        if map.insert(t.key.clone(), t.value.clone()).is_some() {
            return Err(UpdateError { code: ErrorCode::Tag, message: format!("{field}[{i}].key: {:?} repeats", t.key) });
        }
    }
    Ok(map)
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// An admin update from the wire; `path` prefixes error messages.
pub fn update(u: &proto::Update, path: &str) -> Result<Update, UpdateError> {
    use proto::update::Op;
    let op = u.op.as_ref().ok_or_else(|| bad(format!("{path}op: no operation set")))?;
    Ok(match op {
        Op::PutPolicy(p) => {
            if p.name.is_empty() {
                return Err(bad(format!("{path}put_policy.name: required")));
            }
            Update::PutPolicy { name: p.name.clone(), document: json(&format!("{path}put_policy.document"), &p.document)? }
        }
        Op::DeletePolicy(p) => Update::DeletePolicy { name: p.name.clone() },
        Op::PutPrincipal(p) => {
            let mut inline = BTreeMap::new();
            for (name, doc) in &p.inline_policies {
                inline.insert(name.clone(), json(&format!("{path}put_principal.inline_policies.{name}"), doc)?);
            }
            Update::PutPrincipal(PrincipalSpec {
                arn: p.arn.clone(),
                tags: tag_map(&format!("{path}put_principal.tags"), &p.tags)?,
                policies: p.policies.clone(),
                pending_policies: p.pending_policies.clone(),
                inline_policies: inline,
                permissions_boundary: opt(&p.permissions_boundary),
                trust_policy: match p.trust_policy.as_str() {
                    "" => None,
                    text => Some(json(&format!("{path}put_principal.trust_policy"), text)?),
                },
            })
        }
        Op::DeletePrincipal(d) => Update::DeletePrincipal { arn: d.arn.clone() },
        Op::PutResource(r) => Update::PutResource(ResourceSpec {
            arn: r.arn.clone(),
            account: opt(&r.account),
            tags: tag_map(&format!("{path}put_resource.tags"), &r.tags)?,
            key_policy: match r.key_policy.as_str() {
                "" => None,
                text => Some(json(&format!("{path}put_resource.key_policy"), text)?),
            },
            key_state: opt(&r.key_state),
            key_spec: opt(&r.key_spec),
            key_usage: opt(&r.key_usage),
            origin: opt(&r.origin),
            key_manager: opt(&r.key_manager),
            resource_policy: match r.resource_policy.as_str() {
                "" => None,
                text => Some(json(&format!("{path}put_resource.resource_policy"), text)?),
            },
            aliases: r.aliases.clone(),
            grants: r.grants.iter().map(grant_from_proto).collect(),
        }),
        Op::DeleteResource(d) => Update::DeleteResource { arn: d.arn.clone() },
        Op::SetTags(s) => {
            update_limit(tags_limit(&format!("{path}set_tags.tags"), &s.tags))?;
            Update::SetTags { resource: s.resource.clone(), tags: pairs(&s.tags) }
        }
        Op::RemoveTags(r) => {
            update_limit(strings_limit(&format!("{path}remove_tags.tag_keys"), &r.tag_keys))?;
            Update::RemoveTags { resource: r.resource.clone(), keys: r.tag_keys.clone() }
        }
        Op::Batch(b) => Update::Batch(
            b.updates
                .iter()
                .enumerate()
                .map(|(i, u)| update(u, &format!("{path}batch.updates[{i}].")))
                .collect::<Result<_, _>>()?,
        ),
        Op::PutAlias(a) => Update::PutAlias { key: a.key.clone(), alias: a.alias_name.clone() },
        Op::DeleteAlias(a) => Update::DeleteAlias { alias_arn: a.alias_arn.clone() },
        Op::PutGrant(g) => Update::PutGrant {
            key: g.key.clone(),
            grant: g.grant.as_ref().map(grant_from_proto).ok_or_else(|| bad(format!("{path}put_grant.grant: required")))?,
        },
        Op::DeleteGrant(g) => Update::DeleteGrant { key: g.key.clone(), grant_id: g.grant_id.clone() },
        Op::ReplaceWorld(w) => {
            let value = json(&format!("{path}replace_world.world_json"), &w.world_json)?;
            let world: WorldSpec = serde_path_to_error::deserialize(value)
                .map_err(|e| bad(format!("{path}replace_world.world_json.{}: {}", e.path(), e.inner())))?;
            Update::ReplaceWorld(world)
        }
        Op::PutOrganization(o) => {
            let value = json(&format!("{path}put_organization.organization_json"), &o.organization_json)?;
            let org: OrganizationSpec = serde_path_to_error::deserialize(value)
                .map_err(|e| bad(format!("{path}put_organization.organization_json.{}: {}", e.path(), e.inner())))?;
            Update::PutOrganization(org)
        }
        Op::DeleteOrganization(_) => Update::DeleteOrganization,
        Op::PutSession(s) => Update::PutSession(SessionSpec {
            arn: s.arn.clone(),
            policy: match s.policy.as_str() {
                "" => None,
                text => Some(json(&format!("{path}put_session.policy"), text)?),
            },
            policies: s.policies.clone(),
            tags: tag_map(&format!("{path}put_session.tags"), &s.tags)?,
        }),
        Op::DeleteSession(d) => Update::DeleteSession { arn: d.arn.clone() },
        Op::PutEndpoint(e) => Update::PutEndpoint(EndpointSpec {
            id: e.id.clone(),
            policy: match e.policy.as_str() {
                "" => None,
                text => Some(json(&format!("{path}put_endpoint.policy"), text)?),
            },
        }),
        Op::DeleteEndpoint(d) => Update::DeleteEndpoint { id: d.id.clone() },
    })
}

fn doc_text(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The world as the updates that rebuild it.
pub fn export(world: &WorldSpec, revision: u64) -> Vec<proto::ExportItem> {
    use proto::update::Op;
    let item = |op: Op| proto::ExportItem { revision, update: Some(proto::Update { op: Some(op) }) };
    let mut out = Vec::with_capacity(world.policies.len() + world.principals.len() + world.resources.len());
    for (name, doc) in &world.policies {
        out.push(item(Op::PutPolicy(proto::PutPolicy { name: name.clone(), document: doc_text(doc) })));
    }
    for p in &world.principals {
        out.push(item(Op::PutPrincipal(principal_to_proto(p))));
    }
    for r in &world.resources {
        out.push(item(Op::PutResource(resource_to_proto(r))));
    }
    if let Some(org) = &world.organization {
        let organization_json = serde_json::to_string(org).unwrap_or_default();
        out.push(item(Op::PutOrganization(proto::PutOrganization { organization_json })));
    }
    for s in &world.sessions {
        out.push(item(Op::PutSession(proto::Session {
            arn: s.arn.clone(),
            policy: s.policy.as_ref().map(doc_text).unwrap_or_default(),
            policies: s.policies.clone(),
            tags: to_tags(s.tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        })));
    }
    for e in &world.vpc_endpoints {
        out.push(item(Op::PutEndpoint(proto::Endpoint {
            id: e.id.clone(),
            policy: e.policy.as_ref().map(doc_text).unwrap_or_default(),
        })));
    }
    out
}

pub fn principal_to_proto(p: &PrincipalSpec) -> proto::Principal {
    proto::Principal {
        arn: p.arn.clone(),
        tags: to_tags(p.tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        policies: p.policies.clone(),
        pending_policies: p.pending_policies.clone(),
        inline_policies: p.inline_policies.iter().map(|(k, v)| (k.clone(), doc_text(v))).collect(),
        permissions_boundary: p.permissions_boundary.clone().unwrap_or_default(),
        trust_policy: p.trust_policy.as_ref().map(doc_text).unwrap_or_default(),
    }
}

pub fn resource_to_proto(r: &ResourceSpec) -> proto::Resource {
    let s = |o: &Option<String>| o.clone().unwrap_or_default();
    proto::Resource {
        arn: r.arn.clone(),
        account: s(&r.account),
        tags: to_tags(r.tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        key_policy: r.key_policy.as_ref().map(doc_text).unwrap_or_default(),
        key_state: s(&r.key_state),
        key_spec: s(&r.key_spec),
        key_usage: s(&r.key_usage),
        origin: s(&r.origin),
        key_manager: s(&r.key_manager),
        resource_policy: r.resource_policy.as_ref().map(doc_text).unwrap_or_default(),
        aliases: r.aliases.clone(),
        grants: r.grants.iter().map(grant_to_proto).collect(),
    }
}

/// A grant from the wire (the domain checks it).
pub fn grant_from_proto(g: &proto::Grant) -> GrantSpec {
    use proto::grant_constraints::Kind;
    let map = |c: &proto::EncryptionContext| c.pairs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    GrantSpec {
        id: g.id.clone(),
        grantee_principal: g.grantee_principal.clone(),
        retiring_principal: opt(&g.retiring_principal),
        operations: g.operations.clone(),
        constraints: g.constraints.as_ref().map(|c| match &c.kind {
            Some(Kind::EncryptionContextEquals(e)) => {
                ConstraintSpec { encryption_context_equals: Some(map(e)), ..Default::default() }
            }
            Some(Kind::EncryptionContextSubset(e)) => {
                ConstraintSpec { encryption_context_subset: Some(map(e)), ..Default::default() }
            }
            None => ConstraintSpec::default(),
        }),
        name: opt(&g.name),
    }
}

pub fn grant_to_proto(g: &GrantSpec) -> proto::Grant {
    use proto::grant_constraints::Kind;
    let ctx = |m: &BTreeMap<String, String>| proto::EncryptionContext {
        pairs: m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    proto::Grant {
        id: g.id.clone(),
        grantee_principal: g.grantee_principal.clone(),
        retiring_principal: g.retiring_principal.clone().unwrap_or_default(),
        operations: g.operations.clone(),
        constraints: g.constraints.as_ref().map(|c| proto::GrantConstraints {
            kind: match (&c.encryption_context_equals, &c.encryption_context_subset) {
                (Some(m), _) => Some(Kind::EncryptionContextEquals(ctx(m))),
                (None, Some(m)) => Some(Kind::EncryptionContextSubset(ctx(m))),
                (None, None) => None,
            },
        }),
        name: g.name.clone().unwrap_or_default(),
    }
}

/// A KMS operation from the wire: the caller fields checked like a tag
/// operation's.
pub fn kms_request(
    principal: &str,
    session_tags: &[proto::Tag],
    ctx: &HashMap<String, proto::ContextValue>,
    rules: &ContextRules,
    op: KmsOp,
) -> Result<KmsRequest, Status> {
    required("principal", principal)?;
    Ok(KmsRequest {
        principal: principal.to_string(),
        op,
        session_tags: unique_tags("session_tags", session_tags)?,
        context: context("context", ctx, rules)?,
    })
}

/// A KMS operation on the wire (the scenario runner's gRPC backend):
/// principal, session tags and context.
pub fn kms_caller(req: &KmsRequest) -> (String, Vec<proto::Tag>, HashMap<String, proto::ContextValue>) {
    (
        req.principal.clone(),
        to_tags(req.session_tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        context_to_proto(&req.context),
    )
}

pub fn event(e: &Event) -> proto::WatchEvent {
    use proto::watch_event::Event as E;
    proto::WatchEvent {
        revision: e.revision,
        time_unix_ms: e.time_unix_ms,
        actor: e.actor.clone(),
        event: Some(match &e.kind {
            EventKind::Tags { resource, action, before, after, allowed_by } => E::TagChange(proto::TagChange {
                resource: resource.clone(),
                action: action.clone(),
                before: to_tags(before.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                after: to_tags(after.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                allowed_by: allowed_by.clone(),
            }),
            EventKind::Entity { kind, name, change } => E::EntityChange(proto::EntityChange {
                kind: kind.as_str().to_string(),
                name: name.clone(),
                change: change.as_str().to_string(),
            }),
            EventKind::Alias { action, alias, key, previous_key, change, allowed_by } => E::AliasChange(proto::AliasChange {
                action: action.clone(),
                alias_name: alias.clone(),
                key: key.clone(),
                previous_key: previous_key.clone().unwrap_or_default(),
                change: change.as_str().to_string(),
                allowed_by: allowed_by.clone(),
            }),
            EventKind::Grant { action, key, grant_id, grant, change, allowed_by } => E::GrantChange(proto::GrantChange {
                action: action.clone(),
                key: key.clone(),
                grant_id: grant_id.clone(),
                grant: grant.as_ref().map(grant_to_proto),
                change: change.as_str().to_string(),
                allowed_by: allowed_by.clone(),
            }),
        }),
    }
}

/// A domain request on the wire (for the scenario runner's gRPC backend and
/// the load tool).
pub fn request_to_proto(req: &Request) -> proto::AuthorizeRequest {
    proto::AuthorizeRequest {
        principal: req.principal.clone(),
        action: req.action.clone(),
        resource: req.resource.clone(),
        request_tags: to_tags(req.request_tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        tag_keys: req.tag_keys.as_ref().map(|k| proto::StringList { values: k.clone() }),
        session_tags: to_tags(req.session_tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        context: context_to_proto(&req.context),
        min_revision: 0,
        explain: false,
    }
}

pub fn context_to_proto(ctx: &[(String, ContextValue)]) -> HashMap<String, proto::ContextValue> {
    use proto::context_value::Kind;
    ctx.iter()
        .map(|(k, v)| {
            let kind = match v {
                ContextValue::One(s) => Kind::StringValue(s.clone()),
                ContextValue::Many(l) => Kind::ListValue(proto::StringList { values: l.clone() }),
            };
            (k.clone(), proto::ContextValue { kind: Some(kind) })
        })
        .collect()
}
