//! The first-level walker (VT-d §3.6) and its use for nested translation (§3.8).
//!
//! First-level rights follow IA-32e paging with these VT-d specifics:
//! - Privilege comes from the request (PR in the PASID prefix), not from a CPL; supervisor
//!   requests are refused with SPT.6 unless the PASID entry's SRE is 1.
//! - Reads need only present entries; user requests need U/S at every level (else SGN.2).
//! - Writes need R/W at every level; supervisor writes ignore R/W when WPE is 0, the
//!   equivalent of CR0.WP = 0 (else SGN.6).
//! - XD is always honoured (there is no EFER.NXE to turn it off): an execute request to a
//!   page with XD at any level is SGN.3. Supervisor execute requests to user pages are
//!   refused as well, as with CR4.SMEP = 1. Supervisor data accesses to user pages are
//!   allowed: there is no SMAP, and no protection keys.
//! - A is set in each entry walked, D in the leaf of a write, and with EAFE the
//!   extended-accessed bit EA next to every A, each by one atomic compare-exchange on the
//!   entry as read; the leaf is only updated once the request is known to be allowed.
//!   In nested translation these updates are writes through the second level, which must
//!   allow them (else SFL.8).

use super::second::{self, SlConfig, SlFaults, SlStart};
use super::{
    table_index, AccessRequest, PageSize, Permissions, Stage, StepOutcome, Translation, WalkFault,
    WalkObserver, WalkStep,
};
use crate::fault::FaultReason;
use crate::flpte::{FlFormat, FlPagingMode, FlPte};
use vsva_mem::PhysMem;

/// What the PASID entry says about a first-level table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlConfig {
    /// FLPTPTR: the address of the top-level table (a guest physical address in nested
    /// translation).
    pub root: u64,
    /// FLPM: 4- or 5-level paging.
    pub mode: FlPagingMode,
    /// SRE: supervisor requests are allowed.
    pub sre: bool,
    /// WPE: supervisor writes honour R/W.
    pub wpe: bool,
    /// EAFE: hardware sets the extended-accessed bit with the accessed bit.
    pub eafe: bool,
    /// The reserved-bit layout of the IOMMU.
    pub format: FlFormat,
}

/// Turns the addresses a first-level walk finds (table pointers and its output address)
/// into physical addresses.
pub trait FlStage {
    /// The physical address of the first-level table at `table`, as FLPTPTR (`root`) or a
    /// table entry gives it, for reading its entries, or with `write` for an accessed/dirty
    /// update of one of them.
    fn table_address<O>(
        &mut self,
        table: u64,
        root: bool,
        write: bool,
        obs: &mut O,
    ) -> Result<u64, WalkFault>
    where
        O: WalkObserver + ?Sized;

    /// The translation of the first level's output address `output` for `access`: the
    /// output, page size and rights this stage adds.
    fn output<O>(
        &mut self,
        output: u64,
        access: AccessRequest,
        obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized;
}

/// First-level translation: table pointers and output addresses are already physical.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Direct;

impl FlStage for Direct {
    #[inline(always)]
    fn table_address<O>(
        &mut self,
        table: u64,
        _root: bool,
        _write: bool,
        _obs: &mut O,
    ) -> Result<u64, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        Ok(table)
    }

    #[inline(always)]
    fn output<O>(
        &mut self,
        output: u64,
        _access: AccessRequest,
        _obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        Ok(Translation {
            output,
            page_size: PageSize::Size1G,
            perms: Permissions::ALL,
            dirty: true,
        })
    }
}

/// Nested translation: every first-level table pointer and the final output address is a
/// guest physical address translated by a second-level walk.
///
/// Reading a first-level table is a read through the second level (refused: SFL.6 for the
/// root table, SFL.7 below it); an accessed/dirty update is a write (refused: SFL.8); an
/// address beyond the second level's input width is SFL.5. The final address is checked
/// with the request's own access (SGN.6, SGN.7, SGN.3).
#[derive(Debug)]
pub struct NestedStage<'a, M: ?Sized> {
    /// The memory the second-level tables live in.
    pub mem: &'a M,
    /// The second-level table.
    pub sl: &'a SlConfig,
}

impl<M: PhysMem + ?Sized> NestedStage<'_, M> {
    /// The second-level walk from `start` that resolves the first-level table at `table`
    /// (FLPTPTR when `root`): a read, or with `write` an accessed/dirty update.
    ///
    /// [`FlStage::table_address`] is this walk from [`SlStart::top`]; a caller that caches
    /// second-level paging-structure entries may start it lower.
    pub fn walk_table_from<O>(
        &self,
        start: SlStart,
        table: u64,
        root: bool,
        write: bool,
        obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        let no_read = if root {
            FaultReason::Sfl6
        } else {
            FaultReason::Sfl7
        };
        let faults = SlFaults {
            beyond_width: FaultReason::Sfl5,
            no_read,
            no_write: FaultReason::Sfl8,
            no_execute: no_read,
        };
        let access = AccessRequest {
            write,
            execute: false,
            supervisor: false,
        };
        second::walk_from(self.mem, self.sl, start, table, access, &faults, obs)
    }

    /// The second-level walk from `start` of the first level's output address `output`,
    /// checked with the request's `access`.
    ///
    /// [`FlStage::output`] is this walk from [`SlStart::top`].
    pub fn walk_output_from<O>(
        &self,
        start: SlStart,
        output: u64,
        access: AccessRequest,
        obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        let faults = SlFaults {
            beyond_width: FaultReason::Sfl5,
            ..SlFaults::REQUEST
        };
        second::walk_from(self.mem, self.sl, start, output, access, &faults, obs)
    }
}

impl<M: PhysMem + ?Sized> FlStage for NestedStage<'_, M> {
    fn table_address<O>(
        &mut self,
        table: u64,
        root: bool,
        write: bool,
        obs: &mut O,
    ) -> Result<u64, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        self.walk_table_from(SlStart::top(self.sl), table, root, write, obs)
            .map(|t| t.output)
    }

    fn output<O>(
        &mut self,
        output: u64,
        access: AccessRequest,
        obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        self.walk_output_from(SlStart::top(self.sl), output, access, obs)
    }
}

/// Translates `input` through the first-level table of `cfg` (table pointers are physical
/// addresses in `mem`), checking `access`, reporting each entry read to `obs`.
pub fn walk_first_level<M, O>(
    mem: &M,
    cfg: &FlConfig,
    input: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    walk_first_level_via(mem, cfg, &mut Direct, input, access, obs)
}

/// Nested translation of `input`: the first-level table of `fl` (guest physical addresses)
/// composed with the second-level table of `sl`, both in `mem`.
pub fn walk_nested<M, O>(
    mem: &M,
    fl: &FlConfig,
    sl: &SlConfig,
    input: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    walk_first_level_via(mem, fl, &mut NestedStage { mem, sl }, input, access, obs)
}

/// The first-level walk, with `stage` resolving table pointers and the output address.
///
/// The result combines both: the stage's output address, the smaller page size, and the
/// rights both grant.
pub fn walk_first_level_via<M, S, O>(
    mem: &M,
    cfg: &FlConfig,
    stage: &mut S,
    input: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    S: FlStage + ?Sized,
    O: WalkObserver + ?Sized,
{
    walk_first_level_from(mem, cfg, stage, FlStart::top(cfg), input, access, obs)
}

/// Where a first-level walk starts: a table and the rights the levels above it grant.
///
/// [`FlStart::top`] is the table FLPTPTR points to. A start further down is what a
/// first-level paging-structure cache entry holds (VT-d §6.2.5): for a PDE-cache entry,
/// the page table the PDE points to and the rights of the PML4E, PDPE and PDE together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlStart {
    /// The paging level of the table (5 = PML5 … 1 = page table).
    pub level: u8,
    /// The table's address as FLPTPTR or the entry above gives it (a guest physical
    /// address in nested translation).
    pub table: u64,
    /// The rights of the entries above the table.
    pub rights: FlRights,
}

impl FlStart {
    /// The top-level table of `cfg`, with nothing accumulated yet.
    pub const fn top(cfg: &FlConfig) -> FlStart {
        FlStart {
            level: cfg.mode.levels(),
            table: cfg.root,
            rights: FlRights::ALL,
        }
    }

    /// The start below `entry`, a present non-leaf entry read from this start's table: the
    /// table it points to, one level down, with its rights added.
    #[inline]
    pub const fn below(self, entry: u64) -> FlStart {
        let pte = FlPte(entry);
        FlStart {
            level: self.level.saturating_sub(1),
            table: pte.table_address(),
            rights: self.rights.with(pte),
        }
    }
}

/// The first-level walk from `start`, with `stage` resolving table pointers and the output
/// address: a walk that a paging-structure cache entry lets begin below the top.
///
/// From [`FlStart::top`] this is [`walk_first_level_via`]. From a lower start the entries
/// above are neither read nor updated, and their rights are `start.rights`; the request
/// checks done before any entry is read (SRE, canonical input) are made either way. A start
/// level outside 1 to the paging mode's depth walks from the top.
pub fn walk_first_level_from<M, S, O>(
    mem: &M,
    cfg: &FlConfig,
    stage: &mut S,
    start: FlStart,
    input: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    S: FlStage + ?Sized,
    O: WalkObserver + ?Sized,
{
    let fault = |reason, level| WalkFault {
        reason,
        stage: Stage::FirstLevel,
        level,
        input,
    };
    if access.supervisor && !cfg.sre {
        return Err(fault(FaultReason::Spt6, 0));
    }
    if !cfg.mode.is_canonical(input) {
        return Err(fault(FaultReason::Sgn1, 0));
    }
    let top = cfg.mode.levels();
    let start = if (1..=top).contains(&start.level) {
        start
    } else {
        FlStart::top(cfg)
    };
    let mut level = start.level;
    let mut table = start.table;
    let mut rights = start.rights.bits();
    loop {
        let root = level == top;
        let offset = table_index(input, level) * 8;
        let table_pa = stage.table_address(table, root, false, obs)?;
        let read_fault = if root {
            FaultReason::Sfl4
        } else {
            FaultReason::Sfl1
        };
        // A root pointer at the very top of the address space has no entries to read.
        let entry_address = table_pa.checked_add(offset);
        let mut step = WalkStep {
            stage: Stage::FirstLevel,
            level,
            input,
            table,
            entry_address: entry_address.unwrap_or(table_pa),
            entry: 0,
            set_bits: 0,
            outcome: StepOutcome::Fault(read_fault),
        };
        let Some(Ok(mut raw)) = entry_address.map(|a| mem.read_u64(a)) else {
            obs.step(step);
            return Err(fault(read_fault, level));
        };
        // Evaluated again if an accessed/dirty update finds the entry changed.
        let (pte, leaf) = loop {
            let pte = FlPte(raw);
            step.entry = raw;
            let leaf = match decide(cfg, level, raw, rights, access) {
                Ok(v) => v,
                Err(reason) => {
                    step.outcome = StepOutcome::Fault(reason);
                    obs.step(step);
                    return Err(fault(reason, level));
                }
            };
            let mut want = 0;
            if !pte.accessed() {
                want |= FlPte::A;
            }
            if cfg.eafe && raw & FlPte::EA == 0 {
                want |= FlPte::EA;
            }
            if leaf.is_some() && access.write && !pte.dirty() {
                want |= FlPte::D;
            }
            if want == 0 {
                break (pte, leaf);
            }
            match stage.table_address(table, root, true, obs) {
                // The same table as just read: the sum did not overflow then either.
                Ok(pa) => step.entry_address = pa.wrapping_add(offset),
                Err(f) => {
                    step.outcome = StepOutcome::Fault(f.reason);
                    obs.step(step);
                    return Err(f);
                }
            }
            match mem.compare_exchange_u64(step.entry_address, raw, raw | want) {
                Ok(found) if found == raw => {
                    raw |= want;
                    step.entry = raw;
                    step.set_bits = want;
                    break (FlPte(raw), leaf);
                }
                Ok(found) => raw = found,
                Err(_) => {
                    step.outcome = StepOutcome::Fault(FaultReason::Sfl10);
                    obs.step(step);
                    return Err(fault(FaultReason::Sfl10, level));
                }
            }
        };
        rights &= raw ^ FlPte::XD;
        if let Some(size) = leaf {
            let base = pte.page_address(size);
            step.outcome = StepOutcome::Page { base, size };
            obs.step(step);
            let next = stage.output(base | (input & (size.bytes() - 1)), access, obs)?;
            return Ok(Translation {
                output: next.output,
                page_size: size.min(next.page_size),
                perms: FlRights::from_bits(rights)
                    .effective(cfg, access)
                    .intersect(next.perms),
                dirty: pte.dirty() && next.dirty,
            });
        }
        table = pte.table_address();
        step.outcome = StepOutcome::Table(table);
        obs.step(step);
        level -= 1;
    }
}

/// The first-level rights accumulated over the levels walked so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlRights {
    /// U/S set at every level.
    pub user: bool,
    /// R/W set at every level.
    pub writable: bool,
    /// XD set at some level.
    pub execute_disable: bool,
}

impl FlRights {
    /// Nothing walked yet: the neutral element of accumulation.
    pub const ALL: FlRights = FlRights {
        user: true,
        writable: true,
        execute_disable: false,
    };

    /// The rights as entry bits, accumulated over levels by one AND per entry of the
    /// entry with XD inverted: U/S and R/W where every level has them, XD where no level
    /// has it.
    const fn bits(self) -> u64 {
        (self.user as u64 * FlPte::US)
            | (self.writable as u64 * FlPte::RW)
            | (!self.execute_disable as u64 * FlPte::XD)
    }

    /// The rights of accumulated entry bits (`FlRights::bits`).
    const fn from_bits(bits: u64) -> FlRights {
        FlRights {
            user: bits & FlPte::US != 0,
            writable: bits & FlPte::RW != 0,
            execute_disable: bits & FlPte::XD == 0,
        }
    }

    const fn with(self, pte: FlPte) -> FlRights {
        FlRights::from_bits(self.bits() & (pte.0 ^ FlPte::XD))
    }

    fn can_write(self, cfg: &FlConfig, access: AccessRequest) -> bool {
        self.writable || (access.supervisor && !cfg.wpe)
    }

    fn can_execute(self, access: AccessRequest) -> bool {
        !(self.execute_disable || (access.supervisor && self.user))
    }

    /// The rights of the page for requests of `access`'s privilege.
    fn effective(self, cfg: &FlConfig, access: AccessRequest) -> Permissions {
        Permissions {
            read: true,
            write: self.can_write(cfg, access),
            execute: self.can_execute(access),
            user: self.user,
        }
    }
}

/// Checks the entry `raw` at `level`: presence, reserved bits (one mask compare), and at
/// the leaf the request's rights against `rights` (the levels above, as
/// `FlRights::bits`) and its own. Returns the page size of a leaf, `None` for an entry
/// pointing to a table.
#[inline(always)]
fn decide(
    cfg: &FlConfig,
    level: u8,
    raw: u64,
    rights: u64,
    access: AccessRequest,
) -> Result<Option<PageSize>, FaultReason> {
    if raw & FlPte::P == 0 {
        return Err(FaultReason::Sfl2);
    }
    if raw & cfg.format.reserved(level, raw) != 0 {
        return Err(FaultReason::Sfl3);
    }
    // PS is reserved wherever it cannot map a page, so a PS that passed the check does
    // (in a PTE, bit 7 is PAT: every PTE maps a page).
    if level != 1 && raw & FlPte::PS == 0 {
        return Ok(None);
    }
    let rights = FlRights::from_bits(rights & (raw ^ FlPte::XD));
    if !access.supervisor && !rights.user {
        return Err(FaultReason::Sgn2);
    }
    if access.write && !rights.can_write(cfg, access) {
        return Err(FaultReason::Sgn6);
    }
    if access.execute && !rights.can_execute(access) {
        return Err(FaultReason::Sgn3);
    }
    Ok(PageSize::from_level(level))
}
