//! A bitmap of free PASIDs with a 64-ary summary tree, so the first free PASID at or above
//! a bound is found in a constant number of word operations, never by scanning the space.
//!
//! Level 0 holds one bit per PASID (set = free). Bit `i` of level `k + 1` is set when word
//! `i` of level `k` has any bit set. For 2^20 PASIDs the levels have 16384, 256 and 4
//! words.
//!
//! Each level-0 word carries a 32-bit tag for the bitmap's user in the same 16 bytes (the
//! owner table keeps there where the word's owner entries are), so that a look-up of a
//! PASID reads one cache line for both its bit and its tag, not one line of each of two
//! tables.
//!
//! The bitmap also keeps a lower bound below which nothing is free, as Linux keeps
//! `next_fd` for file descriptors: a search for the lowest free entry starts there, so
//! when the low part of the space is full (high occupancy, lowest-free allocation) the
//! answer is in the first word read instead of at the end of a climb and descent of the
//! summary.

/// Bits per word, and the fan-out of the summary tree.
const WORD_BITS: usize = 64;

/// A level-0 word and its tag, four to a cache line.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(16))]
struct Leaf {
    free: u64,
    tag: u32,
}

/// The free-set bitmap.
#[derive(Clone, Debug)]
pub(crate) struct FreeBitmap {
    /// The leaf level, with the tags.
    leaves: Vec<Leaf>,
    /// The summary levels above the leaves, the lowest first; the last has at most 64
    /// words (none when the leaves are at most 64 words).
    summary: Vec<Vec<u64>>,
    bits: usize,
    /// No entry below this one is free.
    low: usize,
}

/// A level of `n` free entries: `n / 64` words rounded up, all bits of the entries set.
fn all_free_level(n: usize) -> Vec<u64> {
    let words = n.div_ceil(WORD_BITS);
    let mut level = vec![u64::MAX; words];
    if n % WORD_BITS != 0 {
        level[words - 1] = (1u64 << (n % WORD_BITS)) - 1;
    }
    level
}

impl FreeBitmap {
    /// A bitmap of `bits` entries, all free, every tag 0.
    pub(crate) fn all_free(bits: usize) -> Self {
        let leaves: Vec<Leaf> = all_free_level(bits)
            .into_iter()
            .map(|free| Leaf { free, tag: 0 })
            .collect();
        let mut summary = Vec::new();
        let mut n = leaves.len();
        while n > WORD_BITS {
            let level = all_free_level(n);
            n = level.len();
            summary.push(level);
        }
        FreeBitmap {
            leaves,
            summary,
            bits,
            low: 0,
        }
    }

    /// Whether entry `i` is free. `i` must be below the bitmap size.
    #[cfg(test)]
    pub(crate) fn is_free(&self, i: usize) -> bool {
        self.leaves[i / WORD_BITS].free & (1 << (i % WORD_BITS)) != 0
    }

    /// Word `w` of the leaf level (bit `i` set when entry `64 w + i` is free) and its tag.
    /// `w` must be below the number of words.
    pub(crate) fn word_and_tag(&self, w: usize) -> (u64, u32) {
        let leaf = self.leaves[w];
        (leaf.free, leaf.tag)
    }

    /// Sets the tag of leaf word `w`. `w` must be below the number of words.
    pub(crate) fn set_tag(&mut self, w: usize, tag: u32) {
        self.leaves[w].tag = tag;
    }

    /// Marks entry `i` taken (moving the lower bound past it if it was there). `i` must be
    /// below the bitmap size.
    pub(crate) fn take(&mut self, i: usize) {
        if i == self.low {
            self.low += 1;
        }
        let mut index = i / WORD_BITS;
        let leaf = &mut self.leaves[index];
        leaf.free &= !(1 << (i % WORD_BITS));
        // Whether the leaf word filled up decides the summary bit's value, not whether
        // the summary word is written: at high occupancy that is a coin toss, which a
        // branch would mispredict half the time. Above, a word that stays non-empty ends
        // the climb (it always does while anything below it is free).
        let mut emptied = leaf.free == 0;
        for level in &mut self.summary {
            let word = &mut level[index / WORD_BITS];
            *word &= !(u64::from(emptied) << (index % WORD_BITS));
            if *word != 0 {
                return;
            }
            emptied = true;
            index /= WORD_BITS;
        }
    }

    /// Marks entry `i` free. `i` must be below the bitmap size.
    pub(crate) fn release(&mut self, i: usize) {
        self.low = self.low.min(i);
        let mut index = i / WORD_BITS;
        self.leaves[index].free |= 1 << (i % WORD_BITS);
        // The summary bit is set whether or not the leaf word was full (a coin toss at
        // high occupancy, which a branch would mispredict half the time); the climb goes
        // on only from a summary word that was empty.
        for level in &mut self.summary {
            let word = &mut level[index / WORD_BITS];
            let was_empty = *word == 0;
            *word |= 1 << (index % WORD_BITS);
            if !was_empty {
                return;
            }
            index /= WORD_BITS;
        }
    }

    /// The first free entry at or above `from`, if any. A search from at or below the lower
    /// bound starts at the bound and moves it up to the answer (everything between is
    /// taken), or to the end when nothing is free; a search from above it leaves it, as
    /// nothing is learnt about the entries in between.
    pub(crate) fn first_free_from(&mut self, from: usize) -> Option<usize> {
        if from > self.low {
            return self.next_free(from);
        }
        let found = self.next_free(self.low);
        self.low = found.unwrap_or(self.bits);
        found
    }

    /// Word `w` of level `level` (0 the leaves), if the level has one.
    fn level_word(&self, level: usize, w: usize) -> Option<u64> {
        match level {
            0 => self.leaves.get(w).map(|leaf| leaf.free),
            _ => self.summary[level - 1].get(w).copied(),
        }
    }

    /// The first free entry at or above `from`: climbs the summary from `from`'s leaf word
    /// until a word has a set bit at or after the position searched from (scanning the
    /// few top-level words), then descends through the lowest set bits to a leaf.
    fn next_free(&self, from: usize) -> Option<usize> {
        if from >= self.bits {
            return None;
        }
        let top = self.summary.len();
        let mut level = 0;
        let mut from = from;
        let mut found = loop {
            let mut w = from / WORD_BITS;
            let mut word = self.level_word(level, w)? & (u64::MAX << (from % WORD_BITS));
            if level == top {
                while word == 0 {
                    w += 1;
                    word = self.level_word(level, w)?;
                }
            }
            if word != 0 {
                break w * WORD_BITS + word.trailing_zeros() as usize;
            }
            level += 1;
            from = w + 1;
        };
        for level in (0..level).rev() {
            let word = self.level_word(level, found)?;
            found = found * WORD_BITS + word.trailing_zeros() as usize;
        }
        Some(found)
    }

    /// Heap bytes the bitmap occupies: a fixed cost, independent of how many are taken.
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.leaves)
            + self.summary.iter().map(|l| l.len() * 8).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shape_for_twenty_bits() {
        let b = FreeBitmap::all_free(1 << 20);
        let sizes: Vec<usize> = b.summary.iter().map(Vec::len).collect();
        assert_eq!((b.leaves.len(), sizes), (16384, vec![256, 4]));
        assert_eq!(b.heap_bytes(), 16384 * 16 + (256 + 4) * 8);
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
    fn tags_stay_with_their_words() {
        let mut b = FreeBitmap::all_free(1 << 20);
        b.set_tag(3, 0xdead_beef);
        b.set_tag(4, 7);
        for i in 3 * 64..4 * 64 {
            b.take(i);
        }
        assert_eq!(b.word_and_tag(3), (0, 0xdead_beef));
        b.release(3 * 64 + 5);
        assert_eq!(b.word_and_tag(3), (1 << 5, 0xdead_beef));
        assert_eq!(b.word_and_tag(4), (u64::MAX, 7));
        assert_eq!(b.word_and_tag(2), (u64::MAX, 0));
        assert_eq!(b.first_free_from(3 * 64), Some(3 * 64 + 5));
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

    #[test]
    fn lower_bound_follows_takes_and_releases() {
        let mut b = FreeBitmap::all_free(1 << 20);
        b.take(0);
        assert_eq!(b.low, 1);
        for i in (2..1000).rev() {
            b.take(i);
        }
        assert_eq!(b.low, 1);
        b.take(1);
        assert_eq!(b.low, 2);
        assert_eq!(b.first_free_from(0), Some(1000));
        assert_eq!(b.low, 1000);
        b.release(10);
        assert_eq!(b.low, 10);
        assert_eq!(b.first_free_from(11), Some(1000));
        assert_eq!(b.low, 10);
        assert_eq!(b.first_free_from(3), Some(10));
        b.take(10);
        assert_eq!(b.first_free_from(5), Some(1000));
        assert_eq!(b.low, 1000);
    }

    /// One step of the property test: take or release a run of entries, or search.
    #[derive(Clone, Debug)]
    enum Op {
        Take(usize, usize),
        Release(usize, usize),
        Search(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (prop_oneof![Just(0usize), 0usize..16384], 0usize..5000)
                .prop_map(|(s, n)| Op::Take(s, n)),
            (0usize..16384, 0usize..5000).prop_map(|(s, n)| Op::Release(s, n)),
            prop_oneof![Just(0usize), 0usize..64, 0usize..16500].prop_map(Op::Search),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The bitmap agrees with a model of taken entries for every search, searches
        /// interleaved with takes and releases (so the lower bound moves both ways), and
        /// nothing below the lower bound is ever free. Runs are clustered in the first
        /// 16384 entries so that leaf and summary words fill up.
        #[test]
        fn agrees_with_model(ops in proptest::collection::vec(op(), 1..80)) {
            let mut b = FreeBitmap::all_free(1 << 20);
            let mut taken = vec![false; 1 << 20];
            for op in ops {
                match op {
                    Op::Take(start, len) | Op::Release(start, len) => {
                        let take = matches!(op, Op::Take(..));
                        for (i, t) in taken.iter_mut().enumerate().skip(start).take(len) {
                            if take { b.take(i); } else { b.release(i); }
                            *t = take;
                        }
                    }
                    Op::Search(from) => {
                        let expected = (from..1 << 20).find(|&i| !taken[i]);
                        prop_assert_eq!(b.first_free_from(from), expected);
                        prop_assert_eq!(b.is_free(from), !taken[from]);
                    }
                }
                prop_assert!(taken[..b.low].iter().all(|&t| t));
            }
        }
    }
}
