//! What the vIOMMU asks of the host: PASIDs from the VM's set, and the VFIO SVA calls of
//! the seed series (`VFIO_IOMMU_PASID_REQUEST`, `VFIO_IOMMU_BIND`/`UNBIND` of a guest
//! PASID, `VFIO_IOMMU_CACHE_INVALIDATE`), plus the page response that answers a page
//! request the host reported to the VMM.
//!
//! A VM's VFIO container ([`Container`]) implements both traits through its typed
//! wrappers, which encode each request and go through the byte-level ioctl path (the
//! page response through vsva's `VFIO_IOMMU_PAGE_RESPONSE` extension).

use std::sync::{Mutex, MutexGuard, PoisonError};

use vsva_host::{Container, HostError, IommuBackend, PasidAllocator, PasidSetId};
use vsva_uapi::VfioIoctls;
use vsva_uapi::{BindGpasid, CacheInvalidate, PageResponse};
use vsva_vtd::{Pasid, SourceId};

/// Where guest PASIDs come from: the virtual command interface (VT-d §10.4.44) allocates
/// and frees them here.
pub trait PasidSource: Send + Sync {
    /// The lowest free PASID in `[min, max]`, now owned by the VM.
    fn pasid_alloc(&self, min: u32, max: u32) -> Result<Pasid, HostError>;

    /// Releases a PASID of the VM (unbinding it first, where the host bound it).
    fn pasid_free(&self, pasid: Pasid) -> Result<(), HostError>;
}

/// The host calls that shadow the guest's first-level use to a passthrough device.
///
/// `hpasid` values are PASIDs of the VM's set; the vIOMMU hands the guest host PASIDs
/// (gpasid == hpasid), as the seed's VT-d flow does.
pub trait HostSva: PasidSource {
    /// Binds a guest first-level table to a host PASID for nested translation.
    fn bind_gpasid(&self, bind: &BindGpasid) -> Result<(), HostError>;

    /// Undoes an earlier bind of the same data.
    fn unbind_gpasid(&self, bind: &BindGpasid) -> Result<(), HostError>;

    /// Propagates a guest first-level cache invalidation to the host caches.
    fn cache_invalidate(&self, inv: &CacheInvalidate) -> Result<(), HostError>;

    /// Delivers a page group response to the device `host_sid` (the host requester id of
    /// the device that sent the page request).
    fn page_response(&self, host_sid: SourceId, resp: &PageResponse) -> Result<(), HostError>;
}

/// Locks a container; a poisoned lock still holds a consistent container (every ioctl
/// either completes or changes nothing).
fn lock<B: IommuBackend>(c: &Mutex<Container<B>>) -> MutexGuard<'_, Container<B>> {
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B: IommuBackend + Send> PasidSource for Mutex<Container<B>> {
    fn pasid_alloc(&self, min: u32, max: u32) -> Result<Pasid, HostError> {
        lock(self).pasid_alloc(min, max)
    }

    fn pasid_free(&self, pasid: Pasid) -> Result<(), HostError> {
        lock(self).pasid_free(pasid)
    }
}

impl<B: IommuBackend + Send> HostSva for Mutex<Container<B>> {
    fn bind_gpasid(&self, bind: &BindGpasid) -> Result<(), HostError> {
        lock(self).bind_gpasid(bind)
    }

    fn unbind_gpasid(&self, bind: &BindGpasid) -> Result<(), HostError> {
        lock(self).unbind_gpasid(bind)
    }

    fn cache_invalidate(&self, inv: &CacheInvalidate) -> Result<(), HostError> {
        lock(self).cache_invalidate(inv)
    }

    fn page_response(&self, host_sid: SourceId, resp: &PageResponse) -> Result<(), HostError> {
        lock(self).page_response_to(host_sid, resp)
    }
}

/// PASIDs for a VM without a VFIO container (emulated devices only): a private PASID
/// space with one set.
#[derive(Debug)]
pub struct LocalPasids {
    allocator: Mutex<PasidAllocator>,
    set: PasidSetId,
}

impl LocalPasids {
    /// A PASID space of which the VM may hold `quota` PASIDs at a time.
    pub fn new(quota: u32) -> Self {
        let mut allocator = PasidAllocator::new();
        let set = allocator.create_set(quota);
        LocalPasids {
            allocator: Mutex::new(allocator),
            set,
        }
    }

    fn allocator(&self) -> MutexGuard<'_, PasidAllocator> {
        self.allocator
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl PasidSource for LocalPasids {
    fn pasid_alloc(&self, min: u32, max: u32) -> Result<Pasid, HostError> {
        self.allocator().alloc(self.set, min, max)
    }

    fn pasid_free(&self, pasid: Pasid) -> Result<(), HostError> {
        self.allocator().free(self.set, pasid)
    }
}
