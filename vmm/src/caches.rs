//! The vIOMMU's own translation caches for emulated devices: context cache, PASID cache and
//! IOTLB (VT-d §6.2), kept until an invalidation descriptor removes an entry, as hardware
//! keeps them.
//!
//! Every invalidation advances an epoch; a walk that started before an invalidation does
//! not insert what it read, so a translation in flight cannot bring back an entry the
//! invalidation removed (the guarantee an invalidation wait gives software).

use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use vsva_vtd::inv_desc::{ContextCacheGranularity, PasidCacheGranularity};
use vsva_vtd::{
    addr::DomainId, addr::Pasid, addr::SourceId, context::ScalableContextEntry,
    inv_desc::AddrRange, pasid::ValidPasidEntry, walk::AccessRequest, walk::PageSize,
    walk::Permissions,
};

/// One cached first-level translation of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IotlbEntry {
    /// Domain id of the PASID entry the walk used.
    pub did: DomainId,
    /// Guest physical base of the page.
    pub page: u64,
    pub page_size: PageSize,
    /// Rights granted to requests of the walked privilege.
    pub perms: Permissions,
    /// The leaf has D set: writes need no walk to set it.
    pub dirty: bool,
    /// Walked for a supervisor request.
    pub supervisor: bool,
}

impl IotlbEntry {
    /// Whether the entry may serve `access` without a walk (first-level rights differ by
    /// privilege, and a write to a clean page must walk to set D).
    pub fn allows(&self, access: AccessRequest) -> bool {
        let data = if access.write {
            self.perms.write && self.dirty
        } else {
            self.perms.read
        };
        data && (!access.execute || self.perms.execute) && access.supervisor == self.supervisor
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct IotlbKey {
    sid: SourceId,
    pasid: Pasid,
    shift: u8,
    page: u64,
}

impl IotlbKey {
    fn new(sid: SourceId, pasid: Pasid, size: PageSize, addr: u64) -> Self {
        IotlbKey {
            sid,
            pasid,
            shift: size.shift() as u8,
            page: addr >> size.shift(),
        }
    }

    /// First and last input byte of the cached page.
    fn span(&self) -> (u64, u64) {
        let start = self.page << self.shift;
        (start, start | ((1u64 << self.shift) - 1))
    }
}

/// Which IOTLB entries an invalidation removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IotlbScope {
    /// Every entry.
    All,
    /// Every entry of a domain, whatever the PASID.
    Domain(DomainId),
    /// Every entry of a PASID in a domain.
    Pasid(DomainId, Pasid),
    /// Entries of a PASID in a domain that overlap a range of input addresses.
    Range(DomainId, Pasid, AddrRange),
}

impl IotlbScope {
    /// Whether an entry of `did` and `pasid` for input bytes `start..=last` is removed.
    pub fn covers(&self, did: DomainId, pasid: Pasid, start: u64, last: u64) -> bool {
        match *self {
            IotlbScope::All => true,
            IotlbScope::Domain(d) => d == did,
            IotlbScope::Pasid(d, p) => d == did && p == pasid,
            IotlbScope::Range(d, p, r) => d == did && p == pasid && r.overlaps(start, last),
        }
    }
}

/// The caches.
#[derive(Debug, Default)]
pub(crate) struct Caches {
    context: RwLock<HashMap<SourceId, ScalableContextEntry>>,
    pasid: RwLock<HashMap<(SourceId, Pasid), ValidPasidEntry>>,
    iotlb: RwLock<HashMap<IotlbKey, IotlbEntry>>,
    epoch: AtomicU64,
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Caches {
    /// The epoch a walk starts in; pass it back to the inserts.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn advance(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    pub fn context(&self, sid: SourceId) -> Option<ScalableContextEntry> {
        read(&self.context).get(&sid).copied()
    }

    pub fn insert_context(&self, epoch: u64, sid: SourceId, entry: ScalableContextEntry) {
        let mut cache = write(&self.context);
        if self.epoch() == epoch {
            cache.insert(sid, entry);
        }
    }

    pub fn pasid_entry(&self, sid: SourceId, pasid: Pasid) -> Option<ValidPasidEntry> {
        read(&self.pasid).get(&(sid, pasid)).copied()
    }

    /// Caches a PASID entry read afresh. IOTLB entries of the same requester and PASID
    /// under another domain id are dropped: a domain-tagged lookup would no longer find
    /// them.
    pub fn insert_pasid_entry(
        &self,
        epoch: u64,
        sid: SourceId,
        pasid: Pasid,
        entry: ValidPasidEntry,
    ) {
        let mut cache = write(&self.pasid);
        if self.epoch() != epoch {
            return;
        }
        cache.insert((sid, pasid), entry);
        write(&self.iotlb).retain(|k, e| k.sid != sid || k.pasid != pasid || e.did == entry.did());
    }

    /// The cached translation of `addr`, trying each page size.
    pub fn lookup(&self, sid: SourceId, pasid: Pasid, addr: u64) -> Option<IotlbEntry> {
        let iotlb = read(&self.iotlb);
        PageSize::ALL
            .iter()
            .find_map(|&size| iotlb.get(&IotlbKey::new(sid, pasid, size, addr)).copied())
    }

    pub fn insert(&self, epoch: u64, sid: SourceId, pasid: Pasid, addr: u64, entry: IotlbEntry) {
        let mut iotlb = write(&self.iotlb);
        if self.epoch() == epoch {
            iotlb.insert(IotlbKey::new(sid, pasid, entry.page_size, addr), entry);
        }
    }

    /// Context-cache invalidation (§6.5.2.1).
    pub fn invalidate_context(&self, granularity: ContextCacheGranularity, sid: SourceId, fm: u8) {
        let mut cache = write(&self.context);
        self.advance();
        cache.retain(|&s, _| !granularity.covers(sid, fm, s));
    }

    /// PASID-cache invalidation (§6.5.2.2).
    pub fn invalidate_pasid(
        &self,
        granularity: PasidCacheGranularity,
        did: DomainId,
        pasid: Pasid,
    ) {
        let mut cache = write(&self.pasid);
        self.advance();
        match granularity {
            PasidCacheGranularity::Global => cache.clear(),
            PasidCacheGranularity::DomainSelective => cache.retain(|_, e| e.did() != did),
            PasidCacheGranularity::PasidSelective => {
                cache.retain(|&(_, p), e| e.did() != did || p != pasid)
            }
        }
    }

    /// IOTLB invalidation of the entries `scope` covers.
    pub fn invalidate_iotlb(&self, scope: IotlbScope) {
        let mut iotlb = write(&self.iotlb);
        self.advance();
        iotlb.retain(|k, e| {
            let (start, last) = k.span();
            !scope.covers(e.did, k.pasid, start, last)
        });
    }

    /// Number of cached context entries, PASID entries and translations.
    pub fn len(&self) -> (usize, usize, usize) {
        (
            read(&self.context).len(),
            read(&self.pasid).len(),
            read(&self.iotlb).len(),
        )
    }
}
