//! Page requests (VT-d §7.5): the routing of each request the unit queued to the
//! container whose domain bound its PASID, and page group responses (§6.5.2.9, §7.7). The
//! ring itself (PQH/PQT, PPR, PRO) is `vsva_vtd_driver`'s [`PageRequestRing`].
//!
//! A request on a PASID a domain bound for a guest (`SVM_FLAG_GUEST_MODE`) is reported to
//! that domain's container (`iommu_report_device_fault`), which keeps the group pending
//! until the VMM answers; any other request that needs a response (the last of its group,
//! or one with private data), and one the container refuses, is answered at once with
//! Invalid Request.

use foldhash::HashMap;
use smallvec::SmallVec;
use std::sync::{Mutex, PoisonError, RwLock};

use vsva_hw::iommu::Iommu;
use vsva_hw::memory::FrameAllocator;
use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::{addr::DomainId, addr::Hpa, addr::Pasid, addr::SourceId, inv_desc::InvDesc};
use vsva_vtd_driver::{PageRequestRing, PRQ_BYTES};

use super::error::DriverError;
use super::regs::Mmio;
use crate::fault::FaultSink;
use vsva_uapi::request::{PageRequest, PageResponse, PageResponseCode};

/// Page request state of one unit.
#[derive(Debug, Default)]
pub(crate) struct PageRequests {
    ring: Mutex<Option<PageRequestRing>>,
    /// The domain that bound each (requester id, PASID).
    routes: RwLock<HashMap<(u16, u32), DomainId>>,
    /// Each domain's container fault queue.
    sinks: RwLock<HashMap<DomainId, FaultSink>>,
}

/// What to do with one request taken from the queue.
#[derive(Debug)]
pub(crate) enum Dispatch {
    /// Report it to the owner's fault queue; if refused, answer with the descriptor given
    /// (when a response is due).
    Report(FaultSink, SourceId, PageRequest, Option<InvDesc>),
    /// Answer it now with Invalid Request.
    Refuse(InvDesc),
    /// Nothing: no owner and no response due.
    Drop,
}

/// The Invalid Request response to `desc` when hardware waits for one (§7.5.1: LPIG or
/// PDP set), returning its PASID, group index, LPIG and private data (§6.5.2.9).
pub(crate) fn refusal(desc: &PageRequestDesc) -> Option<InvDesc> {
    vsva_vtd_driver::group_response(desc, ResponseCode::InvalidRequest)
}

/// The page group response for the group `request` of device `sid` ends
/// (`intel_svm_page_response`): LPIG as the request was reported (set for a request with
/// private data too, as Linux reports it), the PASID when the response carries it, the
/// group index, the response code, and the request's private data with PDP set when it
/// had any (§6.5.2.9). EINVAL for a group index beyond 9 bits.
pub(crate) fn group_response(
    sid: SourceId,
    request: &PageRequest,
    resp: &PageResponse,
) -> Result<InvDesc, DriverError> {
    let prg_index = u16::try_from(resp.grpid)
        .ok()
        .filter(|g| *g < 0x200)
        .ok_or_else(|| {
            DriverError::invalid("page response", format!("group index {}", resp.grpid))
        })?;
    Ok(InvDesc::PageGroupResponse {
        rid: sid,
        pasid_present: resp.pasid.is_some(),
        pasid: resp.pasid.unwrap_or(Pasid::RID_PASID),
        private_data_present: request.private_data.is_some(),
        response: match resp.code {
            PageResponseCode::Success => ResponseCode::Success,
            PageResponseCode::Invalid => ResponseCode::InvalidRequest,
            PageResponseCode::Failure => ResponseCode::ResponseFailure,
        },
        last_page_in_group: request.last_page,
        prg_index,
        private_data: request.private_data.unwrap_or_default(),
    })
}

impl PageRequests {
    /// Allocates the queue and points the unit at it (PQH = PQT = 0, PQA_REG).
    pub fn init(&self, hw: &Iommu, frames: &FrameAllocator) -> Result<(), DriverError> {
        let base = frames
            .alloc_range(PRQ_BYTES, PRQ_BYTES)
            .map_err(|_| DriverError::OutOfMemory)?;
        let ring = PageRequestRing::new(base.0);
        if let Err(e) = ring.enable(&Mmio(hw)) {
            if let Err(f) = frames.free(base) {
                tracing::error!("vt-d: freeing the page request queue: {f}");
            }
            return Err(e.into());
        }
        *self.ring.lock().unwrap_or_else(PoisonError::into_inner) = Some(ring);
        Ok(())
    }

    /// Frees the queue memory; the queue must no longer be in use.
    pub fn release(&self, frames: &FrameAllocator) {
        if let Some(ring) = self
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            if let Err(e) = frames.free(Hpa(ring.base())) {
                tracing::error!("vt-d: freeing the page request queue: {e}");
            }
        }
    }

    /// Takes every descriptor the unit queued (`prq_event_thread`); a descriptor that
    /// does not decode is logged and dropped. A few descriptors are taken without
    /// allocating.
    pub fn drain(&self, hw: &Iommu) -> Result<SmallVec<[PageRequestDesc; 4]>, DriverError> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(ring) = ring.as_ref() else {
            return Ok(SmallVec::new());
        };
        let mut taken = SmallVec::new();
        ring.drain(&Mmio(hw), &**hw.memory(), |d| match d {
            Ok(d) => taken.push(d),
            Err(e) => tracing::error!("vt-d: bad page request descriptor: {e}"),
        })?;
        Ok(taken)
    }

    /// Where a request goes: to the fault queue of the domain that bound its PASID on
    /// its device; otherwise it is refused (answered if a response is due).
    pub fn dispatch(&self, desc: &PageRequestDesc) -> Dispatch {
        let did = desc.pasid.and_then(|p| {
            self.routes
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&(desc.rid.rid(), p.raw()))
                .copied()
        });
        let sink = did.and_then(|d| {
            self.sinks
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&d)
                .cloned()
        });
        match (sink, refusal(desc)) {
            (Some(sink), refuse) => {
                Dispatch::Report(sink, desc.rid, PageRequest::from(desc), refuse)
            }
            (None, Some(refuse)) => Dispatch::Refuse(refuse),
            (None, None) => Dispatch::Drop,
        }
    }

    /// The fault queue of the domain that bound `pasid` on `sid`, if any.
    pub fn owner(&self, sid: SourceId, pasid: Pasid) -> Option<FaultSink> {
        let did = self
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(sid.rid(), pasid.raw()))
            .copied()?;
        self.sinks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&did)
            .cloned()
    }

    /// Routes the requests of `sid` with `pasid` to `did`.
    pub fn add_route(&self, sid: SourceId, pasid: Pasid, did: DomainId) {
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((sid.rid(), pasid.raw()), did);
    }

    /// Stops routing the requests of `sid` with `pasid`.
    pub fn remove_route(&self, sid: SourceId, pasid: Pasid) {
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(sid.rid(), pasid.raw()));
    }

    /// Whether the requests of `sid` with `pasid` go to `did`.
    pub fn routed_to(&self, sid: SourceId, pasid: Pasid, did: DomainId) -> bool {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(sid.rid(), pasid.raw()))
            == Some(&did)
    }

    /// Number of routed (device, PASID) pairs.
    pub fn routes(&self) -> usize {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Sets (or with `None` removes) the fault queue of `did`.
    pub fn set_sink(&self, did: DomainId, sink: Option<FaultSink>) {
        let mut sinks = self.sinks.write().unwrap_or_else(PoisonError::into_inner);
        match sink {
            Some(s) => {
                sinks.insert(did, s);
            }
            None => {
                sinks.remove(&did);
            }
        }
    }

    /// Number of domains with a fault queue.
    pub fn sinks(&self) -> usize {
        self.sinks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(lpig: bool, private_data: Option<[u64; 2]>) -> PageRequest {
        PageRequest::from(&PageRequestDesc {
            rid: SourceId::from_rid(0x18),
            pasid: Some(Pasid::new(5).unwrap()),
            exe: false,
            pm: false,
            read: true,
            write: true,
            lpig,
            prg_index: 0x1ff,
            addr: 0x1000,
            private_data,
        })
    }

    #[test]
    fn responses_return_the_private_data_with_pdp() {
        let sid = SourceId::from_rid(0x18);
        let resp = PageResponse {
            pasid: Some(Pasid::new(5).unwrap()),
            grpid: 0x1ff,
            code: PageResponseCode::Success,
        };
        for (lpig, data) in [(false, Some([7, 8])), (true, Some([9, 10])), (true, None)] {
            let desc = group_response(sid, &request(lpig, data), &resp).unwrap();
            let InvDesc::PageGroupResponse {
                rid,
                pasid_present,
                private_data_present,
                last_page_in_group,
                prg_index,
                private_data,
                response,
                ..
            } = desc
            else {
                panic!("{desc:?}");
            };
            assert_eq!(
                (rid, prg_index, response),
                (sid, 0x1ff, ResponseCode::Success)
            );
            assert!(pasid_present && last_page_in_group);
            assert_eq!(private_data_present, data.is_some());
            assert_eq!(private_data, data.unwrap_or_default());
        }
    }
}
