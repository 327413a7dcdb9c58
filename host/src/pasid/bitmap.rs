//! A bitmap of free PASIDs with a 64-ary summary tree, so the first free PASID at or above
//! a bound is found in a constant number of word operations, never by scanning the space.
//!
//! Level 0 holds one bit per PASID (set = free). Bit `i` of level `k + 1` is set when word
//! `i` of level `k` has any bit set. For 2^20 PASIDs the levels have 16384, 256 and 4
//! words.

/// Bits per word, and the fan-out of the summary tree.
const WORD_BITS: usize = 64;

/// The free-set bitmap.
#[derive(Clone, Debug)]
pub(crate) struct FreeBitmap {
    /// `levels[0]` is the leaf level; the last level has at most 64 words.
    levels: Vec<Vec<u64>>,
    bits: usize,
}

impl FreeBitmap {
    /// A bitmap of `bits` entries, all free.
    pub(crate) fn all_free(bits: usize) -> Self {
        let mut levels = Vec::new();
        let mut n = bits;
        loop {
            let words = n.div_ceil(WORD_BITS);
            let mut level = vec![u64::MAX; words];
            if n % WORD_BITS != 0 {
                level[words - 1] = (1u64 << (n % WORD_BITS)) - 1;
            }
            levels.push(level);
            if words <= WORD_BITS {
                break;
            }
            n = words;
        }
        FreeBitmap { levels, bits }
    }

    /// Whether entry `i` is free. `i` must be below the bitmap size.
    #[cfg(test)]
    pub(crate) fn is_free(&self, i: usize) -> bool {
        self.levels[0][i / WORD_BITS] & (1 << (i % WORD_BITS)) != 0
    }

    /// Marks entry `i` taken. `i` must be below the bitmap size.
    pub(crate) fn take(&mut self, i: usize) {
        let mut index = i;
        for level in &mut self.levels {
            let word = &mut level[index / WORD_BITS];
            *word &= !(1 << (index % WORD_BITS));
            if *word != 0 {
                return;
            }
            index /= WORD_BITS;
        }
    }

    /// Marks entry `i` free. `i` must be below the bitmap size.
    pub(crate) fn release(&mut self, i: usize) {
        let mut index = i;
        for level in &mut self.levels {
            let word = &mut level[index / WORD_BITS];
            let was_empty = *word == 0;
            *word |= 1 << (index % WORD_BITS);
            if !was_empty {
                return;
            }
            index /= WORD_BITS;
        }
    }

    /// The first free entry at or above `from`, if any.
    pub(crate) fn first_free_from(&self, from: usize) -> Option<usize> {
        if from >= self.bits {
            return None;
        }
        self.next_set(0, from)
    }

    /// The first set bit at or above `from` in `level`, found by climbing the summary until
    /// a word with a later set bit appears, then descending to its lowest set bits.
    fn next_set(&self, level: usize, from: usize) -> Option<usize> {
        let words = &self.levels[level];
        let word_index = from / WORD_BITS;
        let word = *words.get(word_index)? & (u64::MAX << (from % WORD_BITS));
        if word != 0 {
            return Some(word_index * WORD_BITS + word.trailing_zeros() as usize);
        }
        let next_word = if level + 1 < self.levels.len() {
            self.next_set(level + 1, word_index + 1)?
        } else {
            (word_index + 1..words.len()).find(|&w| words[w] != 0)?
        };
        Some(next_word * WORD_BITS + words[next_word].trailing_zeros() as usize)
    }

    /// Heap bytes the bitmap occupies: a fixed cost, independent of how many are taken.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.levels.iter().map(|l| l.len() * 8).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shape_for_twenty_bits() {
        let b = FreeBitmap::all_free(1 << 20);
        let sizes: Vec<usize> = b.levels.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![16384, 256, 4]);
        assert_eq!(b.heap_bytes(), (16384 + 256 + 4) * 8);
    }

    #[test]
    fn finds_across_levels() {
        let mut b = FreeBitmap::all_free(1 << 20);
        for i in 0..(1 << 20) - 1 {
            b.take(i);
        }
        assert_eq!(b.first_free_from(0), Some((1 << 20) - 1));
        b.take((1 << 20) - 1);
        assert_eq!(b.first_free_from(0), None);
        b.release(70_000);
        assert_eq!(b.first_free_from(0), Some(70_000));
        assert_eq!(b.first_free_from(70_001), None);
        b.release(5);
        assert_eq!(b.first_free_from(6), Some(70_000));
        assert_eq!(b.first_free_from(5), Some(5));
    }

    #[test]
    fn partial_last_word() {
        let mut b = FreeBitmap::all_free(70);
        assert_eq!(b.first_free_from(69), Some(69));
        assert_eq!(b.first_free_from(70), None);
        b.take(69);
        assert_eq!(b.first_free_from(64), Some(64));
        assert!(!b.is_free(69));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The bitmap agrees with a model of taken entries for every query. Ranges are
        /// clustered in the first 16384 entries so that leaf and summary words fill up.
        #[test]
        fn agrees_with_model(
            ops in proptest::collection::vec((any::<bool>(), 0usize..16384, 0usize..5000), 1..40),
            queries in proptest::collection::vec(0usize..16500, 1..50),
        ) {
            let mut b = FreeBitmap::all_free(1 << 20);
            let mut taken = vec![false; 1 << 20];
            for (take, start, len) in ops {
                for (i, t) in taken.iter_mut().enumerate().skip(start).take(len) {
                    if take { b.take(i); } else { b.release(i); }
                    *t = take;
                }
            }
            for q in queries {
                let expected = (q..1 << 20).find(|&i| !taken[i]);
                prop_assert_eq!(b.first_free_from(q), expected);
                prop_assert_eq!(b.is_free(q), !taken[q]);
            }
        }
    }
}
