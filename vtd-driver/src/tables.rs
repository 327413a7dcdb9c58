//! Writing the scalable-mode structures above the page tables (VT-d §3.4.3, §9.4, §9.5):
//! root, context and PASID entries, the size of a PASID directory, and the context tables
//! under a root table ([`ContextTables`]: allocated on first use of a bus half, freed when a
//! driver that frees them releases their last device).
//!
//! Entries are written with P last when made present and P first when cleared, so the
//! unit never reads a half-written present entry (as `context_set_present` and
//! `pasid_set_present` come last in intel-iommu).

use std::collections::HashMap;

use vsva_vtd::context::context_entry_addr;
use vsva_vtd::pasid::PASID_ENTRY_SIZE;
use vsva_vtd::root::root_entry_addr;
use vsva_vtd::{MemError, Pasid, PasidEntry, PhysMem, ScalableRootEntry, SourceId};

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
    for (i, q) in raw.iter().enumerate().skip(1) {
        mem.write_u64(addr + 8 * i as u64, *q)?;
    }
    if let Some(q0) = raw.first() {
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
    for (i, q) in raw.iter_mut().enumerate() {
        *q = mem.read_u64(slot + 8 * i as u64).ok()?;
    }
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
    /// Gives back a frame of [`TableFrames::alloc_frame`].
    fn free_frame(&self, addr: u64);
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
            if self.fail {
                return Err(MemError::OutOfRange { addr: 0, len: 4096 });
            }
            let mut next = self.next.borrow_mut();
            *next += 0x1000;
            Ok(0x1_0000 + *next)
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
}
