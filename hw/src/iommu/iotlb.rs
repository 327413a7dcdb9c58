//! The IOTLB: cached translations, kept until an invalidation descriptor removes them
//! (VT-d §6.2.4, §6.5.2.3 and §6.5.2.4).
//!
//! Entries are tagged with the domain id and PASID, as the spec requires, and also with the
//! requester id so that a hit needs a single lookup. When a PASID entry is re-read with a
//! different domain id, the entries of the old domain for that requester and PASID are
//! dropped ([`Iotlb::retag`]), which is what a domain-tagged hardware lookup would observe.
//!
//! The hit path takes one read lock on one of many padded shards: two threads hitting
//! different pages do not share a cache line.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crossbeam_utils::CachePadded;
use foldhash::fast::FixedState;
use vsva_vtd::{AddrRange, DomainId, Pasid, SourceId};

use super::PAGE_SHIFTS;

/// Number of lock shards: a power of two.
const SHARDS: usize = 64;
/// Entries per shard before the shard is emptied to make room (hardware replacement).
const SHARD_CAPACITY: usize = 4096;

/// Which walk produced a cached translation; invalidation descriptors select by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TranslationKind {
    /// Second level only (PGTT=010b, or requests without PASID on such an entry).
    SecondLevel,
    /// First level only (PGTT=001b).
    FirstLevel,
    /// First level nested over second level (PGTT=011b).
    Nested,
    /// Pass-through (PGTT=100b).
    PassThrough,
}

/// Access rights a cached translation grants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
    /// First level: user-mode requests allowed (U/S set on every level).
    pub user: bool,
    /// First level: the leaf's D bit is set, so a write needs no walk to set it.
    pub dirty: bool,
    /// The translation was walked for a supervisor request; first-level rights differ by
    /// privilege, so a request of the other privilege walks again.
    pub supervisor: bool,
}

/// One cached translation of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    /// Domain the translation belongs to.
    pub did: DomainId,
    /// Output page base (HPA).
    pub output: u64,
    /// log2 of the page size: 12, 21 or 30.
    pub page_shift: u8,
    pub perms: Perms,
    pub kind: TranslationKind,
}

/// Lookup key: requester, PASID, page size and input page number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    tag: u64,
    page: u64,
}

impl Key {
    fn new(sid: SourceId, pasid: Pasid, page_shift: u8, addr: u64) -> Self {
        Key {
            tag: sid.rid() as u64 | (pasid.raw() as u64) << 16 | (page_shift as u64) << 40,
            page: addr >> page_shift,
        }
    }

    fn pasid(&self) -> u32 {
        (self.tag >> 16) as u32 & 0xf_ffff
    }

    fn rid(&self) -> u16 {
        self.tag as u16
    }

    /// Whether the input page of the entry shares a byte with `range`.
    fn meets(&self, range: &AddrRange) -> bool {
        let shift = (self.tag >> 40) as u32;
        let start = self.page << shift;
        range.overlaps(start, start | ((1u64 << shift) - 1))
    }
}

type Shard = CachePadded<RwLock<HashMap<Key, IotlbEntry, FixedState>>>;

/// The keys of the cached entries of each domain and PASID.
type KeyIndex = HashMap<(DomainId, u32), Vec<Key>, FixedState>;

/// The IOTLB.
#[derive(Debug)]
pub struct Iotlb {
    shards: Box<[Shard]>,
    hasher: FixedState,
    /// Keys by domain and PASID, for selective invalidation without a full scan. Every fill
    /// locks it: padded, so that the shard table a hit reads is not on its cache line.
    index: CachePadded<Mutex<KeyIndex>>,
    /// Counts invalidations, so that a walk that began before one does not cache.
    generation: AtomicU64,
}

impl Default for Iotlb {
    fn default() -> Self {
        Iotlb {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(RwLock::default()))
                .collect(),
            hasher: FixedState::default(),
            index: CachePadded::default(),
            generation: AtomicU64::new(0),
        }
    }
}

impl Iotlb {
    fn shard(&self, key: &Key) -> &Shard {
        let h = self.hasher.hash_one(key);
        &self.shards[(h >> 58) as usize & (SHARDS - 1)]
    }

    /// The cached translation covering `addr` for this requester and PASID, if any.
    pub fn lookup(&self, sid: SourceId, pasid: Pasid, addr: u64) -> Option<IotlbEntry> {
        PAGE_SHIFTS.iter().find_map(|&shift| {
            let key = Key::new(sid, pasid, shift, addr);
            self.shard(&key).read().unwrap().get(&key).copied()
        })
    }

    /// Starts a fill: the walk that follows may insert its result only if no invalidation
    /// ran in between ([`Iotlb::insert`]). This is how an invalidation's completion covers
    /// walks in flight when it began, as hardware guarantees before it reports completion.
    pub fn begin_fill(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches a translation of the page containing `addr`, walked since `fill` (from
    /// [`Iotlb::begin_fill`]); dropped if an invalidation ran meanwhile. Returns whether
    /// the entry was cached.
    pub fn insert(
        &self,
        fill: u64,
        sid: SourceId,
        pasid: Pasid,
        addr: u64,
        entry: IotlbEntry,
    ) -> bool {
        let key = Key::new(sid, pasid, entry.page_shift, addr);
        // The index lock orders fills against invalidations, which hold it throughout.
        let mut index = self.index.lock().unwrap();
        if self.generation.load(Ordering::Acquire) != fill {
            return false;
        }
        let mut shard = self.shard(&key).write().unwrap();
        if shard.len() >= SHARD_CAPACITY {
            shard.clear();
        }
        if shard.insert(key, entry).is_none() {
            index.entry((entry.did, pasid.raw())).or_default().push(key);
        }
        true
    }

    /// Removes the keyed entries that `select` accepts; returns how many were removed.
    fn remove_where(
        &self,
        keys: Vec<Key>,
        mut select: impl FnMut(&Key, &IotlbEntry) -> bool,
    ) -> (usize, Vec<Key>) {
        let mut removed = 0;
        let mut kept = Vec::new();
        for key in keys {
            let mut shard = self.shard(&key).write().unwrap();
            match shard.get(&key) {
                Some(e) if select(&key, e) => {
                    shard.remove(&key);
                    removed += 1;
                }
                Some(_) => kept.push(key),
                None => {}
            }
        }
        (removed, kept)
    }

    /// Applies `select` to the index buckets that `bucket` accepts.
    /// `fence`: the removal is an invalidation that walks in flight must not outlive (see
    /// [`Iotlb::begin_fill`]).
    fn invalidate(
        &self,
        fence: bool,
        mut bucket: impl FnMut(DomainId, u32) -> bool,
        mut select: impl FnMut(&Key, &IotlbEntry) -> bool,
    ) -> usize {
        let mut index = self.index.lock().unwrap();
        if fence {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        let mut removed = 0;
        index.retain(|&(did, pasid), keys| {
            if !bucket(did, pasid) {
                return true;
            }
            let (n, kept) = self.remove_where(std::mem::take(keys), &mut select);
            removed += n;
            *keys = kept;
            !keys.is_empty()
        });
        removed
    }

    /// Global invalidation: everything.
    pub fn invalidate_all(&self) -> usize {
        let mut index = self.index.lock().unwrap();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut s = shard.write().unwrap();
            removed += s.len();
            s.clear();
        }
        index.clear();
        removed
    }

    /// Domain-selective IOTLB invalidation: every entry tagged with `did`, any PASID.
    pub fn invalidate_domain(&self, did: DomainId) -> usize {
        self.invalidate(true, |d, _| d == did, |_, _| true)
    }

    /// Page-selective-within-domain IOTLB invalidation (§6.5.2.3): second-level and
    /// pass-through entries whose input page meets `range`, and every
    /// first-level and nested entry of the domain, whatever its address: they are looked
    /// up by first-level input address, which the descriptor's address cannot select (QEMU
    /// reads the spec the same way).
    pub fn invalidate_domain_range(&self, did: DomainId, range: AddrRange) -> usize {
        self.invalidate(
            true,
            |d, _| d == did,
            |key, e| match e.kind {
                TranslationKind::Nested | TranslationKind::FirstLevel => true,
                TranslationKind::SecondLevel | TranslationKind::PassThrough => key.meets(&range),
            },
        )
    }

    /// PASID-selective PASID-based IOTLB invalidation (§6.5.2.4): first-level and nested
    /// entries of `did` and `pasid`.
    pub fn invalidate_pasid(&self, did: DomainId, pasid: Pasid) -> usize {
        self.invalidate(
            true,
            |d, p| d == did && p == pasid.raw(),
            |_, e| {
                matches!(
                    e.kind,
                    TranslationKind::FirstLevel | TranslationKind::Nested
                )
            },
        )
    }

    /// Page-selective-within-PASID PASID-based IOTLB invalidation: first-level and nested
    /// entries of `did` and `pasid` whose input page meets `range`.
    pub fn invalidate_pasid_range(&self, did: DomainId, pasid: Pasid, range: AddrRange) -> usize {
        self.invalidate(
            true,
            |d, p| d == did && p == pasid.raw(),
            |key, e| {
                matches!(
                    e.kind,
                    TranslationKind::FirstLevel | TranslationKind::Nested
                ) && key.meets(&range)
            },
        )
    }

    /// Drops entries of `sid`/`pasid` that are not tagged with `did`: called when the PASID
    /// entry is read afresh, so that a domain-tagged lookup no longer finds them.
    pub fn retag(&self, sid: SourceId, pasid: Pasid, did: DomainId) -> usize {
        self.invalidate(
            false,
            |d, p| d != did && p == pasid.raw(),
            |key, _| key.rid() == sid.rid() && key.pasid() == pasid.raw(),
        )
    }

    /// Number of cached translations.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().unwrap().len()).sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid() -> SourceId {
        SourceId::new(0, 2, 0).unwrap()
    }

    fn range(start: u64, len: u64) -> AddrRange {
        AddrRange {
            start,
            last: start + len - 1,
        }
    }

    fn entry(did: u16, output: u64, shift: u8, kind: TranslationKind) -> IotlbEntry {
        IotlbEntry {
            did: DomainId(did),
            output,
            page_shift: shift,
            perms: Perms {
                read: true,
                write: true,
                ..Perms::default()
            },
            kind,
        }
    }

    #[test]
    fn lookup_finds_every_page_size() {
        let t = Iotlb::default();
        let p = Pasid::new(5).unwrap();
        t.insert(
            t.begin_fill(),
            sid(),
            p,
            0x1234_5000,
            entry(1, 0xa000, 12, TranslationKind::Nested),
        );
        t.insert(
            t.begin_fill(),
            sid(),
            p,
            0x4020_0000,
            entry(1, 0x20_0000, 21, TranslationKind::Nested),
        );
        t.insert(
            t.begin_fill(),
            sid(),
            p,
            0x8000_0000,
            entry(1, 0x4000_0000, 30, TranslationKind::Nested),
        );
        assert_eq!(t.lookup(sid(), p, 0x1234_5fff).unwrap().output, 0xa000);
        assert!(t.lookup(sid(), p, 0x1234_6000).is_none());
        assert_eq!(t.lookup(sid(), p, 0x403f_ffff).unwrap().page_shift, 21);
        assert_eq!(t.lookup(sid(), p, 0xbfff_ffff).unwrap().page_shift, 30);
        assert!(t
            .lookup(sid(), Pasid::new(6).unwrap(), 0x1234_5000)
            .is_none());
    }

    #[test]
    fn selective_invalidations_remove_exactly_their_entries() {
        let t = Iotlb::default();
        let (p1, p2) = (Pasid::new(1).unwrap(), Pasid::new(2).unwrap());
        t.insert(
            t.begin_fill(),
            sid(),
            p1,
            0x1000,
            entry(1, 0xa000, 12, TranslationKind::Nested),
        );
        t.insert(
            t.begin_fill(),
            sid(),
            p1,
            0x2000,
            entry(1, 0xb000, 12, TranslationKind::Nested),
        );
        t.insert(
            t.begin_fill(),
            sid(),
            p2,
            0x1000,
            entry(1, 0xc000, 12, TranslationKind::FirstLevel),
        );
        t.insert(
            t.begin_fill(),
            sid(),
            Pasid::RID_PASID,
            0x1000,
            entry(1, 0xd000, 12, TranslationKind::SecondLevel),
        );
        t.insert(
            t.begin_fill(),
            sid(),
            p1,
            0x1000_0000,
            entry(2, 0xe000, 12, TranslationKind::Nested),
        );

        assert_eq!(
            t.invalidate_pasid_range(DomainId(1), p1, range(0x2000, 0x1000)),
            1
        );
        assert!(t.lookup(sid(), p1, 0x2000).is_none());
        assert!(t.lookup(sid(), p1, 0x1000).is_some());

        // A second-level range invalidation drops every first-level and nested entry of
        // the domain and the second-level ones in range.
        let sl = entry(1, 0xf000, 12, TranslationKind::SecondLevel);
        t.insert(t.begin_fill(), sid(), Pasid::RID_PASID, 0x8000, sl);
        assert_eq!(
            t.invalidate_domain_range(DomainId(1), range(0x1000, 0x1000)),
            3
        );
        assert!(t.lookup(sid(), p2, 0x1000).is_none());
        assert!(t.lookup(sid(), Pasid::RID_PASID, 0x1000).is_none());
        assert!(
            t.lookup(sid(), Pasid::RID_PASID, 0x8000).is_some(),
            "second level out of range"
        );
        assert!(
            t.lookup(sid(), p1, 0x1000_0000).is_some(),
            "other domain untouched"
        );
        assert_eq!(
            t.invalidate_domain_range(DomainId(1), range(0x8000, 0x1000)),
            1
        );
        assert_eq!(t.invalidate_pasid(DomainId(1), p2), 0);
        assert_eq!(t.invalidate_domain(DomainId(2)), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn retag_drops_other_domains_of_the_same_requester_and_pasid() {
        let t = Iotlb::default();
        let p = Pasid::new(9).unwrap();
        let other = SourceId::new(0, 3, 0).unwrap();
        t.insert(
            t.begin_fill(),
            sid(),
            p,
            0x1000,
            entry(1, 0xa000, 12, TranslationKind::Nested),
        );
        t.insert(
            t.begin_fill(),
            other,
            p,
            0x1000,
            entry(1, 0xa000, 12, TranslationKind::Nested),
        );
        assert_eq!(t.retag(sid(), p, DomainId(7)), 1);
        assert!(t.lookup(sid(), p, 0x1000).is_none());
        assert!(t.lookup(other, p, 0x1000).is_some());
        assert_eq!(t.retag(other, p, DomainId(1)), 0);
    }

    #[test]
    fn a_walk_that_began_before_an_invalidation_does_not_cache() {
        let t = Iotlb::default();
        let p = Pasid::new(3).unwrap();
        let fill = t.begin_fill();
        t.invalidate_pasid(DomainId(1), p);
        let e = entry(1, 0xa000, 12, TranslationKind::Nested);
        assert!(!t.insert(fill, sid(), p, 0x1000, e));
        assert!(t.lookup(sid(), p, 0x1000).is_none());
        assert!(t.insert(t.begin_fill(), sid(), p, 0x1000, e));
    }
}
