//! Draining of requests (VT-d §6.5.5, SMMUv3 §3.21 CMD_SYNC, PCIe ATS invalidation
//! completion): an invalidation is complete only when no request that used a translation
//! it removed is still moving bytes.
//!
//! The models translate and move bytes at different times: a DMA engine gathers a run's
//! translations, then copies the run. Without a drain, an invalidation could complete
//! (the host's `UNMAP_DMA` return, the frames freed and given to another VM) while a run
//! gathered before it still writes the old frames. [`RequestDrain`] closes that window with
//! an epoch and two in-flight counters, RCU-like:
//!
//! - a device takes a [`Ticket`] (the epoch) before it translates, and before it moves
//!   bytes with those translations [enters](RequestDrain::enter) with the ticket: entering
//!   counts it in flight and succeeds only if no drain started since the ticket; otherwise
//!   the device drops its translations and translates again (they may predate the
//!   invalidation);
//! - an invalidation's completion ([`RequestDrain::drain`]: the invalidation wait
//!   descriptor, CMD_SYNC, the device-TLB invalidate completion) advances the epoch, which
//!   refuses every older ticket from then on, and waits until the requests that entered
//!   with the old epoch have left.
//!
//! So when `drain` returns, every byte moved with a translation taken before it was moved,
//! and no translation taken before it moves another. A device holds [`InFlight`] only while
//! it moves bytes and never calls back into anything that drains while holding it, so a
//! drain waits at most for one run's copy. Entering costs one atomic increment and one load
//! and a fence on the device's path; draining with nothing in flight, the same.

use crate::sync::{fence, yield_now, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

/// The epoch and in-flight counters of one translation unit (or one device TLB).
#[derive(Debug, Default)]
pub struct RequestDrain {
    /// Drains started so far; its low bit picks the counter requests enter.
    epoch: CachePadded<AtomicU64>,
    /// Requests in flight that entered while the epoch's low bit was 0 and 1.
    in_flight: [CachePadded<AtomicU64>; 2],
}

/// The epoch a device's translations were taken in (see [`RequestDrain::ticket`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket(u64);

/// A request in flight: bytes moved while it is held are waited for by any drain that
/// starts meanwhile.
#[derive(Debug)]
#[must_use = "the request is in flight only while this is held"]
pub struct InFlight<'a> {
    counter: &'a AtomicU64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Release: the bytes moved happen before a drain that sees the counter drop.
        self.counter.fetch_sub(1, Ordering::Release);
    }
}

impl RequestDrain {
    /// A drain with nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current epoch: take it before translating.
    pub fn ticket(&self) -> Ticket {
        // Acquire: the cache removals before the drain that made this epoch are visible to
        // the translations taken under it.
        Ticket(self.epoch.load(Ordering::Acquire))
    }

    /// Puts a request in flight with translations taken under `ticket`; `None` when a drain
    /// started since, so that those translations may be stale: translate again under a new
    /// ticket.
    pub fn enter(&self, ticket: Ticket) -> Option<InFlight<'_>> {
        let counter = &*self.in_flight[(ticket.0 & 1) as usize];
        counter.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight { counter };
        // Store, SeqCst fence, load, here and in `drain`: either the drain's epoch
        // increment is visible to the load below, or this increment is visible to the
        // drain's load of the counter (or both).
        fence(Ordering::SeqCst);
        (self.epoch.load(Ordering::Relaxed) == ticket.0).then_some(guard)
    }

    /// Completes an invalidation: refuses every ticket taken so far and returns when the
    /// requests that entered with them have left. Drains are serialised by the caller (the
    /// invalidation queue, the command queue, the device-TLB's lock); each waits only for
    /// the requests of the epoch it ends.
    pub fn drain(&self) {
        // Release: pairs with the Acquire of `ticket`.
        let old = self.epoch.fetch_add(1, Ordering::AcqRel);
        fence(Ordering::SeqCst);
        let counter = &*self.in_flight[(old & 1) as usize];
        // Acquire: pairs with the Release of a leaving request, whose bytes moved first.
        while counter.load(Ordering::Acquire) != 0 {
            yield_now();
        }
    }

    /// Drains started so far.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_from_before_a_drain_is_refused() {
        let d = RequestDrain::new();
        let t = d.ticket();
        assert!(d.enter(t).is_some());
        d.drain();
        assert!(d.enter(t).is_none(), "translations taken before the drain");
        let t = d.ticket();
        assert!(d.enter(t).is_some());
        // A refused enter leaves nothing counted: the next drain does not wait.
        d.drain();
        d.drain();
        assert_eq!(d.epoch(), 3);
    }

    #[test]
    fn a_drain_waits_for_the_requests_in_flight() {
        use std::sync::atomic::AtomicBool;
        let d = RequestDrain::new();
        let moved = AtomicBool::new(false);
        let entered = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let guard = d.enter(d.ticket()).unwrap();
                entered.store(true, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(50));
                moved.store(true, Ordering::Relaxed);
                drop(guard);
            });
            while !entered.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            d.drain();
            assert!(
                moved.load(Ordering::Relaxed),
                "drain returned before the bytes moved"
            );
        });
    }
}

/// The drain protocol under loom (`RUSTFLAGS="--cfg loom" cargo test -p vsva-hw --lib
/// loom`): a device that translates, enters and moves while another thread
/// invalidates and drains never moves with a translation the completed drain removed.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;

    #[test]
    fn no_move_with_a_removed_translation_after_the_drain() {
        loom::model(|| {
            let drain = Arc::new(RequestDrain::new());
            // The mapping: true while the translation is valid.
            let mapped = Arc::new(AtomicBool::new(true));
            // Set by the invalidating thread once its drain returned (the frame reused).
            let reused = Arc::new(AtomicBool::new(false));
            let device = {
                let (drain, mapped, reused) = (drain.clone(), mapped.clone(), reused.clone());
                loom::thread::spawn(move || {
                    for _ in 0..2 {
                        let ticket = drain.ticket();
                        if !mapped.load(Ordering::SeqCst) {
                            return;
                        }
                        let Some(guard) = drain.enter(ticket) else {
                            continue;
                        };
                        // The move: it must not reach a reused frame.
                        assert!(!reused.load(Ordering::Relaxed), "moved after the drain");
                        drop(guard);
                    }
                })
            };
            mapped.store(false, Ordering::SeqCst);
            drain.drain();
            reused.store(true, Ordering::Relaxed);
            device.join().unwrap();
        });
    }
}
