//! What the host reports for a passthrough device, shown to the guest as its SMMU would
//! have shown it: unrecoverable faults of the guest's stage 1 and CD table as event
//! records (IHI 0070 §7.3), page requests as PRI queue entries (§8), whether they came
//! from a VFIO container's fault region or an iommufd fault queue.
//!
//! The generic fault reasons map to the event types of the conditions they stand for:
//!
//! | `iommu_fault_reason` | Event |
//! |---|---|
//! | `PTE_FETCH` | F_TRANSLATION |
//! | `PERMISSION` | F_PERMISSION |
//! | `ACCESS` | F_ACCESS |
//! | `OOR_ADDRESS` | F_ADDR_SIZE |
//! | `WALK_EABT` | F_WALK_EABT |
//! | `PASID_INVALID` | C_BAD_SUBSTREAMID |
//! | `PASID_FETCH` | F_CD_FETCH |
//! | `BAD_PASID_ENTRY` | C_BAD_CD |
//!
//! The fetch address of F_WALK_EABT and F_CD_FETCH is the physical address the host's
//! SMMU read, a host address the guest must not see: it is recorded as 0.

use vsva_mem::PhysMem;
use vsva_smmuv3::regs::{offset, OVERFLOW};
use vsva_smmuv3::{event::Event, event::EventType, priq::PriqEntry, regs::Irq};
use vsva_uapi::request::UnrecoverableReason as R;
use vsva_uapi::{
    request::PageRequest, request::PageResponse, request::PageResponseCode,
    request::UnrecoverableFault,
};
use vsva_vtd::addr::SourceId;

use super::stream::HostConfig;
use super::{StreamHost, VSmmu, VSmmuError};
use crate::error::HostCall;
use crate::viommu::lock;

/// What became of an injected page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriOutcome {
    /// Written to the guest's PRI queue; the guest answers it with CMD_PRI_RESP.
    Queued,
    /// The stream's STE does not translate with ATS enabled, or the SMMU or its PRI queue
    /// is disabled: answered Failure if an answer was due.
    NotEnabled,
    /// The PRI queue is full or in overflow (§8.1): the request was discarded and, the
    /// last of its group, answered Success so that the device retries.
    Overflow,
    /// The queue slot is not in guest RAM: answered Failure if an answer was due.
    Unwritable,
    /// A stall the guest's STE does not let stall (S1STALLD): answered Failure (the
    /// host aborts the transaction) and recorded as a fault without Stall.
    Terminated,
}

impl VSmmu {
    /// Writes `event` to the guest's event queue (lost when the queue is disabled, full or
    /// unwritable); whether it was written.
    pub(super) fn record_event(&self, event: &Event, irqs: &mut Vec<Irq>) -> bool {
        let mut regs = lock(&self.regs);
        let written = regs.push_event().is_some_and(|addr| {
            event
                .encode()
                .iter()
                .enumerate()
                .all(|(i, w)| self.mem.write_u64(addr + 8 * i as u64, *w).is_ok())
        });
        drop(regs);
        if written {
            self.count(|s| s.events += 1);
            irqs.push(Irq::Eventq);
        } else {
            self.count(|s| s.events_lost += 1);
        }
        written
    }

    /// Records an unrecoverable fault the host reported for the passthrough device
    /// `host_sid` in the guest's event queue; whether the record was written (false: the
    /// queue lost it, as hardware would).
    ///
    /// Refused, with nothing recorded: a device that is not attached, or whose CD table the
    /// host does not walk (the fault is then the host's), and a fault without a
    /// SubstreamID or with a reason that is no stage-1 or CD condition.
    pub fn inject_host_fault(
        &self,
        host_sid: SourceId,
        fault: &UnrecoverableFault,
    ) -> Result<bool, VSmmuError> {
        let (sid, config) = self.stream_of(host_sid)?;
        let refuse = |why| Err(VSmmuError::HostReport { sid: host_sid, why });
        if !matches!(config, HostConfig::Translate(_)) {
            return refuse("the guest's CD table is not attached");
        }
        let Some(pasid) = fault.pasid else {
            return refuse("no SubstreamID");
        };
        let (event_type, addressed) = match fault.reason {
            R::PteFetch => (EventType::Translation, true),
            R::Permission => (EventType::Permission, true),
            R::Access => (EventType::Access, true),
            R::OorAddress => (EventType::AddrSize, true),
            R::WalkEabt => (EventType::WalkEabt, true),
            R::PasidInvalid => (EventType::BadSubstreamId, false),
            R::PasidFetch => (EventType::CdFetch, false),
            R::BadPasidEntry => (EventType::BadCd, false),
            R::Unknown => return refuse("an unknown reason"),
        };
        if addressed && fault.addr.is_none() {
            return refuse("no address");
        }
        let event = Event {
            rnw: !fault.write,
            ind: addressed && fault.exec,
            pnu: addressed && fault.privileged,
            input_addr: fault.addr.filter(|_| addressed).unwrap_or(0),
            ..Event::new(event_type, sid, Some(pasid.raw()))
        };
        let mut irqs = Vec::new();
        let written = self.record_event(&event, &mut irqs);
        self.deliver(irqs);
        Ok(written)
    }

    /// Records an event the host reported on the vEVENT queue of a vIOMMU (its StreamID
    /// is the vSID, which is the guest's StreamID) in the guest's event queue, as decoded
    /// and re-encoded; whether the record was written (false: the queue lost it).
    ///
    /// Refused, with nothing recorded: a record that does not decode, a StreamID of no
    /// device on an iommufd, or of one whose CD table the host does not walk.
    pub fn inject_vevent(&self, record: [u64; 4]) -> Result<bool, VSmmuError> {
        let event = Event::decode(record).map_err(|_| VSmmuError::Vevent("an unknown event"))?;
        let translating = lock(&self.streams).iter().any(|s| {
            s.sid == event.sid
                && matches!(s.host, StreamHost::Iommufd(_))
                && matches!(s.config, HostConfig::Translate(_))
        });
        if !translating {
            return Err(VSmmuError::Vevent(
                "a StreamID of no translating device on an iommufd",
            ));
        }
        let mut irqs = Vec::new();
        let written = self.record_event(&event, &mut irqs);
        self.deliver(irqs);
        Ok(written)
    }

    /// The host's vEVENT queue lost events of the vIOMMU (`IOMMU_VEVENTQ_FLAG_LOST_EVENTS`):
    /// the guest sees what its SMMU shows when events are lost, the event queue's overflow
    /// (EVENTQ_PROD.OVFLG toggled, IHI 0070 §7.4), and an event queue interrupt so that its
    /// driver looks. Whether the overflow was recorded (false while the guest's queue is
    /// disabled or an overflow is not acknowledged yet).
    pub fn inject_vevents_lost(&self) -> bool {
        let recorded = lock(&self.regs).eventq_overflow();
        self.count(|s| s.vevents_lost += 1);
        if recorded {
            self.deliver(vec![Irq::Eventq]);
        }
        recorded
    }

    /// Writes a page request the host reported for the passthrough device `host_sid` into
    /// the guest's PRI queue. Where the SMMU would answer the request itself, the vSMMU
    /// sends that answer down (only for the last request of a group).
    ///
    /// For a stall-capable device ([`VSmmu::set_stall_capable`]) the request is a stalled
    /// transaction (its group id the host's STAG): it goes to the event queue as a stall
    /// record (`Queued`), see `stall.rs`; where it cannot stall or be recorded there
    /// (`NotEnabled`, `Terminated`, `Overflow`: too many stalls held, `Unwritable`: the
    /// event queue lost it) it is answered Failure.
    ///
    /// Refused, with nothing done: a device that is not attached, a group index beyond 9
    /// bits (16 bits for a stall).
    pub fn inject_page_request(
        &self,
        host_sid: SourceId,
        req: &PageRequest,
    ) -> Result<PriOutcome, VSmmuError> {
        let (sid, config) = self.stream_of(host_sid)?;
        let (can_stall, s1stalld) = lock(&self.streams)
            .iter()
            .find(|s| s.sid == sid)
            .map_or((false, false), |s| (s.can_stall, s.s1stalld));
        if can_stall {
            if req.grpid > u16::MAX.into() || !req.last_page {
                return Err(VSmmuError::HostReport {
                    sid: host_sid,
                    why: "a stall whose STAG is beyond 16 bits or that is not a whole group",
                });
            }
            return Ok(self.inject_stall(sid, host_sid, config, s1stalld, req));
        }
        let prg_index = u16::try_from(req.grpid)
            .ok()
            .filter(|&g| g <= 0x1ff)
            .ok_or(VSmmuError::HostReport {
                sid: host_sid,
                why: "a page request group index beyond 9 bits",
            })?;
        let answer = |code| {
            if req.last_page {
                self.answer(host_sid, req, code);
            }
        };
        let ats = lock(&self.streams).iter().any(|s| s.sid == sid && s.ats);
        let mut regs = lock(&self.regs);
        let enabled = self.config.features.pri
            && ats
            && matches!(config, HostConfig::Translate(_))
            && regs.cr0ack() & vsva_smmuv3::regs::cr0::SMMUEN != 0;
        if !enabled || regs.cr0ack() & vsva_smmuv3::regs::cr0::PRIQEN == 0 {
            drop(regs);
            self.count(|s| s.page_requests_dropped += 1);
            answer(PageResponseCode::Failure);
            return Ok(PriOutcome::NotEnabled);
        }
        // An active overflow inhibits new entries (§8.1).
        let prod = regs.read(offset::PRIQ_PROD, 4).unwrap_or(0) as u32;
        let cons = regs.read(offset::PRIQ_CONS, 4).unwrap_or(0) as u32;
        let slot = if (prod ^ cons) & OVERFLOW != 0 {
            None
        } else {
            regs.push_page_request()
        };
        let Some(slot) = slot else {
            drop(regs);
            self.count(|s| s.page_requests_dropped += 1);
            answer(PageResponseCode::Success);
            return Ok(PriOutcome::Overflow);
        };
        let entry = PriqEntry {
            sid,
            ssid: req.pasid.map(|p| p.raw()),
            privileged: req.privileged,
            exec: req.exec,
            read: req.read,
            write: req.write,
            last: req.last_page,
            prg_index,
            addr: req.addr,
        };
        let written = entry
            .encode()
            .iter()
            .enumerate()
            .all(|(i, w)| self.mem.write_u64(slot + 8 * i as u64, *w).is_ok());
        drop(regs);
        if !written {
            self.count(|s| s.page_requests_dropped += 1);
            answer(PageResponseCode::Failure);
            return Ok(PriOutcome::Unwritable);
        }
        self.count(|s| s.page_requests += 1);
        self.deliver(vec![Irq::Priq]);
        Ok(PriOutcome::Queued)
    }

    /// The guest StreamID and host configuration of the passthrough device `host_sid`.
    fn stream_of(&self, host_sid: SourceId) -> Result<(u32, HostConfig), VSmmuError> {
        lock(&self.streams)
            .iter()
            .find(|s| s.host_sid == host_sid)
            .map(|s| (s.sid, s.config))
            .ok_or(VSmmuError::NotAttached(host_sid))
    }

    /// The vSMMU's own answer to a page request of `host_sid`.
    pub(super) fn answer(&self, host_sid: SourceId, req: &PageRequest, code: PageResponseCode) {
        let Some((_, _, host, _)) = self
            .streams_where(|_| true)
            .into_iter()
            .find(|(_, h, _, _)| *h == host_sid)
        else {
            return;
        };
        let response = PageResponse {
            pasid: req.pasid,
            grpid: req.grpid,
            code,
        };
        self.page_response(&host, host_sid, response);
    }

    /// Sends `response` down for the device `host_sid` of `host`: through the container,
    /// or on the iommufd's fault queue with the group's cookie.
    pub(super) fn page_response(
        &self,
        host: &StreamHost,
        host_sid: SourceId,
        response: PageResponse,
    ) {
        let r = match host {
            StreamHost::Container(c) => c.page_response(host_sid, &response),
            StreamHost::Iommufd(d) => d.iommufd().respond(host_sid, &response),
        };
        self.host_call(r, || HostCall::PageResponse(host_sid, response));
    }
}
