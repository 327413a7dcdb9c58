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
//! share them, as on hardware. The caches are sharded by domain id, the three under one
//! lock per shard, so that an invalidation locks one shard and a walk locks its domain's
//! shard once per lookup and once for all of its fills (the walk keeps what it reads in a
//! `WalkFills` until it ends); a cache that fills up is emptied, as hardware may drop
//! entries at any time. Lookups, fills and invalidations do not allocate once a shard has
//! reached its capacity.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut, RangeInclusive};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crossbeam_utils::CachePadded;
use foldhash::fast::FixedState;
use vsva_vtd::{
    addr::DomainId, addr::Pasid, inv_desc::AddrRange, walk::AccessRequest, walk::FlStart,
    walk::PageSize, walk::Permissions, walk::SlStart, walk::Translation,
};

use super::PAGE_SHIFTS;

/// Shards per cache: domain ids spread over them.
const SHARDS: usize = 16;
/// Entries per shard of a paging-structure cache.
const TABLE_CAPACITY: usize = 1024;
/// Entries per shard of the second-level mappings.
const MAPPING_CAPACITY: usize = 4096;
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

/// Which first-level caches a walk uses: the PASID entry's domain id and PASID, and whether
/// the table addresses are guest physical (nested) or host physical (first level only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FlTag {
    pub did: DomainId,
    pub pasid: Pasid,
    pub nested: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlKey {
    tag: FlTag,
    /// The level of the cached entry (2 = PDE).
    level: u8,
    /// The input address shifted right by the region the entry maps.
    region: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SlKey {
    did: DomainId,
    level: u8,
    region: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct MappingKey {
    did: DomainId,
    shift: u8,
    page: u64,
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

/// Counts invalidations, so that a walk that began before one does not fill the caches
/// after it: an invalidation's completion covers the walks in flight when it began. The
/// count is advanced under the shard lock an invalidation takes, and a fill checks it under
/// the lock of the shard it fills.
#[derive(Debug, Default)]
struct Generation(AtomicU64);

impl Generation {
    fn advance(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// The entries of the three caches for the domains of one shard, under one lock, so that
/// a walk's lookups of second-level mappings and tables, and all of its fills, each take
/// the lock once.
#[derive(Debug, Default)]
struct Tables {
    first_level: HashMap<FlKey, FlStart, FixedState>,
    second_level: HashMap<SlKey, SlStart, FixedState>,
    mappings: HashMap<MappingKey, SlMapping, FixedState>,
}

impl Tables {
    /// The deepest cached second-level table for `gpa` below a `top`-level root, from
    /// `fills` (what the walk read so far) or the cache (`None`: empty).
    fn second_level_start(
        tables: Option<&Self>,
        fills: &WalkFills,
        gpa: u64,
        top: u8,
    ) -> Option<SlStart> {
        (2..=top).find_map(|level| {
            let key = SlKey {
                did: fills.did,
                level,
                region: gpa >> span_shift(level),
            };
            fills
                .second_level_start(&key)
                .or_else(|| tables?.second_level.get(&key).copied())
        })
    }

    /// The cached second-level mapping of the page holding `gpa`, from `fills` or the
    /// cache (`None`: empty).
    fn mapping(tables: Option<&Self>, fills: &WalkFills, gpa: u64) -> Option<SlMapping> {
        PAGE_SHIFTS.into_iter().find_map(|shift| {
            let key = MappingKey {
                did: fills.did,
                shift,
                page: gpa >> shift,
            };
            fills
                .mapping(&key)
                .or_else(|| tables?.mappings.get(&key).copied())
        })
    }

    /// Removes the entries of every cache.
    fn clear(&mut self) {
        self.first_level.clear();
        self.second_level.clear();
        self.mappings.clear();
    }

    /// Entries in the three caches.
    fn len(&self) -> usize {
        self.first_level.len() + self.second_level.len() + self.mappings.len()
    }
}

/// One shard: its caches, and how many entries they hold, readable without the lock so
/// that a lookup in an empty shard (every lookup of a cold walk after a global or
/// domain-selective invalidation) takes no lock. A cache may miss at any time, so a
/// lookup that reads a count older than another thread's fill and misses is correct; the
/// count is written under the write lock at the end of every change
/// ([`ShardWrite`]), so a thread always sees its own fills.
#[derive(Debug, Default)]
struct Shard {
    tables: RwLock<Tables>,
    entries: AtomicUsize,
}

/// A shard's caches under its write lock; the entry count is updated when it goes.
struct ShardWrite<'a> {
    tables: RwLockWriteGuard<'a, Tables>,
    entries: &'a AtomicUsize,
}

impl Deref for ShardWrite<'_> {
    type Target = Tables;

    fn deref(&self) -> &Tables {
        &self.tables
    }
}

impl DerefMut for ShardWrite<'_> {
    fn deref_mut(&mut self) -> &mut Tables {
        &mut self.tables
    }
}

impl Drop for ShardWrite<'_> {
    /// Runs before the guard field is dropped: the count is written under the lock.
    fn drop(&mut self) {
        self.entries.store(self.tables.len(), Ordering::Release);
    }
}

impl Shard {
    /// The caches for reading, `None` without taking the lock if they are empty.
    fn read(&self) -> Option<RwLockReadGuard<'_, Tables>> {
        if self.entries.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(self.tables.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn write(&self) -> ShardWrite<'_> {
        ShardWrite {
            tables: self.tables.write().unwrap_or_else(PoisonError::into_inner),
            entries: &self.entries,
        }
    }
}

/// Caches `value` under `key` in `map`, emptied first if it is full without `key`: the
/// shard's capacity is reserved once, so a fill allocates nothing after the first.
fn cache<K: Eq + Hash, V>(map: &mut HashMap<K, V, FixedState>, capacity: usize, key: K, value: V) {
    if map.capacity() < capacity {
        map.reserve(capacity);
    }
    if map.len() >= capacity && !map.contains_key(&key) {
        map.clear();
    }
    map.insert(key, value);
}

/// Removes the entries of `map` that `select` accepts: key by key when the `count`
/// candidate keys are fewer than the entries, else by a scan.
fn remove<K: Eq + Hash, V, I: Iterator<Item = K>>(
    map: &mut HashMap<K, V, FixedState>,
    count: u64,
    candidates: impl FnOnce() -> I,
    select: impl Fn(&K) -> bool,
) {
    if count < map.len() as u64 {
        for key in candidates() {
            if select(&key) {
                map.remove(&key);
            }
        }
    } else {
        map.retain(|k, _| !select(k));
    }
}

/// Entries one walk read, at most `N`; more are not cached (hardware may cache any
/// subset of what it reads).
///
/// Only the entries pushed are written: a walk's [`WalkFills`] is made on every IOTLB miss,
/// and initialising all of its slots wrote about twenty cache lines of stack per miss
/// (most of them never used: a second-level walk fills at most four tables), which the
/// global invalidation before a cold miss has evicted.
pub(crate) struct Pending<K, V, const N: usize> {
    /// The first `len` slots are initialised.
    entries: [MaybeUninit<(K, V)>; N],
    len: usize,
}

impl<K: Copy, V: Copy, const N: usize> Clone for Pending<K, V, N> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K: Copy, V: Copy, const N: usize> Copy for Pending<K, V, N> {}

impl<K, V, const N: usize> fmt::Debug for Pending<K, V, N>
where
    K: Copy + Eq + fmt::Debug,
    V: Copy + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<K: Copy + Eq, V: Copy, const N: usize> Default for Pending<K, V, N> {
    fn default() -> Self {
        Pending::new()
    }
}

impl<K: Copy + Eq, V: Copy, const N: usize> Pending<K, V, N> {
    pub(crate) fn new() -> Self {
        Pending {
            entries: [const { MaybeUninit::uninit() }; N],
            len: 0,
        }
    }

    pub(crate) fn push(&mut self, key: K, value: V) {
        if let Some(slot) = self.entries.get_mut(self.len) {
            slot.write((key, value));
            self.len += 1;
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &(K, V)> {
        self.entries[..self.len].iter().map(|slot| {
            // SAFETY: `push` writes a slot before it counts it in `len`, and slots are
            // never un-written, so each of the first `len` is initialised.
            unsafe { slot.assume_init_ref() }
        })
    }

    fn get(&self, key: &K) -> Option<V> {
        self.iter().find(|(k, _)| k == key).map(|&(_, v)| v)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Second-level tables one walk may cache: three levels for each of the first few
/// resolutions of a nested walk (later ones start from the tables cached by the first).
const PENDING_TABLES: usize = 12;
/// Second-level mappings one nested walk may cache: one per resolution.
const PENDING_MAPPINGS: usize = 11;

/// What one walk of one domain read, cached when the walk ends
/// ([`PagingStructureCaches::fill`]) under one lock of the domain's shard, instead of a
/// lock per level and per second-level resolution. The walk's own later lookups find it
/// here first, so a nested walk reads each second-level table once, as when every entry
/// was cached as soon as it was read. Fixed-size: a walk allocates nothing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WalkFills {
    did: DomainId,
    first_level: Pending<FlKey, FlStart, MAX_LEVELS>,
    second_level: Pending<SlKey, SlStart, PENDING_TABLES>,
    mappings: Pending<MappingKey, SlMapping, PENDING_MAPPINGS>,
}

/// Non-leaf levels a first-level walk goes down through: PML5E to PDE.
const MAX_LEVELS: usize = 4;

impl WalkFills {
    /// Nothing read yet by a walk of `did`'s tables.
    pub(crate) fn new(did: DomainId) -> Self {
        WalkFills {
            did,
            first_level: Pending::new(),
            second_level: Pending::new(),
            mappings: Pending::new(),
        }
    }

    /// The first-level tables a walk of `input` went down to: each start with the level
    /// of the entry that pointed to it. `tag.did` is the walk's domain.
    pub(crate) fn first_level(&mut self, tag: FlTag, input: u64, starts: &[FlStart]) {
        debug_assert_eq!(tag.did, self.did);
        for s in starts {
            let level = s.level + 1;
            let region = input >> span_shift(level);
            self.first_level.push(FlKey { tag, level, region }, *s);
        }
    }

    /// The second-level tables a walk of `gpa` went down to.
    pub(crate) fn second_level(&mut self, gpa: u64, starts: &[SlStart]) {
        for s in starts {
            let level = s.level + 1;
            let key = SlKey {
                did: self.did,
                level,
                region: gpa >> span_shift(level),
            };
            self.second_level.push(key, *s);
        }
    }

    /// The second-level mapping of the page holding `gpa`.
    pub(crate) fn mapping_of(&mut self, gpa: u64, mapping: SlMapping) {
        let shift = mapping.size.shift() as u8;
        let key = MappingKey {
            did: self.did,
            shift,
            page: gpa >> shift,
        };
        self.mappings.push(key, mapping);
    }

    fn second_level_start(&self, key: &SlKey) -> Option<SlStart> {
        self.second_level.get(key)
    }

    fn mapping(&self, key: &MappingKey) -> Option<SlMapping> {
        self.mappings.get(key)
    }

    fn is_empty(&self) -> bool {
        self.first_level.len + self.second_level.len + self.mappings.len == 0
    }
}

/// Where a nested walk's second-level resolution of a guest physical address starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NestedStart {
    /// A cached mapping allows the access: no walk.
    Mapped(SlMapping),
    /// A walk from this table (`None`: from SLPTPTR).
    Walk(Option<SlStart>),
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

/// The paging-structure caches of one IOMMU and the second-level mappings of nested walks,
/// sharded by domain id: an invalidation locks one shard, and one walk's lookups and fills
/// lock its domain's shard.
#[derive(Debug)]
pub struct PagingStructureCaches {
    shards: Box<[CachePadded<Shard>]>,
    generation: Generation,
}

impl Default for PagingStructureCaches {
    fn default() -> Self {
        PagingStructureCaches {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(Shard::default()))
                .collect(),
            generation: Generation::default(),
        }
    }
}

impl PagingStructureCaches {
    fn shard(&self, did: DomainId) -> &Shard {
        &self.shards[did.0 as usize % SHARDS]
    }

    /// `did`'s shard for lookups; `None` if it is empty.
    fn read(&self, did: DomainId) -> Option<RwLockReadGuard<'_, Tables>> {
        self.shard(did).read()
    }

    /// `did`'s shard for an invalidation: locked, and the generation advanced under the
    /// lock, so that no walk that began before it fills what it removes.
    fn invalidate(&self, did: DomainId) -> ShardWrite<'_> {
        let shard = self.shard(did).write();
        self.generation.advance();
        shard
    }

    /// Starts a walk: what it reads may fill the caches only if no invalidation runs
    /// before the fill.
    pub(crate) fn begin_fill(&self) -> u64 {
        self.generation.0.load(Ordering::Acquire)
    }

    /// The deepest cached first-level table for `input` below a `top`-level root.
    pub(crate) fn first_level_start(&self, tag: FlTag, input: u64, top: u8) -> Option<FlStart> {
        let shard = self.read(tag.did)?;
        (2..=top).find_map(|level| {
            let key = FlKey {
                tag,
                level,
                region: input >> span_shift(level),
            };
            shard.first_level.get(&key).copied()
        })
    }

    /// The deepest second-level table cached, or read so far by the walk of `fills`, for
    /// `gpa` below a `top`-level root.
    pub(crate) fn second_level_start(
        &self,
        fills: &WalkFills,
        gpa: u64,
        top: u8,
    ) -> Option<SlStart> {
        Tables::second_level_start(self.read(fills.did).as_deref(), fills, gpa, top)
    }

    /// Where the nested walk of `fills` resolves `gpa` for `access`: a cached mapping
    /// that allows it, else the deepest cached second-level table; one lock.
    pub(crate) fn nested_start(
        &self,
        fills: &WalkFills,
        gpa: u64,
        access: AccessRequest,
        top: u8,
    ) -> NestedStart {
        let shard = self.read(fills.did);
        let tables = shard.as_deref();
        match Tables::mapping(tables, fills, gpa) {
            Some(m) if m.allows(access) => NestedStart::Mapped(m),
            _ => NestedStart::Walk(Tables::second_level_start(tables, fills, gpa, top)),
        }
    }

    /// The cached second-level mapping of the page holding `gpa`.
    pub fn mapping(&self, did: DomainId, gpa: u64) -> Option<SlMapping> {
        Tables::mapping(self.read(did).as_deref(), &WalkFills::new(did), gpa)
    }

    /// Caches what a walk read (`fills`) unless an invalidation ran since `fill` (a
    /// generation from [`PagingStructureCaches::begin_fill`] taken before the walk read
    /// its first entry): one lock of the domain's shard, none if the walk read nothing
    /// new. Of the first-level and of the second-level tables, only those the deepest
    /// entries the walk read point to are cached (one PDE-cache entry for a walk to a
    /// 4-KiB page): the next miss in the same region starts there all the same, and a miss
    /// elsewhere walks from the top, which any cache may make it do (VT-d §6.2: caching is
    /// optional, and a cache may hold any subset of what was read). The second-level
    /// mappings of a nested walk are all cached. The generation is compared under the lock every invalidation of the shard
    /// advances it under, so a fill either precedes an invalidation (which then removes
    /// it) or sees it and is dropped.
    pub(crate) fn fill(&self, fill: u64, fills: &WalkFills) {
        if fills.is_empty() {
            return;
        }
        let mut shard = self.shard(fills.did).write();
        if self.generation.0.load(Ordering::Acquire) != fill {
            return;
        }
        let tables = &mut *shard;
        let deepest = fills.first_level.iter().map(|(k, _)| k.level).min();
        for &(k, v) in fills.first_level.iter() {
            if Some(k.level) == deepest {
                cache(&mut tables.first_level, TABLE_CAPACITY, k, v);
            }
        }
        let deepest = fills.second_level.iter().map(|(k, _)| k.level).min();
        for &(k, v) in fills.second_level.iter() {
            if Some(k.level) == deepest {
                cache(&mut tables.second_level, TABLE_CAPACITY, k, v);
            }
        }
        for &(k, v) in fills.mappings.iter() {
            cache(&mut tables.mappings, MAPPING_CAPACITY, k, v);
        }
    }

    /// Global IOTLB invalidation (§6.5.2.3): every paging-structure-cache entry and every
    /// cached second-level mapping is removed.
    pub fn invalidate_all(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.write();
            self.generation.advance();
            shard.clear();
        }
    }

    /// Domain-selective IOTLB invalidation (§6.5.2.3): the entries caching first-level,
    /// second-level and nested mappings of `did` are removed, whatever their PASID.
    pub fn invalidate_domain(&self, did: DomainId) {
        let mut shard = self.invalidate(did);
        shard.first_level.retain(|k, _| k.tag.did != did);
        shard.second_level.retain(|k, _| k.did != did);
        shard.mappings.retain(|k, _| k.did != did);
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
        let mut shard = self.invalidate(did);
        shard.first_level.retain(|k, _| k.tag.did != did);
        if !ih {
            let count = CACHED_LEVELS
                .map(|l| blocks(addr, last, span_shift(l)).1)
                .fold(0u64, u64::saturating_add);
            let candidates = || {
                CACHED_LEVELS.flat_map(|level| {
                    let (regions, _) = blocks(addr, last, span_shift(level));
                    regions.map(move |region| SlKey { did, level, region })
                })
            };
            remove(&mut shard.second_level, count, candidates, |k| {
                k.did == did && region_meets(k.region, span_shift(k.level), addr, last)
            });
        }
        let count = PAGE_SHIFTS
            .iter()
            .map(|&s| blocks(addr, last, s as u32).1)
            .fold(0u64, u64::saturating_add);
        let candidates = || {
            PAGE_SHIFTS.iter().flat_map(|&shift| {
                let (pages, _) = blocks(addr, last, shift as u32);
                pages.map(move |page| MappingKey { did, shift, page })
            })
        };
        remove(&mut shard.mappings, count, candidates, |k| {
            k.did == did && region_meets(k.page, k.shift as u32, addr, last)
        });
    }

    /// PASID-selective PASID-based-IOTLB invalidation (§6.5.2.4): the first-level
    /// paging-structure entries (first-level and nested) of `did` and `pasid` are removed.
    /// Second-level paging-structure entries and second-level mappings carry no PASID and
    /// stay.
    pub fn invalidate_pasid(&self, did: DomainId, pasid: Pasid) {
        self.invalidate(did)
            .first_level
            .retain(|k, _| k.tag.did != did || k.tag.pasid != pasid);
    }

    /// Page-selective-within-PASID PASID-based-IOTLB invalidation (§6.5.2.4) of `range`, a
    /// first-level input range: with IH clear, the first-level
    /// paging-structure entries of `did` and `pasid` that map regions meeting the range are
    /// removed (software may have changed non-leaf entries there); with IH set they are kept.
    /// Second-level entries and mappings stay, as for the PASID-selective granularity.
    pub fn invalidate_pasid_range(&self, did: DomainId, pasid: Pasid, range: AddrRange, ih: bool) {
        self.invalidate_pasid_ranges(did, pasid, [(range, ih)].into_iter());
    }

    /// Page-selective-within-PASID PASID-based-IOTLB invalidations of `did` and `pasid`
    /// that arrive together: [`PagingStructureCaches::invalidate_pasid_range`] of each of
    /// `ranges` (each with its IH), under one lock of the domain's shard, and with one
    /// scan for all of them when their candidate keys are not fewer than the entries.
    pub fn invalidate_pasid_ranges(
        &self,
        did: DomainId,
        pasid: Pasid,
        ranges: impl Iterator<Item = (AddrRange, bool)> + Clone,
    ) {
        let ranges = Joined(
            ranges
                .filter(|&(_, ih)| !ih)
                .map(|(range, _)| (range.start, range.last))
                .peekable(),
        );
        if ranges.clone().next().is_none() {
            return;
        }
        let count = ranges
            .clone()
            .map(|(addr, last)| {
                CACHED_LEVELS
                    .map(|l| blocks(addr, last, span_shift(l)).1.saturating_mul(2))
                    .fold(0u64, u64::saturating_add)
            })
            .fold(0u64, u64::saturating_add);
        let mut shard = self.invalidate(did);
        let first_level = &mut shard.first_level;
        // A scan visits every bucket (a group of 16 at a time) and tests every entry; a
        // table that once grew and emptied again is mostly empty buckets.
        let scan = first_level.len() + first_level.capacity() / SCAN_BUCKETS_PER_LOOKUP;
        if count < scan as u64 {
            for (addr, last) in ranges {
                for level in CACHED_LEVELS {
                    for region in blocks(addr, last, span_shift(level)).0 {
                        for nested in [false, true] {
                            let tag = FlTag { did, pasid, nested };
                            first_level.remove(&FlKey { tag, level, region });
                        }
                    }
                }
            }
        } else {
            // The scan tests every entry against the joined ranges: the first few are
            // joined once, ahead of it, and any more as it goes.
            let mut few = [(0, 0); JOINED_KEPT];
            let mut rest = ranges;
            let n = few
                .iter_mut()
                .zip(rest.by_ref())
                .map(|(slot, r)| *slot = r)
                .count();
            let few = &few[..n];
            first_level.retain(|k, _| {
                let meets = |(addr, last)| region_meets(k.region, span_shift(k.level), addr, last);
                let ours = k.tag.did == did && k.tag.pasid == pasid;
                !(ours && (few.iter().copied().any(meets) || rest.clone().any(meets)))
            });
        }
    }

    /// How many entries each cache holds.
    pub fn len(&self) -> CachedTables {
        self.shards.iter().fold(CachedTables::default(), |n, s| {
            let t = s.tables.read().unwrap_or_else(PoisonError::into_inner);
            CachedTables {
                first_level: n.first_level + t.first_level.len(),
                second_level: n.second_level + t.second_level.len(),
                nested_mappings: n.nested_mappings + t.mappings.len(),
            }
        })
    }

    /// Whether every cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == CachedTables::default()
    }
}

/// Buckets of a table a scan visits in the time of one look-up of a key (hashbrown tests
/// 16 control bytes at a time).
const SCAN_BUCKETS_PER_LOOKUP: usize = 64;

/// Joined ranges a scan of the first-level cache takes ahead of it.
const JOINED_KEPT: usize = 16;

/// Ranges `[first, last]` with the neighbours whose smallest cached regions (2 MiB, a PDE's)
/// meet or touch theirs joined into one: an entry at any cached level meets the joined range
/// exactly when it meets one of the ranges joined (their regions at each level meet or touch
/// too, so the union of their regions is the joined range's), so a batch of scattered pages
/// costs what one range does.
#[derive(Clone)]
struct Joined<I: Iterator<Item = (u64, u64)>>(std::iter::Peekable<I>);

impl<I: Iterator<Item = (u64, u64)>> Iterator for Joined<I> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let shift = span_shift(*CACHED_LEVELS.start());
        let (mut first, mut last) = self.0.next()?;
        while let Some(&(f, l)) = self.0.peek() {
            let touch = (f >> shift) <= (last >> shift).saturating_add(1)
                && (first >> shift) <= (l >> shift).saturating_add(1);
            if !touch {
                break;
            }
            (first, last) = (first.min(f), last.max(l));
            self.0.next();
        }
        Some((first, last))
    }
}

/// Whether block `index` of 2^`shift` bytes meets `[first, last]`.
fn region_meets(index: u64, shift: u32, first: u64, last: u64) -> bool {
    (first >> shift) <= index && index <= (last >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsva_vtd::walk::FlRights;

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

    /// Caches `starts` of a first-level walk of `va` with fill token `fill`.
    fn fill_fl_with(c: &PagingStructureCaches, fill: u64, t: FlTag, va: u64, starts: &[FlStart]) {
        let mut fills = WalkFills::new(t.did);
        fills.first_level(t, va, starts);
        c.fill(fill, &fills);
    }

    /// Caches the tables of a 4-level first-level walk of `va` down to its page table, as
    /// three walks that ended one level deeper each would (a walk caches only its deepest).
    fn fill_fl(c: &PagingStructureCaches, t: FlTag, va: u64) {
        for start in [fl(3, 0x3000), fl(2, 0x2000), fl(1, 0x1000)] {
            fill_fl_with(c, c.begin_fill(), t, va, &[start]);
        }
    }

    /// Caches the tables of a 4-level second-level walk of `gpa` down to its page table, as
    /// [`fill_fl`] does.
    fn fill_sl(c: &PagingStructureCaches, did: DomainId, gpa: u64) {
        for start in [sl(3, 0xa000), sl(2, 0xb000), sl(1, 0xc000)] {
            let mut fills = WalkFills::new(did);
            fills.second_level(gpa, &[start]);
            c.fill(c.begin_fill(), &fills);
        }
    }

    fn insert_mapping(c: &PagingStructureCaches, did: DomainId, gpa: u64, m: SlMapping) {
        let mut fills = WalkFills::new(did);
        fills.mapping_of(gpa, m);
        c.fill(c.begin_fill(), &fills);
    }

    /// The deepest cached second-level table of `did` for `gpa` under a 4-level root.
    fn sl_start(c: &PagingStructureCaches, did: DomainId, gpa: u64) -> Option<SlStart> {
        c.second_level_start(&WalkFills::new(did), gpa, 4)
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
        assert_eq!(sl_start(&c, D1, GPA + 0x1000), Some(sl(1, 0xc000)));
        assert_eq!(sl_start(&c, D2, GPA), None);
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
        assert_eq!(sl_start(&c, D1, GPA), Some(sl(1, 0xc000)));
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
        assert_eq!(sl_start(&c, D1, GPA), Some(sl(1, 0xc000)));
        assert_eq!(c.mapping(D1, GPA), None);
        assert_eq!(c.mapping(D1, GPA + 2 * MB), Some(m));
        assert_eq!(c.mapping(D2, GPA), Some(m));
        // IH clear, a page in the next 2 MiB: the SL-PDPE and SL-PML4E entries meet it.
        c.invalidate_domain_range(D1, range(GPA + 2 * MB, 4096), false);
        assert_eq!(sl_start(&c, D1, GPA), Some(sl(1, 0xc000)));
        assert_eq!(sl_start(&c, D1, GPA + 2 * MB), None);
        assert_eq!(c.mapping(D1, GPA + 2 * MB), None);
        c.invalidate_domain_range(D1, range(GPA, 4096), false);
        assert_eq!(sl_start(&c, D1, GPA), None);
        assert_eq!(sl_start(&c, D2, GPA), Some(sl(1, 0xc000)));
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
        let mut fills = WalkFills::new(D1);
        fills.first_level(t, VA, &[fl(1, 0x1000)]);
        fills.second_level(GPA, &[sl(1, 0xc000)]);
        fills.mapping_of(GPA, mapping(0, PageSize::Size4K, true, true));
        c.fill(fill, &fills);
        assert!(c.is_empty());
        // An invalidation with nothing to remove (IH set) does not hold fills back.
        let fill = c.begin_fill();
        c.invalidate_pasid_range(D1, pasid(1), range(VA, 4096), true);
        fill_fl_with(&c, fill, t, VA, &[fl(1, 0x1000)]);
        assert_eq!(c.first_level_start(t, VA, 4), Some(fl(1, 0x1000)));
    }

    /// A nested walk's later resolutions find what its earlier ones read, before it is
    /// cached; the caches take it only at the walk's end, under its fill token.
    #[test]
    fn a_walk_finds_what_it_read_before_its_fill() {
        let c = PagingStructureCaches::default();
        let m = mapping(0x10_0000, PageSize::Size4K, true, true);
        let mut fills = WalkFills::new(D1);
        fills.second_level(GPA, &[sl(3, 0xa000), sl(2, 0xb000), sl(1, 0xc000)]);
        fills.mapping_of(GPA, m);
        let read = AccessRequest::READ;
        assert_eq!(c.nested_start(&fills, GPA, read, 4), NestedStart::Mapped(m));
        assert_eq!(
            c.nested_start(&fills, GPA + 0x1000, read, 4),
            NestedStart::Walk(Some(sl(1, 0xc000)))
        );
        assert_eq!(
            c.nested_start(&fills, GPA + 2 * MB, read, 4),
            NestedStart::Walk(Some(sl(2, 0xb000)))
        );
        assert_eq!(
            c.nested_start(&WalkFills::new(D1), GPA, read, 4),
            NestedStart::Walk(None)
        );
        assert!(c.is_empty());
        let fill = c.begin_fill();
        c.invalidate_domain(D2);
        c.fill(fill, &fills);
        assert!(c.is_empty(), "an invalidation overtook the walk");
        c.fill(c.begin_fill(), &fills);
        assert_eq!(c.mapping(D1, GPA), Some(m));
        assert_eq!(sl_start(&c, D1, GPA), Some(sl(1, 0xc000)));
        // A cached entry the walk did not read is found too: the deepest of both wins.
        let mut other = WalkFills::new(D1);
        other.second_level(GPA, &[sl(3, 0xd000)]);
        assert_eq!(
            c.nested_start(&other, GPA + 0x1000, read, 4),
            NestedStart::Walk(Some(sl(1, 0xc000)))
        );
    }

    /// Of the tables a walk went down to, only those its deepest entries point to are
    /// cached: the next walk in the region starts there, one elsewhere from the top.
    #[test]
    fn a_walk_caches_only_its_deepest_tables() {
        let c = PagingStructureCaches::default();
        let t = tag(D1, 1, false);
        fill_fl_with(
            &c,
            c.begin_fill(),
            t,
            VA,
            &[fl(3, 0x3000), fl(2, 0x2000), fl(1, 0x1000)],
        );
        assert_eq!(c.first_level_start(t, VA + 0x1000, 4), Some(fl(1, 0x1000)));
        assert_eq!(c.first_level_start(t, VA + 2 * MB, 4), None);
        // A nested walk's resolutions in two 1-GiB regions: both of their PDE-cache entries.
        let mut fills = WalkFills::new(D1);
        fills.second_level(GPA, &[sl(3, 0xa000), sl(2, 0xb000), sl(1, 0xc000)]);
        fills.second_level(GPA + (1 << 30), &[sl(2, 0xd000), sl(1, 0xe000)]);
        c.fill(c.begin_fill(), &fills);
        assert_eq!(sl_start(&c, D1, GPA), Some(sl(1, 0xc000)));
        assert_eq!(sl_start(&c, D1, GPA + (1 << 30)), Some(sl(1, 0xe000)));
        assert_eq!(sl_start(&c, D1, GPA + 2 * MB), None);
        assert_eq!(
            c.len(),
            CachedTables {
                first_level: 1,
                second_level: 2,
                nested_mappings: 0
            }
        );
    }

    /// A walk keeps at most a fixed number of entries to cache; the rest are not cached.
    #[test]
    fn a_walk_caches_a_bounded_subset_of_what_it_read() {
        let c = PagingStructureCaches::default();
        let mut fills = WalkFills::new(D1);
        for i in 0..PENDING_TABLES as u64 + 4 {
            fills.second_level(i << 30, &[sl(2, 0xb000 + (i << 12))]);
        }
        c.fill(c.begin_fill(), &fills);
        assert_eq!(c.len().second_level, PENDING_TABLES);
        assert_eq!(sl_start(&c, D1, 0), Some(sl(2, 0xb000)));
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

    /// Where the batch test caches walks: 2-MiB regions around `VA`, and two far ones.
    fn batch_vas() -> Vec<u64> {
        let mut vas: Vec<u64> = (0..16).map(|i| VA + i * 2 * MB).collect();
        vas.extend([VA + (1 << 30), VA + (1 << 39)]);
        vas
    }

    proptest::proptest! {
        /// A batch of page-selective PASID-based invalidations (ranges joined when their
        /// 2-MiB regions meet or touch) leaves exactly what the same invalidations one at
        /// a time leave.
        #[test]
        fn a_batch_of_pasid_ranges_removes_what_each_range_does(
            ranges in proptest::collection::vec((0u64..8192, 1u64..600, proptest::bool::ANY), 1..40)
        ) {
            let (batch, single) = (PagingStructureCaches::default(), PagingStructureCaches::default());
            let tags = [tag(D1, 1, true), tag(D1, 1, false), tag(D1, 2, true)];
            for c in [&batch, &single] {
                for &va in &batch_vas() {
                    tags.iter().for_each(|&t| fill_fl(c, t, va));
                }
            }
            let ranges: Vec<_> = ranges
                .iter()
                .map(|&(page, pages, ih)| (range(VA + page * 4096, pages * 4096), ih))
                .collect();
            batch.invalidate_pasid_ranges(D1, pasid(1), ranges.iter().copied());
            for &(r, ih) in &ranges {
                single.invalidate_pasid_range(D1, pasid(1), r, ih);
            }
            proptest::prop_assert_eq!(batch.len(), single.len());
            for &va in &batch_vas() {
                for t in tags {
                    for probe in [va, va + MB, va + (1 << 30)] {
                        proptest::prop_assert_eq!(
                            batch.first_level_start(t, probe, 4),
                            single.first_level_start(t, probe, 4)
                        );
                    }
                }
            }
        }
    }
}
