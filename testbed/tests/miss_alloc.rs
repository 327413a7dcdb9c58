//! A cold IOTLB miss allocates nothing: after a global invalidation (of every IOMMU cache,
//! or of the IOTLB and paging-structure caches only) the miss path reads the tables, walks
//! them and fills the context, PASID, IOTLB and paging-structure caches without one heap
//! allocation, once the caches have been filled before.
//!
//! Counted by a global allocator that counts the calls of the thread making them (a
//! thread-local counter), in a test binary of its own: nothing another thread does is
//! counted, and no allocator statistics are read.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use vsva_hw::iommu::Source;
use vsva_testbed::bench::platform::{Platform, PlatformConfig};
use vsva_vtd::inv_desc::InvDesc;
use vsva_vtd::walk::AccessRequest;

struct Counting;

thread_local! {
    /// Allocations (and reallocations) made by this thread.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: the slot is gone while the thread's locals are destroyed.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: forwards every call unchanged to the system allocator and only counts calls in
// a thread-local cell that needs no allocation of its own.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Which caches a flush empties.
#[derive(Clone, Copy, Debug)]
enum Flush {
    /// Context, PASID and IOTLB (with the paging-structure caches).
    All,
    /// The IOTLB and the paging-structure caches.
    Translations,
}

fn flush(p: &Platform, how: Flush) {
    match how {
        Flush::All => p.invalidate_all().unwrap(),
        Flush::Translations => p.invalidate(&[InvDesc::global_iotlb(true, true)]).unwrap(),
    }
}

/// The counter sees this thread's allocations: a control, so that a count of zero below
/// means something.
#[test]
fn the_counter_counts_this_threads_allocations() {
    let before = allocations();
    let v = std::hint::black_box(vec![1u8; 64]);
    assert!(allocations() > before);
    drop(v);
}

#[test]
fn a_cold_miss_after_a_global_invalidation_allocates_nothing() {
    let p = Platform::new(PlatformConfig {
        devices: 1,
        buffer: 16 * 4096,
    })
    .unwrap();
    let iommu = p.iommu();
    let requests = [
        (None, p.gpa(0x1234), p.hpa(0x1234)),
        (Some(p.nested_pasid()), p.gva(0x2345), p.hpa(0x2345)),
    ];
    for how in [Flush::All, Flush::Translations] {
        for (pasid, addr, hpa) in requests {
            // The first fills may size the caches' tables; later ones reuse them.
            flush(&p, how);
            let first = iommu.translate(p.device(0), pasid, addr, AccessRequest::READ);
            assert_eq!(first.map(|m| m.hpa), Ok(hpa));
            for round in 0..4 {
                flush(&p, how);
                let before = allocations();
                let m = iommu
                    .translate(p.device(0), pasid, addr, AccessRequest::READ)
                    .unwrap();
                let made = allocations() - before;
                assert_eq!(
                    (m.hpa, m.source),
                    (hpa, Source::Walk),
                    "{how:?}, {pasid:?}, round {round}"
                );
                assert_eq!(
                    made, 0,
                    "{how:?} flush, {pasid:?}, round {round}: the miss allocated {made} times"
                );
            }
        }
    }
}
