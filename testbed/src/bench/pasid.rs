//! PASID allocator workloads: allocation and free at random positions in the 20-bit space
//! shared by 1,000 VM sets, filled at random positions to a given occupancy, and the heap
//! each allocated PASID costs.

use std::time::{Duration, Instant};

use vsva_host::{error::HostError, pasid::PasidAllocator, pasid::PasidSetId};
use vsva_vtd::addr::Pasid;

use super::{BenchError, Workload};

/// VM sets sharing the space.
pub const VM_SETS: u32 = 1000;
/// PASIDs in the space, PASID 0 (never allocated) included.
pub const PASID_SPACE: u64 = 1 << Pasid::BITS;
/// PASIDs that can be allocated: all but PASID 0.
pub const ALLOCATABLE: u64 = PASID_SPACE - 1;

/// Bytes the process's allocator has handed out and not taken back (glibc's `mallinfo2`:
/// heap chunks in use plus mmapped chunks).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) fn heap_in_use() -> Option<u64> {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    Some((m.uordblks + m.hblkhd) as u64)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) fn heap_in_use() -> Option<u64> {
    None
}

/// Turns of the churn (each held PASID freed and replaced once per turn) that
/// [`PasidChurn::settle`] makes before the churn is timed. Filling the space and churning
/// it do not leave it alike: at 50 % occupancy the allocator's heap grew by 2.9 MB over
/// the first four turns (owner leaves moving between the packed and the direct-mapped
/// classes) and by under 1 % of that after the third, so untimed turns take the
/// allocations and page faults of that growth out of the samples, which a quick run,
/// with a seventh as many samples, counted a seventh as often as a full run.
pub const SETTLE_TURNS: u64 = 4;

/// xorshift64*: the churn's random positions.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// An allocator whose sets hold a given share of the space, at random positions; an
/// operation allocates a PASID at a random position (the first free one at or above a
/// random PASID, as a caller's `min` asks) and frees a PASID allocated at a random
/// position earlier, so the occupancy stays what was asked and every operation meets the
/// bitmap and owner table where that occupancy left them.
pub struct PasidChurn {
    alloc: PasidAllocator,
    sets: Vec<PasidSetId>,
    /// The PASIDs the sets hold, in the (random) order of their positions' drawing; freed
    /// in turn, each replaced by the PASID allocated before it is freed.
    held: Vec<(PasidSetId, Pasid)>,
    next: usize,
    random: u64,
    heap_per_pasid: Option<f64>,
}

impl PasidChurn {
    /// [`VM_SETS`] sets holding `fraction` (0 to 0.999) of the space's allocatable PASIDs
    /// between them, each allocated at a random position; checks that the allocator holds
    /// exactly those. Each set's quota leaves room for one more PASID.
    pub fn new(fraction: f64) -> Result<Self, BenchError> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(BenchError::Check(format!(
                "occupancy {fraction} is outside [0, 1)"
            )));
        }
        let target =
            ((ALLOCATABLE as f64 * fraction).round() as u64).min(ALLOCATABLE - u64::from(VM_SETS));
        let quota = (target.div_ceil(u64::from(VM_SETS)) + 1) as u32;
        // The workload's own lists are allocated before the allocator's bytes are counted.
        let mut held = Vec::with_capacity(target as usize);
        let mut sets = Vec::with_capacity(VM_SETS as usize);
        let before = heap_in_use();
        let mut churn = PasidChurn {
            alloc: PasidAllocator::new(),
            sets: Vec::new(),
            held: Vec::new(),
            next: 0,
            random: 0x2545_f491_4f6c_dd1d,
            heap_per_pasid: None,
        };
        for _ in 0..VM_SETS {
            sets.push(churn.alloc.create_set(quota)?);
        }
        for i in 0..target {
            let set = sets[(i % u64::from(VM_SETS)) as usize];
            let pasid = churn.alloc_at_random(set)?;
            held.push((set, pasid));
        }
        churn.heap_per_pasid = match (before, heap_in_use()) {
            (Some(b), Some(a)) if target > 0 => Some(a.saturating_sub(b) as f64 / target as f64),
            _ => None,
        };
        churn.sets = sets;
        churn.held = held;
        churn.check_occupancy()?;
        Ok(churn)
    }

    /// Allocates to `set` the first free PASID at or above a random one, or the first free
    /// one when none is free above it.
    fn alloc_at_random(&mut self, set: PasidSetId) -> Result<Pasid, BenchError> {
        let min = 1 + (next_random(&mut self.random) % u64::from(Pasid::MAX.raw())) as u32;
        match self.alloc.alloc(set, min, Pasid::MAX.raw()) {
            Err(HostError::NoFreePasid { .. }) => Ok(self.alloc.alloc(set, 1, Pasid::MAX.raw())?),
            r => Ok(r?),
        }
    }

    /// The allocator must hold exactly the PASIDs of the workload's list, each owned by
    /// its set.
    fn check_occupancy(&self) -> Result<(), BenchError> {
        let per_set: u64 = self
            .sets
            .iter()
            .map(|&s| self.alloc.allocated(s).map(u64::from))
            .sum::<Result<_, _>>()?;
        let total = self.held.len() as u64;
        if self.alloc.total_allocated() as u64 != total || per_set != total {
            return Err(BenchError::Check(format!(
                "the allocator holds {} PASIDs ({per_set} in its sets), not the {total} \
                 allocated",
                self.alloc.total_allocated()
            )));
        }
        match self
            .held
            .iter()
            .find(|&&(set, pasid)| self.alloc.owner(pasid) != Some(set))
        {
            Some((set, pasid)) => Err(BenchError::Check(format!(
                "{pasid} allocated to {set} is owned by {:?}",
                self.alloc.owner(*pasid)
            ))),
            None => Ok(()),
        }
    }

    /// Churns, untimed, for [`SETTLE_TURNS`] turns of the held PASIDs, so that the timed
    /// churn meets the space as churning leaves it, not as filling left it; checks the
    /// occupancy after.
    pub fn settle(&mut self) -> Result<(), BenchError> {
        self.run(SETTLE_TURNS * self.allocated())?;
        self.check_occupancy()
    }

    /// PASIDs held by the sets.
    pub fn allocated(&self) -> u64 {
        self.held.len() as u64
    }

    /// The share of the allocatable PASIDs the sets hold.
    pub fn occupancy(&self) -> f64 {
        self.allocated() as f64 / ALLOCATABLE as f64
    }

    /// Heap bytes per allocated PASID: everything the allocator, its sets and their
    /// PASIDs took (fixed tables included, the workload's own lists not), over the PASIDs
    /// allocated; `None` without allocator statistics or with nothing allocated.
    pub fn heap_per_pasid(&self) -> Option<f64> {
        self.heap_per_pasid
    }

    /// Bytes the workload's own list of held PASIDs takes per PASID (counted by a global
    /// allocator, not by [`PasidChurn::heap_per_pasid`]).
    pub const LIST_BYTES_PER_PASID: usize = std::mem::size_of::<(PasidSetId, Pasid)>();
}

impl Workload for PasidChurn {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let start = Instant::now();
        for _ in 0..iters {
            if self.held.is_empty() {
                let set = self.sets[self.next];
                self.next = (self.next + 1) % self.sets.len();
                let pasid = self.alloc_at_random(set)?;
                self.alloc.free(set, pasid)?;
            } else {
                let (set, old) = self.held[self.next];
                let new = self.alloc_at_random(set)?;
                self.alloc.free(set, old)?;
                self.held[self.next].1 = new;
                self.next = (self.next + 1) % self.held.len();
            }
        }
        let t = start.elapsed();
        if self.alloc.total_allocated() != self.held.len() {
            return Err(BenchError::Check(format!(
                "churn left {} PASIDs allocated, not {}",
                self.alloc.total_allocated(),
                self.held.len()
            )));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_is_what_was_asked_and_spread_over_the_space() {
        let c = PasidChurn::new(0.01).unwrap();
        assert_eq!(c.allocated(), (ALLOCATABLE as f64 * 0.01).round() as u64);
        assert!((c.occupancy() - 0.01).abs() < 1e-6);
        assert_eq!(c.alloc.total_allocated() as u64, c.allocated());
        // Random positions: PASIDs in every sixteenth of the space.
        let mut sixteenths = [0u32; 16];
        for (_, p) in &c.held {
            sixteenths[(p.raw() >> 16) as usize] += 1;
        }
        assert!(sixteenths.iter().all(|&n| n > 400), "{sixteenths:?}");
        // The value depends on what other test threads allocate meanwhile: checked in
        // tests/bench_heap.rs, alone in its process.
        assert!(c.heap_per_pasid().is_some());
        assert_eq!(PasidChurn::new(0.0).unwrap().heap_per_pasid(), None);
    }

    #[test]
    fn churn_keeps_the_occupancy_and_moves_the_pasids() {
        let mut c = PasidChurn::new(0.002).unwrap();
        let before: Vec<_> = c.held.clone();
        c.run(2 * c.allocated() + 3).unwrap();
        assert_eq!(c.alloc.total_allocated() as u64, c.allocated());
        c.check_occupancy().unwrap();
        let moved = c.held.iter().zip(&before).filter(|(a, b)| a != b).count();
        assert!(moved as u64 > c.allocated() * 9 / 10, "{moved} moved");
        let mut empty = PasidChurn::new(0.0).unwrap();
        empty.run(5000).unwrap();
        assert_eq!(empty.alloc.total_allocated(), 0);
    }

    #[test]
    fn settling_replaces_every_held_pasid_and_keeps_the_occupancy() {
        let mut c = PasidChurn::new(0.002).unwrap();
        let before: Vec<_> = c.held.clone();
        c.settle().unwrap();
        assert_eq!(c.next, 0, "whole turns");
        assert_eq!(c.alloc.total_allocated() as u64, c.allocated());
        let moved = c.held.iter().zip(&before).filter(|(a, b)| a != b).count();
        assert!(moved as u64 > c.allocated() * 9 / 10, "{moved} moved");
        PasidChurn::new(0.0).unwrap().settle().unwrap();
    }

    #[test]
    fn a_nearly_full_space_still_churns() {
        let mut c = PasidChurn::new(0.99).unwrap();
        assert!(c.occupancy() > 0.989);
        c.run(20_000).unwrap();
        c.check_occupancy().unwrap();
    }

    #[test]
    fn an_allocator_that_lost_a_pasid_fails_the_check() {
        let mut c = PasidChurn::new(0.001).unwrap();
        let (set, pasid) = c.held[7];
        c.alloc.free(set, pasid).unwrap();
        assert!(matches!(c.check_occupancy(), Err(BenchError::Check(_))));
        assert!(c.run(10).is_err());
    }

    #[test]
    fn occupancy_outside_the_space_is_refused() {
        assert!(PasidChurn::new(1.0).is_err());
        assert!(PasidChurn::new(-0.1).is_err());
        assert!(PasidChurn::new(f64::NAN).is_err());
    }
}
