//! The device TLB (PCIe ATS address translation cache).
//!
//! Entries are ATS completions keyed by PASID (or none), privilege mode and page. An entry
//! stays and is used until an invalidate request covering it arrives, even if the IOMMU's
//! tables changed meanwhile: a missing device-TLB invalidation is observable, as on
//! hardware. A small fully associative array with round-robin replacement; lookups do not
//! allocate. A valid bit per slot and each slot's page bounds, kept apart from the entries,
//! let a lookup or an invalidation visit the valid entries only and read the entry of a
//! page that holds the address or meets the range only.
//!
//! A translation completion that was requested before an invalidate request arrived is
//! neither cached nor used (PCIe ATS invalidation: a completion of a translation request that was
//! outstanding when an invalidate request arrived may be stale for its range): every
//! invalidation advances a generation, a fill takes it before its translation request
//! ([`DevTlb::begin_fill`]) and [`DevTlb::insert`] refuses it once it moved. Entries already
//! in use by a request when the invalidate request arrives are drained by the engine
//! (`RequestDrain`) before the invalidation completes.
//!
//! A refused completion is recorded (as the IOMMU's strict mode records an overtaken
//! IOTLB fill): the request's PASID and address, the completion, and the invalidate request
//! that overtook it ([`DevTlb::take_overtaken`]). Refusals are rare, so the device keeps the
//! record always, bounded.

use std::collections::VecDeque;

use vsva_vtd::addr::Pasid;

use super::port::{AtsCompletion, DevTlbInvalidation, DmaAccess, DmaTranslation};

#[derive(Clone, Copy, Debug)]
struct Entry {
    pasid: Option<Pasid>,
    /// First device address of the page.
    start: u64,
    completion: AtsCompletion,
}

impl Entry {
    fn covers(&self, pasid: Option<Pasid>, addr: u64, privileged: bool) -> bool {
        self.pasid == pasid
            && self.completion.perm.privileged == privileged
            && self.completion.page.page_start(addr) == self.start
    }

    /// Whether `inv` drops the entry: its PASID (any PASID for a global request, never
    /// an entry without PASID then) and a page meeting the range.
    fn invalidated_by(&self, inv: &DevTlbInvalidation) -> bool {
        let pasid_match = if inv.global {
            self.pasid.is_some()
        } else {
            self.pasid == inv.pasid
        };
        let last = self.start + (self.completion.page.size() - 1);
        pasid_match && inv.range.overlaps(self.start, last)
    }
}

/// Invalidations remembered to name the one that overtook a completion.
const INVALIDATIONS_KEPT: usize = 16;
/// Refused completions kept until [`DevTlb::take_overtaken`]; later ones are not kept.
const OVERTAKEN_KEPT: usize = 64;

/// What made the device TLB refuse a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OvertakenBy {
    /// An ATS invalidate request.
    Invalidation(DevTlbInvalidation),
    /// ATS was disabled, which empties the device TLB.
    AtsDisabled,
    /// More than 16 invalidations ran meanwhile; the first is no longer remembered.
    Forgotten,
}

/// A translation completion an invalidate request overtook: neither cached nor used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OvertakenCompletion {
    /// The PASID of the translation request, if it had one.
    pub pasid: Option<Pasid>,
    /// The device address it asked for.
    pub addr: u64,
    /// What the IOMMU completed it with.
    pub completion: AtsCompletion,
    /// The first invalidation that arrived between the request and its completion.
    pub by: OvertakenBy,
}

/// Buckets of [`DevTlb`]'s page filter (a power of two).
const FILTER_BUCKETS: usize = 64;

/// The filter bucket of the 4-KiB page holding `addr`: neighbouring pages fall in
/// different buckets.
fn bucket(addr: u64) -> usize {
    (addr >> 12) as usize & (FILTER_BUCKETS - 1)
}

/// Whether `(start, last)` bounds a 4-KiB page.
fn is_small(bounds: (u64, u64)) -> bool {
    bounds.1.wrapping_sub(bounds.0) == 0xfff
}

/// A device TLB of fixed capacity.
///
/// A look-up visits only the slots a page filter names for the address: the slots whose
/// 4-KiB page falls in its bucket, and those of larger pages. A slot's bits are set when a
/// fill writes it and cleared when a later fill reuses it, so they may name a slot that is
/// no longer valid (the valid bits then pass it over), never miss one that is.
#[derive(Debug)]
pub struct DevTlb {
    entries: Box<[Option<Entry>]>,
    /// The valid bits: slot `i` holds an entry when bit `i % 64` of word `i / 64` is set.
    valid: Box<[u64]>,
    /// Each valid slot's page: its first and last device address.
    bounds: Box<[(u64, u64)]>,
    /// For each bucket (see [`bucket`]), the slots of 4-KiB pages in it: word `w` of the
    /// bucket at `bucket * valid.len() + w`.
    small: Box<[u64]>,
    /// The slots of pages larger than 4 KiB.
    large: Box<[u64]>,
    next: usize,
    /// Invalidations so far (see [`DevTlb::begin_fill`]).
    generation: u64,
    /// The generation each recent invalidation advanced from, and what it was.
    recent: VecDeque<(u64, OvertakenBy)>,
    overtaken: Vec<OvertakenCompletion>,
}

impl DevTlb {
    /// A device TLB holding up to `capacity` translations (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let words = capacity.div_ceil(64);
        DevTlb {
            entries: vec![None; capacity].into_boxed_slice(),
            valid: vec![0; words].into_boxed_slice(),
            bounds: vec![(0, 0); capacity].into_boxed_slice(),
            small: vec![0; FILTER_BUCKETS * words].into_boxed_slice(),
            large: vec![0; words].into_boxed_slice(),
            next: 0,
            generation: 0,
            recent: VecDeque::with_capacity(INVALIDATIONS_KEPT),
            overtaken: Vec::new(),
        }
    }

    /// The cached translation of `addr` if one grants `access`.
    pub fn lookup(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Option<DmaTranslation> {
        let slot = self.find(addr, |e| {
            e.completion.grants(access) && e.covers(pasid, addr, access.privileged)
        })?;
        self.entries[slot].map(|e| e.completion.page)
    }

    /// The first valid slot whose page holds `addr` and whose entry `wanted` accepts,
    /// among those the page filter names.
    #[inline]
    fn find(&self, addr: u64, wanted: impl Fn(&Entry) -> bool) -> Option<usize> {
        let words = self.valid.len();
        let small = &self.small[bucket(addr) * words..][..words];
        let words = small.iter().zip(self.large.iter()).zip(self.valid.iter());
        for (w, ((&small, &large), &valid)) in words.enumerate() {
            let mut bits = (small | large) & valid;
            while bits != 0 {
                let slot = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if self.holds(slot, addr) && self.entries[slot].as_ref().is_some_and(&wanted) {
                    return Some(slot);
                }
            }
        }
        None
    }

    /// Writes `bounds` into `slot`, moving its filter bit from its former page's bucket
    /// (or the large pages) to that of the new page.
    fn set_bounds(&mut self, slot: usize, bounds: (u64, u64)) {
        let (w, bit) = (slot / 64, 1u64 << (slot % 64));
        let words = self.valid.len();
        let old = self.bounds[slot];
        if is_small(old) {
            self.small[bucket(old.0) * words + w] &= !bit;
        } else {
            self.large[w] &= !bit;
        }
        if is_small(bounds) {
            self.small[bucket(bounds.0) * words + w] |= bit;
        } else {
            self.large[w] |= bit;
        }
        self.bounds[slot] = bounds;
    }

    /// Whether valid slot `slot`'s page holds device address `addr`.
    fn holds(&self, slot: usize, addr: u64) -> bool {
        let (start, last) = self.bounds[slot];
        (start..=last).contains(&addr)
    }

    /// Starts a fill: take it before sending the translation request whose completion
    /// [`DevTlb::insert`] is given.
    pub fn begin_fill(&self) -> u64 {
        self.generation
    }

    /// Caches a completion for the page containing `addr`, replacing an entry for the same
    /// page (whose rights were not enough) or else the next one in turn, unless an
    /// invalidate request arrived since `fill` (from [`DevTlb::begin_fill`]): then the
    /// completion may predate it, is not cached, and `false` is returned.
    pub fn insert(
        &mut self,
        fill: u64,
        pasid: Option<Pasid>,
        addr: u64,
        completion: AtsCompletion,
    ) -> bool {
        if fill != self.generation {
            let by = self
                .recent
                .iter()
                .find(|&&(from, _)| from == fill)
                .map_or(OvertakenBy::Forgotten, |&(_, by)| by);
            if self.overtaken.len() < OVERTAKEN_KEPT {
                self.overtaken.push(OvertakenCompletion {
                    pasid,
                    addr,
                    completion,
                    by,
                });
            }
            return false;
        }
        let entry = Entry {
            pasid,
            start: completion.page.page_start(addr),
            completion,
        };
        let same = self.find(addr, |e| e.covers(pasid, addr, completion.perm.privileged));
        let slot = same.unwrap_or_else(|| {
            let s = self.next;
            self.next = (self.next + 1) % self.entries.len();
            s
        });
        self.set_bounds(
            slot,
            (entry.start, entry.start + (completion.page.size() - 1)),
        );
        self.entries[slot] = Some(entry);
        self.valid[slot / 64] |= 1 << (slot % 64);
        true
    }

    /// Drops the entries an invalidate request covers; returns how many.
    pub fn invalidate(&mut self, inv: &DevTlbInvalidation) -> usize {
        self.invalidate_each(std::slice::from_ref(inv))
    }

    /// Drops the entries any of `invs` covers, as that many invalidate requests arriving
    /// together would: one pass over the entries, and every completion requested before
    /// them refused (named by the first). Returns how many entries went.
    pub fn invalidate_each(&mut self, invs: &[DevTlbInvalidation]) -> usize {
        let Some(first) = invs.first() else {
            return 0;
        };
        self.advance(OvertakenBy::Invalidation(*first));
        // The smallest range holding every request's: a slot whose page is outside it (most
        // of them, for the page-sized requests of an `mprotect` or `munmap`) is passed over
        // after two comparisons, without reading its entry or visiting the requests.
        let (lo, hi) = invs.iter().fold((u64::MAX, 0), |(lo, hi), inv| {
            (lo.min(inv.range.start), hi.max(inv.range.last))
        });
        let mut dropped = 0;
        let words = self.valid.iter_mut();
        let slots = self.entries.chunks_mut(64).zip(self.bounds.chunks(64));
        for (word, (slots, bounds)) in words.zip(slots) {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                let (start, last) = bounds[bit as usize];
                if start > hi || last < lo {
                    continue;
                }
                let slot = &mut slots[bit as usize];
                if invs
                    .iter()
                    .any(|inv| slot.is_some_and(|e| e.invalidated_by(inv)))
                {
                    *slot = None;
                    *word &= !(1 << bit);
                    dropped += 1;
                }
            }
        }
        dropped
    }

    /// Drops everything (ATS disabled).
    pub fn clear(&mut self) {
        self.advance(OvertakenBy::AtsDisabled);
        self.entries.iter_mut().for_each(|e| *e = None);
        self.valid.iter_mut().for_each(|w| *w = 0);
    }

    /// Refuses every completion requested so far, remembering why.
    fn advance(&mut self, by: OvertakenBy) {
        if self.recent.len() == INVALIDATIONS_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back((self.generation, by));
        self.generation = self.generation.wrapping_add(1);
    }

    /// The completions refused since the last call, oldest first (at most 64); empties
    /// the list.
    pub fn take_overtaken(&mut self) -> Vec<OvertakenCompletion> {
        std::mem::take(&mut self.overtaken)
    }

    /// Number of valid entries.
    pub fn len(&self) -> usize {
        self.entries.iter().flatten().count()
    }

    /// Whether no entry is valid.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsva_vtd::addr::Hpa;

    fn completion(hpa: u64, size: u64, write: bool) -> AtsCompletion {
        AtsCompletion {
            page: DmaTranslation::new(Hpa(hpa), size).unwrap(),
            perm: DmaAccess {
                read: true,
                write,
                ..DmaAccess::default()
            },
        }
    }

    fn pasid(p: u32) -> Option<Pasid> {
        Some(Pasid::new(p).unwrap())
    }

    #[test]
    fn lookup_honours_pasid_mode_and_rights() {
        let mut t = DevTlb::new(4);
        t.insert(
            t.begin_fill(),
            pasid(1),
            0x5123,
            completion(0x9000, 0x1000, false),
        );
        let hit = t.lookup(pasid(1), 0x5fff, DmaAccess::READ).unwrap();
        assert_eq!(hit.hpa_of(0x5fff), Hpa(0x9fff));
        assert!(t.lookup(pasid(2), 0x5000, DmaAccess::READ).is_none());
        assert!(t.lookup(None, 0x5000, DmaAccess::READ).is_none());
        assert!(t.lookup(pasid(1), 0x6000, DmaAccess::READ).is_none());
        assert!(t.lookup(pasid(1), 0x5000, DmaAccess::WRITE).is_none());
        assert!(t
            .lookup(pasid(1), 0x5000, DmaAccess::READ.with_privileged(true))
            .is_none());
        // An upgrade replaces the read-only entry instead of adding one.
        t.insert(
            t.begin_fill(),
            pasid(1),
            0x5000,
            completion(0x9000, 0x1000, true),
        );
        assert_eq!(t.len(), 1);
        assert!(t.lookup(pasid(1), 0x5000, DmaAccess::WRITE).is_some());
    }

    /// Pages in one filter bucket, a page larger than 4 KiB over them, and slots reused by
    /// pages of another bucket or size: each look-up answers what a scan of every entry
    /// would.
    #[test]
    fn the_page_filter_finds_what_a_scan_finds() {
        let mut t = DevTlb::new(70);
        let bucket_stride = (FILTER_BUCKETS as u64) << 12;
        let fill = |t: &mut DevTlb, addr: u64, size: u64| {
            let hpa = 0x1_0000_0000 + (addr & !(size - 1));
            assert!(t.insert(t.begin_fill(), pasid(1), addr, completion(hpa, size, true)));
        };
        for i in 0..4 {
            fill(&mut t, 0x40_0000 + i * bucket_stride, 0x1000);
        }
        fill(&mut t, 0x80_0000, 0x20_0000);
        let hit = |t: &DevTlb, addr: u64| {
            t.lookup(pasid(1), addr, DmaAccess::READ)
                .map(|p| p.hpa_of(addr).0)
        };
        for i in 0..4 {
            let addr = 0x40_0123 + i * bucket_stride;
            assert_eq!(hit(&t, addr), Some(0x1_0000_0000 + addr));
        }
        assert_eq!(hit(&t, 0x40_1000), None, "the next bucket is empty");
        assert_eq!(hit(&t, 0x9f_f008), Some(0x1_009f_f008), "the 2-MiB page");
        // Round robin reuses slots 0..5 for pages elsewhere: the old pages go from the
        // filter with their entries.
        for i in 0..70 {
            fill(&mut t, 0x1_0000_0000 + i * 0x1000, 0x1000);
        }
        assert_eq!(t.len(), 70);
        assert_eq!(hit(&t, 0x40_0000), None);
        assert_eq!(hit(&t, 0x80_0000), None);
        fill(&mut t, 0x80_0000, 0x20_0000);
        assert_eq!(hit(&t, 0x9f_f008), Some(0x1_009f_f008));
        assert_eq!(
            hit(&t, 0x1_0000_0000),
            None,
            "its slot holds the 2-MiB page now"
        );
        assert_eq!(
            hit(&t, 0x1_0003_c008),
            Some(0x2_0003_c008),
            "slot 65, word 1"
        );
    }

    #[test]
    fn replacement_is_round_robin() {
        let mut t = DevTlb::new(2);
        for page in 0..3u64 {
            t.insert(
                t.begin_fill(),
                None,
                page << 12,
                completion(page << 12, 0x1000, true),
            );
        }
        assert_eq!(t.len(), 2);
        assert!(t.lookup(None, 0, DmaAccess::READ).is_none(), "oldest went");
        assert!(t.lookup(None, 0x2000, DmaAccess::READ).is_some());
    }

    #[test]
    fn invalidation_matches_range_and_pasid() {
        let mut t = DevTlb::new(8);
        t.insert(
            t.begin_fill(),
            pasid(1),
            0x20_0000,
            completion(0x40_0000, 0x20_0000, true),
        );
        t.insert(
            t.begin_fill(),
            pasid(1),
            0x50_0000,
            completion(0x1000, 0x1000, true),
        );
        t.insert(
            t.begin_fill(),
            pasid(2),
            0x50_0000,
            completion(0x2000, 0x1000, true),
        );
        t.insert(
            t.begin_fill(),
            None,
            0x50_0000,
            completion(0x3000, 0x1000, true),
        );
        // A 4 KiB invalidation inside the 2 MiB page drops it.
        let inv = DevTlbInvalidation::from_size_bit(pasid(1), false, 0x30_1000, false);
        assert_eq!(t.invalidate(&inv), 1);
        assert!(t.lookup(pasid(1), 0x20_0000, DmaAccess::READ).is_none());
        // Other PASIDs and requests without PASID are untouched by a PASID invalidation.
        let inv = DevTlbInvalidation::from_size_bit(pasid(1), false, 0x50_0000, false);
        assert_eq!(t.invalidate(&inv), 1);
        assert_eq!(t.len(), 2);
        // Global: every PASID, not requests without PASID.
        assert_eq!(
            t.invalidate(&DevTlbInvalidation {
                global: true,
                ..DevTlbInvalidation::all(pasid(9))
            }),
            1
        );
        assert!(t.lookup(None, 0x50_0000, DmaAccess::READ).is_some());
        assert_eq!(t.invalidate(&DevTlbInvalidation::all(None)), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn a_completion_requested_before_an_invalidation_is_not_cached() {
        let mut t = DevTlb::new(4);
        let fill = t.begin_fill();
        // Any invalidate request, even for another PASID or page, may cover it.
        let first = DevTlbInvalidation::from_size_bit(pasid(2), false, 0, false);
        t.invalidate(&first);
        t.invalidate(&DevTlbInvalidation::all(None));
        let c = completion(0x9000, 0x1000, true);
        assert!(!t.insert(fill, pasid(1), 0x5000, c));
        assert!(t.is_empty());
        let fill = t.begin_fill();
        t.clear();
        assert!(!t.insert(fill, pasid(1), 0x6000, c));
        // Each refusal is recorded with the first invalidation after its request.
        let overtaken = |addr, by| OvertakenCompletion {
            pasid: pasid(1),
            addr,
            completion: c,
            by,
        };
        assert_eq!(
            t.take_overtaken(),
            [
                overtaken(0x5000, OvertakenBy::Invalidation(first)),
                overtaken(0x6000, OvertakenBy::AtsDisabled)
            ]
        );
        assert_eq!(t.take_overtaken(), []);
        // One that more invalidations overtook than are remembered.
        let fill = t.begin_fill();
        for _ in 0..=INVALIDATIONS_KEPT {
            t.invalidate(&first);
        }
        assert!(!t.insert(fill, pasid(1), 0x5000, c));
        assert_eq!(
            t.take_overtaken(),
            [overtaken(0x5000, OvertakenBy::Forgotten)]
        );
        assert!(t.insert(
            t.begin_fill(),
            pasid(1),
            0x5000,
            completion(0x9000, 0x1000, true)
        ));
        assert!(t.lookup(pasid(1), 0x5000, DmaAccess::WRITE).is_some());
    }

    proptest::proptest! {
        /// Requests that arrive together drop exactly what they drop one at a time, and
        /// refuse a completion requested before them, named by the first.
        #[test]
        fn a_batch_drops_what_its_requests_drop_in_turn(
            fills in proptest::collection::vec((0u32..3, 0u64..64, proptest::bool::ANY), 0..24),
            invs in proptest::collection::vec(
                (0u32..3, proptest::bool::ANY, 0u64..64, proptest::bool::ANY), 1..6),
        ) {
            let mut one = DevTlb::new(16);
            for &(p, page, huge) in &fills {
                let size = if huge { 0x20_0000 } else { 0x1000 };
                let c = completion(page << 21, size, true);
                one.insert(one.begin_fill(), (p != 0).then(|| pasid(p)).flatten(), page << 12, c);
            }
            let mut batch = DevTlb::new(16);
            batch.entries.clone_from(&one.entries);
            batch.valid.clone_from(&one.valid);
            batch.bounds.clone_from(&one.bounds);
            let invs: Vec<_> = invs
                .iter()
                .map(|&(p, global, page, s)| {
                    DevTlbInvalidation::from_size_bit(
                        (p != 0).then(|| pasid(p)).flatten(),
                        global,
                        page << 12,
                        s,
                    )
                })
                .collect();
            let fill = batch.begin_fill();
            let dropped: usize = invs.iter().map(|inv| one.invalidate(inv)).sum();
            proptest::prop_assert_eq!(batch.invalidate_each(&invs), dropped);
            let left = |t: &DevTlb| t.entries.iter().map(|e| e.map(|e| (e.pasid, e.start))).collect::<Vec<_>>();
            proptest::prop_assert_eq!(left(&batch), left(&one));
            let c = completion(0, 0x1000, true);
            proptest::prop_assert!(!batch.insert(fill, pasid(1), 0, c));
            proptest::prop_assert_eq!(
                batch.take_overtaken()[0].by,
                OvertakenBy::Invalidation(invs[0])
            );
            proptest::prop_assert_eq!(batch.invalidate_each(&[]), 0);
            proptest::prop_assert!(batch.insert(batch.begin_fill(), pasid(1), 0, c));
        }
    }
}
