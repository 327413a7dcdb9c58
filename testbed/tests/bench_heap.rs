//! The heap cost per PASID and per bound PASID that `vsva bench` reports (from glibc's
//! allocator statistics) against a count of every byte allocated, taken by a counting
//! global allocator. In their own process, one test at a time, so that no other test
//! allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use vsva_testbed::bench::pasid::PasidChurn;
use vsva_testbed::bench::uapi::BoundPasids;
use vsva_testbed::bench::vm::BenchVm;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Held by each test: the counts are of the whole process.
static ALONE: Mutex<()> = Mutex::new(());

fn alone() -> MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn heap_per_pasid_agrees_with_a_count_of_every_allocation() {
    let _alone = alone();
    let before = LIVE.load(Ordering::Relaxed);
    let churn = PasidChurn::new(0.1).unwrap();
    // The count includes the workload's own list of held PASIDs, which the reported
    // figure leaves out.
    let counted = (LIVE.load(Ordering::Relaxed) - before) as f64 / churn.allocated() as f64
        - PasidChurn::LIST_BYTES_PER_PASID as f64;
    let reported = churn.heap_per_pasid().unwrap();
    // glibc adds a chunk header to each allocation, and the set list is a little more.
    assert!(
        reported >= counted * 0.9 && reported <= counted * 1.25 + 2.0,
        "reported {reported:.1} bytes per PASID, counted {counted:.1}"
    );
}

#[test]
fn heap_per_bound_pasid_agrees_with_a_count_of_every_allocation() {
    let _alone = alone();
    let vm = BenchVm::new().unwrap();
    let n = 512;
    let before = LIVE.load(Ordering::Relaxed);
    let bound = BoundPasids::new(&vm, n).unwrap();
    // The count includes the list of PASIDs the workload keeps (4 bytes each), allocated
    // before the reported count starts.
    let counted = (LIVE.load(Ordering::Relaxed) - before) as f64 / f64::from(n) - 4.0;
    let m = bound.memory().unwrap();
    let reported = m.heap as f64 / f64::from(n);
    assert!(
        reported >= counted * 0.9 && reported <= counted * 1.25 + 2.0,
        "reported {reported:.1} heap bytes per bound PASID, counted {counted:.1}"
    );
    assert_eq!(m.per_pasid(), (m.heap + m.tables) as f64 / f64::from(n));
}
