//! Errors of the host layer, each carrying the errno Linux returns for the same failure.
//!
//! The choice of errno follows the seed series' `vfio_iommu_type1.c` and the Linux v5.10
//! IOMMU core where they define one; each variant's doc names its source.

use vsva_vtd::{addr::Pasid, addr::SourceId};

use vsva_uapi::{error::Errno, error::UapiError};

use crate::pasid::PasidSetId;

/// A failed host operation. Every failure leaves the state it was applied to unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// An argument that does not decode (`-EFAULT` for a short buffer, else `-EINVAL`).
    #[error(transparent)]
    Uapi(#[from] UapiError),
    /// The set already holds its quota of PASIDs (ioasid quota; vfio returns `-ENOSPC`).
    #[error("{set} holds its quota of {quota} PASIDs")]
    QuotaExceeded {
        /// The set that asked.
        set: PasidSetId,
        /// How many PASIDs it may hold at a time.
        quota: u32,
    },
    /// Every PASID set slot is in use (`-ENOSPC`): a new container gets no set.
    #[error("{max} PASID sets are live: no set can be created")]
    TooManySets {
        /// How many sets may be live at once.
        max: usize,
    },
    /// Every PASID in the requested range is taken (`-ENOSPC`).
    #[error("no free PASID in [{min:#x}, {max:#x}]")]
    NoFreePasid {
        /// The lowest PASID asked for.
        min: u32,
        /// The highest PASID asked for.
        max: u32,
    },
    /// The PASID is not allocated to the caller's set. The seed's `vfio_iommu_type1` returns
    /// `-EPERM` both for a PASID of another set and for one that is not allocated.
    #[error("{pasid} is not owned by {set}{}", match .owner {
        Some(o) => format!(" (owned by {o})"),
        None => " (not allocated)".to_string(),
    })]
    NotOwner {
        /// The PASID named in the request.
        pasid: Pasid,
        /// The caller's set.
        set: PasidSetId,
        /// The set that owns the PASID, if it is allocated.
        owner: Option<PasidSetId>,
    },
    /// The PASID set does not exist (`-EINVAL`).
    #[error("{0} does not exist")]
    UnknownSet(PasidSetId),
    /// No such ioctl on a container (`-ENOTTY`, the VFIO default).
    #[error("ioctl {0:#x} is not a VFIO container ioctl")]
    UnknownIoctl(u32),
    /// An IOMMU ioctl before `VFIO_SET_IOMMU` (VFIO's container ioctl default, `-EINVAL`).
    #[error("the container has no IOMMU model yet: call VFIO_SET_IOMMU first")]
    NoIommuModel,
    /// `VFIO_SET_IOMMU` on a container that already has one (`-EINVAL`).
    #[error("the container already uses an IOMMU model")]
    IommuModelSet,
    /// An IOMMU model no driver of this host offers (`-ENODEV`).
    #[error("IOMMU model {0} is not offered by this host")]
    UnsupportedIommuModel(u64),
    /// A nested-translation (SVA) ioctl on a container not set to `VFIO_TYPE1_NESTING_IOMMU`
    /// (`-EOPNOTSUPP`).
    #[error("{0} needs a VFIO_TYPE1_NESTING_IOMMU container")]
    NotNesting(&'static str),
    /// An IOMMU operation the host driver does not implement; the IOMMU core returns
    /// `-ENODEV` when the `iommu_ops` callback is absent (e.g. `attach_pasid_table` on VT-d).
    #[error("the host IOMMU driver does not implement {0}")]
    NoDriverOp(&'static str),
    /// The IOVA range overlaps an existing mapping (`vfio_find_dma` → `-EEXIST`).
    #[error("IOVA range {iova:#x}+{size:#x} overlaps an existing mapping")]
    DmaExists {
        /// Start of the requested IOVA range.
        iova: u64,
        /// Its length in bytes.
        size: u64,
    },
    /// The container holds its limit of DMA mappings (`dma_entry_limit` → `-ENOSPC`).
    #[error("the container holds its limit of {0} DMA mappings")]
    DmaLimit(usize),
    /// An unmap range that would split a mapping (type1 v2 semantics → `-EINVAL`).
    #[error("unmap {iova:#x}+{size:#x} would split an existing mapping")]
    UnmapSplits {
        /// Start of the requested unmap range.
        iova: u64,
        /// Its length in bytes.
        size: u64,
    },
    /// The PASID already has a guest page table bound (`-EBUSY`).
    #[error("{0} is already bound")]
    AlreadyBound(Pasid),
    /// Unbinding a PASID that is not bound (`-EINVAL`).
    #[error("{0} is not bound")]
    NotBound(Pasid),
    /// The per-PASID bind model and the guest-PASID-table model exclude each other (`-EBUSY`).
    #[error("{0}")]
    ModelConflict(&'static str),
    /// The device is attached to the container already (`-EBUSY`, as VFIO answers a group
    /// that is in a container).
    #[error("device {0} is already attached to the container")]
    DeviceAttached(SourceId),
    /// The device is bound to an iommufd through its VFIO cdev, so its group cannot join a
    /// container (`-EBUSY`, as `vfio_group_fops_open` answers while a device of the group
    /// is open through its cdev).
    #[error("device {0} is bound to an iommufd through its cdev")]
    DeviceOpenedByCdev(SourceId),
    /// The device is not attached to the container (`-EINVAL`).
    #[error("device {0} is not attached to the container")]
    DeviceNotAttached(SourceId),
    /// A page request without a PASID, or for a PASID outside the container's set, which the
    /// container does not take (`-EPERM`).
    #[error("page request from {sid} for {}: not a PASID of the container", match .pasid {
        Some(p) => p.to_string(),
        None => "no PASID".to_string(),
    })]
    UnownedPageRequest {
        /// The requester id of the device that sent it.
        sid: SourceId,
        /// Its PASID, if it carried one.
        pasid: Option<Pasid>,
    },
    /// An unrecoverable fault without a PASID, or for a PASID outside the container's set,
    /// which the container does not take (`-EPERM`).
    #[error("unrecoverable fault of {sid} for {}: not a PASID of the container", match .pasid {
        Some(p) => p.to_string(),
        None => "no PASID".to_string(),
    })]
    UnownedFault {
        /// The requester id of the device whose request faulted.
        sid: SourceId,
        /// Its PASID, if it carried one.
        pasid: Option<Pasid>,
    },
    /// The container's fault queue holds its limit of unread requests or pending groups
    /// (`-ENOSPC`).
    #[error("the fault queue holds its limit of {0} entries")]
    FaultQueueFull(usize),
    /// A page response that answers no pending page request group (`-EINVAL`, as
    /// `iommu_page_response` returns).
    #[error("no page request group {grpid}{} is waiting for a response", match .pasid {
        Some(p) => format!(" of {p}"),
        None => String::new(),
    })]
    NoPendingGroup {
        /// The page request group index the response named.
        grpid: u32,
        /// The PASID it named, if any.
        pasid: Option<Pasid>,
    },
    /// A failure reported by the host IOMMU driver; `errno` is the positive Linux value
    /// (e.g. `libc::EFAULT` for user memory that cannot be pinned).
    #[error("host IOMMU driver: {detail}")]
    Driver {
        /// The positive Linux errno.
        errno: i32,
        /// What failed, for the log.
        detail: String,
    },
}

impl HostError {
    /// The negative errno Linux returns for this failure.
    pub fn errno(&self) -> i32 {
        -self.positive_errno()
    }

    fn positive_errno(&self) -> i32 {
        use HostError::*;
        match self {
            Uapi(e) => Errno::from(e).raw(),
            UnknownSet(_)
            | NoIommuModel
            | IommuModelSet
            | UnmapSplits { .. }
            | NotBound(_)
            | DeviceNotAttached(_)
            | NoPendingGroup { .. } => libc::EINVAL,
            QuotaExceeded { .. }
            | TooManySets { .. }
            | NoFreePasid { .. }
            | DmaLimit(_)
            | FaultQueueFull(_) => libc::ENOSPC,
            NotOwner { .. } | UnownedPageRequest { .. } | UnownedFault { .. } => libc::EPERM,
            UnknownIoctl(_) => libc::ENOTTY,
            UnsupportedIommuModel(_) | NoDriverOp(_) => libc::ENODEV,
            NotNesting(_) => libc::EOPNOTSUPP,
            DmaExists { .. } => libc::EEXIST,
            AlreadyBound(_) | ModelConflict(_) | DeviceAttached(_) | DeviceOpenedByCdev(_) => {
                libc::EBUSY
            }
            Driver { errno, .. } => *errno,
        }
    }

    /// A field error (`-EINVAL`).
    pub(crate) fn field(what: &'static str, detail: impl Into<String>) -> Self {
        UapiError::field(what, detail).into()
    }
}

/// The errno a VMM sees for a failed host operation.
impl From<&HostError> for Errno {
    fn from(e: &HostError) -> Errno {
        Errno::new(e.errno())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_negative_and_matches_linux() {
        let set = PasidSetId::from_raw(3);
        let p = Pasid::new(5).unwrap();
        assert_eq!(HostError::UnknownIoctl(0).errno(), -libc::ENOTTY);
        assert_eq!(
            HostError::QuotaExceeded { set, quota: 1 }.errno(),
            -libc::ENOSPC
        );
        let e = HostError::NotOwner {
            pasid: p,
            set,
            owner: None,
        };
        assert_eq!(e.errno(), -libc::EPERM);
        assert!(e.to_string().contains("not allocated"), "{e}");
        assert_eq!(HostError::NoDriverOp("x").errno(), -libc::ENODEV);
        assert_eq!(
            HostError::Driver {
                errno: libc::EFAULT,
                detail: "x".into()
            }
            .errno(),
            -libc::EFAULT
        );
    }
}
