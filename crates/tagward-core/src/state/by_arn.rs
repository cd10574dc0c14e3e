//! The resources by ARN: a persistent hash map stored densely.
//!
//! imbl's `HashMap` gives every trie node room for 32 entries, and with a
//! million resources most nodes near the leaves hold a few: about 150 bytes
//! per resource went to the map alone. Here the entries, each an ARN's hash
//! and the resource, are kept sorted by hash in chunks of up to [`CHUNK`],
//! and a persistent ordered map finds a chunk by its first hash. A lookup
//! hashes the ARN once, descends a tree of integers, binary-searches one
//! chunk and compares the ARN text once (twice for a hash collision, which
//! is handled: entries of one hash always sit in one chunk). A change
//! copies at most one chunk when an older state still shares it.

use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::Arc;

/// Entries per chunk (16 bytes each).
const CHUNK: usize = 64;

/// What the map holds: a value that knows its ARN.
pub(super) trait Named {
    fn name(&self) -> &str;
}

type Chunk<V> = Arc<Vec<(u64, V)>>;

#[derive(Clone)]
pub(super) struct ByArn<V> {
    /// Each chunk by its first hash. INVARIANT: chunks are non-empty and
    /// sorted by hash, every hash of a chunk is below the next chunk's
    /// key, and all entries of one hash are in one chunk.
    chunks: imbl::OrdMap<u64, Chunk<V>>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl<V> Default for ByArn<V> {
    fn default() -> Self {
        ByArn { chunks: imbl::OrdMap::new(), len: 0, hasher: foldhash::fast::RandomState::default() }
    }
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

    /// The key of the chunk that holds, or would hold, `hash`.
    fn chunk_for(&self, hash: u64) -> Option<u64> {
        self.chunks
            .range((Bound::Unbounded, Bound::Included(hash)))
            .next_back()
            .or_else(|| self.chunks.get_min().map(|(k, v)| (k, v)))
            .map(|(k, _)| *k)
    }

    /// Where `name` is in `chunk`: `Ok` at its index, `Err` where it would go.
    fn position(chunk: &[(u64, V)], hash: u64, name: &str) -> Result<usize, usize> {
        let mut at = chunk.partition_point(|(h, _)| *h < hash);
        while let Some((h, v)) = chunk.get(at) {
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
        let (_, chunk) = self.chunks.range((Bound::Unbounded, Bound::Included(hash))).next_back()?;
        Self::position(chunk, hash, name).ok().map(|at| &chunk[at].1)
    }

    pub(super) fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.chunks.values().flat_map(|chunk| chunk.iter().map(|(_, v)| v))
    }

    /// Adds `value` under its name; returns the value it replaced.
    pub(super) fn insert(&mut self, value: V) -> Option<V> {
        let hash = self.hash(value.name());
        let Some(key) = self.chunk_for(hash) else {
            let mut chunk = Vec::with_capacity(CHUNK);
            chunk.push((hash, value));
            self.chunks.insert(hash, Arc::new(chunk));
            self.len = 1;
            return None;
        };
        let chunk = self.chunks.get_mut(&key)?;
        let at = match Self::position(chunk, hash, value.name()) {
            Ok(at) => return Some(std::mem::replace(&mut unshare(chunk)[at], (hash, value)).1),
            Err(at) => at,
        };
        self.len += 1;
        if at > 0 && chunk.len() < CHUNK {
            unshare(chunk).insert(at, (hash, value));
            return None;
        }
        let mut chunk = self.chunks.remove(&key)?;
        let entries = unshare(&mut chunk);
        entries.insert(at, (hash, value));
        if entries.len() > CHUNK {
            // Split in halves, moved so that one hash stays in one chunk.
            let mut cut = entries.len() / 2;
            while cut > 0 && entries[cut - 1].0 == entries[cut].0 {
                cut -= 1;
            }
            if cut == 0 {
                cut = entries.len() / 2;
                while cut < entries.len() && entries[cut - 1].0 == entries[cut].0 {
                    cut += 1;
                }
            }
            if cut < entries.len() {
                let mut right = Vec::with_capacity(CHUNK);
                right.extend(entries.drain(cut..));
                self.put(Arc::new(right));
            }
        }
        self.put(chunk);
        None
    }

    /// Removes the value named `name`.
    pub(super) fn remove(&mut self, name: &str) -> Option<V> {
        let hash = self.hash(name);
        let key = self.chunk_for(hash)?;
        let at = Self::position(self.chunks.get(&key)?, hash, name).ok()?;
        self.len -= 1;
        if at > 0 {
            let chunk = self.chunks.get_mut(&key)?;
            return Some(unshare(chunk).remove(at).1);
        }
        let mut chunk = self.chunks.remove(&key)?;
        let (_, removed) = unshare(&mut chunk).remove(at);
        self.put(chunk);
        Some(removed)
    }

    /// Files a chunk under its first hash (an empty one is dropped).
    fn put(&mut self, chunk: Chunk<V>) {
        if let Some((first, _)) = chunk.first() {
            self.chunks.insert(*first, chunk);
        }
    }

    /// The same map with every chunk full: for a map built from nothing,
    /// whose chunks inserts in hash order (random order) left partly
    /// filled.
    pub(super) fn compacted(&self) -> ByArn<V> {
        let mut entries: Vec<(u64, V)> = Vec::with_capacity(self.len);
        for chunk in self.chunks.values() {
            entries.extend(chunk.iter().cloned());
        }
        let mut out = ByArn { chunks: imbl::OrdMap::new(), len: entries.len(), hasher: self.hasher.clone() };
        let mut rest = &entries[..];
        while !rest.is_empty() {
            let mut cut = rest.len().min(CHUNK);
            while cut < rest.len() && rest[cut - 1].0 == rest[cut].0 {
                cut += 1;
            }
            let mut chunk = Vec::with_capacity(cut);
            chunk.extend(rest[..cut].iter().cloned());
            out.put(Arc::new(chunk));
            rest = &rest[cut..];
        }
        out
    }
}

/// The chunk to change, unshared: copied when an older state holds it too.
fn unshare<V: Clone>(chunk: &mut Chunk<V>) -> &mut Vec<(u64, V)> {
    if Arc::get_mut(chunk).is_none() {
        let mut copy = Vec::with_capacity(CHUNK.max(chunk.len() + 1));
        copy.extend(chunk.iter().cloned());
        *chunk = Arc::new(copy);
    }
    Arc::make_mut(chunk)
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
        }
    }

    #[test]
    fn follows_a_map_under_inserts_removals_and_sharing() {
        let mut map: ByArn<Item> = ByArn::default();
        let mut model = BTreeMap::new();
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
        assert!(compact.chunks.len() <= model.len().div_ceil(CHUNK) + 1);
    }

    #[test]
    fn entries_of_one_hash_stay_together() {
        // Entries forced onto a few hashes, as colliding ARNs would be.
        let mut map: ByArn<Item> = ByArn::default();
        let mut entries: Vec<(u64, Item)> = (0..500u32).map(|i| ((i % 5) as u64, Item(name(i), i))).collect();
        entries.sort_by_key(|e| e.0);
        let mut chunk = Vec::new();
        chunk.extend(entries.iter().cloned());
        map.len = chunk.len();
        map.put(Arc::new(chunk));
        let position = |map: &ByArn<Item>, h: u64, i: u32| {
            let key = map.chunk_for(h).unwrap();
            ByArn::position(map.chunks.get(&key).unwrap(), h, &name(i)).is_ok()
        };
        for i in 0..500u32 {
            assert!(position(&map, (i % 5) as u64, i), "{i}");
        }
        let compact = map.compacted();
        for i in 0..500u32 {
            assert!(position(&compact, (i % 5) as u64, i), "{i} after compaction");
        }
        assert_eq!(compact.chunks.len(), 5, "one chunk per hash");
    }
}
