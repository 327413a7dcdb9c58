//! PASID allocator workloads: allocation and free at a given occupancy of the 20-bit space
//! shared by 1,000 VM sets, and the heap each allocated PASID costs.

use std::time::{Duration, Instant};

use vsva_host::{PasidAllocator, PasidSetId};
use vsva_vtd::Pasid;

use super::{BenchError, Workload};

/// VM sets sharing the space.
pub const VM_SETS: u32 = 1000;
/// PASIDs in the space, PASID 0 (never allocated) included.
pub const PASID_SPACE: u64 = 1 << Pasid::BITS;

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

/// An allocator whose sets hold a given share of the space; an operation allocates the
/// lowest free PASID to one set and frees it again, going round the sets.
pub struct PasidChurn {
    alloc: PasidAllocator,
    sets: Vec<PasidSetId>,
    next: usize,
    allocated: u64,
    heap_per_pasid: Option<f64>,
}

impl PasidChurn {
    /// [`VM_SETS`] sets holding `fraction` (0 to 0.999) of the space between them,
    /// allocated in turn (lowest free first, so the low part of the space is full). Each
    /// set's quota leaves room for one more PASID.
    pub fn new(fraction: f64) -> Result<Self, BenchError> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(BenchError::Check(format!(
                "occupancy {fraction} is outside [0, 1)"
            )));
        }
        let target =
            ((PASID_SPACE as f64 * fraction) as u64).min(PASID_SPACE - 1 - u64::from(VM_SETS));
        let quota = (target.div_ceil(u64::from(VM_SETS)) + 1) as u32;
        let before = heap_in_use();
        let mut alloc = PasidAllocator::new();
        let sets: Vec<_> = (0..VM_SETS).map(|_| alloc.create_set(quota)).collect();
        for i in 0..target {
            alloc.alloc(sets[(i % u64::from(VM_SETS)) as usize], 1, Pasid::MAX.raw())?;
        }
        let heap_per_pasid = match (before, heap_in_use()) {
            (Some(b), Some(a)) if target > 0 => Some(a.saturating_sub(b) as f64 / target as f64),
            _ => None,
        };
        Ok(PasidChurn {
            alloc,
            sets,
            next: 0,
            allocated: target,
            heap_per_pasid,
        })
    }

    /// PASIDs held by the sets.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Heap bytes per allocated PASID: everything the allocator, its sets and their
    /// PASIDs took (fixed tables included), over the PASIDs allocated; `None` without
    /// allocator statistics or with nothing allocated.
    pub fn heap_per_pasid(&self) -> Option<f64> {
        self.heap_per_pasid
    }
}

impl Workload for PasidChurn {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let start = Instant::now();
        for _ in 0..iters {
            let set = self.sets[self.next];
            self.next = (self.next + 1) % self.sets.len();
            let pasid = self.alloc.alloc(set, 1, Pasid::MAX.raw())?;
            self.alloc.free(set, pasid)?;
        }
        Ok(start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_is_what_was_asked() {
        let c = PasidChurn::new(0.01).unwrap();
        assert_eq!(c.allocated(), PASID_SPACE / 100);
        assert_eq!(c.alloc.total_allocated() as u64, c.allocated());
        // The value depends on what other test threads allocate meanwhile: checked in
        // tests/bench_heap.rs, alone in its process.
        assert!(c.heap_per_pasid().is_some());
        assert_eq!(PasidChurn::new(0.0).unwrap().heap_per_pasid(), None);
    }

    #[test]
    fn churn_leaves_the_occupancy_unchanged() {
        let mut c = PasidChurn::new(0.001).unwrap();
        let before = c.alloc.total_allocated();
        c.run(2 * u64::from(VM_SETS) + 3).unwrap();
        assert_eq!(c.alloc.total_allocated(), before);
        assert!(c.sets.iter().all(|&s| c.alloc.allocated(s).unwrap() <= 2));
    }

    #[test]
    fn occupancy_outside_the_space_is_refused() {
        assert!(PasidChurn::new(1.0).is_err());
        assert!(PasidChurn::new(-0.1).is_err());
        assert!(PasidChurn::new(f64::NAN).is_err());
    }
}
