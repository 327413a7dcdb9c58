//! One (requester, PASID) address space of the vIOMMU as a vm-memory [`Iommu`], so that
//! device models written against vm-memory's `IoMemory` (`IommuMemory` over the guest's
//! `GuestMemoryMmap`) DMA through the guest's first-level tables unchanged.
//!
//! The address space keeps a vm-memory [`Iotlb`] filled from the vIOMMU's translations.
//! It is one more IOTLB of the vIOMMU: the guest's invalidations remove from it what they
//! remove from the vIOMMU's own, and nothing else does, so a stale translation stays in use
//! until the guest invalidates it, exactly as with the vIOMMU's translations.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error, IotlbFails, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iommu, Iotlb, Permissions};
use vsva_vtd::{addr::DomainId, addr::Pasid, addr::SourceId, walk::AccessRequest};

use crate::caches::IotlbScope;
use crate::viommu::{lock, VIommu};

/// How many times a translation is retried when invalidations keep racing with it.
const FILL_ATTEMPTS: usize = 4;

/// The IOTLB of one address space, as the vIOMMU's invalidations see it.
pub(crate) struct SpaceTlb {
    sid: SourceId,
    pasid: Option<Pasid>,
    /// Domain id and effective PASID of the PASID entry the cached translations came from.
    tag: Mutex<Option<(DomainId, Pasid)>>,
    iotlb: RwLock<Iotlb>,
    /// Advanced by every invalidation: a translation started before one is not cached.
    epoch: AtomicU64,
}

impl SpaceTlb {
    fn read(&self) -> RwLockReadGuard<'_, Iotlb> {
        self.iotlb.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes what `scope` covers. The epoch advances whatever the scope, so that a
    /// translation in flight, whose tag is not known yet, is not cached.
    pub fn invalidate(&self, scope: IotlbScope) {
        let mut tag = lock(&self.tag);
        let mut iotlb = self.iotlb.write().unwrap_or_else(PoisonError::into_inner);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let covered = match *tag {
            Some((did, pasid)) => scope.covers(did, pasid, 0, u64::MAX),
            // Untranslated pages, cached while translation was off.
            None => scope == IotlbScope::All,
        };
        if !covered {
            return;
        }
        match scope {
            IotlbScope::Range(_, _, r) if r.last < u64::MAX => {
                iotlb.invalidate_mapping(GuestAddress(r.start), (r.last - r.start + 1) as usize)
            }
            _ => {
                iotlb.invalidate_all();
                *tag = None;
            }
        }
    }
}

/// A (requester id, PASID) address space of the vIOMMU, for vm-memory's `IommuMemory`.
pub struct IommuAddressSpace {
    viommu: Arc<VIommu>,
    tlb: Arc<SpaceTlb>,
    supervisor: bool,
}

impl fmt::Debug for IommuAddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommuAddressSpace")
            .field("sid", &self.tlb.sid)
            .field("pasid", &self.tlb.pasid)
            .field("supervisor", &self.supervisor)
            .finish_non_exhaustive()
    }
}

impl VIommu {
    /// The address space that requests of `sid` with `pasid` (or without PASID) see, with
    /// user or supervisor privilege.
    pub fn address_space(
        self: &Arc<Self>,
        sid: SourceId,
        pasid: Option<Pasid>,
        supervisor: bool,
    ) -> IommuAddressSpace {
        let tlb = Arc::new(SpaceTlb {
            sid,
            pasid,
            tag: Mutex::new(None),
            iotlb: RwLock::new(Iotlb::new()),
            epoch: AtomicU64::new(0),
        });
        let mut spaces = lock(&self.spaces);
        spaces.retain(|w| w.strong_count() > 0);
        spaces.push(Arc::downgrade(&tlb));
        IommuAddressSpace {
            viommu: self.clone(),
            tlb,
            supervisor,
        }
    }

    /// Passes an IOTLB invalidation to the address spaces.
    pub(crate) fn invalidate_spaces(&self, scope: IotlbScope) {
        let spaces: Vec<_> = lock(&self.spaces)
            .iter()
            .filter_map(|w| w.upgrade())
            .collect();
        for s in spaces {
            s.invalidate(scope);
        }
    }
}

impl IommuAddressSpace {
    /// The requester id of the address space.
    pub fn source_id(&self) -> SourceId {
        self.tlb.sid
    }

    /// The PASID of the address space (`None`: requests without PASID).
    pub fn pasid(&self) -> Option<Pasid> {
        self.tlb.pasid
    }

    /// Translates the pages the lookup could not serve and caches them.
    fn fill(&self, fails: &IotlbFails, access: Permissions) -> Result<(), Error> {
        let request = AccessRequest {
            write: access.has_write(),
            execute: false,
            supervisor: self.supervisor,
        };
        for range in fails.misses.iter().chain(&fails.access_fails) {
            let end = range.base.0 + range.length as u64;
            let mut addr = range.base.0;
            while addr < end {
                let epoch = self.tlb.epoch.load(Ordering::Acquire);
                let t = self
                    .viommu
                    .translate(self.tlb.sid, self.tlb.pasid, addr, request)
                    .map_err(|f| Error::CannotResolve {
                        iova_range: IovaRange {
                            base: GuestAddress(addr),
                            length: (end - addr) as usize,
                        },
                        reason: f.to_string(),
                    })?;
                let size = t.page_size.bytes();
                let base = addr & !(size - 1);
                let perms = if t.perms.write && t.dirty {
                    Permissions::ReadWrite
                } else {
                    Permissions::Read
                };
                // The last page of the address space ends at 2^64, which the IOTLB's
                // ranges cannot hold: its last byte stays untranslated.
                let len = size.min(u64::MAX - base) as usize;
                self.cache(
                    epoch,
                    t.did.zip(t.pasid),
                    base,
                    t.page_base().raw(),
                    len,
                    perms,
                )?;
                match base.checked_add(size) {
                    Some(next) => addr = next,
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// Caches one translated page, unless an invalidation happened since the translation
    /// started or the PASID entry's domain changed (then the old domain's pages go).
    fn cache(
        &self,
        epoch: u64,
        tag: Option<(DomainId, Pasid)>,
        iova: u64,
        gpa: u64,
        len: usize,
        perms: Permissions,
    ) -> Result<(), Error> {
        let mut current = lock(&self.tlb.tag);
        let mut iotlb = self
            .tlb
            .iotlb
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if self.tlb.epoch.load(Ordering::Acquire) != epoch {
            return Ok(());
        }
        if *current != tag {
            iotlb.invalidate_all();
            *current = tag;
        }
        iotlb.set_mapping(GuestAddress(iova), GuestAddress(gpa), len, perms)
    }
}

impl Iommu for IommuAddressSpace {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, Error> {
        let range = || IovaRange { base: iova, length };
        if iova.0.checked_add(length as u64).is_none() {
            return Err(Error::CannotResolve {
                iova_range: range(),
                reason: "the range wraps around the address space".into(),
            });
        }
        for _ in 0..FILL_ATTEMPTS {
            match Iotlb::lookup(self.tlb.read(), iova, length, access) {
                Ok(it) => return Ok(it),
                Err(fails) => self.fill(&fails, access)?,
            }
        }
        Err(Error::CannotResolve {
            iova_range: range(),
            reason: "invalidations kept removing the translation".into(),
        })
    }
}
