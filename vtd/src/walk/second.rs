//! The second-level walker (VT-d §3.7).
//!
//! Rights are the AND of R, W (and X when SLEE is 1) over every level walked. Write requests
//! need W; read requests, and execute requests, need R; execute requests also need X when
//! SLEE is 1. With SLADE set, A is set in every entry walked and D in the leaf of a write,
//! each by one atomic compare-exchange on the entry as read; the leaf is only updated once
//! the request is known to be allowed.

use super::{
    table_index, AccessRequest, PageSize, Permissions, Stage, StepOutcome, Translation, WalkFault,
    WalkObserver, WalkStep,
};
use crate::fault::FaultReason;
use crate::slpte::{SlFormat, SlLevels, SlPte};
use vsva_mem::PhysMem;

/// What the PASID entry (or the context) says about a second-level table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlConfig {
    /// SLPTPTR: the physical address of the top-level table.
    pub root: u64,
    /// The table depth (from AW).
    pub levels: SlLevels,
    /// SLEE: execute requests are checked against X.
    pub slee: bool,
    /// SLADE: hardware sets accessed and dirty bits.
    pub slade: bool,
    /// The reserved-bit layout of the IOMMU.
    pub format: SlFormat,
}

/// The fault reported for each way a second-level walk can refuse an address. A plain
/// second-level request reports the general (SGN) conditions; the second-level walks done
/// for the first level of a nested walk report first-level (SFL) conditions instead.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlFaults {
    pub beyond_width: FaultReason,
    pub no_read: FaultReason,
    pub no_write: FaultReason,
    pub no_execute: FaultReason,
}

impl SlFaults {
    /// A request translated by the second level itself.
    pub const REQUEST: SlFaults = SlFaults {
        beyond_width: FaultReason::Sgn4,
        no_read: FaultReason::Sgn7,
        no_write: FaultReason::Sgn6,
        no_execute: FaultReason::Sgn3,
    };
}

/// Translates `input` (an IOVA, or a guest physical address) through the second-level table
/// of `cfg`, checking `access`, reporting each entry read to `obs`.
pub fn walk_second_level<M, O>(
    mem: &M,
    cfg: &SlConfig,
    input: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    walk_second_level_from(mem, cfg, SlStart::top(cfg), input, access, obs)
}

/// Translates `input` through the second-level table of `cfg` from `start`, checking
/// `access`, reporting each entry read to `obs`: a walk that a second-level
/// paging-structure cache entry (VT-d §6.2.5) lets begin below the top.
///
/// From [`SlStart::top`] this is [`walk_second_level`]. From a lower start the entries
/// above are neither read nor updated, and their rights are `start.rights`; the input width
/// is checked either way. A start level outside 1 to the table's depth walks from the top.
pub fn walk_second_level_from<M, O>(
    mem: &M,
    cfg: &SlConfig,
    start: SlStart,
    input: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    walk_from(mem, cfg, start, input, access, &SlFaults::REQUEST, obs)
}

/// Where a second-level walk starts: a table and the rights the levels above it grant.
///
/// [`SlStart::top`] is the table SLPTPTR points to; a start further down is what a
/// second-level paging-structure cache entry holds (VT-d §6.2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlStart {
    /// The paging level of the table (5 … 1 = page table).
    pub level: u8,
    /// The table's physical address.
    pub table: u64,
    /// The rights of the entries above the table (`user` is always true).
    pub rights: Permissions,
}

impl SlStart {
    /// The top-level table of `cfg`, with nothing accumulated yet.
    pub const fn top(cfg: &SlConfig) -> SlStart {
        SlStart {
            level: cfg.levels.levels(),
            table: cfg.root,
            rights: Permissions::ALL,
        }
    }

    /// The start below `entry`, a present non-leaf entry read from this start's table: the
    /// table it points to, one level down, with its rights added as `cfg` accumulates them.
    #[inline]
    pub const fn below(self, cfg: &SlConfig, entry: u64) -> SlStart {
        let pte = SlPte(entry);
        SlStart {
            level: self.level.saturating_sub(1),
            table: pte.table_address(),
            rights: accumulate(cfg, self.rights, pte),
        }
    }
}

/// The walk from `start`, reporting refusals with `faults`.
///
/// Each level costs the entry's read and, for the usual entry, one mask test: a present
/// table pointer with nothing reserved and nothing to update, or a 4 KiB leaf that also
/// grants the request. Any other entry (a large page, an accessed or dirty update, a
/// fault) is decided by [`walk_entries`], which checks presence, the reserved bits of the
/// level and PS, and the request's rights against the AND of the levels' R, W and X.
pub(crate) fn walk_from<M, O>(
    mem: &M,
    cfg: &SlConfig,
    start: SlStart,
    input: u64,
    access: AccessRequest,
    faults: &SlFaults,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    let fault = |reason, level| WalkFault {
        reason,
        stage: Stage::SecondLevel,
        level,
        input,
    };
    if input >> cfg.levels.input_width() != 0 {
        return Err(fault(faults.beyond_width, 0));
    }
    let start = if (1..=cfg.levels.levels()).contains(&start.level) {
        start
    } else {
        SlStart::top(cfg)
    };
    if start.table >> cfg.format.address_width() != 0 || start.table & 0xfff != 0 {
        return Err(fault(FaultReason::Ssl4, start.level));
    }
    // The table address as checked: 4 KiB aligned, below 2^52.
    let mut table = start.table & SlPte::ADDR_MASK;
    let mut rights = rights_bits(start.rights);
    let mut level = start.level;
    // The bits that are flipped and then must all be clear, in a table pointer and in a
    // 4 KiB leaf that need nothing of `walk_entries`: the reserved bits (and PS above the
    // leaf), and with SLADE, A (and D in the leaf of a write), which must be set already.
    let accessed = if cfg.slade { SlPte::A } else { 0 };
    let table_check = cfg.format.table_mask() | accessed;
    let leaf_flip = accessed
        | if cfg.slade && access.write {
            SlPte::D
        } else {
            0
        };
    let leaf_check = cfg.format.reserved(1, 0) | leaf_flip;
    // The R, W and X bits the request needs of every level: W to write, R to read; X to
    // execute when SLEE is 1, else R.
    let needed = if access.write { SlPte::W } else { SlPte::R }
        | match (access.execute, cfg.slee) {
            (false, _) => 0,
            (true, true) => SlPte::X,
            (true, false) => SlPte::R,
        };
    loop {
        let entry_address = table + table_index(input, level) * 8;
        let Ok(raw) = mem.read_u64(entry_address) else {
            return Err(unreadable(table, level, entry_address, input, obs));
        };
        if level > 1 && (raw ^ accessed) & table_check == 0 && raw & (SlPte::R | SlPte::W) != 0 {
            rights &= raw;
            let next = SlPte(raw).table_address();
            obs.step(WalkStep {
                stage: Stage::SecondLevel,
                level,
                input,
                table,
                entry_address,
                entry: raw,
                set_bits: 0,
                outcome: StepOutcome::Table(next),
            });
            table = next;
            level -= 1;
            continue;
        }
        // A grant of the request needs its bits in every level; presence follows.
        if level == 1 && (raw ^ leaf_flip) & leaf_check == 0 && rights & raw & needed == needed {
            let size = PageSize::Size4K;
            let pte = SlPte(raw);
            let base = pte.page_address(size);
            obs.step(WalkStep {
                stage: Stage::SecondLevel,
                level,
                input,
                table,
                entry_address,
                entry: raw,
                set_bits: 0,
                outcome: StepOutcome::Page { base, size },
            });
            return Ok(Translation {
                output: base | (input & (size.bytes() - 1)),
                page_size: size,
                perms: permissions(cfg, rights & raw),
                dirty: !cfg.slade || pte.dirty(),
            });
        }
        return walk_entries(
            mem,
            cfg,
            Entry {
                table,
                level,
                address: entry_address,
                raw,
            },
            rights,
            input,
            access,
            faults,
            obs,
        );
    }
}

/// An entry a walk has read: its table, level and address, and its value.
#[derive(Clone, Copy)]
pub(super) struct Entry {
    pub(super) table: u64,
    pub(super) level: u8,
    pub(super) address: u64,
    pub(super) raw: u64,
}

/// A walk's read of the entry at `entry_address` failed: fault SSL.1, reported as a step.
#[cold]
#[inline(never)]
fn unreadable<O: WalkObserver + ?Sized>(
    table: u64,
    level: u8,
    entry_address: u64,
    input: u64,
    obs: &mut O,
) -> WalkFault {
    obs.step(WalkStep {
        stage: Stage::SecondLevel,
        level,
        input,
        table,
        entry_address,
        entry: 0,
        set_bits: 0,
        outcome: StepOutcome::Fault(FaultReason::Ssl1),
    });
    WalkFault {
        reason: FaultReason::Ssl1,
        stage: Stage::SecondLevel,
        level,
        input,
    }
}

/// The walk from `entry`, already read, with `rights` the R, W and X bits of the levels
/// above it: each entry checked by [`decide`], A and D set by one compare-exchange each
/// where SLADE asks for them (the entry evaluated again if it changed meanwhile).
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(super) fn walk_entries<M, O>(
    mem: &M,
    cfg: &SlConfig,
    entry: Entry,
    mut rights: u64,
    input: u64,
    access: AccessRequest,
    faults: &SlFaults,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    let fault = |reason, level| WalkFault {
        reason,
        stage: Stage::SecondLevel,
        level,
        input,
    };
    let Entry {
        mut table,
        mut level,
        address: mut entry_address,
        mut raw,
    } = entry;
    loop {
        let (this_table, this_level) = (table, level);
        let step = move |entry, set_bits, outcome| WalkStep {
            stage: Stage::SecondLevel,
            level: this_level,
            input,
            table: this_table,
            entry_address,
            entry,
            set_bits,
            outcome,
        };
        let mut set_bits = 0;
        // Evaluated again if an accessed/dirty update finds the entry changed.
        let leaf = loop {
            let leaf = match decide(cfg, level, raw, rights, access, faults) {
                Ok(leaf) => leaf,
                Err(reason) => {
                    obs.step(step(raw, 0, StepOutcome::Fault(reason)));
                    return Err(fault(reason, level));
                }
            };
            let mut want = 0;
            if cfg.slade {
                if raw & SlPte::A == 0 {
                    want |= SlPte::A;
                }
                if leaf.is_some() && access.write && raw & SlPte::D == 0 {
                    want |= SlPte::D;
                }
            }
            if want == 0 {
                break leaf;
            }
            match mem.compare_exchange_u64(entry_address, raw, raw | want) {
                Ok(found) if found == raw => {
                    raw |= want;
                    set_bits = want;
                    break leaf;
                }
                Ok(found) => raw = found,
                Err(_) => {
                    obs.step(step(raw, 0, StepOutcome::Fault(FaultReason::Ssl1)));
                    return Err(fault(FaultReason::Ssl1, level));
                }
            }
        };
        rights &= raw;
        let pte = SlPte(raw);
        if let Some(size) = leaf {
            let base = pte.page_address(size);
            obs.step(step(raw, set_bits, StepOutcome::Page { base, size }));
            return Ok(Translation {
                output: base | (input & (size.bytes() - 1)),
                page_size: size,
                perms: permissions(cfg, rights),
                dirty: !cfg.slade || pte.dirty(),
            });
        }
        table = pte.table_address();
        obs.step(step(raw, set_bits, StepOutcome::Table(table)));
        level -= 1;
        entry_address = table + table_index(input, level) * 8;
        raw = match mem.read_u64(entry_address) {
            Ok(raw) => raw,
            Err(_) => return Err(unreadable(table, level, entry_address, input, obs)),
        };
    }
}

/// Checks the entry `raw` at `level`: presence, reserved bits, and at the leaf the
/// request's rights against `rights` (the R, W and X bits of the levels above) and its
/// own. Returns the page size of a leaf, `None` for an entry pointing to a table.
#[inline(always)]
fn decide(
    cfg: &SlConfig,
    level: u8,
    raw: u64,
    rights: u64,
    access: AccessRequest,
    faults: &SlFaults,
) -> Result<Option<PageSize>, FaultReason> {
    if raw & (SlPte::R | SlPte::W) == 0 {
        return Err(FaultReason::Ssl2);
    }
    if raw & cfg.format.reserved(level, raw) != 0 {
        return Err(FaultReason::Ssl3);
    }
    // PS is reserved wherever it cannot map a page, so a PS that passed the check does.
    if level != 1 && raw & SlPte::PS == 0 {
        return Ok(None);
    }
    let leaf = PageSize::from_level(level);
    let rights = permissions(cfg, rights & raw);
    if access.write && !rights.write {
        return Err(faults.no_write);
    }
    if !access.write && !rights.read {
        return Err(faults.no_read);
    }
    if access.execute && !rights.execute {
        return Err(faults.no_execute);
    }
    Ok(leaf)
}

/// The R, W and X bits of second-level entries that `rights` grant: rights accumulate
/// over levels as the AND of these bits.
const fn rights_bits(rights: Permissions) -> u64 {
    (rights.read as u64 * SlPte::R)
        | (rights.write as u64 * SlPte::W)
        | (rights.execute as u64 * SlPte::X)
}

/// The rights of the accumulated R, W and X bits `bits`: X counts when SLEE is 1, else
/// execute follows read.
const fn permissions(cfg: &SlConfig, bits: u64) -> Permissions {
    let read = bits & SlPte::R != 0;
    Permissions {
        read,
        write: bits & SlPte::W != 0,
        execute: if cfg.slee { bits & SlPte::X != 0 } else { read },
        user: true,
    }
}

/// The rights of the levels above together with `pte`'s: R and W, and X when SLEE is 1
/// (else execute follows read).
const fn accumulate(cfg: &SlConfig, rights: Permissions, pte: SlPte) -> Permissions {
    permissions(cfg, rights_bits(rights) & pte.0)
}
