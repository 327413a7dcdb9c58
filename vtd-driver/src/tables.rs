//! Writing the scalable-mode structures above the page tables (VT-d §3.4.3, §9.4, §9.5):
//! root, context and PASID entries, the context tables under a root table
//! ([`ContextTables`]: allocated on first use of a bus half, freed when a driver that frees
//! them releases their last device), and a device's PASID directory with the PASID tables
//! under it ([`PasidTables`]: the directory sized at attach, a table on the first use of
//! its range, all freed after the device is detached).
//!
//! Entries are written with P last when made present and P first when cleared, so the
//! unit never reads a half-written present entry (as `context_set_present` and
//! `pasid_set_present` come last in intel-iommu).

use std::collections::HashMap;
use vsva_mem::MemError;
use vsva_mem::PhysMem;

use vsva_vtd::context::context_entry_addr;
use vsva_vtd::pasid::{pasid_dir_entry_addr, pasid_entry_addr, PASID_ENTRY_SIZE};
use vsva_vtd::root::root_entry_addr;
use vsva_vtd::{
    addr::Pasid, addr::SourceId, pasid::PasidDirEntry, pasid::PasidEntry, root::ScalableRootEntry,
};

use crate::Error;

/// PDTS of a PASID directory covering `pasid_bits` bits of PASID (at most 20): `2^(PDTS +
/// 7)` entries of 64 PASIDs each, and never less than one page, as
/// `intel_pasid_alloc_table` sizes the directory and `context_pdts` encodes it.
pub fn pdts_for(pasid_bits: u32) -> u8 {
    let dir_bits = pasid_bits.min(Pasid::BITS).saturating_sub(6);
    (dir_bits.max(9) - 7).min(7) as u8
}

/// Bytes of a PASID directory of `pdts`: `2^(PDTS + 7)` entries of 8 bytes.
pub fn pasid_dir_bytes(pdts: u8) -> u64 {
    8 << (u32::from(pdts) + 7)
}

/// Makes the entry at `addr` present with `raw`: every other qword, then qword 0 (P).
pub fn write_entry<M: PhysMem + ?Sized>(mem: &M, addr: u64, raw: &[u64]) -> Result<(), Error> {
    if let Some((q0, rest)) = raw.split_first() {
        mem.write_u64s(addr + 8, rest)?;
        mem.write_u64(addr, *q0)?;
    }
    Ok(())
}

/// Clears the `qwords`-qword entry at `addr`: qword 0 (P) first.
pub fn clear_entry<M: PhysMem + ?Sized>(mem: &M, addr: u64, qwords: u64) -> Result<(), Error> {
    for i in 0..qwords {
        mem.write_u64(addr + 8 * i, 0)?;
    }
    Ok(())
}

/// The PASID entry at `slot`: `None` when it is not present, cannot be read or does not
/// decode.
pub fn read_pasid_entry<M: PhysMem + ?Sized>(mem: &M, slot: u64) -> Option<PasidEntry> {
    let mut raw = [0u64; 8];
    mem.read_u64s(slot, &mut raw).ok()?;
    PasidEntry::from_raw(raw).ok()
}

/// Makes the PASID entry at `slot` present with `entry`.
pub fn write_pasid_entry<M: PhysMem + ?Sized>(
    mem: &M,
    slot: u64,
    entry: &PasidEntry,
) -> Result<(), Error> {
    write_entry(mem, slot, &entry.to_raw())
}

/// Clears the PASID entry at `slot`.
pub fn clear_pasid_entry<M: PhysMem + ?Sized>(mem: &M, slot: u64) -> Result<(), Error> {
    clear_entry(mem, slot, PASID_ENTRY_SIZE / 8)
}

/// Where a driver's tables come from: 4-KiB frames of the memory the unit reads.
pub trait TableFrames {
    /// What a failed allocation or table write returns.
    type Error: From<MemError>;
    /// A zeroed 4-KiB frame.
    fn alloc_frame(&self) -> Result<u64, Self::Error>;
    /// `pages` zeroed, contiguous 4-KiB frames.
    fn alloc_frames(&self, pages: u64) -> Result<u64, Self::Error>;
    /// Gives back what [`TableFrames::alloc_frame`] or [`TableFrames::alloc_frames`]
    /// returned at `addr`.
    fn free_frame(&self, addr: u64);
}

/// A device's PASID directory and the PASID tables under it (§3.4.3, §9.5), as
/// intel-iommu keeps them: the directory allocated when the device is attached, sized for
/// the PASID width both the device and the unit support (`intel_pasid_alloc_table`); a
/// PASID table allocated when a PASID of its 64 is first used and installed with a
/// compare-and-exchange of the directory entry, so that concurrent users agree on one
/// table (`intel_pasid_get_entry`); every table freed with the directory, after the
/// device's context entry is cleared and invalidated (`intel_pasid_free_table`). The
/// directory in memory is the only record of the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidTables {
    dir: u64,
    pdts: u8,
}

impl PasidTables {
    /// An empty directory covering `pasid_bits` bits of PASID ([`pdts_for`]).
    pub fn alloc<F: TableFrames + ?Sized>(frames: &F, pasid_bits: u32) -> Result<Self, F::Error> {
        let pdts = pdts_for(pasid_bits);
        let dir = frames.alloc_frames(pasid_dir_bytes(pdts) / 4096)?;
        Ok(PasidTables { dir, pdts })
    }

    /// The directory's address: the context entry's PASIDDIRPTR.
    pub fn dir(&self) -> u64 {
        self.dir
    }

    /// The directory's size: the context entry's PDTS.
    pub fn pdts(&self) -> u8 {
        self.pdts
    }

    /// The address of `pasid`'s entry, allocating its PASID table on first use; `Ok(None)`
    /// when `pasid` is beyond the directory. On failure nothing is left allocated.
    pub fn entry<M, F>(&self, mem: &M, frames: &F, pasid: Pasid) -> Result<Option<u64>, F::Error>
    where
        M: PhysMem + ?Sized,
        F: TableFrames + ?Sized,
    {
        let Ok(pde_addr) = pasid_dir_entry_addr(self.dir, self.pdts, pasid) else {
            return Ok(None);
        };
        let mut pde = mem.read_u64(pde_addr)?;
        let mut table = None;
        loop {
            if let Ok(present) = PasidDirEntry::from_raw(pde) {
                if let Some(unused) = table {
                    frames.free_frame(unused);
                }
                return Ok(Some(pasid_entry_addr(present.smptblptr, pasid)));
            }
            let t = match table {
                Some(t) => t,
                None => *table.insert(frames.alloc_frame()?),
            };
            let new = PasidDirEntry {
                fpd: false,
                smptblptr: t,
            };
            // Another user may install a table meanwhile: take theirs, as
            // `intel_pasid_get_entry` retries.
            match mem.compare_exchange_u64(pde_addr, pde, new.to_raw()) {
                Ok(found) if found == pde => return Ok(Some(pasid_entry_addr(t, pasid))),
                Ok(found) => pde = found,
                Err(e) => {
                    frames.free_frame(t);
                    return Err(e.into());
                }
            }
        }
    }

    /// The address of `pasid`'s entry if its PASID table exists.
    pub fn existing_entry<M: PhysMem + ?Sized>(&self, mem: &M, pasid: Pasid) -> Option<u64> {
        let pde_addr = pasid_dir_entry_addr(self.dir, self.pdts, pasid).ok()?;
        let pde = PasidDirEntry::from_raw(mem.read_u64(pde_addr).ok()?).ok()?;
        Some(pasid_entry_addr(pde.smptblptr, pasid))
    }

    /// Frees every PASID table of the directory, then the directory. The device's context
    /// entry must be clear and the caches that may hold the tables invalidated. A
    /// directory entry that cannot be read is left (its table leaks rather than being
    /// freed twice).
    pub fn free<M, F>(self, mem: &M, frames: &F)
    where
        M: PhysMem + ?Sized,
        F: TableFrames + ?Sized,
    {
        for i in 0..pasid_dir_bytes(self.pdts) / 8 {
            if let Ok(Ok(pde)) = mem.read_u64(self.dir + 8 * i).map(PasidDirEntry::from_raw) {
                frames.free_frame(pde.smptblptr);
            }
        }
        frames.free_frame(self.dir);
    }
}

/// One context table: its address and the attached devices whose entries it holds.
#[derive(Debug)]
struct ContextTable {
    addr: u64,
    users: usize,
}

/// The context tables under one scalable-mode root table (§3.4.3, §9.1, §9.4): one per
/// bus half (device functions 0-127 in the root entry's LCTP, 128-255 in UCTP), allocated
/// when a device of that half first needs its context entry.
#[derive(Debug, Default)]
pub struct ContextTables {
    tables: HashMap<(u8, bool), ContextTable>,
}

/// The bus half a requester's context entry is in.
fn half(sid: SourceId) -> (u8, bool) {
    (sid.bus(), sid.devfn() >= 128)
}

impl ContextTables {
    /// The address of `sid`'s context entry under the root table at `root`, allocating
    /// the context table of its bus half and making that half of the root entry present
    /// on first use. On failure nothing is left allocated.
    pub fn entry<M, F>(
        &mut self,
        mem: &M,
        frames: &F,
        root: u64,
        sid: SourceId,
    ) -> Result<u64, F::Error>
    where
        M: PhysMem + ?Sized,
        F: TableFrames + ?Sized,
    {
        let key = half(sid);
        if let Some(t) = self.tables.get(&key) {
            return Ok(context_entry_addr(t.addr, sid.devfn()));
        }
        let addr = frames.alloc_frame()?;
        if let Err(e) = self.set_root_half(mem, root, key, Some(addr)) {
            frames.free_frame(addr);
            return Err(e.into());
        }
        self.tables.insert(key, ContextTable { addr, users: 0 });
        Ok(context_entry_addr(addr, sid.devfn()))
    }

    /// The address of `sid`'s context entry, if its context table exists.
    pub fn existing_entry(&self, sid: SourceId) -> Option<u64> {
        let t = self.tables.get(&half(sid))?;
        Some(context_entry_addr(t.addr, sid.devfn()))
    }

    /// Counts `sid` as a device whose present context entry is in its table.
    pub fn hold(&mut self, sid: SourceId) {
        if let Some(t) = self.tables.get_mut(&half(sid)) {
            t.users += 1;
        }
    }

    /// Drops `sid` from its table's devices (its context entry is clear); when it was the
    /// last, clears that half of the root entry and frees the table. Returns whether the
    /// root entry changed (the caller then invalidates the context cache globally).
    pub fn release<M, F>(
        &mut self,
        mem: &M,
        frames: &F,
        root: u64,
        sid: SourceId,
    ) -> Result<bool, MemError>
    where
        M: PhysMem + ?Sized,
        F: TableFrames + ?Sized,
    {
        let key = half(sid);
        let last = self.tables.get_mut(&key).is_some_and(|t| {
            t.users = t.users.saturating_sub(1);
            t.users == 0
        });
        if !last {
            return Ok(false);
        }
        let result = self.set_root_half(mem, root, key, None);
        if let Some(t) = self.tables.remove(&key) {
            frames.free_frame(t.addr);
        }
        result.map(|()| true)
    }

    /// Frees every context table (the root table is going away).
    pub fn free_all<F: TableFrames + ?Sized>(self, frames: &F) {
        for (_, t) in self.tables {
            frames.free_frame(t.addr);
        }
    }

    /// Points one half of a bus's root entry at a context table, or clears it; the other
    /// half keeps its table.
    fn set_root_half<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        root: u64,
        (bus, upper): (u8, bool),
        table: Option<u64>,
    ) -> Result<(), MemError> {
        let other = |u: bool| self.tables.get(&(bus, u)).map(|t| t.addr);
        let entry = if upper {
            ScalableRootEntry {
                lctp: other(false),
                uctp: table,
            }
        } else {
            ScalableRootEntry {
                lctp: table,
                uctp: other(true),
            }
        };
        let raw = entry.to_raw();
        let addr = root_entry_addr(root, bus);
        mem.write_u64(addr + 8 * u64::from(upper), raw[usize::from(upper)])
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    /// Frames from 0x10000 up, recording what is given back.
    #[derive(Default)]
    struct Frames {
        next: RefCell<u64>,
        freed: RefCell<Vec<u64>>,
        fail: bool,
    }

    impl TableFrames for Frames {
        type Error = MemError;
        fn alloc_frame(&self) -> Result<u64, MemError> {
            self.alloc_frames(1)
        }
        fn alloc_frames(&self, pages: u64) -> Result<u64, MemError> {
            if self.fail {
                return Err(MemError::OutOfRange { addr: 0, len: 4096 });
            }
            let mut next = self.next.borrow_mut();
            let addr = 0x1_1000 + *next;
            *next += 0x1000 * pages;
            Ok(addr)
        }
        fn free_frame(&self, addr: u64) {
            self.freed.borrow_mut().push(addr);
        }
    }

    const ROOT: u64 = 0x1000;

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn a_bus_half_gets_one_context_table_freed_with_its_last_device() {
        let (mem, frames) = (ram(), Frames::default());
        let mut t = ContextTables::default();
        let (a, b) = (
            SourceId::new(3, 1, 0).unwrap(),
            SourceId::new(3, 2, 0).unwrap(),
        );
        let upper = SourceId::from_rid(0x0380);
        let ea = t.entry(&mem, &frames, ROOT, a).unwrap();
        let eb = t.entry(&mem, &frames, ROOT, b).unwrap();
        let eu = t.entry(&mem, &frames, ROOT, upper).unwrap();
        assert_eq!(ea & !0xfff, eb & !0xfff, "one table for the lower half");
        assert_ne!(ea & !0xfff, eu & !0xfff, "another for the upper half");
        let root = ScalableRootEntry::from_raw([
            mem.read_u64(root_entry_addr(ROOT, 3)).unwrap(),
            mem.read_u64(root_entry_addr(ROOT, 3) + 8).unwrap(),
        ])
        .unwrap();
        assert_eq!(root.lctp, Some(ea & !0xfff));
        assert_eq!(root.uctp, Some(eu & !0xfff));
        assert_eq!(t.existing_entry(b), Some(eb));
        t.hold(a);
        t.hold(b);
        assert_eq!(t.release(&mem, &frames, ROOT, a), Ok(false));
        assert!(frames.freed.borrow().is_empty());
        assert_eq!(t.release(&mem, &frames, ROOT, b), Ok(true));
        assert_eq!(*frames.freed.borrow(), [ea & !0xfff]);
        assert_eq!(t.existing_entry(a), None);
        // The upper half keeps its table.
        assert_eq!(mem.read_u64(root_entry_addr(ROOT, 3)).unwrap(), 0);
        assert_eq!(
            mem.read_u64(root_entry_addr(ROOT, 3) + 8).unwrap(),
            eu & !0xfff | 1
        );
    }

    #[test]
    fn a_failed_allocation_leaves_the_root_entry_absent() {
        let (mem, frames) = (
            ram(),
            Frames {
                fail: true,
                ..Frames::default()
            },
        );
        let mut t = ContextTables::default();
        let sid = SourceId::new(7, 0, 0).unwrap();
        assert!(t.entry(&mem, &frames, ROOT, sid).is_err());
        assert_eq!(t.existing_entry(sid), None);
        assert_eq!(mem.read_u64(root_entry_addr(ROOT, 7)).unwrap(), 0);
    }

    #[test]
    fn directories_cover_the_pasids_in_at_least_a_page() {
        assert_eq!(pdts_for(20), 7);
        assert_eq!(pasid_dir_bytes(7), 128 << 10);
        assert_eq!(pdts_for(19), 6);
        assert_eq!(pdts_for(10), 2);
        assert_eq!(pasid_dir_bytes(2), 4096);
        assert_eq!(pdts_for(0), 2);
        assert_eq!(pdts_for(32), 7);
    }

    fn pasid(raw: u32) -> Pasid {
        Pasid::new(raw).unwrap()
    }

    #[test]
    fn a_pasid_table_serves_its_64_pasids_and_goes_with_the_directory() {
        let (mem, frames) = (ram(), Frames::default());
        let t = PasidTables::alloc(&frames, 20).unwrap();
        assert_eq!(t.pdts(), 7);
        assert_eq!(t.existing_entry(&mem, pasid(5)), None);
        let e5 = t.entry(&mem, &frames, pasid(5)).unwrap().unwrap();
        let e63 = t.entry(&mem, &frames, pasid(63)).unwrap().unwrap();
        let e64 = t.entry(&mem, &frames, pasid(64)).unwrap().unwrap();
        let top = t.entry(&mem, &frames, Pasid::MAX).unwrap().unwrap();
        assert_eq!(e63 - e5, 58 * PASID_ENTRY_SIZE, "one table for PASIDs 0-63");
        assert_ne!(e5 & !0xfff, e64 & !0xfff, "another for 64-127");
        assert_eq!(t.existing_entry(&mem, pasid(5)), Some(e5));
        assert_eq!(t.entry(&mem, &frames, pasid(5)).unwrap(), Some(e5));
        let pde = mem.read_u64(t.dir()).unwrap();
        assert_eq!(PasidDirEntry::from_raw(pde).unwrap().smptblptr, e5 & !0xfff);
        let tables = [e5, e64, top].map(|e| e & !0xfff);
        t.free(&mem, &frames);
        let mut freed = frames.freed.borrow().clone();
        freed.sort_unstable();
        let mut want = vec![t.dir(), tables[0], tables[1], tables[2]];
        want.sort_unstable();
        assert_eq!(freed, want, "every table and the directory, once each");
    }

    #[test]
    fn a_narrow_directory_refuses_pasids_beyond_it_and_a_failed_table_leaves_nothing() {
        let (mem, mut frames) = (ram(), Frames::default());
        let t = PasidTables::alloc(&frames, 8).unwrap();
        assert_eq!((t.pdts(), pasid_dir_bytes(t.pdts())), (2, 4096));
        assert_eq!(t.entry(&mem, &frames, pasid(1 << 15)).unwrap(), None);
        assert_eq!(t.existing_entry(&mem, pasid(1 << 15)), None);
        frames.fail = true;
        assert!(t.entry(&mem, &frames, pasid(7)).is_err());
        assert_eq!(mem.read_u64(t.dir()).unwrap(), 0, "no directory entry");
        assert!(frames.freed.borrow().is_empty());
    }

    /// Memory whose next compare-and-exchange finds another user's table installed first.
    struct Racing<'a> {
        mem: &'a GuestMemoryMmap,
        theirs: RefCell<Option<u64>>,
    }

    impl PhysMem for Racing<'_> {
        fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
            self.mem.read_u64(addr)
        }
        fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
            self.mem.fetch_or_u64(addr, bits)
        }
        fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
            if let Some(table) = self.theirs.borrow_mut().take() {
                let pde = PasidDirEntry {
                    fpd: false,
                    smptblptr: table,
                };
                self.mem.write_u64(addr, pde.to_raw())?;
            }
            self.mem.compare_exchange_u64(addr, old, new)
        }
        fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
            self.mem.write_u64(addr, value)
        }
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.mem.read(addr, buf)
        }
        fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
            self.mem.write(addr, buf)
        }
    }

    #[test]
    fn a_table_installed_meanwhile_is_taken_and_ours_given_back() {
        let (ram, frames) = (ram(), Frames::default());
        let t = PasidTables::alloc(&frames, 20).unwrap();
        let theirs = 0x8_0000;
        let mem = Racing {
            mem: &ram,
            theirs: RefCell::new(Some(theirs)),
        };
        let e = t.entry(&mem, &frames, pasid(3)).unwrap().unwrap();
        assert_eq!(e, pasid_entry_addr(theirs, pasid(3)));
        let freed = frames.freed.borrow().clone();
        assert_eq!(freed.len(), 1, "our table went back");
        assert_ne!(freed[0], theirs);
    }
}
