//! The IAM policy language: JSON documents parsed, validated and compiled
//! once into a form that evaluation reads without touching JSON.
//!
//! A malformed document is refused whole with a [`PolicyError`] that names
//! the JSON path and the reason, e.g.
//! `Statement[2].Effect: expected "Allow" or "Deny", found "Permit"`.
//! Compiling builds the wildcard matchers, pre-parses condition values and
//! indexes statements by action so a request looks at few of them.

mod catalog;
pub mod condition;
pub mod keys;
pub mod pattern;

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use serde_json::Value;
use smallvec::SmallVec;
use thiserror::Error;

use crate::arn::{is_account_id, Arn};
use crate::path::FieldPath;
use catalog::{ActionSet, KnownAction};
use condition::{ArnPattern, Condition};
use pattern::{Pattern, Syntax};

/// A refused policy document: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct PolicyError {
    /// JSON path inside the document, e.g. `Statement[2].Effect`.
    pub path: FieldPath,
    pub message: String,
}

impl PolicyError {
    fn at(path: &FieldPath, message: impl fmt::Display) -> PolicyError {
        PolicyError { path: path.clone(), message: message.to_string() }
    }
}

/// Where a policy applies, which decides whether `Principal` is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Attached to a user or role: no `Principal`.
    Identity,
    /// A KMS key policy: `Principal` or `NotPrincipal` in every statement.
    Key,
    /// A resource-based policy on any other resource: likewise.
    Resource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Allow => "Allow",
            Effect::Deny => "Deny",
        })
    }
}

/// One entry of a `Principal` or `NotPrincipal` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalEntry {
    /// `"*"` or `{"AWS": "*"}`.
    Any,
    /// `arn:aws:iam::A:root` or `"A"`: the account.
    Account(Box<str>),
    User(Box<str>),
    /// A role, by account and name: matches the role and its sessions.
    Role {
        account: Box<str>,
        name: Box<str>,
    },
    Session(Box<str>),
    /// `Service`, `Federated`, `CanonicalUser`, or an AWS ARN of another
    /// kind: matched by value.
    Other(Box<str>),
}

/// `Principal` / `NotPrincipal`.
#[derive(Debug, Clone)]
pub struct Principals {
    pub negated: bool,
    pub entries: Vec<PrincipalEntry>,
}

/// `Action` / `NotAction`.
#[derive(Debug, Clone)]
pub struct Actions {
    pub negated: bool,
    pub patterns: Vec<Pattern>,
}

/// `Resource` / `NotResource`.
#[derive(Debug, Clone)]
pub struct Resources {
    pub negated: bool,
    /// One pattern (the usual case) is held in the statement itself.
    pub patterns: SmallVec<[ArnPattern; 1]>,
}

/// A compiled statement.
#[derive(Debug, Clone)]
pub struct Statement {
    /// Position in the document's `Statement` list.
    pub index: usize,
    pub sid: Option<Arc<str>>,
    pub effect: Effect,
    pub principal: Option<Principals>,
    pub actions: Actions,
    pub resources: Resources,
    pub conditions: Vec<Condition>,
    /// The known actions (`catalog`) that `actions` covers, matched when
    /// the statement was compiled.
    known_actions: ActionSet,
}

impl Statement {
    /// Does the statement's `Action`/`NotAction` cover `action` (given
    /// lowercased)?
    pub fn covers_action(&self, action: &str) -> bool {
        self.actions.patterns.iter().any(|p| p.matches(action, &pattern::NoValues)) != self.actions.negated
    }

    /// [`Statement::covers_action`] for an action known to be none of the
    /// statement's exact (wildcard-free) action patterns, as a
    /// [`PolicySet`] candidate that is not an exact hit: only the patterns
    /// with wildcards are tried.
    pub fn covers_action_by_wildcards(&self, action: &str) -> bool {
        if self.actions.negated {
            return self.covers_action(action);
        }
        self.actions.patterns.iter().any(|p| p.exact().is_none() && p.matches(action, &pattern::NoValues))
    }

    /// [`Statement::covers_action`] for a request's action: one bit when
    /// the action is a known one, the patterns otherwise.
    #[inline]
    pub fn covers(&self, action: &ActionKey<'_>) -> bool {
        match action.known {
            Some(id) => self.known_actions.contains(id),
            None => self.covers_action(action.lower),
        }
    }

    /// [`Statement::covers_action_by_wildcards`] for a request's action.
    /// For a known action this is the same bit as [`Statement::covers`]:
    /// a statement that names the action exactly is an exact hit, so for
    /// any other its exact patterns cannot match.
    #[inline]
    pub fn covers_by_wildcards(&self, action: &ActionKey<'_>) -> bool {
        match action.known {
            Some(id) => self.known_actions.contains(id),
            None => self.covers_action_by_wildcards(action.lower),
        }
    }
}

/// One list of statement indices in the action index.
type Slot = (Box<str>, SmallVec<[u32; 4]>);

/// Statements indexed by the actions they name. The tables are keyed by a
/// hash computed once per request ([`ActionKey`]), not once per policy.
///
/// INVARIANT: every list is sorted, without repeats, and complete: an
/// `exact` list also holds the statements of its service's `by_service`
/// list and of `always`, and a `by_service` list those of `always`, so one
/// lookup gives every candidate and nothing is merged per request.
#[derive(Debug, Clone, Default)]
struct ActionIndex {
    /// Lowercased `service:action` without wildcards.
    exact: HashTable<Slot>,
    /// Lowercased service prefix, for patterns with wildcards after the colon.
    by_service: HashTable<Slot>,
    /// `*`, wildcards in the service part, and every `NotAction` statement.
    always: Vec<u32>,
}

/// A fixed seed: the hash of a request's action is computed once and used
/// against every policy's tables, so all must agree on the hasher.
const ACTION_HASH: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x7a67_7761_7264);

/// Key equality in the action tables, short keys compared inline.
fn same(key: &str, text: &str) -> bool {
    pattern::same_bytes(key.as_bytes(), text.as_bytes())
}

fn action_hash(text: &str) -> u64 {
    ACTION_HASH.hash_one(text)
}

/// A request's action, lowercased and hashed once for all policies.
#[derive(Debug, Clone, Copy)]
pub struct ActionKey<'a> {
    pub lower: &'a str,
    service: &'a str,
    exact_hash: u64,
    service_hash: u64,
    /// Its number, when it is one of the actions the `catalog` knows.
    known: Option<KnownAction>,
}

impl<'a> ActionKey<'a> {
    /// `lower` must already be lowercased.
    pub fn new(lower: &'a str) -> ActionKey<'a> {
        let service = lower.split_once(':').map_or(lower, |(s, _)| s);
        let exact_hash = action_hash(lower);
        ActionKey { lower, service, exact_hash, service_hash: action_hash(service), known: catalog::known(lower, exact_hash) }
    }
}

fn insert(table: &mut HashTable<Slot>, key: &str, statement: u32) {
    let hash = action_hash(key);
    match table.find_mut(hash, |(k, _)| &**k == key) {
        Some((_, list)) => {
            if list.last() != Some(&statement) {
                list.push(statement);
            }
        }
        None => {
            table.insert_unique(hash, (key.into(), SmallVec::from_slice(&[statement])), |(k, _)| action_hash(k));
        }
    }
}

/// The version of the policy language, which decides whether `${...}` is a
/// variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V2012,
    V2008,
}

/// A compiled policy document. Everything but the source document is read
/// through accessors: the statements and the action index over them are
/// built together and must not drift apart.
#[derive(Debug, Clone)]
pub struct Policy {
    kind: PolicyKind,
    version: Version,
    id: Option<String>,
    /// Shared with the [`PolicySet`]s that index them, which hold each
    /// statement directly.
    statements: Vec<Arc<Statement>>,
    index: ActionIndex,
    /// The document as it was given, for export.
    pub source: Arc<Value>,
}

impl Policy {
    /// Parses and compiles a JSON policy document given as text.
    pub fn from_json(text: &str, kind: PolicyKind) -> Result<Policy, PolicyError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| PolicyError::at(&FieldPath::root(), format!("not valid JSON: {e}")))?;
        Policy::compile(&value, kind)
    }

    /// Compiles a policy document.
    pub fn compile(doc: &Value, kind: PolicyKind) -> Result<Policy, PolicyError> {
        let obj = doc.as_object().ok_or_else(|| {
            PolicyError::at(&FieldPath::root(), format!("a policy document is a JSON object, found {}", type_name(doc)))
        })?;
        for key in obj.keys() {
            if !matches!(key.as_str(), "Version" | "Id" | "Statement") {
                return Err(PolicyError::at(
                    &FieldPath::field(key.as_str()),
                    unknown_field(key, &["Version", "Id", "Statement"]),
                ));
            }
        }
        let version = match obj.get("Version") {
            None => Version::V2008,
            Some(Value::String(v)) if v == "2012-10-17" => Version::V2012,
            Some(Value::String(v)) if v == "2008-10-17" => Version::V2008,
            Some(other) => {
                return Err(PolicyError::at(
                    &FieldPath::field("Version"),
                    format!("expected \"2012-10-17\" or \"2008-10-17\", found {}", show(other)),
                ))
            }
        };
        let id = match obj.get("Id") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(PolicyError::at(&FieldPath::field("Id"), format!("expected a string, found {}", show(other))))
            }
        };
        let statements_json: Vec<(FieldPath, &Value)> = match obj.get("Statement") {
            None => {
                return Err(PolicyError::at(&FieldPath::field("Statement"), "missing: a policy needs at least one statement"))
            }
            Some(Value::Array(items)) if items.is_empty() => {
                return Err(PolicyError::at(&FieldPath::field("Statement"), "empty: a policy needs at least one statement"))
            }
            Some(Value::Array(items)) => {
                items.iter().enumerate().map(|(i, v)| (FieldPath::field("Statement").at(i), v)).collect()
            }
            Some(v @ Value::Object(_)) => vec![(FieldPath::field("Statement"), v)],
            Some(other) => {
                return Err(PolicyError::at(
                    &FieldPath::field("Statement"),
                    format!("expected a statement object or an array of them, found {}", show(other)),
                ))
            }
        };
        let mut statements = Vec::with_capacity(statements_json.len());
        let mut sids: HashMap<&str, &FieldPath> = HashMap::new();
        for (index, (path, value)) in statements_json.iter().enumerate() {
            let statement = compile_statement(path, value, index, kind, version)?;
            if let Some(sid) = value.get("Sid").and_then(Value::as_str) {
                if let Some(first) = sids.insert(sid, path) {
                    return Err(PolicyError::at(&path.then("Sid"), format!("{sid:?} is already the Sid of {first}")));
                }
            }
            statements.push(Arc::new(statement));
        }
        let index = build_index(&statements);
        Ok(Policy { kind, version, id, statements, index, source: Arc::new(doc.clone()) })
    }

    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The document's `Id`.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The statements, in document order (indices match [`Policy::candidates`]).
    pub fn statements(&self) -> &[Arc<Statement>] {
        &self.statements
    }

    /// The statements that may cover `action_lower` (a lowercased
    /// `service:action`), in document order, each once. The caller still
    /// checks the action against wildcard patterns and `NotAction`.
    pub fn candidates(&self, action: &ActionKey<'_>) -> &[u32] {
        if let Some((_, list)) = self.index.exact.find(action.exact_hash, |(k, _)| same(k, action.lower)) {
            return list;
        }
        if let Some((_, list)) = self.index.by_service.find(action.service_hash, |(k, _)| same(k, action.service)) {
            return list;
        }
        &self.index.always
    }
}

fn build_index(statements: &[Arc<Statement>]) -> ActionIndex {
    let mut index = ActionIndex::default();
    file_statements(statements, |bucket, i| match bucket {
        Bucket::Exact(action) => insert(&mut index.exact, action, i),
        Bucket::Service(svc) => insert(&mut index.by_service, svc, i),
        Bucket::Always => {
            if index.always.last() != Some(&i) {
                index.always.push(i);
            }
        }
    });
    let merge = |list: &mut SmallVec<[u32; 4]>, more: &[u32]| {
        list.extend_from_slice(more);
        list.sort_unstable();
        list.dedup();
    };
    for (service, list) in index.exact.iter_mut() {
        let svc = service.split_once(':').map_or(&**service, |(s, _)| s);
        if let Some((_, more)) = index.by_service.find(action_hash(svc), |(k, _)| &**k == svc) {
            merge(list, more);
        }
        merge(list, &index.always);
    }
    for (_, list) in index.by_service.iter_mut() {
        merge(list, &index.always);
    }
    index
}

/// Where the action index files a statement, before any merging.
enum Bucket<'a> {
    /// Under a lowercased `service:action` without wildcards.
    Exact(&'a str),
    /// Under a lowercased service prefix (a pattern with wildcards after the colon).
    Service(&'a str),
    /// For every action (`*`, wildcards in the service part, `NotAction`).
    Always,
}

/// Calls `file` for every place a statement goes in an action index, in
/// statement order.
fn file_statements(statements: &[Arc<Statement>], mut file: impl FnMut(Bucket<'_>, u32)) {
    for (i, st) in statements.iter().enumerate() {
        let i = i as u32;
        if st.actions.negated {
            file(Bucket::Always, i);
            continue;
        }
        for p in &st.actions.patterns {
            match (p.exact(), p.service_prefix()) {
                (Some(exact), _) => file(Bucket::Exact(exact), i),
                (None, Some(svc)) => file(Bucket::Service(svc), i),
                (None, None) => file(Bucket::Always, i),
            }
        }
    }
}

/// A statement of a [`PolicySet`]: which policy of the set (by position),
/// and which statement of it. Ordered by policy, then statement: the order
/// in which evaluating the policies one by one would meet them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member(u64);

impl Member {
    fn new(policy: usize, statement: u32) -> Member {
        Member(((policy as u64) << 32) | u64::from(statement))
    }

    /// The policy's position in the set.
    pub fn policy(self) -> usize {
        (self.0 >> 32) as usize
    }

    /// The statement's position in its policy.
    pub fn statement(self) -> usize {
        (self.0 & u64::from(u32::MAX)) as usize
    }
}

/// A statement in a [`PolicySet`]'s lists: where it is, the statement
/// itself and its policy's kind, so that a decision reads neither the
/// policy nor its statement list to reach it.
#[derive(Debug, Clone)]
struct Entry {
    member: Member,
    statement: Arc<Statement>,
    kind: PolicyKind,
}

/// One list of a [`PolicySet`]'s action tables.
type SetSlot = (Box<str>, Vec<Entry>);

/// A principal's identity policies (its managed policies that exist, then
/// its inline ones, each with its name) indexed by action as one: a request
/// looks its action up once for all of them instead of once per policy.
///
/// The lists are kept apart (a statement appears under each of its exact
/// actions, under its service, or in `always`, as it was filed) and merged
/// per request, so the index grows with the policies, not with their
/// product. INVARIANT: every list is sorted without repeats, and for every
/// action [`PolicySet::candidates`] yields exactly the statements that each
/// policy's [`Policy::candidates`] gives, policy after policy; the set is
/// built whole by [`PolicySet::new`] and never changed.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<(Arc<str>, Arc<Policy>)>,
    /// Where the inline policies start in `policies`.
    inline_from: usize,
    exact: HashTable<SetSlot>,
    by_service: HashTable<SetSlot>,
    always: Vec<Entry>,
}

fn set_insert(table: &mut HashTable<SetSlot>, key: &str, entry: Entry) {
    let hash = action_hash(key);
    match table.find_mut(hash, |(k, _)| &**k == key) {
        Some((_, list)) => {
            if list.last().map(|e| e.member) != Some(entry.member) {
                list.push(entry);
            }
        }
        None => {
            table.insert_unique(hash, (key.into(), vec![entry]), |(k, _)| action_hash(k));
        }
    }
}

impl PolicySet {
    /// Indexes the managed policies then the inline ones, in this order
    /// (the order of [`Member::policy`]).
    pub fn new(managed: &[(Arc<str>, Arc<Policy>)], inline: &[(Arc<str>, Arc<Policy>)]) -> PolicySet {
        let policies: Vec<(Arc<str>, Arc<Policy>)> = managed.iter().chain(inline).cloned().collect();
        let (mut exact, mut by_service, mut always) = (HashTable::new(), HashTable::new(), Vec::new());
        for (n, (_, policy)) in policies.iter().enumerate() {
            file_statements(&policy.statements, |bucket, i| {
                let member = Member::new(n, i);
                let Some(statement) = policy.statements.get(i as usize) else { return };
                let entry = Entry { member, statement: statement.clone(), kind: policy.kind };
                match bucket {
                    Bucket::Exact(action) => set_insert(&mut exact, action, entry),
                    Bucket::Service(svc) => set_insert(&mut by_service, svc, entry),
                    Bucket::Always => {
                        if always.last().map(|e: &Entry| e.member) != Some(member) {
                            always.push(entry);
                        }
                    }
                }
            });
        }
        PolicySet { policies, inline_from: managed.len(), exact, by_service, always }
    }

    /// Policy `n` of the set (see [`Member::policy`]): its name, the
    /// policy, and whether it is an inline policy.
    pub fn policy(&self, n: usize) -> Option<(&Arc<str>, &Policy, bool)> {
        self.policies.get(n).map(|(name, policy)| (name, &**policy, n >= self.inline_from))
    }

    /// The statements that may cover the request's action, in evaluation
    /// order, each once. Each comes with whether it is already known to
    /// cover the action (it names the action exactly); the others still
    /// need [`Statement::covers_action`].
    pub fn candidates(&self, action: &ActionKey<'_>) -> Candidates<'_> {
        let exact = self.exact.find(action.exact_hash, |(k, _)| same(k, action.lower)).map_or(&[][..], |(_, l)| l);
        let service = self.by_service.find(action.service_hash, |(k, _)| same(k, action.service)).map_or(&[][..], |(_, l)| l);
        Candidates { exact, service, always: &self.always }
    }
}

/// The merge of a [`PolicySet`]'s three lists for one action.
#[derive(Debug, Clone)]
pub struct Candidates<'a> {
    exact: &'a [Entry],
    service: &'a [Entry],
    always: &'a [Entry],
}

/// One statement [`PolicySet::candidates`] yields.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub member: Member,
    pub statement: &'a Statement,
    /// The kind of the statement's policy.
    pub kind: PolicyKind,
    /// The statement names the action exactly, so it covers it.
    pub covers: bool,
}

impl<'a> Iterator for Candidates<'a> {
    type Item = Candidate<'a>;

    #[inline]
    fn next(&mut self) -> Option<Candidate<'a>> {
        const END: Member = Member(u64::MAX);
        let head = |list: &[Entry]| list.first().map_or(END, |e| e.member);
        let (e, s, a) = (head(self.exact), head(self.service), head(self.always));
        let next = e.min(s).min(a);
        if next == END {
            return None;
        }
        let covers = e == next;
        // The entry itself, from whichever list holds it first.
        let mut found = None;
        for list in [&mut self.exact, &mut self.service, &mut self.always] {
            if let Some((first, rest)) = list.split_first() {
                if first.member == next {
                    found = found.or(Some(first));
                    *list = rest;
                }
            }
        }
        let entry = found?;
        Some(Candidate { member: next, statement: &entry.statement, kind: entry.kind, covers })
    }
}

fn compile_statement(
    path: &FieldPath,
    value: &Value,
    index: usize,
    kind: PolicyKind,
    version: Version,
) -> Result<Statement, PolicyError> {
    const FIELDS: &[&str] =
        &["Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction", "Resource", "NotResource", "Condition"];
    let obj = value
        .as_object()
        .ok_or_else(|| PolicyError::at(path, format!("a statement is a JSON object, found {}", type_name(value))))?;
    for key in obj.keys() {
        if !FIELDS.contains(&key.as_str()) {
            return Err(PolicyError::at(&path.then(key.as_str()), unknown_field(key, FIELDS)));
        }
    }
    let at = |field: &str| path.then(field);
    let sid = match obj.get("Sid") {
        None => None,
        // Key policies accept more characters in a Sid than IAM does; accept
        // the wider set but no control characters.
        Some(Value::String(s)) if s.chars().any(char::is_control) => {
            return Err(PolicyError::at(&at("Sid"), format!("{s:?} holds control characters")));
        }
        Some(Value::String(s)) => Some(Arc::from(s.as_str())),
        Some(other) => return Err(PolicyError::at(&at("Sid"), format!("expected a string, found {}", show(other)))),
    };
    let effect = match obj.get("Effect") {
        Some(Value::String(s)) if s == "Allow" => Effect::Allow,
        Some(Value::String(s)) if s == "Deny" => Effect::Deny,
        Some(other) => {
            return Err(PolicyError::at(&at("Effect"), format!("expected \"Allow\" or \"Deny\", found {}", show(other))))
        }
        None => return Err(PolicyError::at(&at("Effect"), "missing: expected \"Allow\" or \"Deny\"")),
    };

    let principal = match (obj.get("Principal"), obj.get("NotPrincipal")) {
        (Some(_), Some(_)) => {
            return Err(PolicyError::at(path, "has both Principal and NotPrincipal; use one"));
        }
        (Some(p), None) => Some(Principals { negated: false, entries: compile_principals(&at("Principal"), p)? }),
        (None, Some(p)) => Some(Principals { negated: true, entries: compile_principals(&at("NotPrincipal"), p)? }),
        (None, None) => None,
    };
    match (kind, &principal) {
        (PolicyKind::Identity, Some(p)) => {
            let field = if p.negated { "NotPrincipal" } else { "Principal" };
            return Err(PolicyError::at(
                &at(field),
                "not allowed in an identity policy: the principal is whoever the policy is attached to",
            ));
        }
        (PolicyKind::Key | PolicyKind::Resource, None) => {
            return Err(PolicyError::at(
                &at("Principal"),
                "missing: a key or resource policy statement needs Principal or NotPrincipal",
            ));
        }
        _ => {}
    }

    let actions = match (obj.get("Action"), obj.get("NotAction")) {
        (Some(_), Some(_)) => return Err(PolicyError::at(path, "has both Action and NotAction; use one")),
        (Some(a), None) => Actions { negated: false, patterns: compile_actions(&at("Action"), a)? },
        (None, Some(a)) => Actions { negated: true, patterns: compile_actions(&at("NotAction"), a)? },
        (None, None) => return Err(PolicyError::at(&at("Action"), "missing: a statement needs Action or NotAction")),
    };
    let variables = version == Version::V2012;
    let resources = match (obj.get("Resource"), obj.get("NotResource")) {
        (Some(_), Some(_)) => return Err(PolicyError::at(path, "has both Resource and NotResource; use one")),
        (Some(r), None) => Resources { negated: false, patterns: compile_resources(&at("Resource"), r, variables)? },
        (None, Some(r)) => Resources { negated: true, patterns: compile_resources(&at("NotResource"), r, variables)? },
        (None, None) => return Err(PolicyError::at(&at("Resource"), "missing: a statement needs Resource or NotResource")),
    };
    let conditions = match obj.get("Condition") {
        None => Vec::new(),
        Some(c) => compile_conditions(&at("Condition"), c, variables)?,
    };
    let known_actions = ActionSet::covered_by(&actions);
    Ok(Statement { index, sid, effect, principal, actions, resources, conditions, known_actions })
}

/// A string or a non-empty array of strings.
fn strings<'a>(path: &FieldPath, value: &'a Value) -> Result<Vec<(FieldPath, &'a str)>, PolicyError> {
    match value {
        Value::String(s) => Ok(vec![(path.clone(), s.as_str())]),
        Value::Array(items) if items.is_empty() => Err(PolicyError::at(path, "empty list")),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok((path.at(i), s.as_str())),
                other => Err(PolicyError::at(&path.at(i), format!("expected a string, found {}", show(other)))),
            })
            .collect(),
        other => Err(PolicyError::at(path, format!("expected a string or an array of strings, found {}", show(other)))),
    }
}

fn compile_actions(path: &FieldPath, value: &Value) -> Result<Vec<Pattern>, PolicyError> {
    // Actions compare case-insensitively: patterns are lowercased here and
    // requests once per request, so matching is a plain comparison.
    let syntax = Syntax { wildcards: true, variables: false, fold_case: false };
    strings(path, value)?
        .into_iter()
        .map(|(p, s)| {
            let well_formed = s == "*"
                || s.split_once(':')
                    .is_some_and(|(svc, name)| !svc.is_empty() && !name.is_empty() && !s.chars().any(char::is_whitespace));
            if !well_formed {
                return Err(PolicyError::at(&p, format!("{s:?} is not an action: expected \"service:Action\" or \"*\"")));
            }
            Pattern::compile(&s.to_ascii_lowercase(), syntax).map_err(|e| PolicyError::at(&p, e))
        })
        .collect()
}

fn compile_resources(path: &FieldPath, value: &Value, variables: bool) -> Result<SmallVec<[ArnPattern; 1]>, PolicyError> {
    strings(path, value)?
        .into_iter()
        .map(|(p, s)| {
            if s != "*" && !(s.starts_with("arn:") && s.matches(':').count() >= 5) {
                return Err(PolicyError::at(
                    &p,
                    format!("{s:?} is not a resource: expected \"*\" or an ARN (arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE)"),
                ));
            }
            ArnPattern::compile(s, variables, false).map_err(|e| PolicyError::at(&p, e))
        })
        .collect()
}

fn compile_principals(path: &FieldPath, value: &Value) -> Result<Vec<PrincipalEntry>, PolicyError> {
    match value {
        Value::String(s) if s == "*" => Ok(vec![PrincipalEntry::Any]),
        Value::Object(map) if map.is_empty() => Err(PolicyError::at(path, "empty: name at least one principal")),
        Value::Object(map) => {
            let mut entries = Vec::new();
            for (kind, v) in map {
                let field = path.then(kind.as_str());
                match kind.as_str() {
                    "AWS" => {
                        for (p, s) in strings(&field, v)? {
                            entries.push(aws_principal(&p, s)?);
                        }
                    }
                    "Service" | "Federated" | "CanonicalUser" => {
                        for (p, s) in strings(&field, v)? {
                            if s.is_empty() {
                                return Err(PolicyError::at(&p, "empty principal"));
                            }
                            entries.push(if s == "*" { PrincipalEntry::Any } else { PrincipalEntry::Other(s.into()) });
                        }
                    }
                    _ => {
                        return Err(PolicyError::at(
                            &field,
                            unknown_field(kind, &["AWS", "Service", "Federated", "CanonicalUser"]),
                        ))
                    }
                }
            }
            Ok(entries)
        }
        other => Err(PolicyError::at(
            path,
            format!("expected \"*\" or an object such as {{\"AWS\": \"arn:aws:iam::111122223333:root\"}}, found {}", show(other)),
        )),
    }
}

fn aws_principal(path: &FieldPath, s: &str) -> Result<PrincipalEntry, PolicyError> {
    if s == "*" {
        return Ok(PrincipalEntry::Any);
    }
    if is_account_id(s) {
        return Ok(PrincipalEntry::Account(s.into()));
    }
    let arn = Arn::parse(s).ok_or_else(|| {
        PolicyError::at(path, format!("{s:?} is not a principal: expected \"*\", a 12-digit account id or an ARN"))
    })?;
    if s.contains('*') || s.contains('?') {
        return Err(PolicyError::at(path, format!("{s:?}: wildcards are not allowed in principal ARNs (use \"*\" alone)")));
    }
    Ok(match (arn.service, arn.resource_type()) {
        ("iam", "") if arn.resource == "root" => PrincipalEntry::Account(arn.account.into()),
        ("iam", "user") => PrincipalEntry::User(s.into()),
        ("iam", "role") => PrincipalEntry::Role { account: arn.account.into(), name: arn.resource_name().into() },
        ("sts", "assumed-role") => PrincipalEntry::Session(s.into()),
        _ => PrincipalEntry::Other(s.into()),
    })
}

fn compile_conditions(path: &FieldPath, value: &Value, variables: bool) -> Result<Vec<Condition>, PolicyError> {
    let block = value
        .as_object()
        .ok_or_else(|| PolicyError::at(path, format!("expected an object of operators, found {}", show(value))))?;
    let mut out = Vec::new();
    for (operator, keys) in block {
        let op_path = path.then(operator.as_str());
        let keys = keys
            .as_object()
            .ok_or_else(|| PolicyError::at(&op_path, format!("expected an object of condition keys, found {}", show(keys))))?;
        if keys.is_empty() {
            return Err(PolicyError::at(&op_path, "empty: name at least one condition key"));
        }
        for (key, values) in keys {
            let key_path = op_path.then(key.as_str());
            let values = condition_values(&key_path, values)?;
            out.push(Condition::compile(operator, key, &values, variables).map_err(|e| PolicyError::at(&key_path, e))?);
        }
    }
    Ok(out)
}

/// A condition value: a string, number or boolean, or an array of them.
fn condition_values(path: &FieldPath, value: &Value) -> Result<Vec<String>, PolicyError> {
    let scalar = |p: &FieldPath, v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(PolicyError::at(p, format!("expected a string, number or boolean, found {}", show(other)))),
    };
    match value {
        Value::Array(items) if items.is_empty() => Err(PolicyError::at(path, "empty list of values")),
        Value::Array(items) => items.iter().enumerate().map(|(i, v)| scalar(&path.at(i), v)).collect(),
        other => Ok(vec![scalar(path, other)?]),
    }
}

/// The known name that `found` spells in another case, for a "did you
/// mean" hint (element names and operators are case-sensitive).
pub(crate) fn near_miss<'a>(found: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known.into_iter().find(|k| k.eq_ignore_ascii_case(found))
}

/// The hint for a near miss, e.g. ` (did you mean "Effect"? element names
/// are case-sensitive)`; empty without one. `what` names the kind of name.
pub(crate) fn did_you_mean(suggestion: Option<&str>, what: &str) -> String {
    suggestion.map(|s| format!(" (did you mean {s:?}? {what} are case-sensitive)")).unwrap_or_default()
}

fn unknown_field(found: &str, expected: &[&str]) -> String {
    let hint = did_you_mean(near_miss(found, expected.iter().copied()), "element names");
    format!("unknown element {found:?}{hint}; expected one of {}", expected.join(", "))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) | Value::Object(_) => type_name(v).to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(doc: Value, kind: PolicyKind) -> String {
        Policy::compile(&doc, kind).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_path_and_the_reason() {
        let doc = json!({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "kms:*", "Resource": "*"},
            {"Effect": "Allow", "Action": "kms:*", "Resource": "*"},
            {"Effect": "Permit", "Action": "kms:*", "Resource": "*"}]});
        assert_eq!(err(doc, PolicyKind::Identity), r#"Statement[2].Effect: expected "Allow" or "Deny", found "Permit""#);
        assert_eq!(
            err(json!({"Version": "2012-10-18", "Statement": []}), PolicyKind::Identity),
            r#"Version: expected "2012-10-17" or "2008-10-17", found "2012-10-18""#
        );
        assert!(err(json!({"Statement": {"Effect": "Allow", "Action": "kms", "Resource": "*"}}), PolicyKind::Identity)
            .starts_with("Statement.Action: \"kms\" is not an action"));
        assert!(err(
            json!({"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*", "Condition": {"StringEqual": {"a:b": "c"}}}}),
            PolicyKind::Identity
        )
        .starts_with("Statement.Condition.StringEqual.a:b: unknown condition operator"));
        assert!(err(
            json!({"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}}),
            PolicyKind::Identity
        )
        .starts_with("Statement.Principal: not allowed in an identity policy"));
        assert!(err(json!({"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}}), PolicyKind::Key)
            .starts_with("Statement.Principal: missing"));
        assert!(err(json!({"Statement": {"effect": "Allow", "Action": "kms:*", "Resource": "*"}}), PolicyKind::Identity)
            .contains("did you mean \"Effect\""));
        assert!(err(json!({"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "key/1"}}), PolicyKind::Identity)
            .starts_with("Statement.Resource: \"key/1\" is not a resource"));
        assert!(err(
            json!({"Statement": [{"Sid": "A", "Effect": "Allow", "Action": "kms:*", "Resource": "*"},
                                 {"Sid": "A", "Effect": "Deny", "Action": "kms:*", "Resource": "*"}]}),
            PolicyKind::Identity
        )
        .starts_with("Statement[1].Sid: \"A\" is already the Sid of Statement[0]"));
        assert!(err(json!([1]), PolicyKind::Identity).contains("a policy document is a JSON object"));
        assert!(err(
            json!({"Statement": {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:user/*"}, "Action": "kms:*", "Resource": "*"}}),
            PolicyKind::Key
        )
        .contains("wildcards are not allowed"));
    }

    #[test]
    fn statements_are_indexed_by_action() {
        let doc = json!({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*"},
            {"Effect": "Allow", "Action": ["kms:GenerateDataKey*", "kms:Decrypt"], "Resource": "*"},
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"},
            {"Effect": "Deny", "NotAction": "s3:*", "Resource": "*"},
            {"Effect": "Allow", "Action": "*", "Resource": "*"}]});
        let p = Policy::compile(&doc, PolicyKind::Identity).unwrap();
        assert_eq!(p.candidates(&ActionKey::new("kms:decrypt")), &[0, 1, 3, 4]);
        assert_eq!(p.candidates(&ActionKey::new("s3:getobject")), &[2, 3, 4]);
        assert_eq!(p.candidates(&ActionKey::new("sqs:deletequeue")), &[3, 4]);
    }

    #[test]
    fn a_policy_set_yields_what_its_policies_yield_one_by_one() {
        let docs = [
            json!({"Statement": [
                {"Effect": "Allow", "Action": ["kms:Decrypt", "kms:Gen*"], "Resource": "*"},
                {"Effect": "Deny", "Action": "kms:*", "Resource": "*"},
                {"Effect": "Allow", "Action": ["kms:Decrypt", "kms:Decrypt"], "Resource": "*"}]}),
            json!({"Statement": [
                {"Effect": "Allow", "NotAction": "kms:*", "Resource": "*"},
                {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"},
                {"Effect": "Allow", "Action": "*", "Resource": "*"}]}),
            json!({"Statement": {"Effect": "Allow", "Action": "k?s:Encrypt", "Resource": "*"}}),
        ];
        let named: Vec<(Arc<str>, Arc<Policy>)> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (Arc::from(format!("p{i}")), Arc::new(Policy::compile(d, PolicyKind::Identity).unwrap())))
            .collect();
        let set = PolicySet::new(&named[..2], &named[2..]);
        assert_eq!(set.policy(1).map(|(n, _, inline)| (n.to_string(), inline)), Some(("p1".into(), false)));
        assert_eq!(set.policy(2).map(|(n, _, inline)| (n.to_string(), inline)), Some(("p2".into(), true)));
        assert!(set.policy(3).is_none());
        for action in ["kms:decrypt", "kms:generatedatakey", "kms:encrypt", "s3:getobject", "sqs:sendmessage", "kms"] {
            let key = ActionKey::new(action);
            let one_by_one: Vec<(usize, usize)> = named
                .iter()
                .enumerate()
                .flat_map(|(n, (_, p))| p.candidates(&key).iter().map(move |&i| (n, i as usize)))
                .collect();
            let merged: Vec<(Member, bool)> = set.candidates(&key).map(|c| (c.member, c.covers)).collect();
            assert_eq!(merged.iter().map(|(m, _)| (m.policy(), m.statement())).collect::<Vec<_>>(), one_by_one, "{action}");
            for (m, covers) in merged {
                let st = &named[m.policy()].1.statements()[m.statement()];
                assert!(!covers || st.covers_action(action), "{action}: {m:?} is no exact hit");
            }
        }
        let kms: Vec<(usize, usize, bool)> =
            set.candidates(&ActionKey::new("kms:decrypt")).map(|c| (c.member.policy(), c.member.statement(), c.covers)).collect();
        assert_eq!(kms, [(0, 0, true), (0, 1, false), (0, 2, true), (1, 0, false), (1, 2, false), (2, 0, false)]);
    }

    #[test]
    fn principals() {
        let doc = json!({"Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*", "Principal": {
            "AWS": ["arn:aws:iam::111122223333:root", "444455556666", "arn:aws:iam::111122223333:role/path/Dev",
                    "arn:aws:iam::111122223333:user/Ann"],
            "Service": "ec2.amazonaws.com"}}});
        let p = Policy::compile(&doc, PolicyKind::Key).unwrap();
        let entries = &p.statements[0].principal.as_ref().unwrap().entries;
        assert_eq!(entries[0], PrincipalEntry::Account("111122223333".into()));
        assert_eq!(entries[1], PrincipalEntry::Account("444455556666".into()));
        assert_eq!(entries[2], PrincipalEntry::Role { account: "111122223333".into(), name: "Dev".into() });
        assert_eq!(entries[3], PrincipalEntry::User("arn:aws:iam::111122223333:user/Ann".into()));
        assert_eq!(entries[4], PrincipalEntry::Other("ec2.amazonaws.com".into()));
    }
}
