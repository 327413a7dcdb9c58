//! VMSAv8-64 translation walkers with the 4, 16 and 64 KiB granules: stage 1 (the CD's
//! TTB0 and TTB1), stage 2
//! (the STE's S2TTB) and nested, in which every stage-1 table address and the final IPA go
//! through stage 2 (IHI 0070 §3.3, Arm ARM D8 "The AArch64 Virtual Memory System
//! Architecture").
//!
//! Faults are classified as the SMMU records them (IHI 0070 §7.3): the event type, whether
//! stage 2 faulted (the S2 bit) and for a stage-2 fault the CLASS of the access stage 2 was
//! translating and the IPA. A walk can be watched entry by entry through a
//! [`WalkObserver`]; `()` ignores every step at no cost, and no walker allocates.

#[cfg(test)]
mod granule_tests;
mod stage1;
pub(crate) mod stage2;
#[cfg(test)]
mod tests;

pub use stage1::{
    walk_nested, walk_stage1, walk_stage1_from, walk_stage1_via, Direct, NestedStage, S1Config,
    S1Flags, S1Stage, S1Start, S1Table, TableControls,
};
pub use stage2::{walk_stage2, walk_stage2_from, S2Config, S2Flags, S2Start};

use crate::field::field_enum;
use crate::ste::Granule;
use std::fmt;

/// The size of a page or block a leaf descriptor maps. Each size belongs to one granule
/// and one lookup level (Arm ARM D8, "Translation granule"): 4 KiB pages with 2 MiB and
/// 1 GiB blocks, 16 KiB pages with 32 MiB blocks, 64 KiB pages with 512 MiB blocks and,
/// when the output size is 52 bits (FEAT_LPA), 4 TiB blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, a level-3 page (4 KiB granule).
    Size4K,
    /// 16 KiB, a level-3 page (16 KiB granule).
    Size16K,
    /// 64 KiB, a level-3 page (64 KiB granule).
    Size64K,
    /// 2 MiB, a level-2 block (4 KiB granule).
    Size2M,
    /// 32 MiB, a level-2 block (16 KiB granule).
    Size32M,
    /// 512 MiB, a level-2 block (64 KiB granule).
    Size512M,
    /// 1 GiB, a level-1 block (4 KiB granule).
    Size1G,
    /// 4 TiB, a level-1 block (64 KiB granule, 52-bit output size).
    Size4T,
}

impl PageSize {
    /// All sizes, smallest first.
    pub const ALL: [PageSize; 8] = [
        PageSize::Size4K,
        PageSize::Size16K,
        PageSize::Size64K,
        PageSize::Size2M,
        PageSize::Size32M,
        PageSize::Size512M,
        PageSize::Size1G,
        PageSize::Size4T,
    ];

    /// The largest size: the neutral element of `min` when combining stages.
    pub const MAX: PageSize = PageSize::Size4T;

    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        self.granule().level_shift(self.level())
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// The granule whose tables map this size.
    pub const fn granule(self) -> Granule {
        match self {
            PageSize::Size4K | PageSize::Size2M | PageSize::Size1G => Granule::Size4K,
            PageSize::Size16K | PageSize::Size32M => Granule::Size16K,
            PageSize::Size64K | PageSize::Size512M | PageSize::Size4T => Granule::Size64K,
        }
    }

    /// The lookup level whose leaf descriptors map this size (3 for a page).
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K | PageSize::Size16K | PageSize::Size64K => 3,
            PageSize::Size2M | PageSize::Size32M | PageSize::Size512M => 2,
            PageSize::Size1G | PageSize::Size4T => 1,
        }
    }

    /// The size a leaf at `level` maps with `granule`, if a leaf can sit there: pages at
    /// level 3; blocks at levels 1 and 2 with 4 KiB, level 2 with 16 KiB, level 2 with
    /// 64 KiB and level 1 too with `lpa` (Arm ARM D8, block descriptors; the levels FEAT_LPA2
    /// adds are not modelled).
    pub const fn of(granule: Granule, level: u8, lpa: bool) -> Option<PageSize> {
        Some(match (granule, level) {
            (Granule::Size4K, 3) => PageSize::Size4K,
            (Granule::Size4K, 2) => PageSize::Size2M,
            (Granule::Size4K, 1) => PageSize::Size1G,
            (Granule::Size16K, 3) => PageSize::Size16K,
            (Granule::Size16K, 2) => PageSize::Size32M,
            (Granule::Size64K, 3) => PageSize::Size64K,
            (Granule::Size64K, 2) => PageSize::Size512M,
            (Granule::Size64K, 1) if lpa => PageSize::Size4T,
            _ => return None,
        })
    }
}

field_enum! {
    /// An address size: the CD's IPS, the STE's S2PS and SMMU_IDR5.OAS (IHI 0070 §5.4,
    /// §5.2, §6.3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum AddressSize {
        /// 32 bits, 4 GiB.
        Bits32 = 0,
        /// 36 bits, 64 GiB.
        Bits36 = 1,
        /// 40 bits, 1 TiB.
        Bits40 = 2,
        /// 42 bits, 4 TiB.
        Bits42 = 3,
        /// 44 bits, 16 TiB.
        Bits44 = 4,
        /// 48 bits, 256 TiB.
        Bits48 = 5,
        /// 52 bits, 4 PiB (SMMUv3.1; only a 64 KiB-granule table outputs more than 48 bits).
        Bits52 = 6,
    }
}

impl AddressSize {
    /// The number of address bits.
    pub const fn bits(self) -> u32 {
        match self {
            AddressSize::Bits32 => 32,
            AddressSize::Bits36 => 36,
            AddressSize::Bits40 => 40,
            AddressSize::Bits42 => 42,
            AddressSize::Bits44 => 44,
            AddressSize::Bits48 => 48,
            AddressSize::Bits52 => 52,
        }
    }

    /// The output size a `granule` table can use under this setting: 52 bits only with the
    /// 64 KiB granule (FEAT_LPA: OA bits 51:48 sit in descriptor bits 15:12), otherwise at
    /// most 48 (IHI 0070 §3.4, Arm ARM D8).
    pub const fn effective_bits(self, granule: Granule) -> u32 {
        if self.bits() > 48 && !matches!(granule, Granule::Size64K) {
            48
        } else {
            self.bits()
        }
    }
}

/// A translation-table configuration that the walkers cannot use: the CD or STE holding it
/// is C_BAD_CD or C_BAD_STE (IHI 0070 §5.2, §5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TableConfigError {
    /// T0SZ outside 16..=39, the range of every granule without 52-bit VAs or small
    /// translation tables.
    #[error("T0SZ {0} is outside 16..=39")]
    T0sz(u8),
    /// T1SZ outside 16..=39.
    #[error("T1SZ {0} is outside 16..=39")]
    T1sz(u8),
    /// S2T0SZ outside 16..=39.
    #[error("S2T0SZ {0} is outside 16..=39")]
    S2t0sz(u8),
    /// S2SL0 names no start level for the granule, or one at which the IPA size needs fewer
    /// than one or more than 16 concatenated tables.
    #[error("S2SL0 {s2sl0} is inconsistent with S2T0SZ {s2t0sz}")]
    S2sl0 {
        /// S2SL0.
        s2sl0: u8,
        /// S2T0SZ.
        s2t0sz: u8,
    },
}

/// What a transaction asks for: its RnW, InD and PnU attributes (IHI 0070).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AccessRequest {
    /// RnW = 0: a write; otherwise a read.
    pub write: bool,
    /// InD = 1: an instruction fetch (only meaningful for reads).
    pub instruction: bool,
    /// PnU = 1: a privileged access.
    pub privileged: bool,
}

impl AccessRequest {
    /// An unprivileged data read.
    pub const READ: AccessRequest = AccessRequest {
        write: false,
        instruction: false,
        privileged: false,
    };
    /// An unprivileged data write.
    pub const WRITE: AccessRequest = AccessRequest {
        write: true,
        instruction: false,
        privileged: false,
    };
    /// An unprivileged instruction fetch.
    pub const FETCH: AccessRequest = AccessRequest {
        write: false,
        instruction: true,
        privileged: false,
    };

    /// The same access, privileged.
    pub const fn privileged(self) -> Self {
        AccessRequest {
            privileged: true,
            ..self
        }
    }

    /// Whether it is an instruction fetch (a write with InD set is a data write).
    pub(crate) const fn fetch(self) -> bool {
        self.instruction && !self.write
    }
}

/// The rights a translation grants to accesses of the walked access's privilege.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Permissions {
    /// Data reads are allowed.
    pub read: bool,
    /// Writes are allowed (possibly after a hardware dirty-state update).
    pub write: bool,
    /// Instruction fetches are allowed.
    pub execute: bool,
}

impl Permissions {
    /// Everything allowed: the neutral element of [`Permissions::intersect`].
    pub const ALL: Permissions = Permissions {
        read: true,
        write: true,
        execute: true,
    };

    /// The rights both grant.
    pub const fn intersect(self, other: Permissions) -> Permissions {
        Permissions {
            read: self.read && other.read,
            write: self.write && other.write,
            execute: self.execute && other.execute,
        }
    }

    /// Whether `access` is allowed.
    pub const fn allow(self, access: AccessRequest) -> bool {
        if access.write {
            self.write
        } else if access.fetch() {
            self.execute
        } else {
            self.read
        }
    }
}

/// The result of a successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The output address of the input address.
    pub output: u64,
    /// The size of the translated page or block: for nested translation the smaller of the
    /// two stages'.
    pub page_size: PageSize,
    /// The rights granted for accesses of the walked access's privilege.
    pub perms: Permissions,
    /// Whether every leaf is writable-dirty (stage 1 `AP[2] = 0`, stage 2 `S2AP[1] = 1`), so a
    /// cached copy may serve writes without another walk.
    pub dirty: bool,
    /// The stage-1 leaf is global (nG = 0): a TLB entry of it serves every ASID of the VMID
    /// (Arm ARM D8, "Global and process-specific translation table entries"). False for a
    /// stage-2-only translation, which has no ASID.
    pub global: bool,
}

impl Translation {
    /// The output address of the first byte of the page.
    pub const fn page_base(&self) -> u64 {
        self.output & !(self.page_size.bytes() - 1)
    }
}

/// The translation stage of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Stage 1: VA to IPA (or to PA without stage 2).
    Stage1,
    /// Stage 2: IPA to PA.
    Stage2,
}

field_enum! {
    /// The CLASS of a stage-2 fault: what stage 2 was translating (IHI 0070 §7.3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum FaultClass {
        /// CD: the fetch of a context descriptor (or L1CD) through stage 2.
        Cd = 0,
        /// TT: a stage-1 translation table access (a descriptor read or hardware update).
        Tt = 1,
        /// IN: the input address itself (the final IPA of a nested walk).
        In = 2,
    }
}

field_enum! {
    /// The event type of a translation fault (IHI 0070 §7.3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum FaultKind {
        /// F_WALK_EABT: an external abort on a descriptor fetch or update.
        WalkEabt = 0x0b,
        /// F_TRANSLATION: an invalid descriptor or an input address out of range.
        Translation = 0x10,
        /// F_ADDR_SIZE: a table or output address beyond the configured output size.
        AddrSize = 0x11,
        /// F_ACCESS: a leaf with AF = 0 and no hardware Access flag update.
        Access = 0x12,
        /// F_PERMISSION: the access is not permitted.
        Permission = 0x13,
    }
}

impl FaultKind {
    /// The spec's name of the event.
    pub const fn name(self) -> &'static str {
        match self {
            FaultKind::WalkEabt => "F_WALK_EABT",
            FaultKind::Translation => "F_TRANSLATION",
            FaultKind::AddrSize => "F_ADDR_SIZE",
            FaultKind::Access => "F_ACCESS",
            FaultKind::Permission => "F_PERMISSION",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which stage faulted: the S2 bit of the event, with CLASS and IPA when it is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultStage {
    /// S2 = 0: stage 1 faulted.
    Stage1,
    /// S2 = 1: stage 2 faulted while translating `ipa` for an access of `class`.
    Stage2 {
        /// CLASS.
        class: FaultClass,
        /// The IPA stage 2 was translating.
        ipa: u64,
    },
}

/// A failed walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{kind} ({stage:?}, level {level}, input {input:#x})")]
pub struct WalkFault {
    /// The event type.
    pub kind: FaultKind,
    /// The stage that faulted.
    pub stage: FaultStage,
    /// The lookup level of the faulting descriptor (0 for an input or table base address
    /// out of range, found before any descriptor is read).
    pub level: u8,
    /// InputAddr: the address the transaction asked to translate (the VA; the IPA for a
    /// stage-2-only translation).
    pub input: u64,
    /// For F_WALK_EABT, the physical address of the descriptor access that failed.
    pub fetch_address: Option<u64>,
}

/// What a walker decided about one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepOutcome {
    /// A table descriptor: the next table, in the stage's table address space (an IPA for
    /// stage 1 of a nested walk).
    Table(u64),
    /// A block or page descriptor.
    Leaf {
        /// The output address of the first byte.
        base: u64,
        /// The size mapped.
        size: PageSize,
    },
    /// The walk stops here.
    Fault(FaultKind),
}

/// One descriptor read by a walker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalkStep {
    /// The stage doing the read.
    pub stage: Stage,
    /// The lookup level (0 to 3).
    pub level: u8,
    /// The address the stage translates (a VA at stage 1, an IPA at stage 2).
    pub input: u64,
    /// The table's address as TTB0, S2TTB or the table descriptor above gives it.
    pub table: u64,
    /// The physical address the descriptor was read from.
    pub entry_address: u64,
    /// The descriptor as read, after this step's hardware update (0 if unreadable).
    pub entry: u64,
    /// The bits this step set atomically (AF; `S2AP[1]` for a stage-2 dirty-state update).
    pub set_bits: u64,
    /// The bits this step cleared atomically (`AP[2]` for a stage-1 dirty-state update).
    pub cleared_bits: u64,
    /// What the walker decided.
    pub outcome: StepOutcome,
}

/// Watches a walk step by step. `()` ignores every step at no cost.
pub trait WalkObserver {
    /// Called once for each descriptor the walker reads, in walk order.
    fn step(&mut self, step: WalkStep);
}

impl WalkObserver for () {
    #[inline(always)]
    fn step(&mut self, _step: WalkStep) {}
}

impl<O: WalkObserver + ?Sized> WalkObserver for &mut O {
    #[inline(always)]
    fn step(&mut self, step: WalkStep) {
        (**self).step(step)
    }
}

/// A full record of a walk, for explaining a translation or a fault afterwards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalkRecord {
    /// The steps in walk order.
    pub steps: Vec<WalkStep>,
}

impl WalkObserver for WalkRecord {
    fn step(&mut self, step: WalkStep) {
        self.steps.push(step);
    }
}

impl fmt::Display for WalkRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.steps {
            let stage = match s.stage {
                Stage::Stage1 => "S1",
                Stage::Stage2 => "S2",
            };
            write!(
                f,
                "{stage} L{} input {:#x}: table {:#x} desc@{:#x} = {:#018x}",
                s.level, s.input, s.table, s.entry_address, s.entry
            )?;
            if s.set_bits != 0 {
                write!(f, " (set {:#x})", s.set_bits)?;
            }
            if s.cleared_bits != 0 {
                write!(f, " (cleared {:#x})", s.cleared_bits)?;
            }
            match s.outcome {
                StepOutcome::Table(next) => writeln!(f, " -> table {next:#x}")?,
                StepOutcome::Leaf { base, size } => writeln!(f, " -> {size:?} at {base:#x}")?,
                StepOutcome::Fault(kind) => writeln!(f, " -> {kind}")?,
            }
        }
        Ok(())
    }
}

/// The index of the descriptor for `addr` in a `granule` table at `level`, where the walk
/// starts at `start` with an `input_bits`-bit input: the start table resolves every input
/// bit above the next level's, the others one stride each.
pub(crate) const fn table_index(
    granule: Granule,
    addr: u64,
    level: u8,
    start: u8,
    input_bits: u32,
) -> u64 {
    let shift = granule.level_shift(level);
    let width = if level == start {
        input_bits - shift
    } else {
        granule.stride()
    };
    (addr >> shift) & ((1 << width) - 1)
}

/// The byte alignment of a `granule` start table at `start` that resolves the input bits
/// above the next level's: its size.
pub(crate) const fn start_table_bytes(granule: Granule, start: u8, input_bits: u32) -> u64 {
    8 << (input_bits - granule.level_shift(start))
}

/// An atomic update of the descriptor at `pa` from `old` to `new`: `Ok(None)` when done,
/// `Ok(Some(found))` when the descriptor changed meanwhile, `Err` when memory refused it.
pub(crate) fn update<M: vsva_mem::PhysMem + ?Sized>(
    mem: &M,
    pa: u64,
    old: u64,
    new: u64,
) -> Result<Option<u64>, vsva_mem::MemError> {
    let found = mem.compare_exchange_u64(pa, old, new)?;
    Ok((found != old).then_some(found))
}
