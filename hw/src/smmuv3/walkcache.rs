//! The table-walk caches (IHI 0070 §16.2, "walk caches"): the table descriptors a walk
//! read, so a later walk of a nearby address starts at the deepest table it knows instead
//! of the stage's start table.
//!
//! The stage-1 cache is tagged by VMID and ASID (table descriptors have no nG) and by the
//! table it hangs from (the range's TTB and granule), so a CD pointing to other tables
//! (after CMD_CFGI_CD) never reuses it. Its entries hold the next table's address as the
//! descriptor gave it: an IPA in nested translation. The CMD_TLBI_* scopes (§4.4):
//!
//! - NH_VA without the Leaf hint: entries of the VMID and ASID whose VA span overlaps the
//!   address (or range); with Leaf = 1 the walk caches may be kept, and are;
//! - NH_VAA without Leaf: the same for every ASID of the VMID;
//! - NH_ASID: every entry of the VMID and ASID; NH_ALL and S12_VMALL: every entry of the
//!   VMID; NSNH_ALL: every entry.
//!
//! The stage-2 cache is tagged by VMID and by S2TTB, granule and start level; it serves
//! every stage-2 walk of a transaction (the IPA of a stage-2-only stream, each stage-1
//! table address and the final IPA of a nested one). Only stage-2 commands remove its
//! entries: S2_IPA without Leaf those of the VMID whose IPA span overlaps the address (or
//! range), S12_VMALL those of the VMID, NSNH_ALL all; the NH_* commands, which name
//! stage-1 entries, leave it.

use std::collections::HashMap;

use vsva_smmuv3::{
    cmd::Cmd, cmd::TlbiAddr, ste::Granule, walk::S1Config, walk::S1Start, walk::S2Config,
    walk::S2Start, walk::Stage, walk::StepOutcome, walk::WalkObserver, walk::WalkStep,
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

/// The table descriptors of one walk of `stage`, by level: at most one a level.
#[derive(Debug)]
pub(super) struct TableSteps {
    stage: Stage,
    steps: [Option<(u8, u64)>; 4],
}

impl TableSteps {
    /// An empty record of the table descriptors `stage` reads.
    pub(super) const fn new(stage: Stage) -> Self {
        TableSteps {
            stage,
            steps: [None; 4],
        }
    }
}

impl WalkObserver for TableSteps {
    fn step(&mut self, step: WalkStep) {
        if let StepOutcome::Table(_) = step.outcome {
            if step.stage != self.stage {
                return;
            }
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
            Cmd::TlbiNhVa { vmid, asid, addr } if !addr.leaf => self.entries.retain(|k, _| {
                !(k.vmid == vmid && k.asid == asid && overlaps(k.granule, k.level, k.prefix, &addr))
            }),
            Cmd::TlbiNhVaa { vmid, addr } if !addr.leaf => self
                .entries
                .retain(|k, _| !(k.vmid == vmid && overlaps(k.granule, k.level, k.prefix, &addr))),
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

/// A stage-2 walk-cache key: the VMID, the table walked from, and the IPA bits the tables
/// above `level` resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct S2Key {
    vmid: u16,
    root: u64,
    granule: Granule,
    start: u8,
    /// The level of the table the entry gives.
    level: u8,
    /// The IPA shifted down by the lowest bit the level above resolves.
    prefix: u64,
}

/// The stage-2 walk cache.
#[derive(Debug, Default)]
pub struct S2WalkCache {
    entries: HashMap<S2Key, S2Start>,
}

impl S2WalkCache {
    fn key(vmid: u16, cfg: &S2Config, ipa: u64, level: u8) -> Option<S2Key> {
        if level <= cfg.start_level() || level > 3 {
            return None;
        }
        let granule = cfg.granule();
        Some(S2Key {
            vmid,
            root: cfg.root(),
            granule,
            start: cfg.start_level(),
            level,
            prefix: ipa >> granule.level_shift(level - 1),
        })
    }

    /// The deepest cached start for `ipa`, if any.
    pub fn lookup(&self, vmid: u16, cfg: &S2Config, ipa: u64) -> Option<S2Start> {
        (1..=3).rev().find_map(|level| {
            let key = Self::key(vmid, cfg, ipa, level)?;
            self.entries.get(&key).copied()
        })
    }

    /// Caches the tables below `start` that a walk of `ipa` read (`steps`, a record of
    /// [`Stage::Stage2`]).
    pub(super) fn fill(
        &mut self,
        vmid: u16,
        cfg: &S2Config,
        ipa: u64,
        start: S2Start,
        steps: &TableSteps,
    ) {
        let mut at = start;
        for &(level, entry) in steps.steps.iter().flatten() {
            if level != at.level {
                return;
            }
            at = at.below(cfg.format(), entry);
            if let Some(key) = Self::key(vmid, cfg, ipa, at.level) {
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
            Cmd::TlbiS2Ipa { vmid, addr } if !addr.leaf => self
                .entries
                .retain(|k, _| !(k.vmid == vmid && overlaps(k.granule, k.level, k.prefix, &addr))),
            Cmd::TlbiS12Vmall { vmid } => self.entries.retain(|k, _| k.vmid != vmid),
            Cmd::TlbiNsnhAll => self.entries.clear(),
            _ => {}
        }
        before - self.entries.len()
    }
}

/// Whether the input span of an entry (the level-`level` table reached through the
/// descriptors above, `prefix` being the input bits they resolved) overlaps the address
/// operand: the address itself (TG 0), or its range (IDR3.RIL; see [`operand_end`]). TTL
/// does not limit walk-cache entries.
fn overlaps(granule: Granule, level: u8, prefix: u64, a: &TlbiAddr) -> bool {
    let shift = granule.level_shift(level - 1);
    let span_start = prefix << shift;
    let span_end = span_start.saturating_add(1 << shift);
    match operand_end(a) {
        None => a.addr >> shift == prefix,
        Some(end) => span_start < end && a.addr < span_end,
    }
}

/// The end of a range operand: (NUM + 1) * 2^SCALE granules of TG from the address
/// (§4.4.1, "range-based invalidation"; Linux's arm-smmu-v3 encodes a range of pages the
/// same way). `None` when TG is 0 (the operand names one address). SCALE is five bits, so
/// a range may pass the top of the address space; it stops there.
pub(super) fn operand_end(a: &TlbiAddr) -> Option<u64> {
    let granule_shift = match a.tg {
        0 => return None,
        1 => 12,
        2 => 14,
        _ => 16,
    };
    let pages = (a.num as u64 + 1) << a.scale.min(31);
    Some(
        a.addr
            .saturating_add(pages.saturating_mul(1 << granule_shift)),
    )
}
