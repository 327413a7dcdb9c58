//! The stage-2 walker: IPA to PA through the STE's S2TTB (IHI 0070 §3.3, §5.2; Arm ARM
//! D8, stage 2 permissions).
//!
//! `S2AP[0]` grants reads and `S2AP[1]` writes; an instruction fetch needs only XN clear (the
//! Arm ARM checks nothing else for a stage-2 fetch). A stage-1 table read through stage 2
//! needs read permission and a stage-1 hardware update write permission; with S2PTW, a
//! stage-1 table in Device memory is a Permission fault. A leaf with AF = 0 is an Access
//! fault unless S2HA (hardware sets AF) or S2AFFD (no fault). With S2HA and S2HD, a write to
//! a DBM leaf without `S2AP[1]` sets `S2AP[1]`. Updates are one compare-exchange on the
//! descriptor as read, made only once the access is known to be allowed.

use super::{
    start_table_bytes, table_index, update, AccessRequest, AddressSize, FaultClass, FaultKind,
    FaultStage, Permissions, Stage, StepOutcome, TableConfigError, Translation, WalkFault,
    WalkObserver, WalkStep,
};
use crate::desc::{Descriptor, DescriptorKind, TableFormat};
use crate::ste::Granule;
use vsva_mem::PhysMem;

/// The STE's stage-2 hardware-management and fault controls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct S2Flags {
    /// S2HA: hardware sets AF.
    pub ha: bool,
    /// S2HD: hardware dirty-state management (effective only with S2HA).
    pub hd: bool,
    /// S2AFFD: a leaf with AF = 0 does not fault.
    pub affd: bool,
    /// S2PTW: stage-1 table walks to Device memory fault.
    pub ptw: bool,
}

/// A checked stage-2 configuration (the STE's S2TTB, S2T0SZ, S2SL0, S2PS, S2TG).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct S2Config {
    root: u64,
    t0sz: u8,
    start: u8,
    format: TableFormat,
    flags: S2Flags,
}

impl S2Config {
    /// The configuration of the 4 KiB-granule table at `s2ttb`, with an input of
    /// `64 - s2t0sz` bits (16..=39), starting at the level S2SL0 names (0: level 2, 1:
    /// level 1, 2: level 0), which must resolve between 1 bit and 13 bits (16 concatenated
    /// tables), and an output size of `s2ps` (at most 48 bits with this granule). S2TTB
    /// bits below the start table's size are ignored.
    pub fn new(
        s2ttb: u64,
        s2t0sz: u8,
        s2sl0: u8,
        s2ps: AddressSize,
        flags: S2Flags,
    ) -> Result<Self, TableConfigError> {
        Self::with_granule(s2ttb, s2t0sz, s2sl0, Granule::Size4K, s2ps, false, flags)
    }

    /// The configuration of the `granule` table at `s2ttb` (S2TG), with an input of
    /// `64 - s2t0sz` bits (16..=39), starting at the level S2SL0 names (4 KiB: 0 level 2,
    /// 1 level 1, 2 level 0; 16 and 64 KiB: 0 level 3, 1 level 2, 2 level 1), which must
    /// resolve between 1 bit and one stride plus 4 bits (16 concatenated tables; Arm ARM
    /// D8, "concatenated translation tables"). The output size is `s2ps` (S2PS capped by
    /// OAS; above 48 bits only with 64 KiB), and `lpa` says SMMU_IDR5.OAS is 52 bits
    /// (64 KiB-granule level-1 blocks).
    pub fn with_granule(
        s2ttb: u64,
        s2t0sz: u8,
        s2sl0: u8,
        granule: Granule,
        s2ps: AddressSize,
        lpa: bool,
        flags: S2Flags,
    ) -> Result<Self, TableConfigError> {
        if !(16..=39).contains(&s2t0sz) {
            return Err(TableConfigError::S2t0sz(s2t0sz));
        }
        let bad_sl0 = TableConfigError::S2sl0 { s2sl0, s2t0sz };
        let start = match (granule, s2sl0) {
            (Granule::Size4K, 0..=2) => 2 - s2sl0,
            (Granule::Size16K | Granule::Size64K, 0..=2) => 3 - s2sl0,
            _ => return Err(bad_sl0),
        };
        let input_bits = 64 - s2t0sz as u32;
        let shift = granule.level_shift(start);
        if input_bits <= shift || input_bits - shift > granule.stride() + 4 {
            return Err(bad_sl0);
        }
        Ok(S2Config {
            root: s2ttb & !(start_table_bytes(granule, start, input_bits) - 1),
            t0sz: s2t0sz,
            start,
            format: TableFormat {
                granule,
                output_bits: s2ps.effective_bits(granule),
                lpa,
            },
            flags,
        })
    }

    /// The start table's address (S2TTB).
    pub const fn root(&self) -> u64 {
        self.root
    }

    /// S2T0SZ.
    pub const fn t0sz(&self) -> u8 {
        self.t0sz
    }

    /// The number of IPA bits translated.
    pub const fn input_bits(&self) -> u32 {
        64 - self.t0sz as u32
    }

    /// The lookup level of the start table.
    pub const fn start_level(&self) -> u8 {
        self.start
    }

    /// The number of concatenated tables at the start level (1 to 16).
    pub const fn concatenated_tables(&self) -> u64 {
        let granule = self.format.granule;
        let bytes = start_table_bytes(granule, self.start, self.input_bits());
        let table = 1 << granule.shift();
        if bytes > table {
            bytes / table
        } else {
            1
        }
    }

    /// The effective output size in bits.
    pub const fn output_bits(&self) -> u32 {
        self.format.output_bits
    }

    /// The granule (S2TG).
    pub const fn granule(&self) -> Granule {
        self.format.granule
    }

    /// How the table's descriptors are read.
    pub const fn format(&self) -> TableFormat {
        self.format
    }

    /// The hardware-management and fault controls.
    pub const fn flags(&self) -> S2Flags {
        self.flags
    }
}

/// Why stage 2 is translating an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum S2Use {
    /// The transaction's own address (or final IPA), with its access.
    Input(AccessRequest),
    /// A stage-1 table access: a descriptor read, or with `write` a hardware update.
    Table { write: bool },
}

/// Where a stage-2 walk starts: the start table at S2TTB ([`S2Start::top`]), or a table
/// further down, as a stage-2 walk cache entry gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct S2Start {
    /// The lookup level of the table.
    pub level: u8,
    /// The table's physical address.
    pub table: u64,
}

impl S2Start {
    /// The start table of `cfg`.
    pub const fn top(cfg: &S2Config) -> S2Start {
        S2Start {
            level: cfg.start,
            table: cfg.root,
        }
    }

    /// The start below `desc`, a table descriptor in `fmt` read from this start's table.
    pub const fn below(self, fmt: TableFormat, desc: u64) -> S2Start {
        S2Start {
            level: self.level.saturating_add(1),
            table: Descriptor(desc).address(fmt),
        }
    }
}

/// Translates `ipa` through the stage-2 table of `cfg` for `access`, reporting each
/// descriptor read to `obs`. Faults have CLASS IN and InputAddr `ipa`.
pub fn walk_stage2<M, O>(
    mem: &M,
    cfg: &S2Config,
    ipa: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    walk_stage2_from(mem, cfg, S2Start::top(cfg), ipa, access, obs)
}

/// [`walk_stage2`] from `start`: the descriptors above it are neither read nor updated.
/// The input range is checked either way; a start level outside the table's walks from
/// the top.
pub fn walk_stage2_from<M, O>(
    mem: &M,
    cfg: &S2Config,
    start: S2Start,
    ipa: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    let use_ = S2Use::Input(access);
    walk(mem, cfg, start, ipa, use_, FaultClass::In, ipa, obs)
}

/// The stage-2 walk of `ipa` from `start` for `use_`; a fault names `class` and the
/// transaction's `input` address.
#[allow(clippy::too_many_arguments)]
pub(crate) fn walk<M, O>(
    mem: &M,
    cfg: &S2Config,
    start: S2Start,
    ipa: u64,
    use_: S2Use,
    class: FaultClass,
    input: u64,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    let fault = |kind, level, fetch_address| WalkFault {
        kind,
        stage: FaultStage::Stage2 { class, ipa },
        level,
        input,
        fetch_address,
    };
    let input_bits = cfg.input_bits();
    if ipa >> input_bits != 0 {
        return Err(fault(FaultKind::Translation, 0, None));
    }
    let top = S2Start::top(cfg);
    let start = if (cfg.start..=3).contains(&start.level) {
        start
    } else {
        top
    };
    // A lower start's table came from a descriptor whose address was checked.
    let fmt = cfg.format;
    if start == top && cfg.root >> fmt.output_bits != 0 {
        return Err(fault(FaultKind::AddrSize, 0, None));
    }
    let hd = cfg.flags.ha && cfg.flags.hd;
    let mut level = start.level;
    let mut table = start.table;
    loop {
        // A start table from the caller may be anywhere: past the top of the address space
        // there is nothing to read.
        let offset = table_index(fmt.granule, ipa, level, cfg.start, input_bits) * 8;
        let Some(entry_address) = table.checked_add(offset) else {
            return Err(fault(FaultKind::WalkEabt, level, Some(table)));
        };
        let mut step = WalkStep {
            stage: Stage::Stage2,
            level,
            input: ipa,
            table,
            entry_address,
            entry: 0,
            set_bits: 0,
            cleared_bits: 0,
            outcome: StepOutcome::Fault(FaultKind::WalkEabt),
        };
        let Ok(mut raw) = mem.read_u64(entry_address) else {
            obs.step(step);
            return Err(fault(FaultKind::WalkEabt, level, Some(entry_address)));
        };
        // Evaluated again when a hardware update finds the descriptor changed.
        let (desc, base, size) = loop {
            let desc = Descriptor(raw);
            step.entry = raw;
            let stop = |mut step: WalkStep, obs: &mut O, kind| {
                step.outcome = StepOutcome::Fault(kind);
                obs.step(step);
                Err(fault(kind, level, None))
            };
            let (base, size) = match desc.decode(fmt, level) {
                DescriptorKind::Invalid => return stop(step, obs, FaultKind::Translation),
                DescriptorKind::Table(next) => {
                    if desc.address_beyond_in(fmt) {
                        return stop(step, obs, FaultKind::AddrSize);
                    }
                    step.outcome = StepOutcome::Table(next);
                    obs.step(step);
                    break (desc, next, None);
                }
                DescriptorKind::Leaf { base, size } => (base, size),
            };
            if desc.address_beyond_in(fmt) {
                return stop(step, obs, FaultKind::AddrSize);
            }
            let af = desc.has(Descriptor::AF);
            if !af && !cfg.flags.ha && !cfg.flags.affd {
                return stop(step, obs, FaultKind::Access);
            }
            let perms = permissions(desc, hd);
            let (allowed, writes) = match use_ {
                S2Use::Input(access) => (perms.allow(access), access.write),
                S2Use::Table { write } => {
                    let ok = if write { perms.write } else { perms.read };
                    (ok && !(cfg.flags.ptw && desc.s2_device()), write)
                }
            };
            if !allowed {
                return stop(step, obs, FaultKind::Permission);
            }
            let mut set = 0;
            if !af && cfg.flags.ha {
                set |= Descriptor::AF;
            }
            if writes && !desc.has(Descriptor::S2AP_W) {
                // Allowed, so this is a DBM leaf under S2HD: make it writable-dirty.
                set |= Descriptor::S2AP_W;
            }
            if set == 0 {
                break (desc, base, Some(size));
            }
            match update(mem, entry_address, raw, raw | set) {
                Ok(None) => {
                    raw |= set;
                    step.entry = raw;
                    step.set_bits = set;
                    break (Descriptor(raw), base, Some(size));
                }
                Ok(Some(found)) => raw = found,
                Err(_) => {
                    step.outcome = StepOutcome::Fault(FaultKind::WalkEabt);
                    obs.step(step);
                    return Err(fault(FaultKind::WalkEabt, level, Some(entry_address)));
                }
            }
        };
        let Some(size) = size else {
            table = base;
            level += 1;
            continue;
        };
        step.outcome = StepOutcome::Leaf { base, size };
        obs.step(step);
        return Ok(Translation {
            output: base | (ipa & (size.bytes() - 1)),
            page_size: size,
            perms: permissions(desc, hd),
            dirty: desc.has(Descriptor::S2AP_W),
            global: false,
        });
    }
}

/// The rights of a stage-2 leaf: S2AP, XN, and writes to a DBM leaf under S2HD.
fn permissions(desc: Descriptor, hd: bool) -> Permissions {
    Permissions {
        read: desc.has(Descriptor::S2AP_R),
        write: desc.has(Descriptor::S2AP_W) || (hd && desc.has(Descriptor::DBM)),
        execute: !desc.has(Descriptor::XN),
    }
}
