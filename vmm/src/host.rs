//! What the vIOMMU asks of the host: PASIDs from the VM's set, and the VFIO SVA calls of
//! the seed series (`VFIO_IOMMU_PASID_REQUEST`, `VFIO_IOMMU_BIND`/`UNBIND` of a guest
//! PASID, `VFIO_IOMMU_CACHE_INVALIDATE`), plus the page response that answers a page
//! request the host reported to the VMM.
//!
//! The VM's VFIO container is an open file ([`UapiFile`]): every such file implements both
//! traits through the typed ioctl wrappers of [`VfioIoctls`], which encode each request
//! and go through the byte-level ioctl (the page response through vsva's
//! `VFIO_IOMMU_PAGE_RESPONSE` extension). A failed call is the errno the host returned.

use vsva_uapi::{
    error::Errno, file::UapiFile, file::VfioIoctls, request::BindGpasid, request::CacheInvalidate,
    request::PageResponse, request::PasidTableConfig,
};
use vsva_vtd::{addr::Pasid, addr::SourceId};

/// Where guest PASIDs come from: the virtual command interface (VT-d §10.4.44) allocates
/// and frees them here.
pub trait PasidSource: Send + Sync {
    /// The lowest free PASID in `[min, max]`, now owned by the VM.
    fn pasid_alloc(&self, min: u32, max: u32) -> Result<Pasid, Errno>;

    /// Releases a PASID of the VM (unbinding it first, where the host bound it).
    fn pasid_free(&self, pasid: Pasid) -> Result<(), Errno>;
}

/// The host calls that shadow the guest's first-level use to a passthrough device.
///
/// `hpasid` values are PASIDs of the VM's set; the vIOMMU hands the guest host PASIDs
/// (gpasid == hpasid), as the seed's VT-d flow does.
pub trait HostSva: PasidSource {
    /// Binds a guest first-level table to a host PASID for nested translation.
    fn bind_gpasid(&self, bind: &BindGpasid) -> Result<(), Errno>;

    /// Undoes an earlier bind of the same data.
    fn unbind_gpasid(&self, bind: &BindGpasid) -> Result<(), Errno>;

    /// Propagates a guest first-level cache invalidation to the host caches.
    fn cache_invalidate(&self, inv: &CacheInvalidate) -> Result<(), Errno>;

    /// Propagates the invalidations one queue-tail write gathered, in order: the result
    /// of each. The seed's uAPI takes one `VFIO_IOMMU_CACHE_INVALIDATE` per invalidation;
    /// iommufd takes the batch as one `IOMMU_HWPT_INVALIDATE` array per nested HWPT.
    fn cache_invalidate_batch(&self, invs: &[CacheInvalidate]) -> Vec<Result<(), Errno>> {
        invs.iter().map(|inv| self.cache_invalidate(inv)).collect()
    }

    /// Whether a bind can carry the guest entry's WPE (write protect enable): the seed's
    /// bind data cannot (Linux v5.10 has no flag for it), iommufd's `iommu_hwpt_vtd_s1`
    /// can (`IOMMU_VTD_S1_WPE`).
    fn carries_wpe(&self) -> bool {
        false
    }

    /// Binds `bind`, with WPE when `wpe` (only asked of a host that [`carries_wpe`]).
    ///
    /// [`carries_wpe`]: HostSva::carries_wpe
    fn bind_first_level(&self, bind: &BindGpasid, wpe: bool) -> Result<(), Errno> {
        let _ = wpe;
        self.bind_gpasid(bind)
    }

    /// Whether a bind of a bound PASID replaces its binding in one step (iommufd's
    /// atomic replace of the PASID's HWPT). The seed's uAPI has no replace: a changed
    /// entry is an unbind, then a bind.
    fn replaces_binding(&self) -> bool {
        false
    }

    /// Delivers a page group response to the device `host_sid` (the host requester id of
    /// the device that sent the page request).
    fn page_response(&self, host_sid: SourceId, resp: &PageResponse) -> Result<(), Errno>;
}

/// The host calls of a guest-owned PASID table (Arm SMMUv3: the guest's context descriptor
/// table), `VFIO_IOMMU_ATTACH_PASID_TABLE` and `VFIO_IOMMU_DETACH_PASID_TABLE` of the
/// nested-stage series; the guest's invalidations and page responses go through
/// [`HostSva`]'s `cache_invalidate` and `page_response`.
pub trait HostPasidTable: HostSva {
    /// Points the host's stream table entry of the container's devices at the guest's
    /// table (or makes their guest stage bypass or abort).
    fn attach_pasid_table(&self, cfg: &PasidTableConfig) -> Result<(), Errno>;

    /// Stage 2 alone again.
    fn detach_pasid_table(&self) -> Result<(), Errno>;
}

impl<F: UapiFile + ?Sized> PasidSource for F {
    fn pasid_alloc(&self, min: u32, max: u32) -> Result<Pasid, Errno> {
        VfioIoctls::pasid_alloc(&mut &*self, min, max)
    }

    fn pasid_free(&self, pasid: Pasid) -> Result<(), Errno> {
        VfioIoctls::pasid_free(&mut &*self, pasid)
    }
}

impl<F: UapiFile + ?Sized> HostSva for F {
    fn bind_gpasid(&self, bind: &BindGpasid) -> Result<(), Errno> {
        VfioIoctls::bind_gpasid(&mut &*self, bind)
    }

    fn unbind_gpasid(&self, bind: &BindGpasid) -> Result<(), Errno> {
        VfioIoctls::unbind_gpasid(&mut &*self, bind)
    }

    fn cache_invalidate(&self, inv: &CacheInvalidate) -> Result<(), Errno> {
        VfioIoctls::cache_invalidate(&mut &*self, inv)
    }

    fn page_response(&self, host_sid: SourceId, resp: &PageResponse) -> Result<(), Errno> {
        VfioIoctls::page_response_to(&mut &*self, host_sid, resp)
    }
}

impl<F: UapiFile + ?Sized> HostPasidTable for F {
    fn attach_pasid_table(&self, cfg: &PasidTableConfig) -> Result<(), Errno> {
        VfioIoctls::attach_pasid_table(&mut &*self, cfg)
    }

    fn detach_pasid_table(&self) -> Result<(), Errno> {
        VfioIoctls::detach_pasid_table(&mut &*self)
    }
}
