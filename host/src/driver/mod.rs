//! The host VT-d IOMMU driver: what Linux's intel-iommu (`drivers/iommu/intel/iommu.c`,
//! `pasid.c`, `svm.c`, v5.10 with the seed series) does for VFIO containers, on the
//! physical VT-d model of `vsva-hw`. The machinery the guest's driver shares (queued
//! invalidation, descriptors, the page request ring, entry writes, register handshakes)
//! is `vsva_vtd_driver`; this module holds the host's policy and bookkeeping.
//!
//! - [`HostIommu`]: one unit: set-up through its registers, root/context/PASID tables,
//!   queued invalidation (submit and wait), domain ids, fault and page request
//!   interrupts, page responses.
//! - [`VtdDomain`]: one container's domain: its second-level table from `MAP_DMA`, its
//!   devices, the guest page tables bound to its PASIDs (nested translation), and guest
//!   cache invalidations; it is the container's [`IommuBackend`](crate::container::IommuBackend).
//!   A domain allocated for it tracks the pages its devices write (SLADE) and reads them
//!   out into a [`DirtyBitmap`].
//!
//! Page requests and first-level unrecoverable faults on a bound PASID go to the fault
//! queue of the domain's container ([`crate::fault::FaultSink`]), and the VMM's page
//! responses come back through
//! [`IommuBackend::page_response`](crate::container::IommuBackend::page_response).

mod device;
mod did;
mod dirty;
mod dma_fault;
mod domain;
mod error;
mod frames;
mod nested;
mod prq;
mod qi;
mod regs;
mod tables;
mod unit;

pub use did::{DomainIdAllocator, FIRST_DOMAIN_ID};
pub use dirty::DirtyBitmap;
pub use domain::VtdDomain;
pub use error::DriverError;
pub use nested::{ADDR_WIDTH_4LEVEL, ADDR_WIDTH_5LEVEL};
pub use unit::{HostIommu, RID_PASID};
