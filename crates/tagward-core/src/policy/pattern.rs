//! Compiled string patterns: IAM's `*` and `?` wildcards and `${...}` policy
//! variables, built once when a policy is compiled.
//!
//! One type serves actions (wildcards, case-insensitive), resource ARN parts
//! and `StringLike`/`ArnLike` values (wildcards and variables), and
//! `StringEquals` values (variables only: a `*` there is a plain character).
//! A value that a variable puts in is always literal text, never a wildcard.
//! Matching allocates nothing for patterns of up to eight pieces.

use std::borrow::Cow;

use smallvec::SmallVec;
use smol_str::SmolStr;
use thiserror::Error;

use super::keys::{KeyError, KeyRef};

/// A pattern that cannot be compiled: a malformed `${...}` variable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PatternError {
    #[error("unterminated policy variable in {pattern:?}")]
    Unterminated { pattern: String },
    #[error("the default of policy variable ${{{inner}}} in {pattern:?} must be in single quotes")]
    UnquotedDefault { inner: String, pattern: String },
    #[error("empty policy variable in {pattern:?}")]
    EmptyVariable { pattern: String },
    #[error("policy variable in {pattern:?}: {key}")]
    Key { pattern: String, key: KeyError },
}

/// What a pattern treats specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syntax {
    /// `*` matches any run of characters and `?` any one character.
    pub wildcards: bool,
    /// `${...}` is a policy variable (only in `"Version": "2012-10-17"`).
    pub variables: bool,
    /// Characters compare case-insensitively.
    pub fold_case: bool,
}

/// Looks up the single value of a condition key, for policy variables.
pub trait Resolve {
    fn single(&self, key: &KeyRef) -> Option<Cow<'_, str>>;

    /// Told when a variable had no value and no default (the key `name`,
    /// as the policy wrote it), so an answer can list it as missing.
    fn missing_variable(&self, _name: &str) {}
}

/// A resolver with no values at all, for patterns that hold no variables.
pub struct NoValues;

impl Resolve for NoValues {
    fn single(&self, _key: &KeyRef) -> Option<Cow<'_, str>> {
        None
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A byte range of `Pattern::text`.
    Lit(u32, u32),
    Star,
    One,
    /// Held in place: a one-variable pattern reads its key from here.
    Var(Variable),
}

#[derive(Debug, Clone, PartialEq)]
struct Variable {
    key: KeyRef,
    /// The key as written, for reporting it missing.
    name: Box<str>,
    default: Option<Box<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `*` alone: matches everything.
    Any,
    /// No wildcards, no variables.
    Exact,
    /// Literal text then one trailing `*`.
    Prefix,
    /// Anything else without variables.
    General,
    /// One variable and nothing else (`${aws:username}`): compared whole.
    OneVariable,
    /// Holds variables: resolved at match time.
    Variables,
}

/// A pattern that is plain text (see [`Pattern::literal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Literal<'a> {
    /// `*`: anything.
    Any,
    /// Exactly this text.
    Exact(&'a str),
    /// This text, then anything.
    Prefix(&'a str),
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    /// Inline when short (most are: actions, account ids, tag values), so
    /// matching reads no other allocation.
    text: SmolStr,
    toks: Box<[Tok]>,
    shape: Shape,
    fold: bool,
}

#[derive(Clone, Copy)]
enum Piece<'a> {
    Lit(&'a str),
    Star,
    One,
}

impl Pattern {
    /// Compiles `source`. Fails only on a malformed `${...}` variable.
    pub fn compile(source: &str, syntax: Syntax) -> Result<Pattern, PatternError> {
        let mut text = String::with_capacity(source.len());
        let mut toks: Vec<Tok> = Vec::new();
        let push_char = |text: &mut String, toks: &mut Vec<Tok>, c: char| {
            let start = text.len() as u32;
            text.push(c);
            let end = text.len() as u32;
            match toks.last_mut() {
                Some(Tok::Lit(_, e)) if *e == start => *e = end,
                _ => toks.push(Tok::Lit(start, end)),
            }
        };
        let mut rest = source;
        while let Some(c) = rest.chars().next() {
            if syntax.variables && rest.starts_with("${") {
                let close = rest.find('}').ok_or_else(|| PatternError::Unterminated { pattern: source.to_string() })?;
                let inner = &rest[2..close];
                rest = &rest[close + 1..];
                match inner {
                    "*" | "?" | "$" => {
                        let literal = inner.chars().next().unwrap_or('$');
                        push_char(&mut text, &mut toks, literal);
                    }
                    _ => toks.push(Tok::Var(parse_variable(inner, source)?)),
                }
                continue;
            }
            rest = &rest[c.len_utf8()..];
            match c {
                '*' if syntax.wildcards => toks.push(Tok::Star),
                '?' if syntax.wildcards => toks.push(Tok::One),
                _ => push_char(&mut text, &mut toks, c),
            }
        }
        let shape = if let [Tok::Var(_)] = toks.as_slice() {
            Shape::OneVariable
        } else if toks.iter().any(|t| matches!(t, Tok::Var(_))) {
            Shape::Variables
        } else {
            match toks.as_slice() {
                [Tok::Star] => Shape::Any,
                [] | [Tok::Lit(..)] => Shape::Exact,
                [Tok::Lit(..), Tok::Star] => Shape::Prefix,
                _ => Shape::General,
            }
        };
        Ok(Pattern { text: SmolStr::from(text), toks: toks.into(), shape, fold: syntax.fold_case })
    }

    /// True when the pattern is `*` alone.
    pub fn is_any(&self) -> bool {
        self.shape == Shape::Any
    }

    /// The literal text, for a pattern with neither wildcards nor variables.
    pub fn exact(&self) -> Option<&str> {
        (self.shape == Shape::Exact).then_some(&*self.text)
    }

    /// For an action pattern: the service part before the first `:` when it
    /// holds no wildcard (`kms` for `kms:GenerateDataKey*`).
    pub fn service_prefix(&self) -> Option<&str> {
        match self.toks.first() {
            Some(Tok::Lit(s, e)) => self.text[*s as usize..*e as usize].split_once(':').map(|(svc, _)| svc),
            _ => None,
        }
    }

    /// The pattern as plain text, when it is `*`, a literal, or a literal
    /// then one trailing `*`, case-sensitive and without variables: what a
    /// caller may store flat and match with [`same_bytes`] alone.
    pub fn literal(&self) -> Option<Literal<'_>> {
        if self.fold {
            return None;
        }
        match self.shape {
            Shape::Any => Some(Literal::Any),
            Shape::Exact => Some(Literal::Exact(&self.text)),
            Shape::Prefix => Some(Literal::Prefix(&self.text)),
            _ => None,
        }
    }

    /// Matches `candidate` against the pattern, resolving variables through
    /// `values`. A variable with no value and no default matches nothing.
    #[inline]
    pub fn matches(&self, candidate: &str, values: &dyn Resolve) -> bool {
        match self.shape {
            Shape::Any => true,
            Shape::Exact => eq(&self.text, candidate, self.fold),
            Shape::Prefix => candidate.get(..self.text.len()).is_some_and(|head| eq(&self.text, head, self.fold)),
            Shape::General => self.matches_general(candidate),
            Shape::OneVariable => match self.toks.first() {
                Some(Tok::Var(var)) => match (values.single(&var.key), &var.default) {
                    (Some(v), _) => eq(&v, candidate, self.fold),
                    (None, Some(d)) => eq(d, candidate, self.fold),
                    (None, None) => {
                        values.missing_variable(&var.name);
                        false
                    }
                },
                _ => false,
            },
            Shape::Variables => self.matches_with_variables(candidate, values),
        }
    }

    #[inline(never)]
    fn matches_general(&self, candidate: &str) -> bool {
        let pieces: SmallVec<[Piece<'_>; 8]> = self.toks.iter().map(|t| self.piece(t, None)).collect();
        glob(&pieces, candidate, self.fold)
    }

    #[inline(never)]
    fn matches_with_variables(&self, candidate: &str, values: &dyn Resolve) -> bool {
        let mut resolved: SmallVec<[Cow<'_, str>; 4]> = SmallVec::new();
        for tok in self.toks.iter() {
            if let Tok::Var(var) = tok {
                match values.single(&var.key) {
                    Some(v) => resolved.push(v),
                    None => match &var.default {
                        Some(d) => resolved.push(Cow::Borrowed(&**d)),
                        None => {
                            values.missing_variable(&var.name);
                            return false;
                        }
                    },
                }
            }
        }
        let mut next_var = resolved.iter();
        let pieces: SmallVec<[Piece<'_>; 8]> =
            self.toks.iter().map(|t| self.piece(t, if matches!(t, Tok::Var(_)) { next_var.next() } else { None })).collect();
        glob(&pieces, candidate, self.fold)
    }

    fn piece<'a>(&'a self, tok: &Tok, value: Option<&'a Cow<'a, str>>) -> Piece<'a> {
        match tok {
            Tok::Lit(s, e) => Piece::Lit(&self.text[*s as usize..*e as usize]),
            Tok::Star => Piece::Star,
            Tok::One => Piece::One,
            Tok::Var(_) => Piece::Lit(value.map(|v| &**v).unwrap_or("")),
        }
    }
}

fn parse_variable(inner: &str, source: &str) -> Result<Variable, PatternError> {
    let (name, default) = match inner.split_once(',') {
        Some((name, default)) => {
            let default = default.trim();
            let quoted = default
                .strip_prefix('\'')
                .and_then(|d| d.strip_suffix('\''))
                .ok_or_else(|| PatternError::UnquotedDefault { inner: inner.to_string(), pattern: source.to_string() })?;
            (name.trim(), Some(quoted.into()))
        }
        None => (inner.trim(), None),
    };
    if name.is_empty() {
        return Err(PatternError::EmptyVariable { pattern: source.to_string() });
    }
    let key = KeyRef::parse(name).map_err(|key| PatternError::Key { pattern: source.to_string(), key })?;
    Ok(Variable { key, name: name.into(), default })
}

#[inline]
fn eq(a: &str, b: &str, fold: bool) -> bool {
    if same_bytes(a.as_bytes(), b.as_bytes()) {
        true
    } else if !fold {
        false
    } else {
        eq_folded(a, b)
    }
}

/// Byte equality with the short texts policies are made of (account ids,
/// services, regions, tag values) compared inline, in two overlapping
/// word loads, instead of through a call to `memcmp`.
#[inline]
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if (8..=16).contains(&n) {
        return match (a.first_chunk::<8>(), b.first_chunk::<8>(), a.last_chunk::<8>(), b.last_chunk::<8>()) {
            (Some(a0), Some(b0), Some(a1), Some(b1)) => {
                u64::from_ne_bytes(*a0) == u64::from_ne_bytes(*b0) && u64::from_ne_bytes(*a1) == u64::from_ne_bytes(*b1)
            }
            _ => a == b,
        };
    }
    if (4..8).contains(&n) {
        return match (a.first_chunk::<4>(), b.first_chunk::<4>(), a.last_chunk::<4>(), b.last_chunk::<4>()) {
            (Some(a0), Some(b0), Some(a1), Some(b1)) => {
                u32::from_ne_bytes(*a0) == u32::from_ne_bytes(*b0) && u32::from_ne_bytes(*a1) == u32::from_ne_bytes(*b1)
            }
            _ => a == b,
        };
    }
    if n < 4 {
        // The first, middle and last bytes cover up to three.
        return a.first() == b.first() && a.get(n / 2) == b.get(n / 2) && a.last() == b.last();
    }
    a == b
}

#[inline(never)]
fn eq_folded(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        a.eq_ignore_ascii_case(b)
    } else {
        a.chars().map(fold_char).eq(b.chars().map(fold_char))
    }
}

/// Simple case folding: the first character of the lowercase mapping.
pub fn fold_char(c: char) -> char {
    if c.is_ascii() {
        c.to_ascii_lowercase()
    } else {
        c.to_lowercase().next().unwrap_or(c)
    }
}

fn same_char(a: char, b: char, fold: bool) -> bool {
    a == b || (fold && fold_char(a) == fold_char(b))
}

/// Texts up to this many bytes are matched by [`glob_backtracking`] with no
/// allocation; longer ones by [`glob_stars`] when the pattern has no `?`.
const SHORT_TEXT: usize = 256;

/// Glob matching. A short text, or a pattern with `?`, takes the two-pointer
/// match with backtracking to the last `*` (no allocation; its worst case is
/// the text's length times the pattern's, bounded by the request limits).
/// A long text against a pattern of literals and `*` takes a linear match:
/// each literal run found by substring search.
fn glob(pieces: &[Piece<'_>], text: &str, fold: bool) -> bool {
    if text.len() > SHORT_TEXT && !pieces.iter().any(|p| matches!(p, Piece::One)) {
        glob_stars(pieces, text, fold)
    } else {
        glob_backtracking(pieces, text, fold)
    }
}

/// A pattern of literals and `*` only: the first literal run is a prefix,
/// the last a suffix, and each run between stars is found (leftmost, which
/// never loses a match) after the previous one; every search is linear
/// (`str::find` is the two-way algorithm), so the whole match is linear in
/// the text plus the pattern.
fn glob_stars(pieces: &[Piece<'_>], text: &str, fold: bool) -> bool {
    let folded = |s: &str| -> String { s.chars().map(fold_char).collect() };
    let original = text;
    let text: Cow<'_, str> = if fold { Cow::Owned(folded(text)) } else { Cow::Borrowed(text) };
    // The literal runs between stars (adjacent literals, from variables, joined).
    let mut runs: Vec<String> = vec![String::new()];
    for piece in pieces {
        match piece {
            Piece::Star => runs.push(String::new()),
            Piece::Lit(s) => {
                if let Some(run) = runs.last_mut() {
                    if fold {
                        run.extend(s.chars().map(fold_char));
                    } else {
                        run.push_str(s);
                    }
                }
            }
            Piece::One => return glob_backtracking(pieces, original, fold),
        }
    }
    let (first, rest) = match runs.split_first() {
        Some(split) => split,
        None => return text.is_empty(),
    };
    let Some((last, middle)) = rest.split_last() else {
        // No star at all.
        return *text == **first;
    };
    if text.len() < first.len() + last.len() || !text.starts_with(first.as_str()) || !text.ends_with(last.as_str()) {
        return false;
    }
    let end = text.len() - last.len();
    let mut at = first.len();
    for run in middle.iter().filter(|r| !r.is_empty()) {
        match text[at..end].find(run.as_str()) {
            Some(i) => at += i + run.len(),
            None => return false,
        }
    }
    true
}

/// Glob matching with backtracking to the last `*`: never exponential.
fn glob_backtracking(pieces: &[Piece<'_>], text: &str, fold: bool) -> bool {
    #[derive(Clone, Copy)]
    struct Pos {
        piece: usize,
        offset: usize,
    }
    let normalize = |mut p: Pos| {
        while let Some(Piece::Lit(s)) = pieces.get(p.piece) {
            if p.offset < s.len() {
                break;
            }
            p = Pos { piece: p.piece + 1, offset: 0 };
        }
        p
    };
    let mut p = Pos { piece: 0, offset: 0 };
    let mut t = 0usize;
    let mut star: Option<(Pos, usize)> = None;
    loop {
        p = normalize(p);
        let Some(c) = text[t..].chars().next() else {
            while let Some(Piece::Star) = pieces.get(p.piece) {
                p = normalize(Pos { piece: p.piece + 1, offset: 0 });
            }
            return p.piece >= pieces.len();
        };
        match pieces.get(p.piece) {
            Some(Piece::Star) => {
                p = Pos { piece: p.piece + 1, offset: 0 };
                star = Some((p, t));
                continue;
            }
            Some(Piece::One) => {
                p = Pos { piece: p.piece + 1, offset: 0 };
                t += c.len_utf8();
                continue;
            }
            Some(Piece::Lit(s)) => {
                if let Some(pc) = s[p.offset..].chars().next() {
                    if same_char(pc, c, fold) {
                        p.offset += pc.len_utf8();
                        t += c.len_utf8();
                        continue;
                    }
                }
            }
            None => {}
        }
        match star {
            Some((after_star, from)) => {
                let skipped = text[from..].chars().next().map_or(1, char::len_utf8);
                star = Some((after_star, from + skipped));
                p = after_star;
                t = from + skipped;
            }
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIKE: Syntax = Syntax { wildcards: true, variables: true, fold_case: false };
    const ACTION: Syntax = Syntax { wildcards: true, variables: false, fold_case: true };
    const IGNORE_CASE: Syntax = Syntax { wildcards: false, variables: true, fold_case: true };
    const EQUALS: Syntax = Syntax { wildcards: false, variables: true, fold_case: false };

    #[test]
    fn inline_equality_sees_every_byte_of_every_length() {
        for n in 0..40usize {
            let a: Vec<u8> = (0..n as u8).map(|i| b'a' + i % 26).collect();
            assert!(same_bytes(&a, &a.clone()), "length {n}");
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same_bytes(&a, &b), "length {n}, byte {at}");
            }
            let mut longer = a.clone();
            longer.push(b'a');
            assert!(!same_bytes(&a, &longer) && !same_bytes(&longer, &a), "lengths {n} and {}", n + 1);
        }
    }

    struct Map(&'static [(&'static str, &'static str)]);
    impl Resolve for Map {
        fn single(&self, key: &KeyRef) -> Option<Cow<'_, str>> {
            let name = match key {
                KeyRef::PrincipalTag(k) => format!("tag/{k}"),
                KeyRef::Username => "username".into(),
                _ => return None,
            };
            self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| Cow::Borrowed(*v))
        }
    }

    fn m(pattern: &str, syntax: Syntax, text: &str) -> bool {
        Pattern::compile(pattern, syntax).unwrap().matches(text, &Map(&[("tag/team", "qa"), ("username", "a*b")]))
    }

    #[test]
    fn wildcards() {
        assert!(m("*", LIKE, ""));
        assert!(m("kms:GenerateDataKey*", ACTION, "kms:generatedatakeypair"));
        assert!(m("kms:ReEncrypt*", ACTION, "KMS:ReEncryptFrom"));
        assert!(!m("kms:ReEncrypt*", ACTION, "kms:Encrypt"));
        assert!(m("a?c", LIKE, "abc"));
        assert!(!m("a?c", LIKE, "ac"));
        assert!(m("a?c", LIKE, "aéc"), "? is one character, not one byte");
        assert!(m("*a*b*c*", LIKE, "xxaxxbxxcxx"));
        assert!(!m("*a*b*c", LIKE, "xxaxxbxxcxx"));
        assert!(m("a*a*a", LIKE, "aaaaaaaaaaaa"));
        assert!(!m("a*a*ab", LIKE, "aaaaaaaaaaaa"));
        assert!(m("**", LIKE, "anything"));
        assert!(!m("Project", LIKE, "project"), "like is case-sensitive");
        assert!(!m("Größe", IGNORE_CASE, "GRÖSSE"), "simple folding: ß is not ss");
        assert!(!m("Größe", IGNORE_CASE, "gröSSe"));
        assert!(m("ÄRGER", IGNORE_CASE, "ärger"));
    }

    #[test]
    fn variables_are_literal_and_missing_ones_match_nothing() {
        assert!(m("arn:aws:sqs:us-east-2::${aws:PrincipalTag/team}-queue", LIKE, "arn:aws:sqs:us-east-2::qa-queue"));
        assert!(!m("${aws:PrincipalTag/team}-queue", LIKE, "dev-queue"));
        assert!(!m("${aws:PrincipalTag/missing}-queue", LIKE, "-queue"));
        assert!(m("${aws:PrincipalTag/missing, 'none'}-queue", LIKE, "none-queue"));
        assert!(m("${aws:username}", LIKE, "a*b"));
        assert!(!m("${aws:username}", LIKE, "axxb"), "a substituted * is literal");
        assert!(m("${*}${?}${$}", LIKE, "*?$"));
        assert!(!m("${*}", LIKE, "x"));
        assert!(m("a*", EQUALS, "a*"));
        assert!(!m("a*", EQUALS, "ab"));
        let literal = Syntax { wildcards: true, variables: false, fold_case: false };
        assert!(m("${aws:username}", literal, "${aws:username}"));
    }

    #[test]
    fn long_texts_match_in_linear_time_and_agree_with_the_short_path() {
        // The shape that took seconds: a long run of `a`s then `*b`.
        let pattern = format!("*{}*b", "a".repeat(2000));
        let text = "a".repeat(3_000_000);
        let compiled = Pattern::compile(&pattern, LIKE).unwrap();
        assert!(!compiled.matches(&text, &NoValues));
        assert!(compiled.matches(&format!("{text}b"), &NoValues));
        // Both paths agree on texts just past the short limit.
        let long = |s: &str| format!("{}{s}", "x".repeat(SHORT_TEXT));
        for (p, t, want) in [
            ("*a*b*c*", long("aXbXc"), true),
            ("*a*b*c", long("aXbXcX"), false),
            ("x*abc", long("abc"), true),
            ("x*ab*ab", long("ab"), false),
            ("*éX*", long("éx"), false),
            ("${aws:username}*", format!("a*b{}", "y".repeat(300)), true),
        ] {
            assert_eq!(m(p, LIKE, &t), want, "{p} against {t}");
        }
        assert!(m("X*ÄRGER*", ACTION, &long("ärger")), "folding holds on the long path");
        assert!(!m("x*", ACTION, &format!("y{}", "x".repeat(400))));
    }

    #[test]
    fn malformed_variables_are_errors() {
        assert!(Pattern::compile("${aws:username", LIKE).is_err());
        assert!(Pattern::compile("${}", LIKE).is_err());
        assert!(Pattern::compile("${aws:username, default}", LIKE).is_err());
    }
}
