//! The sets of ARNs in the `GetResources` tag index: one per tag key and
//! value, persistent, in ARN order.
//!
//! A set is a persistent ordered map from each chunk's first ARN to a
//! sorted chunk of up to [`CHUNK`] entries. A B-tree set of pointers
//! (imbl's `OrdSet`) spends two to three times the pointer on its nodes
//! when a million ARNs arrive in order (its leaves split in half and stay
//! so); a chunk keeps its entries side by side, and an insert in ARN order
//! fills a chunk before it starts the next one. One insert or removal looks
//! up one chunk (O(log n)) and copies at most that chunk when an older
//! state still shares it.

use std::ops::Bound;
use std::sync::Arc;

use super::IndexedArn;

/// Entries per chunk: 512 bytes of pointers, copied whole when shared.
const CHUNK: usize = 64;

type Chunk = Arc<Vec<IndexedArn>>;

#[derive(Clone, Default)]
pub(super) struct ArnSet {
    /// Each chunk by its first ARN. INVARIANT: every chunk is non-empty,
    /// sorted, its key is its first entry, and all its entries sort before
    /// the next chunk's key.
    chunks: imbl::OrdMap<IndexedArn, Chunk>,
    len: usize,
}

/// The chunk to change, unshared: copied (with room for a full chunk) when
/// an older state holds it too.
fn unshare(chunk: &mut Chunk) -> &mut Vec<IndexedArn> {
    if Arc::get_mut(chunk).is_none() {
        let mut copy = Vec::with_capacity(CHUNK);
        copy.extend(chunk.iter().cloned());
        *chunk = Arc::new(copy);
    }
    Arc::make_mut(chunk)
}

impl ArnSet {
    /// A set of one ARN.
    pub(super) fn unit(arn: IndexedArn) -> ArnSet {
        let mut set = ArnSet::default();
        set.insert(arn);
        set
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The key of the chunk that holds, or would hold, `arn`: the last one
    /// whose first entry is not above it, else the first chunk.
    fn chunk_for(&self, arn: &str) -> Option<IndexedArn> {
        self.chunks
            .range::<_, str>((Bound::Unbounded, Bound::Included(arn)))
            .next_back()
            .or_else(|| self.chunks.get_min().map(|(k, v)| (k, v)))
            .map(|(k, _)| k.clone())
    }

    /// Adds `arn`; false when it was there already.
    pub(super) fn insert(&mut self, arn: IndexedArn) -> bool {
        let Some(key) = self.chunk_for(&arn.0) else {
            let mut chunk = Vec::with_capacity(CHUNK);
            chunk.push(arn.clone());
            self.chunks.insert(arn, Arc::new(chunk));
            self.len = 1;
            return true;
        };
        let Some(chunk) = self.chunks.get_mut::<str>(&key.0) else { return false };
        let at = match chunk.binary_search(&arn) {
            Ok(_) => return false,
            Err(at) => at,
        };
        if at > 0 && chunk.len() < CHUNK {
            // The common case: the chunk keeps its first entry, so it is
            // changed where it is.
            unshare(chunk).insert(at, arn);
            self.len += 1;
            return true;
        }
        let Some(mut chunk) = self.chunks.remove::<str>(&key.0) else { return false };
        let entries = unshare(&mut chunk);
        if entries.len() < CHUNK {
            entries.insert(at, arn);
            self.put(chunk);
        } else {
            // Full. An ARN past the end starts the next chunk, and one
            // well inside splits the chunk where it goes (it ends the left
            // part): ARNs that arrive in order, even several runs
            // interleaved (one per region), then leave full chunks behind.
            // Near the front, the chunk splits in halves.
            let mut right = Vec::with_capacity(CHUNK);
            if at == entries.len() {
                right.push(arn);
            } else if at >= CHUNK / 4 {
                right.extend(entries.drain(at..));
                entries.push(arn);
            } else {
                right.extend(entries.drain(CHUNK / 2..));
                entries.insert(at, arn);
            }
            self.put(chunk);
            self.put_after_split(right);
        }
        self.len += 1;
        true
    }

    /// Removes `arn`; false when it was not there.
    pub(super) fn remove(&mut self, arn: &str) -> bool {
        let Some(key) = self.chunk_for(arn) else { return false };
        let Ok(at) = self.chunks.get::<str>(&key.0).map_or(Err(0), |c| c.binary_search_by(|e| (**e.0).cmp(arn))) else {
            return false;
        };
        if at > 0 {
            if let Some(chunk) = self.chunks.get_mut::<str>(&key.0) {
                unshare(chunk).remove(at);
                self.len -= 1;
                return true;
            }
        }
        let Some(mut chunk) = self.chunks.remove::<str>(&key.0) else { return false };
        unshare(&mut chunk).remove(at);
        if !chunk.is_empty() {
            self.put(chunk);
        }
        self.len -= 1;
        true
    }

    /// Files the right part of a split; a small one joins the next chunk
    /// when that has room, so that splits cannot leave a trail of tiny
    /// chunks.
    fn put_after_split(&mut self, mut right: Vec<IndexedArn>) {
        if right.len() < CHUNK / 4 {
            let next = right.last().and_then(|last| {
                self.chunks.range::<_, str>((Bound::Excluded(&**last.0), Bound::Unbounded)).next().map(|(k, _)| k.clone())
            });
            if let Some(key) = next {
                if self.chunks.get::<str>(&key.0).is_some_and(|c| c.len() + right.len() <= CHUNK) {
                    if let Some(chunk) = self.chunks.remove::<str>(&key.0) {
                        right.extend(chunk.iter().cloned());
                    }
                }
            }
        }
        self.put(Arc::new(right));
    }

    /// Files a non-empty chunk under its first entry.
    fn put(&mut self, chunk: Chunk) {
        if let Some(first) = chunk.first().cloned() {
            self.chunks.insert(first, chunk);
        }
    }

    /// The ARNs after `after` (all when `None`), in order.
    pub(super) fn after<'a>(&'a self, after: Option<&'a str>) -> impl Iterator<Item = &'a IndexedArn> + 'a {
        let start = after.and_then(|a| self.chunk_for(a));
        let lower: Bound<&str> = match &start {
            Some(k) => Bound::Included(&**k.0),
            None => Bound::Unbounded,
        };
        self.chunks
            .range::<_, str>((lower, Bound::Unbounded))
            .flat_map(|(_, chunk)| chunk.iter())
            .skip_while(move |e| after.is_some_and(|a| &**e.0 <= a))
    }
}

impl ArnSet {
    /// A set of ARNs given sorted and unique, in full chunks.
    pub(super) fn from_sorted(arns: Vec<IndexedArn>) -> ArnSet {
        let len = arns.len();
        let chunks = arns
            .chunks(CHUNK)
            .filter_map(|part| {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.extend(part.iter().cloned());
                part.first().map(|first| (first.clone(), Arc::new(chunk)))
            })
            .collect();
        ArnSet { chunks, len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn arn(i: u32) -> IndexedArn {
        IndexedArn(Arc::new(Arc::from(format!("arn:aws:kms:us-east-1:111122223333:key/{i:06}"))))
    }

    fn contents(set: &ArnSet, after: Option<&str>) -> Vec<String> {
        set.after(after).map(|a| a.0.to_string()).collect()
    }

    #[test]
    fn follows_a_sorted_set_under_inserts_removals_and_sharing() {
        let mut set = ArnSet::default();
        let mut model = BTreeSet::new();
        let mut seed = 0x2545_f491_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut kept = Vec::new();
        for round in 0..6_000 {
            let i = (next() % 2_000) as u32;
            let a = arn(i);
            if next() % 3 == 0 {
                assert_eq!(set.remove(&a.0), model.remove(&a.0.to_string()), "remove {i}");
            } else {
                assert_eq!(set.insert(a.clone()), model.insert(a.0.to_string()), "insert {i}");
            }
            assert_eq!(set.len(), model.len());
            if round % 500 == 0 {
                kept.push((set.clone(), model.clone()));
            }
        }
        // Earlier versions are untouched by later changes.
        for (old, old_model) in kept.iter().chain([(set.clone(), model.clone())].iter()) {
            assert_eq!(contents(old, None), old_model.iter().cloned().collect::<Vec<_>>());
            for probe in [0, 1, 999, 1_500, 2_000] {
                let after = arn(probe).0.to_string();
                let want: Vec<String> =
                    old_model.range::<String, _>((Bound::Excluded(&after), Bound::Unbounded)).cloned().collect();
                assert_eq!(contents(old, Some(&after)), want, "after {probe}");
            }
        }
    }

    #[test]
    fn inserts_in_order_fill_whole_chunks() {
        let mut set = ArnSet::default();
        for i in 0..1_000 {
            assert!(set.insert(arn(i)));
        }
        assert_eq!(set.chunks.len(), 1_000usize.div_ceil(CHUNK));
        assert_eq!(contents(&set, None), (0..1_000).map(|i| arn(i).0.to_string()).collect::<Vec<_>>());
        let bulk = ArnSet::from_sorted((0..1_000).map(arn).collect());
        assert_eq!((bulk.chunks.len(), bulk.len()), (1_000usize.div_ceil(CHUNK), 1_000));
        assert_eq!(contents(&bulk, None), contents(&set, None));
        // Three runs interleaved (three regions' keys created in turn).
        let mut runs = ArnSet::default();
        for i in 0..1_000 {
            for run in 0..3 {
                assert!(runs.insert(arn(run * 10_000 + i)));
            }
        }
        assert!(runs.chunks.len() <= 3 * 1_000usize.div_ceil(CHUNK) + 3, "{} chunks", runs.chunks.len());
        assert!(!set.insert(arn(5)), "already there");
        assert!(set.remove(&arn(0).0) && !set.remove(&arn(0).0));
        assert_eq!(contents(&set, None).first().map(String::as_str), Some(&*arn(1).0.to_string()));
    }
}
