//! Runs of IOTLB hits the IOMMU answered untranslated requests with
//! ([`DmaPort::remap_run`]), kept so that the next request of the same device, PASID and
//! access inside a run is answered without looking each of its pages up again.
//!
//! A kept run is a copy of translations the IOTLB held, so it may be used only while an
//! IOTLB hit on them may (VT-d §6.5: once an invalidation that removed a translation has
//! completed, no request uses it). Runs are kept only for requests with PASID, in
//! scalable mode, outside strict mode (which checks every hit against the tables).
//!
//! # Why a kept run is never used after an invalidation of its pages completed
//!
//! Three facts, each in the code:
//!
//! 1. *Every removal advances the generation, after removing.* Whatever may remove or
//!    change a translation a run holds advances [`RunCache::generation`] (`drop_all`)
//!    after its removal: the IOTLB and PASID-based-IOTLB invalidations (once a batch of
//!    them is carried out, `Iommu::carry_out` in `qi.rs`, before the next descriptor,
//!    hence before any invalidation wait), the context- and PASID-cache invalidations,
//!    and the retag of IOTLB entries to another domain. The root word (table pointer,
//!    translation enable, strict mode) is part of a run's [`RunToken`], so a change of it
//!    needs no advance. Invalidations are carried out by one drainer at a time.
//! 2. *A run is used only under the token it was built under, read before its pages.*
//!    `Iommu::remap_run` reads the root word and the generation first, then looks the run
//!    up (the slot must hold that same token) or builds one from a walk and IOTLB hits,
//!    and keeps what it built under the token read first. A run built across an
//!    advance is therefore kept under the old generation and never matches again; a run
//!    found under generation `g` was built, page by page, from translations the IOTLB held
//!    before the advance past `g`, that is before the removal that preceded it.
//! 3. *Its bytes move under a drain ticket taken before the token.* A device takes a
//!    [`RequestDrain`] ticket before it translates and moves the bytes of what it got in
//!    flight with it (the DMA engine's `Epoch::enter`), and an invalidation
//!    completes through [`RequestDrain::drain`] (the invalidation wait descriptor, or the
//!    return of a register-based invalidation), which the IOMMU starts only after the
//!    removal and the advance of fact 1 (the wait carries out the invalidations queued
//!    before it first).
//!
//! Take an invalidation that removed a page of a kept run `R` (generation `g`) and whose
//! wait completed, and a request that then moves bytes through `R`. Its ticket was taken
//! either after the drain advanced the epoch, or before. After: the ticket's acquire load
//! reads the epoch the drain's release increment wrote, which follows the advance past `g`
//! in the invalidating thread, so the request's generation load (sequenced after its
//! ticket) reads more than `g` and `R` does not match (fact 2). Before: the request
//! enters in flight either before the drain's epoch increment is visible to it, and the
//! drain waits until it leaves, so its bytes moved before the invalidation completed; or
//! after, and entering is refused, its translations dropped and taken again under a new
//! ticket, which is the first case. Either way no byte moves through `R` after the
//! completion. This is the argument of an IOTLB hit (the request drain's module), with
//! the generation in place of the IOTLB's own removal; the loom model below checks it
//! with both threads' steps interleaved every way. Between a removal and its wait a
//! request may still use a run, as it may an IOTLB entry it read just before the removal:
//! the invalidation is not complete yet.
//!
//! Register-based invalidations (`mmio.rs`) are the same: carried out (fact 1), then
//! drained before the register write that asked for them returns (fact 3).
//!
//! [`DmaPort::remap_run`]: crate::dma::port::DmaPort::remap_run
//! [`RequestDrain`]: crate::drain::RequestDrain
//! [`RequestDrain::drain`]: crate::drain::RequestDrain::drain

use std::sync::PoisonError;

use crate::sync::{AtomicU64, Mutex, Ordering};

use crossbeam_utils::CachePadded;
use vsva_vtd::{addr::Pasid, addr::SourceId};

use crate::dma::port::{DmaAccess, DmaRun};

/// Runs kept at once (a power of two): one per (requester, PASID, access) that hashes
/// to its slot.
const SLOTS: usize = 16;

/// Whose run it is: the request's requester id, PASID and access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunKey {
    pub sid: SourceId,
    pub pasid: Pasid,
    pub access: DmaAccess,
}

impl RunKey {
    /// Fibonacci hashing of the key's bits: the top bits of the product pick the slot,
    /// so that keys differing in any field (a device's reads and writes) spread.
    fn slot(&self) -> usize {
        let bits = (u64::from(self.sid.rid()) << 24)
            ^ (u64::from(self.pasid.raw()) << 3)
            ^ (u64::from(self.access.execute) << 2)
            ^ (u64::from(self.access.write) << 1)
            ^ u64::from(self.access.privileged);
        (bits.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())) as usize
    }
}

/// What a run was looked up under, read before its first page: the root word and the
/// cache's generation. A run serves requests that read the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunToken {
    pub root: u64,
    pub generation: u64,
}

#[derive(Clone, Copy, Debug)]
struct Kept {
    key: RunKey,
    token: RunToken,
    run: DmaRun,
}

/// The runs the IOMMU keeps, a slot each, each slot on its own cache line so that devices
/// on different threads do not share one.
#[derive(Debug, Default)]
pub(crate) struct RunCache {
    slots: [CachePadded<Mutex<Option<Kept>>>; SLOTS],
    generation: AtomicU64,
}

impl RunCache {
    /// The cache's generation, for a [`RunToken`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes every run kept, or being looked up, unusable: called after an invalidation
    /// removed what it removes, before it completes.
    pub fn drop_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The run of `key` kept under `token` that holds device address `addr`.
    pub fn lookup(&self, key: RunKey, token: RunToken, addr: u64) -> Option<DmaRun> {
        let slot = self.slots[key.slot()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.filter(|k| k.key == key && k.token == token && k.run.contains(addr))
            .map(|k| k.run)
    }

    /// Keeps `run` of `key`, looked up under `token`, in place of its slot's run.
    pub fn insert(&self, key: RunKey, token: RunToken, run: DmaRun) {
        *self.slots[key.slot()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Kept { key, token, run });
    }
}

/// The kept-run protocol under loom (`RUSTFLAGS="--cfg loom" cargo test -p vsva-hw --lib
/// loom`): a device that looks a run up, or builds and keeps one, and moves bytes through
/// it in flight, while another thread removes the run's translation, advances the
/// generation and drains, never moves through the run once the drain returned. The IOTLB
/// is a flag here: whether it still holds the page's translation.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use crate::dma::port::DmaTranslation;
    use crate::drain::RequestDrain;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use vsva_vtd::addr::Hpa;

    struct Unit {
        drain: RequestDrain,
        runs: RunCache,
        /// The IOTLB holds the translation of the run's pages.
        iotlb_holds: AtomicBool,
        /// The run's frame was given to someone else after the invalidation completed.
        reused: AtomicBool,
    }

    #[test]
    fn no_move_through_a_kept_run_after_its_invalidation_completed() {
        loom::model(|| {
            let unit = Arc::new(Unit {
                drain: RequestDrain::new(),
                runs: RunCache::default(),
                iotlb_holds: AtomicBool::new(true),
                reused: AtomicBool::new(false),
            });
            let key = RunKey {
                sid: SourceId::from_rid(0x10),
                pasid: Pasid::new(1).unwrap(),
                access: DmaAccess::READ,
            };
            let token = |u: &Unit| RunToken {
                root: 0,
                generation: u.runs.generation(),
            };
            let page = |i: u64| DmaTranslation::new(Hpa(0x10_0000 + i * 0x1000), 0x1000).unwrap();
            let mut run = DmaRun::page(page(0), 0x4000);
            assert!(run.extend(page(1)));
            // Kept before the invalidation.
            unit.runs.insert(key, token(&unit), run);
            let device = {
                let u = unit.clone();
                loom::thread::spawn(move || {
                    for _ in 0..2 {
                        let ticket = u.drain.ticket();
                        let t = token(&u);
                        let found = match u.runs.lookup(key, t, 0x5000) {
                            Some(found) => found,
                            None => {
                                // A miss: the run is built again only while the IOTLB
                                // holds its pages, and kept under the token read first.
                                if !u.iotlb_holds.load(Ordering::Acquire) {
                                    return;
                                }
                                u.runs.insert(key, t, run);
                                run
                            }
                        };
                        let Some(guard) = u.drain.enter(ticket) else {
                            continue;
                        };
                        // The move: it must not reach the reused frame.
                        assert_eq!(found.hpa_of(0x5000), Hpa(0x10_1000));
                        assert!(
                            !u.reused.load(Ordering::Relaxed),
                            "moved through a kept run after its invalidation completed"
                        );
                        drop(guard);
                    }
                })
            };
            // The invalidation: removal, generation advance, wait; then the frame is reused.
            unit.iotlb_holds.store(false, Ordering::Release);
            unit.runs.drop_all();
            unit.drain.drain();
            unit.reused.store(true, Ordering::Relaxed);
            device.join().unwrap();
        });
    }
}
