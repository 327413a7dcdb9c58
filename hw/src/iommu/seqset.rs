//! The set of a set-associative cache that the IOTLB and the paging-structure caches share:
//! four ways of three words, read without a lock under a sequence word (odd while a writer
//! is inside), and the way a fill into a full set replaces next. Each cache says what the
//! words hold and which lock keeps its writers apart.

use crate::sync::{fence, AtomicU32, AtomicU64, Ordering};

/// Ways per set.
pub(super) const WAYS: usize = 4;

/// One way; a `tag` of 0 is an empty way.
#[derive(Debug, Default)]
pub(super) struct Way {
    pub(super) tag: AtomicU64,
    pub(super) key: AtomicU64,
    pub(super) value: AtomicU64,
}

/// One set: its sequence word, the next victim, the ways; in this order, so that a read of
/// the first two ways meets one cache line.
#[derive(Debug, Default)]
#[repr(C, align(128))]
pub(super) struct SeqSet {
    seq: AtomicU64,
    victim: AtomicU32,
    pub(super) ways: [Way; WAYS],
}

impl SeqSet {
    /// What `read` makes of the ways, and whether no writer was inside meanwhile (only
    /// then is it a consistent copy): the sequence word, `read`, the sequence word again.
    #[inline(always)]
    pub(super) fn read<R>(&self, read: impl FnOnce(&[Way; WAYS]) -> R) -> (R, bool) {
        let seq = self.seq.load(Ordering::Acquire);
        let r = read(&self.ways);
        fence(Ordering::Acquire);
        (r, seq & 1 == 0 && self.seq.load(Ordering::Relaxed) == seq)
    }

    /// Runs `write` with the set marked as being written. The caller holds its cache's
    /// writer lock.
    pub(super) fn write<R>(&self, write: impl FnOnce(&[Way; WAYS]) -> R) -> R {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let r = write(&self.ways);
        self.seq.store(seq + 2, Ordering::Release);
        r
    }

    /// The way a fill into the full set replaces, round robin. The caller holds its
    /// cache's writer lock.
    pub(super) fn next_victim(&self) -> usize {
        let v = self.victim.load(Ordering::Relaxed);
        self.victim.store(v.wrapping_add(1), Ordering::Relaxed);
        v as usize % WAYS
    }
}
