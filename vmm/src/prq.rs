//! Page requests (VT-d §7.5): requests the host reports for the VM's PASIDs are written
//! into the guest's page request queue, and the guest's page group responses (§6.5.2.9)
//! go back down to the host, which delivers them to the device.
//!
//! Where the spec has the remapping hardware answer a request itself, the vIOMMU sends the
//! same answer down: "Invalid Request" when page requests are not enabled for the device
//! (context entry PRE clear, §7.4), "Success" when the queue is full (§7.5.1: PRS.PRO is
//! set and the device retries). An answer is only due for the last request of a group or
//! one with private data.

use vsva_mem::PhysMem;
use vsva_uapi::{request::PageRequest, request::PageResponse, request::PageResponseCode};
use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::{addr::Pasid, addr::SourceId};

use crate::error::{HostCall, VIommuError};
use crate::stats::Counters;
use crate::viommu::VIommu;

/// The largest page request group index (9 bits, PCIe PRG Index).
const PRG_INDEX_MAX: u16 = 0x1ff;

/// What became of an injected page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRequestOutcome {
    /// Written into the guest's page request queue; the guest answers it.
    Queued,
    /// The device's context entry does not enable page requests (or cannot be read): the
    /// request was answered "Invalid Request" if an answer was due.
    NotEnabled,
    /// The queue was full: PRS.PRO set, the request answered "Success" if an answer was due.
    QueueFull,
    /// The queue slot is not in guest RAM: the request was answered "Response Failure" if
    /// an answer was due.
    QueueUnwritable,
}

impl VIommu {
    /// Writes a page request of the device with guest requester id `req.rid` into the
    /// guest's page request queue: advances PQT, sets PRS.PPR and raises a page request
    /// event (unless one is pending).
    pub fn inject_page_request(&self, req: &PageRequestDesc) -> PageRequestOutcome {
        let answer = |code| {
            if req.lpig || req.private_data.is_some() {
                self.forward_page_response(req.rid, req.pasid, req.prg_index, code);
            }
        };
        // The remapping hardware checks PRE in the context entry it caches (§6.2.1), as a
        // translation of the device's reads it.
        let enabled = self
            .scalable_root()
            .is_some_and(|rta| self.context_entry(rta, req.rid).is_ok_and(|c| c.pre));
        if !enabled {
            Counters::bump(&self.counters.page_requests_dropped);
            answer(ResponseCode::InvalidRequest);
            return PageRequestOutcome::NotEnabled;
        }
        let mut regs = self.regs.lock();
        let Some(slot) = regs.pq_tail_slot() else {
            let irq = regs.pq_overflow();
            drop(regs);
            Counters::bump(&self.counters.page_requests_dropped);
            self.deliver(irq);
            answer(ResponseCode::Success);
            return PageRequestOutcome::QueueFull;
        };
        let written = req
            .encode()
            .iter()
            .enumerate()
            .try_for_each(|(i, q)| self.mem.write_u64(slot + 8 * i as u64, *q));
        if written.is_err() {
            drop(regs);
            Counters::bump(&self.counters.page_requests_dropped);
            answer(ResponseCode::ResponseFailure);
            return PageRequestOutcome::QueueUnwritable;
        }
        let irq = regs
            .pq_advance_tail()
            .expect("the slot was free a moment ago, under the same lock");
        drop(regs);
        Counters::bump(&self.counters.page_requests_injected);
        self.deliver(irq);
        PageRequestOutcome::Queued
    }

    /// A page request the host reported for the passthrough device `host_sid` (a fault
    /// event of the VM's container): injected with the device's guest requester id; the
    /// PASID is the same in guest and host.
    pub fn inject_host_page_request(
        &self,
        host_sid: SourceId,
        req: &PageRequest,
    ) -> Result<PageRequestOutcome, VIommuError> {
        let rid = self
            .guest_sid_of(host_sid)
            .ok_or(VIommuError::NotAttached(host_sid))?;
        let prg_index = u16::try_from(req.grpid)
            .ok()
            .filter(|&g| g <= PRG_INDEX_MAX)
            .ok_or(VIommuError::PageRequestGroup(req.grpid))?;
        Ok(self.inject_page_request(&PageRequestDesc {
            rid,
            pasid: req.pasid,
            exe: req.exec,
            pm: req.privileged,
            read: req.read,
            write: req.write,
            lpig: req.last_page,
            prg_index,
            addr: req.addr & !0xfff,
            private_data: req.private_data,
        }))
    }

    /// Sends a page group response for the device with guest requester id `rid` down to
    /// the host. Responses for devices that are not passthrough devices have no receiver.
    pub(crate) fn forward_page_response(
        &self,
        rid: SourceId,
        pasid: Option<Pasid>,
        prg_index: u16,
        response: ResponseCode,
    ) {
        let Some((host_sid, host)) = self.passthrough(rid) else {
            return;
        };
        let resp = PageResponse {
            pasid,
            grpid: prg_index.into(),
            code: match response {
                ResponseCode::Success => PageResponseCode::Success,
                ResponseCode::InvalidRequest => PageResponseCode::Invalid,
                ResponseCode::ResponseFailure => PageResponseCode::Failure,
            },
        };
        let r = host.page_response(host_sid, &resp);
        if self
            .host_result(r, || HostCall::PageResponse(host_sid, resp))
            .is_some()
        {
            Counters::bump(&self.counters.page_responses_forwarded);
        }
    }
}
