//! Builds VMSAv8-64 translation tables in memory, with any granule: stage 1 under a CD's
//! TTB0 or TTB1, or stage 2 under an STE's S2TTB (Arm ARM D8), for tests and table owners.
//!
//! Table descriptors carry no hierarchical controls, so the leaf alone decides the rights.
//! Leaf attributes are given as descriptor bits (AP, AF, UXN, S2AP, ...).

use crate::desc::{Descriptor, DescriptorKind, TableFormat};
use crate::field::bits;
use crate::walk::{table_index, PageSize, S1Config, S1Table, S2Config};
use {vsva_mem::MemError, vsva_mem::PhysMem};

/// Why a builder operation was refused. A refused operation writes no descriptor (tables
/// already created for it stay, empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// An address is not aligned to the page size.
    #[error("address {addr:#x} is not aligned to {size:?}")]
    Misaligned {
        /// The address.
        addr: u64,
        /// The page size it must be aligned to.
        size: PageSize,
    },
    /// The input address is beyond the table's input size.
    #[error("input address {0:#x} is outside the table's input range")]
    OutOfRange(u64),
    /// The output address does not fit the output address field (48 bits, or 52 in the
    /// 52-bit 64 KiB format).
    #[error("output address {0:#x} does not fit the output address field")]
    OutputTooWide(u64),
    /// The table's format has no leaf of that size (another granule's size, or a 4 TiB
    /// block without a 52-bit SMMU output size).
    #[error("{0:?} leaves do not exist in this table's format")]
    NoSuchLeaf(PageSize),
    /// The page size needs a level above the start level.
    #[error("{0:?} blocks sit above this table's start level")]
    SizeAboveStart(PageSize),
    /// Something is already mapped there.
    #[error("{va:#x} is already mapped at level {level}")]
    AlreadyMapped {
        /// The input address.
        va: u64,
        /// The level of the valid descriptor found.
        level: u8,
    },
    /// Nothing of that size is mapped there.
    #[error("{va:#x} is not mapped as a {size:?} page or block")]
    NotMapped {
        /// The input address.
        va: u64,
        /// The size asked for.
        size: PageSize,
    },
    /// A block is in the way of a smaller mapping.
    #[error("{va:#x} is covered by a block at level {level}")]
    SizeConflict {
        /// The input address.
        va: u64,
        /// The level of the block.
        level: u8,
    },
    /// The frame source returned a frame that is not granule-aligned or does not fit the
    /// table address field.
    #[error("table frame {0:#x} is not granule-aligned within the table address field")]
    BadFrame(u64),
    /// The frame source is exhausted.
    #[error("no frame left for a table")]
    OutOfFrames,
    /// The memory refused an access.
    #[error(transparent)]
    Memory(#[from] MemError),
}

/// A leaf found by [`TableBuilder::lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The output address of the page or block.
    pub base: u64,
    /// Its size.
    pub size: PageSize,
    /// The descriptor as stored.
    pub descriptor: u64,
}

/// A translation table under construction: its start table (which the caller provides,
/// zeroed) and the frames of the tables the builder added, each one granule in size.
#[derive(Debug)]
pub struct TableBuilder {
    root: u64,
    start: u8,
    input_bits: u32,
    format: TableFormat,
    /// A TTB1 table: input addresses have every bit above the input size set.
    upper: bool,
    tables: Vec<u64>,
}

impl TableBuilder {
    /// A builder for the stage-1 table at `cfg`'s TTB0.
    pub fn stage1(cfg: &S1Config) -> Self {
        Self::of_s1_table(cfg, cfg.ttb0(), false)
    }

    /// A builder for the stage-1 table at `cfg`'s TTB1, if TTB1 walks are enabled. Its
    /// input addresses are upper-range VAs (every bit above the input size set).
    pub fn stage1_ttb1(cfg: &S1Config) -> Option<Self> {
        cfg.ttb1().map(|t| Self::of_s1_table(cfg, t, true))
    }

    fn of_s1_table(cfg: &S1Config, t: &S1Table, upper: bool) -> Self {
        TableBuilder {
            root: t.root(),
            start: t.start_level(),
            input_bits: t.input_bits(),
            format: cfg.format(t),
            upper,
            tables: Vec::new(),
        }
    }

    /// A builder for the stage-2 table at `cfg`'s S2TTB (with its concatenated tables).
    pub fn stage2(cfg: &S2Config) -> Self {
        TableBuilder {
            root: cfg.root(),
            start: cfg.start_level(),
            input_bits: cfg.input_bits(),
            format: cfg.format(),
            upper: false,
            tables: Vec::new(),
        }
    }

    /// Whether `va` is an input address of the table.
    fn in_range(&self, va: u64) -> bool {
        let high = bits(63, self.input_bits);
        va & high == if self.upper { high } else { 0 }
    }

    /// The frames of the tables added below the start table.
    pub fn tables(&self) -> &[u64] {
        &self.tables
    }

    /// Maps the `size` page or block at `va` to `pa` with the leaf attribute bits `attrs`,
    /// taking cleared frames for new tables from `alloc`.
    pub fn map<M>(
        &mut self,
        mem: &M,
        alloc: &mut dyn FnMut() -> Option<u64>,
        va: u64,
        pa: u64,
        size: PageSize,
        attrs: u64,
    ) -> Result<(), BuildError>
    where
        M: PhysMem + ?Sized,
    {
        let mask = size.bytes() - 1;
        if va & mask != 0 {
            return Err(BuildError::Misaligned { addr: va, size });
        }
        if pa & mask != 0 {
            return Err(BuildError::Misaligned { addr: pa, size });
        }
        if !self.in_range(va) {
            return Err(BuildError::OutOfRange(va));
        }
        let fmt = self.format;
        if PageSize::of(fmt.granule, size.level(), fmt.lpa) != Some(size) {
            return Err(BuildError::NoSuchLeaf(size));
        }
        let oa_field = if fmt.oa52() { 52 } else { 48 };
        if pa >> oa_field != 0 {
            return Err(BuildError::OutputTooWide(pa));
        }
        if size.level() < self.start {
            return Err(BuildError::SizeAboveStart(size));
        }
        let table_bytes = 1usize << fmt.granule.shift();
        let mut table = self.root;
        for level in self.start..size.level() {
            let slot = self.slot(table, va, level);
            let desc = Descriptor(mem.read_u64(slot)?);
            table = match desc.decode(fmt, level) {
                DescriptorKind::Table(next) => next,
                DescriptorKind::Leaf { .. } => return Err(BuildError::SizeConflict { va, level }),
                DescriptorKind::Invalid => {
                    let frame = alloc().ok_or(BuildError::OutOfFrames)?;
                    if frame & (table_bytes as u64 - 1) != 0 || frame >> oa_field != 0 {
                        return Err(BuildError::BadFrame(frame));
                    }
                    mem.write(frame, &vec![0; table_bytes])?;
                    mem.write_u64(slot, Descriptor::table_in(fmt, frame, 0).0)?;
                    self.tables.push(frame);
                    frame
                }
            };
        }
        let level = size.level();
        let slot = self.slot(table, va, level);
        if Descriptor(mem.read_u64(slot)?).decode(fmt, level) != DescriptorKind::Invalid {
            return Err(BuildError::AlreadyMapped { va, level });
        }
        mem.write_u64(slot, Descriptor::leaf(pa, size, attrs).0)?;
        Ok(())
    }

    /// The page or block that maps `va`, if any.
    pub fn lookup<M>(&self, mem: &M, va: u64) -> Result<Option<Mapping>, BuildError>
    where
        M: PhysMem + ?Sized,
    {
        if !self.in_range(va) {
            return Err(BuildError::OutOfRange(va));
        }
        let mut table = self.root;
        for level in self.start..=3 {
            let descriptor = mem.read_u64(self.slot(table, va, level))?;
            match Descriptor(descriptor).decode(self.format, level) {
                DescriptorKind::Table(next) => table = next,
                DescriptorKind::Leaf { base, size } => {
                    return Ok(Some(Mapping {
                        base,
                        size,
                        descriptor,
                    }))
                }
                DescriptorKind::Invalid => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Removes the `size` page or block mapped at `va` (writing an invalid descriptor) and
    /// returns what it mapped. Tables it leaves empty stay in place (see
    /// [`TableBuilder::tables`]). The caller must invalidate TLBs that may hold it.
    pub fn unmap<M>(&mut self, mem: &M, va: u64, size: PageSize) -> Result<Mapping, BuildError>
    where
        M: PhysMem + ?Sized,
    {
        if va & (size.bytes() - 1) != 0 {
            return Err(BuildError::Misaligned { addr: va, size });
        }
        match self.lookup(mem, va)? {
            Some(m) if m.size == size => {
                let slot = self
                    .descriptor_address(mem, va, size.level())?
                    .ok_or(BuildError::NotMapped { va, size })?;
                mem.write_u64(slot, 0)?;
                Ok(m)
            }
            _ => Err(BuildError::NotMapped { va, size }),
        }
    }

    /// The address of the level-`level` descriptor of `va`, if the tables leading to it
    /// exist.
    pub fn descriptor_address<M>(
        &self,
        mem: &M,
        va: u64,
        level: u8,
    ) -> Result<Option<u64>, BuildError>
    where
        M: PhysMem + ?Sized,
    {
        if !self.in_range(va) {
            return Err(BuildError::OutOfRange(va));
        }
        let mut table = self.root;
        for l in self.start..=level.min(3) {
            let slot = self.slot(table, va, l);
            if l == level {
                return Ok(Some(slot));
            }
            match Descriptor(mem.read_u64(slot)?).decode(self.format, l) {
                DescriptorKind::Table(next) => table = next,
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    fn slot(&self, table: u64, va: u64, level: u8) -> u64 {
        table + table_index(self.format.granule, va, level, self.start, self.input_bits) * 8
    }
}
