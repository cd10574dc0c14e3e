//! The resources by ARN: a persistent hash map stored densely.
//!
//! imbl's `HashMap` gives every trie node room for 32 entries, and with a
//! million resources most nodes near the leaves hold a few: about 150 bytes
//! per resource went to the map alone. Here the entries, each an ARN's hash
//! and the resource, sit in [`BUCKETS`] buckets by the hash's top bits, each
//! bucket one shared array sorted by hash, and the buckets in a persistent
//! array of two fixed levels ([`CHUNKS`] shared chunks of [`CHUNK`]
//! buckets). A lookup hashes the ARN once, reads the bucket's place in two
//! steps (no comparisons), finds the hash in one bucket by stepping from
//! where its lower bits place it (the hashes spread evenly; see
//! [`first_not_below`]) and compares the ARN text once (more for a hash
//! collision, which is handled: entries of one hash are in one bucket, next
//! to each other). A change copies one bucket (about 64 entries of 16 bytes
//! for a million resources), its chunk and the chunk list (128 pointers
//! each) when an older state still shares them; cloning the map copies
//! nothing.

use std::hash::BuildHasher;
use std::sync::Arc;

/// Buckets (a power of two): about 64 entries each for 1,000,000 resources.
const BUCKET_BITS: u32 = 14;
const BUCKETS: usize = 1 << BUCKET_BITS;
/// Buckets per chunk, and chunks: a change copies one of each level.
const CHUNK_BITS: u32 = 7;
const CHUNK: usize = 1 << CHUNK_BITS;
const CHUNKS: usize = BUCKETS >> CHUNK_BITS;

/// What the map holds: a value that knows its ARN.
pub(super) trait Named {
    fn name(&self) -> &str;
}

type Bucket<V> = Option<Arc<Vec<(u64, V)>>>;
type Chunk<V> = Arc<[Bucket<V>]>;

#[derive(Clone)]
pub(super) struct ByArn<V> {
    /// INVARIANT: `None`, or exactly [`CHUNKS`] chunks of exactly [`CHUNK`]
    /// buckets; bucket `b` (chunk `b >> CHUNK_BITS`, place `b % CHUNK`)
    /// holds the entries whose hash's top bits are `b`, sorted by hash, and
    /// is `None` when it holds none.
    buckets: Option<Arc<[Chunk<V>]>>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl<V: Clone> Default for ByArn<V> {
    fn default() -> Self {
        ByArn { buckets: None, len: 0, hasher: foldhash::fast::RandomState::default() }
    }
}

fn bucket_of(hash: u64) -> usize {
    (hash >> (64 - BUCKET_BITS)) as usize
}

/// Every bucket empty.
fn empty_chunks<V>() -> Arc<[Chunk<V>]> {
    (0..CHUNKS).map(|_| (0..CHUNK).map(|_| None).collect()).collect()
}

impl<V: Named + Clone> ByArn<V> {
    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries of bucket `b`.
    fn bucket(&self, b: usize) -> Option<&[(u64, V)]> {
        let chunk = self.buckets.as_deref()?.get(b >> CHUNK_BITS)?;
        chunk.get(b % CHUNK)?.as_deref().map(Vec::as_slice)
    }

    /// Bucket `b`'s slot, its chunk and the chunk list unshared first.
    fn slot_mut(&mut self, b: usize) -> Option<&mut Bucket<V>> {
        let chunks = self.buckets.get_or_insert_with(empty_chunks);
        let chunk = Arc::make_mut(chunks).get_mut(b >> CHUNK_BITS)?;
        Arc::make_mut(chunk).get_mut(b % CHUNK)
    }

    /// Where `name` is in `bucket`: `Ok` at its index, `Err` where it would go.
    fn position(bucket: &[(u64, V)], hash: u64, name: &str) -> Result<usize, usize> {
        let mut at = first_not_below(bucket, hash);
        while let Some((h, v)) = bucket.get(at) {
            if *h != hash {
                break;
            }
            if v.name() == name {
                return Ok(at);
            }
            at += 1;
        }
        Err(at)
    }

    pub(super) fn get(&self, name: &str) -> Option<&V> {
        let hash = self.hash(name);
        let bucket = self.bucket(bucket_of(hash))?;
        Self::position(bucket, hash, name).ok().map(|at| &bucket[at].1)
    }

    pub(super) fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every value, in the order of their hashes.
    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.buckets
            .iter()
            .flat_map(|chunks| chunks.iter())
            .flat_map(|chunk| chunk.iter())
            .flat_map(|bucket| bucket.iter().flat_map(|b| b.iter().map(|(_, v)| v)))
    }

    /// Adds `value` under its name; returns the value it replaced.
    pub(super) fn insert(&mut self, value: V) -> Option<V> {
        let hash = self.hash(value.name());
        let slot = self.slot_mut(bucket_of(hash))?;
        let bucket = slot.get_or_insert_with(|| Arc::new(Vec::new()));
        match Self::position(bucket, hash, value.name()) {
            Ok(at) => Some(std::mem::replace(&mut unshare(bucket, 0)[at], (hash, value)).1),
            Err(at) => {
                unshare(bucket, 1).insert(at, (hash, value));
                self.len += 1;
                None
            }
        }
    }

    /// Removes the value named `name`.
    pub(super) fn remove(&mut self, name: &str) -> Option<V> {
        let hash = self.hash(name);
        let b = bucket_of(hash);
        // Not there: nothing is unshared.
        let at = Self::position(self.bucket(b)?, hash, name).ok()?;
        let slot = self.slot_mut(b)?;
        let bucket = slot.as_mut()?;
        let (_, removed) = unshare(bucket, 0).remove(at);
        if bucket.is_empty() {
            *slot = None;
        }
        self.len -= 1;
        Some(removed)
    }

    /// The same map with no spare room in its buckets: for a map built
    /// from nothing, whose buckets grew by doubling.
    pub(super) fn compacted(&self) -> ByArn<V> {
        let buckets = self.buckets.as_ref().map(|chunks| {
            chunks
                .iter()
                .map(|chunk| {
                    chunk.iter().map(|bucket| bucket.as_ref().map(|b| Arc::new(b.iter().cloned().collect::<Vec<_>>()))).collect()
                })
                .collect()
        });
        ByArn { buckets, len: self.len, hasher: self.hasher.clone() }
    }
}

/// Steps taken from a bucket's guessed place before a binary search of
/// the rest.
const NEAR: usize = 8;

/// The first place in `bucket` (sorted by hash) whose hash is not below
/// `hash`. The hashes of one bucket spread evenly over its range, so an
/// entry sits about where its hash's bits below the bucket's say, within a
/// few places: found by stepping from there, one or two cache lines read,
/// where a binary search of 64 entries reads six lines, each a cache miss
/// in a million-resource state. A bucket that is not spread evenly (a
/// collision, an unlucky hasher) is searched from the guess on.
fn first_not_below<V>(bucket: &[(u64, V)], hash: u64) -> usize {
    let below = |i: usize| bucket.get(i).is_some_and(|(h, _)| *h < hash);
    let guess = ((u128::from(hash << BUCKET_BITS) * bucket.len() as u128) >> 64) as usize;
    let mut at = guess;
    if at > 0 && !below(at - 1) {
        // The place is before the guess.
        for _ in 0..NEAR {
            at -= 1;
            if at == 0 || below(at - 1) {
                return at;
            }
        }
        return bucket.get(..at).unwrap_or_default().partition_point(|(h, _)| *h < hash);
    }
    for _ in 0..NEAR {
        if !below(at) {
            return at;
        }
        at += 1;
    }
    at + bucket.get(at..).unwrap_or_default().partition_point(|(h, _)| *h < hash)
}

/// The bucket to change, unshared: copied (with room for `extra` more)
/// when an older state holds it too.
fn unshare<V: Clone>(bucket: &mut Arc<Vec<(u64, V)>>, extra: usize) -> &mut Vec<(u64, V)> {
    if Arc::get_mut(bucket).is_none() {
        let mut copy = Vec::with_capacity(bucket.len() + extra);
        copy.extend(bucket.iter().cloned());
        *bucket = Arc::new(copy);
    }
    Arc::make_mut(bucket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug, PartialEq)]
    struct Item(Arc<str>, u32);

    impl Named for Item {
        fn name(&self) -> &str {
            &self.0
        }
    }

    fn name(i: u32) -> Arc<str> {
        Arc::from(format!("arn:aws:kms:us-east-1:111122223333:key/{i:06}"))
    }

    fn check(map: &ByArn<Item>, model: &BTreeMap<Arc<str>, u32>) {
        assert_eq!(map.len(), model.len());
        let mut all: Vec<(Arc<str>, u32)> = map.values().map(|v| (v.0.clone(), v.1)).collect();
        all.sort();
        assert_eq!(all, model.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>());
        for i in (0..2_100).step_by(7) {
            assert_eq!(map.get(&name(i)).map(|v| v.1), model.get(&name(i)).copied(), "get {i}");
            assert_eq!(map.contains_key(&name(i)), model.contains_key(&name(i)), "contains {i}");
        }
    }

    #[test]
    fn follows_a_map_under_inserts_removals_and_sharing() {
        let mut map: ByArn<Item> = ByArn::default();
        let mut model = BTreeMap::new();
        check(&map, &model);
        assert_eq!(map.remove(&name(1)), None, "removing from an empty map");
        let mut kept = Vec::new();
        let mut seed = 0x9e37_79b9_u64;
        for round in 0..8_000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let i = (seed % 2_000) as u32;
            if seed.is_multiple_of(4) {
                assert_eq!(map.remove(&name(i)).map(|v| v.1), model.remove(&name(i)), "remove {i}");
            } else {
                let old = map.insert(Item(name(i), round)).map(|v| v.1);
                assert_eq!(old, model.insert(name(i), round), "insert {i}");
            }
            if round % 1_000 == 0 {
                kept.push((map.clone(), model.clone()));
            }
        }
        check(&map, &model);
        for (old, old_model) in &kept {
            check(old, old_model);
        }
        let compact = map.compacted();
        check(&compact, &model);
        let hashes: Vec<u64> = compact.values().map(|v| compact.hash(&v.0)).collect();
        assert!(hashes.windows(2).all(|w| w[0] <= w[1]), "values come in hash order");
        // Removing what is not there changes nothing, shared or not.
        let before = compact.clone();
        let mut after = compact.clone();
        assert_eq!(after.remove("arn:aws:kms:us-east-1:111122223333:key/none"), None);
        check(&after, &model);
        check(&before, &model);
    }

    proptest::proptest! {
        #[test]
        fn the_guessed_place_is_the_place_a_binary_search_finds(
            lows in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..300),
            shape in 0usize..4,
            probe in proptest::prelude::any::<u64>(),
        ) {
            // A bucket spread evenly, bunched at one end, all of one hash,
            // or of a few repeated hashes; every hash in and around it.
            let top = 5u64 << (64 - BUCKET_BITS);
            let span = 1u64 << (64 - BUCKET_BITS);
            let place = |r: u64| match shape {
                0 => top + r % span,
                1 => top + r % 1_000,
                2 => top + span / 2,
                _ => top + (r % 5) * (span / 5),
            };
            let mut bucket: Vec<(u64, ())> = lows.iter().map(|r| (place(*r), ())).collect();
            bucket.sort_unstable_by_key(|e| e.0);
            let mut probes: Vec<u64> = bucket.iter().flat_map(|e| [e.0, e.0.wrapping_sub(1), e.0.wrapping_add(1)]).collect();
            probes.extend([0, top, top + span - 1, u64::MAX, place(probe), probe]);
            for hash in probes {
                proptest::prop_assert_eq!(first_not_below(&bucket, hash), bucket.partition_point(|(h, _)| *h < hash));
            }
        }
    }

    #[test]
    fn entries_of_one_hash_stay_together() {
        // Entries forced onto a few hashes, as colliding ARNs would be.
        let mut map: ByArn<Item> = ByArn::default();
        map.insert(Item(name(0), 0));
        map.remove(&name(0));
        let hashes = [3u64, 3, 3, u64::MAX, u64::MAX];
        for (i, h) in hashes.iter().enumerate() {
            let slot = map.slot_mut(bucket_of(*h)).unwrap();
            let bucket = slot.get_or_insert_with(|| Arc::new(Vec::new()));
            let at = ByArn::position(bucket, *h, &name(i as u32)).unwrap_err();
            unshare(bucket, 1).insert(at, (*h, Item(name(i as u32), i as u32)));
            map.len += 1;
        }
        for (i, h) in hashes.iter().enumerate() {
            let bucket = map.bucket(bucket_of(*h)).unwrap();
            assert_eq!(ByArn::position(bucket, *h, &name(i as u32)).map(|at| bucket[at].1 .1), Ok(i as u32), "{i}");
        }
        assert_eq!(map.bucket(bucket_of(3)).unwrap().len(), 3, "one hash, one bucket");
    }
}
