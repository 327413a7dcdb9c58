//! The host side of vsva: what the kernel does between a VMM's VFIO ioctls and the IOMMU.
//!
//! - [`pasid`]: the global PASID space, handed out through per-VM sets with quotas.
//! - [`container`]: a VM's VFIO container: ioctl dispatch, ownership checks, and the
//!   [`IommuBackend`](container::IommuBackend) trait the host IOMMU driver implements.
//! - [`driver`]: the host VT-d IOMMU driver: one unit's tables, queued invalidation and
//!   interrupts, and the per-container domain that implements [`IommuBackend`](container::IommuBackend).
//! - [`smmu`]: the host SMMUv3 driver: one SMMU's stream table, VMIDs and queues, and the
//!   per-container domain (stage 2 from `MAP_DMA`, the guest's CD table nested over it) that
//!   implements [`IommuBackend`](container::IommuBackend).
//! - [`fault`]: a container's page requests on their way to the VMM, and the groups that
//!   wait for a page response.
//! - [`file`](mod@file): a container as an open [`vsva_uapi::file::UapiFile`] ([`ContainerFile`](file::ContainerFile)): ioctls go through
//!   one dispatch table, fault records are read from it and page responses written.
//! - [`iommufd`]: the iommufd uAPI beside the container: an open `/dev/iommu`
//!   ([`iommufd::IommufdFile`]) with its objects, and the VFIO device cdev.
//! - [`error`]: one error type whose variants carry the errno Linux returns.

mod binds;
pub mod container;
pub mod driver;
pub mod error;
pub mod fault;
pub mod file;
mod harvest;
pub mod iommufd;
pub mod pasid;
pub mod smmu;
