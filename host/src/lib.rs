//! The host side of vsva: what the kernel does between a VMM's VFIO ioctls and the IOMMU.
//!
//! - [`pasid`]: the global PASID space, handed out through per-VM sets with quotas.
//! - [`uapi`]: the byte ABI of the VFIO type1 SVA ioctls, with typed views.
//! - [`container`]: a VM's VFIO container: ioctl dispatch, ownership checks, and the
//!   [`IommuBackend`] trait the host IOMMU driver implements.
//! - [`error`]: one error type whose variants carry the errno Linux returns.

pub mod container;
pub mod error;
pub mod pasid;
pub mod uapi;

pub use container::{
    BackendInfo, Container, ContainerState, IommuBackend, IommuModel, SharedPasidAllocator,
    Type1Info,
};
pub use error::{Errno, HostError};
pub use pasid::{PasidAllocator, PasidSetId, DEFAULT_QUOTA};
