//! The heap cost per PASID that `vsva bench` reports (from glibc's allocator statistics)
//! against a count of every byte allocated, taken by a counting global allocator. Alone in
//! its process, so that no other test allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use vsva::bench::pasid::PasidChurn;

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

#[test]
fn heap_per_pasid_agrees_with_a_count_of_every_allocation() {
    let before = LIVE.load(Ordering::Relaxed);
    let churn = PasidChurn::new(0.1).unwrap();
    let counted = (LIVE.load(Ordering::Relaxed) - before) as f64 / churn.allocated() as f64;
    let reported = churn.heap_per_pasid().unwrap();
    // glibc adds a chunk header to each allocation, and the set list is a little more.
    assert!(
        reported >= counted * 0.9 && reported <= counted * 1.25 + 2.0,
        "reported {reported:.1} bytes per PASID, counted {counted:.1}"
    );
}
