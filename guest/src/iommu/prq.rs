//! Page request handling (VT-d §7.5, §7.7), as Linux's `prq_event_thread` does it: take
//! each descriptor between PQH and PQT, fault the page into the process that owns the
//! PASID, answer with a page group response when the request ends a group (LPIG) or
//! carries private data, and move PQH to the tail.

use std::sync::atomic::Ordering;
use std::sync::TryLockError;

use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::regs::layout::{offset, pq};
use vsva_vtd::{Gva, InvDesc, Pasid, PhysMem};

use super::{lock, IommuDriver};
use crate::process::Prot;

impl IommuDriver {
    /// Serves the page requests in the page request queue; returns how many descriptors
    /// were taken. Call it from the page request interrupt or to poll. When another
    /// thread is already serving the queue, that thread takes the new requests too and
    /// this call returns 0 at once.
    pub fn handle_page_requests(&self) -> usize {
        let Some((base, entries)) = self.prq else {
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
            handled += self.drain_queue(base.0, entries);
            drop(guard);
            if !self.prq_pending.load(Ordering::SeqCst) {
                return handled;
            }
        }
    }

    /// One pass over the queue from PQH to PQT.
    fn drain_queue(&self, base: u64, entries: u64) -> usize {
        // Clear PPR before reading the pointers, so that a request queued from now on
        // raises a new interrupt.
        self.mmio.write(offset::PRS, 4, u64::from(pq::PPR));
        let size = entries * pq::DESC_SIZE;
        let tail = self.mmio.read(offset::PQT, 8) & pq::OFFSET;
        let mut head = self.mmio.read(offset::PQH, 8) & pq::OFFSET;
        if tail >= size || head >= size {
            tracing::error!(head, tail, "page request queue pointers beyond the queue");
            return 0;
        }
        let mut handled = 0;
        while head != tail {
            let mut raw = [0u64; 4];
            let read = raw.iter_mut().enumerate().try_for_each(|(i, q)| {
                self.mem
                    .read_u64(base + head + 8 * i as u64)
                    .map(|v| *q = v)
            });
            match read.map(|()| PageRequestDesc::decode(raw)) {
                Ok(Ok(req)) => self.serve(&req),
                Ok(Err(e)) => tracing::warn!(%e, "malformed page request descriptor"),
                Err(e) => tracing::warn!(%e, "page request descriptor unreadable"),
            }
            self.counters.page_requests.fetch_add(1, Ordering::Relaxed);
            handled += 1;
            head = (head + pq::DESC_SIZE) % size;
        }
        self.mmio.write(offset::PQH, 8, tail);
        // An overflow is cleared once the queue is empty again.
        if self.mmio.read(offset::PRS, 4) as u32 & pq::PRO != 0 {
            let head = self.mmio.read(offset::PQH, 8) & pq::OFFSET;
            let tail = self.mmio.read(offset::PQT, 8) & pq::OFFSET;
            if head == tail {
                self.mmio.write(offset::PRS, 4, u64::from(pq::PRO));
            }
        }
        handled
    }

    /// Resolves one request and answers it when the group ends or private data must go
    /// back (§7.7).
    fn serve(&self, req: &PageRequestDesc) {
        let response = self.resolve(req);
        if response == ResponseCode::Success {
            self.counters
                .page_requests_served
                .fetch_add(1, Ordering::Relaxed);
        }
        if !req.lpig && req.private_data.is_none() {
            return;
        }
        let desc = InvDesc::PageGroupResponse {
            rid: req.rid,
            pasid_present: req.pasid.is_some(),
            pasid: req.pasid.unwrap_or(Pasid::RID_PASID),
            private_data_present: req.private_data.is_some(),
            response,
            last_page_in_group: req.lpig,
            prg_index: req.prg_index,
            private_data: req.private_data.unwrap_or_default(),
        };
        self.counters.page_responses.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.submit(&[desc]) {
            tracing::error!(%e, "page group response failed");
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
