//! The dirty state of a stage-1 domain's table, read the way iommufd asks for it
//! (`IOMMU_HWPT_GET_DIRTY_BITMAP`), as Linux's io-pgtable-arm does it under
//! `IO_PGTABLE_QUIRK_ARM_HD` (`arm_lpae_read_and_clear_dirty`).
//!
//! With CD.HA and CD.HD (IHI 0070 §3.13, Arm ARM D8.4.6) a writable leaf is mapped
//! writable-clean: DBM = 1 with `AP[2] = 1`. The SMMU's first write through it clears
//! `AP[2]` (writable-dirty). A leaf with DBM set and `AP[2]` clear is dirty; clearing it
//! sets `AP[2]` again. A TLB entry of a writable-dirty leaf lets later writes through
//! without touching the descriptor, so every leaf made clean must have its TLB (and ATC)
//! entries invalidated before the next harvest, or writes after this one go unreported.
//!
//! The walk is [`crate::harvest`]'s, over the stage-1 descriptors.

use vsva_mem::PhysMem;
use vsva_smmuv3::desc::Descriptor as D;

use crate::error::HostError;
use crate::harvest::{DirtyFormat, DirtyWalk, Slot};

/// The start level of a 48-bit, 4 KiB-granule stage-1 table.
const START_LEVEL: u8 = 0;

/// What a harvest found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Harvest {
    /// The leaves made clean, as (input address, bytes): each needs its TLB entries
    /// invalidated.
    pub cleaned: Vec<(u64, u64)>,
    /// The number of dirty leaves seen.
    pub dirty: u64,
}

/// Whether stage-1 leaf `d` is writable-dirty (`iopte_writeable_dirty`).
fn writable_dirty(d: u64) -> bool {
    d & (D::DBM | D::AP_RO) == D::DBM
}

/// Tests every valid leaf of the stage-1 table at `root` that maps a byte of
/// `[start, last]`, calling `record(address, bytes)` for each writable-dirty one, and with
/// `clear` makes it writable-clean.
pub(super) fn harvest<M: PhysMem + ?Sized>(
    mem: &M,
    root: u64,
    start: u64,
    last: u64,
    clear: bool,
    record: &mut dyn FnMut(u64, u64),
) -> Result<Harvest, HostError> {
    let last = last.min((1u64 << super::IPA_BITS) - 1);
    let mut cleaned = Vec::new();
    let mut clean = |address, span| cleaned.push((address, span));
    let mut walk = DirtyWalk {
        start,
        last,
        clear,
        record,
        cleaned: &mut clean,
        dirty: 0,
    };
    if start <= last {
        walk.visit::<Stage1, M>(mem, root, START_LEVEL, 0)
            .map_err(|e| HostError::Driver {
                errno: libc::EFAULT,
                detail: format!("smmuv3: reading the stage-1 table: {e}"),
            })?;
    }
    let dirty = walk.dirty;
    Ok(Harvest { cleaned, dirty })
}

/// The 4 KiB-granule stage 1 as [`DirtyFormat`]: levels count up to 3; a leaf is dirty
/// when writable-dirty, made clean by setting `AP[2]`.
struct Stage1;

impl DirtyFormat for Stage1 {
    fn shift(level: u8) -> u32 {
        12 + 9 * u32::from(3 - level)
    }

    fn below(level: u8) -> u8 {
        level + 1
    }

    fn slot(entry: u64, level: u8) -> Slot {
        let table_or_page = entry & D::TABLE_OR_PAGE != 0;
        if entry & D::VALID == 0 {
            Slot::Invalid
        } else if level < 3 && table_or_page {
            Slot::Table(entry & D::ADDR_MASK)
        } else if (level == 0 || level == 3) && !table_or_page {
            // A level-0 block or a level-3 entry without the page bit is invalid.
            Slot::Invalid
        } else {
            Slot::Leaf
        }
    }

    fn dirty(entry: u64) -> bool {
        writable_dirty(entry)
    }

    fn cleaned(entry: u64) -> u64 {
        entry | D::AP_RO
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsva_hw::memory::HostMemory;
    use vsva_smmuv3::builder::TableBuilder;
    use vsva_smmuv3::walk::{AddressSize, PageSize, S1Config, S1Flags};

    const CLEAN: u64 = D::AF | D::AP_EL0 | D::NG | D::DBM | D::AP_RO;

    /// A 4 KiB page, a 2 MiB block and a read-only page: only the writable-dirty leaves
    /// are reported (a block as its whole span), cleaning makes them clean and only
    /// them, and a range outside reports nothing.
    #[test]
    fn harvest_reports_and_cleans_writable_dirty_leaves() {
        let mem = HostMemory::new(8 << 20).unwrap();
        let mem = &*mem;
        let mut next = 0x10_0000u64;
        let mut alloc = || {
            next += 0x1000;
            Some(next)
        };
        let cfg = S1Config::new(0x1000, 16, AddressSize::Bits48, S1Flags::default()).unwrap();
        let mut t = TableBuilder::stage1(&cfg);
        t.map(mem, &mut alloc, 0x4000, 0x40_0000, PageSize::Size4K, CLEAN)
            .unwrap();
        t.map(mem, &mut alloc, 0x5000, 0x41_0000, PageSize::Size4K, CLEAN)
            .unwrap();
        t.map(
            mem,
            &mut alloc,
            0x20_0000,
            0x60_0000,
            PageSize::Size2M,
            CLEAN,
        )
        .unwrap();
        let ro = D::AF | D::AP_EL0 | D::NG | D::AP_RO;
        t.map(mem, &mut alloc, 0x6000, 0x42_0000, PageSize::Size4K, ro)
            .unwrap();
        let dirty = |va: u64| {
            let a = t.descriptor_address(mem, va, 3).unwrap();
            let a = a.or_else(|| t.descriptor_address(mem, va, 2).unwrap());
            let a = a.unwrap();
            let d = mem.read_u64(a).unwrap();
            mem.write_u64(a, d & !D::AP_RO).unwrap();
        };
        dirty(0x5000);
        dirty(0x20_0000);
        let mut seen = Vec::new();
        let h = harvest(mem, 0x1000, 0, u64::MAX, false, &mut |a, l| {
            seen.push((a, l))
        })
        .unwrap();
        assert_eq!(seen, vec![(0x5000, 0x1000), (0x20_0000, 0x20_0000)]);
        assert_eq!(
            (h.dirty, h.cleaned.len()),
            (2, 0),
            "no clear: nothing cleaned"
        );
        let h = harvest(mem, 0x1000, 0x40_0000, u64::MAX, true, &mut |_, _| {}).unwrap();
        assert_eq!(h, Harvest::default(), "outside the range");
        let h = harvest(mem, 0x1000, 0, u64::MAX, true, &mut |_, _| {}).unwrap();
        assert_eq!(h.cleaned, vec![(0x5000, 0x1000), (0x20_0000, 0x20_0000)]);
        let h = harvest(mem, 0x1000, 0, u64::MAX, true, &mut |_, _| {}).unwrap();
        assert_eq!(h, Harvest::default(), "clean after the clear");
    }
}
