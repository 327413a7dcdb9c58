//! `IOMMU_IOAS_MAP_FILE` (`iommufd_ioas_map_file` in `ioas.c`, `iopt_map_file_pages` in
//! `io_pagetable.c`): a range of a memory file mapped into an IOAS in place, for the
//! host's own iommufd files and for the service, which hands its connection's windows in.
//!
//! The kernel pins the file's folios (`memfd_pin_folios`: a shmem or hugetlbfs file, the
//! range inside it); here the file's pages become host memory as a window
//! ([`HostMemory::adopt_window`]: a memfd that takes `F_SEAL_SHRINK`, so it can never be
//! truncated under the mapping), and the range is mapped as `IOMMU_IOAS_MAP` of the
//! window's user address. A file adopted once (same inode) is found again; a window made
//! for a map that fails is given back at once.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use vsva_hw::memory::{FrameAllocator, HostMemory, PAGE_SIZE};
use vsva_vtd::addr::Hpa;

use super::IommufdError;

/// A file's identity: device and inode numbers.
pub type Inode = (u64, u64);

/// Where memory files' pages are host memory: the windows a file (or a service
/// connection) has adopted.
pub trait MemoryFiles {
    /// The user address and size of the window of file `ino`, if it has one.
    fn find(&self, ino: Inode) -> Option<(u64, u64)>;
    /// Adopts the first `size` bytes of `file` (`ino`) as a window: its user address.
    /// EINVAL for a file that is not a memfd sealed against shrinking.
    fn adopt(&mut self, file: OwnedFd, ino: Inode, size: u64) -> Result<u64, IommufdError>;
    /// Gives back the window of `ino` that [`MemoryFiles::adopt`] made for a map that
    /// then failed.
    fn give_back(&mut self, ino: Inode);
}

/// The file `fd` names as the window a map of `[start, +length)` of it reaches: its
/// user address and whether it was adopted now. EBADF without a file; EOVERFLOW when the
/// range wraps; EINVAL for an empty range or one not in whole pages, a range beyond the
/// file (or beyond the window of a file adopted already), or a file that is not a memfd
/// (or cannot be sealed against shrinking).
pub(crate) fn window_of(
    files: &mut dyn MemoryFiles,
    fd: i32,
    file: Option<OwnedFd>,
    start: u64,
    length: u64,
) -> Result<(u64, Option<Inode>), IommufdError> {
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
    let ino = (meta.dev(), meta.ino());
    let beyond = || IommufdError::invalid(WHAT, "the range ends beyond the file");
    if let Some((user, size)) = files.find(ino) {
        if end > size {
            return Err(beyond());
        }
        return Ok((user + start, None));
    }
    let size = meta.len() & !(PAGE_SIZE - 1);
    if end > size {
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
    let user = files.adopt(OwnedFd::from(file), ino, size)?;
    Ok((user + start, Some(ino)))
}

/// A window of one of a file's memory files.
#[derive(Debug)]
struct Window {
    ino: Inode,
    hpa: Hpa,
    size: u64,
    user: u64,
}

/// The windows of an open `/dev/iommu` of the host (the in-process path): host memory
/// from the IOMMU's frame allocator; they go back when the file closes.
#[derive(Debug)]
pub(crate) struct FileWindows {
    frames: Arc<FrameAllocator>,
    windows: Vec<Window>,
}

impl FileWindows {
    pub(crate) fn new(frames: Arc<FrameAllocator>) -> Self {
        FileWindows {
            frames,
            windows: Vec::new(),
        }
    }

    fn memory(&self) -> &Arc<HostMemory> {
        self.frames.memory()
    }

    fn release(&self, w: &Window) {
        if let Err(e) = self.memory().return_window(w.hpa, w.size) {
            tracing::error!("returning a memory file's window at {}: {e}", w.hpa);
            return;
        }
        if let Err(e) = self.frames.free(w.hpa) {
            tracing::error!("freeing a memory file's window at {}: {e}", w.hpa);
        }
    }

    /// Returns every window (the file closes; nothing maps them any more).
    pub(crate) fn release_all(&mut self) {
        for w in std::mem::take(&mut self.windows) {
            self.release(&w);
        }
    }
}

impl MemoryFiles for FileWindows {
    fn find(&self, ino: Inode) -> Option<(u64, u64)> {
        self.windows
            .iter()
            .find(|w| w.ino == ino)
            .map(|w| (w.user, w.size))
    }

    fn adopt(&mut self, file: OwnedFd, ino: Inode, size: u64) -> Result<u64, IommufdError> {
        let hpa = self
            .frames
            .alloc_range(size, PAGE_SIZE)
            .map_err(|_| IommufdError::NoMemory("memory file window"))?;
        match self.memory().adopt_window(hpa, &File::from(file), size) {
            Ok(user) => {
                self.windows.push(Window {
                    ino,
                    hpa,
                    size,
                    user,
                });
                Ok(user)
            }
            Err(e) => {
                if let Err(f) = self.frames.free(hpa) {
                    tracing::error!("freeing a refused window at {hpa}: {f}");
                }
                Err(IommufdError::invalid("iommu_ioas_map_file", e.to_string()))
            }
        }
    }

    fn give_back(&mut self, ino: Inode) {
        if let Some(i) = self.windows.iter().position(|w| w.ino == ino) {
            let w = self.windows.remove(i);
            self.release(&w);
        }
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
