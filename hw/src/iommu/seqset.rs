//! Sequence-locked set-associative tables: the storage of the model's caches (IOTLB,
//! context and PASID caches, paging-structure caches).
//!
//! A table is a fixed number of sets of `W` ways; a way is `N` words, word 0 its tag (0 for
//! an empty way). Like a hardware cache, an entry lives only in the set its key selects, and
//! a fill into a full set replaces a way of it (hardware may drop any cached entry at any
//! time, VT-d §6.5.1). Each set has a sequence word, odd while a writer is inside: a lookup
//! loads the word, scans the ways and checks the word again, so it writes no shared cache
//! line and takes no lock; a writer makes the word odd (the word is also the writers'
//! lock), so a lookup never sees a torn way. A bitmap of the sets that may hold entries lets
//! an invalidation visit only those.

use crate::sync::{fence, spin_loop, AtomicU32, AtomicU64, Ordering};

/// One way: word 0 is the tag (0: empty), the others what the table stores.
pub(crate) type Way<const N: usize> = [AtomicU64; N];

/// One set: its sequence word, the way a fill into the full set replaces next, the ways;
/// in this order, so that a hit in the first ways reads one cache line.
#[derive(Debug)]
#[repr(C, align(128))]
struct Set<const N: usize, const W: usize> {
    seq: AtomicU64,
    victim: AtomicU32,
    ways: [Way<N>; W],
}

impl<const N: usize, const W: usize> Default for Set<N, W> {
    fn default() -> Self {
        Set {
            seq: AtomicU64::new(0),
            victim: AtomicU32::new(0),
            ways: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

/// A sequence-locked set-associative table of `W` ways of `N` words per set.
#[derive(Debug)]
pub(crate) struct SeqSets<const N: usize, const W: usize> {
    sets: Box<[Set<N, W>]>,
    /// One bit per set that may hold an entry: set by a writer that fills a way, cleared by
    /// one that leaves the set empty.
    occupied: Box<[AtomicU64]>,
}

impl<const N: usize, const W: usize> SeqSets<N, W> {
    /// A table of `sets` sets (a power of two).
    pub(crate) fn new(sets: usize) -> Self {
        assert!(sets.is_power_of_two(), "{sets} sets");
        SeqSets {
            sets: (0..sets).map(|_| Set::default()).collect(),
            occupied: (0..sets.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The mask that selects a set from a hash.
    #[inline(always)]
    pub(crate) fn mask(&self) -> usize {
        self.sets.len() - 1
    }

    /// What `probe` finds in set `set`, read consistently: retried while a writer is inside.
    /// Way `first` is probed first, then the others in turn, so that a key that has a
    /// preferred way is found with one compare and a branch the CPU predicts.
    #[inline(always)]
    pub(crate) fn find<R>(
        &self,
        set: usize,
        first: usize,
        probe: impl Fn(&Way<N>) -> Option<R>,
    ) -> Option<R> {
        let set = &self.sets[set];
        loop {
            let seq = set.seq.load(Ordering::Acquire);
            if seq & 1 == 0 {
                let found = probe(&set.ways[first % W])
                    .or_else(|| (1..W).find_map(|i| probe(&set.ways[(first + i) % W])));
                fence(Ordering::Acquire);
                if set.seq.load(Ordering::Relaxed) == seq {
                    return found;
                }
            }
            spin_loop();
        }
    }

    /// Enters set `set` as its writer: waits for another writer to leave it, and marks it
    /// as being written until the returned guard is dropped.
    pub(crate) fn write(&self, set: usize) -> SetWriter<'_, N, W> {
        let s = &self.sets[set];
        let seq = loop {
            let seq = s.seq.load(Ordering::Relaxed);
            if seq & 1 == 0
                && s.seq
                    .compare_exchange_weak(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break seq;
            }
            spin_loop();
        };
        // The odd word is seen before any store to the ways (a lookup's fence pairs with it).
        fence(Ordering::Release);
        SetWriter {
            table: self,
            set,
            seq,
        }
    }

    /// Puts `words` into set `set` (in the way `holds` accepts, else way `first` if empty,
    /// else an empty way, else the next victim) unless an invalidation advanced
    /// `generation` since `fill` (a [`Generation::begin`] value); returns whether the
    /// entry was kept. The check comes after the store and the set's occupied bit, under
    /// the set's write, and both sides' accesses to the bitmap and the generation are
    /// sequentially consistent, so that an invalidation either sees the set occupied and
    /// visits it (waiting for this write to end), or this fill sees the invalidation and
    /// takes its entry out again before any lookup can see it.
    pub(crate) fn fill(
        &self,
        generation: &Generation,
        fill: u64,
        set: usize,
        first: usize,
        holds: impl Fn(&Way<N>) -> bool,
        words: [u64; N],
    ) -> bool {
        if generation.0.load(Ordering::Acquire) != fill {
            return false;
        }
        let w = self.write(set);
        let way = w.slot(first, holds);
        w.put(way, words);
        if generation.0.load(Ordering::SeqCst) != fill {
            w.clear(way);
            return false;
        }
        true
    }

    /// The sets that may hold an entry. An invalidation reads this after
    /// [`Generation::advance`], so that it sees every set a fill it did not refuse put an
    /// entry into.
    pub(crate) fn occupied(&self) -> impl Iterator<Item = usize> + '_ {
        self.occupied.iter().enumerate().flat_map(|(i, word)| {
            let mut bits = word.load(Ordering::SeqCst);
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let bit = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    i * 64 + bit
                })
            })
        })
    }

    /// How many sets may hold an entry.
    pub(crate) fn occupied_sets(&self) -> usize {
        self.occupied
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as usize)
            .sum()
    }

    /// Empties every way: each occupied set is entered as a writer in turn.
    pub(crate) fn clear(&self) -> usize {
        let mut removed = 0;
        for set in self.occupied() {
            let w = self.write(set);
            for way in 0..W {
                if w.tag(way) != 0 {
                    w.clear(way);
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The tags and words of every full way, read without the sets' sequence words: exact
    /// when no writer runs (the caller excludes them), an estimate otherwise.
    pub(crate) fn entries(&self) -> impl Iterator<Item = [u64; N]> + '_ {
        self.occupied().flat_map(move |set| {
            self.sets[set].ways.iter().filter_map(|way| {
                let words: [u64; N] = std::array::from_fn(|i| way[i].load(Ordering::Relaxed));
                (words[0] != 0).then_some(words)
            })
        })
    }

    /// The ways of set `set`, for tests that look at the layout.
    #[cfg(test)]
    pub(crate) fn ways_of(&self, set: usize) -> &[Way<N>; W] {
        &self.sets[set].ways
    }

    /// Number of full ways.
    pub(crate) fn len(&self) -> usize {
        self.entries().count()
    }
}

/// A writer inside one set (see [`SeqSets::write`]); leaving it ends the write.
pub(crate) struct SetWriter<'a, const N: usize, const W: usize> {
    table: &'a SeqSets<N, W>,
    set: usize,
    seq: u64,
}

impl<const N: usize, const W: usize> SetWriter<'_, N, W> {
    fn ways(&self) -> &[Way<N>; W] {
        &self.table.sets[self.set].ways
    }

    /// The tag of way `way`.
    pub(crate) fn tag(&self, way: usize) -> u64 {
        self.ways()[way][0].load(Ordering::Relaxed)
    }

    /// Word `word` of way `way`.
    pub(crate) fn word(&self, way: usize, word: usize) -> u64 {
        self.ways()[way][word].load(Ordering::Relaxed)
    }

    /// The first way `holds` accepts.
    pub(crate) fn position(&self, holds: impl Fn(&Way<N>) -> bool) -> Option<usize> {
        (0..W).find(|&i| holds(&self.ways()[i]))
    }

    /// The way `holds` accepts, else way `first` if empty, else an empty way, else the
    /// next victim.
    pub(crate) fn slot(&self, first: usize, holds: impl Fn(&Way<N>) -> bool) -> usize {
        let first = first % W;
        self.position(holds)
            .or_else(|| (self.tag(first) == 0).then_some(first))
            .or_else(|| (0..W).find(|&i| self.tag(i) == 0))
            .unwrap_or_else(|| {
                let victim = &self.table.sets[self.set].victim;
                let v = victim.load(Ordering::Relaxed);
                victim.store(v.wrapping_add(1), Ordering::Relaxed);
                v as usize % W
            })
    }

    /// Stores `words` (a non-zero tag first) in way `way`, and marks the set occupied.
    /// The bit is read first, and only set when clear: no other writer clears it while
    /// this one is inside the set.
    pub(crate) fn put(&self, way: usize, words: [u64; N]) {
        debug_assert_ne!(words[0], 0, "an empty tag");
        for (word, value) in self.ways()[way].iter().zip(words) {
            word.store(value, Ordering::Relaxed);
        }
        let (bits, bit) = self.occupied_bit();
        if bits.load(Ordering::SeqCst) & bit == 0 {
            bits.fetch_or(bit, Ordering::SeqCst);
        }
    }

    /// The bitmap word and bit of the set.
    fn occupied_bit(&self) -> (&AtomicU64, u64) {
        (&self.table.occupied[self.set / 64], 1 << (self.set % 64))
    }

    /// Empties way `way`.
    pub(crate) fn clear(&self, way: usize) {
        self.ways()[way][0].store(0, Ordering::Relaxed);
    }
}

impl<const N: usize, const W: usize> Drop for SetWriter<'_, N, W> {
    fn drop(&mut self) {
        if (0..W).all(|i| self.tag(i) == 0) {
            let (bits, bit) = self.occupied_bit();
            if bits.load(Ordering::Relaxed) & bit != 0 {
                bits.fetch_and(!bit, Ordering::SeqCst);
            }
        }
        self.table.sets[self.set]
            .seq
            .store(self.seq + 2, Ordering::Release);
    }
}

/// Counts the invalidations of a cache, so that a walk that began before one does not fill
/// the cache after it: an invalidation's completion covers the reads in flight when it
/// began (VT-d §6.5.2).
#[derive(Debug, Default)]
pub(crate) struct Generation(AtomicU64);

impl Generation {
    /// The token of a fill that starts now.
    pub(crate) fn begin(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Starts an invalidation: a fill that began before refuses its entry, or put it in a
    /// set that [`SeqSets::occupied`], read after this, lists (see [`SeqSets::fill`]).
    pub(crate) fn advance(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
