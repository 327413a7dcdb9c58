//! Errno values and the errors of decoding a uAPI structure.
//!
//! Which errno a malformed argument gets follows the kernel's copy rules (`-EFAULT` when
//! the user buffer is shorter than what must be copied) and the v5.10 `vfio_iommu_type1.c`
//! and `iommu.c` checks (`-EINVAL` for the rest).

use std::fmt;

/// An errno value, as an ioctl, `read` or `write` on a Linux file returns it (the positive
/// number; the system call returns its negation).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Errno(i32);

impl Errno {
    /// `EPERM`: operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// `EIO`: I/O error.
    pub const EIO: Errno = Errno(libc::EIO);
    /// `EAGAIN`: nothing to read yet.
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    /// `ENOMEM`: out of memory.
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    /// `EFAULT`: bad address (a user buffer too short for the copy).
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    /// `EBUSY`: resource busy.
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    /// `EEXIST`: already exists.
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    /// `ENODEV`: no such device (an IOMMU operation the driver lacks).
    pub const ENODEV: Errno = Errno(libc::ENODEV);
    /// `ENOENT`: no such object (an iommufd id or IOVA that does not exist).
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    /// `E2BIG`: a structure larger than the kernel knows with non-zero trailing bytes.
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    /// `EOVERFLOW`: arithmetic overflow.
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);
    /// `EBADF`: not an open file descriptor.
    pub const EBADF: Errno = Errno(libc::EBADF);
    /// `EBADFD`: an open file descriptor of another kind than the one asked for.
    pub const EBADFD: Errno = Errno(libc::EBADFD);
    /// `EMFILE`: no file descriptor can be handed out.
    pub const EMFILE: Errno = Errno(libc::EMFILE);
    /// `EMSGSIZE`: the output array was too small for every element.
    pub const EMSGSIZE: Errno = Errno(libc::EMSGSIZE);
    /// `EADDRINUSE`: an address range in use.
    pub const EADDRINUSE: Errno = Errno(libc::EADDRINUSE);
    /// `EINVAL`: invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// `ENOTTY`: not an ioctl of this file.
    pub const ENOTTY: Errno = Errno(libc::ENOTTY);
    /// `ENOSPC`: no space left.
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    /// `ERANGE`: result out of range.
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    /// `EOPNOTSUPP`: operation not supported.
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    /// `ETIMEDOUT`: timed out.
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);

    /// The errno `value`, given positive or negative (as a system call returns it).
    pub const fn new(value: i32) -> Errno {
        Errno(value.saturating_abs())
    }

    /// The positive errno value.
    pub const fn raw(self) -> i32 {
        self.0
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({self})")
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            std::io::Error::from_raw_os_error(self.0),
            self.0
        )
    }
}

impl std::error::Error for Errno {}

/// A uAPI structure that does not decode: the kernel would refuse the ioctl before doing
/// anything.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    /// `argsz` is below the size the kernel requires (`argsz < minsz` → `-EINVAL`).
    #[error("{what}: argsz {argsz} is smaller than the {min} bytes required")]
    ArgszTooSmall {
        /// The structure.
        what: &'static str,
        /// The caller's `argsz`.
        argsz: u32,
        /// The kernel's `minsz`.
        min: usize,
    },
    /// The argument buffer is shorter than the bytes the ioctl must read or write; the
    /// kernel's `copy_from_user`/`copy_to_user` would fault (`-EFAULT`).
    #[error("{what}: argument buffer holds {len} bytes, {need} needed")]
    BufferTooShort {
        /// The structure.
        what: &'static str,
        /// Bytes given.
        len: usize,
        /// Bytes the copy needs.
        need: usize,
    },
    /// Flags outside the defined set (`-EINVAL`).
    #[error("{what}: unknown flags {flags:#x} (defined: {known:#x})")]
    UnknownFlags {
        /// The structure.
        what: &'static str,
        /// The flags given.
        flags: u64,
        /// The flags defined.
        known: u64,
    },
    /// A structure version this uAPI does not define (`-EINVAL`).
    #[error("{what}: version {version} is not supported (expected {expected})")]
    BadVersion {
        /// The structure.
        what: &'static str,
        /// The version given.
        version: u32,
        /// The version defined.
        expected: u32,
    },
    /// A field out of range, misaligned, overflowing, or a reserved field not zero (`-EINVAL`).
    #[error("{what}: {detail}")]
    InvalidField {
        /// The structure.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A structure larger than the kernel's whose bytes past the kernel's size are not all
    /// zero (`copy_struct_from_user` → `-E2BIG`).
    #[error("{what}: {size} bytes given, bytes past the {known} known are not zero")]
    TrailingBytes {
        /// The structure.
        what: &'static str,
        /// The caller's size.
        size: u32,
        /// The kernel's `sizeof`.
        known: usize,
    },
    /// A field value the structure defines but this kernel does not support: unknown
    /// flags, non-zero reserved fields, unknown data types (iommufd's `-EOPNOTSUPP`).
    #[error("{what}: {detail}")]
    NotSupported {
        /// The structure.
        what: &'static str,
        /// What is not supported.
        detail: String,
    },
    /// A PASID range with `min > max` or beyond 20 bits (`-EINVAL`).
    #[error("PASID range [{min:#x}, {max:#x}] is empty or exceeds 20 bits")]
    BadPasidRange {
        /// Lowest PASID asked for.
        min: u32,
        /// Highest PASID asked for.
        max: u32,
    },
    /// A bind type other than `VFIO_IOMMU_BIND_GUEST_PASID`; the seed's `VFIO_IOMMU_BIND`
    /// returns `-EINVAL` for it.
    #[error("bind type {0} is not supported (only VFIO_IOMMU_BIND_GUEST_PASID)")]
    UnsupportedBindType(u32),
}

impl UapiError {
    /// The negative errno Linux returns for this failure.
    pub fn errno(&self) -> i32 {
        -Errno::from(self).raw()
    }

    /// A field error (`-EINVAL`).
    pub fn field(what: &'static str, detail: impl Into<String>) -> Self {
        UapiError::InvalidField {
            what,
            detail: detail.into(),
        }
    }

    /// A value not supported (`-EOPNOTSUPP`).
    pub fn not_supported(what: &'static str, detail: impl Into<String>) -> Self {
        UapiError::NotSupported {
            what,
            detail: detail.into(),
        }
    }
}

impl From<&UapiError> for Errno {
    fn from(e: &UapiError) -> Errno {
        match e {
            UapiError::BufferTooShort { .. } => Errno::EFAULT,
            UapiError::TrailingBytes { .. } => Errno::E2BIG,
            UapiError::NotSupported { .. } => Errno::EOPNOTSUPP,
            _ => Errno::EINVAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_values_match_linux() {
        assert_eq!(Errno::new(-libc::ENOTTY), Errno::ENOTTY);
        assert_eq!(Errno::new(libc::EPERM).raw(), 1);
        assert_eq!(
            UapiError::BufferTooShort {
                what: "x",
                len: 0,
                need: 4
            }
            .errno(),
            -libc::EFAULT
        );
        assert_eq!(UapiError::UnsupportedBindType(0).errno(), -libc::EINVAL);
        assert!(Errno::EINVAL.to_string().contains("(22)"));
    }
}
