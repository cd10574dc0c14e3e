//! Tags: the rules every tag must obey, and the tag set of one resource.
//!
//! Rules (docs/semantics.md, "Entities"): at most 50 tags per resource; keys of 1
//! to 128 and values of 0 to 256 Unicode characters, drawn from Unicode
//! letters and numbers, space separators and `_ . : / = + - @`; keys and
//! values that begin with `aws:` in any case are reserved. Keys are unique;
//! writing an existing key replaces its value. On IAM users and roles keys are
//! case-insensitive and case-preserving: the latest write's spelling wins.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use unicode_general_category::{get_general_category, GeneralCategory as G};

use crate::policy::pattern::fold_char;

pub const MAX_TAGS: usize = 50;
pub const MAX_KEY_CHARS: usize = 128;
pub const MAX_VALUE_CHARS: usize = 256;

/// A tag that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TagRuleError {
    #[error("tag key is empty")]
    EmptyKey,
    #[error("tag key {key:?} has {chars} characters; at most 128 are allowed")]
    KeyTooLong { key: String, chars: usize },
    #[error("value of tag {key:?} has {chars} characters; at most 256 are allowed")]
    ValueTooLong { key: String, chars: usize },
    #[error("tag key {key:?} holds {ch:?}; allowed are Unicode letters, numbers, spaces and _ . : / = + - @")]
    KeyCharacter { key: String, ch: char },
    #[error("value of tag {key:?} holds {ch:?}; allowed are Unicode letters, numbers, spaces and _ . : / = + - @")]
    ValueCharacter { key: String, ch: char },
    #[error("tag key {key:?} begins with \"aws:\", which is reserved for AWS")]
    ReservedKey { key: String },
    #[error("value of tag {key:?} begins with \"aws:\", which is reserved for AWS")]
    ReservedValue { key: String },
    #[error("tag keys {first:?} and {second:?} differ only by case, and keys on IAM users and roles are case-insensitive")]
    DuplicateKey { first: String, second: String },
    #[error("tag key {key:?} appears more than once in the request")]
    RepeatedKey { key: String },
}

fn allowed(c: char) -> bool {
    // Most tags are ASCII: no table lookup for them. The only ASCII space
    // separator is the space itself.
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || matches!(c, ' ' | '_' | '.' | ':' | '/' | '=' | '+' | '-' | '@');
    }
    matches!(c, '_' | '.' | ':' | '/' | '=' | '+' | '-' | '@')
        || matches!(
            get_general_category(c),
            G::UppercaseLetter
                | G::LowercaseLetter
                | G::TitlecaseLetter
                | G::ModifierLetter
                | G::OtherLetter
                | G::DecimalNumber
                | G::LetterNumber
                | G::OtherNumber
                | G::SpaceSeparator
        )
}

fn reserved(text: &str) -> bool {
    text.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:"))
}

/// Checks a tag key on its own (untag requests name keys only).
pub fn check_key(key: &str) -> Result<(), TagRuleError> {
    if key.is_empty() {
        return Err(TagRuleError::EmptyKey);
    }
    // A text has no more characters than bytes: most keys are decided by
    // their length alone, without counting (ten million tags in a restore).
    let chars = if key.len() <= MAX_KEY_CHARS { key.len() } else { key.chars().count() };
    if chars > MAX_KEY_CHARS {
        return Err(TagRuleError::KeyTooLong { key: key.to_string(), chars });
    }
    if let Some(ch) = key.chars().find(|c| !allowed(*c)) {
        return Err(TagRuleError::KeyCharacter { key: key.to_string(), ch });
    }
    if reserved(key) {
        return Err(TagRuleError::ReservedKey { key: key.to_string() });
    }
    Ok(())
}

/// Checks one tag against the rules.
pub fn check_tag(key: &str, value: &str) -> Result<(), TagRuleError> {
    check_key(key)?;
    let chars = if value.len() <= MAX_VALUE_CHARS { value.len() } else { value.chars().count() };
    if chars > MAX_VALUE_CHARS {
        return Err(TagRuleError::ValueTooLong { key: key.to_string(), chars });
    }
    if let Some(ch) = value.chars().find(|c| !allowed(*c)) {
        return Err(TagRuleError::ValueCharacter { key: key.to_string(), ch });
    }
    if reserved(value) {
        return Err(TagRuleError::ReservedValue { key: key.to_string() });
    }
    Ok(())
}

/// Case-insensitive equality of tag keys.
pub fn keys_equal_ignoring_case(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b) || a.chars().map(fold_char).eq(b.chars().map(fold_char))
}

/// One tag, shared by the tag sets that carry it: the interner's copy (see
/// [`intern`]), or a resource builder's own ([`TagCache`]).
#[derive(PartialEq, Eq)]
struct Pair {
    key: Box<str>,
    value: Box<str>,
}

impl Pair {
    fn key(&self) -> &str {
        &self.key
    }

    fn value(&self) -> &str {
        &self.value
    }
}

/// The interned tags: a million resources carry a few thousand distinct
/// tags, so each distinct (key, value) is stored once and a tag set holds
/// pointers. Sharded by hash so that parallel builders rarely meet; a shard
/// forgets the tags no set holds any more each time it has doubled since
/// it last looked, so it stays within twice what is alive.
struct Shard {
    table: hashbrown::HashTable<Arc<Pair>>,
    sweep_at: usize,
}

const SHARDS: usize = 16;
const PAIR_HASH: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x7461_6773);

static INTERNED: [Mutex<Shard>; SHARDS] =
    [const { Mutex::new(Shard { table: hashbrown::HashTable::new(), sweep_at: 64 }) }; SHARDS];

fn pair_hash(key: &str, value: &str) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = PAIR_HASH.build_hasher();
    key.hash(&mut h);
    value.hash(&mut h);
    h.finish()
}

/// The shared copy of one tag.
fn intern(key: &str, value: &str) -> Arc<Pair> {
    let hash = pair_hash(key, value);
    let at = (hash >> 60) as usize % SHARDS;
    // A panic elsewhere while holding the lock cannot leave the table half
    // changed in a way that matters: carry on with it.
    let mut shard = INTERNED[at].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(found) = shard.table.find(hash, |p| p.key() == key && p.value() == value) {
        return found.clone();
    }
    if shard.table.len() >= shard.sweep_at {
        shard.table.retain(|p| Arc::strong_count(p) > 1);
        shard.sweep_at = (shard.table.len() * 2).max(64);
    }
    let pair = Arc::new(Pair { key: key.into(), value: value.into() });
    shard.table.insert_unique(hash, pair.clone(), |p| pair_hash(p.key(), p.value()));
    pair
}

/// Tags one builder has checked, so that the next set holding the same
/// tag takes it from here: no rule checked again (they depend on the tag
/// alone), no interner shard locked (two builders on two threads met on
/// the shards' locks ten million times in a restore). The cache holds its
/// own copy of each tag instead of the interner's: two builders on two
/// threads cloning one shared copy ten million times wrote its reference
/// count from both cores, and a restore spent a seventh of its CPU waiting
/// for that cache line. A tag then has a copy per builder that met it (and
/// one more each time a full cache forgets it and meets it again): a few
/// thousand small allocations for a million sets. Bounded: it forgets
/// everything when it is full, so it never holds more than
/// [`TagCache::MOST`] tags alive that no set holds.
#[derive(Default)]
pub struct TagCache {
    table: hashbrown::HashTable<Arc<Pair>>,
}

impl TagCache {
    /// The most tags a cache keeps.
    pub const MOST: usize = 4_096;

    /// This cache's copy of a tag the rules allow, checked only when this
    /// cache has not seen it.
    fn checked(&mut self, key: &str, value: &str) -> Result<Arc<Pair>, TagRuleError> {
        let hash = pair_hash(key, value);
        if let Some(found) = self.table.find(hash, |p| p.key() == key && p.value() == value) {
            return Ok(found.clone());
        }
        check_tag(key, value)?;
        if self.table.len() >= Self::MOST {
            self.table.clear();
        }
        let pair = Arc::new(Pair { key: key.into(), value: value.into() });
        self.table.insert_unique(hash, pair.clone(), |p| pair_hash(p.key(), p.value()));
        Ok(pair)
    }
}

/// The tags of one resource, sorted by key in byte order.
///
/// Stored compactly: a million resources with ten tags each would otherwise
/// spend most of their memory on small string allocations. Each distinct
/// tag is stored once for the process (interned), or once per resource
/// builder that met it (a restore's two), and a set is one array of
/// pointers to them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TagSet {
    /// The tags in key order.
    pairs: Box<[Arc<Pair>]>,
    /// Keys are case-insensitive (IAM users and roles).
    case_insensitive: bool,
}

impl fmt::Debug for TagSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl TagSet {
    pub fn new(case_insensitive: bool) -> TagSet {
        TagSet { pairs: Box::default(), case_insensitive }
    }

    /// Builds a set from pairs already sorted by key and unique.
    fn from_sorted(case_insensitive: bool, pairs: &[(&str, &str)]) -> TagSet {
        TagSet { pairs: pairs.iter().map(|(k, v)| intern(k, v)).collect(), case_insensitive }
    }

    /// Builds a set from initial tags, checking every rule and the limit.
    pub fn from_tags<'a>(
        case_insensitive: bool,
        tags: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<TagSet, TagSetError> {
        TagSet::built(case_insensitive, tags.into_iter().collect(), None)
    }

    /// [`TagSet::from_tags`] on a case-sensitive set, with the tags `cache`
    /// has seen taken from it: the same set, or the same error.
    pub fn from_tags_cached<'a>(
        cache: &mut TagCache,
        tags: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<TagSet, TagSetError> {
        TagSet::built(false, tags.into_iter().collect(), Some(cache))
    }

    fn built(case_insensitive: bool, tags: Vec<(&str, &str)>, cache: Option<&mut TagCache>) -> Result<TagSet, TagSetError> {
        // Keys given in strictly increasing order (a world file's map, a
        // snapshot) on a case-sensitive set cannot repeat: only the rules
        // and the limit are left to check, and the order is already the
        // set's.
        let sorted = !case_insensitive && tags.windows(2).all(|w| w[0].0 < w[1].0);
        if let Some(cache) = cache.filter(|_| sorted && tags.len() <= MAX_TAGS) {
            // Checked in order, as below, so the first bad tag is the one
            // refused; a tag the cache has seen is not checked again.
            let pairs = tags.iter().map(|(k, v)| cache.checked(k, v)).collect::<Result<Box<[_]>, _>>()?;
            return Ok(TagSet { pairs, case_insensitive: false });
        }
        for (k, v) in &tags {
            check_tag(k, v)?;
        }
        if sorted {
            if tags.len() > MAX_TAGS {
                return Err(TagSetError::Limit { count: tags.len() });
            }
            return Ok(TagSet::from_sorted(false, &tags));
        }
        let set = TagSet::new(case_insensitive).with(tags.iter().copied())?;
        Ok(set)
    }

    pub fn case_insensitive(&self) -> bool {
        self.case_insensitive
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.pairs.iter().map(|p| (p.key(), p.value()))
    }

    /// The value of the tag a condition key names: the key whose case matches
    /// exactly, else the first (in byte order) that matches ignoring case.
    pub fn lookup(&self, key: &str) -> Option<&str> {
        lookup_pairs(self.iter(), key, self.get(key))
    }

    /// The value of the tag whose key is exactly `key` (case-sensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.binary_search_by(|p| p.key().cmp(key)).ok().and_then(|i| self.pairs.get(i)).map(|p| p.value())
    }

    /// The stored key that `key` addresses: exact, or for a case-insensitive
    /// set the one equal ignoring case.
    fn position(pairs: &[(&str, &str)], key: &str, case_insensitive: bool) -> Option<usize> {
        if let Ok(i) = pairs.binary_search_by(|(k, _)| (*k).cmp(key)) {
            return Some(i);
        }
        if case_insensitive {
            return pairs.iter().position(|(k, _)| keys_equal_ignoring_case(k, key));
        }
        None
    }

    /// The set with `tags` written (existing keys replaced). Fails when the
    /// result would exceed [`MAX_TAGS`] or the request itself holds keys that
    /// are the same in this set's eyes. Rules on each tag are the caller's
    /// to check first.
    ///
    /// The request is checked in one pass with hashing, and the limit before
    /// any tag is placed, so a request of a hundred thousand tags costs
    /// linear time; the errors are those of writing the tags one by one.
    pub fn with<'a>(&'a self, tags: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<TagSet, TagSetError> {
        let tags: Vec<(&str, &str)> = tags.into_iter().collect();
        let folded = |k: &str| -> String { k.chars().map(fold_char).collect() };
        let mut exact: HashSet<&str> = HashSet::with_capacity(tags.len());
        // Folded key to the first spelling written (case-insensitive sets).
        let mut by_folded: HashMap<String, &str> = HashMap::new();
        for &(k, v) in &tags {
            if !exact.insert(k) {
                return Err(TagRuleError::RepeatedKey { key: k.to_string() }.into());
            }
            if self.case_insensitive {
                match by_folded.entry(folded(k)) {
                    Entry::Occupied(prev) => {
                        return Err(TagRuleError::DuplicateKey { first: prev.get().to_string(), second: k.to_string() }.into())
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(k);
                    }
                }
            }
            // Far over the rules' limits: refused here too, for callers that
            // skipped the rules (lengths have always been bounded to a u16).
            if k.len() > usize::from(u16::MAX) {
                return Err(TagRuleError::KeyTooLong { key: k.chars().take(32).collect(), chars: k.chars().count() }.into());
            }
            if v.len() > usize::from(u16::MAX) {
                return Err(TagRuleError::ValueTooLong { key: k.to_string(), chars: v.chars().count() }.into());
            }
        }
        // Every written key lands as one tag; a current tag stays unless a
        // written key addresses it.
        let kept = self
            .iter()
            .filter(|(k, _)| !(exact.contains(k) || (self.case_insensitive && by_folded.contains_key(&folded(k)))))
            .count();
        let count = kept + tags.len();
        if count > MAX_TAGS {
            return Err(TagSetError::Limit { count });
        }
        let mut pairs: Vec<(&str, &str)> = self.iter().collect();
        for (k, v) in tags {
            if let Some(i) = TagSet::position(&pairs, k, self.case_insensitive) {
                pairs.remove(i);
            }
            let at = pairs.binary_search_by(|(key, _)| (*key).cmp(k)).unwrap_or_else(|i| i);
            pairs.insert(at, (k, v));
        }
        debug_assert_eq!(pairs.len(), count);
        Ok(TagSet::from_sorted(self.case_insensitive, &pairs))
    }

    /// The set without `keys`; absent keys are ignored.
    pub fn without<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> TagSet {
        let mut pairs: Vec<(&str, &str)> = self.iter().collect();
        for k in keys {
            if let Some(i) = TagSet::position(&pairs, k, self.case_insensitive) {
                pairs.remove(i);
            }
        }
        TagSet::from_sorted(self.case_insensitive, &pairs)
    }
}

/// Why a tag set could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TagSetError {
    #[error(transparent)]
    Rule(#[from] TagRuleError),
    #[error("the resource would have {count} tags; at most 50 are allowed")]
    Limit { count: usize },
}

/// Condition-key lookup over any list of tags sorted by key: the exact key
/// if present, else the first key equal ignoring case.
pub fn lookup_pairs<'a>(
    mut pairs: impl Iterator<Item = (&'a str, &'a str)>,
    key: &str,
    exact: Option<&'a str>,
) -> Option<&'a str> {
    if exact.is_some() {
        return exact;
    }
    pairs.find(|(k, _)| keys_equal_ignoring_case(k, key)).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(check_tag("Project", "Alpha").is_ok());
        assert!(check_tag("Größe", "部署 A").is_ok());
        assert!(check_tag("a_.:/=+-@", "").is_ok());
        assert!(check_tag(&"k".repeat(128), &"v".repeat(256)).is_ok());
        assert_eq!(check_tag("", "x"), Err(TagRuleError::EmptyKey));
        assert!(matches!(check_tag(&"k".repeat(129), ""), Err(TagRuleError::KeyTooLong { chars: 129, .. })));
        assert!(matches!(check_tag("k", &"é".repeat(257)), Err(TagRuleError::ValueTooLong { chars: 257, .. })));
        assert!(check_tag(&"é".repeat(128), "").is_ok(), "length counts characters, not bytes");
        assert!(matches!(check_tag("team#1", "x"), Err(TagRuleError::KeyCharacter { ch: '#', .. })));
        assert!(matches!(check_tag("team", "a\tb"), Err(TagRuleError::ValueCharacter { ch: '\t', .. })));
        assert!(matches!(check_tag("team", "a\nb"), Err(TagRuleError::ValueCharacter { .. })));
        assert!(matches!(check_tag("AWS:team", "x"), Err(TagRuleError::ReservedKey { .. })));
        assert!(matches!(check_tag("team", "Aws:x"), Err(TagRuleError::ReservedValue { .. })));
        assert!(check_tag("awsteam", "aws").is_ok());
    }

    #[test]
    fn a_cached_build_gives_the_set_or_the_error_an_uncached_one_gives() {
        let many: Vec<(String, String)> = (0..51).map(|i| (format!("k{i:02}"), "v".to_string())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let cases: Vec<Vec<(&str, &str)>> = vec![
            vec![],
            vec![("Owner", "team-1"), ("Project", "p1")],
            vec![("Owner", "team-1"), ("Project", "p2")],
            vec![("Project", "p1"), ("Owner", "team-1")],
            vec![("a", "1"), ("a", "2")],
            vec![("Owner", "team-1"), ("aws:x", "1")],
            vec![("Owner", "team-1"), ("team#1", "x"), ("zz", "aws:y")],
            vec![("Owner", "a\tb")],
            vec![("k", "v"), ("l", "é")],
            many[..50].to_vec(),
            many.clone(),
            vec![("k00", "v"), ("zz", "aws:y")],
        ];
        let mut cache = TagCache::default();
        // Twice over: the second time, the good tags come from the cache.
        for round in 0..2 {
            for tags in &cases {
                let cached = TagSet::from_tags_cached(&mut cache, tags.iter().copied());
                assert_eq!(cached, TagSet::from_tags(false, tags.iter().copied()), "round {round}: {tags:?}");
            }
        }
        // Bounded: full, it forgets what it kept.
        let names: Vec<String> = (0..TagCache::MOST + 10).map(|i| format!("v{i}")).collect();
        for name in &names {
            TagSet::from_tags_cached(&mut cache, [("Name", name.as_str())]).unwrap();
            assert!(cache.table.len() <= TagCache::MOST);
        }
    }

    #[test]
    fn case_insensitive_sets_replace_and_keep_the_latest_spelling() {
        let set = TagSet::from_tags(true, [("Department", "foo")]).unwrap();
        let set = set.with([("department", "bar")]).unwrap();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![("department", "bar")]);
        let plain = TagSet::from_tags(false, [("Costcenter", "1234")]).unwrap().with([("costcenter", "5678")]).unwrap();
        assert_eq!(plain.len(), 2);
        assert!(matches!(
            TagSet::new(true).with([("Team", "a"), ("team", "b")]),
            Err(TagSetError::Rule(TagRuleError::DuplicateKey { .. }))
        ));
        assert!(matches!(
            TagSet::new(false).with([("a", "1"), ("a", "2")]),
            Err(TagSetError::Rule(TagRuleError::RepeatedKey { .. }))
        ));
        assert!(TagSet::new(false).with([("Team", "a"), ("team", "b")]).is_ok());
        assert_eq!(set.without(["DEPARTMENT"]).len(), 0);
        assert_eq!(plain.without(["COSTCENTER"]).len(), 2);
    }

    #[test]
    fn lookup_prefers_exact_case_then_byte_order() {
        let set = TagSet::from_tags(false, [("stack", "production"), ("Stack", "test")]).unwrap();
        assert_eq!(set.lookup("Stack"), Some("test"));
        assert_eq!(set.lookup("stack"), Some("production"));
        assert_eq!(set.lookup("STACK"), Some("test"), "'Stack' sorts before 'stack'");
        assert_eq!(set.lookup("other"), None);
    }

    #[test]
    fn a_huge_request_is_refused_by_the_limit_in_linear_time() {
        let tags: Vec<(String, String)> = (0..120_000).map(|i| (format!("key-{i}"), "v".to_string())).collect();
        let pairs = || tags.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let (ci, cs) = (TagSet::new(true), TagSet::new(false));
        assert_eq!(ci.with(pairs()), Err(TagSetError::Limit { count: 120_000 }));
        assert_eq!(cs.with(pairs()), Err(TagSetError::Limit { count: 120_000 }));
        // A repeated key anywhere in the request still answers first, as
        // when the tags were written one by one.
        let mut repeated = tags.clone();
        repeated.push(("key-7".into(), "w".into()));
        let pairs = repeated.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        assert_eq!(cs.with(pairs), Err(TagRuleError::RepeatedKey { key: "key-7".into() }.into()));
        let mut dup = tags.clone();
        dup.push(("KEY-7".into(), "w".into()));
        let pairs = dup.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        assert_eq!(ci.with(pairs), Err(TagRuleError::DuplicateKey { first: "key-7".into(), second: "KEY-7".into() }.into()));
    }

    #[test]
    fn the_limit_counts_replaced_keys_once() {
        let current: Vec<(String, String)> = (0..50).map(|i| (format!("k{i}"), "v".to_string())).collect();
        let ci = TagSet::from_tags(true, current.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        let upper: Vec<(String, String)> = (0..50).map(|i| (format!("K{i}"), "w".to_string())).collect();
        let replaced = ci.with(upper.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert_eq!(replaced.len(), 50);
        assert_eq!(replaced.get("K3"), Some("w"));
        assert_eq!(ci.with([("K3", "x"), ("new", "y")]), Err(TagSetError::Limit { count: 51 }));
        let cs = TagSet::from_tags(false, current.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert_eq!(cs.with([("K3", "x")]), Err(TagSetError::Limit { count: 51 }));
    }

    #[test]
    fn limit() {
        let tags: Vec<(String, String)> = (0..50).map(|i| (format!("k{i}"), "v".to_string())).collect();
        let set = TagSet::from_tags(false, tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert!(set.with([("k7", "changed")]).is_ok());
        assert_eq!(set.with([("k50", "x")]), Err(TagSetError::Limit { count: 51 }));
    }
}
