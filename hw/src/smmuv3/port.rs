//! The SMMU as a DMA device sees it ([`DmaPort`]): untranslated requests tagged with the
//! device's StreamID (its PCIe requester id) and SubstreamID (its PASID), ATS translation
//! requests and translated requests (§3.9, allowed by STE.EATS), and PRI page requests
//! (§8).
//!
//! [`DmaFault::reason`] carries the SMMU event type of the fault (§7.3), 0 for an abort
//! without a record (STE.Config abort, GBPA.ABORT). A stage-1 F_TRANSLATION, F_ACCESS or
//! F_PERMISSION is recoverable when the stream allows ATS and the SMMU has PRI: the device
//! may send a page request. An untranslated request may stall (§3.12.2): `remap` then
//! waits until software resumes or terminates it; an ATS translation request never stalls.

use crate::drain::RequestDrain;
use vsva_smmuv3::{
    event::Event, event::EventType, priq::PriqEntry, ste::Eats, walk::AccessRequest,
};
use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::{addr::Hpa, addr::Pasid, addr::SourceId};

use super::translate::{SmmuFault, SmmuTranslation};
use super::{PriRefused, Smmu};
use crate::dma::port::{
    AtsCompletion, DmaAccess, DmaFault, DmaPort, DmaTranslation, PageRequestMessage, PrgResponse,
};
use crate::memory::HostMemory;

fn request(access: DmaAccess) -> AccessRequest {
    AccessRequest {
        write: access.write,
        instruction: access.execute,
        privileged: access.privileged,
    }
}

fn page(t: &SmmuTranslation) -> DmaTranslation {
    let size = t.page_size.bytes();
    DmaTranslation::new(Hpa(t.output & !(size - 1)), size).expect("translations are aligned pages")
}

impl Smmu {
    /// Whether the STE of `sid` allows ATS translation requests and translated requests.
    fn ats_allowed(&self, sid: u32) -> Option<Eats> {
        let mut state = self.lock();
        self.ste_for(&mut state, sid)
            .ok()
            .map(|ste| ste.eats)
            .filter(|e| *e != Eats::Abort)
    }

    /// Records an event of `event_type` for a request the STE's EATS refuses (§7.3:
    /// F_BAD_ATS_TREQ, F_TRANSL_FORBIDDEN) and returns the fault the device sees.
    fn refuse(
        &self,
        event_type: EventType,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: DmaAccess,
    ) -> DmaFault {
        let event = Event {
            input_addr: addr,
            rnw: !access.write,
            pnu: access.privileged,
            ind: access.execute,
            ..Event::new(event_type, sid, ssid)
        };
        let mut state = self.lock();
        self.record_event(&mut state, &event);
        DmaFault {
            reason: event_type as u8,
            recoverable: false,
        }
    }

    fn dma_fault(&self, sid: u32, f: SmmuFault) -> DmaFault {
        match f {
            SmmuFault::Abort => DmaFault {
                reason: 0,
                recoverable: false,
            },
            SmmuFault::Event { event, .. } => {
                let page_fault = matches!(
                    event.event_type,
                    EventType::Translation | EventType::Access | EventType::Permission
                );
                // A stalled transaction that was terminated was already reported to
                // software, which chose to end it.
                DmaFault {
                    reason: event.event_type as u8,
                    recoverable: page_fault
                        && !event.stall
                        && !event.s2
                        && self.features.pri
                        && self.ats_allowed(sid).is_some(),
                }
            }
        }
    }
}

impl DmaPort for Smmu {
    fn remap(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<DmaTranslation, DmaFault> {
        let sid = sid.rid() as u32;
        self.translate(sid, pasid.map(Pasid::raw), addr, request(access))
            .map(|t| page(&t))
            .map_err(|f| self.dma_fault(sid, f))
    }

    /// Full ATS (EATS 0b01) only: split-stage ATS would return an IPA. Under HTTU a
    /// writable-clean page is returned without write permission unless the request was
    /// for writing, which marks it dirty.
    fn ats_translate(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<AtsCompletion, DmaFault> {
        let sid = sid.rid() as u32;
        if self.ats_allowed(sid) != Some(Eats::Full) {
            let ssid = pasid.map(Pasid::raw);
            return Err(self.refuse(EventType::BadAtsTreq, sid, ssid, addr, access));
        }
        let t = self
            .translate_terminating(sid, pasid.map(Pasid::raw), addr, request(access))
            .map_err(|f| self.dma_fault(sid, f))?;
        Ok(AtsCompletion {
            page: page(&t),
            perm: DmaAccess {
                read: t.perms.read,
                // Write permission only for a page already dirty (a write request's walk
                // made it so): a writable-clean page granted W would take the device's
                // writes from its ATC without ever being marked (HTTU, IHI 0070 §3.13).
                write: t.perms.write && t.dirty,
                execute: t.perms.execute,
                privileged: access.privileged,
            },
        })
    }

    fn check_translated(
        &self,
        sid: SourceId,
        hpa: Hpa,
        _len: u64,
        access: DmaAccess,
    ) -> Result<(), DmaFault> {
        let sid = sid.rid() as u32;
        match self.ats_allowed(sid) {
            Some(_) => Ok(()),
            None => {
                let forbidden = EventType::TranslForbidden;
                Err(self.refuse(forbidden, sid, None, hpa.raw(), access))
            }
        }
    }

    /// A request the SMMU cannot queue is answered at once: Response Failure when PRI is
    /// not enabled for the stream, Success when the queue lost it (the device retries and
    /// asks again), so that the device never waits for an answer that cannot come.
    fn page_request(&self, req: PageRequestMessage) {
        let sid = req.sid.rid() as u32;
        let entry = PriqEntry {
            sid,
            ssid: req.pasid.map(Pasid::raw),
            privileged: req.access.privileged,
            exec: req.access.execute,
            read: req.access.read,
            write: req.access.write,
            last: req.last,
            prg_index: req.prgi,
            addr: req.addr,
        };
        let code = match Smmu::page_request(self, &entry) {
            Ok(()) => return,
            Err(PriRefused::NotEnabled) => ResponseCode::ResponseFailure,
            Err(PriRefused::Lost) if req.last => ResponseCode::Success,
            Err(PriRefused::Lost) => return,
        };
        if let Some(ep) = self.endpoint(sid) {
            ep.page_response(PrgResponse {
                pasid: req.pasid,
                prgi: req.prgi,
                code,
            });
        }
    }

    fn memory(&self) -> &HostMemory {
        &self.mem
    }

    fn request_drain(&self) -> &RequestDrain {
        &self.drain
    }
}
