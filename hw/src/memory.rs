//! Host physical memory: one sparse memfd, where an HPA is an offset into the file.
//!
//! The host maps the whole file once; the IOMMU model and devices read and write it there.
//! A VM's RAM is a window of the same file mapped into the VMM through vm-memory, so the two
//! views share bytes. Pages are allocated lazily by the kernel on first touch.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use vsva_mem::MemError;
use vsva_mem::PhysMem;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vsva_vtd::{addr::Gpa, addr::Hpa};

/// The page size of host frames.
pub const PAGE_SIZE: u64 = 4096;

/// Default host memory size: 16 GiB of sparse file.
pub const DEFAULT_HOST_MEMORY: u64 = 16 << 30;

/// Errors of host memory set-up and frame allocation.
#[derive(Debug, thiserror::Error)]
pub enum HostMemoryError {
    /// A memory or allocation size that is zero or not a multiple of 4 KiB (or, for an
    /// allocation, an alignment that is not a power of two of at least 4 KiB); the value
    /// is the size.
    #[error("host memory size {0:#x} is zero or not a multiple of 4 KiB")]
    BadSize(u64),
    /// Creating, sizing or duplicating the memfd failed.
    #[error("creating the host memory file failed: {0}")]
    Create(#[source] std::io::Error),
    /// Mapping the memfd into this process failed.
    #[error("mapping host memory failed: {0}")]
    Map(#[source] std::io::Error),
    /// No free range of the requested size and alignment is left.
    #[error("out of host memory: {pages} pages requested")]
    OutOfMemory {
        /// Size of the request in 4-KiB pages.
        pages: u64,
    },
    /// The address freed is not the start of an allocation of this allocator.
    #[error("{0} is not an allocated frame")]
    NotAllocated(Hpa),
    /// A guest RAM window is empty or not 4-KiB aligned, or vm-memory refused it; the text
    /// says which.
    #[error("guest memory window: {0}")]
    GuestWindow(String),
    /// The user address range does not lie in one guest RAM window of host memory.
    #[error("user address {vaddr:#x}+{len:#x} is not backed by host memory")]
    NotHostMemory {
        /// First byte of the range.
        vaddr: u64,
        /// Length of the range in bytes.
        len: u64,
    },
    /// A host memory access failed (outside host memory or misaligned).
    #[error(transparent)]
    Access(#[from] MemError),
}

/// One window of host memory that a user process (the VMM) has mapped: what the host needs
/// to resolve a user virtual address to HPAs, as the kernel does when it pins user pages.
#[derive(Clone, Copy, Debug)]
struct UserWindow {
    len: u64,
    hpa: Hpa,
}

/// The host's physical memory.
#[derive(Debug)]
pub struct HostMemory {
    file: File,
    base: NonNull<u8>,
    size: u64,
    windows: RwLock<BTreeMap<u64, UserWindow>>,
}

// SAFETY: the mapping is shared memory accessed through raw pointers with bounds checks;
// concurrent accesses are either atomics (table entries) or byte copies, as DMA is.
unsafe impl Send for HostMemory {}
// SAFETY: see above.
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// Creates `size` bytes of sparse host memory (a multiple of 4 KiB).
    pub fn new(size: u64) -> Result<Arc<Self>, HostMemoryError> {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(HostMemoryError::BadSize(size));
        }
        // SAFETY: the name is a valid C string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(c"vsva-hostmem".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(HostMemoryError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, owned file descriptor.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(HostMemoryError::Create)?;
        // SAFETY: mapping a file we own, shared, with no fixed address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(HostMemoryError::Map(std::io::Error::last_os_error()));
        }
        Ok(Arc::new(HostMemory {
            file,
            base: NonNull::new(ptr.cast()).expect("mmap returned null"),
            size,
            windows: RwLock::new(BTreeMap::new()),
        }))
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memory file, for handing to another process or mapping a window.
    pub fn file(&self) -> &File {
        &self.file
    }

    #[inline]
    fn check(&self, addr: u64, len: u64) -> Result<(), MemError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemError::OutOfRange { addr, len }),
        }
    }

    #[inline]
    fn atomic(&self, addr: u64) -> Result<&AtomicU64, MemError> {
        if addr % 8 != 0 {
            return Err(MemError::Unaligned { addr, align: 8 });
        }
        self.check(addr, 8)?;
        // SAFETY: in bounds and 8-byte aligned (the mapping is page aligned); shared memory is
        // only ever accessed atomically or by byte copies.
        Ok(unsafe { &*(self.base.as_ptr().add(addr as usize) as *const AtomicU64) })
    }

    /// The atomic view of the `n` words from `addr`: one alignment and one bounds check.
    #[inline]
    fn words(&self, addr: u64, n: usize) -> Result<&[AtomicU64], MemError> {
        if addr % 8 != 0 {
            return Err(MemError::Unaligned { addr, align: 8 });
        }
        self.check(addr, 8 * n as u64)?;
        // SAFETY: `[addr, addr + 8 * n)` is in bounds (checked above) and 8-byte aligned
        // (the mapping is page aligned); shared memory is only ever accessed atomically or
        // by byte copies.
        Ok(unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(addr as usize) as *const AtomicU64, n)
        })
    }

    /// Returns memory in `[hpa, hpa + len)` to the kernel; it reads as zeros afterwards.
    pub fn discard(&self, hpa: Hpa, len: u64) -> Result<(), MemError> {
        self.check(hpa.0, len)?;
        // SAFETY: a range inside our own mapping; MADV_REMOVE punches a hole in the memfd.
        let rc = unsafe {
            libc::madvise(
                self.base.as_ptr().add(hpa.0 as usize).cast(),
                len as usize,
                libc::MADV_REMOVE,
            )
        };
        if rc != 0 {
            // The range stays allocated; zero it so its old contents never leak.
            self.fill(hpa, 0, len)?;
        }
        Ok(())
    }

    /// Sets `len` bytes at `hpa` to `byte`.
    pub fn fill(&self, hpa: Hpa, byte: u8, len: u64) -> Result<(), MemError> {
        self.check(hpa.0, len)?;
        // SAFETY: bounds checked above.
        unsafe {
            std::ptr::write_bytes(self.base.as_ptr().add(hpa.0 as usize), byte, len as usize)
        };
        Ok(())
    }

    /// Copies `len` bytes from `src` to `dst`, as `memmove` does: the two ranges may
    /// overlap (in the same place or through aliases of the same frames), and `dst` ends up
    /// holding what `src` held before the copy. Both ranges must lie in host memory; when
    /// either does not, nothing is copied.
    pub fn copy(&self, src: Hpa, dst: Hpa, len: u64) -> Result<(), MemError> {
        self.check(src.0, len)?;
        self.check(dst.0, len)?;
        // SAFETY: both ranges are inside the mapping (checked above); `ptr::copy` allows
        // them to overlap.
        unsafe {
            let base = self.base.as_ptr();
            std::ptr::copy(
                base.add(src.0 as usize),
                base.add(dst.0 as usize),
                len as usize,
            )
        };
        Ok(())
    }

    /// Maps `[hpa, hpa + size)` into this process as guest RAM at `gpa`, through vm-memory,
    /// and records the window so that the host can resolve the mapping's user addresses
    /// (see [`HostMemory::resolve_user`]).
    pub fn guest_memory(
        &self,
        regions: &[(Gpa, Hpa, u64)],
    ) -> Result<GuestMemoryMmap, HostMemoryError> {
        let mut ranges = Vec::with_capacity(regions.len());
        for &(gpa, hpa, size) in regions {
            if size == 0
                || !hpa.is_aligned(PAGE_SIZE)
                || !gpa.is_aligned(PAGE_SIZE)
                || size % PAGE_SIZE != 0
            {
                return Err(HostMemoryError::GuestWindow(format!(
                    "{gpa} -> {hpa} size {size:#x} must be non-empty and 4 KiB aligned"
                )));
            }
            self.check(hpa.0, size)?;
            let file = self.file.try_clone().map_err(HostMemoryError::Create)?;
            ranges.push((
                GuestAddress(gpa.0),
                size as usize,
                Some(FileOffset::new(file, hpa.0)),
            ));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|e| HostMemoryError::GuestWindow(e.to_string()))?;
        let mut windows = self.windows.write().unwrap_or_else(PoisonError::into_inner);
        for region in mem.iter() {
            let start = Gpa(region.start_addr().0);
            if let Some(&(_, hpa, size)) = regions.iter().find(|r| r.0 == start) {
                windows.insert(region.as_ptr() as u64, UserWindow { len: size, hpa });
            }
        }
        Ok(mem)
    }

    /// Forgets the user windows of a guest memory object that is being dropped.
    pub fn release_guest_memory(&self, mem: &GuestMemoryMmap) {
        let mut windows = self.windows.write().unwrap_or_else(PoisonError::into_inner);
        for region in mem.iter() {
            windows.remove(&(region.as_ptr() as u64));
        }
    }

    /// Makes the `size` bytes of `file` from byte `offset`, a memory file another process (a
    /// VMM in its own process) created and shares, host memory at `[hpa, hpa + size)`: the
    /// range of the
    /// host's mapping is replaced by a shared mapping of the file, so DMA and table walks at
    /// those HPAs reach the other process's pages, as pinned user pages are reached through
    /// their physical frames. The range must be a free allocation of this memory's frame
    /// allocator (the caller owns it). The file must be a memfd sealed against shrinking
    /// (`F_SEAL_SHRINK`, so that it can never be truncated under the host's mapping) and hold
    /// at least `offset + size` bytes, `offset` in whole pages; otherwise nothing changes.
    /// The mapping holds the file: closing every descriptor of it keeps the window. Returns the user address the range
    /// is reached at in this process, which [`HostMemory::resolve_user`] resolves back to
    /// `hpa`.
    pub fn adopt_window(
        &self,
        hpa: Hpa,
        file: &File,
        offset: u64,
        size: u64,
    ) -> Result<u64, HostMemoryError> {
        let refuse = |why: String| Err(HostMemoryError::GuestWindow(why));
        if size == 0 || (size | offset) % PAGE_SIZE != 0 || !hpa.is_aligned(PAGE_SIZE) {
            return refuse(format!(
                "{hpa} size {size:#x} offset {offset:#x} must be non-empty and 4 KiB aligned"
            ));
        }
        let Some(end) = offset
            .checked_add(size)
            .filter(|&e| libc::off_t::try_from(e).is_ok())
        else {
            return refuse(format!("offset {offset:#x} size {size:#x} overflows"));
        };
        self.check(hpa.0, size)?;
        // SAFETY: F_GET_SEALS on an open descriptor only reads its seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return refuse("the memory file is not a memfd sealed against shrinking".into());
        }
        let len = file.metadata().map_err(HostMemoryError::Create)?.len();
        if len < end {
            return refuse(format!(
                "the memory file holds {len:#x} bytes, not {end:#x}"
            ));
        }
        // SAFETY: the target range lies inside our own mapping (checked above) and belongs to
        // the caller's allocation, which nothing else reaches; MAP_FIXED replaces exactly it.
        let ptr = unsafe {
            let at = self.base.as_ptr().add(hpa.0 as usize);
            libc::mmap(
                at.cast(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(HostMemoryError::Map(std::io::Error::last_os_error()));
        }
        let user = ptr as u64;
        let mut windows = self.windows.write().unwrap_or_else(PoisonError::into_inner);
        windows.insert(user, UserWindow { len: size, hpa });
        Ok(user)
    }

    /// Undoes [`HostMemory::adopt_window`] of `[hpa, hpa + size)`: the range is host memory
    /// again (reading as zeros) and its user address no longer resolves. The caller frees
    /// the frames afterwards, once nothing maps them.
    pub fn return_window(&self, hpa: Hpa, size: u64) -> Result<(), HostMemoryError> {
        self.check(hpa.0, size)?;
        let user = self.base.as_ptr() as u64 + hpa.0;
        self.windows
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&user);
        // SAFETY: the range lies inside our own mapping (checked above); the host file is
        // mapped back over it at its own offset, as `new` mapped it.
        let ptr = unsafe {
            libc::mmap(
                user as *mut libc::c_void,
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                hpa.0 as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(HostMemoryError::Map(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Resolves a user virtual address range of this process to the host physical range
    /// behind it, as the kernel's `pin_user_pages` does for `VFIO_IOMMU_MAP_DMA`. The whole
    /// range must lie in one window.
    pub fn resolve_user(&self, vaddr: u64, len: u64) -> Result<Hpa, HostMemoryError> {
        let err = || HostMemoryError::NotHostMemory { vaddr, len };
        let windows = self.windows.read().unwrap_or_else(PoisonError::into_inner);
        let (&start, w) = windows.range(..=vaddr).next_back().ok_or_else(err)?;
        let off = vaddr - start;
        match off.checked_add(len) {
            Some(end) if end <= w.len => Ok(Hpa(w.hpa.0 + off)),
            _ => Err(err()),
        }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `new`; no references outlive `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size as usize) };
    }
}

impl PhysMem for HostMemory {
    #[inline]
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        Ok(self.atomic(addr)?.load(Ordering::Acquire))
    }

    /// One alignment and one bounds check for the whole range.
    #[inline]
    fn read_u64s(&self, addr: u64, out: &mut [u64]) -> Result<(), MemError> {
        let words = self.words(addr, out.len())?;
        for (q, w) in out.iter_mut().zip(words) {
            *q = w.load(Ordering::Acquire);
        }
        Ok(())
    }

    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        Ok(self.atomic(addr)?.fetch_or(bits, Ordering::AcqRel))
    }

    #[inline]
    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        let a = self.atomic(addr)?;
        Ok(
            match a.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(v) | Err(v) => v,
            },
        )
    }

    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
        self.atomic(addr)?.store(value, Ordering::Release);
        Ok(())
    }

    /// One alignment and one bounds check for the whole range; nothing is written when it
    /// fails.
    #[inline]
    fn write_u64s(&self, addr: u64, values: &[u64]) -> Result<(), MemError> {
        for (w, q) in self.words(addr, values.len())?.iter().zip(values) {
            w.store(*q, Ordering::Release);
        }
        Ok(())
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.check(addr, buf.len() as u64)?;
        // SAFETY: bounds checked; `buf` cannot overlap the shared mapping's tracked range.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(addr as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.check(addr, buf.len() as u64)?;
        // SAFETY: bounds checked.
        unsafe {
            std::ptr::copy_nonoverlapping(
                buf.as_ptr(),
                self.base.as_ptr().add(addr as usize),
                buf.len(),
            )
        };
        Ok(())
    }
}

/// Memory seen without writing: the strict-mode re-walk of either IOMMU model must not set
/// accessed/dirty (or access flag) bits that the hit it checks did not set. Reads pass
/// through; writes and atomic updates read and change nothing.
pub(crate) struct ReadOnly<'a, M: ?Sized>(pub(crate) &'a M);

impl<M: PhysMem + ?Sized> PhysMem for ReadOnly<'_, M> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.0.read_u64(addr)
    }
    fn fetch_or_u64(&self, addr: u64, _bits: u64) -> Result<u64, MemError> {
        self.0.read_u64(addr)
    }
    fn compare_exchange_u64(&self, addr: u64, old: u64, _new: u64) -> Result<u64, MemError> {
        let now = self.0.read_u64(addr)?;
        Ok(if now == old { old } else { now })
    }
    fn write_u64(&self, addr: u64, _value: u64) -> Result<(), MemError> {
        self.0.read_u64(addr).map(|_| ())
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0.read(addr, buf)
    }
    fn write(&self, _addr: u64, _buf: &[u8]) -> Result<(), MemError> {
        Ok(())
    }
}

/// Allocates 4 KiB frames and contiguous ranges of host memory.
///
/// Frames come back zeroed. Freed memory is returned to the kernel (hole punched), so a freed
/// page can never leak its contents to its next owner.
#[derive(Debug)]
pub struct FrameAllocator {
    mem: Arc<HostMemory>,
    state: Mutex<AllocState>,
}

#[derive(Debug, Default)]
struct AllocState {
    /// First never-allocated byte.
    bump: u64,
    /// Free ranges by start: length in bytes. Adjacent ranges are merged.
    free: BTreeMap<u64, u64>,
    /// Allocated ranges by start: length in bytes.
    allocated: BTreeMap<u64, u64>,
    allocated_bytes: u64,
}

impl FrameAllocator {
    /// An allocator over all of `mem`; HPA 0 is never handed out so that 0 can mean "none".
    pub fn new(mem: Arc<HostMemory>) -> Self {
        FrameAllocator {
            mem,
            state: Mutex::new(AllocState {
                bump: PAGE_SIZE,
                ..Default::default()
            }),
        }
    }

    /// The memory this allocator hands out.
    pub fn memory(&self) -> &Arc<HostMemory> {
        &self.mem
    }

    /// One zeroed 4 KiB frame.
    pub fn alloc_frame(&self) -> Result<Hpa, HostMemoryError> {
        self.alloc_range(PAGE_SIZE, PAGE_SIZE)
    }

    /// `size` zeroed bytes (a multiple of 4 KiB) aligned to `align` (a power of two ≥ 4 KiB).
    pub fn alloc_range(&self, size: u64, align: u64) -> Result<Hpa, HostMemoryError> {
        if size == 0 || size % PAGE_SIZE != 0 || !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(HostMemoryError::BadSize(size));
        }
        let oom = || HostMemoryError::OutOfMemory {
            pages: size / PAGE_SIZE,
        };
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let fit = s.free.iter().find_map(|(&start, &len)| {
            let aligned = start.checked_next_multiple_of(align)?;
            (aligned + size <= start + len).then_some((start, len, aligned))
        });
        let hpa = if let Some((start, len, aligned)) = fit {
            s.free.remove(&start);
            if aligned > start {
                s.free.insert(start, aligned - start);
            }
            if aligned + size < start + len {
                s.free.insert(aligned + size, start + len - aligned - size);
            }
            aligned
        } else {
            let aligned = s.bump.checked_next_multiple_of(align).ok_or_else(oom)?;
            match aligned.checked_add(size) {
                Some(end) if end <= self.mem.size() => {}
                _ => return Err(oom()),
            }
            if aligned > s.bump {
                let gap = (s.bump, aligned - s.bump);
                Self::insert_free(&mut s.free, gap.0, gap.1);
            }
            s.bump = aligned + size;
            aligned
        };
        s.allocated.insert(hpa, size);
        s.allocated_bytes += size;
        Ok(Hpa(hpa))
    }

    /// Frees a frame or range returned by this allocator.
    pub fn free(&self, hpa: Hpa) -> Result<(), HostMemoryError> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let len = s
            .allocated
            .remove(&hpa.0)
            .ok_or(HostMemoryError::NotAllocated(hpa))?;
        s.allocated_bytes -= len;
        self.mem.discard(hpa, len)?;
        Self::insert_free(&mut s.free, hpa.0, len);
        Ok(())
    }

    fn insert_free(free: &mut BTreeMap<u64, u64>, mut start: u64, mut len: u64) {
        if let Some((&prev, &plen)) = free.range(..start).next_back() {
            if prev + plen == start {
                free.remove(&prev);
                start = prev;
                len += plen;
            }
        }
        if let Some(&nlen) = free.get(&(start + len)) {
            free.remove(&(start + len));
            len += nlen;
        }
        free.insert(start, len);
    }

    /// Bytes currently allocated: what a leak check compares before and after.
    pub fn allocated_bytes(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allocated_bytes
    }
}

/// Page-table frames for the vtd table builder, from host memory.
impl vsva_vtd::builder::FrameSource for &FrameAllocator {
    fn alloc_table(&mut self) -> Option<u64> {
        self.alloc_frame().ok().map(|h| h.0)
    }

    fn free_table(&mut self, frame: u64) {
        // A frame the builder did not get from us is a bug in the caller: the builder only
        // frees what it allocated, so the error cannot happen.
        let _ = self.free(Hpa(frame));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem() -> Arc<HostMemory> {
        HostMemory::new(64 << 20).unwrap()
    }

    /// A memfd of `size` bytes sealed against shrinking, as a VMM shares its RAM.
    fn sealed_memfd(size: u64, seal: bool) -> File {
        // SAFETY: a valid C string; the fd is checked and owned.
        let fd = unsafe { libc::memfd_create(c"vmm-ram".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: fd is fresh and owned.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        if seal {
            // SAFETY: adding seals to our own memfd.
            let rc = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            assert_eq!(rc, 0);
        }
        file
    }

    #[test]
    fn an_adopted_window_shares_bytes_with_its_file_and_returns_to_zeros() {
        use std::os::unix::fs::FileExt;
        let m = mem();
        let frames = FrameAllocator::new(m.clone());
        let hpa = frames.alloc_range(2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        let file = sealed_memfd(2 * PAGE_SIZE, true);
        file.write_all_at(b"from the vmm", 100).unwrap();
        let user = m.adopt_window(hpa, &file, 0, 2 * PAGE_SIZE).unwrap();
        let mut buf = [0u8; 12];
        m.read(hpa.0 + 100, &mut buf).unwrap();
        assert_eq!(&buf, b"from the vmm");
        m.write(hpa.0 + PAGE_SIZE, b"dma").unwrap();
        let mut back = [0u8; 3];
        file.read_exact_at(&mut back, PAGE_SIZE).unwrap();
        assert_eq!(&back, b"dma");
        assert_eq!(
            m.resolve_user(user + PAGE_SIZE, 8).unwrap(),
            Hpa(hpa.0 + PAGE_SIZE)
        );
        assert!(m.resolve_user(user + PAGE_SIZE, PAGE_SIZE + 1).is_err());
        m.return_window(hpa, 2 * PAGE_SIZE).unwrap();
        assert!(m.resolve_user(user, 8).is_err());
        m.read(hpa.0 + 100, &mut buf).unwrap();
        assert_eq!(buf, [0; 12]);
        // The file keeps what the host wrote while it was adopted, and no longer sees host
        // writes.
        m.write(hpa.0 + PAGE_SIZE, b"xyz").unwrap();
        file.read_exact_at(&mut back, PAGE_SIZE).unwrap();
        assert_eq!(&back, b"dma");
        frames.free(hpa).unwrap();
    }

    #[test]
    fn a_window_from_an_offset_maps_that_range_of_the_file_and_outlives_its_fd() {
        use std::os::unix::fs::FileExt;
        let m = mem();
        let frames = FrameAllocator::new(m.clone());
        let hpa = frames.alloc_range(PAGE_SIZE, PAGE_SIZE).unwrap();
        let file = sealed_memfd(3 * PAGE_SIZE, true);
        file.write_all_at(b"page one", PAGE_SIZE).unwrap();
        let keep = file.try_clone().unwrap();
        m.adopt_window(hpa, &file, PAGE_SIZE, PAGE_SIZE).unwrap();
        drop(file);
        let mut buf = [0u8; 8];
        m.read(hpa.0, &mut buf).unwrap();
        assert_eq!(&buf, b"page one");
        m.write(hpa.0 + 8, b"!").unwrap();
        let mut back = [0u8; 9];
        keep.read_exact_at(&mut back, PAGE_SIZE).unwrap();
        assert_eq!(&back, b"page one!");
        m.return_window(hpa, PAGE_SIZE).unwrap();
        frames.free(hpa).unwrap();
    }

    #[test]
    fn a_window_that_can_shrink_or_lies_about_its_size_is_refused() {
        let m = mem();
        let hpa = Hpa(16 * PAGE_SIZE);
        let unsealed = sealed_memfd(PAGE_SIZE, false);
        assert!(matches!(
            m.adopt_window(hpa, &unsealed, 0, PAGE_SIZE),
            Err(HostMemoryError::GuestWindow(_))
        ));
        let short = sealed_memfd(PAGE_SIZE, true);
        assert!(matches!(
            m.adopt_window(hpa, &short, 0, 2 * PAGE_SIZE),
            Err(HostMemoryError::GuestWindow(_))
        ));
        assert!(m.adopt_window(hpa, &short, 0, 0).is_err());
        assert!(m.adopt_window(hpa, &short, PAGE_SIZE, PAGE_SIZE).is_err());
        assert!(m.adopt_window(hpa, &short, 0x800, PAGE_SIZE).is_err());
        assert!(m
            .adopt_window(hpa, &short, !(PAGE_SIZE - 1), PAGE_SIZE)
            .is_err());
        assert!(m.adopt_window(Hpa(m.size()), &short, 0, PAGE_SIZE).is_err());
        // Nothing was mapped: the range still reads as host memory.
        m.write(hpa.0, b"host").unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        short.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn rejects_bad_sizes_and_accesses() {
        assert!(matches!(
            HostMemory::new(0),
            Err(HostMemoryError::BadSize(0))
        ));
        assert!(matches!(
            HostMemory::new(4097),
            Err(HostMemoryError::BadSize(4097))
        ));
        let m = mem();
        let end = m.size();
        assert_eq!(
            m.read_u64(end),
            Err(MemError::OutOfRange { addr: end, len: 8 })
        );
        assert_eq!(
            m.read_u64(12),
            Err(MemError::Unaligned { addr: 12, align: 8 })
        );
        let mut buf = [0u8; 16];
        assert!(m.read(end - 8, &mut buf).is_err());
        assert!(m.write(u64::MAX - 4, &buf).is_err());
    }

    #[test]
    fn copy_outside_memory_fails_and_changes_nothing() {
        let m = mem();
        let end = m.size();
        m.fill(Hpa(0x1000), 0x5a, PAGE_SIZE).unwrap();
        m.fill(Hpa(end - PAGE_SIZE), 0xa5, PAGE_SIZE).unwrap();
        let cases = [
            (Hpa(end - 8), Hpa(0x2000), 16, end - 8),
            (Hpa(0x1000), Hpa(end - 8), 16, end - 8),
            (Hpa(0x1000), Hpa(0x2000), u64::MAX, 0x1000),
            (Hpa(u64::MAX - 4), Hpa(0x2000), 8, u64::MAX - 4),
            (Hpa(0x1000), Hpa(end), 1, end),
        ];
        for (src, dst, len, addr) in cases {
            assert_eq!(
                m.copy(src, dst, len),
                Err(MemError::OutOfRange { addr, len }),
                "{src} -> {dst} len {len:#x}"
            );
        }
        let mut b = vec![0u8; PAGE_SIZE as usize];
        m.read(0x1000, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0x5a));
        m.read(0x2000, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0), "no partial copy");
        m.read(end - PAGE_SIZE, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xa5), "no partial copy");
        // Empty copies at the very end are in range.
        m.copy(Hpa(end), Hpa(end), 0).unwrap();
        m.copy(Hpa(end - 4), Hpa(0), 4).unwrap();
        m.read(0, &mut b[..4]).unwrap();
        assert_eq!(b[..4], [0xa5; 4]);
    }

    #[test]
    fn word_ranges_are_checked_once_and_written_in_full_or_not_at_all() {
        let m = mem();
        m.write_u64s(0x1008, &[1, 2, 3]).unwrap();
        let mut out = [0u64; 4];
        m.read_u64s(0x1000, &mut out).unwrap();
        assert_eq!(out, [0, 1, 2, 3]);
        assert_eq!(
            m.write_u64s(0x1004, &[9]),
            Err(MemError::Unaligned {
                addr: 0x1004,
                align: 8
            })
        );
        let end = m.size();
        assert_eq!(
            m.write_u64s(end - 8, &[9, 9]),
            Err(MemError::OutOfRange {
                addr: end - 8,
                len: 16
            })
        );
        assert_eq!(m.read_u64(end - 8), Ok(0), "nothing written");
    }

    #[test]
    fn atomics_and_bytes_share_storage() {
        let m = mem();
        m.write_u64(0x1000, 0x1122_3344_5566_7788).unwrap();
        let mut b = [0u8; 8];
        m.read(0x1000, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
        assert_eq!(m.fetch_or_u64(0x1000, 0x60).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(m.read_u64(0x1000).unwrap(), 0x1122_3344_5566_77e8);
        assert_eq!(
            m.compare_exchange_u64(0x1000, 1, 2).unwrap(),
            0x1122_3344_5566_77e8
        );
        assert_eq!(m.read_u64(0x1000).unwrap(), 0x1122_3344_5566_77e8);
    }

    #[test]
    fn frames_are_zeroed_reused_and_counted() {
        let m = mem();
        let a = FrameAllocator::new(m.clone());
        let f = a.alloc_frame().unwrap();
        assert_ne!(f, Hpa(0));
        m.fill(f, 0xab, PAGE_SIZE).unwrap();
        a.free(f).unwrap();
        assert_eq!(a.allocated_bytes(), 0);
        assert!(matches!(a.free(f), Err(HostMemoryError::NotAllocated(_))));
        let g = a.alloc_frame().unwrap();
        assert_eq!(g, f, "freed frame is reused first");
        let mut b = [0xffu8; 64];
        m.read(g.0, &mut b).unwrap();
        assert_eq!(b, [0u8; 64], "a reused frame reads as zeros");
        let r = a.alloc_range(2 << 20, 2 << 20).unwrap();
        assert!(r.is_aligned(2 << 20));
        assert_eq!(a.allocated_bytes(), PAGE_SIZE + (2 << 20));
        assert!(matches!(
            a.alloc_range(1 << 30, PAGE_SIZE),
            Err(HostMemoryError::OutOfMemory { .. })
        ));
        assert_eq!(
            a.allocated_bytes(),
            PAGE_SIZE + (2 << 20),
            "a failed allocation changes nothing"
        );
    }

    #[test]
    fn guest_window_shares_bytes_and_resolves_user_addresses() {
        let m = mem();
        let a = FrameAllocator::new(m.clone());
        let ram = a.alloc_range(1 << 20, PAGE_SIZE).unwrap();
        let gm = m.guest_memory(&[(Gpa(0x10_0000), ram, 1 << 20)]).unwrap();
        gm.write_obj(0xdead_beef_u32, GuestAddress(0x10_0010))
            .unwrap();
        let mut b = [0u8; 4];
        m.read(ram.0 + 0x10, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        let host_va = gm.get_host_address(GuestAddress(0x10_2000)).unwrap() as u64;
        assert_eq!(
            m.resolve_user(host_va, 0x1000).unwrap(),
            Hpa(ram.0 + 0x2000)
        );
        assert!(
            m.resolve_user(host_va, 1 << 20).is_err(),
            "range runs past the window"
        );
        assert!(m.resolve_user(0x1000, 8).is_err());
        m.release_guest_memory(&gm);
        assert!(m.resolve_user(host_va, 8).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// Whatever the overlap, a copy inside host memory does what `copy_within` does to
        /// the same bytes, and touches nothing outside the destination.
        #[test]
        fn copy_is_a_memmove(
            src in 0u64..3 * PAGE_SIZE,
            dst in 0u64..3 * PAGE_SIZE,
            len in 0u64..2 * PAGE_SIZE,
            seed: u8,
        ) {
            let m = HostMemory::new(1 << 20).unwrap();
            let base = 0x1_0000u64;
            let span = 5 * PAGE_SIZE as usize;
            let init: Vec<u8> = (0..span)
                .map(|i| (i as u8).wrapping_mul(97).wrapping_add(seed) ^ (i >> 8) as u8)
                .collect();
            m.write(base, &init).unwrap();
            m.copy(Hpa(base + src), Hpa(base + dst), len).unwrap();
            let mut model = init.clone();
            model.copy_within(src as usize..(src + len) as usize, dst as usize);
            let mut got = vec![0u8; span];
            m.read(base, &mut got).unwrap();
            proptest::prop_assert_eq!(got, model);
        }
    }
}
