//! Page requests on their way from a container's devices up to its VMM, and the record of
//! the groups that wait for a page response.
//!
//! This follows the later upstream design of fault reporting to user space: the IOMMU
//! driver reports each page request of a device (`iommu_report_device_fault`) to the handler
//! VFIO registered for the device, which queues an `iommu_fault` record for the VMM (VFIO's
//! DMA fault region) and signals an eventfd; the last request of each group stays pending
//! until the page response for it comes back down (`iommu_page_response`).
//!
//! A container's queue accepts only requests from its own devices for PASIDs of its own set,
//! so one VM never sees another VM's page requests, whatever the driver routes to it.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vsva_vtd::{Pasid, SourceId};

use crate::error::HostError;
use vsva_uapi::request::{FaultEvent, PageRequest, PageResponse};

/// Per container, at most this many unread page requests, and as many groups waiting for a
/// response (the depth of the fault ring; PCI PRI gives a function 512 group indexes).
pub const FAULT_QUEUE_DEPTH: usize = 512;

/// Called once for every page request the container accepts, like the eventfd VFIO signals:
/// "there is something to read". It runs on the reporting thread, without the queue's lock
/// but possibly inside a call on the container, so it must not wait for the container.
pub type FaultNotifier = Arc<dyn Fn() + Send + Sync>;

/// What a container's fault queue knows: whom it accepts requests from, and what it holds.
#[derive(Default)]
struct Routes {
    devices: BTreeSet<SourceId>,
    pasids: BTreeSet<Pasid>,
    unread: VecDeque<FaultEvent>,
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
            if !request.pasid.is_some_and(|p| r.pasids.contains(&p)) {
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
            r.unread.push_back(event);
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

    /// Stops accepting requests from `sid`, drops its unread requests, and returns its
    /// pending groups, which the caller answers.
    pub(crate) fn detach(&self, sid: SourceId) -> Vec<FaultEvent> {
        let mut r = lock(&self.shared);
        r.devices.remove(&sid);
        Self::drop_where(&mut r, |e| e.sid == sid)
    }

    pub(crate) fn add_pasid(&self, pasid: Pasid) {
        lock(&self.shared).pasids.insert(pasid);
    }

    /// Stops accepting requests for `pasid`, drops its unread requests, and returns its
    /// pending groups, which the caller answers.
    pub(crate) fn remove_pasid(&self, pasid: Pasid) -> Vec<FaultEvent> {
        let mut r = lock(&self.shared);
        r.pasids.remove(&pasid);
        Self::drop_where(&mut r, |e| e.request.pasid == Some(pasid))
    }

    /// Drops the unread requests for `pasid` and returns its pending groups, which the
    /// caller answers; requests for it are still accepted (the PASID stays the container's).
    pub(crate) fn drop_pasid_requests(&self, pasid: Pasid) -> Vec<FaultEvent> {
        let mut r = lock(&self.shared);
        Self::drop_where(&mut r, |e| e.request.pasid == Some(pasid))
    }

    fn drop_where(r: &mut Routes, gone: impl Fn(&FaultEvent) -> bool) -> Vec<FaultEvent> {
        r.unread.retain(|e| !gone(e));
        let (answer, keep) = std::mem::take(&mut r.pending)
            .into_iter()
            .partition(|(_, e)| gone(e));
        r.pending = keep;
        answer.into_iter().map(|(_, e)| e).collect()
    }

    /// Takes every unread request, oldest first.
    pub(crate) fn read(&self) -> Vec<FaultEvent> {
        lock(&self.shared).unread.drain(..).collect()
    }

    /// Takes at most `max` of the unread requests, oldest first.
    pub(crate) fn read_max(&self, max: usize) -> Vec<FaultEvent> {
        let mut r = lock(&self.shared);
        let n = r.unread.len().min(max);
        r.unread.drain(..n).collect()
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
            ..Routes::default()
        };
        pending.into_iter().map(|(_, e)| e).collect()
    }
}
