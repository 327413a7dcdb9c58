//! The stage-1 table-walk cache (IHI 0070 §16.2, "walk caches"): the table descriptors a
//! stage-1 walk read, so a later walk of a nearby VA starts at the deepest table it knows
//! instead of TTB0/TTB1. An entry is tagged by VMID and ASID (table descriptors have no nG)
//! and by the table it hangs from (the range's TTB and granule), so a CD pointing to other
//! tables (after CMD_CFGI_CD) never reuses it. The CMD_TLBI_* scopes (§4.4):
//!
//! - NH_VA without the Leaf hint: entries of the VMID and ASID whose VA span overlaps the
//!   address (or range); with Leaf = 1 the walk caches may be kept, and are;
//! - NH_VAA without Leaf: the same for every ASID of the VMID;
//! - NH_ASID: every entry of the VMID and ASID; NH_ALL and S12_VMALL: every entry of the
//!   VMID; NSNH_ALL: every entry.
//!
//! Entries hold the next table's address as the descriptor gave it: an IPA in nested
//! translation, whose stage-2 walk is not cached here.

use std::collections::HashMap;

use vsva_smmuv3::{
    Cmd, Granule, S1Config, S1Start, Stage, StepOutcome, TlbiAddr, WalkObserver, WalkStep,
};

/// A walk-cache key: the tags, the table walked from, and the VA bits the tables above
/// `level` resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    vmid: u16,
    asid: u16,
    root: u64,
    granule: Granule,
    /// The level of the table the entry gives.
    level: u8,
    /// The VA shifted down by the lowest bit the level above resolves.
    prefix: u64,
}

/// The stage-1 walk cache.
#[derive(Debug, Default)]
pub struct S1WalkCache {
    entries: HashMap<Key, S1Start>,
}

/// The stage-1 table descriptors of one walk, in order: at most one a level.
#[derive(Debug, Default)]
pub(super) struct TableSteps {
    steps: [Option<(u8, u64)>; 4],
}

impl WalkObserver for TableSteps {
    fn step(&mut self, step: WalkStep) {
        if let (Stage::Stage1, StepOutcome::Table(_)) = (step.stage, step.outcome) {
            if let Some(slot) = self.steps.get_mut(step.level as usize) {
                *slot = Some((step.level, step.entry));
            }
        }
    }
}

impl S1WalkCache {
    fn key(vmid: u16, asid: u16, cfg: &S1Config, va: u64, level: u8) -> Option<Key> {
        let table = cfg.table_for(va)?;
        let granule = table.granule();
        if level <= table.start_level() || level > 3 {
            return None;
        }
        Some(Key {
            vmid,
            asid,
            root: table.root(),
            granule,
            level,
            prefix: va >> granule.level_shift(level - 1),
        })
    }

    /// The deepest cached start for `va`, if any.
    pub fn lookup(&self, vmid: u16, asid: u16, cfg: &S1Config, va: u64) -> Option<S1Start> {
        (1..=3).rev().find_map(|level| {
            let key = Self::key(vmid, asid, cfg, va, level)?;
            self.entries.get(&key).copied()
        })
    }

    /// Caches the tables below `start` that a walk of `va` read (`steps`).
    pub(super) fn fill(
        &mut self,
        vmid: u16,
        asid: u16,
        cfg: &S1Config,
        va: u64,
        start: S1Start,
        steps: &TableSteps,
    ) {
        let Some(table) = cfg.table_for(va) else {
            return;
        };
        let fmt = cfg.format(table);
        let mut at = start;
        for &(level, entry) in steps.steps.iter().flatten() {
            if level != at.level {
                return;
            }
            at = at.below(fmt, entry);
            if let Some(key) = Self::key(vmid, asid, cfg, va, at.level) {
                self.entries.insert(key, at);
            }
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies a CMD_TLBI_* command; other commands change nothing. Returns how many
    /// entries it removed.
    pub fn invalidate(&mut self, cmd: &Cmd) -> usize {
        let before = self.entries.len();
        match *cmd {
            Cmd::TlbiNhVa { vmid, asid, addr } if !addr.leaf => self
                .entries
                .retain(|k, _| !(k.vmid == vmid && k.asid == asid && overlaps(k, &addr))),
            Cmd::TlbiNhVaa { vmid, addr } if !addr.leaf => self
                .entries
                .retain(|k, _| !(k.vmid == vmid && overlaps(k, &addr))),
            Cmd::TlbiNhAsid { vmid, asid } => self
                .entries
                .retain(|k, _| !(k.vmid == vmid && k.asid == asid)),
            Cmd::TlbiNhAll { vmid } | Cmd::TlbiS12Vmall { vmid } => {
                self.entries.retain(|k, _| k.vmid != vmid)
            }
            Cmd::TlbiNsnhAll => self.entries.clear(),
            _ => {}
        }
        before - self.entries.len()
    }
}

/// Whether the VA span of the entry `k` overlaps the address operand: the address itself
/// (TG 0), or (NUM + 1) * 2^(5 * SCALE + 1) granules from it (IDR3.RIL). TTL does not limit
/// walk-cache entries.
fn overlaps(k: &Key, a: &TlbiAddr) -> bool {
    let shift = k.granule.level_shift(k.level - 1);
    let span_start = k.prefix << shift;
    let span_end = span_start.saturating_add(1 << shift);
    let granule_shift = match a.tg {
        0 => return a.addr >> shift == k.prefix,
        1 => 12,
        2 => 14,
        _ => 16,
    };
    let pages = 1u64
        .checked_shl(5 * a.scale as u32 + 1)
        .map_or(u64::MAX, |p| p.saturating_mul(a.num as u64 + 1));
    let end = a
        .addr
        .saturating_add(pages.saturating_mul(1 << granule_shift));
    span_start < end && a.addr < span_end
}
