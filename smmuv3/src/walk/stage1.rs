//! The stage-1 walker: VA to IPA (or PA) through the CD's TTB0 or TTB1 (IHI 0070 §3.3,
//! §5.4; Arm ARM D8, stage 1 permissions), and its use for nested translation.
//!
//! The two VA ranges follow the Arm ARM's EL1&0 regime: VA bit 55 selects TTB1 (the upper
//! range) or TTB0; the bits above the range's input size, up to bit 63 or with the range's
//! TBI up to bit 55, must all equal bit 55, and a range whose walks are disabled (EPD0,
//! EPD1) translates nothing. Each range has its own granule and size.
//!
//! Rights follow the Arm ARM for the EL1&0 regime, with the privilege taken from the
//! transaction's PnU: `AP[2]` makes a page read-only and `AP[1]` opens it to unprivileged
//! accesses, restricted further by APTable from the tables above; UXN/PXN (and
//! UXNTable/PXNTable) forbid fetches; a page writable by unprivileged accesses is never
//! privileged-executable, and with the CD's WXN no writable page is executable; with PAN,
//! privileged data accesses to pages open to unprivileged accesses fault. A leaf with
//! AF = 0 is an Access fault (which takes priority over a Permission fault) unless HA or
//! AFFD; with HA and HD a write to a DBM leaf with `AP[2] = 1` clears `AP[2]` (writable-clean
//! to writable-dirty). Updates are one compare-exchange on the descriptor as read, made
//! only once stage 1 allows the access; in nested translation they are writes through
//! stage 2.

use super::stage2::{self, S2Config, S2Start, S2Use};
use super::{
    start_table_bytes, table_index, update, AccessRequest, AddressSize, FaultClass, FaultKind,
    FaultStage, PageSize, Permissions, Stage, StepOutcome, TableConfigError, Translation,
    WalkFault, WalkObserver, WalkStep,
};
use crate::desc::{Descriptor, DescriptorKind, TableFormat};
use crate::field::bits;
use crate::ste::Granule;
use vsva_mem::PhysMem;

/// The CD's stage-1 controls that the walk uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct S1Flags {
    /// HA: hardware sets AF.
    pub ha: bool,
    /// HD: hardware dirty-state management (effective only with HA).
    pub hd: bool,
    /// AFFD: a leaf with AF = 0 does not fault.
    pub affd: bool,
    /// WXN: writable pages are never executable.
    pub wxn: bool,
    /// PAN: privileged data accesses to pages that unprivileged accesses may read or write
    /// are refused.
    pub pan: bool,
    /// TBI0: the top byte of a TTB0 VA is ignored.
    pub tbi: bool,
    /// EPD0: walks of TTB0 are disabled (every lower-range VA is a Translation fault).
    pub epd0: bool,
    /// TBI1: the top byte of a TTB1 VA is ignored.
    pub tbi1: bool,
}

/// One of stage 1's two translation tables: TTB0 for the lower VA range or TTB1 for the
/// upper, with its size (T0SZ/T1SZ) and granule (TG0/TG1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct S1Table {
    root: u64,
    tsz: u8,
    granule: Granule,
    start: u8,
}

impl S1Table {
    /// The TTB0 table at `ttb0` for a `64 - t0sz`-bit lower VA range (16..=39) with
    /// `granule`, starting at the level that leaves at most one stride to the start table.
    /// TTB0 bits below the start table's size are ignored.
    pub fn ttb0(ttb0: u64, t0sz: u8, granule: Granule) -> Result<Self, TableConfigError> {
        Self::new(ttb0, t0sz, granule).ok_or(TableConfigError::T0sz(t0sz))
    }

    /// The TTB1 table at `ttb1` for a `64 - t1sz`-bit upper VA range (16..=39), as
    /// [`S1Table::ttb0`].
    pub fn ttb1(ttb1: u64, t1sz: u8, granule: Granule) -> Result<Self, TableConfigError> {
        Self::new(ttb1, t1sz, granule).ok_or(TableConfigError::T1sz(t1sz))
    }

    fn new(ttb: u64, tsz: u8, granule: Granule) -> Option<Self> {
        if !(16..=39).contains(&tsz) {
            return None;
        }
        let input_bits = 64 - tsz as u32;
        let start = granule.start_level(input_bits);
        Some(S1Table {
            root: ttb & !(start_table_bytes(granule, start, input_bits) - 1),
            tsz,
            granule,
            start,
        })
    }

    /// The start table's address.
    pub const fn root(&self) -> u64 {
        self.root
    }

    /// T0SZ or T1SZ.
    pub const fn tsz(&self) -> u8 {
        self.tsz
    }

    /// The granule.
    pub const fn granule(&self) -> Granule {
        self.granule
    }

    /// The number of VA bits translated.
    pub const fn input_bits(&self) -> u32 {
        64 - self.tsz as u32
    }

    /// The lookup level of the start table.
    pub const fn start_level(&self) -> u8 {
        self.start
    }
}

/// A checked stage-1 configuration: the CD's TTB0 and, unless EPD1, TTB1, with IPS and the
/// walk controls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct S1Config {
    ttb0: S1Table,
    ttb1: Option<S1Table>,
    ips: AddressSize,
    lpa: bool,
    flags: S1Flags,
}

impl S1Config {
    /// The configuration of the 4 KiB-granule TTB0 table at `ttb0` for a `64 - t0sz`-bit VA
    /// range (16..=39), TTB1 disabled (EPD1), with output size `ips` (the smaller of the
    /// CD's IPS and SMMU_IDR5.OAS, at most 48 bits with this granule). TTB0 bits below the
    /// start table's size are ignored.
    pub fn new(
        ttb0: u64,
        t0sz: u8,
        ips: AddressSize,
        flags: S1Flags,
    ) -> Result<Self, TableConfigError> {
        let ttb0 = S1Table::ttb0(ttb0, t0sz, Granule::Size4K)?;
        Ok(Self::with_tables(ttb0, None, ips, false, flags))
    }

    /// The configuration of `ttb0` (walked unless `flags.epd0`) and `ttb1` (`None`: EPD1),
    /// with output size `ips` (IPS capped by OAS; above 48 bits only for a 64 KiB-granule
    /// table) and `lpa` when SMMU_IDR5.OAS is 52 bits (64 KiB-granule level-1 blocks).
    pub const fn with_tables(
        ttb0: S1Table,
        ttb1: Option<S1Table>,
        ips: AddressSize,
        lpa: bool,
        flags: S1Flags,
    ) -> Self {
        S1Config {
            ttb0,
            ttb1,
            ips,
            lpa,
            flags,
        }
    }

    /// The TTB0 table.
    pub const fn ttb0(&self) -> &S1Table {
        &self.ttb0
    }

    /// The TTB1 table, `None` with EPD1.
    pub const fn ttb1(&self) -> Option<&S1Table> {
        self.ttb1.as_ref()
    }

    /// The start table's address (TTB0).
    pub const fn root(&self) -> u64 {
        self.ttb0.root
    }

    /// T0SZ.
    pub const fn t0sz(&self) -> u8 {
        self.ttb0.tsz
    }

    /// The number of VA bits TTB0 translates.
    pub const fn input_bits(&self) -> u32 {
        self.ttb0.input_bits()
    }

    /// The lookup level of the TTB0 start table: with the 4 KiB granule 0 for T0SZ
    /// 16..=24, 1 for 25..=33, 2 above.
    pub const fn start_level(&self) -> u8 {
        self.ttb0.start
    }

    /// The effective output size of TTB0 walks in bits.
    pub const fn output_bits(&self) -> u32 {
        self.ips.effective_bits(self.ttb0.granule)
    }

    /// How `table`'s descriptors are read under this configuration.
    pub const fn format(&self, table: &S1Table) -> TableFormat {
        TableFormat {
            granule: table.granule,
            output_bits: self.ips.effective_bits(table.granule),
            lpa: self.lpa,
        }
    }

    /// The walk controls.
    pub const fn flags(&self) -> S1Flags {
        self.flags
    }

    /// Whether `va` lies in the TTB0 range: the bits above the input size are zero (only
    /// up to bit 55 with TBI0).
    pub const fn in_range(&self, va: u64) -> bool {
        let top = if self.flags.tbi { 55 } else { 63 };
        va & bits(top, self.ttb0.input_bits()) == 0
    }

    /// The table that translates `va`: TTB1 when bit 55 is set, else TTB0, if its walks
    /// are enabled and the bits above its input size (up to bit 63, or 55 with its TBI) all
    /// equal bit 55. `None` is a level-0 Translation fault.
    pub const fn table_for(&self, va: u64) -> Option<&S1Table> {
        if va & 1 << 55 == 0 {
            if self.flags.epd0 || !self.in_range(va) {
                return None;
            }
            return Some(&self.ttb0);
        }
        let Some(t) = &self.ttb1 else {
            return None;
        };
        let top = if self.flags.tbi1 { 55 } else { 63 };
        let upper = bits(top, t.input_bits());
        if va & upper != upper {
            return None;
        }
        Some(t)
    }
}

/// Turns the addresses a stage-1 walk finds (descriptor addresses and the output address)
/// into physical addresses.
pub trait S1Stage {
    /// The physical address of the stage-1 descriptor at `addr` (in the stage-1 table
    /// address space), for reading it, or with `write` for a hardware update. `input` is the
    /// transaction's VA, for fault records.
    fn descriptor_address<O>(
        &mut self,
        addr: u64,
        write: bool,
        input: u64,
        obs: &mut O,
    ) -> Result<u64, WalkFault>
    where
        O: WalkObserver + ?Sized;

    /// The translation of stage 1's output address `output` for `access`.
    fn output<O>(
        &mut self,
        output: u64,
        access: AccessRequest,
        input: u64,
        obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized;
}

/// Stage 1 alone: table and output addresses are physical.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Direct;

impl S1Stage for Direct {
    #[inline(always)]
    fn descriptor_address<O>(
        &mut self,
        addr: u64,
        _write: bool,
        _input: u64,
        _obs: &mut O,
    ) -> Result<u64, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        Ok(addr)
    }

    #[inline(always)]
    fn output<O>(
        &mut self,
        output: u64,
        _access: AccessRequest,
        _input: u64,
        _obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        Ok(Translation {
            output,
            page_size: PageSize::MAX,
            perms: Permissions::ALL,
            dirty: true,
            global: true,
        })
    }
}

/// Nested translation: every stage-1 descriptor address and the final output address is an
/// IPA translated by stage 2. Stage-2 faults on descriptor accesses have CLASS TT, on the
/// output CLASS IN.
#[derive(Debug)]
pub struct NestedStage<'a, M: ?Sized> {
    /// The memory the stage-2 tables live in.
    pub mem: &'a M,
    /// The stage-2 configuration.
    pub s2: &'a S2Config,
}

impl<M: PhysMem + ?Sized> NestedStage<'_, M> {
    /// The stage-2 walk from `start` of the stage-1 descriptor at IPA `addr`: a read, or
    /// with `write` a hardware update (CLASS TT). [`S1Stage::descriptor_address`] is this
    /// walk from [`S2Start::top`]; a caller with a stage-2 walk cache may start lower.
    pub fn descriptor_from<O>(
        &self,
        start: S2Start,
        addr: u64,
        write: bool,
        input: u64,
        obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        let use_ = S2Use::Table { write };
        stage2::walk(
            self.mem,
            self.s2,
            start,
            addr,
            use_,
            FaultClass::Tt,
            input,
            obs,
        )
    }

    /// The stage-2 walk from `start` of an L1CD or CD fetch at IPA `addr`: a read, CLASS CD
    /// (§3.3.2: CD and L1CD addresses are IPAs when stage 2 translates).
    pub fn cd_fetch_from<O>(
        &self,
        start: S2Start,
        addr: u64,
        input: u64,
        obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        stage2::walk(
            self.mem,
            self.s2,
            start,
            addr,
            S2Use::Input(AccessRequest::READ),
            FaultClass::Cd,
            input,
            obs,
        )
    }

    /// The stage-2 walk from `start` of stage 1's output `output` for `access` (CLASS IN);
    /// [`S1Stage::output`] is this walk from [`S2Start::top`].
    pub fn output_from<O>(
        &self,
        start: S2Start,
        output: u64,
        access: AccessRequest,
        input: u64,
        obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        let use_ = S2Use::Input(access);
        stage2::walk(
            self.mem,
            self.s2,
            start,
            output,
            use_,
            FaultClass::In,
            input,
            obs,
        )
    }
}

impl<M: PhysMem + ?Sized> S1Stage for NestedStage<'_, M> {
    fn descriptor_address<O>(
        &mut self,
        addr: u64,
        write: bool,
        input: u64,
        obs: &mut O,
    ) -> Result<u64, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        let top = S2Start::top(self.s2);
        self.descriptor_from(top, addr, write, input, obs)
            .map(|t| t.output)
    }

    fn output<O>(
        &mut self,
        output: u64,
        access: AccessRequest,
        input: u64,
        obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        self.output_from(S2Start::top(self.s2), output, access, input, obs)
    }
}

/// Translates `va` through the stage-1 table of `cfg` (physical table addresses in `mem`)
/// for `access`, reporting each descriptor read to `obs`.
pub fn walk_stage1<M, O>(
    mem: &M,
    cfg: &S1Config,
    va: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    walk_stage1_via(mem, cfg, &mut Direct, va, access, obs)
}

/// Nested translation of `va`: the stage-1 table of `s1` (IPAs) composed with the stage-2
/// table of `s2`, both in `mem`.
pub fn walk_nested<M, O>(
    mem: &M,
    s1: &S1Config,
    s2: &S2Config,
    va: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    walk_stage1_via(mem, s1, &mut NestedStage { mem, s2 }, va, access, obs)
}

/// The hierarchical controls of the table descriptors walked so far (Arm ARM D8,
/// hierarchical permissions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TableControls {
    /// `APTable[1]` at some level: no writes below.
    pub read_only: bool,
    /// `APTable[0]` at some level: no unprivileged accesses below.
    pub no_unprivileged: bool,
    /// UXNTable at some level.
    pub uxn: bool,
    /// PXNTable at some level.
    pub pxn: bool,
}

impl TableControls {
    /// The controls with those of the table descriptor `d` added.
    pub const fn with(self, d: Descriptor) -> Self {
        TableControls {
            read_only: self.read_only || d.has(Descriptor::AP_TABLE_RO),
            no_unprivileged: self.no_unprivileged || d.has(Descriptor::AP_TABLE_NO_EL0),
            uxn: self.uxn || d.has(Descriptor::UXN_TABLE),
            pxn: self.pxn || d.has(Descriptor::PXN_TABLE),
        }
    }
}

/// The rights of a stage-1 leaf for accesses of `access`'s privilege under the table
/// controls above it; `hd` allows writes to a writable-clean (DBM) leaf.
fn permissions(
    d: Descriptor,
    t: TableControls,
    flags: S1Flags,
    hd: bool,
    access: AccessRequest,
) -> Permissions {
    let unprivileged = d.has(Descriptor::AP_EL0) && !t.no_unprivileged;
    // Writable as the descriptor stands (execute-never rules use this) and once made dirty.
    let writable_now = !d.has(Descriptor::AP_RO) && !t.read_only;
    let writable = (!d.has(Descriptor::AP_RO) || (hd && d.has(Descriptor::DBM))) && !t.read_only;
    let unprivileged_writable_now = unprivileged && writable_now;
    if access.privileged {
        let pan = flags.pan && unprivileged;
        Permissions {
            read: !pan,
            write: writable && !pan,
            execute: !(d.has(Descriptor::PXN)
                || t.pxn
                || unprivileged_writable_now
                || (flags.wxn && writable_now)),
        }
    } else {
        Permissions {
            read: unprivileged,
            write: unprivileged && writable,
            execute: !(d.has(Descriptor::UXN) || t.uxn || (flags.wxn && unprivileged_writable_now)),
        }
    }
}

/// What one descriptor resolved to after any hardware update.
enum Resolved {
    Table(u64),
    Leaf {
        desc: Descriptor,
        base: u64,
        size: PageSize,
    },
}

/// Where a stage-1 walk starts: the TTB0 table ([`S1Start::top`]), or a table further
/// down with the controls of the table descriptors above it, as a stage-1 walk cache entry
/// gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct S1Start {
    /// The lookup level of the table.
    pub level: u8,
    /// The table's address (an IPA in nested translation).
    pub table: u64,
    /// The hierarchical controls of the descriptors above.
    pub controls: TableControls,
}

impl S1Start {
    /// The TTB0 table of `cfg`, with no controls yet.
    pub const fn top(cfg: &S1Config) -> S1Start {
        S1Start::of(&cfg.ttb0)
    }

    /// The start table of `table` (TTB0 or TTB1), with no controls yet.
    pub const fn of(table: &S1Table) -> S1Start {
        S1Start {
            level: table.start,
            table: table.root,
            controls: TableControls {
                read_only: false,
                no_unprivileged: false,
                uxn: false,
                pxn: false,
            },
        }
    }

    /// The start below `desc`, a table descriptor in `fmt` read from this start's table.
    pub const fn below(self, fmt: TableFormat, desc: u64) -> S1Start {
        S1Start {
            level: self.level.saturating_add(1),
            table: Descriptor(desc).address(fmt),
            controls: self.controls.with(Descriptor(desc)),
        }
    }
}

/// The stage-1 walk of `va`, with `stage` resolving descriptor and output addresses. The
/// result combines both: the stage's output address, the smaller page size and the rights
/// both grant.
pub fn walk_stage1_via<M, S, O>(
    mem: &M,
    cfg: &S1Config,
    stage: &mut S,
    va: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    S: S1Stage + ?Sized,
    O: WalkObserver + ?Sized,
{
    let start = cfg.table_for(va).map_or(S1Start::top(cfg), S1Start::of);
    walk_stage1_from(mem, cfg, stage, start, va, access, obs)
}

/// [`walk_stage1_via`] from `start`, a table of the range `va` selects (TTB0 or TTB1):
/// the descriptors above it are neither read nor updated, and their controls are
/// `start.controls`. The range, its EPD and the VA's top bits are checked either way; a
/// start level outside the range's table walks from the top.
pub fn walk_stage1_from<M, S, O>(
    mem: &M,
    cfg: &S1Config,
    stage: &mut S,
    start: S1Start,
    va: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    S: S1Stage + ?Sized,
    O: WalkObserver + ?Sized,
{
    let fault = |kind, level, fetch_address| WalkFault {
        kind,
        stage: FaultStage::Stage1,
        level,
        input: va,
        fetch_address,
    };
    let Some(tbl) = cfg.table_for(va) else {
        return Err(fault(FaultKind::Translation, 0, None));
    };
    let fmt = cfg.format(tbl);
    let top = S1Start::of(tbl);
    let start = if (tbl.start..=3).contains(&start.level) {
        start
    } else {
        top
    };
    // A lower start's table came from a descriptor whose address was checked.
    if start == top && tbl.root >> fmt.output_bits != 0 {
        return Err(fault(FaultKind::AddrSize, 0, None));
    }
    let input_bits = tbl.input_bits();
    let hd = cfg.flags.ha && cfg.flags.hd;
    let mut level = start.level;
    let mut table = start.table;
    let mut controls = start.controls;
    loop {
        // A start table from the caller may be anywhere: past the top of the address space
        // there is nothing to read.
        let offset = table_index(tbl.granule, va, level, tbl.start, input_bits) * 8;
        let Some(desc_addr) = table.checked_add(offset) else {
            return Err(fault(FaultKind::WalkEabt, level, Some(table)));
        };
        let pa = stage.descriptor_address(desc_addr, false, va, obs)?;
        let mut step = WalkStep {
            stage: Stage::Stage1,
            level,
            input: va,
            table,
            entry_address: pa,
            entry: 0,
            set_bits: 0,
            cleared_bits: 0,
            outcome: StepOutcome::Fault(FaultKind::WalkEabt),
        };
        let Ok(mut raw) = mem.read_u64(pa) else {
            obs.step(step);
            return Err(fault(FaultKind::WalkEabt, level, Some(pa)));
        };
        // Evaluated again when a hardware update finds the descriptor changed.
        let resolved = loop {
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
                    break Resolved::Table(next);
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
            if !permissions(desc, controls, cfg.flags, hd, access).allow(access) {
                return stop(step, obs, FaultKind::Permission);
            }
            let set = if !af && cfg.flags.ha {
                Descriptor::AF
            } else {
                0
            };
            // Allowed, so a write to a read-only leaf is a DBM leaf under HD.
            let clear = if access.write && desc.has(Descriptor::AP_RO) {
                Descriptor::AP_RO
            } else {
                0
            };
            if set | clear == 0 {
                break Resolved::Leaf { desc, base, size };
            }
            let pa_w = match stage.descriptor_address(desc_addr, true, va, obs) {
                Ok(pa_w) => pa_w,
                Err(f) => {
                    step.outcome = StepOutcome::Fault(f.kind);
                    obs.step(step);
                    return Err(f);
                }
            };
            step.entry_address = pa_w;
            let new = (raw | set) & !clear;
            match update(mem, pa_w, raw, new) {
                Ok(None) => {
                    step.entry = new;
                    step.set_bits = set;
                    step.cleared_bits = clear;
                    break Resolved::Leaf {
                        desc: Descriptor(new),
                        base,
                        size,
                    };
                }
                Ok(Some(found)) => raw = found,
                Err(_) => {
                    step.outcome = StepOutcome::Fault(FaultKind::WalkEabt);
                    obs.step(step);
                    return Err(fault(FaultKind::WalkEabt, level, Some(pa_w)));
                }
            }
        };
        match resolved {
            Resolved::Table(next) => {
                controls = controls.with(Descriptor(raw));
                step.outcome = StepOutcome::Table(next);
                obs.step(step);
                table = next;
                level += 1;
            }
            Resolved::Leaf { desc, base, size } => {
                step.outcome = StepOutcome::Leaf { base, size };
                obs.step(step);
                let perms = permissions(desc, controls, cfg.flags, hd, access);
                let out = base | (va & (size.bytes() - 1));
                let next = stage.output(out, access, va, obs)?;
                return Ok(Translation {
                    output: next.output,
                    page_size: size.min(next.page_size),
                    perms: perms.intersect(next.perms),
                    dirty: !desc.has(Descriptor::AP_RO) && next.dirty,
                    global: !desc.has(Descriptor::NG),
                });
            }
        }
    }
}
