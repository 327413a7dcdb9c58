//! Errors of the vIOMMU's own interface (register accesses, device attachment, page
//! request injection). Host call failures are not errors of the caller: they are counted
//! and kept as [`HostCallError`]s.

use vsva_uapi::error::Errno;
use vsva_uapi::{
    request::BindGpasid, request::CacheInvalidate, request::PageResponse, request::PasidTableConfig,
};
use vsva_vtd::regs::RegError;
use vsva_vtd::{addr::Pasid, addr::SourceId, flpte::InvalidAddressWidth};

/// A refused vIOMMU operation; it changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum VIommuError {
    /// A register access the register file refuses (width, alignment, range).
    #[error(transparent)]
    Register(#[from] RegError),
    /// The configured guest address width cannot be used for first-level entries.
    #[error(transparent)]
    AddressWidth(#[from] InvalidAddressWidth),
    /// A device with this guest source id is already attached.
    #[error("device {0} is already attached to the vIOMMU")]
    AlreadyAttached(SourceId),
    /// A second device with the same host source id.
    #[error("host device {0} is already attached to the vIOMMU")]
    HostDeviceAttached(SourceId),
    /// A page request group index beyond the 9 bits a page request carries.
    #[error("page request group index {0:#x} does not fit 9 bits")]
    PageRequestGroup(u32),
    /// An unrecoverable fault record from the host that the guest cannot be shown.
    #[error("fault of host device {sid} not recorded: {why}")]
    HostFault {
        /// The host requester id the record names.
        sid: SourceId,
        /// What is wrong with it.
        why: &'static str,
    },
    /// No passthrough device with this source id.
    #[error("no passthrough device {0} is attached to the vIOMMU")]
    NotAttached(SourceId),
}

/// A host call the vIOMMU made on the guest's behalf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostCall {
    /// PASID allocation for a virtual command.
    PasidAlloc,
    /// PASID free for a virtual command.
    PasidFree(Pasid),
    /// Bind of a guest PASID entry.
    Bind(BindGpasid),
    /// Unbind of a bound PASID.
    Unbind(BindGpasid),
    /// Cache invalidation.
    CacheInvalidate(CacheInvalidate),
    /// Page group response to the host device.
    PageResponse(SourceId, PageResponse),
    /// Attach of a guest-owned PASID (CD) table.
    AttachPasidTable(PasidTableConfig),
    /// Detach of the guest-owned PASID table.
    DetachPasidTable,
    /// iommufd: a nested HWPT with these guest STE words (`IOMMU_HWPT_ALLOC` under the
    /// vIOMMU) attached to the device (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`); for stage 2
    /// alone, the bypass STE's words.
    NestedHwpt([u64; 2]),
    /// iommufd: the command `IOMMU_HWPT_INVALIDATE` on the vIOMMU refused.
    ViommuInvalidate([u64; 2]),
}

/// A host call that failed. The guest is not told (hardware has no way to), but the
/// device sees the consequence: a PASID that is not bound faults.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{call:?} failed: {error}")]
pub struct HostCallError {
    /// What was asked.
    pub call: HostCall,
    /// The host's answer.
    pub error: Errno,
}
