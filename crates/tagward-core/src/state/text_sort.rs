//! Sorting many items by a text they point to, without chasing the
//! pointers in every comparison.
//!
//! Building the tag index sorts every tagged ARN once (a million for a
//! million keys). A comparison sort reads both ARNs through their pointers
//! at each of its ~20 million comparisons: cache misses, then a `memcmp`
//! over a prefix that most ARNs share. Here each item is read once per
//! 16-byte step instead: the step's bytes are copied beside the item's
//! index as one `u128`, the items are sorted by those integers, and only
//! the items that tie over the whole step are read again, at the next
//! step (a most-significant-digit sort). A step at which every item of a
//! group has the same bytes skips the sort.

/// One item's 16 bytes from `offset` (zero-padded, big-endian so that
/// integers order as the bytes do) and how many bytes it has from there,
/// capped at 17. Ordering by the pair is ordering by the text for those 16
/// bytes, a shorter text first when one is a prefix of the other; two
/// items tie only when both have more than 16 bytes left and the same 16.
fn step_key(text: &[u8], offset: usize) -> (u128, u8) {
    let rest = text.get(offset..).unwrap_or_default();
    let left = rest.len().min(17) as u8;
    // Sixteen bytes or more: one load (a copy of a length known only at
    // run time would call `memmove`).
    if let Some(bytes) = rest.first_chunk::<16>() {
        return (u128::from_be_bytes(*bytes), left);
    }
    let mut bytes = [0u8; 16];
    bytes[..rest.len()].copy_from_slice(rest);
    (u128::from_be_bytes(bytes), left)
}

/// `items` in the order of the bytes `text` gives for each, as
/// `sort_unstable_by(|a, b| text(a).cmp(text(b)))` orders them (items with
/// equal texts in no particular order).
pub(super) fn sorted_by_text<T: Copy>(items: &[T], text: impl Fn(&T) -> &[u8]) -> Vec<T> {
    // (step key, bytes left capped at 17, index into `items`)
    let mut keyed: Vec<(u128, u8, usize)> = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let (key, left) = step_key(text(item), 0);
            (key, left, i)
        })
        .collect();
    // Groups still to order: their range in `keyed` and the offset their
    // items' texts are equal up to.
    let mut groups = vec![(0, keyed.len(), 0)];
    while let Some((start, end, offset)) = groups.pop() {
        let group = &mut keyed[start..end];
        if offset > 0 {
            for entry in group.iter_mut() {
                let (key, left) = step_key(text(&items[entry.2]), offset);
                (entry.0, entry.1) = (key, left);
            }
        }
        let Some(&(key, left, _)) = group.first() else { continue };
        let first = (key, left);
        if group.iter().all(|e| (e.0, e.1) == first) {
            if first.1 == 17 {
                groups.push((start, end, offset + 16));
            }
            continue;
        }
        group.sort_unstable_by_key(|e| (e.0, e.1));
        let mut i = 0;
        while i < group.len() {
            let at = (group[i].0, group[i].1);
            let j = i + group[i..].iter().take_while(|e| (e.0, e.1) == at).count();
            if j - i > 1 && at.1 == 17 {
                groups.push((start + i, start + j, offset + 16));
            }
            i = j;
        }
    }
    keyed.into_iter().map(|(_, _, i)| items[i]).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn check(texts: &[Vec<u8>]) {
        let refs: Vec<&[u8]> = texts.iter().map(Vec::as_slice).collect();
        let sorted = sorted_by_text(&refs, |t| t);
        let mut expected = refs.clone();
        expected.sort();
        assert_eq!(sorted, expected);
    }

    #[test]
    fn orders_as_the_bytes_do_across_steps_and_prefixes() {
        let arn = |s: &str| format!("arn:aws:kms:us-east-1:111122223333:key/{s}").into_bytes();
        check(&[arn("b"), arn("a"), arn("ab"), arn("a"), arn(""), arn("a\0"), arn("a\0\0"), b"arn".to_vec(), Vec::new()]);
        // Texts equal over whole 16-byte steps, then differing, or ending
        // exactly at a step's end.
        let long = |tail: &str| format!("{}{tail}", "x".repeat(48)).into_bytes();
        check(&[
            long("b"),
            long(""),
            long("a"),
            long("\0"),
            long("ab"),
            "x".repeat(32).into_bytes(),
            "x".repeat(33).into_bytes(),
        ]);
        check(&[]);
        check(&[b"only".to_vec()]);
    }

    proptest! {
        #[test]
        fn orders_as_a_comparison_sort(
            texts in prop::collection::vec(
                prop::collection::vec(prop::sample::select(vec![0u8, b'a', b'b', 0xff]), 0..40),
                0..60,
            ),
            prefix in prop::collection::vec(any::<u8>(), 0..20),
        ) {
            let texts: Vec<Vec<u8>> = texts.into_iter().map(|t| [prefix.clone(), t].concat()).collect();
            check(&texts);
        }
    }
}
