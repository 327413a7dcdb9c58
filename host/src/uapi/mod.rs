//! The byte ABI between a VMM and the host: Linux v5.10 `include/uapi/linux/iommu.h` and
//! the VFIO type1 container ioctls with the seed series' SVA additions.
//!
//! - [`iommu`] and [`vfio`]: `#[repr(C)]` structures equal to the C ones, each with a
//!   validating `from_bytes` and a `to_bytes`, and the kernel's constant names.
//! - [`request`]: typed views of the same requests for Rust callers.

pub mod iommu;
pub mod request;
pub mod vfio;
pub(crate) mod wire;

pub use request::{
    BindGpasid, CacheInvalidate, DmaMap, InvGranularity, NestingInfo, PageRequest, PageResponse,
    PageResponseCode, PasidConfig, PasidTableConfig,
};
