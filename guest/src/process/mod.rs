//! A guest process: its virtual memory areas and its page tables in guest RAM, x86-64 or
//! AArch64 ([`Arch`]).
//!
//! The tables are the ones the CPU walks from CR3 (4- or 5-level IA-32e paging) or TTBR0
//! (VMSAv8-64, 4 KiB granule, 48-bit VA) and, once the process is bound to a device, the
//! ones the IOMMU walks from the PASID entry's FLPTPTR or the context descriptor's TTB0. Pages are mapped user-accessible with the VMA's rights: writable only with
//! [`Prot::WRITE`], execute-disabled without [`Prot::EXEC`]. A page a VMA covers but the
//! tables do not map is populated on first touch, by the CPU (a page fault) or by the
//! device (a page request the IOMMU driver hands to [`Process::handle_fault`]).
//!
//! Changing a mapping that exists (munmap, mprotect) is reported to the registered
//! [`MmuNotifier`]s once the tables are updated and before the old frames are freed, as
//! Linux's mmu notifiers report it to the IOMMU driver, which must then invalidate the
//! IOMMU's and the device's caches.

use smallvec::SmallVec;
use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::ops::BitOr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vsva_mem::MemError;
use vsva_mem::PhysMem;

use vm_memory::GuestMemoryMmap;
use vsva_vtd::{addr::Gpa, addr::Gva, builder::BuildError, builder::MapFlags, flpte::FlPagingMode};

use crate::frames::{FrameError, GuestFrames, FRAME_SIZE};

/// Where [`Process::mmap`] starts looking for free virtual addresses.
pub const MMAP_BASE: u64 = 0x7f00_0000_0000;
/// The lowest address a mapping may use (Linux's default `mmap_min_addr`).
pub const MMAP_MIN_ADDR: u64 = 0x1_0000;
/// Unmapped bytes [`Process::mmap`] leaves after each mapping, so overruns fault.
const GUARD: u64 = FRAME_SIZE;

/// Access rights of a mapping (`PROT_*`). The first level cannot express pages that are
/// not readable, so every mapping has [`Prot::READ`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Prot(u8);

impl Prot {
    /// Readable.
    pub const READ: Prot = Prot(1);
    /// Writable.
    pub const WRITE: Prot = Prot(2);
    /// Executable.
    pub const EXEC: Prot = Prot(4);
    /// Readable and writable.
    pub const READ_WRITE: Prot = Prot(3);

    /// Whether every right of `other` is in `self`.
    pub const fn contains(self, other: Prot) -> bool {
        self.0 & other.0 == other.0
    }

    fn map_flags(self) -> MapFlags {
        let mut flags = MapFlags::READ | MapFlags::USER;
        if self.contains(Prot::WRITE) {
            flags = flags | MapFlags::WRITE;
        }
        if self.contains(Prot::EXEC) {
            flags = flags | MapFlags::EXECUTE;
        }
        flags
    }
}

impl BitOr for Prot {
    type Output = Prot;

    fn bitor(self, rhs: Prot) -> Prot {
        Prot(self.0 | rhs.0)
    }
}

/// A virtual memory area: a page-aligned range with one set of rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Vma {
    /// First byte.
    pub start: Gva,
    /// Length in bytes, a multiple of 4 KiB.
    pub len: u64,
    /// Rights.
    pub prot: Prot,
}

impl Vma {
    /// The first byte after the area.
    pub const fn end(&self) -> u64 {
        self.start.0 + self.len
    }

    /// Whether `gva` lies in the area.
    pub const fn contains(&self, gva: Gva) -> bool {
        self.start.0 <= gva.0 && gva.0 < self.end()
    }
}

/// Told about every change to existing translations of a process (Linux's
/// `mmu_notifier_ops.invalidate_range`).
pub trait MmuNotifier: Send + Sync {
    /// The translations of `[start, end)` changed: the page tables are already updated
    /// and the frames that were mapped there are freed when this returns, so the callee
    /// must have removed every cached copy of the old translations by then.
    fn invalidate_range(&self, start: Gva, end: Gva);
}

/// The registered notifiers, in registration order; inline for the one or two a process
/// usually has, so a change of the list allocates only its shared pointer.
type Notifiers = SmallVec<[(NotifierId, Arc<dyn MmuNotifier>); 2]>;

/// The areas a change covers, as `(start, end)` ranges ([`split_vmas`]); a change
/// usually covers one.
type Ranges = SmallVec<[(u64, u64); 2]>;

/// A registration of an [`MmuNotifier`], for [`Process::unregister_notifier`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotifierId(u64);

/// Why a process operation was refused. A refused operation changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    /// A range of no bytes.
    #[error("a mapping needs at least one byte")]
    ZeroLength,
    /// The address is not 4 KiB aligned.
    #[error("{0} is not 4 KiB aligned")]
    Misaligned(Gva),
    /// The range is not inside the user half of the address space.
    #[error("{start}+{len:#x} is outside the user address space")]
    OutOfRange {
        /// First byte of the range.
        start: Gva,
        /// Length asked for, in bytes.
        len: u64,
    },
    /// A mapping must be readable.
    #[error("first-level mappings are always readable; PROT_READ is required")]
    Unreadable,
    /// A fixed mapping would replace part of an existing one.
    #[error("{start}+{len:#x} overlaps an existing mapping")]
    Overlap {
        /// First byte of the range.
        start: Gva,
        /// Length of the range in bytes, rounded up to 4 KiB.
        len: u64,
    },
    /// No free virtual range of that length.
    #[error("no free virtual range of {len:#x} bytes")]
    NoAddressSpace {
        /// Length asked for, in bytes (rounded up to 4 KiB unless the rounding overflowed).
        len: u64,
    },
    /// mprotect over a range that is not entirely mapped.
    #[error("{0} is not mapped")]
    NotMapped(Gva),
    /// A CPU access that no mapping allows: the process would get SIGSEGV.
    #[error("segmentation fault: {} at {gva}", if *write { "write" } else { "read" })]
    Segv {
        /// The faulting address.
        gva: Gva,
        /// Whether the access was a write (else a read).
        write: bool,
    },
    /// Guest frames ran out.
    #[error(transparent)]
    Frames(#[from] FrameError),
    /// The page-table builder refused an update.
    #[error(transparent)]
    Tables(#[from] BuildError),
    /// The AArch64 page-table builder refused an update.
    #[error(transparent)]
    Aarch64Tables(#[from] vsva_smmuv3::builder::BuildError),
    /// Guest RAM refused an access.
    #[error(transparent)]
    Memory(#[from] MemError),
}

struct State {
    /// Destroyed only in `Drop`.
    tables: ManuallyDrop<Tables>,
    /// By start address; never overlapping.
    vmas: BTreeMap<u64, Vma>,
    /// Resident pages: virtual page to the frame that backs it.
    pages: BTreeMap<u64, u64>,
}

/// A guest process with its own address space.
pub struct Process {
    mem: Arc<GuestMemoryMmap>,
    frames: Arc<GuestFrames>,
    mode: FlPagingMode,
    cr3: Gpa,
    state: Mutex<State>,
    /// Replaced, not changed in place, when a notifier comes or goes, so a change to the
    /// tables takes the list with one reference count and no copy.
    notifiers: Mutex<Arc<Notifiers>>,
    next_notifier: AtomicU64,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("cr3", &self.cr3)
            .field("mode", &self.mode)
            .field("resident_pages", &self.resident_pages())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Process {
    /// An x86-64 process with an empty address space: one cleared top-level table (PML4
    /// or PML5).
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        frames: Arc<GuestFrames>,
        mode: FlPagingMode,
    ) -> Result<Self, ProcessError> {
        Self::with_arch(mem, frames, Arch::X86_64(mode))
    }

    /// An AArch64 process with an empty address space: one cleared level-0 table for
    /// TTBR0 (4 KiB granule, 48-bit VA). Its user range is the one an x86-64 process with
    /// 4-level paging has (below 2^47), which a 48-bit TTBR0 range contains.
    pub fn new_aarch64(
        mem: Arc<GuestMemoryMmap>,
        frames: Arc<GuestFrames>,
    ) -> Result<Self, ProcessError> {
        Self::with_arch(mem, frames, Arch::Aarch64)
    }

    fn with_arch(
        mem: Arc<GuestMemoryMmap>,
        frames: Arc<GuestFrames>,
        arch: Arch,
    ) -> Result<Self, ProcessError> {
        let tables = Tables::new(arch, &*mem, &frames)?;
        let mode = match arch {
            Arch::X86_64(mode) => mode,
            Arch::Aarch64 => FlPagingMode::FourLevel,
        };
        Ok(Process {
            cr3: Gpa(tables.root()),
            mem,
            frames,
            mode,
            state: Mutex::new(State {
                tables: ManuallyDrop::new(tables),
                vmas: BTreeMap::new(),
                pages: BTreeMap::new(),
            }),
            notifiers: Mutex::default(),
            next_notifier: AtomicU64::new(0),
        })
    }

    /// The physical address of the top-level table: what CR3 holds, and FLPTPTR (on
    /// AArch64: TTBR0, and a context descriptor's TTB0).
    pub fn cr3(&self) -> Gpa {
        self.cr3
    }

    /// 4- or 5-level paging (an AArch64 process has the 4-level layout: 48-bit VAs).
    pub fn paging_mode(&self) -> FlPagingMode {
        self.mode
    }

    /// The architecture of the process's tables.
    pub fn arch(&self) -> Arch {
        lock(&self.state).tables.arch()
    }

    /// Guest RAM the tables and pages live in.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// The number of pages mapped now.
    pub fn resident_pages(&self) -> usize {
        lock(&self.state).pages.len()
    }

    /// The number of page-table frames, the top-level table included.
    pub fn page_table_frames(&self) -> usize {
        lock(&self.state).tables.table_frames()
    }

    /// The areas, lowest first.
    pub fn vmas(&self) -> Vec<Vma> {
        lock(&self.state).vmas.values().copied().collect()
    }

    /// The area that holds `gva`.
    pub fn vma_at(&self, gva: Gva) -> Option<Vma> {
        vma_at(&lock(&self.state), gva)
    }

    /// The frame `gva` is mapped to now (with its page offset), as the tables say.
    pub fn translate(&self, gva: Gva) -> Option<Gpa> {
        let st = lock(&self.state);
        let (page, size) = st.tables.lookup(&*self.mem, gva.0)?;
        Some(Gpa(page | gva.page_offset(size)))
    }

    /// Maps `len` bytes (rounded up to pages) of zeroed, resident memory with `prot` at a
    /// free address; returns it.
    pub fn mmap(&self, len: u64, prot: Prot) -> Result<Gva, ProcessError> {
        self.mmap_anywhere(len, prot, true)
    }

    /// Reserves `len` bytes (rounded up to pages) with `prot` at a free address and maps
    /// nothing: each page is populated when first touched.
    pub fn mmap_lazy(&self, len: u64, prot: Prot) -> Result<Gva, ProcessError> {
        self.mmap_anywhere(len, prot, false)
    }

    /// Maps `len` bytes at `gva` exactly (`MAP_FIXED_NOREPLACE`), resident when `populate`.
    pub fn mmap_fixed(
        &self,
        gva: Gva,
        len: u64,
        prot: Prot,
        populate: bool,
    ) -> Result<Gva, ProcessError> {
        let len = self.check_range(gva, len)?;
        if !prot.contains(Prot::READ) {
            return Err(ProcessError::Unreadable);
        }
        let mut st = lock(&self.state);
        if overlapping(&st, gva.0, gva.0 + len).next().is_some() {
            return Err(ProcessError::Overlap { start: gva, len });
        }
        self.insert_vma(
            &mut st,
            Vma {
                start: gva,
                len,
                prot,
            },
            populate,
        )?;
        Ok(gva)
    }

    fn mmap_anywhere(&self, len: u64, prot: Prot, populate: bool) -> Result<Gva, ProcessError> {
        if len == 0 {
            return Err(ProcessError::ZeroLength);
        }
        if !prot.contains(Prot::READ) {
            return Err(ProcessError::Unreadable);
        }
        let len = len
            .checked_next_multiple_of(FRAME_SIZE)
            .ok_or(ProcessError::NoAddressSpace { len })?;
        let mut st = lock(&self.state);
        let mut candidate = MMAP_BASE;
        for vma in st.vmas.values() {
            if vma.end() + GUARD <= candidate {
                continue;
            }
            if candidate.saturating_add(len + GUARD) <= vma.start.0 {
                break;
            }
            candidate = vma.end() + GUARD;
        }
        if candidate
            .checked_add(len)
            .is_none_or(|end| end > self.user_limit())
        {
            return Err(ProcessError::NoAddressSpace { len });
        }
        let vma = Vma {
            start: Gva(candidate),
            len,
            prot,
        };
        self.insert_vma(&mut st, vma, populate)?;
        Ok(vma.start)
    }

    /// Adds `vma` (free of overlaps), populating every page when asked; on failure
    /// removes what it added.
    fn insert_vma(&self, st: &mut State, vma: Vma, populate: bool) -> Result<(), ProcessError> {
        st.vmas.insert(vma.start.0, vma);
        if populate {
            let mut page = vma.start.0;
            while page < vma.end() {
                if let Err(e) = self.populate(st, page, vma.prot) {
                    self.drop_pages(st, vma.start.0, page);
                    st.vmas.remove(&vma.start.0);
                    return Err(e);
                }
                page += FRAME_SIZE;
            }
        }
        Ok(())
    }

    /// Unmaps and frees the resident pages of `[start, end)` without telling anyone: for
    /// pages no one else can have seen.
    fn drop_pages(&self, st: &mut State, start: u64, end: u64) {
        let pages: Vec<(u64, u64)> = st.pages.range(start..end).map(|(&v, &f)| (v, f)).collect();
        for (va, frame) in pages {
            // The page was mapped by this process a moment ago: unmapping cannot fail.
            let _ = st.tables.unmap(&*self.mem, va);
            st.pages.remove(&va);
            let _ = self.frames.free(Gpa(frame));
        }
    }

    /// Maps a fresh zeroed frame at `page` with `prot`.
    fn populate(&self, st: &mut State, page: u64, prot: Prot) -> Result<(), ProcessError> {
        let frame = self.frames.alloc()?;
        let mapped = st.tables.map(&*self.mem, &self.frames, page, frame.0, prot);
        if let Err(e) = mapped {
            let _ = self.frames.free(frame);
            return Err(e);
        }
        st.pages.insert(page, frame.0);
        Ok(())
    }

    /// Unmaps `[gva, gva + len)` (`len` rounded up to pages). Parts of the range that are
    /// not mapped are ignored, as munmap(2) does. Only a failing write to guest RAM can
    /// leave a page mapped; the range is reported to the notifiers either way.
    pub fn munmap(&self, gva: Gva, len: u64) -> Result<(), ProcessError> {
        let len = self.check_range(gva, len)?;
        let (start, end) = (gva.0, gva.0 + len);
        let (ranges, freed, error) = {
            let mut st = lock(&self.state);
            let ranges = split_vmas(&mut st, start, end);
            for &(s, _) in &ranges {
                st.vmas.remove(&s);
            }
            let resident: Vec<(u64, u64)> =
                st.pages.range(start..end).map(|(&v, &f)| (v, f)).collect();
            let mut freed = Vec::with_capacity(resident.len());
            let mut error = None;
            for (va, frame) in resident {
                // A page whose entry could not be cleared stays resident (and its frame
                // allocated): the tables may still point to it.
                match st.tables.unmap(&*self.mem, va) {
                    Ok(_) => {
                        st.pages.remove(&va);
                        freed.push(frame);
                    }
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
            }
            (ranges, freed, error)
        };
        self.notify(&ranges);
        for frame in freed {
            // Frames recorded in `pages` were allocated by this process.
            let _ = self.frames.free(Gpa(frame));
        }
        error.map_or(Ok(()), Err)
    }

    /// Changes the rights of `[gva, gva + len)` (`len` rounded up to pages), which must be
    /// mapped throughout. Only a failing write to guest RAM can leave some pages with the
    /// old rights; the range is reported to the notifiers either way.
    pub fn mprotect(&self, gva: Gva, len: u64, prot: Prot) -> Result<(), ProcessError> {
        let len = self.check_range(gva, len)?;
        if !prot.contains(Prot::READ) {
            return Err(ProcessError::Unreadable);
        }
        let (start, end) = (gva.0, gva.0 + len);
        let (ranges, error) = {
            let mut st = lock(&self.state);
            // One walk checks that areas cover the range and finds those at its two ends,
            // which are split there without looking them up again.
            let mut next = start;
            let mut ends = None;
            for vma in overlapping(&st, start, end) {
                if vma.start.0 > next {
                    break;
                }
                ends = Some((ends.map_or(vma, |(first, _)| first), vma));
                next = vma.end();
            }
            let Some((first, last)) = ends.filter(|_| next >= end) else {
                return Err(ProcessError::NotMapped(Gva(next)));
            };
            if first.start.0 < start {
                split_at(&mut st, first, start);
            }
            if last.end() > end {
                // The part of `last` at or above `start`, if the first split cut it.
                let from = last.start.0.max(start);
                let last = Vma {
                    start: Gva(from),
                    len: last.end() - from,
                    ..last
                };
                split_at(&mut st, last, end);
            }
            let mut ranges = Ranges::new();
            for vma in st.vmas.range_mut(start..end).map(|(_, v)| v) {
                vma.prot = prot;
                ranges.push((vma.start.0, vma.end()));
            }
            let State { tables, pages, .. } = &mut *st;
            let mut error = None;
            for &va in pages.range(start..end).map(|(v, _)| v) {
                if let Err(e) = tables.protect(&*self.mem, va, prot) {
                    error.get_or_insert(e);
                }
            }
            (ranges, error)
        };
        // Reported even after a failed update: some entries may have changed.
        self.notify(&ranges);
        error.map_or(Ok(()), Err)
    }

    /// Resolves a fault at `gva` for a read or a `write`, as the kernel's page-fault
    /// handler does: populates the page when an area allows the access. Returns whether
    /// the access can now succeed (also when the page was already there).
    pub fn handle_fault(&self, gva: Gva, write: bool) -> bool {
        let mut st = lock(&self.state);
        self.fault(&mut st, gva, write).is_ok()
    }

    fn fault(&self, st: &mut State, gva: Gva, write: bool) -> Result<(), ProcessError> {
        let segv = ProcessError::Segv { gva, write };
        let vma = vma_at(st, gva).ok_or(segv)?;
        if write && !vma.prot.contains(Prot::WRITE) {
            return Err(segv);
        }
        let page = gva.0 & !(FRAME_SIZE - 1);
        if st.pages.contains_key(&page) {
            return Ok(());
        }
        self.populate(st, page, vma.prot)
    }

    /// Reads `buf.len()` bytes at `gva` as the process's CPU does: through its page tables,
    /// taking (and resolving) page faults on the way.
    pub fn read(&self, gva: Gva, buf: &mut [u8]) -> Result<(), ProcessError> {
        let mut st = lock(&self.state);
        let mut done = 0;
        while done < buf.len() {
            let va = Gva(gva.0.wrapping_add(done as u64));
            let gpa = self.cpu_translate(&mut st, va, false)?;
            let n = chunk(va, buf.len() - done);
            self.mem.read(gpa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `gva` as the process's CPU does.
    pub fn write(&self, gva: Gva, buf: &[u8]) -> Result<(), ProcessError> {
        let mut st = lock(&self.state);
        let mut done = 0;
        while done < buf.len() {
            let va = Gva(gva.0.wrapping_add(done as u64));
            let gpa = self.cpu_translate(&mut st, va, true)?;
            let n = chunk(va, buf.len() - done);
            self.mem.write(gpa, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// The CPU's walk of the process's tables for a user access, setting accessed and
    /// dirty bits; a fault goes to the page-fault handler and the walk is retried once.
    fn cpu_translate(&self, st: &mut State, gva: Gva, write: bool) -> Result<u64, ProcessError> {
        if let Some(pa) = st.tables.cpu_walk(&*self.mem, gva.0, write) {
            return Ok(pa);
        }
        self.fault(st, gva, write)?;
        st.tables
            .cpu_walk(&*self.mem, gva.0, write)
            .ok_or(ProcessError::Segv { gva, write })
    }

    /// Registers `notifier` for changes to existing translations.
    pub fn register_notifier(&self, notifier: Arc<dyn MmuNotifier>) -> NotifierId {
        let id = NotifierId(self.next_notifier.fetch_add(1, Ordering::Relaxed));
        let mut list = lock(&self.notifiers);
        let mut next = Notifiers::clone(&list);
        next.push((id, notifier));
        *list = Arc::new(next);
        id
    }

    /// Removes a registration; returns whether it existed.
    pub fn unregister_notifier(&self, id: NotifierId) -> bool {
        let mut list = lock(&self.notifiers);
        if !list.iter().any(|(i, _)| *i == id) {
            return false;
        }
        let next: Notifiers = list.iter().filter(|(i, _)| *i != id).cloned().collect();
        *list = Arc::new(next);
        true
    }

    fn notify(&self, ranges: &[(u64, u64)]) {
        let notifiers = Arc::clone(&lock(&self.notifiers));
        for &(start, end) in ranges {
            for (_, n) in notifiers.iter() {
                n.invalidate_range(Gva(start), Gva(end));
            }
        }
    }

    /// The end of the user half of the address space.
    fn user_limit(&self) -> u64 {
        1 << (self.mode.input_width() - 1)
    }

    /// Checks an explicit range; returns its length rounded up to pages.
    fn check_range(&self, gva: Gva, len: u64) -> Result<u64, ProcessError> {
        if len == 0 {
            return Err(ProcessError::ZeroLength);
        }
        if !gva.is_aligned(FRAME_SIZE) {
            return Err(ProcessError::Misaligned(gva));
        }
        let out = ProcessError::OutOfRange { start: gva, len };
        let rounded = len.checked_next_multiple_of(FRAME_SIZE).ok_or(out)?;
        let end = gva.0.checked_add(rounded).ok_or(out)?;
        if gva.0 < MMAP_MIN_ADDR || end > self.user_limit() {
            return Err(out);
        }
        Ok(rounded)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, frame) in std::mem::take(&mut st.pages) {
            let _ = self.frames.free(Gpa(frame));
        }
        // SAFETY: `tables` is never used again: this is the process's last moment.
        let tables = unsafe { ManuallyDrop::take(&mut st.tables) };
        tables.destroy(&self.frames);
    }
}

mod tables;
#[cfg(test)]
mod tests;

use tables::Tables;
pub use tables::{Arch, AARCH64_T0SZ};

/// Bytes from `gva` to the end of its page, at most `left`.
fn chunk(gva: Gva, left: usize) -> usize {
    let in_page = (FRAME_SIZE - gva.page_offset(FRAME_SIZE)) as usize;
    in_page.min(left)
}

fn vma_at(st: &State, gva: Gva) -> Option<Vma> {
    st.vmas
        .range(..=gva.0)
        .next_back()
        .map(|(_, v)| *v)
        .filter(|v| v.contains(gva))
}

/// Splits the area `v` at `cut`, which lies strictly inside it, into two areas.
fn split_at(st: &mut State, v: Vma, cut: u64) {
    let head = Vma {
        len: cut - v.start.0,
        ..v
    };
    let tail = Vma {
        start: Gva(cut),
        len: v.end() - cut,
        prot: v.prot,
    };
    st.vmas.insert(head.start.0, head);
    st.vmas.insert(tail.start.0, tail);
}

/// The areas that share a byte with `[start, end)`, lowest first.
fn overlapping(st: &State, start: u64, end: u64) -> impl Iterator<Item = Vma> + '_ {
    let first = vma_at(st, Gva(start)).map_or(start, |v| v.start.0);
    st.vmas.range(first..end).map(|(_, v)| *v)
}

/// Splits the areas that straddle `start` or `end` so that every area is inside or
/// outside `[start, end)`; returns the parts inside, as `(start, end)` ranges.
fn split_vmas(st: &mut State, start: u64, end: u64) -> Ranges {
    for cut in [start, end] {
        if let Some(v) = vma_at(st, Gva(cut)).filter(|v| v.start.0 < cut) {
            split_at(st, v, cut);
        }
    }
    st.vmas
        .range(start..end)
        .map(|(_, v)| (v.start.0, v.end()))
        .collect()
}
