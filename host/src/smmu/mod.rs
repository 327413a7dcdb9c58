//! The host SMMUv3 driver: what Linux's arm-smmu-v3 (`drivers/iommu/arm/arm-smmu-v3/`,
//! v5.10, with Eric Auger's "SMMUv3 Nested Stage Setup" series, v13) does for VFIO
//! containers, on the physical SMMUv3 model of `vsva-hw`. The machinery a guest driver
//! would share (queues, tables, update sequences) is `vsva_smmuv3_driver`; this module
//! holds the host's policy and bookkeeping.
//!
//! - [`SmmuHost`]: one SMMU: the shared driver behind a lock, VMIDs, which domain holds
//!   each stream, and the page requests of the PRI queue routed to the containers, served
//!   by an interrupt thread once [`SmmuHost::enable_interrupts`] took the MSIs (`irq`), or
//!   by [`SmmuHost::handle_queues`] when the owner polls.
//! - [`SmmuDomain`]: one container's domain: a VMID and the stage-2 table built from
//!   `MAP_DMA`; `VFIO_IOMMU_ATTACH_PASID_TABLE` makes its streams nested, stage 1 from the
//!   guest's CD table (at a guest physical address, walked through stage 2); the guest's
//!   invalidations come back through `VFIO_IOMMU_CACHE_INVALIDATE` as commands tagged with
//!   the domain's VMID. It is the container's [`IommuBackend`](crate::container::IommuBackend).
//!   On iommufd a paging HWPT allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` is a
//!   stage-1 domain instead, as Linux v6.13's `arm_smmu_domain_alloc_paging_flags` makes
//!   it: its own CD table with HA and HD, writable pages mapped writable-clean, their
//!   dirty state read and cleared by `dirty`.

mod dirty;
mod domain;
mod event;
mod irq;
mod unit;

pub use domain::{SmmuDomain, IPA_BITS, TLBI_RANGE_LIMIT};
pub use irq::{IrqStats, IRQ_JOIN_TIMEOUT, MSI_DOORBELL};
pub(crate) use unit::VeventSink;
pub use unit::{HostDma, HwRegisters, SmmuHost};

use crate::error::HostError;

/// The host error of a driver failure, with Linux's errno.
pub(crate) fn driver_error(e: vsva_smmuv3_driver::Error) -> HostError {
    use vsva_smmuv3_driver::Error::*;
    let errno = match e {
        NoMemory => libc::ENOMEM,
        BadStreamId(_) | BadSubstreamId(_) | BadSte(_) | BadCd(_) | IllegalCommand(_) => {
            libc::EINVAL
        }
        Unsupported(_) => libc::ENODEV,
        SyncTimeout | AckTimeout(_) => libc::ETIMEDOUT,
        Register(_) | Memory(_) | CommandError { .. } => libc::EIO,
    };
    HostError::Driver {
        errno,
        detail: format!("smmuv3: {e}"),
    }
}

/// An `-EINVAL` driver error.
pub(crate) fn invalid(detail: impl Into<String>) -> HostError {
    HostError::Driver {
        errno: libc::EINVAL,
        detail: format!("smmuv3: {}", detail.into()),
    }
}
