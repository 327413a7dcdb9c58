//! Errors of the host VT-d driver, each with the errno Linux's intel-iommu returns for the
//! same failure.

use vsva_vtd::regs::Iqei;
use vsva_vtd::{addr::Pasid, addr::SourceId, builder::BuildError, regs::RegError};

use crate::error::HostError;

/// A failed driver operation. Except where a variant says otherwise, nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// The unit lacks a capability the operation needs (`-ENODEV`, as an absent feature
    /// makes intel-iommu refuse the device or domain).
    #[error("the IOMMU does not support {0}")]
    Unsupported(&'static str),
    /// The operation is understood but not supported for this object (`-EOPNOTSUPP`), as
    /// intel-iommu and iommufd refuse dirty tracking on a domain without dirty-tracking
    /// operations or on a PASID entry of a type without a second level.
    #[error("{0} is not supported")]
    NotSupported(&'static str),
    /// A register access the model refused (`-EIO`).
    #[error("register access failed: {0}")]
    Register(#[from] RegError),
    /// Host memory for tables or queues is exhausted (`-ENOMEM`).
    #[error("out of host memory for IOMMU structures")]
    OutOfMemory,
    /// Host memory could not be read or written (`-EFAULT`).
    #[error("host memory access failed: {0}")]
    Memory(String),
    /// User memory that does not resolve to host memory (`pin_user_pages` fails: `-EFAULT`).
    #[error("user range {vaddr:#x}+{size:#x} is not backed by host memory")]
    BadUserAddress {
        /// Start of the user range (the VMM's virtual address).
        vaddr: u64,
        /// Its length in bytes.
        size: u64,
    },
    /// Arithmetic on a user range overflows (`-EOVERFLOW`, iommufd's
    /// `iommufd_check_iova_range`).
    #[error("range {iova:#x}+{length:#x} overflows")]
    Overflow {
        /// Start of the range.
        iova: u64,
        /// Its length in bytes.
        length: u64,
    },
    /// An IOVA range beyond the domain's address width (`-EINVAL`, as `vfio_dma_do_map`
    /// refuses a range outside the domain's aperture, `__DOMAIN_MAX_ADDR(gaw)`).
    #[error("IOVA range {iova:#x}+{size:#x} is beyond the {width}-bit address width")]
    IovaOutOfRange {
        /// Start of the IOVA range.
        iova: u64,
        /// Its length in bytes.
        size: u64,
        /// The domain's address width in bits.
        width: u32,
    },
    /// An argument the driver refuses (`-EINVAL`).
    #[error("{what}: {detail}")]
    InvalidArgument {
        /// The argument refused.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// An invalidation whose address is not aligned to its size (`-ERANGE`, as
    /// `intel_iommu_sva_invalidate` answers).
    #[error("invalidation address {addr:#x} is not aligned to its {pages} pages")]
    Misaligned {
        /// The invalidation's address.
        addr: u64,
        /// The number of 4 KiB pages it covers.
        pages: u64,
    },
    /// Every domain id is in use (`-ENOSPC`).
    #[error("no free domain id")]
    NoDomainId,
    /// The device is attached already (`-EBUSY`).
    #[error("device {0} is attached already")]
    DeviceBusy(SourceId),
    /// The device is not attached to this domain (`-ENODEV`).
    #[error("device {0} is not attached to this domain")]
    NotAttached(SourceId),
    /// The PASID entry is in use (`-EBUSY`, `intel_pasid_setup_nested`).
    #[error("{pasid} of device {sid} is in use")]
    PasidBusy {
        /// The device.
        sid: SourceId,
        /// The PASID whose entry is present.
        pasid: Pasid,
    },
    /// The PASID is not bound in this domain (`-ENODEV`, `intel_svm_page_response`).
    #[error("{0} is not bound in this domain")]
    NotBound(Pasid),
    /// The invalidation queue stopped on a descriptor (FSTS.IQE). The descriptor was
    /// replaced with the batch's wait so that the queue could go on (`qi_check_fault`);
    /// the invalidation may not have happened (`-EIO`).
    #[error("the invalidation queue refused descriptor {index} ({iqei:?})")]
    QueueError {
        /// IQERCD.IQEI: why the unit refused the descriptor (VT-d 10.4.33).
        iqei: Iqei,
        /// The refused descriptor's slot in the queue.
        index: u64,
    },
    /// An invalidation wait did not complete (`-ETIMEDOUT`).
    #[error("invalidation wait did not complete")]
    QueueTimeout,
    /// A device-TLB invalidation timed out (FSTS.ITE) on every resubmission of its batch
    /// (`-ETIMEDOUT`).
    #[error("device-TLB invalidation timed out")]
    InvalidationTimeout,
    /// A global command whose status bit did not follow (`-ETIMEDOUT`, as
    /// `IOMMU_WAIT_OP` panics in Linux).
    #[error("GSTS did not reflect {0}")]
    StatusTimeout(&'static str),
}

impl DriverError {
    /// The positive errno Linux returns for this failure.
    pub fn errno(&self) -> i32 {
        use DriverError::*;
        match self {
            Unsupported(_) | NotAttached(_) | NotBound(_) => libc::ENODEV,
            NotSupported(_) => libc::EOPNOTSUPP,
            Register(_) | QueueError { .. } => libc::EIO,
            OutOfMemory => libc::ENOMEM,
            Memory(_) | BadUserAddress { .. } => libc::EFAULT,
            InvalidArgument { .. } | IovaOutOfRange { .. } => libc::EINVAL,
            Overflow { .. } => libc::EOVERFLOW,
            Misaligned { .. } => libc::ERANGE,
            NoDomainId => libc::ENOSPC,
            DeviceBusy(_) | PasidBusy { .. } => libc::EBUSY,
            QueueTimeout | InvalidationTimeout | StatusTimeout(_) => libc::ETIMEDOUT,
        }
    }

    /// An argument error.
    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        DriverError::InvalidArgument {
            what,
            detail: detail.into(),
        }
    }
}

impl From<BuildError> for DriverError {
    fn from(e: BuildError) -> Self {
        match e {
            BuildError::OutOfFrames => DriverError::OutOfMemory,
            BuildError::Memory(m) => DriverError::Memory(m.to_string()),
            other => DriverError::invalid("second-level table", other.to_string()),
        }
    }
}

impl From<vsva_mem::MemError> for DriverError {
    fn from(e: vsva_mem::MemError) -> Self {
        DriverError::Memory(e.to_string())
    }
}

impl From<vsva_vtd_driver::Error> for DriverError {
    fn from(e: vsva_vtd_driver::Error) -> Self {
        use vsva_vtd_driver::Error as E;
        match e {
            E::Register(r) => DriverError::Register(r),
            E::Memory(m) => m.into(),
            E::Descriptor(d) => DriverError::invalid("invalidation descriptor", d.to_string()),
            E::PageRequest(d) => DriverError::invalid("page request descriptor", d.to_string()),
            E::QueueError { iqei, index } => DriverError::QueueError { iqei, index },
            E::InvalidationTimeout => DriverError::InvalidationTimeout,
            E::QueueTimeout => DriverError::QueueTimeout,
            E::StatusTimeout(what) => DriverError::StatusTimeout(what),
        }
    }
}

impl From<DriverError> for HostError {
    fn from(e: DriverError) -> Self {
        HostError::Driver {
            errno: e.errno(),
            detail: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_linux_errnos_into_host_errors() {
        let sid = SourceId::new(0, 3, 0).unwrap();
        let cases = [
            (DriverError::NoDomainId, libc::ENOSPC),
            (DriverError::DeviceBusy(sid), libc::EBUSY),
            (
                DriverError::Misaligned {
                    addr: 0x1000,
                    pages: 2,
                },
                libc::ERANGE,
            ),
            (DriverError::invalid("x", "y"), libc::EINVAL),
            (DriverError::OutOfMemory, libc::ENOMEM),
            (DriverError::NotSupported("x"), libc::EOPNOTSUPP),
            (
                DriverError::Overflow {
                    iova: 1,
                    length: u64::MAX,
                },
                libc::EOVERFLOW,
            ),
        ];
        for (e, errno) in cases {
            let host = HostError::from(e.clone());
            assert_eq!(host.errno(), -errno, "{e}");
            assert!(host.to_string().contains(&e.to_string()));
        }
    }
}
