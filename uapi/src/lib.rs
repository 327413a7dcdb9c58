//! The byte ABI between a VMM and the host kernel: Linux v5.10 `include/uapi/linux/iommu.h`
//! and the VFIO type1 container ioctls with the seed series' SVA additions.
//!
//! - [`iommu`] and [`vfio`]: the structures, each with a validating `from_bytes` and a
//!   `to_bytes`, and the kernel's constant names. VFIO type1 structures Linux merged come
//!   from `vfio-bindings`; what never merged is hand-written `#[repr(C)]`.
//! - [`iommufd`]: the iommufd uAPI (`/dev/iommu`) and the VFIO device cdev ioctls, layouts
//!   from `iommufd-bindings` and `vfio-bindings`, and the kernel's argument size rules.
//! - [`request`]: typed views of the same requests for Rust callers.
//! - [`file`](mod@file): [`UapiFile`](file::UapiFile), the kernel as an open file, and [`VfioIoctls`](file::VfioIoctls), its typed
//!   container ioctls.
//! - [`error`]: [`Errno`](error::Errno) and the decoding errors with the errno each maps to.
//! - [`wire`]: the little-endian field-by-field encoding the structures share.

pub mod error;
pub mod file;
pub mod iommu;
pub mod iommufd;
pub mod request;
pub mod vfio;
pub mod wire;
