//! `IOMMU_IOAS_MAP_FILE` (`iommufd_ioas_map_file` in `ioas.c`, `iopt_map_file_pages` in
//! `io_pagetable.c`): a range of a memory file mapped into an IOAS in place, for the
//! host's own iommufd files and for the service, which hands its connection's windows in.
//!
//! The kernel gives each map an `iopt_pages` of `[start, start + length)` of the file
//! (`iopt_alloc_file_pages`): it holds a reference on the file and pins the folios of that
//! range only (`memfd_pin_folios`), and it goes, unpinning them and dropping the file, with
//! the last area that uses it (`IOMMU_IOAS_COPY` of an area shares it; an unmap or the
//! IOAS's destruction removes areas). Here the range becomes host memory of its own
//! ([`FilePages`]: [`HostMemory::adopt_window`] of the file from `start`), which the
//! iommufd keeps until no area of its IOASes reaches into it. The window's mapping holds
//! the file, so closing the descriptor keeps the mapping working, as the kernel's file
//! reference does. The file must be a memfd that takes `F_SEAL_SHRINK`, so that it can
//! never be truncated under the mapping. Memory the caller shares already (the service's
//! `ADD_MEMORY` windows) is found by the file's inode and mapped where it is.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use vsva_hw::memory::{FrameAllocator, HostMemory, PAGE_SIZE};
use vsva_vtd::addr::Hpa;

use super::iopt::Area;
use super::IommufdError;

/// A file's identity: device and inode numbers.
pub type Inode = (u64, u64);

/// What runs when [`FilePages`] go (the service's accounting).
pub type OnRelease = Box<dyn FnOnce() + Send>;

/// The pages of `[start, start + length)` of a memory file that areas of an IOAS map
/// (`struct iopt_pages` of a file): host memory at `hpa` while this lives; dropping it
/// returns the range to host memory, which drops the file.
pub struct FilePages {
    frames: Arc<FrameAllocator>,
    hpa: Hpa,
    length: u64,
    user: u64,
    on_release: Option<OnRelease>,
}

impl std::fmt::Debug for FilePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilePages")
            .field("hpa", &self.hpa)
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

impl FilePages {
    /// `[start, start + length)` of `file` (whole pages, inside the file, a memfd sealed
    /// against shrinking) as host memory from `frames`: ENOMEM without frames, EINVAL when
    /// the memory refuses the file. `on_release` runs when the pages go.
    pub fn adopt(
        frames: &Arc<FrameAllocator>,
        file: &File,
        start: u64,
        length: u64,
        on_release: OnRelease,
    ) -> Result<FilePages, IommufdError> {
        let hpa = frames
            .alloc_range(length, PAGE_SIZE)
            .map_err(|_| IommufdError::NoMemory("memory file pages"))?;
        match frames.memory().adopt_window(hpa, file, start, length) {
            Ok(user) => Ok(FilePages {
                frames: frames.clone(),
                hpa,
                length,
                user,
                on_release: Some(on_release),
            }),
            Err(e) => {
                if let Err(f) = frames.free(hpa) {
                    tracing::error!("freeing refused memory file pages at {hpa}: {f}");
                }
                Err(IommufdError::invalid("iommu_ioas_map_file", e.to_string()))
            }
        }
    }

    /// The user address the pages are reached at.
    pub fn user(&self) -> u64 {
        self.user
    }

    /// Whether area `a` maps any of the pages.
    pub(crate) fn used_by(&self, a: &Area) -> bool {
        a.hpa < self.hpa.0 + self.length && self.hpa.0 < a.hpa + a.length
    }

    fn memory(&self) -> &Arc<HostMemory> {
        self.frames.memory()
    }
}

impl Drop for FilePages {
    /// Unpins: the range is host memory again and its frames are free.
    fn drop(&mut self) {
        match self.memory().return_window(self.hpa, self.length) {
            Ok(()) => {
                if let Err(e) = self.frames.free(self.hpa) {
                    tracing::error!("freeing memory file pages at {}: {e}", self.hpa);
                }
            }
            Err(e) => tracing::error!("returning memory file pages at {}: {e}", self.hpa),
        }
        if let Some(f) = self.on_release.take() {
            f();
        }
    }
}

/// Where a memory file's pages become host memory for a map.
pub trait MemoryFiles {
    /// The user address and size of memory the caller shares already that is file `ino`
    /// from its first byte (the service's `ADD_MEMORY` windows), if any.
    fn shared(&self, ino: Inode) -> Option<(u64, u64)>;
    /// Makes `[start, start + length)` of `file` host memory for a map
    /// ([`FilePages::adopt`], within the caller's limits: ENOSPC past them).
    fn pin(&mut self, file: &File, start: u64, length: u64) -> Result<FilePages, IommufdError>;
}

/// The memory a map of `[start, +length)` of the file `fd` names reaches: its user
/// address, and the file's pages made host memory for it (none for memory the caller
/// shares already). EBADF without a file; EOVERFLOW when the range wraps; EINVAL for an
/// empty range or one not in whole pages, a range beyond the file (or beyond the shared
/// memory of a shared file), or a file that is not a memfd (or cannot be sealed against
/// shrinking).
pub(crate) fn pages_of(
    files: &mut dyn MemoryFiles,
    fd: i32,
    file: Option<OwnedFd>,
    start: u64,
    length: u64,
) -> Result<(u64, Option<FilePages>), IommufdError> {
    const WHAT: &str = "iommu_ioas_map_file";
    let file = file.ok_or(IommufdError::BadFd(fd))?;
    let end = start
        .checked_add(length)
        .ok_or(IommufdError::Overflow(WHAT))?;
    if length == 0 || start % PAGE_SIZE != 0 || length % PAGE_SIZE != 0 {
        return Err(IommufdError::invalid(
            WHAT,
            "start and length must be whole pages",
        ));
    }
    let file = File::from(file);
    let meta = file.metadata().map_err(|_| IommufdError::BadFd(fd))?;
    let beyond = || IommufdError::invalid(WHAT, "the range ends beyond the file");
    if let Some((user, size)) = files.shared((meta.dev(), meta.ino())) {
        if end > size {
            return Err(beyond());
        }
        return Ok((user + start, None));
    }
    if end > meta.len() {
        return Err(beyond());
    }
    // SAFETY: F_ADD_SEALS and F_GET_SEALS on an open descriptor we own only add a seal
    // and read the seals.
    let seals = unsafe {
        libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK);
        libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS)
    };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(IommufdError::invalid(
            WHAT,
            "not a memfd that can be sealed against shrinking",
        ));
    }
    let pages = files.pin(&file, start, length)?;
    Ok((pages.user(), Some(pages)))
}

/// The memory files of an open `/dev/iommu` of the host (the in-process path): pages from
/// the IOMMU's frame allocator, nothing shared beforehand.
#[derive(Debug)]
pub(crate) struct FileWindows(pub(crate) Arc<FrameAllocator>);

impl MemoryFiles for FileWindows {
    fn shared(&self, _ino: Inode) -> Option<(u64, u64)> {
        None
    }

    fn pin(&mut self, file: &File, start: u64, length: u64) -> Result<FilePages, IommufdError> {
        FilePages::adopt(&self.0, file, start, length, Box::new(|| {}))
    }
}

/// The open file descriptor `fd` of this process, duplicated (`fget`): `None` for a
/// number nothing is open at.
pub(crate) fn dup_fd(fd: i32) -> Option<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the fd table: any number is either open (a new
    // descriptor is returned) or not (-1, EBADF).
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return None;
    }
    // SAFETY: `new` is a fresh descriptor this call owns.
    Some(unsafe { OwnedFd::from_raw_fd(new) })
}
