//! Counters of what the vIOMMU did, for `vsva demo` and tests.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::shadow::SyncPass;

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub descriptors: AtomicU64,
    pub invalidations_forwarded: AtomicU64,
    pub binds: AtomicU64,
    pub unbinds: AtomicU64,
    pub entries_refused: AtomicU64,
    pub page_requests_injected: AtomicU64,
    pub page_requests_dropped: AtomicU64,
    pub page_responses_forwarded: AtomicU64,
    pub walks: AtomicU64,
    pub faults_recorded: AtomicU64,
    pub host_errors: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VIommuStats {
    /// Invalidation descriptors carried out (queued and register-based).
    pub descriptors: u64,
    /// Cache invalidations forwarded to the host and accepted.
    pub invalidations_forwarded: u64,
    /// Guest PASID entries bound on the host.
    pub binds: u64,
    /// Bindings removed on the host.
    pub unbinds: u64,
    /// Valid guest PASID entries not bound because the host entry would not behave as the
    /// guest's (`refusal`); each reconciliation that refuses counts.
    pub entries_refused: u64,
    /// Page requests written into the guest's page request queue.
    pub page_requests_injected: u64,
    /// Page requests not queued: queue full, or page requests not enabled for the device.
    pub page_requests_dropped: u64,
    /// Page group responses passed down to the host (from the guest or generated).
    pub page_responses_forwarded: u64,
    /// Page walks for emulated devices (IOTLB misses), from the top-level table; the
    /// further pages of a vm-memory address space's run are read from the leaf table the
    /// walk ended in and not counted.
    pub walks: u64,
    /// Faults recorded in the fault recording registers.
    pub faults_recorded: u64,
    /// Host calls that failed.
    pub host_errors: u64,
    /// PASIDs the guest holds through the virtual command interface.
    pub pasids: u64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// [`Self::bump`] for a counter written only while the vIOMMU's queue lock is held,
    /// which `_pass` (that lock's data) shows: one writer at a time, so a load and a
    /// store count every event without a locked read-modify-write. Readers
    /// ([`Self::snapshot`]) see the value before or after an increment, as with `bump`.
    pub fn bump_queued(counter: &AtomicU64, _pass: &SyncPass) {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, pasids: u64) -> VIommuStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VIommuStats {
            descriptors: get(&self.descriptors),
            invalidations_forwarded: get(&self.invalidations_forwarded),
            binds: get(&self.binds),
            unbinds: get(&self.unbinds),
            entries_refused: get(&self.entries_refused),
            page_requests_injected: get(&self.page_requests_injected),
            page_requests_dropped: get(&self.page_requests_dropped),
            page_responses_forwarded: get(&self.page_responses_forwarded),
            walks: get(&self.walks),
            faults_recorded: get(&self.faults_recorded),
            host_errors: get(&self.host_errors),
            pasids,
        }
    }
}
