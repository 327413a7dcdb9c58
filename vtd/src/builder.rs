//! Builds first-level (§9.7) and second-level (§9.8) page tables in memory.
//!
//! The same builder serves every owner of a table: the host IOMMU driver (second level in
//! host memory), the guest OS model (process page tables in guest memory), tests and the
//! harness that checks the first-level walker against the CPU's MMU. It writes through any
//! [`PhysMem`] and takes its table frames from a [`FrameSource`]; addresses are whatever
//! that memory uses (host or guest physical).
//!
//! Intermediate entries grant everything (first level: P, R/W, U/S; second level: R, W, X),
//! so the leaf alone decides the rights. Tables emptied by `unmap` are kept until
//! [`PageTableBuilder::unhook_empty`] hands them to the caller (to free once no
//! paging-structure cache can point to them) or [`PageTableBuilder::destroy`] frees every
//! table frame the builder still holds.

use crate::flpte::{FlPagingMode, FlPte};
use crate::pte;
use crate::slpte::{SlLevels, SlPte};
use crate::walk::{table_index, PageSize};
use std::ops::BitOr;
use vsva_mem::{MemError, PhysMem};

/// Where table frames come from.
pub trait FrameSource {
    /// A 4-KiB-aligned frame for a table, by address, or `None` when none is left. The
    /// builder clears the frame before use.
    fn alloc_table(&mut self) -> Option<u64>;

    /// Gives back a frame that `alloc_table` returned.
    fn free_table(&mut self, frame: u64);
}

impl<F: FrameSource + ?Sized> FrameSource for &mut F {
    fn alloc_table(&mut self) -> Option<u64> {
        (**self).alloc_table()
    }

    fn free_table(&mut self, frame: u64) {
        (**self).free_table(frame)
    }
}

/// The kind of table a builder builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TableFormat {
    /// First-level (IA-32e) tables.
    FirstLevel(FlPagingMode),
    /// Second-level tables.
    SecondLevel(SlLevels),
}

impl TableFormat {
    /// The number of levels.
    pub const fn levels(self) -> u8 {
        match self {
            TableFormat::FirstLevel(mode) => mode.levels(),
            TableFormat::SecondLevel(levels) => levels.levels(),
        }
    }

    /// Whether `va` is a valid input address: canonical for the first level, inside the
    /// input width for the second.
    pub const fn accepts(self, va: u64) -> bool {
        match self {
            TableFormat::FirstLevel(mode) => mode.is_canonical(va),
            TableFormat::SecondLevel(levels) => va >> levels.input_width() == 0,
        }
    }

    fn present(self, entry: u64) -> bool {
        match self {
            TableFormat::FirstLevel(_) => FlPte(entry).present(),
            TableFormat::SecondLevel(_) => SlPte(entry).present(),
        }
    }

    fn table_entry(self, table: u64) -> u64 {
        match self {
            TableFormat::FirstLevel(_) => FlPte::table(table, FlPte::RW | FlPte::US).0,
            TableFormat::SecondLevel(_) => SlPte::table(table, SlPte::R | SlPte::W | SlPte::X).0,
        }
    }

    /// The entry bits that express `flags`, and the mask of bits they replace.
    fn rights(self, flags: MapFlags) -> Result<(u64, u64), BuildError> {
        match self {
            TableFormat::FirstLevel(_) => {
                if !flags.contains(MapFlags::READ) {
                    return Err(BuildError::Unreadable);
                }
                let mut bits = 0;
                if flags.contains(MapFlags::WRITE) {
                    bits |= FlPte::RW;
                }
                if flags.contains(MapFlags::USER) {
                    bits |= FlPte::US;
                }
                if !flags.contains(MapFlags::EXECUTE) {
                    bits |= FlPte::XD;
                }
                Ok((bits, FlPte::RW | FlPte::US | FlPte::XD))
            }
            TableFormat::SecondLevel(_) => {
                if !flags.contains(MapFlags::READ) && !flags.contains(MapFlags::WRITE) {
                    return Err(BuildError::NoAccess);
                }
                let mut bits = 0;
                if flags.contains(MapFlags::READ) {
                    bits |= SlPte::R;
                }
                if flags.contains(MapFlags::WRITE) {
                    bits |= SlPte::W;
                }
                if flags.contains(MapFlags::EXECUTE) {
                    bits |= SlPte::X;
                }
                Ok((bits, SlPte::R | SlPte::W | SlPte::X))
            }
        }
    }

    fn leaf_entry(self, pa: u64, size: PageSize, rights: u64) -> u64 {
        match self {
            TableFormat::FirstLevel(_) => FlPte::page(pa, size, rights).0,
            TableFormat::SecondLevel(_) => SlPte::page(pa, size, rights).0,
        }
    }
}

/// The rights of a mapping. The first level cannot express write-only or unreadable pages;
/// the second level has no user/supervisor distinction and ignores [`MapFlags::USER`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MapFlags(u8);

impl MapFlags {
    /// No rights.
    pub const NONE: MapFlags = MapFlags(0);
    /// Readable.
    pub const READ: MapFlags = MapFlags(1);
    /// Writable.
    pub const WRITE: MapFlags = MapFlags(2);
    /// Executable.
    pub const EXECUTE: MapFlags = MapFlags(4);
    /// Accessible to user-privilege requests (first level).
    pub const USER: MapFlags = MapFlags(8);

    /// Whether every right of `other` is in `self`.
    pub const fn contains(self, other: MapFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for MapFlags {
    type Output = MapFlags;

    fn bitor(self, rhs: MapFlags) -> MapFlags {
        MapFlags(self.0 | rhs.0)
    }
}

/// A leaf found by [`PageTableBuilder::lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The page's base address.
    pub page: u64,
    /// The page's size.
    pub size: PageSize,
    /// The leaf entry as stored.
    pub entry: u64,
}

/// Why a builder operation was refused. A refused operation leaves the table unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// An address is not aligned to the page size.
    #[error("address {addr:#x} is not aligned to {size:?}")]
    Misaligned {
        /// The input or output address.
        addr: u64,
        /// The page size it must be aligned to.
        size: PageSize,
    },
    /// The input address is not canonical (first level) or beyond the input width.
    #[error("input address {0:#x} is outside the table's address space")]
    OutOfRange(u64),
    /// The output address does not fit the 52-bit address field.
    #[error("output address {0:#x} does not fit in 52 bits")]
    OutputTooWide(u64),
    /// A first-level mapping must be readable.
    #[error("first-level pages are always readable; READ is required")]
    Unreadable,
    /// A second-level mapping must be readable or writable.
    #[error("a second-level mapping needs READ or WRITE")]
    NoAccess,
    /// The level is not a level of this table.
    #[error("level {0} is not a level of this table")]
    BadLevel(u8),
    /// The page is already mapped.
    #[error("{va:#x} is already mapped at level {level}")]
    AlreadyMapped {
        /// The input address.
        va: u64,
        /// Level (1 = 4-KiB leaf) of the present entry in the way.
        level: u8,
    },
    /// A page of another size, or a table where a page was expected, is in the way.
    #[error("{va:#x} is mapped with another page size (found at level {level})")]
    SizeConflict {
        /// The input address.
        va: u64,
        /// Level (1 = 4-KiB leaf) of the entry that is a page or table of the wrong size.
        level: u8,
    },
    /// Nothing is mapped there.
    #[error("{va:#x} is not mapped as a {size:?} page")]
    NotMapped {
        /// The input address.
        va: u64,
        /// The page size asked for.
        size: PageSize,
    },
    /// The tables leading to the entry do not exist.
    #[error("no table holds the level-{level} entry of {va:#x}")]
    NoTable {
        /// The input address.
        va: u64,
        /// Level of the entry asked for.
        level: u8,
    },
    /// The frame source returned a frame that is not 4-KiB aligned or not below 2^52.
    #[error("table frame {0:#x} is not a 4-KiB aligned address below 2^52")]
    BadFrame(u64),
    /// The frame source is exhausted.
    #[error("no frame left for a page table")]
    OutOfFrames,
    /// The memory refused an access.
    #[error(transparent)]
    Memory(#[from] MemError),
}

/// A page table under construction, by its root and the frames of all its tables.
#[derive(Debug)]
pub struct PageTableBuilder {
    format: TableFormat,
    root: u64,
    tables: Vec<u64>,
}

impl PageTableBuilder {
    /// An empty table: one cleared root frame from `frames`.
    pub fn new<M, F>(format: TableFormat, mem: &M, frames: &mut F) -> Result<Self, BuildError>
    where
        M: PhysMem + ?Sized,
        F: FrameSource + ?Sized,
    {
        let root = alloc_cleared(mem, frames)?;
        Ok(PageTableBuilder {
            format,
            root,
            tables: vec![root],
        })
    }

    /// The table format.
    pub fn format(&self) -> TableFormat {
        self.format
    }

    /// The root table's address: FLPTPTR or SLPTPTR.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The number of table frames held, root included.
    pub fn table_frames(&self) -> usize {
        self.tables.len()
    }

    /// Maps the page of `size` at `va` to `pa` with `flags`, creating tables as needed.
    pub fn map<M, F>(
        &mut self,
        mem: &M,
        frames: &mut F,
        va: u64,
        pa: u64,
        size: PageSize,
        flags: MapFlags,
    ) -> Result<(), BuildError>
    where
        M: PhysMem + ?Sized,
        F: FrameSource + ?Sized,
    {
        self.check_va(va, size)?;
        if pa & (size.bytes() - 1) != 0 {
            return Err(BuildError::Misaligned { addr: pa, size });
        }
        if pa & !pte::ADDR_MASK != 0 {
            return Err(BuildError::OutputTooWide(pa));
        }
        let (rights, _) = self.format.rights(flags)?;
        let leaf = self.format.leaf_entry(pa, size, rights);
        let created = self.tables.len();
        let mut first_link = None;
        let result = self.map_inner(mem, frames, va, size, leaf, &mut first_link);
        if result.is_err() {
            // Undo: unhook the first new table and free every new one.
            if let Some(link) = first_link {
                // The same slot was written moments ago; the map error is the one to report.
                let _ = mem.write_u64(link, 0);
            }
            for frame in self.tables.drain(created..) {
                frames.free_table(frame);
            }
        }
        result
    }

    fn map_inner<M, F>(
        &mut self,
        mem: &M,
        frames: &mut F,
        va: u64,
        size: PageSize,
        leaf: u64,
        first_link: &mut Option<u64>,
    ) -> Result<(), BuildError>
    where
        M: PhysMem + ?Sized,
        F: FrameSource + ?Sized,
    {
        let target = size.level();
        let mut table = self.root;
        for level in (target + 1..=self.format.levels()).rev() {
            let link = table + table_index(va, level) * 8;
            let entry = mem.read_u64(link)?;
            if !self.format.present(entry) {
                let new = alloc_cleared(mem, frames)?;
                self.tables.push(new);
                mem.write_u64(link, self.format.table_entry(new))?;
                first_link.get_or_insert(link);
                table = new;
            } else if pte::is_leaf(entry, level) {
                return Err(BuildError::SizeConflict { va, level });
            } else {
                table = entry & pte::ADDR_MASK;
            }
        }
        let slot = table + table_index(va, target) * 8;
        if self.format.present(mem.read_u64(slot)?) {
            return Err(BuildError::AlreadyMapped { va, level: target });
        }
        mem.write_u64(slot, leaf)?;
        Ok(())
    }

    /// Removes the page of `size` at `va`. Returns whether one was mapped.
    pub fn unmap<M>(&mut self, mem: &M, va: u64, size: PageSize) -> Result<bool, BuildError>
    where
        M: PhysMem + ?Sized,
    {
        match self.leaf_slot(mem, va, size)? {
            Some((slot, _)) => {
                mem.write_u64(slot, 0)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Replaces the rights of the page of `size` at `va`, keeping its other bits.
    pub fn protect<M>(
        &mut self,
        mem: &M,
        va: u64,
        size: PageSize,
        flags: MapFlags,
    ) -> Result<(), BuildError>
    where
        M: PhysMem + ?Sized,
    {
        let (rights, mask) = self.format.rights(flags)?;
        let Some((slot, entry)) = self.leaf_slot(mem, va, size)? else {
            return Err(BuildError::NotMapped { va, size });
        };
        mem.write_u64(slot, (entry & !mask) | rights)?;
        Ok(())
    }

    /// The present leaf of `size` at `va`: its address and value.
    fn leaf_slot<M>(
        &self,
        mem: &M,
        va: u64,
        size: PageSize,
    ) -> Result<Option<(u64, u64)>, BuildError>
    where
        M: PhysMem + ?Sized,
    {
        self.check_va(va, size)?;
        let target = size.level();
        let mut table = self.root;
        for level in (target + 1..=self.format.levels()).rev() {
            let entry = mem.read_u64(table + table_index(va, level) * 8)?;
            if !self.format.present(entry) {
                return Ok(None);
            }
            if pte::is_leaf(entry, level) {
                return Err(BuildError::SizeConflict { va, level });
            }
            table = entry & pte::ADDR_MASK;
        }
        let slot = table + table_index(va, target) * 8;
        let entry = mem.read_u64(slot)?;
        if !self.format.present(entry) {
            return Ok(None);
        }
        if !pte::is_leaf(entry, target) {
            return Err(BuildError::SizeConflict { va, level: target });
        }
        Ok(Some((slot, entry)))
    }

    /// The leaf mapping `va`, found the way hardware would but without checking rights or
    /// reserved bits.
    pub fn lookup<M>(&self, mem: &M, va: u64) -> Result<Option<Mapping>, BuildError>
    where
        M: PhysMem + ?Sized,
    {
        if !self.format.accepts(va) {
            return Err(BuildError::OutOfRange(va));
        }
        let mut table = self.root;
        for level in (1..=self.format.levels()).rev() {
            let entry = mem.read_u64(table + table_index(va, level) * 8)?;
            if !self.format.present(entry) {
                return Ok(None);
            }
            if pte::is_leaf(entry, level) {
                if let Some(size) = PageSize::from_level(level) {
                    return Ok(Some(Mapping {
                        page: pte::page_address(entry, size),
                        size,
                        entry,
                    }));
                }
            }
            table = entry & pte::ADDR_MASK;
        }
        Ok(None)
    }

    /// The address of the level-`level` entry for `va`, if the tables above it exist.
    pub fn entry_address<M>(&self, mem: &M, va: u64, level: u8) -> Result<Option<u64>, BuildError>
    where
        M: PhysMem + ?Sized,
    {
        if level == 0 || level > self.format.levels() {
            return Err(BuildError::BadLevel(level));
        }
        if !self.format.accepts(va) {
            return Err(BuildError::OutOfRange(va));
        }
        let mut table = self.root;
        for l in (level + 1..=self.format.levels()).rev() {
            let entry = mem.read_u64(table + table_index(va, l) * 8)?;
            if !self.format.present(entry) || pte::is_leaf(entry, l) {
                return Ok(None);
            }
            table = entry & pte::ADDR_MASK;
        }
        Ok(Some(table + table_index(va, level) * 8))
    }

    /// Stores `value` as the level-`level` entry for `va`, whatever its bits: for building
    /// malformed tables on purpose.
    pub fn write_entry<M>(
        &mut self,
        mem: &M,
        va: u64,
        level: u8,
        value: u64,
    ) -> Result<(), BuildError>
    where
        M: PhysMem + ?Sized,
    {
        let Some(slot) = self.entry_address(mem, va, level)? else {
            return Err(BuildError::NoTable { va, level });
        };
        mem.write_u64(slot, value)?;
        Ok(())
    }

    /// Unhooks the tables below the level-`level` entry of `va` when they map nothing,
    /// clearing the entry so that a page of that level can take its place. Returns their
    /// frames, which are no longer the builder's: the caller frees them once no cache can
    /// hold them (a table's memory must outlive the paging-structure caches that point to
    /// it). Nothing happens when the entry is not present. A page mapped at the entry or
    /// below it, or a table the builder did not allocate, is an error and changes nothing.
    pub fn unhook_empty<M>(&mut self, mem: &M, va: u64, level: u8) -> Result<Vec<u64>, BuildError>
    where
        M: PhysMem + ?Sized,
    {
        if level < 2 {
            return Err(BuildError::BadLevel(level));
        }
        let Some(slot) = self.entry_address(mem, va, level)? else {
            return Ok(Vec::new());
        };
        let entry = mem.read_u64(slot)?;
        if !self.format.present(entry) {
            return Ok(Vec::new());
        }
        if pte::is_leaf(entry, level) {
            return Err(BuildError::AlreadyMapped { va, level });
        }
        let mut found = Vec::new();
        let mut pending = vec![(entry & pte::ADDR_MASK, level - 1)];
        while let Some((table, l)) = pending.pop() {
            if !self.tables.contains(&table) {
                return Err(BuildError::BadFrame(table));
            }
            found.push(table);
            for i in 0..512 {
                let e = mem.read_u64(table + i * 8)?;
                if !self.format.present(e) {
                    continue;
                }
                if l == 1 || pte::is_leaf(e, l) {
                    return Err(BuildError::AlreadyMapped { va, level: l });
                }
                pending.push((e & pte::ADDR_MASK, l - 1));
            }
        }
        mem.write_u64(slot, 0)?;
        self.tables.retain(|t| !found.contains(t));
        Ok(found)
    }

    /// Frees every table frame to `frames`. Returns how many were freed.
    pub fn destroy<F>(self, frames: &mut F) -> usize
    where
        F: FrameSource + ?Sized,
    {
        let n = self.tables.len();
        for frame in self.tables {
            frames.free_table(frame);
        }
        n
    }

    fn check_va(&self, va: u64, size: PageSize) -> Result<(), BuildError> {
        if va & (size.bytes() - 1) != 0 {
            return Err(BuildError::Misaligned { addr: va, size });
        }
        if !self.format.accepts(va) {
            return Err(BuildError::OutOfRange(va));
        }
        Ok(())
    }
}

/// A frame from `frames`, cleared.
fn alloc_cleared<M, F>(mem: &M, frames: &mut F) -> Result<u64, BuildError>
where
    M: PhysMem + ?Sized,
    F: FrameSource + ?Sized,
{
    let frame = frames.alloc_table().ok_or(BuildError::OutOfFrames)?;
    if frame & !pte::ADDR_MASK != 0 {
        frames.free_table(frame);
        return Err(BuildError::BadFrame(frame));
    }
    if let Err(e) = mem.write(frame, &[0u8; 4096]) {
        frames.free_table(frame);
        return Err(e.into());
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{TestFrames, TestMemory};

    const FL4: TableFormat = TableFormat::FirstLevel(FlPagingMode::FourLevel);
    const SL4: TableFormat = TableFormat::SecondLevel(SlLevels::Four);

    fn setup() -> (TestMemory, TestFrames) {
        (TestMemory::new(1 << 20), TestFrames::new(0x1000, 1 << 20))
    }

    const RW: MapFlags = MapFlags(MapFlags::READ.0 | MapFlags::WRITE.0);

    #[test]
    fn first_level_entries_are_hand_checkable() {
        let (mem, mut frames) = setup();
        let mut b = PageTableBuilder::new(FL4, &mem, &mut frames).unwrap();
        assert_eq!(b.root(), 0x1000);
        let va = 0x0000_7f12_3456_7000;
        b.map(
            &mem,
            &mut frames,
            va,
            0xabc000,
            PageSize::Size4K,
            RW | MapFlags::USER,
        )
        .unwrap();
        // Root, PDPT, PD, PT were taken in that order.
        assert_eq!(b.table_frames(), 4);
        let pml4e = mem.read_u64(0x1000 + ((va >> 39) & 0x1ff) * 8).unwrap();
        assert_eq!(pml4e, 0x2007);
        let pte = mem.read_u64(0x4000 + ((va >> 12) & 0x1ff) * 8).unwrap();
        // P | RW | US | XD (not executable).
        assert_eq!(pte, 0x8000_0000_00ab_c007);
        let m = b.lookup(&mem, va + 0x123).unwrap().unwrap();
        assert_eq!((m.page, m.size, m.entry), (0xabc000, PageSize::Size4K, pte));
    }

    #[test]
    fn empty_tables_make_way_for_a_large_page() {
        let (mem, mut frames) = setup();
        let mut b = PageTableBuilder::new(SL4, &mem, &mut frames).unwrap();
        let va = 0x4020_0000;
        let rw = MapFlags::READ | MapFlags::WRITE;
        assert_eq!(b.unhook_empty(&mem, va, 2).unwrap(), Vec::<u64>::new());
        b.map(&mem, &mut frames, va + 0x3000, 0x9000, PageSize::Size4K, rw)
            .unwrap();
        assert_eq!(b.table_frames(), 4);
        // Something is mapped below: refused, nothing changes.
        assert_eq!(
            b.unhook_empty(&mem, va, 2),
            Err(BuildError::AlreadyMapped { va, level: 1 })
        );
        assert_eq!(b.unhook_empty(&mem, va, 1), Err(BuildError::BadLevel(1)));
        assert!(b.lookup(&mem, va + 0x3000).unwrap().is_some());
        assert!(b.unmap(&mem, va + 0x3000, PageSize::Size4K).unwrap());
        assert!(matches!(
            b.map(&mem, &mut frames, va, 0x20_0000, PageSize::Size2M, rw),
            Err(BuildError::AlreadyMapped { level: 2, .. })
        ));
        let freed = b.unhook_empty(&mem, va, 2).unwrap();
        assert_eq!(freed.len(), 1);
        assert_eq!(b.table_frames(), 3);
        b.map(&mem, &mut frames, va, 0x20_0000, PageSize::Size2M, rw)
            .unwrap();
        assert_eq!(
            b.lookup(&mem, va + 0x3000).unwrap().unwrap().size,
            PageSize::Size2M
        );
        // A page at the entry itself is refused too.
        assert_eq!(
            b.unhook_empty(&mem, va, 2),
            Err(BuildError::AlreadyMapped { va, level: 2 })
        );
        for f in freed {
            frames.free_table(f);
        }
        assert_eq!(b.destroy(&mut frames), 3);
    }

    #[test]
    fn second_level_large_pages() {
        let (mem, mut frames) = setup();
        let mut b = PageTableBuilder::new(SL4, &mem, &mut frames).unwrap();
        let flags = MapFlags::READ | MapFlags::EXECUTE;
        b.map(
            &mem,
            &mut frames,
            0x4000_0000,
            0x8000_0000,
            PageSize::Size1G,
            flags,
        )
        .unwrap();
        b.map(
            &mem,
            &mut frames,
            0x20_0000,
            0x60_0000,
            PageSize::Size2M,
            MapFlags::WRITE,
        )
        .unwrap();
        let m = b.lookup(&mem, 0x4123_4567).unwrap().unwrap();
        assert_eq!(m.size, PageSize::Size1G);
        assert_eq!(m.entry, 0x8000_0000 | SlPte::PS | SlPte::R | SlPte::X);
        let m = b.lookup(&mem, 0x21_0000).unwrap().unwrap();
        assert_eq!(m.entry, 0x60_0000 | SlPte::PS | SlPte::W);
        assert_eq!(b.lookup(&mem, 0x40_0000).unwrap(), None);
    }

    #[test]
    fn refusals_change_nothing() {
        let (mem, mut frames) = setup();
        let mut b = PageTableBuilder::new(FL4, &mem, &mut frames).unwrap();
        b.map(
            &mem,
            &mut frames,
            0x20_0000,
            0x20_0000,
            PageSize::Size2M,
            RW,
        )
        .unwrap();
        let tables = b.table_frames();
        let cases = [
            (0x1000u64, 0x1234u64, PageSize::Size4K, RW),
            (0x1800, 0x1000, PageSize::Size4K, RW),
            (0x0000_8000_0000_0000, 0x1000, PageSize::Size4K, RW),
            (0x1000, 1 << 52, PageSize::Size4K, RW),
            (0x1000, 0x1000, PageSize::Size4K, MapFlags::WRITE),
            (0x20_0000, 0x0, PageSize::Size2M, RW),
            (0x20_1000, 0x0, PageSize::Size4K, RW),
        ];
        let expected = [
            BuildError::Misaligned {
                addr: 0x1234,
                size: PageSize::Size4K,
            },
            BuildError::Misaligned {
                addr: 0x1800,
                size: PageSize::Size4K,
            },
            BuildError::OutOfRange(0x0000_8000_0000_0000),
            BuildError::OutputTooWide(1 << 52),
            BuildError::Unreadable,
            BuildError::AlreadyMapped {
                va: 0x20_0000,
                level: 2,
            },
            BuildError::SizeConflict {
                va: 0x20_1000,
                level: 2,
            },
        ];
        for ((va, pa, size, flags), want) in cases.into_iter().zip(expected) {
            assert_eq!(b.map(&mem, &mut frames, va, pa, size, flags), Err(want));
            assert_eq!(b.table_frames(), tables);
        }
        let sl = PageTableBuilder::new(SL4, &mem, &mut frames).unwrap();
        let mut sl = sl;
        assert_eq!(
            sl.map(&mem, &mut frames, 0, 0, PageSize::Size4K, MapFlags::EXECUTE),
            Err(BuildError::NoAccess)
        );
        assert_eq!(
            sl.map(&mem, &mut frames, 1 << 48, 0, PageSize::Size4K, RW),
            Err(BuildError::OutOfRange(1 << 48))
        );
    }

    #[test]
    fn running_out_of_frames_rolls_back() {
        let mem = TestMemory::new(1 << 20);
        // Root and one more table only: a 4-KiB mapping needs three more.
        let mut frames = TestFrames::new(0x1000, 0x3000);
        let mut b = PageTableBuilder::new(FL4, &mem, &mut frames).unwrap();
        assert_eq!(
            b.map(&mem, &mut frames, 0x1000, 0x1000, PageSize::Size4K, RW),
            Err(BuildError::OutOfFrames)
        );
        assert_eq!(b.table_frames(), 1);
        assert_eq!(frames.outstanding, 1);
        assert_eq!(b.entry_address(&mem, 0x1000, 3).unwrap(), None);
        assert_eq!(mem.read_u64(0x1000).unwrap(), 0);
    }

    #[test]
    fn unmap_protect_and_teardown() {
        let (mem, mut frames) = setup();
        let mut b = PageTableBuilder::new(FL4, &mem, &mut frames).unwrap();
        for i in 0..4u64 {
            b.map(&mem, &mut frames, i << 30, i << 21, PageSize::Size2M, RW)
                .unwrap();
        }
        // One PDPT, four PDs.
        assert_eq!(b.table_frames(), 6);
        assert_eq!(frames.outstanding, 6);

        // Rights change, other bits (A, D, G) stay.
        let slot = b.entry_address(&mem, 1 << 30, 2).unwrap().unwrap();
        mem.fetch_or_u64(slot, FlPte::A | FlPte::D | FlPte::G)
            .unwrap();
        b.protect(
            &mem,
            1 << 30,
            PageSize::Size2M,
            MapFlags::READ | MapFlags::EXECUTE,
        )
        .unwrap();
        let e = mem.read_u64(slot).unwrap();
        assert_eq!(
            e,
            (1 << 21) | FlPte::P | FlPte::PS | FlPte::A | FlPte::D | FlPte::G
        );
        assert_eq!(
            b.protect(&mem, 2 << 30, PageSize::Size4K, RW),
            Err(BuildError::SizeConflict {
                va: 2 << 30,
                level: 2
            })
        );
        assert_eq!(
            b.protect(&mem, 5 << 30, PageSize::Size2M, RW),
            Err(BuildError::NotMapped {
                va: 5 << 30,
                size: PageSize::Size2M
            })
        );

        assert_eq!(b.unmap(&mem, 1 << 30, PageSize::Size2M), Ok(true));
        assert_eq!(b.unmap(&mem, 1 << 30, PageSize::Size2M), Ok(false));
        assert_eq!(b.lookup(&mem, 1 << 30).unwrap(), None);
        assert_eq!(b.unmap(&mem, 9 << 30, PageSize::Size4K), Ok(false));
        assert_eq!(
            b.unmap(&mem, 0, PageSize::Size1G),
            Err(BuildError::SizeConflict { va: 0, level: 3 })
        );

        assert_eq!(b.destroy(&mut frames), 6);
        assert_eq!(frames.outstanding, 0);
    }

    struct Odd(u64);

    impl FrameSource for Odd {
        fn alloc_table(&mut self) -> Option<u64> {
            Some(self.0)
        }
        fn free_table(&mut self, frame: u64) {
            assert_eq!(frame, self.0);
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let mem = TestMemory::new(1 << 20);
        for frame in [0x1800, 1 << 52] {
            assert_eq!(
                PageTableBuilder::new(FL4, &mem, &mut Odd(frame)).unwrap_err(),
                BuildError::BadFrame(frame)
            );
        }
        // A frame outside the memory.
        assert!(matches!(
            PageTableBuilder::new(FL4, &mem, &mut Odd(2 << 20)),
            Err(BuildError::Memory(MemError::OutOfRange { .. }))
        ));
    }

    #[test]
    fn raw_entries() {
        let (mem, mut frames) = setup();
        let mut b = PageTableBuilder::new(SL4, &mem, &mut frames).unwrap();
        assert_eq!(
            b.write_entry(&mem, 0x5000, 1, 7),
            Err(BuildError::NoTable {
                va: 0x5000,
                level: 1
            })
        );
        assert_eq!(
            b.write_entry(&mem, 0x5000, 5, 7),
            Err(BuildError::BadLevel(5))
        );
        b.map(&mem, &mut frames, 0x5000, 0x9000, PageSize::Size4K, RW)
            .unwrap();
        b.write_entry(&mem, 0x5000, 1, 0x9000 | SlPte::R | SlPte::SNP | 1 << 60)
            .unwrap();
        let m = b.lookup(&mem, 0x5000).unwrap().unwrap();
        assert_eq!(m.entry, 0x9000 | SlPte::R | SlPte::SNP | 1 << 60);
        let root_slot = b.entry_address(&mem, 0x5000, 4).unwrap();
        assert_eq!(root_slot, Some(b.root()));
    }
}
