//! Page request handling (VT-d §7.5, §7.7), as Linux's `prq_event_thread` does it: take
//! each descriptor between PQH and PQT, fault the page into the process that owns the
//! PASID, answer with a page group response when the request ends a group (LPIG) or
//! carries private data, and move PQH to the tail.

use std::sync::atomic::Ordering;
use std::sync::TryLockError;

use vsva_vtd::addr::Gva;
use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd_driver::{group_response, PageRequestRing};

use super::{bump_held, lock, IommuDriver, Regs};
use crate::process::Prot;

impl IommuDriver {
    /// Serves the page requests in the page request queue; returns how many descriptors
    /// were taken. Call it from the page request interrupt or to poll. When another
    /// thread is already serving the queue, that thread takes the new requests too and
    /// this call returns 0 at once.
    pub fn handle_page_requests(&self) -> usize {
        let Some(prq) = &self.prq else {
            return 0;
        };
        let mut handled = 0;
        self.prq_pending.store(true, Ordering::SeqCst);
        loop {
            let guard = match self.prq_lock.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => return handled,
            };
            self.prq_pending.store(false, Ordering::SeqCst);
            handled += self.drain_queue(prq);
            drop(guard);
            if !self.prq_pending.load(Ordering::SeqCst) {
                return handled;
            }
        }
    }

    /// One pass over the queue from PQH to PQT (the shared driver's ring): each request is
    /// served as it is taken, then PQH moves to PQT.
    fn drain_queue(&self, prq: &PageRequestRing) -> usize {
        let mut handled = 0;
        let drained = prq.drain(&Regs(&*self.mmio), &*self.mem, |req| {
            match req {
                Ok(req) => self.serve(&req),
                Err(e) => not_taken(&e),
            }
            bump_held(&self.counters.page_requests, 1);
            handled += 1;
        });
        if let Err(e) = drained {
            queue_failed(&e);
        }
        handled
    }

    /// Resolves one request and answers it when the group ends or private data must go
    /// back (§7.7). Called with `prq_lock` held (its counters are written under it).
    fn serve(&self, req: &PageRequestDesc) {
        let response = self.resolve(req);
        if response == ResponseCode::Success {
            bump_held(&self.counters.page_requests_served, 1);
        }
        let Some(desc) = group_response(req, response) else {
            return;
        };
        bump_held(&self.counters.page_responses, 1);
        if let Err(e) = self.submit(&[desc]) {
            response_failed(&e);
        }
    }

    /// Faults the page in for the process bound to the request's PASID on its device;
    /// Invalid Request for a request without PASID, of an unknown PASID or device, for a
    /// non-canonical address, a privileged request (the entries allow user requests
    /// only), an execute request the area does not allow, or a fault the process cannot
    /// resolve.
    fn resolve(&self, req: &PageRequestDesc) -> ResponseCode {
        let Some(pasid) = req.pasid else {
            return ResponseCode::InvalidRequest;
        };
        let process = {
            let st = lock(&self.state);
            st.svms
                .get(&pasid.raw())
                .filter(|s| s.devices.iter().any(|d| d.sid == req.rid))
                .map(|s| s.process.clone())
        };
        let Some(process) = process else {
            return ResponseCode::InvalidRequest;
        };
        let gva = Gva(req.addr);
        let allowed = process.paging_mode().is_canonical(gva.0)
            && !req.pm
            && (!req.exe
                || process
                    .vma_at(gva)
                    .is_some_and(|v| v.prot.contains(Prot::EXEC)));
        if allowed && process.handle_fault(gva, req.write) {
            ResponseCode::Success
        } else {
            ResponseCode::InvalidRequest
        }
    }
}

// The failures below are rare: logged out of line, so that the code of the page request
// path stays dense in the instruction cache.

#[cold]
#[inline(never)]
fn not_taken(e: &dyn std::fmt::Display) {
    tracing::warn!(%e, "page request descriptor not taken");
}

#[cold]
#[inline(never)]
fn queue_failed(e: &dyn std::fmt::Display) {
    tracing::error!(%e, "page request queue");
}

#[cold]
#[inline(never)]
fn response_failed(e: &dyn std::fmt::Display) {
    tracing::error!(%e, "page group response failed");
}
