//! The iommufd uAPI (`/dev/iommu`), beside the VFIO type1 container, on the same host
//! IOMMU drivers: what `drivers/iommu/iommufd/` does for a VMM.
//!
//! - `ctx`: the core of one open `/dev/iommu` whatever the IOMMU: its objects by id,
//!   one ioctl table per configuration (`iommufd_ioctl_ops`: number, argument sizes,
//!   handler), IOASes, paging HWPTs, devices; the vendor part behind [`IommuOps`].
//! - [`IommufdFile`]: the file on the host's VT-d unit ([`Vtd`]): nested HWPTs (a guest
//!   stage-1 table over a nest parent, attached at a PASID), fault queues, dirty tracking.
//! - [`smmu::SmmuIommufdFile`]: the file on the host's SMMUv3 ([`smmu::Smmu`]): vIOMMU,
//!   vDEVICE, nested STEs, vEVENT queues.
//! - [`device::VfioDeviceFile`]: a VFIO device cdev (`/dev/vfio/devices/vfioN`) that binds
//!   its device to an iommufd and attaches it to a page table.
//! - [`iopt`]: an IOAS's IOVA space and its rules.
//!
//! Objects reference each other (a HWPT its IOAS, a device the HWPT it is attached to);
//! `IOMMU_DESTROY` of a referenced object is EBUSY, of an unknown id ENOENT. An id never
//! names an object of another file, so one VMM never reaches another's objects. Every
//! ioctl checks everything before its first change, and undoes its changes when the
//! hardware refuses one, so a failed ioctl changes nothing.

mod ctx;
pub mod device;
mod error;
pub mod fault;
mod inval;
pub mod iopt;
pub mod map_file;
pub mod smmu;
mod user;
pub mod vevent;
mod vtd;

pub use ctx::{
    Device, File, Handler, HwInfo, HwptPaging, IoctlOp, IommuOps, IommufdCtx, Object, PagingDomain,
};
pub use error::IommufdError;
pub use vtd::{Ctx, IommufdFile, ObjectState, Vtd};
