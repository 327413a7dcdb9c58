//! Stalled transactions of passthrough devices shown to the guest (IHI 0070 §3.12.2, the
//! stall fault model): the host SMMU stalls a device's stage-1 fault and reports it to the
//! VM's container, or to the fault queue of the device's nested HWPT over iommufd, as a
//! page request whose group id is the host's STAG; the vSMMU writes
//! it to the guest's event queue as a fault record with Stall = 1 and a STAG of its own
//! (a vSTAG), and the guest's CMD_RESUME (§4.7.2) or CMD_STALL_TERM (§4.7.3) naming that
//! vSTAG becomes the page response that resumes or ends the host's transaction.
//!
//! The host's STAG never reaches the guest and a guest STAG never reaches the host: the
//! [`StallTags`] map is the only way from one to the other, and a CMD_RESUME naming a
//! vSTAG the vSMMU did not give for that StreamID changes nothing (the spec's CMD_RESUME
//! of no stalled transaction).
//!
//! The page request says which page and access stalled, not which fault it was (Linux's
//! `iommu_fault_page_request` and iommufd's `iommu_hwpt_pgfault` have no reason): the
//! vSMMU finds the class itself by walking the guest's stage 1 for the faulting address
//! ([`VSmmu::stall_class`]), as the host SMMU found it (§7.3: no valid leaf is
//! F_TRANSLATION, a leaf without the access's permission F_PERMISSION, AF = 0 without
//! hardware Access flag update F_ACCESS, an address beyond the table's sizes F_ADDR_SIZE).

use std::collections::BTreeMap;

use vsva_mem::{MemError, PhysMem};
use vsva_smmuv3::cmd::ResumeAction;
use vsva_smmuv3::lookup::{find_cd, Stage1Context};
use vsva_smmuv3::walk::{walk_stage1, AccessRequest, FaultKind};
use vsva_smmuv3::{event::Event, event::EventType, features::StallModel};
use vsva_uapi::{request::PageRequest, request::PageResponse, request::PageResponseCode};
use vsva_vtd::addr::{Pasid, SourceId};

use super::stream::HostConfig;
use super::{PriOutcome, VSmmu, VSmmuError};
use crate::viommu::lock;

/// How many transactions may be stalled at once across the vSMMU's streams; a stall
/// beyond it is ended at once (as an SMMU that runs out of stall resources terminates).
pub(super) const MAX_STALLS: usize = 256;

/// A host stall the guest holds under a vSTAG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HostStall {
    /// The device's host requester id.
    pub host_sid: SourceId,
    /// The SubstreamID of the stalled transaction.
    pub pasid: Option<Pasid>,
    /// The host's STAG (the page request's group id).
    pub host_stag: u32,
}

/// The stalls the guest was shown, by (guest StreamID, vSTAG).
#[derive(Debug, Default)]
pub(super) struct StallTags {
    held: BTreeMap<(u32, u16), HostStall>,
    next: u16,
}

impl StallTags {
    /// Holds `stall` for stream `sid` under a free vSTAG; `None` when [`MAX_STALLS`] are
    /// held already.
    pub fn hold(&mut self, sid: u32, stall: HostStall) -> Option<u16> {
        if self.held.len() >= MAX_STALLS {
            return None;
        }
        // Fewer than 2^16 are held: a free tag is found.
        let stag = loop {
            let stag = self.next;
            self.next = self.next.wrapping_add(1);
            if !self.held.contains_key(&(sid, stag)) {
                break stag;
            }
        };
        self.held.insert((sid, stag), stall);
        Some(stag)
    }

    /// The stall `stag` of `sid`, taken out.
    pub fn take(&mut self, sid: u32, stag: u16) -> Option<HostStall> {
        self.held.remove(&(sid, stag))
    }

    /// Every stall of `sid`, taken out.
    pub fn take_stream(&mut self, sid: u32) -> Vec<HostStall> {
        let tags: Vec<u16> = self
            .held
            .range((sid, 0)..=(sid, u16::MAX))
            .map(|(k, _)| k.1)
            .collect();
        tags.into_iter()
            .filter_map(|t| self.held.remove(&(sid, t)))
            .collect()
    }

    /// How many stalls of `sid` (every stream: `None`) are held.
    pub fn count(&self, sid: Option<u32>) -> usize {
        self.held
            .keys()
            .filter(|k| sid.is_none_or(|s| k.0 == s))
            .count()
    }
}

impl VSmmu {
    /// Declares whether the passthrough device `sid` stalls its faults (the firmware's
    /// `dma-can-stall` the VMM gives the guest, and the host's `set_stall_capable`): its
    /// page requests from the host are stalled transactions, shown to the guest as stall
    /// events. Only on a vSMMU that offers stalls (IDR0.STALL_MODEL 0b00).
    pub fn set_stall_capable(&self, sid: u32, can_stall: bool) -> Result<(), VSmmuError> {
        let _serial = lock(&self.cmdq);
        if can_stall && self.config.features.stall_model == StallModel::Terminate {
            return Err(VSmmuError::Unsupported("stalls on a terminate-only vSMMU"));
        }
        let mut streams = lock(&self.streams);
        let s = streams
            .iter_mut()
            .find(|s| s.sid == sid)
            .ok_or(VSmmuError::NoStream(sid))?;
        s.can_stall = can_stall;
        Ok(())
    }

    /// How many stalled transactions of `sid` (every stream: `None`) wait for the guest.
    pub fn stalled(&self, sid: Option<u32>) -> usize {
        lock(&self.stalls).count(sid)
    }

    /// A host stall of the stream `sid` (host `host_sid`) given as the page request `req`:
    /// written to the event queue as a stall record under a new vSTAG when the guest's
    /// configuration stalls it (stage 1 translating, STE.S1STALLD clear); otherwise ended
    /// at once with an Abort response, recorded as the terminated fault it then is.
    pub(super) fn inject_stall(
        &self,
        sid: u32,
        host_sid: SourceId,
        config: HostConfig,
        s1stalld: bool,
        req: &PageRequest,
    ) -> PriOutcome {
        let abort = |this: &Self| {
            this.count(|s| s.stalls_aborted += 1);
            this.answer(host_sid, req, PageResponseCode::Failure);
        };
        let enabled = matches!(config, HostConfig::Translate(_))
            && lock(&self.regs).cr0ack() & vsva_smmuv3::regs::cr0::SMMUEN != 0;
        if !enabled {
            abort(self);
            return PriOutcome::NotEnabled;
        }
        let event = Event {
            rnw: !req.write,
            ind: req.exec,
            pnu: req.privileged,
            input_addr: req.addr,
            ..Event::new(self.stall_class(sid, req), sid, req.pasid.map(|p| p.raw()))
        };
        let mut irqs = Vec::new();
        if s1stalld {
            // The guest disabled stage-1 stalls: the fault terminates, as it would have.
            abort(self);
            self.record_event(&event, &mut irqs);
            self.deliver(irqs);
            return PriOutcome::Terminated;
        }
        let stall = HostStall {
            host_sid,
            pasid: req.pasid,
            host_stag: req.grpid,
        };
        let Some(stag) = lock(&self.stalls).hold(sid, stall) else {
            abort(self);
            return PriOutcome::Overflow;
        };
        let stalled = Event {
            stall: true,
            stag,
            ..event
        };
        if !self.record_event(&stalled, &mut irqs) {
            // A stall that cannot be recorded is terminated (as the hardware model does).
            lock(&self.stalls).take(sid, stag);
            abort(self);
            return PriOutcome::Unwritable;
        }
        self.count(|s| s.stalls += 1);
        self.deliver(irqs);
        PriOutcome::Queued
    }

    /// The fault a stalled transaction of stream `sid` met, found by walking the guest's
    /// stage 1 (its STE, the CD of the request's SubstreamID, the CD's TTB0 table) for the
    /// request's page and access, the descriptors only read: F_PERMISSION, F_ACCESS or
    /// F_ADDR_SIZE where the walk ends so; F_TRANSLATION otherwise (no valid leaf, and
    /// also a configuration the vSMMU cannot read or a walk that now succeeds: the guest
    /// changed its tables meanwhile, and Linux's iopf treats the classes alike).
    pub(super) fn stall_class(&self, sid: u32, req: &PageRequest) -> EventType {
        let features = self.config.features;
        let Ok(table) = lock(&self.regs).stream_table() else {
            return EventType::Translation;
        };
        let mem = ReadOnly(&*self.mem);
        let access = AccessRequest {
            write: req.write,
            instruction: req.exec,
            privileged: req.privileged,
        };
        let ssid = req.pasid.map(|p| p.raw());
        let fault = table
            .find_ste(&mem, &features, sid)
            .ok()
            .and_then(|ste| find_cd(&mem, &ste, &features, ssid, None, req.addr, &mut ()).ok())
            .and_then(|ctx| match ctx {
                Stage1Context::Cd { s1, .. } => {
                    walk_stage1(&mem, &s1, req.addr, access, &mut ()).err()
                }
                Stage1Context::Bypass => None,
            });
        match fault.map(|f| f.kind) {
            Some(FaultKind::Permission) => EventType::Permission,
            Some(FaultKind::Access) => EventType::Access,
            Some(FaultKind::AddrSize) => EventType::AddrSize,
            _ => EventType::Translation,
        }
    }

    /// CMD_RESUME of the guest: the stall it names goes back to the host as a page
    /// response (Retry → Success, which the host turns into CMD_RESUME Retry; Abort and
    /// Terminate → Failure, the host's CMD_RESUME Abort). A vSTAG the guest was not given
    /// for `sid` changes nothing.
    pub(super) fn resume(&self, sid: u32, stag: u16, action: ResumeAction) {
        let Some(stall) = lock(&self.stalls).take(sid, stag) else {
            return;
        };
        let code = match action {
            ResumeAction::Retry => PageResponseCode::Success,
            ResumeAction::Abort | ResumeAction::Terminate => PageResponseCode::Failure,
        };
        self.respond(&stall, code);
    }

    /// CMD_STALL_TERM of the guest, a change of the stream's host configuration, or its
    /// detach: every stall of `sid` ends with an Abort response.
    pub(super) fn terminate_stalls(&self, sid: u32) {
        let stalls = lock(&self.stalls).take_stream(sid);
        for stall in stalls {
            self.count(|s| s.stalls_aborted += 1);
            self.respond(&stall, PageResponseCode::Failure);
        }
    }

    /// The page response for a held stall, to the host of its device.
    fn respond(&self, stall: &HostStall, code: PageResponseCode) {
        let Some((_, _, host, _)) = self
            .streams_where(|_| true)
            .into_iter()
            .find(|(_, h, _, _)| *h == stall.host_sid)
        else {
            return;
        };
        let response = PageResponse {
            pasid: stall.pasid,
            grpid: stall.host_stag,
            code,
        };
        self.page_response(&host, stall.host_sid, response);
    }
}

/// Guest RAM for a classification walk: reads pass, every write is refused, so the walk
/// never sets an Access flag or a dirty state in the guest's tables (the host's SMMU does
/// that when the transaction is retried).
struct ReadOnly<'a>(&'a (dyn PhysMem + Send + Sync));

impl ReadOnly<'_> {
    fn refused(addr: u64, len: u64) -> MemError {
        MemError::OutOfRange { addr, len }
    }
}

impl PhysMem for ReadOnly<'_> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.0.read_u64(addr)
    }
    fn fetch_or_u64(&self, addr: u64, _bits: u64) -> Result<u64, MemError> {
        Err(Self::refused(addr, 8))
    }
    fn compare_exchange_u64(&self, addr: u64, _old: u64, _new: u64) -> Result<u64, MemError> {
        Err(Self::refused(addr, 8))
    }
    fn write_u64(&self, addr: u64, _value: u64) -> Result<(), MemError> {
        Err(Self::refused(addr, 8))
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        Err(Self::refused(addr, buf.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stall(host_stag: u32) -> HostStall {
        HostStall {
            host_sid: SourceId::from_rid(7),
            pasid: Pasid::new(1).ok(),
            host_stag,
        }
    }

    #[test]
    fn tags_are_per_stream_bounded_and_taken_once() {
        let mut t = StallTags::default();
        let a = t.hold(1, stall(0xbeef)).unwrap();
        let b = t.hold(2, stall(0xbeef)).unwrap();
        assert_eq!(t.count(None), 2);
        assert_ne!(a, b);
        assert_eq!(t.take(2, a), None, "not stream 2's tag");
        assert_eq!(t.take(1, a), Some(stall(0xbeef)));
        assert_eq!(t.take(1, a), None, "taken once");
        for i in 1..MAX_STALLS {
            assert!(t.hold(3, stall(i as u32)).is_some());
        }
        assert_eq!(t.hold(3, stall(0)), None, "bounded");
        assert_eq!(t.take_stream(3).len(), MAX_STALLS - 1);
        assert_eq!(t.count(Some(3)), 0);
        assert_eq!(t.count(Some(2)), 1);
    }

    #[test]
    fn a_tag_in_use_is_skipped_when_the_counter_wraps() {
        let mut t = StallTags {
            next: u16::MAX,
            ..StallTags::default()
        };
        assert_eq!(t.hold(1, stall(1)), Some(u16::MAX));
        assert_eq!(t.hold(1, stall(2)), Some(0));
        t.next = u16::MAX;
        assert_eq!(t.hold(1, stall(3)), Some(1), "MAX and 0 are held");
    }
}
