//! Paging-structure caches (VT-d §6.2.5) and the second-level mappings that nested walks
//! use, kept until an invalidation descriptor removes them.
//!
//! - First-level paging-structure caches (PML5E, PML4E, PDPE and PDE caches), tagged with
//!   the domain id and PASID: for the input region one non-leaf entry maps, the table it
//!   points to and the rights of the entries down to it (an [`FlStart`]). In nested
//!   translation the table address is the guest physical address the entry holds; the
//!   second-level mappings below turn it into a host physical one.
//! - Second-level paging-structure caches (SL-PML5E to SL-PDE caches), tagged with the
//!   domain id: the same for second-level tables (an [`SlStart`]).
//! - The second-level mappings a nested walk uses (IOTLB entries caching second-level
//!   mappings, tagged with the domain id): guest physical page to host physical page with
//!   the second level's rights, for first-level table pages and final output pages.
//!
//! Entries carry the spec's tags only, so requesters with the same domain id (and PASID)
//! share them, as on hardware. Each cache is a sequence-locked set-associative table
//! ([`SeqSets`]): a lookup writes nothing and takes no lock, a fill into a full set
//! replaces one of its ways (hardware may drop entries at any time), and an invalidation
//! looks up the keys a range names or scans the sets that hold entries. Lookups, fills and
//! invalidations do not allocate.

use std::ops::RangeInclusive;

use vsva_vtd::{
    addr::DomainId, addr::Pasid, inv_desc::AddrRange, walk::AccessRequest, walk::FlRights,
    walk::FlStart, walk::PageSize, walk::Permissions, walk::SlStart, walk::Translation,
};

use super::seqset::{Generation, SeqSets};
use super::PAGE_SHIFTS;
use crate::sync::Ordering;

/// Ways per set.
const WAYS: usize = 3;
/// Sets of each paging-structure cache.
const TABLE_SETS: usize = 1024;
/// Sets of the second-level mappings.
const MAPPING_SETS: usize = 4096;
/// Entries the second-level mappings hold at most.
#[cfg(test)]
const MAPPING_CAPACITY: usize = MAPPING_SETS * WAYS;
/// Paging levels whose non-leaf entries are cached: PDE (2) to PML5E (5).
const CACHED_LEVELS: RangeInclusive<u8> = 2..=5;

/// log2 of the input region one entry at `level` maps (2 MiB for a PDE).
const fn span_shift(level: u8) -> u32 {
    12 + 9 * (level as u32 - 1)
}

/// The blocks of 2^`shift` bytes that `[first, last]` meets, and how many there are.
fn blocks(first: u64, last: u64, shift: u32) -> (RangeInclusive<u64>, u64) {
    let (a, b) = (first >> shift, last >> shift);
    (a..=b, (b - a).saturating_add(1))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FlTag {
    pub did: DomainId,
    pub pasid: Pasid,
    pub nested: bool,
}

/// A second-level mapping of one guest physical page, as a nested walk caches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlMapping {
    /// Host physical base of the page.
    pub output: u64,
    /// Page size of the mapping.
    pub size: PageSize,
    /// The second level's rights over all levels.
    pub perms: Permissions,
    /// The leaf's D bit is set (or SLADE is off), so a write needs no walk to set it.
    pub dirty: bool,
}

impl SlMapping {
    /// The mapping a second-level walk found.
    pub fn of(t: &Translation) -> SlMapping {
        SlMapping {
            output: t.page_base(),
            size: t.page_size,
            perms: t.perms,
            dirty: t.dirty,
        }
    }

    /// Whether the mapping may serve `access` without a walk: a walk is needed to fault,
    /// or to set the D bit of a write.
    pub fn allows(&self, access: AccessRequest) -> bool {
        let data = if access.write {
            self.perms.write && self.dirty
        } else {
            self.perms.read
        };
        data && (!access.execute || self.perms.execute)
    }

    /// The translation of `gpa`, an address in the mapped page.
    pub fn translate(&self, gpa: u64) -> Translation {
        Translation {
            output: self.output | (gpa & (self.size.bytes() - 1)),
            page_size: self.size,
            perms: self.perms,
            dirty: self.dirty,
        }
    }
}

/// Tag bits: domain id in 15:0, PASID in 35:16, nested in 36, level (or page shift) in
/// 47:40, valid in 63.
const VALID: u64 = 1 << 63;
const PASID_SHIFT: u32 = 16;
const NESTED: u64 = 1 << 36;
const LEVEL_SHIFT: u32 = 40;

/// The words of a way: tag, region (input address shifted right by the span of the
/// entry), the table or output address, its flags.
const TAG: usize = 0;
const REGION: usize = 1;
const ADDR: usize = 2;
const FLAGS: usize = 3;

fn tag_did(tag: u64) -> DomainId {
    DomainId(tag as u16)
}

fn tag_pasid(tag: u64) -> u32 {
    (tag >> PASID_SHIFT) as u32 & 0xf_ffff
}

fn tag_level(tag: u64) -> u8 {
    (tag >> LEVEL_SHIFT) as u8
}

fn fl_tag(tag: FlTag, level: u8) -> u64 {
    VALID
        | tag.did.0 as u64
        | (tag.pasid.raw() as u64) << PASID_SHIFT
        | if tag.nested { NESTED } else { 0 }
        | (level as u64) << LEVEL_SHIFT
}

/// The tag of a second-level entry at `level`, or of a mapping of 2^`level`-byte pages.
fn did_tag(did: DomainId, level: u8) -> u64 {
    VALID | did.0 as u64 | (level as u64) << LEVEL_SHIFT
}

fn bit(on: bool, n: u32) -> u64 {
    (on as u64) << n
}

fn perms_bits(p: Permissions) -> u64 {
    bit(p.read, 8) | bit(p.write, 9) | bit(p.execute, 10) | bit(p.user, 11)
}

fn perms_of(flags: u64) -> Permissions {
    Permissions {
        read: flags & 1 << 8 != 0,
        write: flags & 1 << 9 != 0,
        execute: flags & 1 << 10 != 0,
        user: flags & 1 << 11 != 0,
    }
}

/// One cache of the paging-structure caches: entries of four words, by tag and region.
#[derive(Debug)]
struct Cache {
    sets: SeqSets<4, WAYS>,
}

impl Cache {
    fn new(sets: usize) -> Self {
        Cache {
            sets: SeqSets::new(sets),
        }
    }

    /// The set of a key: the region's low bits, offset by a hash of the tag, so that
    /// contiguous regions of one address space take consecutive sets.
    fn set(&self, tag: u64, region: u64) -> usize {
        (region ^ (tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32)) as usize & self.sets.mask()
    }

    fn find(&self, tag: u64, region: u64) -> Option<(u64, u64)> {
        self.sets.find(self.set(tag, region), 0, |w| {
            (w[TAG].load(Ordering::Relaxed) == tag && w[REGION].load(Ordering::Relaxed) == region)
                .then(|| {
                    (
                        w[ADDR].load(Ordering::Relaxed),
                        w[FLAGS].load(Ordering::Relaxed),
                    )
                })
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        generation: &Generation,
        fill: u64,
        tag: u64,
        region: u64,
        addr: u64,
        flags: u64,
    ) {
        self.sets.fill(
            generation,
            fill,
            self.set(tag, region),
            0,
            |w| {
                w[TAG].load(Ordering::Relaxed) == tag && w[REGION].load(Ordering::Relaxed) == region
            },
            [tag, region, addr, flags],
        );
    }

    /// Removes the entries `select` accepts (by tag and region): by looking up the `count`
    /// `candidates` when they are no more than the ways of the sets holding entries, else
    /// by a scan of those sets. The caller advanced the generation.
    fn remove<I: Iterator<Item = (u64, u64)>>(
        &self,
        count: u64,
        candidates: impl FnOnce() -> I,
        select: impl Fn(u64, u64) -> bool,
    ) {
        if count <= (self.sets.occupied_sets() * WAYS) as u64 {
            for (tag, region) in candidates() {
                if select(tag, region) && self.find(tag, region).is_some() {
                    let w = self.sets.write(self.set(tag, region));
                    let held = w.position(|w| {
                        w[TAG].load(Ordering::Relaxed) == tag
                            && w[REGION].load(Ordering::Relaxed) == region
                    });
                    if let Some(way) = held {
                        w.clear(way);
                    }
                }
            }
        } else {
            for set in self.sets.occupied() {
                let w = self.sets.write(set);
                for way in 0..WAYS {
                    let tag = w.tag(way);
                    if tag != 0 && select(tag, w.word(way, REGION)) {
                        w.clear(way);
                    }
                }
            }
        }
    }

    /// Removes every entry whose tag `select` accepts.
    fn remove_tags(&self, select: impl Fn(u64) -> bool) {
        self.remove(u64::MAX, std::iter::empty, |tag, _| select(tag));
    }
}

/// How many entries each cache holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedTables {
    /// First-level paging-structure cache entries.
    pub first_level: usize,
    /// Second-level paging-structure cache entries.
    pub second_level: usize,
    /// Second-level mappings cached by nested walks.
    pub nested_mappings: usize,
}

/// The paging-structure caches of one IOMMU and the second-level mappings of nested walks.
#[derive(Debug)]
pub struct PagingStructureCaches {
    first_level: Cache,
    second_level: Cache,
    mappings: Cache,
    /// Counts invalidations, so that a walk that began before one does not fill the
    /// caches after it: an invalidation's completion covers the walks in flight when it
    /// began.
    generation: Generation,
}

impl Default for PagingStructureCaches {
    fn default() -> Self {
        PagingStructureCaches {
            first_level: Cache::new(TABLE_SETS),
            second_level: Cache::new(TABLE_SETS),
            mappings: Cache::new(MAPPING_SETS),
            generation: Generation::default(),
        }
    }
}

impl PagingStructureCaches {
    /// Starts a walk: what it reads may fill the caches only if no invalidation runs
    /// before the fill.
    pub(crate) fn begin_fill(&self) -> u64 {
        self.generation.begin()
    }

    /// The deepest cached first-level table for `input` below a `top`-level root.
    pub(crate) fn first_level_start(&self, tag: FlTag, input: u64, top: u8) -> Option<FlStart> {
        (2..=top).find_map(|level| {
            let (table, flags) = self
                .first_level
                .find(fl_tag(tag, level), input >> span_shift(level))?;
            Some(FlStart {
                level: level - 1,
                table,
                rights: FlRights {
                    user: flags & 1 << 8 != 0,
                    writable: flags & 1 << 9 != 0,
                    execute_disable: flags & 1 << 10 != 0,
                },
            })
        })
    }

    /// Caches the first-level tables a walk of `input` went down to: each start with the
    /// level of the entry that pointed to it.
    pub(crate) fn fill_first_level(&self, fill: u64, tag: FlTag, input: u64, starts: &[FlStart]) {
        for s in starts {
            let level = s.level + 1;
            let r = s.rights;
            let flags = bit(r.user, 8) | bit(r.writable, 9) | bit(r.execute_disable, 10);
            self.first_level.fill(
                &self.generation,
                fill,
                fl_tag(tag, level),
                input >> span_shift(level),
                s.table,
                flags,
            );
        }
    }

    /// The deepest cached second-level table for `gpa` below a `top`-level root.
    pub(crate) fn second_level_start(&self, did: DomainId, gpa: u64, top: u8) -> Option<SlStart> {
        (2..=top).find_map(|level| {
            let (table, flags) = self
                .second_level
                .find(did_tag(did, level), gpa >> span_shift(level))?;
            Some(SlStart {
                level: level - 1,
                table,
                rights: perms_of(flags),
            })
        })
    }

    /// Caches the second-level tables a walk of `gpa` went down to.
    pub(crate) fn fill_second_level(&self, fill: u64, did: DomainId, gpa: u64, starts: &[SlStart]) {
        for s in starts {
            let level = s.level + 1;
            self.second_level.fill(
                &self.generation,
                fill,
                did_tag(did, level),
                gpa >> span_shift(level),
                s.table,
                perms_bits(s.rights),
            );
        }
    }

    /// The cached second-level mapping of the page holding `gpa`.
    pub(crate) fn mapping(&self, did: DomainId, gpa: u64) -> Option<SlMapping> {
        PageSize::ALL.into_iter().find_map(|size| {
            let shift = size.shift();
            let (output, flags) = self
                .mappings
                .find(did_tag(did, shift as u8), gpa >> shift)?;
            Some(SlMapping {
                output,
                size,
                perms: perms_of(flags),
                dirty: flags & 1 != 0,
            })
        })
    }

    /// Caches the second-level mapping of the page holding `gpa`.
    pub(crate) fn insert_mapping(&self, fill: u64, did: DomainId, gpa: u64, mapping: SlMapping) {
        let shift = mapping.size.shift();
        self.mappings.fill(
            &self.generation,
            fill,
            did_tag(did, shift as u8),
            gpa >> shift,
            mapping.output,
            perms_bits(mapping.perms) | mapping.dirty as u64,
        );
    }

    /// Global IOTLB invalidation (§6.5.2.3): every paging-structure-cache entry and every
    /// cached second-level mapping is removed.
    pub fn invalidate_all(&self) {
        self.generation.advance();
        self.first_level.sets.clear();
        self.second_level.sets.clear();
        self.mappings.sets.clear();
    }

    /// Domain-selective IOTLB invalidation (§6.5.2.3): the entries caching first-level,
    /// second-level and nested mappings of `did` are removed, whatever their PASID.
    pub fn invalidate_domain(&self, did: DomainId) {
        self.generation.advance();
        for cache in [&self.first_level, &self.second_level, &self.mappings] {
            cache.remove_tags(|tag| tag_did(tag) == did);
        }
    }

    /// Page-selective-within-domain IOTLB invalidation (§6.5.2.3) of `range`, a
    /// second-level input (guest physical) range:
    /// - the second-level mappings of `did` that meet the range are removed (IOTLB entries
    ///   caching second-level mappings, whatever IH says);
    /// - with IH clear, the second-level paging-structure entries of `did` mapping regions
    ///   that meet the range are removed; with IH set they are kept (software tells that
    ///   only leaf entries changed);
    /// - every first-level paging-structure entry of `did`, first-level (PGTT=001b) or
    ///   nested (PGTT=011b), any PASID, is removed: the spec invalidates those of the domain
    ///   whatever the address, since a second-level input address cannot select them.
    pub fn invalidate_domain_range(&self, did: DomainId, range: AddrRange, ih: bool) {
        let (addr, last) = (range.start, range.last);
        self.generation.advance();
        self.first_level.remove_tags(|tag| tag_did(tag) == did);
        if !ih {
            let count = CACHED_LEVELS
                .map(|l| blocks(addr, last, span_shift(l)).1)
                .fold(0u64, u64::saturating_add);
            let candidates = || {
                CACHED_LEVELS.flat_map(|level| {
                    let (regions, _) = blocks(addr, last, span_shift(level));
                    regions.map(move |region| (did_tag(did, level), region))
                })
            };
            self.second_level.remove(count, candidates, |tag, region| {
                tag_did(tag) == did && region_meets(region, span_shift(tag_level(tag)), addr, last)
            });
        }
        let count = PAGE_SHIFTS
            .iter()
            .map(|&s| blocks(addr, last, s as u32).1)
            .fold(0u64, u64::saturating_add);
        let candidates = || {
            PAGE_SHIFTS.iter().flat_map(|&shift| {
                let (pages, _) = blocks(addr, last, shift as u32);
                pages.map(move |page| (did_tag(did, shift), page))
            })
        };
        self.mappings.remove(count, candidates, |tag, page| {
            tag_did(tag) == did && region_meets(page, tag_level(tag) as u32, addr, last)
        });
    }

    /// PASID-selective PASID-based-IOTLB invalidation (§6.5.2.4): the first-level
    /// paging-structure entries (first-level and nested) of `did` and `pasid` are removed.
    /// Second-level paging-structure entries and second-level mappings carry no PASID and
    /// stay.
    pub fn invalidate_pasid(&self, did: DomainId, pasid: Pasid) {
        self.generation.advance();
        self.first_level
            .remove_tags(|tag| tag_did(tag) == did && tag_pasid(tag) == pasid.raw());
    }

    /// Page-selective-within-PASID PASID-based-IOTLB invalidation (§6.5.2.4) of `range`, a
    /// first-level input range: with IH clear, the first-level
    /// paging-structure entries of `did` and `pasid` that map regions meeting the range are
    /// removed (software may have changed non-leaf entries there); with IH set they are kept.
    /// Second-level entries and mappings stay, as for the PASID-selective granularity.
    pub fn invalidate_pasid_range(&self, did: DomainId, pasid: Pasid, range: AddrRange, ih: bool) {
        let (addr, last) = (range.start, range.last);
        if ih {
            return;
        }
        self.generation.advance();
        let count = CACHED_LEVELS
            .map(|l| blocks(addr, last, span_shift(l)).1.saturating_mul(2))
            .fold(0u64, u64::saturating_add);
        let candidates = || {
            CACHED_LEVELS.flat_map(|level| {
                let (regions, _) = blocks(addr, last, span_shift(level));
                regions.flat_map(move |region| {
                    [false, true]
                        .map(|nested| (fl_tag(FlTag { did, pasid, nested }, level), region))
                })
            })
        };
        self.first_level.remove(count, candidates, |tag, region| {
            tag_did(tag) == did
                && tag_pasid(tag) == pasid.raw()
                && region_meets(region, span_shift(tag_level(tag)), addr, last)
        });
    }

    /// How many entries each cache holds.
    pub fn len(&self) -> CachedTables {
        CachedTables {
            first_level: self.first_level.sets.len(),
            second_level: self.second_level.sets.len(),
            nested_mappings: self.mappings.sets.len(),
        }
    }

    /// Whether every cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == CachedTables::default()
    }
}

/// Whether block `index` of 2^`shift` bytes meets `[first, last]`.
fn region_meets(index: u64, shift: u32, first: u64, last: u64) -> bool {
    (first >> shift) <= index && index <= (last >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D1: DomainId = DomainId(1);
    const D2: DomainId = DomainId(2);
    /// A 1-GiB-aligned first-level input address.
    const VA: u64 = 0x7f12_4000_0000;
    /// A 1-GiB-aligned guest physical address.
    const GPA: u64 = 0x8000_0000;
    const MB: u64 = 1 << 20;

    fn pasid(n: u32) -> Pasid {
        Pasid::new(n).unwrap()
    }

    fn tag(did: DomainId, p: u32, nested: bool) -> FlTag {
        FlTag {
            did,
            pasid: pasid(p),
            nested,
        }
    }

    fn fl(level: u8, table: u64) -> FlStart {
        FlStart {
            level,
            table,
            rights: FlRights::ALL,
        }
    }

    fn sl(level: u8, table: u64) -> SlStart {
        SlStart {
            level,
            table,
            rights: Permissions::ALL,
        }
    }

    fn range(start: u64, len: u64) -> AddrRange {
        AddrRange {
            start,
            last: start + len - 1,
        }
    }

    fn mapping(output: u64, size: PageSize, write: bool, dirty: bool) -> SlMapping {
        SlMapping {
            output,
            size,
            perms: Permissions {
                read: true,
                write,
                execute: false,
                user: true,
            },
            dirty,
        }
    }

    /// Caches a 4-level first-level walk of `va` down to its page table.
    fn fill_fl(c: &PagingStructureCaches, t: FlTag, va: u64) {
        let fill = c.begin_fill();
        c.fill_first_level(fill, t, va, &[fl(3, 0x3000), fl(2, 0x2000), fl(1, 0x1000)]);
    }

    /// Caches a 4-level second-level walk of `gpa` down to its page table.
    fn fill_sl(c: &PagingStructureCaches, did: DomainId, gpa: u64) {
        let fill = c.begin_fill();
        c.fill_second_level(
            fill,
            did,
            gpa,
            &[sl(3, 0xa000), sl(2, 0xb000), sl(1, 0xc000)],
        );
    }

    fn insert_mapping(c: &PagingStructureCaches, did: DomainId, gpa: u64, m: SlMapping) {
        c.insert_mapping(c.begin_fill(), did, gpa, m);
    }

    #[test]
    fn the_deepest_cached_table_covering_an_address_is_found() {
        let c = PagingStructureCaches::default();
        let t = tag(D1, 5, true);
        fill_fl(&c, t, VA);
        assert_eq!(
            c.first_level_start(t, VA + 0x1f_f008, 4),
            Some(fl(1, 0x1000))
        );
        assert_eq!(c.first_level_start(t, VA + 2 * MB, 4), Some(fl(2, 0x2000)));
        assert_eq!(
            c.first_level_start(t, VA + (1 << 30), 4),
            Some(fl(3, 0x3000))
        );
        assert_eq!(c.first_level_start(t, VA + (1 << 39), 4), None);
        assert_eq!(c.first_level_start(tag(D1, 6, true), VA, 4), None);
        assert_eq!(c.first_level_start(tag(D1, 5, false), VA, 4), None);
        assert_eq!(c.first_level_start(tag(D2, 5, true), VA, 4), None);
        // A 3-level lookup does not see the PML4E cache.
        assert_eq!(c.first_level_start(t, VA + (1 << 30), 3), None);
        fill_sl(&c, D1, GPA);
        assert_eq!(
            c.second_level_start(D1, GPA + 0x1000, 4),
            Some(sl(1, 0xc000))
        );
        assert_eq!(c.second_level_start(D2, GPA, 4), None);
        assert_eq!(
            c.len(),
            CachedTables {
                first_level: 3,
                second_level: 3,
                nested_mappings: 0
            }
        );
    }

    #[test]
    fn pasid_based_invalidations_remove_first_level_entries_by_pasid_and_range() {
        let c = PagingStructureCaches::default();
        for t in [
            tag(D1, 1, true),
            tag(D1, 1, false),
            tag(D1, 2, true),
            tag(D2, 1, true),
        ] {
            fill_fl(&c, t, VA);
        }
        fill_sl(&c, D1, GPA);
        let t = tag(D1, 1, true);
        // IH set: only leaf entries changed, the caches stay.
        c.invalidate_pasid_range(D1, pasid(1), range(VA, 4096), true);
        assert_eq!(c.len().first_level, 12);
        // A page 4 MiB away: its PDPE and PML4E regions hold VA too, its PDE region does not.
        c.invalidate_pasid_range(D1, pasid(1), range(VA + 4 * MB, 4096), false);
        assert_eq!(c.first_level_start(t, VA, 4), Some(fl(1, 0x1000)));
        assert_eq!(c.first_level_start(t, VA + 2 * MB, 4), None);
        assert_eq!(c.len().first_level, 12 - 4);
        c.invalidate_pasid_range(D1, pasid(1), range(VA + 0x1000, 4096), false);
        assert_eq!(c.first_level_start(t, VA, 4), None);
        assert_eq!(c.first_level_start(tag(D1, 1, false), VA, 4), None);
        assert_eq!(
            c.first_level_start(tag(D1, 2, true), VA, 4),
            Some(fl(1, 0x1000))
        );
        c.invalidate_pasid(D1, pasid(2));
        assert_eq!(c.first_level_start(tag(D1, 2, true), VA, 4), None);
        // Another domain's entries with the same PASID, and second-level entries, stay.
        assert_eq!(
            c.first_level_start(tag(D2, 1, true), VA, 4),
            Some(fl(1, 0x1000))
        );
        assert_eq!(c.second_level_start(D1, GPA, 4), Some(sl(1, 0xc000)));
    }

    #[test]
    fn iotlb_invalidations_remove_by_domain_and_second_level_range() {
        let c = PagingStructureCaches::default();
        for t in [tag(D1, 1, true), tag(D1, 2, false), tag(D2, 1, true)] {
            fill_fl(&c, t, VA);
        }
        fill_sl(&c, D1, GPA);
        fill_sl(&c, D2, GPA);
        let m = mapping(0x10_0000, PageSize::Size4K, true, true);
        for (did, gpa) in [(D1, GPA), (D1, GPA + 2 * MB), (D2, GPA)] {
            insert_mapping(&c, did, gpa, m);
        }
        // IH set: the domain's first-level entries and the mapping of the page go, the
        // second-level paging-structure entries stay.
        c.invalidate_domain_range(D1, range(GPA, 4096), true);
        assert_eq!(c.first_level_start(tag(D1, 1, true), VA, 4), None);
        assert_eq!(c.first_level_start(tag(D1, 2, false), VA, 4), None);
        assert_eq!(
            c.first_level_start(tag(D2, 1, true), VA, 4),
            Some(fl(1, 0x1000))
        );
        assert_eq!(c.second_level_start(D1, GPA, 4), Some(sl(1, 0xc000)));
        assert_eq!(c.mapping(D1, GPA), None);
        assert_eq!(c.mapping(D1, GPA + 2 * MB), Some(m));
        assert_eq!(c.mapping(D2, GPA), Some(m));
        // IH clear, a page in the next 2 MiB: the SL-PDPE and SL-PML4E entries meet it.
        c.invalidate_domain_range(D1, range(GPA + 2 * MB, 4096), false);
        assert_eq!(c.second_level_start(D1, GPA, 4), Some(sl(1, 0xc000)));
        assert_eq!(c.second_level_start(D1, GPA + 2 * MB, 4), None);
        assert_eq!(c.mapping(D1, GPA + 2 * MB), None);
        c.invalidate_domain_range(D1, range(GPA, 4096), false);
        assert_eq!(c.second_level_start(D1, GPA, 4), None);
        assert_eq!(c.second_level_start(D2, GPA, 4), Some(sl(1, 0xc000)));
        c.invalidate_domain(D2);
        assert!(c.is_empty());
        fill_fl(&c, tag(D1, 1, true), VA);
        fill_sl(&c, D2, GPA);
        insert_mapping(&c, D2, GPA, m);
        c.invalidate_all();
        assert!(c.is_empty());
    }

    #[test]
    fn a_large_mapping_is_removed_by_any_range_inside_it() {
        let c = PagingStructureCaches::default();
        let big = mapping(0x4000_0000, PageSize::Size1G, true, true);
        insert_mapping(&c, D1, GPA, big);
        assert_eq!(c.mapping(D1, GPA + 0x1234_5678), Some(big));
        c.invalidate_domain_range(D1, range(GPA + 0x3000_0000, 4096), true);
        assert_eq!(c.mapping(D1, GPA), None);
    }

    #[test]
    fn whole_space_ranges_are_removed_by_a_scan() {
        let c = PagingStructureCaches::default();
        for i in 0..8 {
            insert_mapping(&c, D1, i << 40, mapping(0, PageSize::Size4K, false, true));
            fill_fl(&c, tag(D1, 1, false), VA + (i << 41));
        }
        fill_sl(&c, D1, GPA);
        let all = AddrRange {
            start: 0,
            last: u64::MAX,
        };
        c.invalidate_pasid_range(D1, pasid(1), all, false);
        c.invalidate_domain_range(D1, all, false);
        assert!(c.is_empty());
    }

    #[test]
    fn a_fill_that_began_before_an_invalidation_is_dropped() {
        let c = PagingStructureCaches::default();
        let t = tag(D1, 1, true);
        let fill = c.begin_fill();
        c.invalidate_pasid(D2, pasid(9));
        c.fill_first_level(fill, t, VA, &[fl(1, 0x1000)]);
        c.fill_second_level(fill, D1, GPA, &[sl(1, 0xc000)]);
        c.insert_mapping(fill, D1, GPA, mapping(0, PageSize::Size4K, true, true));
        assert!(c.is_empty());
        // An invalidation with nothing to remove (IH set) does not hold fills back.
        let fill = c.begin_fill();
        c.invalidate_pasid_range(D1, pasid(1), range(VA, 4096), true);
        c.fill_first_level(fill, t, VA, &[fl(1, 0x1000)]);
        assert_eq!(c.first_level_start(t, VA, 4), Some(fl(1, 0x1000)));
    }

    #[test]
    fn a_full_shard_is_emptied_to_make_room() {
        let c = PagingStructureCaches::default();
        let m = mapping(0, PageSize::Size4K, true, true);
        for page in 0..MAPPING_CAPACITY as u64 + 10 {
            insert_mapping(&c, D1, page << 12, m);
        }
        assert!(c.len().nested_mappings <= MAPPING_CAPACITY);
        assert_eq!(c.mapping(D1, (MAPPING_CAPACITY as u64 + 9) << 12), Some(m));
    }

    /// An IOTLB or PASID-based-IOTLB invalidation of the paging-structure caches.
    #[derive(Clone, Debug)]
    enum Inv {
        All,
        Domain(DomainId),
        DomainRange(DomainId, u64, bool),
        Pasid(DomainId, u32),
        PasidRange(DomainId, u32, u64, bool),
    }

    impl Inv {
        fn run(&self, c: &PagingStructureCaches) {
            match *self {
                Inv::All => c.invalidate_all(),
                Inv::Domain(did) => c.invalidate_domain(did),
                Inv::DomainRange(did, a, ih) => c.invalidate_domain_range(did, range(a, MB), ih),
                Inv::Pasid(did, p) => c.invalidate_pasid(did, pasid(p)),
                Inv::PasidRange(did, p, a, ih) => {
                    c.invalidate_pasid_range(did, pasid(p), range(a, MB), ih)
                }
            }
        }

        /// Whether the first-level entry of `t` at `level` for `input` is removed.
        fn covers_fl(&self, t: FlTag, level: u8, input: u64) -> bool {
            let meets =
                |a: u64| region_meets(input >> span_shift(level), span_shift(level), a, a + MB - 1);
            match *self {
                Inv::All => true,
                Inv::Domain(did) | Inv::DomainRange(did, _, _) => t.did == did,
                Inv::Pasid(did, p) => t.did == did && t.pasid == pasid(p),
                Inv::PasidRange(did, p, a, ih) => {
                    !ih && t.did == did && t.pasid == pasid(p) && meets(a)
                }
            }
        }

        /// Whether the second-level entry of `did` at `level` for `gpa` is removed.
        fn covers_sl(&self, did: DomainId, level: u8, gpa: u64) -> bool {
            match *self {
                Inv::All => true,
                Inv::Domain(d) => d == did,
                Inv::DomainRange(d, a, ih) => {
                    !ih && d == did
                        && region_meets(gpa >> span_shift(level), span_shift(level), a, a + MB - 1)
                }
                Inv::Pasid(..) | Inv::PasidRange(..) => false,
            }
        }

        /// Whether the mapping of `did` of a page of 2^`shift` bytes at `gpa` is removed.
        fn covers_mapping(&self, did: DomainId, shift: u32, gpa: u64) -> bool {
            match *self {
                Inv::All => true,
                Inv::Domain(d) => d == did,
                Inv::DomainRange(d, a, _) => {
                    d == did && region_meets(gpa >> shift, shift, a, a + MB - 1)
                }
                Inv::Pasid(..) | Inv::PasidRange(..) => false,
            }
        }
    }

    fn did() -> impl Strategy<Value = DomainId> {
        (1u16..3).prop_map(DomainId)
    }

    /// Addresses in a 1-GiB window, in 1-MiB steps.
    fn addr() -> impl Strategy<Value = u64> {
        (0u64..1024).prop_map(|mb| GPA + mb * MB)
    }

    fn inv() -> impl Strategy<Value = Inv> {
        prop_oneof![
            Just(Inv::All),
            did().prop_map(Inv::Domain),
            (did(), addr(), any::<bool>()).prop_map(|(d, a, ih)| Inv::DomainRange(d, a, ih)),
            (did(), 1u32..3).prop_map(|(d, p)| Inv::Pasid(d, p)),
            (did(), 1u32..3, addr(), any::<bool>())
                .prop_map(|(d, p, a, ih)| Inv::PasidRange(d, p, a, ih)),
        ]
    }

    proptest::proptest! {
        /// A lookup after a fill finds the entry filled; after an invalidation that covers
        /// it (§6.5.2.3, §6.5.2.4), never.
        #[test]
        fn lookups_see_fills_until_a_covering_invalidation(
            fills in proptest::collection::vec((did(), 1u32..3, any::<bool>(), addr()), 1..48),
            inv in inv(),
        ) {
            let c = PagingStructureCaches::default();
            let big = mapping(0x4000_0000, PageSize::Size2M, true, true);
            for &(did, p, nested, a) in &fills {
                let t = tag(did, p, nested);
                fill_fl(&c, t, a);
                proptest::prop_assert_eq!(c.first_level_start(t, a, 4), Some(fl(1, 0x1000)));
                fill_sl(&c, did, a);
                proptest::prop_assert_eq!(c.second_level_start(did, a, 4), Some(sl(1, 0xc000)));
                insert_mapping(&c, did, a, big);
                proptest::prop_assert_eq!(c.mapping(did, a), Some(big));
            }
            inv.run(&c);
            for &(did, p, nested, a) in &fills {
                let t = tag(did, p, nested);
                for level in 2..=4u8 {
                    let cached = c.first_level.find(fl_tag(t, level), a >> span_shift(level));
                    if inv.covers_fl(t, level, a) {
                        proptest::prop_assert_eq!(cached, None);
                    }
                    let cached = c.second_level.find(did_tag(did, level), a >> span_shift(level));
                    if inv.covers_sl(did, level, a) {
                        proptest::prop_assert_eq!(cached, None);
                    }
                }
                if inv.covers_mapping(did, 21, a) {
                    proptest::prop_assert_eq!(c.mapping(did, a), None);
                }
            }
        }
    }

    #[test]
    fn a_second_level_mapping_serves_only_what_it_allows() {
        let read_only = mapping(0x20_0000, PageSize::Size2M, false, true);
        let clean = mapping(0x20_0000, PageSize::Size2M, true, false);
        let dirty = mapping(0x20_0000, PageSize::Size2M, true, true);
        assert!(read_only.allows(AccessRequest::READ));
        assert!(!read_only.allows(AccessRequest::WRITE));
        assert!(!clean.allows(AccessRequest::WRITE), "the walk sets D");
        assert!(dirty.allows(AccessRequest::WRITE));
        assert!(!dirty.allows(AccessRequest::EXECUTE));
        let t = dirty.translate(0x40_1234_5678);
        assert_eq!((t.output, t.page_size), (0x34_5678, PageSize::Size2M));
    }
}
