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
//!   the second level's rights, for the pages of first-level tables (a walk looks its output up there too).
//!
//! Entries carry the spec's tags only, so requesters with the same domain id (and PASID)
//! share them, as on hardware. Like hardware (and like the IOTLB), each cache is a
//! set-associative table of fixed size, sharded by domain id: an entry lives in one of the
//! ways of the set its tag and region select, and a fill into a full set replaces one (a
//! cache may hold any subset of what was read, §6.2). A lookup is one probe per level (or
//! page size) and takes no lock: each set has a sequence word, odd while a writer is inside,
//! which a lookup reads before and after the ways; a lookup that meets a writer misses.
//! Writers (fills and invalidations) take their shard's writer lock, once per walk's fills
//! and once per invalidation, and an invalidation visits only the sets its shard marks as
//! occupied, or probes the sets of the few keys a small range names. Lookups, fills and
//! invalidations do not allocate.
//!
//! ## Fills against invalidations
//!
//! A walk keeps what it reads in a `WalkFills` and caches it when it ends, under the fill
//! token it took before it read its first entry (`PagingStructureCaches::begin_fill`).
//! Every invalidation advances the generation under the writer lock of the shard it
//! changes, and a fill compares its token with the generation under the writer lock of the
//! shard it fills. So a fill either runs wholly before an invalidation of its shard (which
//! then finds and removes what it cached) or sees the generation advanced and caches
//! nothing: an invalidation that completed is never undone by a walk that read the tables
//! before it (§6.5.2: completion covers the walks in flight). The loom model at the end of
//! this file races a walk's fill with an invalidation and lookups, and fails without the
//! token's check.

use std::fmt;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut, RangeInclusive};

use crossbeam_utils::CachePadded;
use vsva_vtd::{
    addr::DomainId, addr::Pasid, inv_desc::AddrRange, walk::AccessRequest, walk::FlRights,
    walk::FlStart, walk::PageSize, walk::Permissions, walk::SlStart, walk::Translation,
};

use super::seqset::{SeqSet, WAYS};
use super::PAGE_SHIFTS;
use crate::sync::{AtomicU64, Ordering, WriterGuard, WriterLock};

/// Shards per cache: domain ids spread over them.
const SHARDS: usize = 16;
/// Sets per shard of each paging-structure cache (a power of two).
const TABLE_SETS: usize = 32;
/// Sets per shard of the second-level mappings (a power of two).
const MAPPING_SETS: usize = 256;
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlKey {
    tag: FlTag,
    /// The level of the cached entry (2 = PDE).
    level: u8,
    /// The input address shifted right by the region the entry maps.
    region: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlKey {
    did: DomainId,
    level: u8,
    region: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MappingKey {
    did: DomainId,
    shift: u8,
    page: u64,
}

// A way's tag word: the key's tag fields (domain id, PASID, nested, level or page size) and
// a valid bit, which a lookup compares, and the entry's rights above them, which it returns.
/// A way holds an entry (a tag of 0 is an empty way).
const TAG_VALID: u64 = 1 << 63;
const TAG_PASID_SHIFT: u32 = 16;
const TAG_NESTED: u64 = 1 << 36;
const TAG_LEVEL_SHIFT: u32 = 37;
/// Where the rights of an entry begin: the bits below (and [`TAG_VALID`]) are its key.
const TAG_DATA_SHIFT: u32 = 42;
const TAG_KEY: u64 = TAG_VALID | ((1 << TAG_DATA_SHIFT) - 1);
const TAG_DID: u64 = 0xffff;
const TAG_PASID: u64 = ((1 << 20) - 1) << TAG_PASID_SHIFT;

/// What a lookup compares with a way: the key bits of its tag word, and its region (or
/// page) word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Probe {
    tag: u64,
    key: u64,
}

fn did_tag(did: DomainId) -> u64 {
    TAG_VALID | u64::from(did.0)
}

fn level_tag(level: u8) -> u64 {
    u64::from(level) << TAG_LEVEL_SHIFT
}

impl FlKey {
    fn probe(&self) -> Probe {
        let t = self.tag;
        let pasid = u64::from(t.pasid.raw()) << TAG_PASID_SHIFT;
        let nested = if t.nested { TAG_NESTED } else { 0 };
        Probe {
            tag: did_tag(t.did) | pasid | nested | level_tag(self.level),
            key: self.region,
        }
    }
}

impl SlKey {
    fn probe(&self) -> Probe {
        Probe {
            tag: did_tag(self.did) | level_tag(self.level),
            key: self.region,
        }
    }
}

impl MappingKey {
    fn probe(&self) -> Probe {
        Probe {
            tag: did_tag(self.did) | level_tag(self.shift),
            key: self.page,
        }
    }
}

/// The rights of first-level entries, packed for a tag word.
fn fl_rights_bits(r: FlRights) -> u64 {
    u64::from(r.user) | u64::from(r.writable) << 1 | u64::from(r.execute_disable) << 2
}

fn fl_rights(bits: u64) -> FlRights {
    FlRights {
        user: bits & 1 != 0,
        writable: bits & 2 != 0,
        execute_disable: bits & 4 != 0,
    }
}

/// Second-level rights, packed for a tag word.
fn perms_bits(p: Permissions) -> u64 {
    u64::from(p.read) | u64::from(p.write) << 1 | u64::from(p.execute) << 2 | u64::from(p.user) << 3
}

fn perms(bits: u64) -> Permissions {
    Permissions {
        read: bits & 1 != 0,
        write: bits & 2 != 0,
        execute: bits & 4 != 0,
        user: bits & 8 != 0,
    }
}

/// The D bit of a cached second-level mapping, above its rights.
const MAPPING_DIRTY: u64 = 1 << 4;

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
/// after it (see the module documentation). Advanced under the writer lock of the shard an
/// invalidation changes; a fill compares it under the writer lock of the shard it fills.
#[derive(Debug, Default)]
struct Generation(AtomicU64);

impl Generation {
    fn advance(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// A paging-structure-cache set: a way's tag word holds the tag and rights, its key word
/// the region or page, its value word the table or output address.
type Set = SeqSet;

/// What the paging-structure caches read and fill in a set.
trait TableSet {
    fn find(&self, probe: Probe) -> Option<(u64, u64)>;
    fn tag(&self, way: usize) -> u64;
    fn slot(&self, probe: Probe) -> (usize, bool);
}

impl TableSet for Set {
    /// The tag and value words of the way holding `probe`, read without a lock. `None` if
    /// no way holds it, or if a writer was inside (a cache may miss at any time).
    #[inline]
    fn find(&self, probe: Probe) -> Option<(u64, u64)> {
        let (found, unchanged) = self.read(|ways| {
            ways.iter().find_map(|w| {
                let tag = w.tag.load(Ordering::Relaxed);
                (tag & TAG_KEY == probe.tag && w.key.load(Ordering::Relaxed) == probe.key)
                    .then(|| (tag, w.value.load(Ordering::Relaxed)))
            })
        });
        found.filter(|_| unchanged)
    }

    /// The way's tag word; for writers, whose lock keeps the ways from changing.
    fn tag(&self, way: usize) -> u64 {
        self.ways[way].tag.load(Ordering::Relaxed)
    }

    /// The way a writer puts `probe` in: the way holding it, else an empty way, else the
    /// next victim; and whether that way was empty.
    fn slot(&self, probe: Probe) -> (usize, bool) {
        let holds = |i: usize| {
            self.tag(i) & TAG_KEY == probe.tag
                && self.ways[i].key.load(Ordering::Relaxed) == probe.key
        };
        if let Some(i) = (0..WAYS).find(|&i| holds(i)) {
            return (i, false);
        }
        if let Some(i) = (0..WAYS).find(|&i| self.tag(i) == 0) {
            return (i, true);
        }
        (self.next_victim(), false)
    }
}

/// One cache of one shard: its sets.
#[derive(Debug)]
struct Table {
    sets: Box<[Set]>,
}

impl Table {
    /// A table of `sets` sets (a power of two).
    fn new(sets: usize) -> Self {
        debug_assert!(sets.is_power_of_two());
        Table {
            sets: (0..sets).map(|_| Set::default()).collect(),
        }
    }

    /// The set `probe` lives in: index bits from its region, mixed with its tag so that
    /// neighbouring regions and different levels spread over the sets.
    #[inline]
    fn set_of(&self, probe: Probe) -> usize {
        let mixed = (probe.key ^ probe.tag.rotate_left(23)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (mixed >> 32) as usize & (self.sets.len() - 1)
    }

    /// The tag and value words cached for `probe`, without a lock.
    #[inline]
    fn find(&self, probe: Probe) -> Option<(u64, u64)> {
        self.sets[self.set_of(probe)].find(probe)
    }
}

/// What a shard's writer lock guards: for each cache, the sets that may hold an entry (a
/// bit per set, set by a fill and cleared by an invalidation that empties the set), how
/// many entries it holds, and how many of each level (or page size) with a bit per level
/// held, so that a lookup probes only the levels a cache holds.
#[derive(Debug)]
struct Occupied {
    sets: Box<[u64]>,
    entries: usize,
    /// Entries by the level field of their tag (a level, or a mapping's page shift).
    by_level: [u32; LEVEL_FIELDS],
    /// Bit `l` set when `by_level[l]` is not 0.
    levels: u32,
}

/// Values of a tag's level field: the bits from [`TAG_LEVEL_SHIFT`] to [`TAG_DATA_SHIFT`].
const LEVEL_FIELDS: usize = 1 << (TAG_DATA_SHIFT - TAG_LEVEL_SHIFT);
const _: () = assert!(LEVEL_FIELDS <= 32);

/// The level field (a level, or a mapping's page shift) of a way's tag word.
fn tag_level(tag: u64) -> usize {
    (tag >> TAG_LEVEL_SHIFT) as usize & (LEVEL_FIELDS - 1)
}

impl Occupied {
    fn new(sets: usize) -> Self {
        Occupied {
            sets: vec![0; sets.div_ceil(64)].into_boxed_slice(),
            entries: 0,
            by_level: [0; LEVEL_FIELDS],
            levels: 0,
        }
    }

    /// One more entry at level field `level`.
    fn add(&mut self, level: usize) {
        self.by_level[level] += 1;
        self.levels |= 1 << level;
    }

    /// One entry fewer at level field `level`.
    fn sub(&mut self, level: usize) {
        self.by_level[level] -= 1;
        if self.by_level[level] == 0 {
            self.levels &= !(1 << level);
        }
    }
}

/// One cache of one shard under the shard's writer lock.
struct Writer<'a> {
    table: &'a Table,
    occupied: &'a mut Occupied,
}

impl Writer<'_> {
    /// Caches `value` for `probe`, with `data` (rights, shifted into place) in its tag.
    #[inline]
    fn insert(&mut self, probe: Probe, data: u64, value: u64) {
        let at = self.table.set_of(probe);
        let set = &self.table.sets[at];
        let (way, empty) = set.slot(probe);
        if !empty {
            self.occupied.sub(tag_level(set.tag(way)));
        }
        self.occupied.add(tag_level(probe.tag));
        set.write(|ways| {
            let w = &ways[way];
            w.tag
                .store(probe.tag | data << TAG_DATA_SHIFT, Ordering::Relaxed);
            w.key.store(probe.key, Ordering::Relaxed);
            w.value.store(value, Ordering::Relaxed);
        });
        self.occupied.entries += usize::from(empty);
        self.occupied.sets[at / 64] |= 1 << (at % 64);
    }

    /// Empties the ways of set `at` whose tag and key words `select` accepts, and unmarks
    /// the set if it is left empty. A set with nothing to remove is not written.
    fn remove_in(&mut self, at: usize, select: &impl Fn(u64, u64) -> bool) {
        let set = &self.table.sets[at];
        let chosen = |i: usize| {
            let tag = set.tag(i);
            tag != 0 && select(tag, set.ways[i].key.load(Ordering::Relaxed))
        };
        let mut mask = 0u32;
        for i in 0..WAYS {
            mask |= u32::from(chosen(i)) << i;
        }
        if mask != 0 {
            for i in 0..WAYS {
                if mask & (1 << i) != 0 {
                    self.occupied.sub(tag_level(set.tag(i)));
                }
            }
            set.write(|ways| {
                for (i, w) in ways.iter().enumerate() {
                    if mask & (1 << i) != 0 {
                        w.tag.store(0, Ordering::Relaxed);
                    }
                }
            });
            self.occupied.entries -= mask.count_ones() as usize;
        }
        if (0..WAYS).all(|i| set.tag(i) == 0) {
            self.occupied.sets[at / 64] &= !(1 << (at % 64));
        }
    }

    /// Removes the entries `select` accepts, visiting every set marked occupied.
    fn remove_where(&mut self, select: impl Fn(u64, u64) -> bool) {
        if self.occupied.entries == 0 {
            return;
        }
        for word in 0..self.occupied.sets.len() {
            let mut rest = self.occupied.sets[word];
            while rest != 0 {
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                self.remove_in(word * 64 + bit, &select);
            }
        }
    }

    /// Removes the entry of each of `probes`, visiting their sets only.
    fn remove_each(&mut self, probes: impl Iterator<Item = Probe>) {
        for p in probes {
            if self.occupied.entries == 0 {
                return;
            }
            let at = self.table.set_of(p);
            self.remove_in(at, &|tag, key| tag & TAG_KEY == p.tag && key == p.key);
        }
    }

    /// Removes the entries `select` accepts: those of the `count` candidate probes one by
    /// one when they are fewer than the entries, else by visiting the occupied sets.
    fn remove<I: Iterator<Item = Probe>>(
        &mut self,
        count: u64,
        candidates: impl FnOnce() -> I,
        select: impl Fn(u64, u64) -> bool,
    ) {
        if count < self.occupied.entries as u64 {
            self.remove_each(candidates());
        } else {
            self.remove_where(select);
        }
    }

    /// Removes every entry.
    fn clear(&mut self) {
        self.remove_where(|_, _| true);
    }
}

/// The writer state of one shard: what each of its caches holds.
#[derive(Debug)]
struct Marks {
    first_level: Occupied,
    second_level: Occupied,
    mappings: Occupied,
}

impl Marks {
    /// The levels the three caches hold, as [`Shard::held`] publishes them.
    fn held(&self) -> u64 {
        u64::from(self.first_level.levels)
            | u64::from(self.second_level.levels) << HELD_SECOND_LEVEL
            | u64::from(self.mappings.levels) << HELD_MAPPINGS
    }
}

/// Where [`Shard::held`] keeps the second-level cache's levels (bits 0-31 hold the
/// first-level cache's, which are below 8).
const HELD_SECOND_LEVEL: u32 = 8;
/// Where [`Shard::held`] keeps the page shifts of the cached mappings.
const HELD_MAPPINGS: u32 = 32;
const _: () = assert!(*CACHED_LEVELS.end() < HELD_SECOND_LEVEL as u8);
const _: () = assert!(HELD_SECOND_LEVEL + (*CACHED_LEVELS.end() as u32) < HELD_MAPPINGS);

/// One shard: the three caches for its domains, their writer lock, and which levels (page
/// sizes for the mappings) they hold, readable without the lock so that a lookup in an
/// empty shard (every lookup of a cold walk after a global or domain-selective
/// invalidation) probes no set, and a lookup in one that holds some probes only the levels
/// held (a nested walk's second-level mappings are of one size, its first-level entries of
/// one level). A cache may miss at any time, so a lookup that reads a summary older than
/// another thread's fill and misses is correct; the summary is written under the writer
/// lock at the end of every change ([`ShardWrite`]).
#[derive(Debug)]
struct Shard {
    writer: WriterLock<Marks>,
    /// [`Marks::held`]: 0 when the shard is empty.
    held: AtomicU64,
    first_level: Table,
    second_level: Table,
    mappings: Table,
}

/// A shard under its writer lock; the entry count is published when it goes.
struct ShardWrite<'a> {
    shard: &'a Shard,
    marks: WriterGuard<'a, Marks>,
}

impl Deref for ShardWrite<'_> {
    type Target = Marks;

    fn deref(&self) -> &Marks {
        &self.marks
    }
}

impl DerefMut for ShardWrite<'_> {
    fn deref_mut(&mut self) -> &mut Marks {
        &mut self.marks
    }
}

impl Drop for ShardWrite<'_> {
    /// Runs before the guard field is dropped: the summary is written under the lock.
    fn drop(&mut self) {
        let held = self.marks.held();
        self.shard.held.store(held, Ordering::Release);
    }
}

impl ShardWrite<'_> {
    fn first_level(&mut self) -> Writer<'_> {
        Writer {
            table: &self.shard.first_level,
            occupied: &mut self.marks.first_level,
        }
    }

    fn second_level(&mut self) -> Writer<'_> {
        Writer {
            table: &self.shard.second_level,
            occupied: &mut self.marks.second_level,
        }
    }

    fn mappings(&mut self) -> Writer<'_> {
        Writer {
            table: &self.shard.mappings,
            occupied: &mut self.marks.mappings,
        }
    }

    /// Removes every entry of the three caches.
    fn clear(&mut self) {
        self.first_level().clear();
        self.second_level().clear();
        self.mappings().clear();
    }
}

impl Shard {
    fn new(table_sets: usize, mapping_sets: usize) -> Self {
        Shard {
            writer: WriterLock::new(Marks {
                first_level: Occupied::new(table_sets),
                second_level: Occupied::new(table_sets),
                mappings: Occupied::new(mapping_sets),
            }),
            held: AtomicU64::new(0),
            first_level: Table::new(table_sets),
            second_level: Table::new(table_sets),
            mappings: Table::new(mapping_sets),
        }
    }

    /// Whether a lookup may find anything (see [`Shard`]).
    #[inline]
    fn may_hold(&self) -> bool {
        self.held.load(Ordering::Acquire) != 0
    }

    /// Whether the cache whose levels [`Shard::held`] keeps from bit `at` may hold an entry
    /// of level field `level` (see [`Shard`]).
    #[inline]
    fn may_hold_level(&self, at: u32, level: u8) -> bool {
        self.held.load(Ordering::Relaxed) >> (at + u32::from(level)) & 1 != 0
    }

    fn write(&self) -> ShardWrite<'_> {
        ShardWrite {
            shard: self,
            marks: self.writer.lock(),
        }
    }

    /// The deepest second-level table cached for `gpa` at a level below `below`.
    fn second_level_start(&self, did: DomainId, gpa: u64, below: u8) -> Option<SlStart> {
        (2..below).find_map(|level| {
            if !self.may_hold_level(HELD_SECOND_LEVEL, level) {
                return None;
            }
            let probe = SlKey {
                did,
                level,
                region: gpa >> span_shift(level),
            }
            .probe();
            let (tag, table) = self.second_level.find(probe)?;
            Some(SlStart {
                level: level - 1,
                table,
                rights: perms(tag >> TAG_DATA_SHIFT),
            })
        })
    }

    /// The cached second-level mapping of the page holding `gpa`.
    fn mapping(&self, did: DomainId, gpa: u64) -> Option<SlMapping> {
        PAGE_SHIFTS.into_iter().find_map(|shift| {
            if !self.may_hold_level(HELD_MAPPINGS, shift) {
                return None;
            }
            let probe = MappingKey {
                did,
                shift,
                page: gpa >> shift,
            }
            .probe();
            let (tag, output) = self.mappings.find(probe)?;
            let data = tag >> TAG_DATA_SHIFT;
            Some(SlMapping {
                output,
                size: PageSize::ALL
                    .into_iter()
                    .find(|s| s.shift() == u32::from(shift))?,
                perms: perms(data),
                dirty: data & MAPPING_DIRTY != 0,
            })
        })
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

    /// Keeps `(key, value)` if there is room; returns whether it was kept.
    pub(crate) fn push(&mut self, key: K, value: V) -> bool {
        let Some(slot) = self.entries.get_mut(self.len) else {
            return false;
        };
        slot.write((key, value));
        self.len += 1;
        true
    }

    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = &(K, V)> {
        self.entries[..self.len].iter().map(|slot| {
            // SAFETY: `push` writes a slot before it counts it in `len`, and slots are
            // never un-written, so each of the first `len` is initialised.
            unsafe { slot.assume_init_ref() }
        })
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
    /// The lowest level of the keys in `second_level`: those the fill caches.
    second_level_deepest: u8,
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
            second_level_deepest: u8::MAX,
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
    #[cfg(test)]
    fn second_level(&mut self, gpa: u64, starts: &[SlStart]) {
        for s in starts {
            self.second_level_table(gpa, *s);
        }
    }

    /// A second-level table a walk of `gpa` went down to.
    pub(crate) fn second_level_table(&mut self, gpa: u64, start: SlStart) {
        let level = start.level + 1;
        let key = SlKey {
            did: self.did,
            level,
            region: gpa >> span_shift(level),
        };
        if self.second_level.push(key, start) {
            self.second_level_deepest = self.second_level_deepest.min(level);
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

    /// The deepest second-level table the walk read for `gpa` below a `top`-level root:
    /// searched from the last read, which is the deepest of its resolution, so that a PDE
    /// (the deepest level cached) in the region ends the search.
    fn second_level_start(&self, gpa: u64, top: u8) -> Option<SlStart> {
        let mut best: Option<&(SlKey, SlStart)> = None;
        for read in self.second_level.iter().rev() {
            let k = &read.0;
            let deeper = best.is_none_or(|(b, _)| k.level < b.level);
            if deeper && k.level <= top && k.region == gpa >> span_shift(k.level) {
                best = Some(read);
                if k.level == *CACHED_LEVELS.start() {
                    break;
                }
            }
        }
        best.map(|&(_, s)| s)
    }

    /// The second-level mapping the walk read of the page holding `gpa`.
    fn mapping(&self, gpa: u64) -> Option<SlMapping> {
        self.mappings
            .iter()
            .find(|(k, _)| k.page == gpa >> k.shift)
            .map(|&(_, m)| m)
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
/// sharded by domain id: lookups take no lock, and an invalidation or one walk's fills lock
/// one shard's writers.
#[derive(Debug)]
pub struct PagingStructureCaches {
    shards: Box<[CachePadded<Shard>]>,
    generation: Generation,
}

impl Default for PagingStructureCaches {
    fn default() -> Self {
        PagingStructureCaches::with_sets(SHARDS, TABLE_SETS, MAPPING_SETS)
    }
}

impl PagingStructureCaches {
    /// Caches of `shards` shards, each with `table_sets` sets per paging-structure cache and
    /// `mapping_sets` for the second-level mappings (powers of two).
    fn with_sets(shards: usize, table_sets: usize, mapping_sets: usize) -> Self {
        debug_assert!(shards.is_power_of_two());
        PagingStructureCaches {
            shards: (0..shards)
                .map(|_| CachePadded::new(Shard::new(table_sets, mapping_sets)))
                .collect(),
            generation: Generation::default(),
        }
    }

    /// `did`'s shard: a mask, as the number of shards is a power of two (a division cost
    /// more than the rest of a lookup in an empty shard).
    #[inline]
    fn shard(&self, did: DomainId) -> &Shard {
        &self.shards[did.0 as usize & (self.shards.len() - 1)]
    }

    /// `did`'s shard, `None` if it holds nothing.
    #[inline]
    fn read(&self, did: DomainId) -> Option<&Shard> {
        let shard = self.shard(did);
        shard.may_hold().then_some(shard)
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
            if !shard.may_hold_level(0, level) {
                return None;
            }
            let key = FlKey {
                tag,
                level,
                region: input >> span_shift(level),
            };
            let (bits, table) = shard.first_level.find(key.probe())?;
            Some(FlStart {
                level: level - 1,
                table,
                rights: fl_rights(bits >> TAG_DATA_SHIFT),
            })
        })
    }

    /// The deepest second-level table cached in `shard` (the walk's domain's, if it may
    /// hold any), or read so far by the walk of `fills`, for `gpa` below a `top`-level
    /// root: the walk's own first, then one probe of the cache per level below it.
    #[inline(always)]
    fn second_level_start_in(
        shard: Option<&Shard>,
        fills: &WalkFills,
        gpa: u64,
        top: u8,
    ) -> Option<SlStart> {
        let read = fills.second_level_start(gpa, top);
        let below = read.map_or(top + 1, |s| s.level + 1);
        shard
            .and_then(|shard| shard.second_level_start(fills.did, gpa, below))
            .or(read)
    }

    /// The deepest second-level table cached for `gpa` below a `top`-level root of
    /// `did`'s tables, for a walk that reads no other second-level tables (PGTT=010b):
    /// one probe of the cache per level.
    pub(crate) fn second_level_table(&self, did: DomainId, gpa: u64, top: u8) -> Option<SlStart> {
        self.read(did)?.second_level_start(did, gpa, top + 1)
    }

    /// Where the nested walk of `fills` resolves `gpa` for `access`: a mapping it read or
    /// the cache holds that allows it, else the deepest second-level table.
    #[inline(always)]
    pub(crate) fn nested_start(
        &self,
        fills: &WalkFills,
        gpa: u64,
        access: AccessRequest,
        top: u8,
    ) -> NestedStart {
        let shard = self.read(fills.did);
        let mapped = fills
            .mapping(gpa)
            .or_else(|| shard?.mapping(fills.did, gpa));
        match mapped {
            Some(m) if m.allows(access) => NestedStart::Mapped(m),
            _ => NestedStart::Walk(Self::second_level_start_in(shard, fills, gpa, top)),
        }
    }

    /// The cached second-level mapping of the page holding `gpa`.
    pub fn mapping(&self, did: DomainId, gpa: u64) -> Option<SlMapping> {
        self.read(did)?.mapping(did, gpa)
    }

    /// Caches what a walk read (`fills`) unless an invalidation ran since `fill` (a
    /// generation from [`PagingStructureCaches::begin_fill`] taken before the walk read
    /// its first entry): one lock of the domain's shard, none if the walk read nothing
    /// new. Of the first-level and of the second-level tables, only those the deepest
    /// entries the walk read point to are cached (one PDE-cache entry for a walk to a
    /// 4-KiB page): the next miss in the same region starts there all the same, and a miss
    /// elsewhere walks from the top, which any cache may make it do (VT-d §6.2: caching is
    /// optional, and a cache may hold any subset of what was read). The second-level
    /// mappings a nested walk read for its first-level tables are all cached; that of its
    /// output is not kept (the IOTLB entry holds the translation through it). The generation is compared under the
    /// writer lock every invalidation of the shard advances it under (see the module
    /// documentation).
    pub(crate) fn fill(&self, fill: u64, fills: &WalkFills) {
        if fills.is_empty() {
            return;
        }
        let Some(mut shard) = self.write_unless_invalidated(fills.did, fill) else {
            return;
        };
        let deepest = fills.first_level.iter().map(|(k, _)| k.level).min();
        let mut first_level = shard.first_level();
        for (k, v) in fills.first_level.iter() {
            if Some(k.level) == deepest {
                first_level.insert(k.probe(), fl_rights_bits(v.rights), v.table);
            }
        }
        let deepest = fills.second_level_deepest;
        let mut second_level = shard.second_level();
        for (k, v) in fills.second_level.iter() {
            if k.level == deepest {
                second_level.insert(k.probe(), perms_bits(v.rights), v.table);
            }
        }
        let mut mappings = shard.mappings();
        for (k, m) in fills.mappings.iter() {
            let dirty = if m.dirty { MAPPING_DIRTY } else { 0 };
            mappings.insert(k.probe(), perms_bits(m.perms) | dirty, m.output);
        }
    }

    /// The one table a walk of `did`'s second-level tables (PGTT=010b) for `gpa` went down
    /// to last, `start`, cached as [`PagingStructureCaches::fill`] caches a walk's deepest
    /// second-level table, unless an invalidation ran since `fill`; without the pending
    /// fills a nested walk keeps for its own later lookups, which such a walk has none of.
    pub(crate) fn fill_second_level(&self, fill: u64, did: DomainId, gpa: u64, start: SlStart) {
        let Some(mut shard) = self.write_unless_invalidated(did, fill) else {
            return;
        };
        let level = start.level + 1;
        let key = SlKey {
            did,
            level,
            region: gpa >> span_shift(level),
        };
        shard
            .second_level()
            .insert(key.probe(), perms_bits(start.rights), start.table);
    }

    /// `did`'s shard under its writer lock, `None` if an invalidation advanced the
    /// generation since `fill` (compared under the lock every invalidation of the shard
    /// advances it under: see the module documentation).
    fn write_unless_invalidated(&self, did: DomainId, fill: u64) -> Option<ShardWrite<'_>> {
        let shard = self.shard(did).write();
        (self.generation.0.load(Ordering::Acquire) == fill).then_some(shard)
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
        let ours = |tag: u64, _| tag & TAG_DID == u64::from(did.0);
        shard.first_level().remove_where(ours);
        shard.second_level().remove_where(ours);
        shard.mappings().remove_where(ours);
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
        let ours = move |tag: u64| tag & TAG_DID == u64::from(did.0);
        let level_of = |tag: u64| ((tag & TAG_KEY) >> TAG_LEVEL_SHIFT) as u8;
        let mut shard = self.invalidate(did);
        shard.first_level().remove_where(|tag, _| ours(tag));
        if !ih {
            let count = CACHED_LEVELS
                .map(|l| blocks(addr, last, span_shift(l)).1)
                .fold(0u64, u64::saturating_add);
            let candidates = || {
                CACHED_LEVELS.flat_map(move |level| {
                    let (regions, _) = blocks(addr, last, span_shift(level));
                    regions.map(move |region| SlKey { did, level, region }.probe())
                })
            };
            shard
                .second_level()
                .remove(count, candidates, |tag, region| {
                    ours(tag) && region_meets(region, span_shift(level_of(tag)), addr, last)
                });
        }
        let count = PAGE_SHIFTS
            .iter()
            .map(|&s| blocks(addr, last, s as u32).1)
            .fold(0u64, u64::saturating_add);
        let candidates = || {
            PAGE_SHIFTS.iter().flat_map(move |&shift| {
                let (pages, _) = blocks(addr, last, shift as u32);
                pages.map(move |page| MappingKey { did, shift, page }.probe())
            })
        };
        shard.mappings().remove(count, candidates, |tag, page| {
            ours(tag) && region_meets(page, u32::from(level_of(tag)), addr, last)
        });
    }

    /// PASID-selective PASID-based-IOTLB invalidation (§6.5.2.4): the first-level
    /// paging-structure entries (first-level and nested) of `did` and `pasid` are removed.
    /// Second-level paging-structure entries and second-level mappings carry no PASID and
    /// stay.
    pub fn invalidate_pasid(&self, did: DomainId, pasid: Pasid) {
        let owner = fl_owner(did, pasid);
        self.invalidate(did)
            .first_level()
            .remove_where(|tag, _| tag & (TAG_DID | TAG_PASID) == owner);
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
    /// visit of the occupied sets for all of them when their candidate keys are not fewer
    /// than the entries.
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
        let mut first_level = shard.first_level();
        let candidates = || {
            ranges.clone().flat_map(move |(addr, last)| {
                CACHED_LEVELS.flat_map(move |level| {
                    blocks(addr, last, span_shift(level))
                        .0
                        .flat_map(move |region| {
                            [false, true].map(move |nested| {
                                let tag = FlTag { did, pasid, nested };
                                FlKey { tag, level, region }.probe()
                            })
                        })
                })
            })
        };
        // A visit of the sets tests every entry against the joined ranges: the first few
        // are joined once, ahead of it, and any more as it goes.
        let mut few = [(0, 0); JOINED_KEPT];
        let mut rest = ranges.clone();
        let n = few
            .iter_mut()
            .zip(rest.by_ref())
            .map(|(slot, r)| *slot = r)
            .count();
        let few = &few[..n];
        let owner = fl_owner(did, pasid);
        first_level.remove(count, candidates, |tag, region| {
            let level = ((tag & TAG_KEY) >> TAG_LEVEL_SHIFT) as u8;
            let meets = |(addr, last)| region_meets(region, span_shift(level), addr, last);
            tag & (TAG_DID | TAG_PASID) == owner
                && (few.iter().copied().any(meets) || rest.clone().any(meets))
        });
    }

    /// How many entries each cache holds.
    pub fn len(&self) -> CachedTables {
        self.shards.iter().fold(CachedTables::default(), |n, s| {
            let marks = s.write();
            CachedTables {
                first_level: n.first_level + marks.first_level.entries,
                second_level: n.second_level + marks.second_level.entries,
                nested_mappings: n.nested_mappings + marks.mappings.entries,
            }
        })
    }

    /// Whether every cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == CachedTables::default()
    }
}

/// The domain-id and PASID bits of the tag of a first-level entry of `did` and `pasid`.
fn fl_owner(did: DomainId, pasid: Pasid) -> u64 {
    u64::from(did.0) | u64::from(pasid.raw()) << TAG_PASID_SHIFT
}

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
        c.second_level_table(did, gpa, 4)
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

    /// The levels a shard publishes follow its entries: a lookup skips only the levels (and
    /// page sizes) no entry has, and finds the others as before.
    #[test]
    fn a_shard_publishes_the_levels_it_holds() {
        let c = PagingStructureCaches::default();
        let held = |c: &PagingStructureCaches| c.shard(D1).held.load(Ordering::Relaxed);
        let small = mapping(0x9000, PageSize::Size4K, true, true);
        let large = mapping(0x20_0000, PageSize::Size2M, true, true);
        insert_mapping(&c, D1, GPA, small);
        insert_mapping(&c, D1, GPA + 0x40_0000, large);
        let sizes = |h: u64| h >> HELD_MAPPINGS;
        assert_eq!(sizes(held(&c)), 1 << 12 | 1 << 21);
        assert_eq!(c.mapping(D1, GPA), Some(small));
        assert_eq!(c.mapping(D1, GPA + 0x41_2345), Some(large));
        // Replacing an entry by one of the same key keeps one of its level.
        insert_mapping(&c, D1, GPA, small);
        c.invalidate_domain_range(D1, range(GPA, 4096), false);
        assert_eq!(sizes(held(&c)), 1 << 21);
        assert_eq!(c.mapping(D1, GPA), None);
        assert_eq!(c.mapping(D1, GPA + 0x40_0000), Some(large));
        let t = tag(D1, 5, true);
        fill_fl(&c, t, VA);
        fill_sl(&c, D1, GPA);
        assert_eq!(held(&c) & 0xff, 0b1_1100, "PML4E, PDPE and PDE");
        assert_eq!(held(&c) >> HELD_SECOND_LEVEL & 0xff, 0b1_1100);
        assert_eq!(c.first_level_start(t, VA, 4), Some(fl(1, 0x1000)));
        assert_eq!(sl_start(&c, D1, GPA), Some(sl(1, 0xc000)));
        c.invalidate_all();
        assert_eq!(held(&c), 0);
        assert!(c.is_empty());
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

    /// A fill into a full set replaces one of its ways: the shard holds at most its sets'
    /// ways, and the entry cached last is found.
    #[test]
    fn a_full_set_replaces_a_way() {
        let c = PagingStructureCaches::default();
        let m = mapping(0, PageSize::Size4K, true, true);
        let capacity = MAPPING_SETS * WAYS;
        for page in 0..capacity as u64 + 10 {
            insert_mapping(&c, D1, page << 12, m);
        }
        let held = c.len().nested_mappings;
        assert!(held <= capacity && held > capacity / 2, "{held} cached");
        assert_eq!(c.mapping(D1, (capacity as u64 + 9) << 12), Some(m));
        c.invalidate_domain(D1);
        assert!(c.is_empty());
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

/// The fill/invalidate protocol under loom (`RUSTFLAGS="--cfg loom" cargo test -p vsva-hw
/// --lib loom`): a nested walk that read a second-level entry before the driver changed it
/// and invalidated races the invalidation; once the invalidation has returned, no lookup
/// finds the old table or page, then or after the walk's fill ends (§6.5.2.3: a completed
/// invalidation covers the walks in flight when it began). Without the fill token's check
/// in [`PagingStructureCaches::fill`] (or `fill_second_level`) the model fails.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;

    /// What the entry points to before the invalidation, and after it.
    const OLD: u64 = 0xa000;
    const NEW: u64 = 0xb000;
    const D: DomainId = DomainId(1);
    const GPA: u64 = 0x4000_0000;

    /// The lookups' answers: nothing, or what the entry holds after the change, read whole.
    fn check(c: &PagingStructureCaches, when: &str) {
        if let Some(s) = c.second_level_table(D, GPA, 4) {
            assert_eq!((s.level, s.table), (1, NEW), "{when}: table {s:?}");
        }
        if let Some(m) = c.mapping(D, GPA) {
            assert_eq!(m.output, NEW, "{when}: mapping {m:?}");
        }
    }

    /// A nested walk's fill: the SL-PDE cache and the mapping of the page, from the entry
    /// it read (`table`).
    fn nested_fill(c: &PagingStructureCaches, fill: u64, table: u64) {
        let mut fills = WalkFills::new(D);
        fills.second_level(
            GPA,
            &[SlStart {
                level: 1,
                table,
                rights: Permissions::ALL,
            }],
        );
        fills.mapping_of(
            GPA,
            SlMapping {
                output: table,
                size: PageSize::Size4K,
                perms: Permissions::ALL,
                dirty: true,
            },
        );
        c.fill(fill, &fills);
    }

    /// The race: a walk of `GPA` fills the caches (`walk_fill`) from the entry it read,
    /// while the driver changes the entry and then `invalidate`s. `others` pages of the
    /// domain are cached before, in the same sets.
    fn race(invalidate: fn(&PagingStructureCaches), others: &'static [u64]) {
        race_with(invalidate, others, nested_fill);
    }

    fn race_with(
        invalidate: fn(&PagingStructureCaches),
        others: &'static [u64],
        walk_fill: fn(&PagingStructureCaches, u64, u64),
    ) {
        let mut model = loom::model::Builder::new();
        // Bounded so that the model runs in seconds in scripts/test.
        model.preemption_bound.get_or_insert(3);
        model.check(move || {
            // One set per cache, so that the fill, the invalidation and the lookups meet.
            let c = Arc::new(PagingStructureCaches::with_sets(1, 1, 1));
            let mapping = |output| SlMapping {
                output,
                size: PageSize::Size4K,
                perms: Permissions::ALL,
                dirty: true,
            };
            for &page in others {
                let mut fills = WalkFills::new(D);
                fills.mapping_of(page, mapping(OLD));
                c.fill(c.begin_fill(), &fills);
            }
            let entry = Arc::new(AtomicU64::new(OLD));
            let walker = {
                let (c, entry) = (c.clone(), entry.clone());
                loom::thread::spawn(move || {
                    let fill = c.begin_fill();
                    let table = entry.load(Ordering::SeqCst);
                    walk_fill(&c, fill, table);
                })
            };
            entry.store(NEW, Ordering::SeqCst);
            invalidate(&c);
            check(&c, "after the invalidation");
            walker.join().unwrap();
            check(&c, "after the fill ended");
        });
    }

    /// A domain-selective IOTLB invalidation (a visit of the occupied sets).
    #[test]
    fn loom_no_fill_outlives_the_domain_invalidation_that_overtook_it() {
        race(|c| c.invalidate_domain(D), &[]);
    }

    /// The same against the fill of a walk of a PASID entry's own second-level tables
    /// (PGTT=010b), which caches its one table without pending fills.
    #[test]
    fn loom_no_second_level_fill_outlives_the_domain_invalidation_that_overtook_it() {
        race_with(
            |c| c.invalidate_domain(D),
            &[],
            |c, fill, table| {
                let rights = Permissions::ALL;
                c.fill_second_level(
                    fill,
                    D,
                    GPA,
                    SlStart {
                        level: 1,
                        table,
                        rights,
                    },
                );
            },
        );
    }

    /// A page-selective IOTLB invalidation of the page, its keys probed one by one: three
    /// other pages cached make its keys fewer than the entries.
    #[test]
    fn loom_no_fill_outlives_the_page_selective_invalidation_that_overtook_it() {
        race(
            |c| c.invalidate_domain_range(D, AddrRange::from_address_mask(GPA, 0), false),
            &[0x1000, 0x2000, 0x3000, 0x5000],
        );
    }
}
