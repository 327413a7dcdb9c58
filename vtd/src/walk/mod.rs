//! Page-table walkers: second level (VT-d §3.7), first level (§3.6) and nested (§3.8).
//!
//! There is one first-level walker. It is generic over the [`FlStage`] that turns the
//! addresses found in first-level entries (table pointers and the final output address) into
//! physical addresses: [`Direct`] for first-level translation, where they already are
//! physical, and [`NestedStage`] for nested translation, where each one is a guest physical
//! address that goes through a second-level walk first.
//!
//! A walk can be watched step by step through a [`WalkObserver`]. The no-op observer `()`
//! compiles to nothing, and no walker allocates.

mod first;
mod second;
#[cfg(test)]
mod tests;

pub use first::{
    walk_first_level, walk_first_level_from, walk_first_level_via, walk_nested, Direct, FlConfig,
    FlRights, FlStage, FlStart, NestedStage,
};
pub use second::{walk_second_level, walk_second_level_from, SlConfig, SlStart};

use crate::fault::FaultReason;
use std::fmt;

/// The size of a page a leaf entry maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, mapped by a level-1 entry.
    Size4K,
    /// 2 MiB, mapped by a level-2 entry with PS set.
    Size2M,
    /// 1 GiB, mapped by a level-3 entry with PS set.
    Size1G,
}

impl PageSize {
    /// All sizes, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// The paging level whose leaf entries map pages of this size (1 for 4 KiB).
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }

    /// The page size a leaf at `level` maps, if a leaf can sit at that level.
    pub const fn from_level(level: u8) -> Option<Self> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

/// The index of the entry for `addr` in a table at `level` (1 = the 4 KiB page table).
pub(crate) const fn table_index(addr: u64, level: u8) -> u64 {
    (addr >> (12 + 9 * (level as u32 - 1))) & 0x1ff
}

/// What a request asks for (VT-d §3.6.2, §3.7.2): the attributes the walker checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AccessRequest {
    /// A write (or the write half of an atomic); otherwise a read.
    pub write: bool,
    /// An execute request (ER=1 in the PASID TLP prefix).
    pub execute: bool,
    /// A request with supervisor privilege (PR=1 in the PASID TLP prefix).
    pub supervisor: bool,
}

impl AccessRequest {
    /// A user-privilege read.
    pub const READ: AccessRequest = AccessRequest {
        write: false,
        execute: false,
        supervisor: false,
    };
    /// A user-privilege write.
    pub const WRITE: AccessRequest = AccessRequest {
        write: true,
        execute: false,
        supervisor: false,
    };
    /// A user-privilege execute (instruction fetch).
    pub const EXECUTE: AccessRequest = AccessRequest {
        write: false,
        execute: true,
        supervisor: false,
    };

    /// The same request with supervisor privilege.
    pub const fn supervisor(self) -> Self {
        AccessRequest {
            supervisor: true,
            ..self
        }
    }
}

/// The rights a translation grants to requests of the privilege of the one that was walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Permissions {
    /// Reads are allowed.
    pub read: bool,
    /// Writes are allowed.
    pub write: bool,
    /// Execute requests are allowed.
    pub execute: bool,
    /// User-privilege requests are allowed (U/S set at every first level; always true for a
    /// second-level-only translation, which has no privilege levels).
    pub user: bool,
}

impl Permissions {
    /// Everything allowed: the neutral element of [`Permissions::intersect`].
    pub const ALL: Permissions = Permissions {
        read: true,
        write: true,
        execute: true,
        user: true,
    };

    /// The rights both `self` and `other` grant.
    pub const fn intersect(self, other: Permissions) -> Permissions {
        Permissions {
            read: self.read && other.read,
            write: self.write && other.write,
            execute: self.execute && other.execute,
            user: self.user && other.user,
        }
    }
}

/// The result of a successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The output address of the input address (page base plus the input's page offset).
    pub output: u64,
    /// The size of the translated page: for nested translation the smaller of the two levels'.
    pub page_size: PageSize,
    /// The rights granted for requests of the walked request's privilege.
    pub perms: Permissions,
    /// Whether the leaf entries that track dirtiness have D set, so that a cached copy of
    /// this translation may serve writes without another walk.
    pub dirty: bool,
}

impl Translation {
    /// The output address of the first byte of the page.
    pub const fn page_base(&self) -> u64 {
        self.output & !(self.page_size.bytes() - 1)
    }
}

/// Which of the two translation levels a step or fault belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// First-level translation (§3.6): IA-32e page tables.
    FirstLevel,
    /// Second-level translation (§3.7).
    SecondLevel,
}

/// A failed walk: the spec's fault reason and where it was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{reason} ({stage:?}, level {level}, input {input:#x})")]
pub struct WalkFault {
    /// The fault condition.
    pub reason: FaultReason,
    /// The translation level that faulted.
    pub stage: Stage,
    /// The paging level of the faulting entry, or 0 when the fault was found before any entry
    /// was read (non-canonical or too wide input, disabled supervisor requests).
    pub level: u8,
    /// The address the faulting stage was translating (a guest physical address when the
    /// second level of a nested walk faults).
    pub input: u64,
}

impl WalkFault {
    /// Whether a page request can resolve the fault: a first-level not-present (SFL.2) or
    /// permission fault (SGN.2, SGN.3, SGN.6, SGN.7), which software fixes by mapping the
    /// page (§7.4). Whether the request may then be sent is up to the context entry (PRE).
    pub const fn page_request_may_resolve(&self) -> bool {
        matches!(self.stage, Stage::FirstLevel)
            && matches!(
                self.reason,
                FaultReason::Sfl2
                    | FaultReason::Sgn2
                    | FaultReason::Sgn3
                    | FaultReason::Sgn6
                    | FaultReason::Sgn7
            )
    }
}

/// What a walker decided about one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepOutcome {
    /// The entry points to the next table, at this address (in the stage's input space of
    /// table addresses: a guest physical address for the first level of a nested walk).
    Table(u64),
    /// The entry maps a page.
    Page {
        /// The page's base address as the entry gives it.
        base: u64,
        /// The page's size.
        size: PageSize,
    },
    /// The walk stops here with this fault.
    Fault(FaultReason),
}

/// One entry read by a walker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalkStep {
    /// The translation level doing the read.
    pub stage: Stage,
    /// The paging level of the table (5 = PML5 … 1 = page table).
    pub level: u8,
    /// The address the stage is translating.
    pub input: u64,
    /// The table's address as the previous level (or the root pointer) gives it.
    pub table: u64,
    /// The physical address the entry was read from.
    pub entry_address: u64,
    /// The entry as read (after any accessed/dirty update of this step; 0 if unreadable).
    pub entry: u64,
    /// The bits this step set atomically in the entry (accessed, dirty, extended-accessed).
    pub set_bits: u64,
    /// What the walker decided.
    pub outcome: StepOutcome,
}

/// Watches a walk step by step. `()` ignores every step at no cost.
pub trait WalkObserver {
    /// Called once for each entry the walker reads, in walk order.
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
                Stage::FirstLevel => "FL",
                Stage::SecondLevel => "SL",
            };
            write!(
                f,
                "{stage} L{} input {:#x}: table {:#x} entry@{:#x} = {:#018x}",
                s.level, s.input, s.table, s.entry_address, s.entry
            )?;
            if s.set_bits != 0 {
                write!(f, " (set {:#x})", s.set_bits)?;
            }
            match s.outcome {
                StepOutcome::Table(next) => writeln!(f, " -> table {next:#x}")?,
                StepOutcome::Page { base, size } => writeln!(f, " -> {size:?} page {base:#x}")?,
                StepOutcome::Fault(reason) => writeln!(f, " -> fault {reason}")?,
            }
        }
        Ok(())
    }
}
