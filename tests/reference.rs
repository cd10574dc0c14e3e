//! The evaluator against a deliberately simple reference implementation.
//!
//! A small world is generated as a plain Rust model (three principals in two
//! accounts, two KMS keys, one SQS queue, random policies, tags and
//! requests). The model is rendered to a JSON world file and decided by the
//! engine; independently, [`reference`] decides the same model straight from
//! docs/semantics.md ("Evaluating a request", "Operators", "Condition keys the
//! service fills in"), with wildcards as anchored regexes and no code shared
//! with the engine. The two must give the same reason and name the same
//! statements.
//!
//! The model also covers two layers of the wider chain (docs/semantics.md,
//! "The whole chain"): a permissions boundary on a principal, and an
//! organization whose SCPs (root, one unit, account A) bound account A's
//! callers. Account B is outside the organization.
//!
//! A few hand-written tests at the bottom pin the trickiest rules with the
//! reference and the engine together.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test or bench stops loudly

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use regex::Regex;
use serde_json::{json, Map, Value};

use tagward::engine::{authorize, Decision, PolicyRef, Reason, Request};
use tagward::policy::Effect as EngineEffect;
use tagward::state::State;
use tagward::world::WorldSpec;

const A: &str = "111122223333";
const B: &str = "444455556666";
const ALICE: &str = "arn:aws:iam::111122223333:user/alice";
const DEV: &str = "arn:aws:iam::111122223333:role/dev";
const BOB: &str = "arn:aws:iam::444455556666:user/bob";
const SESSION: &str = "arn:aws:sts::111122223333:assumed-role/dev/s1";
const K1: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";
const K2: &str = "arn:aws:kms:us-east-1:111122223333:key/k2";
const Q1: &str = "arn:aws:sqs:us-east-1:111122223333:q1";

const ACTION_PATTERNS: &[&str] = &[
    "kms:Decrypt",
    "kms:*",
    "kms:*crypt",
    "kms:En?rypt",
    "*",
    "sqs:SendMessage",
    "KMS:decrypt",
    "kms:TagResource",
    "kms:Create*",
];
const RESOURCE_PATTERNS: &[&str] = &[
    "*",
    "arn:aws:kms:*:111122223333:key/*",
    "arn:aws:kms:us-east-1:111122223333:key/k1",
    "arn:aws:sqs:us-east-1:111122223333:q1",
    "arn:aws:kms:*:*:key/k?",
];
const REQUEST_PRINCIPALS: &[&str] = &[ALICE, DEV, BOB, SESSION];
const REQUEST_ACTIONS: &[&str] = &["kms:Decrypt", "kms:Encrypt", "kms:TagResource", "kms:CreateKey", "sqs:SendMessage"];
const REQUEST_RESOURCES: &[&str] = &[K1, K2, Q1, "*"];

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Effect {
    Allow,
    Deny,
}

/// One entry of `{"AWS": ...}` in a key or resource policy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    /// `"*"`
    Anyone,
    /// `arn:aws:iam::111122223333:root`
    RootA,
    /// `"444455556666"`
    AccountB,
    RoleDev,
    UserBob,
    UserAlice,
}

impl Who {
    fn text(self) -> &'static str {
        match self {
            Who::Anyone => "*",
            Who::RootA => "arn:aws:iam::111122223333:root",
            Who::AccountB => B,
            Who::RoleDev => DEV,
            Who::UserBob => BOB,
            Who::UserAlice => ALICE,
        }
    }
}

/// `Principal` / `NotPrincipal`.
#[derive(Clone, PartialEq, Eq)]
enum Principals {
    /// `"*"`
    Star,
    /// `{"AWS": [...]}`
    Aws(Vec<Who>),
}

#[derive(Clone, PartialEq, Eq)]
struct Cond {
    op: &'static str,
    key: &'static str,
    values: Vec<&'static str>,
}

#[derive(Clone, PartialEq, Eq)]
struct Stmt {
    effect: Effect,
    /// Key and resource policies only; `true` for `NotPrincipal`.
    principal: Option<(bool, Principals)>,
    not_action: bool,
    actions: Vec<&'static str>,
    not_resource: bool,
    resources: Vec<&'static str>,
    conditions: Vec<Cond>,
}

#[derive(Clone)]
struct PrincipalModel {
    arn: &'static str,
    /// Managed policies are named `{short}-p{i}`.
    short: &'static str,
    team: Option<&'static str>,
    policies: Vec<Vec<Stmt>>,
    /// The permissions boundary, a managed policy named `{short}-boundary`.
    boundary: Option<Vec<Stmt>>,
}

impl PrincipalModel {
    fn policy_name(&self, i: usize) -> String {
        format!("{}-p{i}", self.short)
    }
}

#[derive(Clone)]
struct ResourceModel {
    arn: &'static str,
    project: Option<&'static str>,
    typ: Option<&'static str>,
    /// For a key: `None` is the default key policy. For the queue: no policy.
    policy: Option<Vec<Stmt>>,
}

/// k1 always exists; k2 and q1 may be unknown to the service.
#[derive(Clone, Debug)]
struct World {
    principals: Vec<PrincipalModel>,
    resources: Vec<ResourceModel>,
    /// The SCPs of account A's path (root, unit, account), each level one or
    /// more policies; `None`: no organization.
    scps: Option<Vec<Vec<Vec<Stmt>>>>,
}

/// The unit ids of account A's path, root first.
const ORG_LEVELS: [&str; 2] = ["r-ab12", "ou-ab12-11111111"];

fn scp_name(level: usize, i: usize) -> String {
    format!("scp-{level}-{i}")
}

#[derive(Clone, Debug)]
struct Req {
    principal: &'static str,
    action: &'static str,
    resource: &'static str,
    /// `aws:RequestTag/Project`.
    project_tag: Option<&'static str>,
    /// `aws:TagKeys` given (the keys of the request tags, maybe none).
    tag_keys: bool,
    /// A session tag (key as written, value); sessions only.
    session_tag: Option<(&'static str, &'static str)>,
}

fn is_key_arn(arn: &str) -> bool {
    arn.starts_with("arn:aws:kms:") && arn.contains(":key/")
}

// Compact, readable Debug output for shrunk cases.

impl fmt::Debug for Principals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principals::Star => f.write_str("\"*\""),
            Principals::Aws(list) => write!(f, "AWS{list:?}"),
        }
    }
}

impl fmt::Debug for Cond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {:?}", self.op, self.key, self.values)
    }
}

impl fmt::Debug for PrincipalModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct(self.arn);
        d.field("team", &format_args!("{}", self.team.unwrap_or("-")));
        for (i, p) in self.policies.iter().enumerate() {
            d.field(&self.policy_name(i), p);
        }
        d.finish()
    }
}

impl fmt::Debug for ResourceModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct(self.arn);
        d.field("Project", &format_args!("{}", self.project.unwrap_or("-")));
        d.field("Type", &format_args!("{}", self.typ.unwrap_or("-")));
        match (&self.policy, is_key_arn(self.arn)) {
            (Some(p), true) => d.field("key_policy", p),
            (None, true) => d.field("key_policy", &format_args!("default (account root, kms:*)")),
            (Some(p), false) => d.field("resource_policy", p),
            (None, false) => d.field("resource_policy", &format_args!("none")),
        };
        d.finish()
    }
}

impl fmt::Debug for Stmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.effect)?;
        if let Some((negated, p)) = &self.principal {
            write!(f, " {}{p:?}", if *negated { "NotPrincipal " } else { "Principal " })?;
        }
        write!(f, " {}{:?}", if self.not_action { "NotAction " } else { "Action " }, self.actions)?;
        write!(f, " {}{:?}", if self.not_resource { "NotResource " } else { "Resource " }, self.resources)?;
        if !self.conditions.is_empty() {
            write!(f, " if {:?}", self.conditions)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Rendering the model as a world file and a request
// ---------------------------------------------------------------------------

fn one_or_many(items: Vec<Value>) -> Value {
    if items.len() == 1 {
        items.into_iter().next().unwrap()
    } else {
        Value::Array(items)
    }
}

fn strs(items: &[&str]) -> Value {
    one_or_many(items.iter().map(|s| json!(s)).collect())
}

fn stmt_json(st: &Stmt, index: usize) -> Value {
    let mut m = Map::new();
    m.insert("Sid".into(), json!(format!("S{index}")));
    m.insert("Effect".into(), json!(format!("{:?}", st.effect)));
    if let Some((negated, p)) = &st.principal {
        let value = match p {
            Principals::Star => json!("*"),
            Principals::Aws(list) => {
                json!({ "AWS": one_or_many(list.iter().map(|w| json!(w.text())).collect()) })
            }
        };
        m.insert(if *negated { "NotPrincipal" } else { "Principal" }.into(), value);
    }
    m.insert(if st.not_action { "NotAction" } else { "Action" }.into(), strs(&st.actions));
    m.insert(if st.not_resource { "NotResource" } else { "Resource" }.into(), strs(&st.resources));
    if !st.conditions.is_empty() {
        let mut block = Map::new();
        for c in &st.conditions {
            let keys = block.entry(c.op).or_insert_with(|| json!({}));
            let previous = keys.as_object_mut().unwrap().insert(c.key.into(), strs(&c.values));
            assert!(previous.is_none(), "generator bug: {} {} twice in one statement", c.op, c.key);
        }
        m.insert("Condition".into(), Value::Object(block));
    }
    Value::Object(m)
}

fn policy_json(statements: &[Stmt]) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": statements.iter().enumerate().map(|(i, s)| stmt_json(s, i)).collect::<Vec<_>>(),
    })
}

fn world_json(w: &World) -> Value {
    let mut policies = Map::new();
    let mut principals = Vec::new();
    for p in &w.principals {
        let mut names = Vec::new();
        for (i, doc) in p.policies.iter().enumerate() {
            policies.insert(p.policy_name(i), policy_json(doc));
            names.push(p.policy_name(i));
        }
        let tags = match p.team {
            Some(t) => json!({ "team": t }),
            None => json!({}),
        };
        let mut spec = json!({ "arn": p.arn, "tags": tags, "policies": names });
        if let Some(doc) = &p.boundary {
            let name = format!("{}-boundary", p.short);
            policies.insert(name.clone(), policy_json(doc));
            spec["permissions_boundary"] = json!(name);
        }
        principals.push(spec);
    }
    let mut resources = Vec::new();
    for r in &w.resources {
        let mut tags = Map::new();
        if let Some(v) = r.project {
            tags.insert("Project".into(), json!(v));
        }
        if let Some(v) = r.typ {
            tags.insert("Type".into(), json!(v));
        }
        let mut spec = json!({ "arn": r.arn, "tags": tags });
        if let Some(doc) = &r.policy {
            let field = if is_key_arn(r.arn) { "key_policy" } else { "resource_policy" };
            spec[field] = policy_json(doc);
        }
        resources.push(spec);
    }
    let mut world = json!({ "policies": policies, "principals": principals, "resources": resources });
    if let Some(levels) = &w.scps {
        let mut docs = Map::new();
        let mut names: Vec<Vec<String>> = Vec::new();
        for (l, level) in levels.iter().enumerate() {
            names.push((0..level.len()).map(|i| scp_name(l, i)).collect());
            for (i, doc) in level.iter().enumerate() {
                docs.insert(scp_name(l, i), policy_json(doc));
            }
        }
        world["organization"] = json!({
            "id": "o-a1b2c3d4e5",
            "policies": docs,
            "units": [
                {"id": ORG_LEVELS[0], "scps": names[0]},
                {"id": ORG_LEVELS[1], "parent": ORG_LEVELS[0], "scps": names[1]}
            ],
            "accounts": [{"id": A, "parent": ORG_LEVELS[1], "scps": names[2]}]
        });
    }
    world
}

fn build(w: &World) -> (Value, State) {
    let doc = world_json(w);
    let spec: WorldSpec = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("world spec: {e}\n{doc:#}"));
    let state = spec.build().unwrap_or_else(|e| panic!("world refused: {e}\n{doc:#}"));
    (doc, state)
}

fn request(r: &Req) -> Request {
    let request_tags: Vec<(String, String)> = r.project_tag.map(|v| ("Project".to_string(), v.to_string())).into_iter().collect();
    Request {
        principal: r.principal.into(),
        action: r.action.into(),
        resource: r.resource.into(),
        tag_keys: r.tag_keys.then(|| request_tags.iter().map(|(k, _)| k.clone()).collect()),
        request_tags,
        session_tags: r.session_tag.map(|(k, v)| (k.to_string(), v.to_string())).into_iter().collect(),
        context: Vec::new(),
    }
}

// ---------------------------------------------------------------------------
// The reference: docs/semantics.md, read straight off the model
// ---------------------------------------------------------------------------

/// `*` and `?` wildcards as an anchored regex, cached by pattern.
fn glob(pattern: &str, text: &str, ignore_case: bool) -> bool {
    thread_local! {
        static CACHE: RefCell<HashMap<(String, bool), Regex>> = RefCell::new(HashMap::new());
    }
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let re = cache.entry((pattern.to_string(), ignore_case)).or_insert_with(|| {
            let body = regex::escape(pattern).replace(r"\*", ".*").replace(r"\?", ".");
            let flags = if ignore_case { "(?is)" } else { "(?s)" };
            Regex::new(&format!("{flags}^{body}$")).unwrap()
        });
        re.is_match(text)
    })
}

/// Resource ARN glob: `*` alone, or the six parts (split on the first five
/// colons) each matched on its own, case-sensitive.
fn resource_matches(pattern: &str, resource: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let p: Vec<&str> = pattern.splitn(6, ':').collect();
    let r: Vec<&str> = resource.splitn(6, ':').collect();
    p.len() == 6 && r.len() == 6 && p.iter().zip(&r).all(|(p, r)| glob(p, r, false))
}

/// How a key/resource policy statement's principal matched the caller.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Grant {
    /// Through the caller's account root: IAM must allow too.
    Delegate,
    /// The calling session's role, named by the role's ARN: bounded like
    /// the role's own policies.
    ViaRole,
    /// The caller itself, or `*`.
    Direct,
}

/// The requester, parsed by hand from the four ARNs the generator uses.
struct Caller {
    arn: &'static str,
    account: &'static str,
    role: Option<&'static str>,
    /// The user or role whose tags and policies apply.
    identity: &'static str,
}

fn caller(arn: &'static str) -> Caller {
    match arn {
        ALICE => Caller { arn, account: A, role: None, identity: ALICE },
        DEV => Caller { arn, account: A, role: Some("dev"), identity: DEV },
        SESSION => Caller { arn, account: A, role: Some("dev"), identity: DEV },
        BOB => Caller { arn, account: B, role: None, identity: BOB },
        other => panic!("no such caller {other}"),
    }
}

impl Caller {
    /// A `Principal` entry: `Some` when it matches, with how.
    fn grant(&self, who: Who) -> Option<Grant> {
        match who {
            Who::Anyone => Some(Grant::Direct),
            Who::RootA => (self.account == A).then_some(Grant::Delegate),
            Who::AccountB => (self.account == B).then_some(Grant::Delegate),
            // A role entry matches the role and its sessions.
            Who::RoleDev if self.arn == SESSION => Some(Grant::ViaRole),
            Who::RoleDev => (self.account == A && self.role == Some("dev")).then_some(Grant::Direct),
            Who::UserBob => (self.arn == BOB).then_some(Grant::Direct),
            Who::UserAlice => (self.arn == ALICE).then_some(Grant::Direct),
        }
    }

    /// A `NotPrincipal` entry lists the caller: an account entry lists the
    /// account root only (none of our callers), a role its sessions too.
    fn listed_by(&self, who: Who) -> bool {
        match who {
            Who::RootA | Who::AccountB => false,
            other => self.grant(other).is_some(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Where {
    Identity,
    KeyPolicy,
    ResourcePolicy,
    /// Identity-style guards: allows only bound, denies deny.
    Boundary,
    Scp(usize),
}

#[derive(Debug)]
enum Vals {
    Missing,
    One(String),
    Many(Vec<String>),
}

struct Ctx<'a> {
    req: &'a Req,
    caller: Caller,
    principal: Option<&'a PrincipalModel>,
    resource: Option<&'a ResourceModel>,
}

impl Ctx<'_> {
    fn has_boundary(&self) -> bool {
        self.principal.is_some_and(|p| p.boundary.is_some())
    }
}

/// Case-insensitive tag lookup (no model has two keys equal ignoring case).
fn tag<'a>(tags: &[(&str, Option<&'a str>)], key: &str) -> Option<&'a str> {
    tags.iter().find(|(k, v)| k.eq_ignore_ascii_case(key) && v.is_some()).and_then(|(_, v)| *v)
}

fn strip_prefix_ignore_case<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
    (key.len() >= prefix.len() && key[..prefix.len()].eq_ignore_ascii_case(prefix)).then(|| &key[prefix.len()..])
}

impl Ctx<'_> {
    fn values(&self, key: &str, place: Where) -> Vals {
        let one = |v: Option<&str>| v.map_or(Vals::Missing, |v| Vals::One(v.to_string()));
        if let Some(k) = strip_prefix_ignore_case(key, "aws:ResourceTag/") {
            // Not in key policies, not without an existing resource.
            let available =
                place != Where::KeyPolicy && self.req.resource != "*" && !self.req.action.eq_ignore_ascii_case("kms:CreateKey");
            let Some(r) = self.resource.filter(|_| available) else {
                return Vals::Missing;
            };
            return one(tag(&[("Project", r.project), ("Type", r.typ)], k));
        }
        if let Some(k) = strip_prefix_ignore_case(key, "aws:RequestTag/") {
            return one(tag(&[("Project", self.req.project_tag)], k));
        }
        if let Some(k) = strip_prefix_ignore_case(key, "aws:PrincipalTag/") {
            // Session tags override the role's tags (keys case-insensitive).
            if let Some((sk, sv)) = self.req.session_tag {
                if sk.eq_ignore_ascii_case(k) {
                    return Vals::One(sv.to_string());
                }
            }
            return one(self.principal.and_then(|p| tag(&[("team", p.team)], k)));
        }
        if key.eq_ignore_ascii_case("aws:TagKeys") {
            return match self.req.tag_keys {
                false => Vals::Missing,
                true => Vals::Many(self.req.project_tag.iter().map(|_| "Project".to_string()).collect()),
            };
        }
        panic!("the reference does not know condition key {key}")
    }

    fn condition_holds(&self, c: &Cond, place: Where) -> bool {
        let vals = self.values(c.key, place);
        let (set, op) = if let Some(rest) = c.op.strip_prefix("ForAllValues:") {
            ("all", rest)
        } else if let Some(rest) = c.op.strip_prefix("ForAnyValue:") {
            ("any", rest)
        } else {
            ("plain", c.op)
        };
        if op == "Null" {
            let absent = match &vals {
                Vals::Missing => true,
                Vals::Many(list) => list.is_empty(),
                Vals::One(_) => false,
            };
            return absent == (c.values == ["true"]);
        }
        let (op, if_exists) = match op.strip_suffix("IfExists") {
            Some(base) => (base, true),
            None => (op, false),
        };
        let negated = op.contains("Not");
        let test = |v: &str| {
            let any = c.values.iter().any(|p| match op {
                "StringEquals" | "StringNotEquals" => *p == v,
                "StringLike" | "StringNotLike" => glob(p, v, false),
                other => panic!("the reference does not know operator {other}"),
            });
            any != negated
        };
        match (set, &vals) {
            ("plain", Vals::Missing) => if_exists || negated,
            ("plain", Vals::Many(_)) => false,
            ("all", Vals::Missing) => true,
            ("all", Vals::Many(list)) => list.iter().all(|v| test(v)),
            ("any", Vals::Missing) => false,
            ("any", Vals::Many(list)) => list.iter().any(|v| test(v)),
            (_, Vals::One(v)) => test(v),
            _ => unreachable!(),
        }
    }

    /// `Ok(grant)` when the statement applies; `Err` says why not.
    fn applies(&self, st: &Stmt, place: Where) -> Result<Grant, String> {
        let grant = match (&st.principal, place) {
            (_, Where::Identity | Where::Boundary | Where::Scp(_)) => Grant::Direct,
            // AWS: a Deny with NotPrincipal in a resource-based policy always
            // denies a principal that has a permissions boundary.
            (Some((true, _)), _) if st.effect == Effect::Deny && self.has_boundary() => Grant::Direct,
            (None, _) => {
                panic!("generator bug: key or resource policy statement without a principal")
            }
            (Some((false, Principals::Star)), _) => Grant::Direct,
            (Some((true, Principals::Star)), _) => return Err("NotPrincipal \"*\"".into()),
            (Some((false, Principals::Aws(list))), _) => {
                list.iter().filter_map(|w| self.caller.grant(*w)).max().ok_or("principal does not match")?
            }
            (Some((true, Principals::Aws(list))), _) => {
                if list.iter().any(|w| self.caller.listed_by(*w)) {
                    return Err("listed in NotPrincipal".into());
                }
                Grant::Direct
            }
        };
        if st.actions.iter().any(|p| glob(p, self.req.action, true)) == st.not_action {
            return Err("action does not match".into());
        }
        if st.resources.iter().any(|p| resource_matches(p, self.req.resource)) == st.not_resource {
            return Err("resource does not match".into());
        }
        for c in &st.conditions {
            if !self.condition_holds(c, place) {
                return Err(format!("condition {c:?} fails (value {:?})", self.values(c.key, place)));
            }
        }
        Ok(grant)
    }
}

/// The default key policy: the key's account root may do everything.
fn default_key_policy() -> Vec<Stmt> {
    vec![Stmt {
        effect: Effect::Allow,
        principal: Some((false, Principals::Aws(vec![Who::RootA]))),
        not_action: false,
        actions: vec!["kms:*"],
        not_resource: false,
        resources: vec!["*"],
        conditions: vec![],
    }]
}

/// A statement named in an answer: policy label, index, effect.
type Named = (String, usize, Effect);

struct Verdict {
    reason: Reason,
    matched: Vec<Named>,
    trace: Vec<String>,
}

fn reference(w: &World, req: &Req) -> Verdict {
    let caller = caller(req.principal);
    let principal = w.principals.iter().find(|p| p.arn == caller.identity);
    let resource = w.resources.iter().find(|r| r.arn == req.resource);
    let ctx = Ctx { req, caller, principal, resource };
    let is_key = is_key_arn(req.resource);

    // 1. The policies in play.
    let mut policies: Vec<(String, Where, Vec<Stmt>)> = Vec::new();
    if let Some(p) = principal {
        for (i, doc) in p.policies.iter().enumerate() {
            policies.push((p.policy_name(i), Where::Identity, doc.clone()));
        }
        if let Some(doc) = &p.boundary {
            policies.push((format!("boundary:{}-boundary", p.short), Where::Boundary, doc.clone()));
        }
    }
    // SCPs bound account A's callers (account B is outside the organization).
    if let Some(levels) = w.scps.as_ref().filter(|_| ctx.caller.account == A) {
        for (l, level) in levels.iter().enumerate() {
            for (i, doc) in level.iter().enumerate() {
                policies.push((format!("scp:{}", scp_name(l, i)), Where::Scp(l), doc.clone()));
            }
        }
    }
    match resource {
        Some(r) if is_key => {
            policies.push(("key-policy".into(), Where::KeyPolicy, r.policy.clone().unwrap_or_else(default_key_policy)))
        }
        Some(r) => {
            if let Some(doc) = &r.policy {
                policies.push(("resource-policy".into(), Where::ResourcePolicy, doc.clone()));
            }
        }
        // An unknown resource: no tags, no policy (an unknown key: no key policy).
        None => {}
    }

    // 2. The statements that apply.
    let (mut denies, mut identity_allows, mut resource_allows) = (Vec::new(), Vec::new(), Vec::new());
    let mut boundary_allows = false;
    let mut scp_level_allows = [false; 3];
    let mut trace = Vec::new();
    for (label, place, doc) in &policies {
        for (i, st) in doc.iter().enumerate() {
            let named = (label.clone(), i, st.effect);
            match ctx.applies(st, *place) {
                Err(why) => trace.push(format!("{label}[{i}] {st:?}: {why}")),
                Ok(grant) => {
                    trace.push(format!("{label}[{i}] {st:?}: applies ({grant:?})"));
                    match (st.effect, place) {
                        (Effect::Deny, _) => denies.push(named),
                        (Effect::Allow, Where::Identity) => identity_allows.push(named),
                        (Effect::Allow, Where::Boundary) => boundary_allows = true,
                        (Effect::Allow, Where::Scp(l)) => scp_level_allows[*l] = true,
                        (Effect::Allow, _) => resource_allows.push((named, grant)),
                    }
                }
            }
        }
    }

    // 3. Any applicable Deny denies.
    if !denies.is_empty() {
        return Verdict { reason: Reason::ExplicitDeny, matched: denies, trace };
    }
    // The boundary bounds identity allows and resource allows naming a
    // role; a resource policy naming the user or session itself (or `*`)
    // is not bounded (AWS, "Permissions boundaries for IAM entities").
    let bounded_ok = !ctx.has_boundary() || boundary_allows;
    let iam = !identity_allows.is_empty() && bounded_ok;
    let user_or_session = ctx.caller.arn == ALICE || ctx.caller.arn == BOB || ctx.caller.arn == SESSION;
    let direct = resource_allows.iter().any(|(_, g)| match g {
        Grant::Direct if user_or_session => true,
        Grant::Direct | Grant::ViaRole => bounded_ok,
        Grant::Delegate => false,
    });
    let any_resource = !resource_allows.is_empty();
    // Every level of account A's path must have an SCP that allows.
    let scps_ok = w.scps.is_none() || ctx.caller.account != A || scp_level_allows.iter().all(|a| *a);
    // The resource's account is the ARN's; `*` has none (the caller's own).
    let same_account = req.resource.split(':').nth(4).is_none_or(|account| account == ctx.caller.account);
    let allowed = scps_ok
        && if is_key {
            // 4. Only through the key policy: directly (same account), or
            // delegated to IAM; a cross-account caller always needs IAM too.
            (direct && same_account) || (any_resource && iam)
        } else if same_account {
            // 5. Either side; an account-root entry only delegates.
            iam || direct
        } else {
            any_resource && iam
        };
    if !allowed {
        // 6. Nothing allowed.
        return Verdict { reason: Reason::ImplicitDeny, matched: vec![], trace };
    }
    let mut matched = identity_allows;
    matched.extend(resource_allows.into_iter().map(|(n, _)| n));
    Verdict { reason: Reason::Allowed, matched, trace }
}

// ---------------------------------------------------------------------------
// Comparing
// ---------------------------------------------------------------------------

fn engine_named(d: &Decision) -> Vec<Named> {
    let mut out: Vec<Named> = d
        .matched
        .iter()
        .map(|s| {
            let label = match &s.policy {
                PolicyRef::Managed(name) => name.to_string(),
                PolicyRef::Inline(name) => format!("inline:{name}"),
                PolicyRef::KeyPolicy => "key-policy".into(),
                PolicyRef::ResourcePolicy => "resource-policy".into(),
                // The model generates no grants.
                PolicyRef::Grant(id) => format!("grant:{id}"),
                other => other.to_string(),
            };
            let effect = match s.effect {
                EngineEffect::Allow => Effect::Allow,
                EngineEffect::Deny => Effect::Deny,
            };
            (label, s.index, effect)
        })
        .collect();
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    out
}

/// Decides `req` both ways; `Err` with a full report when they differ.
fn compare(w: &World, doc: &Value, state: &State, req: &Req) -> Result<Reason, String> {
    let r = request(req);
    let engine = authorize(state, &r, false).map_err(|e| format!("engine refused {r:?}: {e}"))?;
    let explained = authorize(state, &r, true).map_err(|e| format!("engine refused {r:?}: {e}"))?;
    let mut expected = reference(w, req);
    expected.matched.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let got = engine_named(&engine);
    if engine.reason == expected.reason
        && got == expected.matched
        && explained.reason == engine.reason
        && explained.matched == engine.matched
    {
        return Ok(engine.reason);
    }
    let considered: Vec<String> =
        explained.considered.unwrap_or_default().iter().map(|c| format!("  {}: {}", c.statement, c.outcome)).collect();
    Err(format!(
        "engine and reference disagree\nrequest: {req:?}\nengine: {} matched {got:?} (with explain: {})\nreference: {} matched {:?}\n\
         reference trace:\n  {}\nengine considered:\n{}\nworld:\n{doc:#}",
        engine.reason,
        explained.reason,
        expected.reason,
        expected.matched,
        expected.trace.join("\n  "),
        considered.join("\n"),
    ))
}

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

fn values(pool: &'static [&'static str]) -> impl Strategy<Value = Vec<&'static str>> {
    subsequence(pool, 1..=2)
}

fn cond() -> impl Strategy<Value = Cond> {
    const PROJECT_KEYS: &[&str] = &["aws:ResourceTag/Project", "AWS:resourcetag/Project", "aws:ResourceTag/project"];
    const PROJECT_VALUES: &[&str] = &["Alpha", "Beta", "alpha"];
    const LIKE: &[&str] = &["Al*", "*ta", "B?ta", "*", "alpha"];
    const TAG_KEYS: &[&str] = &["Project", "Owner", "project"];
    let make = |(op, key, values): (&'static str, &'static str, Vec<&'static str>)| Cond { op, key, values };
    prop_oneof![
        (
            select(&["StringEquals", "StringNotEquals", "ForAllValues:StringEquals"][..]),
            select(PROJECT_KEYS),
            values(PROJECT_VALUES)
        )
            .prop_map(make),
        (Just("StringLike"), select(PROJECT_KEYS), values(LIKE)).prop_map(make),
        (Just("Null"), select(&["aws:ResourceTag/Type", "aws:resourcetag/type"][..]), select(&["true", "false"][..]))
            .prop_map(|(op, key, v)| Cond { op, key, values: vec![v] }),
        (Just("StringEquals"), select(&["aws:PrincipalTag/team", "aws:principaltag/Team"][..]), values(&["alpha", "beta"]))
            .prop_map(make),
        (
            select(&["ForAllValues:StringEquals", "ForAnyValue:StringEquals", "StringEquals", "StringNotEquals"][..]),
            select(&["aws:TagKeys", "aws:tagkeys"][..]),
            values(TAG_KEYS)
        )
            .prop_map(make),
        (
            select(&["StringEqualsIfExists", "ForAnyValue:StringEquals"][..]),
            select(&["aws:RequestTag/Project", "aws:requesttag/project"][..]),
            values(PROJECT_VALUES)
        )
            .prop_map(make),
    ]
}

fn principals() -> impl Strategy<Value = Principals> {
    const WHO: &[Who] = &[Who::RootA, Who::AccountB, Who::RoleDev, Who::UserBob, Who::UserAlice, Who::Anyone];
    prop_oneof![1 => Just(Principals::Star), 5 => subsequence(WHO, 1..=2).prop_map(Principals::Aws)]
}

/// A statement; `with_principal` for key and resource policies, where a
/// `Deny` sometimes uses `NotPrincipal`.
fn stmt(with_principal: bool) -> impl Strategy<Value = Stmt> {
    (
        prop_oneof![3 => Just(Effect::Allow), 1 => Just(Effect::Deny)],
        principals(),
        proptest::bool::weighted(0.25),
        proptest::bool::weighted(0.15),
        subsequence(ACTION_PATTERNS, 1..=2),
        proptest::bool::weighted(0.15),
        subsequence(RESOURCE_PATTERNS, 1..=2),
        prop_oneof![3 => Just(0..=0), 2 => Just(1..=1), 1 => Just(2..=2)].prop_flat_map(|n| prop::collection::vec(cond(), n)),
    )
        .prop_map(move |(effect, p, not_principal, not_action, actions, not_resource, resources, mut conditions)| {
            let mut seen = Vec::new();
            conditions.retain(|c| {
                let fresh = !seen.contains(&(c.op, c.key));
                seen.push((c.op, c.key));
                fresh
            });
            let principal = with_principal.then(|| (effect == Effect::Deny && not_principal, p));
            Stmt { effect, principal, not_action, actions, not_resource, resources, conditions }
        })
}

fn policy(with_principal: bool) -> impl Strategy<Value = Vec<Stmt>> {
    prop::collection::vec(stmt(with_principal), 1..=3)
}

fn principal_model(arn: &'static str, short: &'static str) -> impl Strategy<Value = PrincipalModel> {
    (
        select(&[None, Some("alpha"), Some("beta")][..]),
        prop::collection::vec(policy(false), 0..=2),
        prop::option::weighted(0.35, policy(false)),
    )
        .prop_map(move |(team, policies, boundary)| PrincipalModel { arn, short, team, policies, boundary })
}

/// Three levels (root, unit, account A) of one or two SCPs each.
fn scps() -> impl Strategy<Value = Vec<Vec<Vec<Stmt>>>> {
    prop::collection::vec(prop::collection::vec(policy(false), 1..=2), 3..=3)
}

fn resource_model(arn: &'static str) -> impl Strategy<Value = ResourceModel> {
    (
        select(&[None, Some("Alpha"), Some("Beta")][..]),
        select(&[None, Some("Reserved"), Some("General")][..]),
        prop::option::weighted(0.6, policy(true)),
    )
        .prop_map(move |(project, typ, policy)| ResourceModel { arn, project, typ, policy })
}

fn world() -> impl Strategy<Value = World> {
    (
        principal_model(ALICE, "alice"),
        principal_model(DEV, "dev"),
        principal_model(BOB, "bob"),
        resource_model(K1),
        prop::option::weighted(0.85, resource_model(K2)),
        prop::option::weighted(0.85, resource_model(Q1)),
        prop::option::weighted(0.35, scps()),
    )
        .prop_map(|(alice, dev, bob, k1, k2, q1, scps)| World {
            principals: vec![alice, dev, bob],
            resources: [Some(k1), k2, q1].into_iter().flatten().collect(),
            scps,
        })
}

fn req() -> impl Strategy<Value = Req> {
    (
        select(REQUEST_PRINCIPALS),
        select(REQUEST_ACTIONS),
        select(REQUEST_RESOURCES),
        select(&[None, Some("Alpha"), Some("Beta")][..]),
        any::<bool>(),
        select(&[None, Some(("team", "alpha")), Some(("Team", "beta")), Some(("team", "beta"))][..]),
    )
        .prop_map(|(principal, action, resource, project_tag, tag_keys, session_tag)| Req {
            principal,
            action,
            resource,
            project_tag,
            tag_keys,
            session_tag: session_tag.filter(|_| principal == SESSION),
        })
}

proptest! {
    // 512 cases unless PROPTEST_CASES says otherwise; no regression files:
    // a failure prints the shrunk case instead.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// docs/semantics.md "Evaluating a request" and "Operators": the engine's
    /// reason and decisive statements equal the reference's.
    #[test]
    fn engine_agrees_with_reference(w in world(), reqs in prop::collection::vec(req(), 1..=24)) {
        let (doc, state) = build(&w);
        for r in &reqs {
            if let Err(report) = compare(&w, &doc, &state, r) {
                prop_assert!(false, "{}", report);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Hand-written cases: the trickiest rules, reference and engine together
// ---------------------------------------------------------------------------

fn st(effect: Effect, actions: &[&'static str], resources: &[&'static str]) -> Stmt {
    Stmt {
        effect,
        principal: None,
        not_action: false,
        actions: actions.to_vec(),
        not_resource: false,
        resources: resources.to_vec(),
        conditions: vec![],
    }
}

impl Stmt {
    fn by(mut self, who: &[Who]) -> Stmt {
        self.principal = Some((false, Principals::Aws(who.to_vec())));
        self
    }
    fn when(mut self, op: &'static str, key: &'static str, values: &[&'static str]) -> Stmt {
        self.conditions.push(Cond { op, key, values: values.to_vec() });
        self
    }
}

/// Alice, dev and bob without tags or policies; k1 and k2 with the default
/// key policy, k1 tagged Project=Alpha; q1 without a resource policy.
fn base_world() -> World {
    let p = |arn, short| PrincipalModel { arn, short, team: None, policies: vec![], boundary: None };
    let r = |arn, project| ResourceModel { arn, project, typ: None, policy: None };
    World {
        principals: vec![p(ALICE, "alice"), p(DEV, "dev"), p(BOB, "bob")],
        resources: vec![r(K1, Some("Alpha")), r(K2, None), r(Q1, None)],
        scps: None,
    }
}

fn principal_mut<'w>(w: &'w mut World, arn: &str) -> &'w mut PrincipalModel {
    w.principals.iter_mut().find(|p| p.arn == arn).unwrap()
}

fn resource_mut<'w>(w: &'w mut World, arn: &str) -> &'w mut ResourceModel {
    w.resources.iter_mut().find(|r| r.arn == arn).unwrap()
}

fn ask(principal: &'static str, action: &'static str, resource: &'static str) -> Req {
    Req { principal, action, resource, project_tag: None, tag_keys: false, session_tag: None }
}

/// Both the reference and the engine give `want`.
#[track_caller]
fn check(w: &World, r: Req, want: Reason) {
    let got = reference(w, &r);
    assert_eq!(got.reason, want, "reference on {r:?}\n  {}", got.trace.join("\n  "));
    let (doc, state) = build(w);
    match compare(w, &doc, &state, &r) {
        Ok(reason) => assert_eq!(reason, want),
        Err(report) => panic!("{report}"),
    }
}

/// Rule 4, last sentence: a requester from another account needs the key
/// policy and its own IAM allow, even when the key policy names it.
#[test]
fn cross_account_key_access_needs_both_sides() {
    let mut w = base_world();
    let bob_on_k1 = || ask(BOB, "kms:Decrypt", K1);

    // The default key policy trusts only account A: bob's IAM is not enough.
    principal_mut(&mut w, BOB).policies = vec![vec![st(Effect::Allow, &["kms:*"], &["*"])]];
    check(&w, bob_on_k1(), Reason::ImplicitDeny);

    // Named directly in the key policy, with his IAM allow: allowed.
    resource_mut(&mut w, K1).policy = Some(vec![
        st(Effect::Allow, &["kms:*"], &["*"]).by(&[Who::RootA]),
        st(Effect::Allow, &["kms:Decrypt"], &["*"]).by(&[Who::UserBob]),
    ]);
    check(&w, bob_on_k1(), Reason::Allowed);

    // Named directly but without IAM: still denied (a same-account user
    // named directly would not need IAM).
    principal_mut(&mut w, BOB).policies = vec![];
    check(&w, bob_on_k1(), Reason::ImplicitDeny);
    resource_mut(&mut w, K1).policy = Some(vec![st(Effect::Allow, &["kms:Decrypt"], &["*"]).by(&[Who::UserAlice])]);
    check(&w, ask(ALICE, "kms:Decrypt", K1), Reason::Allowed);

    // The key policy names bob's account ("444455556666"): delegated, so
    // his IAM must allow, and an IAM allow for another key does not count.
    resource_mut(&mut w, K1).policy = Some(vec![st(Effect::Allow, &["kms:*"], &["*"]).by(&[Who::AccountB])]);
    check(&w, bob_on_k1(), Reason::ImplicitDeny);
    principal_mut(&mut w, BOB).policies =
        vec![vec![st(Effect::Allow, &["kms:Decrypt"], &["arn:aws:kms:us-east-1:111122223333:key/k2"])]];
    check(&w, bob_on_k1(), Reason::ImplicitDeny);
    principal_mut(&mut w, BOB).policies = vec![vec![st(Effect::Allow, &["kms:Decrypt"], &["arn:aws:kms:*:*:key/k?"])]];
    check(&w, bob_on_k1(), Reason::Allowed);
}

/// Rule 4: without a key-policy statement for the caller or its account,
/// nothing is allowed whatever IAM says; a role entry covers its sessions;
/// an unknown key has no key policy at all.
#[test]
fn key_policy_decides_whatever_iam_says() {
    let mut w = base_world();
    principal_mut(&mut w, ALICE).policies = vec![vec![st(Effect::Allow, &["*"], &["*"])]];
    check(&w, ask(ALICE, "kms:Encrypt", K1), Reason::Allowed); // default key policy delegates
    check(&w, ask(DEV, "kms:Encrypt", K1), Reason::ImplicitDeny); // delegated, but dev has no IAM allow

    resource_mut(&mut w, K1).policy = Some(vec![st(Effect::Allow, &["kms:En?rypt"], &["*"]).by(&[Who::RoleDev])]);
    check(&w, ask(ALICE, "kms:Encrypt", K1), Reason::ImplicitDeny);
    check(&w, ask(SESSION, "kms:Encrypt", K1), Reason::Allowed);
    check(&w, ask(DEV, "KMS:ENCRYPT", K1), Reason::Allowed);
    check(&w, ask(SESSION, "kms:Decrypt", K1), Reason::ImplicitDeny);

    w.resources.retain(|r| r.arn != K2);
    check(&w, ask(ALICE, "kms:Encrypt", K2), Reason::ImplicitDeny);
}

/// Rule 5: on a same-account queue, either side suffices, but a resource
/// policy naming only the account root delegates to IAM; cross-account
/// needs both sides.
#[test]
fn resource_policy_root_delegates_and_cross_account_needs_both() {
    let mut w = base_world();
    resource_mut(&mut w, Q1).policy = Some(vec![st(Effect::Allow, &["sqs:SendMessage"], &["*"]).by(&[Who::RootA])]);
    check(&w, ask(ALICE, "sqs:SendMessage", Q1), Reason::ImplicitDeny);
    principal_mut(&mut w, ALICE).policies = vec![vec![st(Effect::Allow, &["sqs:*"], &[Q1])]];
    check(&w, ask(ALICE, "sqs:SendMessage", Q1), Reason::Allowed);

    resource_mut(&mut w, Q1).policy =
        Some(vec![st(Effect::Allow, &["sqs:SendMessage"], &["*"]).by(&[Who::RoleDev, Who::UserBob])]);
    check(&w, ask(SESSION, "sqs:SendMessage", Q1), Reason::Allowed); // named: no IAM needed
    check(&w, ask(BOB, "sqs:SendMessage", Q1), Reason::ImplicitDeny); // cross-account: IAM too
    principal_mut(&mut w, BOB).policies = vec![vec![st(Effect::Allow, &["sqs:SendMessage"], &["*"])]];
    check(&w, ask(BOB, "sqs:SendMessage", Q1), Reason::Allowed);

    // NotPrincipal naming bob's account root does not exempt bob.
    let mut deny = st(Effect::Deny, &["*"], &["*"]);
    deny.principal = Some((true, Principals::Aws(vec![Who::AccountB])));
    resource_mut(&mut w, Q1).policy.as_mut().unwrap().push(deny);
    check(&w, ask(BOB, "sqs:SendMessage", Q1), Reason::ExplicitDeny);
}

/// Condition keys: aws:ResourceTag is not available in key policies nor for
/// kms:CreateKey; a negated operator on a missing key holds; a plain
/// operator on the multivalued aws:TagKeys does not match; ForAllValues
/// holds when the key is missing.
#[test]
fn condition_keys_and_missing_values() {
    let mut w = base_world();
    principal_mut(&mut w, ALICE).policies = vec![vec![st(Effect::Allow, &["kms:*"], &["*"])]];
    resource_mut(&mut w, K1).policy = Some(vec![
        st(Effect::Allow, &["kms:*"], &["*"]).by(&[Who::RootA]),
        st(Effect::Deny, &["kms:Decrypt"], &["*"]).by(&[Who::Anyone]).when("StringEquals", "aws:ResourceTag/Project", &["Alpha"]),
    ]);
    check(&w, ask(ALICE, "kms:Decrypt", K1), Reason::Allowed);

    // The same Deny in an identity policy sees the tag (key names are
    // case-insensitive).
    principal_mut(&mut w, ALICE).policies.push(vec![st(Effect::Deny, &["kms:Decrypt"], &["*"]).when(
        "StringEquals",
        "AWS:resourcetag/project",
        &["Alpha"],
    )]);
    check(&w, ask(ALICE, "kms:Decrypt", K1), Reason::ExplicitDeny);

    // CreateKey: no aws:ResourceTag; StringNotEquals on the missing key holds.
    principal_mut(&mut w, ALICE).policies = vec![
        vec![st(Effect::Allow, &["kms:*"], &["*"])],
        vec![st(Effect::Deny, &["kms:CreateKey"], &["*"]).when("StringNotEquals", "aws:ResourceTag/Project", &["Alpha"])],
    ];
    check(&w, ask(ALICE, "kms:CreateKey", "*"), Reason::ExplicitDeny);

    // aws:TagKeys = ["Project"]: plain StringEquals does not match it,
    // ForAnyValue does; ForAllValues holds when aws:TagKeys is absent.
    let tagging = |tag_keys| Req { project_tag: Some("Alpha"), tag_keys, ..ask(ALICE, "kms:TagResource", K2) };
    principal_mut(&mut w, ALICE).policies =
        vec![vec![st(Effect::Allow, &["kms:TagResource"], &["*"]).when("StringEquals", "aws:TagKeys", &["Project"])]];
    check(&w, tagging(true), Reason::ImplicitDeny);
    principal_mut(&mut w, ALICE).policies =
        vec![vec![st(Effect::Allow, &["kms:TagResource"], &["*"]).when("ForAnyValue:StringEquals", "aws:TagKeys", &["Project"])]];
    check(&w, tagging(true), Reason::Allowed);
    check(&w, tagging(false), Reason::ImplicitDeny);
    principal_mut(&mut w, ALICE).policies =
        vec![vec![st(Effect::Allow, &["kms:TagResource"], &["*"]).when("ForAllValues:StringEquals", "aws:TagKeys", &["Owner"])]];
    check(&w, tagging(false), Reason::Allowed);
    check(&w, tagging(true), Reason::ImplicitDeny);
}
