//! The atomics and locks of the model's lock-free protocols (the request drain, the IOTLB's
//! seqlocked sets and fill tokens), taken from loom under `cfg(loom)` so that the loom
//! models (`RUSTFLAGS="--cfg loom" cargo test -p vsva-hw --lib loom`) explore every
//! interleaving of them, and from `std` otherwise.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// Waits a moment for a writer inside a seqlocked set: a spin-loop hint (under loom, a
/// yield, so that the model runs the writer).
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// Waits for other threads to make progress (requests in flight that a drain waits for).
pub(crate) fn yield_now() {
    #[cfg(not(loom))]
    std::thread::yield_now();
    #[cfg(loom)]
    loom::thread::yield_now();
}
