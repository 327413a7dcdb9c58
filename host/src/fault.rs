//! Page requests and unrecoverable faults on their way from a container's devices up to its
//! VMM, and the record of the groups that wait for a page response.
//!
//! This follows the later upstream design of fault reporting to user space: the IOMMU
//! driver reports each page request of a device (`iommu_report_device_fault`) to the handler
//! VFIO registered for the device, which queues an `iommu_fault` record for the VMM (VFIO's
//! DMA fault region) and signals an eventfd; the last request of each group stays pending
//! until the page response for it comes back down (`iommu_page_response`).
//!
//! Unrecoverable faults (`IOMMU_FAULT_DMA_UNRECOV`) take the same way, as the nested-stage
//! series' DMA fault region carries them: the driver reports each fault its fault recording
//! registers hold for a PASID bound to the container, and the VMM reads it as one more
//! record. They have a queue of their own, so a flood of faults cannot crowd out page
//! requests; when it is full, further faults are counted and dropped, as hardware sets
//! FSTS.PFO (VT-d §7.2.1) rather than growing.
//!
//! A container's queue accepts only records from its own devices for PASIDs of its own set
//! (or, while a guest PASID table is attached, any SubstreamID of that table: the PASIDs are
//! the guest's), so one VM never sees another VM's page requests or faults, whatever the
//! driver routes to it.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vsva_vtd::{addr::Pasid, addr::SourceId};

use crate::error::HostError;
use vsva_uapi::request::{
    FaultEvent, PageRequest, PageResponse, QueuedFault, UnrecoverableEvent, UnrecoverableFault,
};

/// Per container, at most this many unread page requests, as many groups waiting for a
/// response (the depth of the fault ring; PCI PRI gives a function 512 group indexes), and
/// as many unread unrecoverable faults.
pub const FAULT_QUEUE_DEPTH: usize = 512;

/// Called once for every record the container accepts, like the eventfd VFIO signals:
/// "there is something to read". It runs on the reporting thread, without the queue's lock
/// but possibly inside a call on the container, so it must not wait for the container.
pub type FaultNotifier = Arc<dyn Fn() + Send + Sync>;

/// What a container's fault queue knows: whom it accepts requests from, and what it holds.
#[derive(Default)]
struct Routes {
    devices: BTreeSet<SourceId>,
    pasids: BTreeSet<Pasid>,
    /// A guest PASID table is attached: every PASID is a SubstreamID of the guest's own
    /// table, confined by the driver to the container's streams.
    guest_table: bool,
    /// Unread page requests, oldest first, each with its record number.
    unread: VecDeque<(u64, FaultEvent)>,
    /// Unread unrecoverable faults, oldest first, each with its record number.
    unrecoverable: VecDeque<(u64, UnrecoverableEvent)>,
    /// Number the next record read from the queue gets: the order `read` keeps.
    next_record: u64,
    /// Unrecoverable faults dropped because their queue was full.
    unrecoverable_lost: u64,
    /// Last requests of their groups, oldest first, each with a sequence number.
    pending: VecDeque<(u64, FaultEvent)>,
    next_seq: u64,
    notifier: Option<FaultNotifier>,
}

type Shared = Arc<Mutex<Routes>>;

/// Locks the routes; no method panics half-way through a change, so a poisoned lock is
/// still consistent.
fn lock(shared: &Shared) -> MutexGuard<'_, Routes> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The handle through which the host IOMMU driver reports page requests to one container.
/// It is cheap to clone and may be used from any thread (e.g. the page request interrupt
/// handler).
#[derive(Clone)]
pub struct FaultSink {
    shared: Shared,
}

impl fmt::Debug for FaultSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = lock(&self.shared);
        f.debug_struct("FaultSink")
            .field("devices", &r.devices)
            .field("unread", &r.unread.len())
            .field("unrecoverable", &r.unrecoverable.len())
            .field("pending", &r.pending.len())
            .finish()
    }
}

impl FaultSink {
    /// Reports a page request the IOMMU received from device `sid`, as
    /// `iommu_report_device_fault` does. The request is queued for the VMM, and when it is
    /// the last of its group, the group waits for a page response.
    ///
    /// Refused, with nothing queued: a device not attached to the container (`-EINVAL`), a
    /// request without a PASID or with a PASID outside the container's set (`-EPERM`), a full
    /// queue (`-ENOSPC`). The driver answers a refused request itself, with
    /// `IOMMU_PAGE_RESP_INVALID` when it is the last of its group, so the device does not
    /// wait for ever.
    pub fn report(&self, sid: SourceId, request: PageRequest) -> Result<(), HostError> {
        let notifier = {
            let mut r = lock(&self.shared);
            if !r.devices.contains(&sid) {
                return Err(HostError::DeviceNotAttached(sid));
            }
            if !request
                .pasid
                .is_some_and(|p| r.guest_table || r.pasids.contains(&p))
            {
                return Err(HostError::UnownedPageRequest {
                    sid,
                    pasid: request.pasid,
                });
            }
            if r.unread.len() >= FAULT_QUEUE_DEPTH
                || (request.last_page && r.pending.len() >= FAULT_QUEUE_DEPTH)
            {
                return Err(HostError::FaultQueueFull(FAULT_QUEUE_DEPTH));
            }
            let event = FaultEvent { sid, request };
            let record = r.next_record;
            r.next_record += 1;
            r.unread.push_back((record, event));
            if request.last_page {
                let seq = r.next_seq;
                r.next_seq += 1;
                r.pending.push_back((seq, event));
            }
            r.notifier.clone()
        };
        if let Some(notify) = notifier {
            notify();
        }
        Ok(())
    }

    /// Reports an unrecoverable fault of device `sid` that the IOMMU recorded, queued for the
    /// VMM as an `IOMMU_FAULT_DMA_UNRECOV` record.
    ///
    /// Refused, with nothing queued: a device not attached to the container (`-EINVAL`), a
    /// fault without a PASID or with a PASID outside the container's set (and no guest PASID
    /// table attached) (`-EPERM`). A full
    /// queue drops the fault, counts it, and says so (`-ENOSPC`).
    pub fn report_unrecoverable(
        &self,
        sid: SourceId,
        fault: UnrecoverableFault,
    ) -> Result<(), HostError> {
        let notifier = {
            let mut r = lock(&self.shared);
            if !r.devices.contains(&sid) {
                return Err(HostError::DeviceNotAttached(sid));
            }
            if !fault
                .pasid
                .is_some_and(|p| r.guest_table || r.pasids.contains(&p))
            {
                return Err(HostError::UnownedFault {
                    sid,
                    pasid: fault.pasid,
                });
            }
            if r.unrecoverable.len() >= FAULT_QUEUE_DEPTH {
                r.unrecoverable_lost += 1;
                return Err(HostError::FaultQueueFull(FAULT_QUEUE_DEPTH));
            }
            let record = r.next_record;
            r.next_record += 1;
            r.unrecoverable
                .push_back((record, UnrecoverableEvent { sid, fault }));
            r.notifier.clone()
        };
        if let Some(notify) = notifier {
            notify();
        }
        Ok(())
    }
}

/// The container's side of its fault queue.
pub(crate) struct FaultQueue {
    shared: Shared,
}

impl fmt::Debug for FaultQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.sink().fmt(f)
    }
}

/// Whether `resp` answers the group whose last request is `e`, as `iommu_page_response`
/// matches: the group index, and the PASID when the request needs it back.
fn answers(e: &FaultEvent, sid: Option<SourceId>, resp: &PageResponse) -> bool {
    sid.is_none_or(|s| s == e.sid)
        && e.request.grpid == resp.grpid
        && (!e.request.needs_pasid || resp.pasid == e.request.pasid)
}

impl FaultQueue {
    pub(crate) fn new() -> Self {
        FaultQueue {
            shared: Arc::default(),
        }
    }

    pub(crate) fn sink(&self) -> FaultSink {
        FaultSink {
            shared: self.shared.clone(),
        }
    }

    pub(crate) fn devices(&self) -> Vec<SourceId> {
        lock(&self.shared).devices.iter().copied().collect()
    }

    pub(crate) fn has_device(&self, sid: SourceId) -> bool {
        lock(&self.shared).devices.contains(&sid)
    }

    pub(crate) fn attach(&self, sid: SourceId) {
        lock(&self.shared).devices.insert(sid);
    }

    /// Stops accepting records from `sid`, drops its unread requests and faults, and returns
    /// its pending groups, which the caller answers.
    pub(crate) fn detach(&self, sid: SourceId) -> Vec<FaultEvent> {
        let mut r = lock(&self.shared);
        r.devices.remove(&sid);
        r.unrecoverable.retain(|(_, e)| e.sid != sid);
        Self::drop_where(&mut r, |e| e.sid == sid)
    }

    pub(crate) fn add_pasid(&self, pasid: Pasid) {
        lock(&self.shared).pasids.insert(pasid);
    }

    /// Stops accepting records for `pasid`, drops its unread requests and faults, and
    /// returns its pending groups, which the caller answers.
    pub(crate) fn remove_pasid(&self, pasid: Pasid) -> Vec<FaultEvent> {
        let mut r = lock(&self.shared);
        r.pasids.remove(&pasid);
        r.unrecoverable
            .retain(|(_, e)| e.fault.pasid != Some(pasid));
        Self::drop_where(&mut r, |e| e.request.pasid == Some(pasid))
    }

    /// Accepts requests for any PASID of the container's devices while `on` (a guest PASID
    /// table is attached). Turned off, drops the unread records for PASIDs outside the
    /// container's set and returns their pending groups, which the caller answers.
    pub(crate) fn set_guest_table(&self, on: bool) -> Vec<FaultEvent> {
        let mut r = lock(&self.shared);
        r.guest_table = on;
        if on {
            return Vec::new();
        }
        let own = r.pasids.clone();
        let ours = |p: Option<Pasid>| p.is_some_and(|p| own.contains(&p));
        r.unrecoverable.retain(|(_, e)| ours(e.fault.pasid));
        Self::drop_where(&mut r, |e| !ours(e.request.pasid))
    }

    /// Drops the unread requests for `pasid` and returns its pending groups, which the
    /// caller answers; requests for it are still accepted (the PASID stays the container's).
    pub(crate) fn drop_pasid_requests(&self, pasid: Pasid) -> Vec<FaultEvent> {
        let mut r = lock(&self.shared);
        Self::drop_where(&mut r, |e| e.request.pasid == Some(pasid))
    }

    fn drop_where(r: &mut Routes, gone: impl Fn(&FaultEvent) -> bool) -> Vec<FaultEvent> {
        r.unread.retain(|(_, e)| !gone(e));
        let (answer, keep) = std::mem::take(&mut r.pending)
            .into_iter()
            .partition(|(_, e)| gone(e));
        r.pending = keep;
        answer.into_iter().map(|(_, e)| e).collect()
    }

    /// Takes every unread page request, oldest first; unrecoverable faults stay.
    pub(crate) fn read(&self) -> Vec<FaultEvent> {
        lock(&self.shared)
            .unread
            .drain(..)
            .map(|(_, e)| e)
            .collect()
    }

    /// Takes every unread unrecoverable fault, oldest first; page requests stay.
    pub(crate) fn read_unrecoverable(&self) -> Vec<UnrecoverableEvent> {
        lock(&self.shared)
            .unrecoverable
            .drain(..)
            .map(|(_, e)| e)
            .collect()
    }

    /// Takes at most `max` unread records of either kind, in the order they were reported,
    /// handing each to `each` (under the queue's lock); returns how many.
    pub(crate) fn take_records(&self, max: usize, mut each: impl FnMut(QueuedFault)) -> usize {
        let mut r = lock(&self.shared);
        let mut taken = 0;
        while taken < max {
            let page = r.unread.front().map(|&(n, _)| n);
            let fault = r.unrecoverable.front().map(|&(n, _)| n);
            let next = match (page, fault) {
                (Some(p), Some(f)) if f < p => r
                    .unrecoverable
                    .pop_front()
                    .map(|(_, e)| QueuedFault::Unrecoverable(e)),
                (Some(_), _) => r
                    .unread
                    .pop_front()
                    .map(|(_, e)| QueuedFault::PageRequest(e)),
                (None, Some(_)) => r
                    .unrecoverable
                    .pop_front()
                    .map(|(_, e)| QueuedFault::Unrecoverable(e)),
                (None, None) => None,
            };
            match next {
                Some(q) => each(q),
                None => break,
            }
            taken += 1;
        }
        taken
    }

    /// Unrecoverable faults dropped because their queue was full, since the queue was made.
    pub(crate) fn unrecoverable_lost(&self) -> u64 {
        lock(&self.shared).unrecoverable_lost
    }

    /// Records (page requests and unrecoverable faults) queued and not read yet.
    pub(crate) fn unread(&self) -> usize {
        let r = lock(&self.shared);
        r.unread.len() + r.unrecoverable.len()
    }

    /// The groups waiting for a response, oldest first.
    pub(crate) fn pending(&self) -> Vec<FaultEvent> {
        lock(&self.shared).pending.iter().map(|&(_, e)| e).collect()
    }

    /// The oldest pending group `resp` answers (from device `sid`, when given), with its
    /// sequence number; `-EINVAL` when there is none.
    pub(crate) fn find_pending(
        &self,
        sid: Option<SourceId>,
        resp: &PageResponse,
    ) -> Result<(u64, FaultEvent), HostError> {
        lock(&self.shared)
            .pending
            .iter()
            .find(|(_, e)| answers(e, sid, resp))
            .copied()
            .ok_or(HostError::NoPendingGroup {
                grpid: resp.grpid,
                pasid: resp.pasid,
            })
    }

    /// Forgets the pending group with sequence number `seq`.
    pub(crate) fn remove_pending(&self, seq: u64) {
        lock(&self.shared).pending.retain(|&(s, _)| s != seq);
    }

    pub(crate) fn set_notifier(&self, notifier: Option<FaultNotifier>) {
        lock(&self.shared).notifier = notifier;
    }

    /// Closes the queue: no device or PASID is accepted any more, unread requests are
    /// dropped, and the pending groups are returned for the caller to answer.
    pub(crate) fn close(&self) -> Vec<FaultEvent> {
        let mut r = lock(&self.shared);
        let pending = std::mem::take(&mut r.pending);
        *r = Routes {
            next_seq: r.next_seq,
            next_record: r.next_record,
            unrecoverable_lost: r.unrecoverable_lost,
            ..Routes::default()
        };
        pending.into_iter().map(|(_, e)| e).collect()
    }
}
