//! Condition operators: parsed and their values pre-compiled once (numbers,
//! dates, CIDRs, base64, wildcard patterns), then evaluated against the
//! values a request supplies.
//!
//! The rules (docs/semantics.md, "Operators"):
//! - several policy values for one key: any may match; for a negated
//!   operator the request value must match none of them;
//! - a missing key makes a condition false, except that a negated operator
//!   holds, `...IfExists` holds, and `Null` tests for exactly that;
//! - `ForAllValues:` holds when every request value matches (and when the key
//!   is missing or empty); `ForAnyValue:` when some value matches (false when
//!   missing); a plain operator on a multivalued key does not match;
//! - a request value that cannot be read as the operator's type (a number, a
//!   date, an address, base64, a boolean) matches nothing, negated or not.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use ipnet::IpNet;
use smallvec::SmallVec;

use thiserror::Error;

use super::keys::{KeyError, KeyRef};
use super::pattern::{same_bytes, Literal, Pattern, PatternError, Resolve, Syntax};
use crate::arn::Arn;

/// The values a request holds for a condition key.
#[derive(Debug, Clone)]
pub enum Values<'a> {
    Missing,
    One(Cow<'a, str>),
    Many(&'a [String]),
}

/// What conditions read from a request.
pub trait Context: Resolve {
    fn values(&self, key: &KeyRef) -> Values<'_>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetMode {
    Plain,
    ForAllValues,
    ForAnyValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn test<T: PartialOrd>(self, request: T, policy: T) -> bool {
        match self {
            Cmp::Eq => request == policy,
            Cmp::Lt => request < policy,
            Cmp::Le => request <= policy,
            Cmp::Gt => request > policy,
            Cmp::Ge => request >= policy,
        }
    }
}

/// An operator's pre-compiled policy values.
#[derive(Debug, Clone)]
enum Operand {
    /// `String*`: patterns (wildcards for `Like`, variables in 2012-10-17,
    /// case folded for `IgnoreCase`); one value (the usual case) is held in
    /// the condition itself.
    Str(SmallVec<[Pattern; 1]>),
    Num {
        values: Vec<f64>,
        cmp: Cmp,
    },
    Date {
        millis: Vec<i64>,
        cmp: Cmp,
    },
    Bool(Vec<bool>),
    Binary(Vec<Vec<u8>>),
    Ip(Vec<IpNet>),
    Arn(Vec<ArnPattern>),
    Null(bool),
}

/// One operator applied to one key, with its values.
#[derive(Debug, Clone)]
pub struct Condition {
    /// The operator as written, e.g. `ForAllValues:StringEquals`.
    pub operator: Arc<str>,
    /// The key as written, e.g. `aws:ResourceTag/Project`.
    pub key_name: Arc<str>,
    pub key: KeyRef,
    set: SetMode,
    negated: bool,
    if_exists: bool,
    operand: Operand,
}

/// The result of one condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub holds: bool,
    /// The key had no value in the request.
    pub missing: bool,
}

/// What type an operator reads its values as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    String,
    Numeric,
    Date,
    Bool,
    Binary,
    Ip,
    Arn,
    Null,
}

/// A base operator: the name without a `ForAllValues:`/`ForAnyValue:`
/// prefix and without `IfExists`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BaseOperator {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    NumericEquals,
    NumericNotEquals,
    NumericLessThan,
    NumericLessThanEquals,
    NumericGreaterThan,
    NumericGreaterThanEquals,
    DateEquals,
    DateNotEquals,
    DateLessThan,
    DateLessThanEquals,
    DateGreaterThan,
    DateGreaterThanEquals,
    Bool,
    BinaryEquals,
    IpAddress,
    NotIpAddress,
    ArnEquals,
    ArnLike,
    ArnNotEquals,
    ArnNotLike,
    Null,
}

/// What a base operator does, as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperatorSpec {
    /// The name as policies spell it (case-sensitive).
    pub name: &'static str,
    pub family: Family,
    /// The request value must match none of the policy values.
    pub negated: bool,
    /// How a request value compares with a policy value (`Numeric*`, `Date*`).
    pub cmp: Cmp,
    /// `*` and `?` are wildcards (`StringLike`, `ArnLike`).
    pub like: bool,
    /// Characters compare case-insensitively.
    pub ignore_case: bool,
}

const fn spec(name: &'static str, family: Family, negated: bool, cmp: Cmp, like: bool, ignore_case: bool) -> OperatorSpec {
    OperatorSpec { name, family, negated, cmp, like, ignore_case }
}

impl BaseOperator {
    /// Every base operator, in the order the documentation lists them.
    pub const ALL: &'static [BaseOperator] = &[
        BaseOperator::StringEquals,
        BaseOperator::StringNotEquals,
        BaseOperator::StringEqualsIgnoreCase,
        BaseOperator::StringNotEqualsIgnoreCase,
        BaseOperator::StringLike,
        BaseOperator::StringNotLike,
        BaseOperator::NumericEquals,
        BaseOperator::NumericNotEquals,
        BaseOperator::NumericLessThan,
        BaseOperator::NumericLessThanEquals,
        BaseOperator::NumericGreaterThan,
        BaseOperator::NumericGreaterThanEquals,
        BaseOperator::DateEquals,
        BaseOperator::DateNotEquals,
        BaseOperator::DateLessThan,
        BaseOperator::DateLessThanEquals,
        BaseOperator::DateGreaterThan,
        BaseOperator::DateGreaterThanEquals,
        BaseOperator::Bool,
        BaseOperator::BinaryEquals,
        BaseOperator::IpAddress,
        BaseOperator::NotIpAddress,
        BaseOperator::ArnEquals,
        BaseOperator::ArnLike,
        BaseOperator::ArnNotEquals,
        BaseOperator::ArnNotLike,
        BaseOperator::Null,
    ];

    /// The operator's table row.
    pub const fn spec(self) -> OperatorSpec {
        use BaseOperator as B;
        use Cmp as C;
        use Family as F;
        match self {
            B::StringEquals => spec("StringEquals", F::String, false, C::Eq, false, false),
            B::StringNotEquals => spec("StringNotEquals", F::String, true, C::Eq, false, false),
            B::StringEqualsIgnoreCase => spec("StringEqualsIgnoreCase", F::String, false, C::Eq, false, true),
            B::StringNotEqualsIgnoreCase => spec("StringNotEqualsIgnoreCase", F::String, true, C::Eq, false, true),
            B::StringLike => spec("StringLike", F::String, false, C::Eq, true, false),
            B::StringNotLike => spec("StringNotLike", F::String, true, C::Eq, true, false),
            B::NumericEquals => spec("NumericEquals", F::Numeric, false, C::Eq, false, false),
            B::NumericNotEquals => spec("NumericNotEquals", F::Numeric, true, C::Eq, false, false),
            B::NumericLessThan => spec("NumericLessThan", F::Numeric, false, C::Lt, false, false),
            B::NumericLessThanEquals => spec("NumericLessThanEquals", F::Numeric, false, C::Le, false, false),
            B::NumericGreaterThan => spec("NumericGreaterThan", F::Numeric, false, C::Gt, false, false),
            B::NumericGreaterThanEquals => spec("NumericGreaterThanEquals", F::Numeric, false, C::Ge, false, false),
            B::DateEquals => spec("DateEquals", F::Date, false, C::Eq, false, false),
            B::DateNotEquals => spec("DateNotEquals", F::Date, true, C::Eq, false, false),
            B::DateLessThan => spec("DateLessThan", F::Date, false, C::Lt, false, false),
            B::DateLessThanEquals => spec("DateLessThanEquals", F::Date, false, C::Le, false, false),
            B::DateGreaterThan => spec("DateGreaterThan", F::Date, false, C::Gt, false, false),
            B::DateGreaterThanEquals => spec("DateGreaterThanEquals", F::Date, false, C::Ge, false, false),
            B::Bool => spec("Bool", F::Bool, false, C::Eq, false, false),
            B::BinaryEquals => spec("BinaryEquals", F::Binary, false, C::Eq, false, false),
            B::IpAddress => spec("IpAddress", F::Ip, false, C::Eq, false, false),
            B::NotIpAddress => spec("NotIpAddress", F::Ip, true, C::Eq, false, false),
            B::ArnEquals => spec("ArnEquals", F::Arn, false, C::Eq, false, false),
            B::ArnLike => spec("ArnLike", F::Arn, false, C::Eq, true, false),
            B::ArnNotEquals => spec("ArnNotEquals", F::Arn, true, C::Eq, false, false),
            B::ArnNotLike => spec("ArnNotLike", F::Arn, true, C::Eq, true, false),
            B::Null => spec("Null", F::Null, false, C::Eq, false, false),
        }
    }

    pub const fn name(self) -> &'static str {
        self.spec().name
    }

    /// The operator spelled exactly `name`.
    pub fn from_name(name: &str) -> Option<BaseOperator> {
        BaseOperator::ALL.iter().copied().find(|op| op.name() == name)
    }
}

/// A whole operator as written: set prefix, base operator, `IfExists`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operator {
    pub set: SetMode,
    pub base: BaseOperator,
    pub if_exists: bool,
}

impl Operator {
    /// Parses `ForAllValues:StringEqualsIfExists` and the like, by exact name.
    pub fn parse(operator: &str) -> Result<Operator, ConditionError> {
        let (set, rest) = if let Some(r) = operator.strip_prefix("ForAllValues:") {
            (SetMode::ForAllValues, r)
        } else if let Some(r) = operator.strip_prefix("ForAnyValue:") {
            (SetMode::ForAnyValue, r)
        } else {
            (SetMode::Plain, operator)
        };
        let (name, if_exists) = match rest.strip_suffix("IfExists") {
            Some(b) => (b, true),
            None => (rest, false),
        };
        let base = BaseOperator::from_name(name).ok_or_else(|| ConditionError::UnknownOperator {
            operator: operator.to_string(),
            suggestion: super::near_miss(name, BaseOperator::ALL.iter().map(|op| op.name())),
        })?;
        if base == BaseOperator::Null && (if_exists || set != SetMode::Plain) {
            return Err(ConditionError::NullModifiers { operator: operator.to_string() });
        }
        Ok(Operator { set, base, if_exists })
    }
}

/// A condition that cannot be compiled. Messages carry no path; the policy
/// compiler adds it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConditionError {
    #[error("unknown condition operator {operator:?}{}", super::did_you_mean(*suggestion, "operators"))]
    UnknownOperator { operator: String, suggestion: Option<&'static str> },
    #[error("{operator:?}: Null takes neither IfExists nor a set prefix")]
    NullModifiers { operator: String },
    #[error("{operator:?} on {key:?} has no values")]
    NoValues { operator: String, key: String },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error(transparent)]
    Arn(#[from] ArnPatternError),
    #[error("{0:?} is not a number")]
    NotANumber(String),
    #[error("{0:?} is not a date: expected ISO 8601 (2020-01-31T12:00:00Z) or epoch seconds")]
    NotADate(String),
    #[error("{0:?} is not \"true\" or \"false\"")]
    NotABool(String),
    #[error("{0:?} is not base64")]
    NotBase64(String),
    #[error("{0:?} is not an IP address or CIDR block")]
    NotAnAddress(String),
    #[error("Null takes \"true\" or \"false\", found {0:?}")]
    NullValue(String),
    #[error("Null on one key cannot be both \"true\" and \"false\"")]
    NullConflict,
}

/// Parses every value with `parse`, failing on the first it refuses.
fn parse_all<T>(
    values: &[String],
    parse: impl Fn(&str) -> Option<T>,
    refuse: impl Fn(String) -> ConditionError,
) -> Result<Vec<T>, ConditionError> {
    values.iter().map(|v| parse(v).ok_or_else(|| refuse(v.clone()))).collect()
}

impl Condition {
    /// Compiles `operator` on `key_name` with the policy's `values`.
    /// `variables` is true in `"Version": "2012-10-17"` policies.
    pub fn compile(operator: &str, key_name: &str, values: &[String], variables: bool) -> Result<Condition, ConditionError> {
        let Operator { set, base, if_exists } = Operator::parse(operator)?;
        if values.is_empty() {
            return Err(ConditionError::NoValues { operator: operator.to_string(), key: key_name.to_string() });
        }
        let key = KeyRef::parse(key_name)?;
        let spec = base.spec();
        let cmp = spec.cmp;
        let operand = match spec.family {
            Family::String => {
                let syntax = Syntax { wildcards: spec.like, variables, fold_case: spec.ignore_case };
                Operand::Str(values.iter().map(|v| Pattern::compile(v, syntax)).collect::<Result<SmallVec<_>, _>>()?)
            }
            Family::Numeric => Operand::Num { values: parse_all(values, parse_number, ConditionError::NotANumber)?, cmp },
            Family::Date => Operand::Date { millis: parse_all(values, parse_date, ConditionError::NotADate)?, cmp },
            Family::Bool => Operand::Bool(parse_all(values, parse_bool, ConditionError::NotABool)?),
            Family::Binary => Operand::Binary(parse_all(values, decode_base64, ConditionError::NotBase64)?),
            Family::Ip => Operand::Ip(parse_all(values, parse_net, ConditionError::NotAnAddress)?),
            Family::Arn => {
                Operand::Arn(values.iter().map(|v| ArnPattern::compile(v, variables, variables)).collect::<Result<Vec<_>, _>>()?)
            }
            Family::Null => {
                let mut want = None;
                for v in values {
                    let b = parse_bool(v).ok_or_else(|| ConditionError::NullValue(v.clone()))?;
                    if want.is_some_and(|w| w != b) {
                        return Err(ConditionError::NullConflict);
                    }
                    want = Some(b);
                }
                Operand::Null(want.unwrap_or(true))
            }
        };
        Ok(Condition {
            operator: operator.into(),
            key_name: key_name.into(),
            key,
            set,
            negated: spec.negated,
            if_exists,
            operand,
        })
    }

    /// Evaluates the condition against a request.
    pub fn evaluate(&self, ctx: &dyn Context) -> Outcome {
        let values = ctx.values(&self.key);
        let absent = match &values {
            Values::Missing => true,
            Values::Many(list) => list.is_empty(),
            Values::One(_) => false,
        };
        if let Operand::Null(want_missing) = self.operand {
            return Outcome { holds: absent == want_missing, missing: absent };
        }
        let missing = matches!(values, Values::Missing);
        let holds = match self.set {
            SetMode::Plain => match &values {
                Values::Missing => self.if_exists || self.negated,
                Values::Many(_) => false,
                Values::One(v) => self.test(v, ctx),
            },
            SetMode::ForAllValues => match &values {
                Values::Missing => true,
                Values::One(v) => self.test(v, ctx),
                Values::Many(list) => list.iter().all(|v| self.test(v, ctx)),
            },
            SetMode::ForAnyValue => match &values {
                Values::Missing => self.if_exists,
                Values::One(v) => self.test(v, ctx),
                Values::Many(list) => list.iter().any(|v| self.test(v, ctx)),
            },
        };
        Outcome { holds, missing }
    }

    /// One request value against the policy values: some must match, or
    /// for a negated operator none may.
    fn test(&self, value: &str, ctx: &dyn Context) -> bool {
        let any = match &self.operand {
            Operand::Str(patterns) => patterns.iter().any(|p| p.matches(value, ctx)),
            Operand::Num { values, cmp } => match parse_number(value) {
                Some(n) => values.iter().any(|p| cmp.test(n, *p)),
                None => return false,
            },
            Operand::Date { millis, cmp } => match parse_date(value) {
                Some(d) => millis.iter().any(|p| cmp.test(d, *p)),
                None => return false,
            },
            Operand::Bool(values) => match parse_bool(value) {
                Some(b) => values.contains(&b),
                None => return false,
            },
            Operand::Binary(values) => match decode_base64(value) {
                Some(bytes) => values.contains(&bytes),
                None => return false,
            },
            Operand::Ip(nets) => match value.parse::<IpAddr>() {
                Ok(addr) => nets.iter().any(|n| n.contains(&addr)),
                Err(_) => return false,
            },
            Operand::Arn(patterns) => {
                if Arn::parse(value).is_none() {
                    return false;
                }
                let split = ArnParts::split(value);
                patterns.iter().any(|p| p.matches_split(split.as_ref(), ctx))
            }
            Operand::Null(_) => return false,
        };
        any != self.negated
    }
}

/// An ARN pattern that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArnPatternError {
    #[error(
        "{0:?} is not an ARN pattern: expected \"*\" or arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE, each part matched on its own"
    )]
    NotAnArn(String),
    #[error(transparent)]
    Pattern(#[from] PatternError),
}

/// A pattern for a whole ARN: `*` alone, or six parts each matched on its
/// own (`*` and `?` never cross a colon, except in the resource part, which
/// may itself hold colons).
#[derive(Debug, Clone, PartialEq)]
pub enum ArnPattern {
    Any,
    /// Six parts that are each `*`, a literal or a literal then `*` (most
    /// `Resource` patterns): matched in one pass over one text, with no
    /// pattern of its own per part.
    Flat(FlatArn),
    Parts(Box<[Pattern; 5]>, Pattern),
}

/// The literals of an [`ArnPattern::Flat`] one after the other, and where
/// each part's ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatArn {
    text: Box<str>,
    parts: [Span; 6],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    /// Where the part's literal ends in [`FlatArn::text`] (it starts where
    /// the previous part's ends).
    end: u16,
    kind: SpanKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpanKind {
    Any,
    Exact,
    Prefix,
}

impl FlatArn {
    /// The flat form of six compiled parts, when every one is plain text.
    fn new(parts: [&Pattern; 6]) -> Option<FlatArn> {
        let mut text = String::new();
        let mut spans = [Span { end: 0, kind: SpanKind::Any }; 6];
        for (span, part) in spans.iter_mut().zip(parts) {
            let kind = match part.literal()? {
                Literal::Any => SpanKind::Any,
                Literal::Exact(lit) => {
                    text.push_str(lit);
                    SpanKind::Exact
                }
                Literal::Prefix(lit) => {
                    text.push_str(lit);
                    SpanKind::Prefix
                }
            };
            *span = Span { end: u16::try_from(text.len()).ok()?, kind };
        }
        Some(FlatArn { text: text.into(), parts: spans })
    }

    fn matches(&self, arn: &ArnParts<'_>) -> bool {
        let text = self.text.as_bytes();
        let mut start = 0usize;
        for (i, span) in self.parts.iter().enumerate() {
            let end = usize::from(span.end);
            let part = arn.head.get(i).copied().unwrap_or(arn.resource).as_bytes();
            let Some(lit) = text.get(start..end) else { return false };
            start = end;
            let ok = match span.kind {
                SpanKind::Any => true,
                SpanKind::Exact => same_bytes(lit, part),
                SpanKind::Prefix => part.get(..lit.len()).is_some_and(|head| same_bytes(lit, head)),
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

impl ArnPattern {
    /// Compiles an ARN pattern; variables may be allowed in the resource part
    /// only (the `Resource` element) or everywhere (`Arn*` conditions).
    pub fn compile(source: &str, vars_in_resource: bool, vars_elsewhere: bool) -> Result<ArnPattern, ArnPatternError> {
        if source == "*" {
            return Ok(ArnPattern::Any);
        }
        let syntax = |variables| Syntax { wildcards: true, variables, fold_case: false };
        let parts: Vec<&str> = split_arn_parts(source);
        if parts.len() < 6 || parts[0] != "arn" {
            return Err(ArnPatternError::NotAnArn(source.to_string()));
        }
        let head = [
            Pattern::compile(parts[0], syntax(vars_elsewhere))?,
            Pattern::compile(parts[1], syntax(vars_elsewhere))?,
            Pattern::compile(parts[2], syntax(vars_elsewhere))?,
            Pattern::compile(parts[3], syntax(vars_elsewhere))?,
            Pattern::compile(parts[4], syntax(vars_elsewhere))?,
        ];
        let resource = Pattern::compile(parts[5], syntax(vars_in_resource))?;
        let [a, b, c, d, e] = &head;
        if let Some(flat) = FlatArn::new([a, b, c, d, e, &resource]) {
            return Ok(ArnPattern::Flat(flat));
        }
        Ok(ArnPattern::Parts(Box::new(head), resource))
    }

    /// Matches a request's ARN (or `*`).
    pub fn matches(&self, candidate: &str, values: &dyn Resolve) -> bool {
        self.matches_split(ArnParts::split(candidate).as_ref(), values)
    }

    /// Matches an ARN split once for many patterns; `None` for text that
    /// is not an ARN (such as `*`), which only the pattern `*` matches.
    #[inline]
    pub fn matches_split(&self, arn: Option<&ArnParts<'_>>, values: &dyn Resolve) -> bool {
        match (self, arn) {
            (ArnPattern::Any, _) => true,
            (_, None) => false,
            (ArnPattern::Flat(flat), Some(arn)) => flat.matches(arn),
            (ArnPattern::Parts(head, resource), Some(arn)) => {
                head.iter().zip(arn.head.iter()).all(|(p, part)| p.matches(part, values))
                    && resource.matches(arn.resource, values)
            }
        }
    }
}

/// An ARN split into its first five parts and the rest.
#[derive(Debug, Clone, Copy)]
pub struct ArnParts<'a> {
    head: [&'a str; 5],
    resource: &'a str,
}

impl<'a> ArnParts<'a> {
    pub fn split(text: &'a str) -> Option<ArnParts<'a>> {
        let (head, resource) = crate::arn::split_arn(text)?;
        Some(ArnParts { head, resource })
    }

    /// Whether the split text is an ARN as [`Arn::parse`] takes it.
    pub fn is_arn(&self) -> bool {
        let [arn, partition, service, _, _] = self.head;
        arn == "arn" && !partition.is_empty() && !service.is_empty() && !self.resource.is_empty()
    }

    /// The account part.
    pub fn account(&self) -> &'a str {
        self.head[4]
    }
}

/// Splits on the first five colons that are not inside a `${...}` variable.
fn split_arn_parts(source: &str) -> Vec<&str> {
    let mut parts = Vec::with_capacity(6);
    let mut depth = 0usize;
    let mut start = 0usize;
    let bytes = source.as_bytes();
    let mut i = 0;
    while i < bytes.len() && parts.len() < 5 {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth > 0 => depth -= 1,
            b':' if depth == 0 => {
                parts.push(&source[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&source[start..]);
    parts
}

/// A number: an integer or a decimal, finite.
pub fn parse_number(text: &str) -> Option<f64> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')) {
        return None;
    }
    t.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// A date in ISO 8601 (with or without time and zone) or epoch seconds, as
/// epoch milliseconds.
pub fn parse_date(text: &str) -> Option<i64> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    let t = text.trim();
    if let Some(n) = parse_number(t) {
        return Some((n * 1000.0).round() as i64);
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(d.timestamp_millis());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M%#z"] {
        if let Ok(d) = DateTime::parse_from_str(t, format) {
            return Some(d.timestamp_millis());
        }
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.fZ", "%Y-%m-%dT%H:%MZ", "%Y-%m-%dT%H:%M"] {
        if let Ok(d) = NaiveDateTime::parse_from_str(t, format) {
            return Some(d.and_utc().timestamp_millis());
        }
    }
    NaiveDate::parse_from_str(t, "%Y-%m-%d").ok().and_then(|d| d.and_hms_opt(0, 0, 0)).map(|d| d.and_utc().timestamp_millis())
}

pub fn parse_bool(text: &str) -> Option<bool> {
    if text.eq_ignore_ascii_case("true") {
        Some(true)
    } else if text.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text.trim()).ok()
}

/// A CIDR block, or a bare address as /32 or /128.
fn parse_net(text: &str) -> Option<IpNet> {
    let t = text.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Some(net);
    }
    t.parse::<IpAddr>().ok().map(IpNet::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Req(Vec<(KeyRef, Vec<String>, bool)>);
    impl Resolve for Req {
        fn single(&self, key: &KeyRef) -> Option<Cow<'_, str>> {
            match self.values(key) {
                Values::One(v) => Some(v),
                _ => None,
            }
        }
    }
    impl Context for Req {
        fn values(&self, key: &KeyRef) -> Values<'_> {
            match self.0.iter().find(|(k, _, _)| k == key) {
                None => Values::Missing,
                Some((_, v, true)) => Values::Many(v),
                Some((_, v, false)) => Values::One(Cow::Borrowed(&v[0])),
            }
        }
    }

    fn one(key: &str, value: &str) -> Req {
        Req(vec![(KeyRef::parse(key).unwrap(), vec![value.into()], false)])
    }
    fn many(key: &str, values: &[&str]) -> Req {
        Req(vec![(KeyRef::parse(key).unwrap(), values.iter().map(|s| s.to_string()).collect(), true)])
    }
    fn none() -> Req {
        Req(vec![])
    }
    fn holds(op: &str, key: &str, values: &[&str], req: &Req) -> bool {
        let values: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        Condition::compile(op, key, &values, true).unwrap().evaluate(req).holds
    }

    #[test]
    fn strings() {
        let r = one("aws:ResourceTag/Project", "Alpha");
        assert!(holds("StringEquals", "aws:ResourceTag/Project", &["Beta", "Alpha"], &r));
        assert!(!holds("StringEquals", "aws:ResourceTag/Project", &["alpha"], &r));
        assert!(holds("StringEqualsIgnoreCase", "aws:ResourceTag/Project", &["ALPHA"], &r));
        assert!(!holds("StringNotEquals", "aws:ResourceTag/Project", &["Beta", "Alpha"], &r));
        assert!(holds("StringNotEquals", "aws:ResourceTag/Project", &["Beta"], &r));
        assert!(holds("StringNotEqualsIgnoreCase", "aws:ResourceTag/Project", &["Beta"], &r));
        assert!(!holds("StringNotEqualsIgnoreCase", "aws:ResourceTag/Project", &["ALPHA"], &r));
        assert!(holds("StringLike", "aws:ResourceTag/Project", &["Al*"], &r));
        assert!(holds("StringNotLike", "aws:ResourceTag/Project", &["B*"], &r));
        assert!(!holds("StringEquals", "aws:ResourceTag/Project", &["Al*"], &r));
    }

    #[test]
    fn missing_keys() {
        let r = none();
        assert!(!holds("StringEquals", "aws:ResourceTag/Project", &["Alpha"], &r));
        assert!(holds("StringNotEquals", "aws:ResourceTag/Project", &["Alpha"], &r));
        assert!(holds("StringEqualsIfExists", "aws:ResourceTag/Project", &["Alpha"], &r));
        assert!(holds("NumericLessThanIfExists", "aws:MultiFactorAuthAge", &["3600"], &r));
        assert!(holds("Null", "aws:ResourceTag/Project", &["true"], &r));
        assert!(!holds("Null", "aws:ResourceTag/Project", &["false"], &r));
        assert!(holds("ForAllValues:StringEquals", "aws:TagKeys", &["a"], &r));
        assert!(!holds("ForAnyValue:StringEquals", "aws:TagKeys", &["a"], &r));
        let present = one("aws:ResourceTag/Project", "");
        assert!(!holds("Null", "aws:ResourceTag/Project", &["true"], &present), "an empty value is a value");
        assert!(holds("StringEqualsIfExists", "aws:ResourceTag/Project", &[""], &present));
        assert!(!holds("StringEqualsIfExists", "aws:ResourceTag/Project", &["x"], &present));
    }

    #[test]
    fn sets() {
        let r = many("aws:TagKeys", &["environment", "cost-center"]);
        assert!(holds("ForAllValues:StringEquals", "aws:TagKeys", &["environment", "cost-center"], &r));
        assert!(!holds("ForAllValues:StringEquals", "aws:TagKeys", &["environment"], &r));
        assert!(holds("ForAnyValue:StringEquals", "aws:TagKeys", &["environment"], &r));
        assert!(!holds("ForAnyValue:StringEquals", "aws:TagKeys", &["team"], &r));
        assert!(!holds("StringEquals", "aws:TagKeys", &["environment"], &r), "plain operator on a multivalued key");
        assert!(!holds("StringNotEquals", "aws:TagKeys", &["team"], &r), "plain negated operator on a multivalued key");
        assert!(holds("ForAllValues:StringNotEquals", "aws:TagKeys", &["team"], &r));
        assert!(!holds("ForAnyValue:StringNotEquals", "aws:TagKeys", &["environment", "cost-center"], &r));
        let empty = many("aws:TagKeys", &[]);
        assert!(holds("ForAllValues:StringEquals", "aws:TagKeys", &["x"], &empty));
        assert!(!holds("ForAnyValue:StringEquals", "aws:TagKeys", &["x"], &empty));
        assert!(holds("Null", "aws:TagKeys", &["true"], &empty));
        let single = one("aws:RequestTag/env", "prod");
        assert!(holds("ForAnyValue:StringEquals", "aws:RequestTag/env", &["prod"], &single));
        assert!(holds("ForAllValues:StringLike", "aws:RequestTag/env", &["pr*"], &single));
    }

    #[test]
    fn numbers_dates_bools() {
        let r = one("aws:MultiFactorAuthAge", "300");
        assert!(holds("NumericLessThan", "aws:MultiFactorAuthAge", &["3600"], &r));
        assert!(holds("NumericLessThanEquals", "aws:MultiFactorAuthAge", &["300"], &r));
        assert!(!holds("NumericGreaterThan", "aws:MultiFactorAuthAge", &["300"], &r));
        assert!(holds("NumericGreaterThanEquals", "aws:MultiFactorAuthAge", &["300.0"], &r));
        assert!(holds("NumericEquals", "aws:MultiFactorAuthAge", &["3e2"], &r));
        assert!(holds("NumericNotEquals", "aws:MultiFactorAuthAge", &["301"], &r));
        let junk = one("aws:MultiFactorAuthAge", "soon");
        assert!(!holds("NumericNotEquals", "aws:MultiFactorAuthAge", &["301"], &junk));
        let nan = one("aws:MultiFactorAuthAge", "NaN");
        assert!(!holds("NumericNotEquals", "aws:MultiFactorAuthAge", &["301"], &nan));

        let t = one("aws:CurrentTime", "2020-06-30T12:00:00Z");
        assert!(holds("DateLessThan", "aws:CurrentTime", &["2020-07-01T00:00:00Z"], &t));
        assert!(holds("DateGreaterThan", "aws:CurrentTime", &["2020-06-30"], &t));
        assert!(holds("DateEquals", "aws:CurrentTime", &["1593518400"], &t));
        assert!(holds("DateEquals", "aws:CurrentTime", &["2020-06-30T14:00:00+02:00"], &t));
        assert!(holds("DateNotEquals", "aws:CurrentTime", &["2020-06-30T12:00:01Z"], &t));
        let epoch = one("aws:EpochTime", "1593518400");
        assert!(holds("DateLessThanEquals", "aws:EpochTime", &["2020-06-30T12:00:00Z"], &epoch));

        let b = one("aws:SecureTransport", "true");
        assert!(holds("Bool", "aws:SecureTransport", &["true"], &b));
        assert!(!holds("Bool", "aws:SecureTransport", &["false"], &b));
        assert!(holds("BoolIfExists", "aws:SecureTransport", &["false"], &none()));
    }

    #[test]
    fn binary_ip_arn() {
        let r = one("aws:SomeBinary", "QmluYXJ5VmFsdWU=");
        assert!(holds("BinaryEquals", "aws:SomeBinary", &["QmluYXJ5VmFsdWU="], &r));
        assert!(!holds("BinaryEquals", "aws:SomeBinary", &["T3RoZXI="], &r));

        let ip = one("aws:SourceIp", "203.0.113.7");
        assert!(holds("IpAddress", "aws:SourceIp", &["203.0.113.0/24"], &ip));
        assert!(holds("IpAddress", "aws:SourceIp", &["203.0.113.7"], &ip));
        assert!(!holds("IpAddress", "aws:SourceIp", &["203.0.113.8"], &ip));
        assert!(holds("NotIpAddress", "aws:SourceIp", &["10.0.0.0/8"], &ip));
        let v6 = one("aws:SourceIp", "2001:db8::1");
        assert!(holds("IpAddress", "aws:SourceIp", &["2001:db8::/32"], &v6));
        assert!(!holds("IpAddress", "aws:SourceIp", &["203.0.113.0/24"], &v6));

        let arn = one("aws:SourceArn", "arn:aws:sns:us-east-1:111122223333:topic:sub");
        assert!(holds("ArnLike", "aws:SourceArn", &["arn:aws:sns:*:111122223333:*"], &arn));
        assert!(holds("ArnEquals", "aws:SourceArn", &["arn:aws:sns:us-east-1:111122223333:topic:sub"], &arn));
        assert!(!holds("ArnLike", "aws:SourceArn", &["arn:aws:sns:*:444455556666:*"], &arn));
        assert!(!holds("ArnLike", "aws:SourceArn", &["arn:*:*:*:*:topic"], &arn), "the resource part is matched whole");
        assert!(!holds("ArnLike", "aws:SourceArn", &["arn:aws:*:111122223333:topic:sub"], &arn), "* does not cross a colon");
        assert!(holds("ArnLike", "aws:SourceArn", &["arn:aws:sns:us-*-1:111122223333:topic*"], &arn));
        assert!(Condition::compile("ArnLike", "aws:SourceArn", &["arn:aws:*".into()], true).is_err());
        assert!(holds("ArnNotLike", "aws:SourceArn", &["arn:aws:sqs:*:*:*"], &arn));
        let not_arn = one("aws:SourceArn", "not-an-arn");
        assert!(!holds("ArnNotLike", "aws:SourceArn", &["arn:aws:sqs:*:*:*"], &not_arn));
    }

    #[test]
    fn flat_arn_patterns_match_as_their_parts_do() {
        let syntax = Syntax { wildcards: true, variables: true, fold_case: false };
        let patterns = [
            "arn:aws:kms:*:111122223333:key/*",
            "arn:aws:kms:us-east-1:111122223333:key/k1",
            "arn:aws:s3:::bucket*",
            "arn:aws*:iam::*:role/*",
            "arn:aws:kms:*:*:*",
            "arn:aws:sqs:eu-west-1:111122223333:queue",
            "arn:${*}:kms:*:1:k",
        ];
        let arns = [
            "arn:aws:kms:us-east-1:111122223333:key/k1",
            "arn:aws:kms:us-east-1:111122223333:key/",
            "arn:aws:kms:us-east-1:111122223333:alias/a",
            "arn:aws:kms:us-east-1:111122223334:key/k1",
            "arn:aws:s3:::bucket",
            "arn:aws:s3:::bucket-2/object:with:colons",
            "arn:aws-cn:iam::111122223333:role/r",
            "arn:aws:iam::111122223333:role",
            "arn:aws:sqs:eu-west-1:111122223333:queue",
            "arn:aws:sqs:eu-west-1:111122223333:queu",
            "arn:*:kms:x:1:k",
            "arn:aws:kms:x:1:k",
            "arn:é:kms:x:1:k",
        ];
        for source in patterns {
            let compiled = ArnPattern::compile(source, true, true).unwrap();
            assert!(matches!(compiled, ArnPattern::Flat(_)), "{source} is plain text in every part");
            let parts = split_arn_parts(source);
            let each: Vec<Pattern> = parts.iter().map(|p| Pattern::compile(p, syntax).unwrap()).collect();
            for arn in arns {
                let split = ArnParts::split(arn).unwrap();
                let by_parts = each[..5].iter().zip(split.head.iter()).all(|(p, part)| p.matches(part, &none()))
                    && each[5].matches(split.resource, &none());
                assert_eq!(compiled.matches(arn, &none()), by_parts, "{source} against {arn}");
            }
        }
        let with_variable = ArnPattern::compile("arn:aws:s3:::${aws:username}/*", true, true).unwrap();
        assert!(matches!(with_variable, ArnPattern::Parts(..)), "a variable keeps the part-by-part form");
        assert!(matches!(ArnPattern::compile("arn:aws:s3:::b?cket", false, false).unwrap(), ArnPattern::Parts(..)));
    }

    #[test]
    fn operators_are_parsed_by_exact_name() {
        for op in BaseOperator::ALL {
            assert_eq!(BaseOperator::from_name(op.name()), Some(*op));
            let parsed = Operator::parse(&format!("ForAnyValue:{}IfExists", op.name()));
            if *op == BaseOperator::Null {
                assert!(parsed.is_err());
            } else {
                assert_eq!(parsed, Ok(Operator { set: SetMode::ForAnyValue, base: *op, if_exists: true }));
            }
        }
        assert_eq!(BaseOperator::ALL.len(), 27);
        // A name holding "Not" is not thereby a negation, nor is one ending in
        // "LessThan" a comparison: only the table's names exist.
        for junk in ["StringNotEqualsNot", "NotStringEquals", "StringLessThan", "IpAddressNot", "NumericLike", "Nullx"] {
            assert!(matches!(Operator::parse(junk), Err(ConditionError::UnknownOperator { .. })), "{junk}");
        }
        assert!(BaseOperator::NotIpAddress.spec().negated && !BaseOperator::IpAddress.spec().negated);
        assert_eq!(BaseOperator::DateGreaterThanEquals.spec().cmp, Cmp::Ge);
        assert!(BaseOperator::ArnNotLike.spec().like && BaseOperator::ArnNotLike.spec().negated);
        assert_eq!(
            Operator::parse("ForAllValues:stringlike"),
            Err(ConditionError::UnknownOperator { operator: "ForAllValues:stringlike".into(), suggestion: Some("StringLike") })
        );
    }

    #[test]
    fn compile_errors_say_what_is_wrong() {
        let err = |op: &str, v: &str| Condition::compile(op, "aws:SourceIp", &[v.to_string()], true).unwrap_err().to_string();
        assert!(err("StringEqualz", "x").contains("unknown condition operator"));
        assert!(err("stringequals", "x").contains("did you mean \"StringEquals\""));
        assert!(err("NumericEquals", "ten").contains("not a number"));
        assert!(err("DateEquals", "yesterday").contains("not a date"));
        assert!(err("IpAddress", "300.1.1.1").contains("not an IP address"));
        assert!(err("BinaryEquals", "***").contains("not base64"));
        assert!(err("Bool", "yes").contains("not \"true\" or \"false\""));
        assert!(err("NullIfExists", "true").contains("Null takes neither"));
        assert!(err("ForAnyValue:Null", "true").contains("Null takes neither"));
        assert!(Condition::compile("StringEquals", "aws:SourceIp", &[], true).unwrap_err().to_string().contains("no values"));
    }
}
