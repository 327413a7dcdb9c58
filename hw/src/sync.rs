//! The atomics and locks of the model's lock-free protocols (the request drain, the IOTLB's
//! seqlocked sets and fill tokens), taken from loom under `cfg(loom)` so that the loom
//! models (`RUSTFLAGS="--cfg loom" cargo test -p vsva-hw --lib loom`) explore every
//! interleaving of them, and from `std` otherwise.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Mutex;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Mutex;

/// Waits a moment for a writer inside a seqlocked set: a spin-loop hint (under loom, a
/// yield, so that the model runs the writer).
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// Waits for a [`WriterLock`]'s holder that did not come back while the waiter spun: it
/// was most likely preempted, so the waiter sleeps rather than yields, and leaves its CPU
/// free for the holder to be moved to (a waiter that only yields keeps its CPU busy, and
/// on a loaded machine the holder may wait for its own CPU for a time slice). Under loom,
/// a yield.
fn park_briefly() {
    #[cfg(not(loom))]
    std::thread::sleep(std::time::Duration::from_micros(20));
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

/// A lock for the writers of a lock-free-read cache (the IOTLB's index, a
/// paging-structure-cache shard): taken by a compare-and-swap, given back by a release
/// store. A `Mutex` gives back by a swap, to learn whether a thread sleeps on it; on a fill
/// that is the second of two locked read-modify-writes, each about as long here as the rest
/// of the fill's writes. Its holders are short (a fill, or an invalidation's visit of what
/// it removes), so a waiter spins, and sleeps a moment if the holder does not come back
/// soon (it may have been preempted). Under loom its atomics are loom's, so the models
/// explore it.
pub(crate) struct WriterLock<T> {
    locked: AtomicU32,
    value: std::cell::UnsafeCell<T>,
}

// SAFETY: the value is reached only through a guard, and one guard exists at a time: the
// compare-and-swap of `locked` from 0 to 1 admits one holder until its release store.
unsafe impl<T: Send> Sync for WriterLock<T> {}

impl<T> WriterLock<T> {
    pub(crate) fn new(value: T) -> Self {
        WriterLock {
            locked: AtomicU32::new(0),
            value: std::cell::UnsafeCell::new(value),
        }
    }

    /// Waits for the lock and takes it.
    #[inline]
    pub(crate) fn lock(&self) -> WriterGuard<'_, T> {
        if self
            .locked
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        WriterGuard { lock: self }
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0u32;
        loop {
            if self.locked.load(Ordering::Relaxed) == 0
                && self
                    .locked
                    .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            if spins < 64 {
                spins += 1;
                spin_loop();
            } else {
                park_briefly();
            }
        }
    }
}

impl<T: Default> Default for WriterLock<T> {
    fn default() -> Self {
        WriterLock::new(T::default())
    }
}

impl<T> std::fmt::Debug for WriterLock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterLock")
            .field("locked", &(self.locked.load(Ordering::Relaxed) != 0))
            .finish_non_exhaustive()
    }
}

/// A held [`WriterLock`]; dropping it gives the lock back (also when unwinding).
pub(crate) struct WriterGuard<'a, T> {
    lock: &'a WriterLock<T>,
}

impl<T> std::ops::Deref for WriterGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: this guard is the lock's only holder (see `WriterLock`'s `Sync`).
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> std::ops::DerefMut for WriterGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard is the lock's only holder, and borrowed mutably.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for WriterGuard<'_, T> {
    /// A release store: the next holder sees every write made under the lock.
    fn drop(&mut self) {
        self.lock.locked.store(0, Ordering::Release);
    }
}

/// [`WriterLock`] under loom (`RUSTFLAGS="--cfg loom" cargo test -p vsva-hw --lib loom`):
/// two holders each add one to a word with a relaxed load and store; both additions
/// survive only if the lock admits one holder at a time and its release store hands the
/// first holder's write to the second.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;

    #[test]
    fn loom_writer_lock_admits_one_holder_and_hands_over_its_writes() {
        loom::model(|| {
            let lock = Arc::new(WriterLock::new(()));
            let word = Arc::new(AtomicU64::new(0));
            let add = |lock: &WriterLock<()>, word: &AtomicU64| {
                let _held = lock.lock();
                let v = word.load(Ordering::Relaxed);
                word.store(v + 1, Ordering::Relaxed);
            };
            let other = {
                let (lock, word) = (lock.clone(), word.clone());
                loom::thread::spawn(move || add(&lock, &word))
            };
            add(&lock, &word);
            other.join().unwrap();
            assert_eq!(word.load(Ordering::Relaxed), 2);
        });
    }
}
