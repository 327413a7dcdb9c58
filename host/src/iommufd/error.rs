//! Errors of the iommufd context, each with the errno Linux's iommufd returns for the
//! same failure (`drivers/iommu/iommufd/`: main.c, ioas.c, io_pagetable.c,
//! hw_pagetable.c, device.c).

use vsva_uapi::{error::Errno, error::UapiError};

use crate::driver::DriverError;
use crate::error::HostError;

/// A failed iommufd operation; nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IommufdError {
    /// An argument that does not decode (size rules, EFAULT, EOPNOTSUPP, EINVAL).
    #[error(transparent)]
    Uapi(#[from] UapiError),
    /// The host IOMMU driver refused.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The host SMMUv3 driver refused.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Data the SMMU must not be given: an STE field or a command a VM may not set
    /// (`-EIO`, which arm-smmu-v3's iommufd code keeps for exactly this).
    #[error("{what}: {detail}")]
    Io {
        /// What was refused.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// Not an ioctl of this file (`-ENOTTY`).
    #[error("ioctl {0:#x} is not an ioctl of this file")]
    UnknownIoctl(u32),
    /// No object with this id, or not one of the type the ioctl takes (`-ENOENT`, as
    /// `iommufd_get_object` answers both).
    #[error("no {want} with id {id}")]
    NoObject {
        /// The id given.
        id: u32,
        /// The type the ioctl takes.
        want: &'static str,
    },
    /// An object of the wrong type where several types are taken (a page-table id that is
    /// a device, say: `-EINVAL`).
    #[error("object {id} is a {is}, which {what} does not take")]
    WrongType {
        /// The id given.
        id: u32,
        /// Its type.
        is: &'static str,
        /// The operation.
        what: &'static str,
    },
    /// The object is referenced by another or attached (`-EBUSY`).
    #[error("{0}")]
    Busy(&'static str),
    /// A field value refused (`-EINVAL`).
    #[error("{what}: {detail}")]
    Invalid {
        /// What was refused.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// An IOVA or id range that does not exist (`-ENOENT`).
    #[error("{0}")]
    NoEntry(&'static str),
    /// Arithmetic overflow (`-EOVERFLOW`).
    #[error("{0}: overflow")]
    Overflow(&'static str),
    /// The IOVA range is mapped already (`-EEXIST`).
    #[error("{0}: exists")]
    Exists(&'static str),
    /// No room left (`-ENOSPC`).
    #[error("{0}: no space left")]
    NoSpace(&'static str),
    /// Host memory ran out (`-ENOMEM`).
    #[error("{0}: out of memory")]
    NoMemory(&'static str),
    /// A range in use by a mapping or a reservation (`-EADDRINUSE`).
    #[error("{0}: address range in use")]
    AddrInUse(&'static str),
    /// A user pointer that does not resolve to the caller's memory (`-EFAULT`).
    #[error("{0}: bad address")]
    Fault(&'static str),
    /// An fd that is not open (`-EBADF`).
    #[error("fd {0} is not open")]
    BadFd(i32),
    /// An open fd that is not an iommufd (`-EBADFD`, as `iommufd_ctx_from_fd`).
    #[error("fd {0} is not an iommufd")]
    NotIommufd(i32),
    /// No fd can be handed out: the file was not opened through a process's fd table
    /// (`-EMFILE`).
    #[error("no fd table to install a file in")]
    NoFd,
    /// The output array holds fewer elements than there are (`-EMSGSIZE`; the count
    /// written back is the number needed).
    #[error("{0}: output array too small")]
    MsgSize(&'static str),
}

impl IommufdError {
    /// The positive errno Linux returns for this failure.
    pub fn errno(&self) -> i32 {
        use IommufdError::*;
        match self {
            Uapi(e) => Errno::from(e).raw(),
            Driver(e) => e.errno(),
            Host(e) => -e.errno(),
            Io { .. } => libc::EIO,
            UnknownIoctl(_) => libc::ENOTTY,
            NoObject { .. } | NoEntry(_) => libc::ENOENT,
            WrongType { .. } | Invalid { .. } => libc::EINVAL,
            Busy(_) => libc::EBUSY,
            Overflow(_) => libc::EOVERFLOW,
            Exists(_) => libc::EEXIST,
            NoSpace(_) => libc::ENOSPC,
            NoMemory(_) => libc::ENOMEM,
            AddrInUse(_) => libc::EADDRINUSE,
            MsgSize(_) => libc::EMSGSIZE,
            Fault(_) => libc::EFAULT,
            BadFd(_) => libc::EBADF,
            NotIommufd(_) => libc::EBADFD,
            NoFd => libc::EMFILE,
        }
    }

    /// A field error (`-EINVAL`).
    pub fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        IommufdError::Invalid {
            what,
            detail: detail.into(),
        }
    }

    /// Data the SMMU must not be given (`-EIO`).
    pub fn io(what: &'static str, detail: impl Into<String>) -> Self {
        IommufdError::Io {
            what,
            detail: detail.into(),
        }
    }

    /// A value not supported (`-EOPNOTSUPP`).
    pub fn not_supported(what: &'static str, detail: impl Into<String>) -> Self {
        UapiError::not_supported(what, detail).into()
    }
}

/// The errno a VMM sees.
impl From<&IommufdError> for Errno {
    fn from(e: &IommufdError) -> Errno {
        Errno::new(e.errno())
    }
}
