//! The context cache and the PASID cache (VT-d §6.2.1, §6.2.3): fixed-size set-associative
//! tables of entries kept by value, looked up and filled without a lock.
//!
//! A cached entry is a tag word (valid, the key, and the bits invalidations select by, such
//! as a PASID entry's domain id) and the validated entry by value in qwords ([`CachedEntry`]),
//! which a hit copies out again: a context entry's decoded fields, a PASID entry's checked
//! words (`ValidPasidEntry`, three qwords). A key lives in one of the [`WAYS`] ways of the
//! set it hashes to; a fill into a full set replaces one. A cache may hold any subset of
//! what was read (§6.2), so an evicted entry is read from the tables again.
//!
//! Each way has a sequence word, odd while a writer is inside. A lookup compares the tags,
//! then reads the matching way's sequence word, tag and qwords and the sequence word again;
//! a way written meanwhile is a miss. A writer (a fill, or an invalidation clearing the
//! way) takes the way by a compare-and-swap of its sequence word from even to odd: a fill
//! that finds it taken drops its entry; an invalidation waits for the fill to leave.
//!
//! Fills and invalidations meet on the fill generation (`Iommu::entry_generation`), which
//! every invalidation raises before it sweeps. A fill carries the generation it read before
//! reading its entry from the tables, and must leave nothing behind if an invalidation
//! began since. With no lock between them, the fill checks after publishing:
//!
//! 1. a fill takes its way, writes the tag and the entry, sets the way's bit in `occupied`
//!    (a read-modify-write), then loads the generation and, if it changed, clears the tag
//!    (and the bit) again; then it releases the way;
//! 2. an invalidation raises the generation (a read-modify-write), then reads each word of
//!    `occupied` by a read-modify-write (`fetch_or(0)`), and looks at the ways whose bit is
//!    set.
//!
//! The two read-modify-writes of an `occupied` word are ordered, and each reads the other's
//! value if it comes second. If the invalidation's comes first, the fill's acquires it, so
//! the raise happens before the fill's load of the generation: the fill sees it and
//! retracts its entry before releasing the way. If the fill's comes first, the
//! invalidation's acquires it and sees the bit, and the fill's taking of the way happens
//! before the invalidation reads the way's sequence word: the invalidation finds the way
//! taken and waits for its release, or reads the fill's tag, and clears the entry if it
//! selects it. Either way no entry read before an invalidation outlives it. Only
//! acquire/release orderings are needed (so loom, which models no more, checks it: the
//! model at the end of this file fails when the fill does not check the generation after
//! publishing). The invalidation's read-modify-writes, one per 64 ways, are what makes the
//! argument hold without sequential consistency; the fill pays none beyond setting its bit.

use std::marker::PhantomData;

use crate::sync::{fence, spin_loop, AtomicU32, AtomicU64, Ordering};
use vsva_vtd::{
    addr::DomainId, addr::Pasid, addr::SourceId, context::ScalableContextEntry,
    pasid::ValidPasidEntry,
};

/// Ways per set.
pub(crate) const WAYS: usize = 4;

/// The tag bit of a cached entry; a tag without it is an empty way.
pub(crate) const VALID: u64 = 1 << 63;

/// The tag bits a context-cache lookup compares: valid and the requester id.
pub(crate) const CONTEXT_KEY: u64 = VALID | 0xffff;

/// The tag bits a PASID-cache lookup compares: valid, the requester id (15:0) and the
/// PASID (35:16); the domain id (51:36) is the tag's too, for invalidations.
pub(crate) const PASID_KEY: u64 = VALID | ((1 << DID_SHIFT) - 1);
const PASID_SHIFT: u32 = 16;
const DID_SHIFT: u32 = 36;

/// The context-cache tag of `sid`'s entry (and its key).
pub(crate) fn context_tag(sid: SourceId) -> u64 {
    VALID | sid.rid() as u64
}

/// The requester id a context-cache tag names.
pub(crate) fn context_rid(tag: u64) -> SourceId {
    SourceId::from_rid(tag as u16)
}

/// The PASID-cache key of `sid`'s entry for `pasid`.
pub(crate) fn pasid_key(sid: SourceId, pasid: Pasid) -> u64 {
    VALID | sid.rid() as u64 | (pasid.raw() as u64) << PASID_SHIFT
}

/// The PASID-cache tag of `sid`'s entry `pe` for `pasid`.
pub(crate) fn pasid_tag(sid: SourceId, pasid: Pasid, pe: &ValidPasidEntry) -> u64 {
    pasid_key(sid, pasid) | (pe.did().0 as u64) << DID_SHIFT
}

/// The domain id and PASID a PASID-cache tag names.
pub(crate) fn pasid_owner(tag: u64) -> (DomainId, u32) {
    (
        DomainId((tag >> DID_SHIFT) as u16),
        (tag >> PASID_SHIFT) as u32 & 0xf_ffff,
    )
}

/// An entry a cache keeps by value, as the bytes of its fields copied into `N` qwords, so
/// that a hit copies it out again instead of decoding a table format.
///
/// # Safety
///
/// `write_fields` writes every field of `self` to the same field of `*dst`, and nothing
/// else (the padding bytes of `*dst` keep what they held).
pub(crate) unsafe trait CachedEntry<const N: usize>: Copy {
    /// Writes each field of `self` to the same field of `*dst`.
    ///
    /// # Safety
    ///
    /// `dst` is valid for writes of `Self` and aligned for it.
    unsafe fn write_fields(&self, dst: *mut Self);
}

/// Implements [`CachedEntry`] for a struct by naming all its fields: the destructuring
/// does not compile if a field is missing, so every field is written.
macro_rules! cached_entry {
    ($ty:ident, $n:literal, { $($field:ident),* $(,)? }) => {
        // SAFETY: `write_fields` writes each field (the destructuring names them all), and
        // nothing else.
        unsafe impl CachedEntry<$n> for $ty {
            unsafe fn write_fields(&self, dst: *mut Self) {
                let $ty { $($field),* } = *self;
                // SAFETY: the caller gives a `dst` valid for writes of `Self`, aligned.
                unsafe {
                    $(std::ptr::addr_of_mut!((*dst).$field).write($field);)*
                }
            }
        }
    };
}

cached_entry!(ScalableContextEntry, 3, {
    fpd, dte, paside, pre, pdts, pasiddirptr, rid_pasid, rid_priv,
});

// SAFETY: a `ValidPasidEntry` is three qwords (`repr(transparent)` over `[u64; 3]`), with
// no padding: writing it whole writes its one field and nothing else.
unsafe impl CachedEntry<3> for ValidPasidEntry {
    unsafe fn write_fields(&self, dst: *mut Self) {
        const { assert!(size_of::<ValidPasidEntry>() == 24) };
        // SAFETY: the caller gives a `dst` valid for writes of `Self`, aligned.
        unsafe { dst.write(*self) }
    }
}

/// The qwords that keep `entry`: its fields' bytes where `V` has them, zeros in its padding
/// (so that every byte is initialised).
#[inline(always)]
fn to_words<V: CachedEntry<N>, const N: usize>(entry: &V) -> [u64; N] {
    const { assert!(size_of::<V>() <= 8 * N && align_of::<V>() <= 8) };
    let mut words = [0u64; N];
    // SAFETY: `words` is `8 * N` bytes aligned to 8, enough for a `V` (checked above).
    unsafe { entry.write_fields(words.as_mut_ptr().cast::<V>()) };
    words
}

/// The entry `to_words` kept in `words`.
///
/// # Safety
///
/// `words` is what [`to_words`] returned for some entry.
#[inline(always)]
unsafe fn from_words<V: CachedEntry<N>, const N: usize>(words: [u64; N]) -> V {
    // SAFETY: the bytes of each field of `V` in `words` are those of a valid `V`'s field
    // (the caller's contract), its padding bytes are initialised, and the qwords are
    // aligned for `V` (checked in `to_words`).
    unsafe { words.as_ptr().cast::<V>().read() }
}

/// One set: the tags first, so that a lookup compares them in one cache line, then each
/// way's sequence word and qwords.
#[repr(C, align(64))]
struct Set<const N: usize> {
    tags: [AtomicU64; WAYS],
    seqs: [AtomicU64; WAYS],
    words: [[AtomicU64; N]; WAYS],
}

impl<const N: usize> Set<N> {
    fn new() -> Self {
        Set {
            tags: std::array::from_fn(|_| AtomicU64::new(0)),
            seqs: std::array::from_fn(|_| AtomicU64::new(0)),
            words: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    /// Takes way `way` for writing if no writer is inside: the sequence word it found.
    fn try_take(&self, way: usize) -> Option<u64> {
        let seq = self.seqs[way].load(Ordering::Relaxed);
        if seq & 1 != 0 {
            return None;
        }
        self.seqs[way]
            .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // Orders the taking before the writes that follow, for a lookup that reads one of
        // them (it reads the sequence word again after an acquire fence).
        fence(Ordering::Release);
        Some(seq)
    }

    /// Takes way `way` for writing, waiting for a writer inside to leave.
    fn take(&self, way: usize) -> u64 {
        loop {
            if let Some(seq) = self.try_take(way) {
                return seq;
            }
            spin_loop();
        }
    }

    /// Releases way `way`, taken at `seq`.
    fn release(&self, way: usize, seq: u64) {
        self.seqs[way].store(seq + 2, Ordering::Release);
    }
}

/// A context or PASID cache: `sets` sets of [`WAYS`] ways, entries of `N` qwords of type `V`.
pub(crate) struct EntryCache<V, const N: usize> {
    sets: Box<[Set<N>]>,
    /// A bit per way (set × [`WAYS`] + way), set while the way holds an entry: what an
    /// invalidation visits. Written only by read-modify-writes, by the writer inside the way.
    occupied: Box<[AtomicU64]>,
    /// The tag bits a lookup compares (valid and the key).
    key_mask: u64,
    /// The way a fill into a full set replaces next (a hint, not kept exactly).
    victim: AtomicU32,
    /// 0 once an invalidation left no way occupied, 1 after a fill: a lookup of an empty
    /// cache (the fully cold miss after a global invalidation) loads this word alone. A fill
    /// racing with the invalidation that clears it may be left unseen until the next fill
    /// sets it: a cache may miss any entry (§6.2); a thread sees its own fills.
    live: AtomicU32,
    entries: PhantomData<V>,
}

impl<V: CachedEntry<N>, const N: usize> EntryCache<V, N> {
    /// A cache of `sets` sets (a power of two); a lookup compares the tag bits of
    /// `key_mask` (which has [`VALID`]).
    pub(crate) fn new(sets: usize, key_mask: u64) -> Self {
        debug_assert!(sets.is_power_of_two() && key_mask & VALID != 0);
        EntryCache {
            sets: (0..sets).map(|_| Set::new()).collect(),
            occupied: (0..(sets * WAYS).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            key_mask,
            victim: AtomicU32::new(0),
            live: AtomicU32::new(0),
            entries: PhantomData,
        }
    }

    /// The set of `key` (a tag's key bits): a multiplicative hash, so that the requester
    /// ids and PASIDs of a working set spread over the sets.
    fn set_of(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & (self.sets.len() - 1)
    }

    /// The cached entry of `key` (the key bits of a tag, with [`VALID`]); a miss if a
    /// writer is in its way.
    pub(crate) fn get(&self, key: u64) -> Option<V> {
        if self.live.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let set = &self.sets[self.set_of(key)];
        let way =
            (0..WAYS).find(|&w| set.tags[w].load(Ordering::Relaxed) & self.key_mask == key)?;
        let seq = set.seqs[way].load(Ordering::Acquire);
        let tag = set.tags[way].load(Ordering::Relaxed);
        let words = std::array::from_fn(|i| set.words[way][i].load(Ordering::Relaxed));
        fence(Ordering::Acquire);
        let unchanged = seq & 1 == 0 && set.seqs[way].load(Ordering::Relaxed) == seq;
        // SAFETY: the way's qwords were read whole (the sequence word did not change and no
        // writer was inside) and its tag is valid, so a fill wrote them, from `to_words`.
        (unchanged && tag & self.key_mask == key).then(|| unsafe { from_words(words) })
    }

    /// Caches `entry` under `tag` (with [`VALID`]), read from the tables since `fill` (a
    /// value of `generation`). Not cached if an invalidation raised `generation` since,
    /// or if another writer is in the way the fill would take.
    pub(crate) fn fill(&self, generation: &AtomicU64, fill: u64, tag: u64, entry: &V) {
        if generation.load(Ordering::Acquire) != fill {
            return;
        }
        let key = tag & self.key_mask;
        let index = self.set_of(key);
        let set = &self.sets[index];
        let tag_of = |w: usize| set.tags[w].load(Ordering::Relaxed);
        let way = (0..WAYS)
            .find(|&w| tag_of(w) & self.key_mask == key)
            .or_else(|| (0..WAYS).find(|&w| tag_of(w) & VALID == 0))
            .unwrap_or_else(|| {
                let v = self.victim.load(Ordering::Relaxed);
                self.victim.store(v.wrapping_add(1), Ordering::Relaxed);
                v as usize % WAYS
            });
        let Some(seq) = set.try_take(way) else {
            return;
        };
        set.tags[way].store(tag, Ordering::Relaxed);
        for (w, q) in set.words[way].iter().zip(to_words(entry)) {
            w.store(q, Ordering::Relaxed);
        }
        let slot = index * WAYS + way;
        let (word, bit) = (&self.occupied[slot / 64], 1u64 << (slot % 64));
        word.fetch_or(bit, Ordering::AcqRel);
        // After publishing: see the module doc.
        if generation.load(Ordering::Acquire) != fill {
            set.tags[way].store(0, Ordering::Relaxed);
            word.fetch_and(!bit, Ordering::AcqRel);
        } else if self.live.load(Ordering::Relaxed) == 0 {
            self.live.store(1, Ordering::Relaxed);
        }
        set.release(way, seq);
    }

    /// Raises `generation` (so that no fill that read its entry before leaves it behind)
    /// and removes the entries whose tag `selects`.
    pub(crate) fn invalidate(&self, generation: &AtomicU64, selects: impl Fn(u64) -> bool) {
        generation.fetch_add(1, Ordering::AcqRel);
        let mut left = 0;
        for (i, word) in self.occupied.iter().enumerate() {
            // A read-modify-write, so that it is ordered with the fills' (module doc).
            let mut bits = word.fetch_or(0, Ordering::AcqRel);
            while bits != 0 {
                let slot = i * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let (set, way) = (&self.sets[slot / WAYS], slot % WAYS);
                // A way that held an unselected entry, read whole, is left without taking it.
                let seq = set.seqs[way].load(Ordering::Acquire);
                let tag = set.tags[way].load(Ordering::Relaxed);
                fence(Ordering::Acquire);
                if seq & 1 == 0
                    && set.seqs[way].load(Ordering::Relaxed) == seq
                    && (tag & VALID == 0 || !selects(tag))
                {
                    continue;
                }
                let seq = set.take(way);
                let tag = set.tags[way].load(Ordering::Relaxed);
                if tag & VALID == 0 || selects(tag) {
                    set.tags[way].store(0, Ordering::Relaxed);
                    word.fetch_and(!(1u64 << (slot % 64)), Ordering::AcqRel);
                }
                set.release(way, seq);
            }
            left |= word.load(Ordering::Relaxed);
        }
        if left == 0 {
            self.live.store(0, Ordering::Relaxed);
        }
    }
}

/// What the IOTLB holds by requester id and PASID, as far as a fresh PASID entry read needs
/// to know: whether every IOTLB entry filled for the key since its last retag has the
/// domain id the entry now has, so that [`Iotlb::retag`](super::iotlb::Iotlb::retag), which
/// takes the IOTLB's index lock whenever the IOTLB holds anything, is skipped then.
///
/// A slot per hash of the key holds the PASID-cache tag (key and domain id) of the last
/// fresh read that retagged, or [`RetagFilter::MIXED`] once a fill of another key or domain
/// id is recorded. A read whose tag is in its slot skips the retag: the retag it recorded
/// removed every entry of other domain ids filled before it, and a fill after it with
/// another domain id (or of another key) would have replaced the tag. A read that finds
/// another value records its tag first, then retags; a fill records itself after its IOTLB
/// insert, so that a fill the retag missed is recorded after the read's tag. (A fill racing
/// with the re-read may list itself after the retag all the same, as `Iotlb::retag` says.)
pub(crate) struct RetagFilter {
    slots: Box<[AtomicU64]>,
}

impl RetagFilter {
    /// Not a PASID-cache tag (their bits 62:52 are clear): fills of several keys or domain
    /// ids, or none recorded yet by a read.
    const MIXED: u64 = u64::MAX;

    /// A filter of `slots` slots (a power of two).
    pub(crate) fn new(slots: usize) -> Self {
        debug_assert!(slots.is_power_of_two());
        RetagFilter {
            slots: (0..slots).map(|_| AtomicU64::new(Self::MIXED)).collect(),
        }
    }

    fn slot(&self, tag: u64) -> &AtomicU64 {
        let key = tag & PASID_KEY;
        let at = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & (self.slots.len() - 1);
        &self.slots[at]
    }

    /// A PASID entry of PASID-cache tag `tag` was read from the tables: whether the IOTLB
    /// must be retagged for it (recorded as done if so).
    pub(crate) fn read_needs_retag(&self, tag: u64) -> bool {
        let slot = self.slot(tag);
        if slot.load(Ordering::Acquire) == tag {
            return false;
        }
        slot.store(tag, Ordering::Release);
        true
    }

    /// An IOTLB entry was filled from a PASID entry of PASID-cache tag `tag`.
    pub(crate) fn filled(&self, tag: u64) {
        let slot = self.slot(tag);
        if slot.load(Ordering::Acquire) != tag {
            slot.store(Self::MIXED, Ordering::Release);
        }
    }
}

impl<V, const N: usize> EntryCache<V, N> {
    /// Number of cached entries.
    pub(crate) fn len(&self) -> usize {
        self.sets
            .iter()
            .flat_map(|s| &s.tags)
            .filter(|t| t.load(Ordering::Relaxed) & VALID != 0)
            .count()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use vsva_vtd::addr::{DomainId, Pasid};
    use vsva_vtd::pasid::{PasidEntry, Pgtt};
    use vsva_vtd::root::{Capabilities, EntryChecks};

    /// A test entry of one qword.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct E {
        v: u64,
    }

    cached_entry!(E, 1, { v });

    type Cache = EntryCache<E, 1>;

    fn get(c: &Cache, tag: u64) -> Option<u64> {
        c.get(tag).map(|e| e.v)
    }

    const KEY: u64 = VALID | 0xffff;

    fn tag(key: u64) -> u64 {
        VALID | key
    }

    #[test]
    fn a_lookup_sees_what_was_cached_until_it_is_removed() {
        let g = AtomicU64::new(0);
        let c: Cache = EntryCache::new(4, KEY);
        assert_eq!(get(&c, tag(1)), None);
        c.fill(&g, 0, tag(1), &E { v: 10 });
        c.fill(&g, 0, tag(2), &E { v: 20 });
        assert_eq!(
            (get(&c, tag(1)), get(&c, tag(2)), get(&c, tag(3))),
            (Some(10), Some(20), None)
        );
        assert_eq!(c.len(), 2);
        c.invalidate(&g, |t| t == tag(1));
        assert_eq!((get(&c, tag(1)), get(&c, tag(2))), (None, Some(20)));
        c.invalidate(&g, |_| true);
        assert_eq!((get(&c, tag(2)), c.len()), (None, 0));
        c.fill(&g, 2, tag(2), &E { v: 21 });
        assert_eq!(get(&c, tag(2)), Some(21));
    }

    #[test]
    fn a_refill_replaces_the_entry_of_its_key() {
        let g = AtomicU64::new(0);
        let c: Cache = EntryCache::new(1, KEY);
        c.fill(&g, 0, tag(7), &E { v: 1 });
        c.fill(&g, 0, tag(7), &E { v: 2 });
        assert_eq!((get(&c, tag(7)), c.len()), (Some(2), 1));
    }

    #[test]
    fn a_fill_after_an_invalidation_began_is_not_cached() {
        let g = AtomicU64::new(0);
        let c: Cache = EntryCache::new(4, KEY);
        let fill = g.load(Ordering::Relaxed);
        c.invalidate(&g, |_| true);
        c.fill(&g, fill, tag(1), &E { v: 10 });
        assert_eq!((get(&c, tag(1)), c.len()), (None, 0));
    }

    #[test]
    fn a_full_set_replaces_a_way_and_keeps_the_others() {
        let g = AtomicU64::new(0);
        let c: Cache = EntryCache::new(1, KEY);
        for k in 1..=WAYS as u64 + 1 {
            c.fill(&g, 0, tag(k), &E { v: k });
        }
        let hits = (1..=WAYS as u64 + 1)
            .filter(|&k| get(&c, tag(k)) == Some(k))
            .count();
        assert_eq!((hits, c.len()), (WAYS, WAYS));
        assert_eq!(get(&c, tag(WAYS as u64 + 1)), Some(WAYS as u64 + 1));
    }

    #[test]
    fn an_invalidation_selects_by_the_tag_bits_beyond_the_key() {
        // The key is the low 16 bits; bits 16-31 stand for a domain id.
        let g = AtomicU64::new(0);
        let c: Cache = EntryCache::new(64, KEY);
        for k in 0..16u64 {
            c.fill(&g, 0, tag(k | (k % 2) << 16), &E { v: k + 1 });
        }
        assert!(
            (0..16u64).all(|k| get(&c, tag(k)) == Some(k + 1)),
            "a lookup compares the key bits only"
        );
        c.invalidate(&g, |t| t >> 16 & 1 == 1);
        assert!((0..16u64).all(|k| get(&c, tag(k)) == (k % 2 == 0).then_some(k + 1)));
    }

    #[test]
    fn a_read_skips_the_retag_only_after_fills_of_its_own_key_and_domain() {
        // One slot, so that every key shares it.
        let f = RetagFilter::new(1);
        let (k1d1, k1d2, k2d1) = (
            VALID | 1 | 1 << 36,
            VALID | 1 | 2 << 36,
            VALID | 2 | 1 << 36,
        );
        assert!(f.read_needs_retag(k1d1), "nothing recorded yet");
        f.filled(k1d1);
        assert!(!f.read_needs_retag(k1d1), "only its own fills since");
        assert!(f.read_needs_retag(k1d2), "another domain id");
        f.filled(k1d1);
        assert!(
            f.read_needs_retag(k1d2),
            "a fill of the old domain id after the retag"
        );
        assert!(!f.read_needs_retag(k1d2));
        f.filled(k2d1);
        assert!(f.read_needs_retag(k1d2), "another key's fill in the slot");
        assert!(f.read_needs_retag(k2d1), "another key's read");
    }

    #[test]
    fn entries_come_back_whole_from_their_qwords() {
        let pe = PasidEntry {
            slptptr: 0x1234_5000,
            flptptr: 0xabc_d000,
            sre: true,
            pat: 0x0607_0406,
            ..PasidEntry::new(Pgtt::Nested, DomainId(9))
        };
        let checks = EntryChecks::new(&Capabilities::full(48, 0b0110));
        let pe = ValidPasidEntry::from_raw_checked(pe.to_raw(), &checks).unwrap();
        // SAFETY: the qwords are `to_words`'.
        let back = unsafe { from_words::<ValidPasidEntry, 3>(to_words(&pe)) };
        assert_eq!(back, pe);
        let ctx = ScalableContextEntry {
            paside: true,
            pdts: 3,
            pasiddirptr: 0x7000,
            rid_pasid: Pasid::new(0x321).unwrap(),
            rid_priv: true,
            ..ScalableContextEntry::default()
        };
        // SAFETY: the qwords are `to_words`'.
        let back = unsafe { from_words::<ScalableContextEntry, 3>(to_words(&ctx)) };
        assert_eq!(back, ctx);
    }
}

/// The fill/invalidate protocol under loom (`RUSTFLAGS="--cfg loom" cargo test -p vsva-hw
/// --lib loom`): a fill that read a table entry before a driver changed it and
/// invalidated races the invalidation; once the invalidation has returned, no lookup finds
/// the old entry, then or after the fill ends (§6.5.2.1: a completed invalidation covers the
/// reads in flight when it began).
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;

    /// The entry before the driver's change, and after it.
    const OLD: u64 = 0xa;
    const NEW: u64 = 0xb;
    const KEY: u64 = VALID | 0xffff;
    const TAG: u64 = VALID | 3;

    #[derive(Clone, Copy)]
    struct E {
        v: u64,
    }

    cached_entry!(E, 1, { v });

    fn check(c: &EntryCache<E, 1>, when: &str) {
        if let Some(E { v: e }) = c.get(TAG) {
            assert_eq!(e, NEW, "{when}: the cache gave the old entry");
        }
    }

    /// The race, with `others` cached before it in the same set.
    fn race(others: &'static [u64]) {
        let mut model = loom::model::Builder::new();
        model.preemption_bound.get_or_insert(3);
        model.check(move || {
            let generation = Arc::new(AtomicU64::new(0));
            // One set, so that the fill and the sweep meet in it.
            let cache = Arc::new(EntryCache::<E, 1>::new(1, KEY));
            for &k in others {
                cache.fill(&generation, 0, VALID | k, &E { v: OLD });
            }
            // The table entry the fill reads.
            let table = Arc::new(AtomicU64::new(OLD));
            let filler = {
                let (g, c, t) = (generation.clone(), cache.clone(), table.clone());
                loom::thread::spawn(move || {
                    let fill = g.load(Ordering::Acquire);
                    let v = t.load(Ordering::SeqCst);
                    c.fill(&g, fill, TAG, &E { v });
                })
            };
            table.store(NEW, Ordering::SeqCst);
            cache.invalidate(&generation, |t| t == TAG);
            check(&cache, "after the invalidation");
            filler.join().unwrap();
            check(&cache, "after the fill ended");
        });
    }

    #[test]
    fn loom_no_entry_fill_outlives_the_invalidation_that_overtook_it() {
        race(&[]);
    }

    /// An unselected entry in the set: the sweep leaves its way without taking it.
    #[test]
    fn loom_no_entry_fill_outlives_an_invalidation_that_skips_other_ways() {
        race(&[5]);
    }
}
