//! The IOMMU as a device sees it: untranslated requests, ATS translation requests,
//! translated requests and PRI page requests (VT-d §4.2, §7.4), over PCIe.

use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::regs::AddressType;
use vsva_vtd::{
    addr::Hpa, addr::Pasid, addr::SourceId, fault::FaultReason, request::RootState,
    walk::AccessRequest,
};

use std::sync::atomic::Ordering;

use super::runs::{RunKey, RunToken};
use super::{DmaMapping, Iommu, ROOT_STRICT};
use crate::dma::port::{
    AtsCompletion, AtsEndpoint, DmaAccess, DmaFault, DmaPort, DmaRun, DmaTranslation,
    PageRequestMessage, PrgResponse,
};
use crate::drain::RequestDrain;
use crate::memory::HostMemory;

/// The page a successful translation maps, as the device sees it.
fn page(m: &DmaMapping) -> DmaTranslation {
    DmaTranslation::new(Hpa(m.page_base()), 1 << m.page_shift)
        .expect("translations are aligned pages")
}

fn request(access: DmaAccess) -> AccessRequest {
    AccessRequest {
        write: access.write,
        execute: access.execute,
        supervisor: access.privileged,
    }
}

impl Iommu {
    /// The context entry checks of translation requests and translated requests: the
    /// device TLB must be enabled (DTE, SCT.5).
    fn check_device_tlb(&self, sid: SourceId) -> Result<(), FaultReason> {
        match self.root_state() {
            RootState::Scalable(rta) => match self.context_entry(rta, sid) {
                Ok(ctx) if ctx.dte => Ok(()),
                Ok(_) => Err(FaultReason::Sct5),
                Err(f) => Err(f.reason),
            },
            RootState::Disabled => Ok(()),
            RootState::NotScalable => Err(FaultReason::Rta1),
        }
    }

    /// What the runs of requests of (`sid`, `pasid`) for `access` are kept under, read
    /// before their pages are looked up; `None` when runs are not kept: requests without
    /// PASID, translation not in scalable mode, strict mode.
    fn run_key(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        access: DmaAccess,
    ) -> Option<(RunKey, RunToken)> {
        let token = RunToken {
            root: self.root.load(Ordering::Acquire),
            generation: self.runs.generation(),
        };
        let scalable = matches!(RootState::from_word(token.root), RootState::Scalable(_));
        let key = RunKey {
            sid,
            pasid: pasid?,
            access,
        };
        (scalable && token.root & ROOT_STRICT == 0).then_some((key, token))
    }
}

impl DmaPort for Iommu {
    fn remap(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<DmaTranslation, DmaFault> {
        let req = request(access);
        match self.translate(sid, pasid, addr, req) {
            Ok(m) => Ok(page(&m)),
            Err(f) => {
                if !f.fpd {
                    self.record_fault(sid, pasid, addr, f.reason, req, AddressType::Untranslated);
                }
                Err(DmaFault {
                    reason: f.reason.code(),
                    recoverable: false,
                })
            }
        }
    }

    /// The run kept for the request (`RunCache`) when it holds
    /// `addr`; otherwise the first page through the whole pipeline, as
    /// [`DmaPort::remap`]. The run then grows by the pages after it that hit in the IOTLB
    /// (checked as a hit is, in strict mode too) and continue it in host memory, and is
    /// kept if it grew. A miss ends the run: the page is walked, and its fault recorded,
    /// only when the device asks for it.
    fn remap_run(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
        len: u64,
    ) -> Result<DmaRun, DmaFault> {
        let kept = self.run_key(sid, pasid, access);
        let last = addr.saturating_add(len.max(1) - 1);
        let found = match kept.and_then(|(key, token)| self.runs.lookup(key, token, addr)) {
            Some(run) if run.end().is_none_or(|end| end > last) => return Ok(run),
            Some(run) => run,
            None => DmaRun::page(self.remap(sid, pasid, addr, access)?, addr),
        };
        let req = request(access);
        let run = found.grow_to(last, |next| {
            self.translate_cached(sid, pasid, next, req)
                .map(|m| page(&m))
        });
        if let Some((key, token)) = kept.filter(|_| run.size() > found.size()) {
            self.runs.insert(key, token, run);
        }
        Ok(run)
    }

    fn ats_translate(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<AtsCompletion, DmaFault> {
        let req = request(access);
        if let Err(reason) = self.check_device_tlb(sid) {
            self.record_fault(
                sid,
                pasid,
                addr,
                reason,
                req,
                AddressType::TranslationRequest,
            );
            return Err(DmaFault {
                reason: reason.code(),
                recoverable: false,
            });
        }
        match self.translate(sid, pasid, addr, req) {
            Ok(m) => Ok(AtsCompletion {
                page: page(&m),
                perm: DmaAccess {
                    read: m.perms.read(),
                    // Write permission only where the dirty bit is already set, so that
                    // the first write of a page comes back to set it.
                    write: m.perms.write() && m.perms.dirty(),
                    execute: m.perms.execute(),
                    privileged: access.privileged,
                },
            }),
            Err(f) => {
                // A fault a page request may resolve is reported in the completion only;
                // the others are recorded as well (§7.4).
                if !f.recoverable && !f.fpd {
                    self.record_fault(
                        sid,
                        pasid,
                        addr,
                        f.reason,
                        req,
                        AddressType::TranslationRequest,
                    );
                }
                Err(DmaFault {
                    reason: f.reason.code(),
                    recoverable: f.recoverable,
                })
            }
        }
    }

    fn check_translated(
        &self,
        sid: SourceId,
        hpa: Hpa,
        len: u64,
        access: DmaAccess,
    ) -> Result<(), DmaFault> {
        let out_of_range = hpa
            .0
            .checked_add(len)
            .is_none_or(|end| end > self.mem.size());
        let reason = match self.check_device_tlb(sid) {
            Err(reason) => reason,
            Ok(()) if out_of_range => FaultReason::Sgn4,
            Ok(()) => return Ok(()),
        };
        self.record_fault(
            sid,
            None,
            hpa.0,
            reason,
            request(access),
            AddressType::Translated,
        );
        Err(DmaFault {
            reason: reason.code(),
            recoverable: false,
        })
    }

    fn page_request(&self, req: PageRequestMessage) {
        let pre = match self.root_state() {
            RootState::Scalable(rta) => self
                .context_entry(rta, req.sid)
                .map(|c| c.pre)
                .unwrap_or(false),
            _ => false,
        };
        // The device is looked up only to answer for it: the queued request's response
        // goes through the page group response descriptor instead.
        if !pre {
            // Page requests from a context without PRE: recorded (SCT.8) and answered
            // with Invalid Request so the device does not wait forever.
            self.record_fault(
                req.sid,
                req.pasid,
                req.addr,
                FaultReason::Sct8,
                request(req.access),
                AddressType::Untranslated,
            );
            if let Some(ep) = self.endpoint(req.sid) {
                respond(&*ep, &req, ResponseCode::InvalidRequest);
            }
            return;
        }
        let desc = PageRequestDesc {
            rid: req.sid,
            pasid: req.pasid,
            exe: req.access.execute,
            pm: req.access.privileged,
            read: req.access.read || !req.access.write,
            write: req.access.write,
            lpig: req.last,
            prg_index: req.prgi,
            addr: req.addr & !0xfff,
            private_data: None,
        };
        if !self.queue_page_request(&desc) && req.last {
            // Queue full (PRS.PRO): hardware answers the group itself with Success, and
            // the device's retry faults and asks again (§7.5.1).
            if let Some(ep) = self.endpoint(req.sid) {
                respond(&*ep, &req, ResponseCode::Success);
            }
        }
    }

    fn memory(&self) -> &HostMemory {
        &self.mem
    }

    fn request_drain(&self) -> &RequestDrain {
        &self.drain
    }
}

fn respond(ep: &dyn AtsEndpoint, req: &PageRequestMessage, code: ResponseCode) {
    ep.page_response(PrgResponse {
        pasid: req.pasid,
        prgi: req.prgi,
        code,
    });
}
