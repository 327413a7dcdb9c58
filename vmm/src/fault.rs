//! Unrecoverable faults of passthrough devices (issue 13 §4): what the host reports for a
//! PASID the guest bound (an `IOMMU_FAULT_DMA_UNRECOV` record of the VM's container) is
//! recorded in the guest's fault recording registers as the vIOMMU would have recorded it
//! (VT-d §7.2.1, §10.4.14): the device's guest requester id, the PASID, the page address,
//! the request's type and privilege, and the spec's reason code for the generic reason.
//! The register file keeps the spec's rules: F set, FSTS.PPF, FSTS.PFO when the next
//! register is still full (the fault is then lost, so a flood of faults takes no room),
//! and the fault event interrupt.
//!
//! The generic reasons name fewer conditions than VT-d's codes; the host reports only
//! first-level conditions, and each is recorded under the code of the first-level
//! condition it stands for:
//!
//! | `iommu_fault_reason` | Recorded as |
//! |---|---|
//! | `PTE_FETCH` | SFL.2 (0x71), entry not present |
//! | `WALK_EABT` | SFL.1 (0x70), error accessing an entry |
//! | `ACCESS` | SFL.10 (0x91), accessed/dirty update failed |
//! | `OOR_ADDRESS` | SGN.4 (0x83), input address beyond the address width |
//! | `PERMISSION` | SGN.3 (0x82) for an execute request, SGN.6 (0x85) for a write, SGN.2 (0x81) for a user read (a present first-level page can always be read, so only U/S refuses a user read), SGN.7 (0x86) for a supervisor read |
//!
//! The other reasons (PASID table and entry conditions) are the host's tables, never the
//! guest's: such a record is refused. An FPD field set in the guest's context entry,
//! PASID directory entry or PASID entry disables recording, as it would in hardware.

use vsva_uapi::{request::UnrecoverableFault, request::UnrecoverableReason};
use vsva_vtd::context::read_context_entry;
use vsva_vtd::pasid::{read_pasid_dir_entry, read_pasid_entry};
use vsva_vtd::regs::{AddressType, FaultOutcome, FaultRecord, RequestType};
use vsva_vtd::{addr::Pasid, addr::SourceId, fault::FaultReason};

use crate::error::VIommuError;
use crate::stats::Counters;
use crate::viommu::{lock, VIommu};

/// What became of an unrecoverable fault the host reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostFaultOutcome {
    /// Recorded in the guest's fault recording registers (the index), or lost to the
    /// registers' overflow rule (FSTS.PFO).
    Recorded(FaultOutcome),
    /// An FPD field of the guest's tables disables recording faults of this request.
    Disabled,
}

/// The VT-d fault reason the guest sees for a first-level fault the host reported.
fn vtd_reason(fault: &UnrecoverableFault) -> Option<FaultReason> {
    Some(match fault.reason {
        UnrecoverableReason::PteFetch => FaultReason::Sfl2,
        UnrecoverableReason::WalkEabt => FaultReason::Sfl1,
        UnrecoverableReason::Access => FaultReason::Sfl10,
        UnrecoverableReason::OorAddress => FaultReason::Sgn4,
        UnrecoverableReason::Permission if fault.exec => FaultReason::Sgn3,
        UnrecoverableReason::Permission if fault.write => FaultReason::Sgn6,
        UnrecoverableReason::Permission if fault.privileged => FaultReason::Sgn7,
        UnrecoverableReason::Permission => FaultReason::Sgn2,
        UnrecoverableReason::Unknown
        | UnrecoverableReason::PasidFetch
        | UnrecoverableReason::BadPasidEntry
        | UnrecoverableReason::PasidInvalid => return None,
    })
}

impl VIommu {
    /// Records an unrecoverable fault the host reported for the passthrough device
    /// `host_sid` in the guest's fault recording registers, and raises the fault event.
    ///
    /// Refused, with nothing recorded: a device that is not one of the VM's passthrough
    /// devices (`NotAttached`), a fault without a PASID, on a PASID the guest does not hold,
    /// without an address, or with a reason that is not a first-level condition
    /// (`HostFault`).
    pub fn inject_host_fault(
        &self,
        host_sid: SourceId,
        fault: &UnrecoverableFault,
    ) -> Result<HostFaultOutcome, VIommuError> {
        let rid = self
            .guest_sid_of(host_sid)
            .ok_or(VIommuError::NotAttached(host_sid))?;
        let refuse = |why: &'static str| Err(VIommuError::HostFault { sid: host_sid, why });
        let Some(pasid) = fault.pasid else {
            return refuse("no PASID");
        };
        if !lock(&self.guest_pasids).contains(&pasid) {
            return refuse("a PASID the guest does not hold");
        }
        let Some(addr) = fault.addr else {
            return refuse("no address");
        };
        let Some(reason) = vtd_reason(fault) else {
            return refuse("not a first-level fault");
        };
        if self.fault_processing_disabled(rid, pasid) {
            return Ok(HostFaultOutcome::Disabled);
        }
        let record = FaultRecord {
            fault_info: addr & !0xfff,
            sid: rid,
            reason: reason.code(),
            pasid: Some(pasid),
            exe: fault.exec,
            privileged: fault.privileged,
            request: if fault.write {
                RequestType::Write
            } else {
                RequestType::Read
            },
            address_type: AddressType::Untranslated,
        };
        let (outcome, irq) = self.regs.lock().record_fault(&record);
        Counters::bump(&self.counters.faults_recorded);
        self.deliver(irq);
        Ok(HostFaultOutcome::Recorded(outcome))
    }

    /// Whether an FPD field on the way to `pasid`'s entry for `rid` (context entry, PASID
    /// directory entry, PASID entry) disables fault recording. An entry that cannot be
    /// read disables nothing below it.
    fn fault_processing_disabled(&self, rid: SourceId, pasid: Pasid) -> bool {
        let Some(rta) = self.scalable_root() else {
            return false;
        };
        let ctx = match read_context_entry(&self.mem, rta, rid, &self.entry_checks) {
            Ok(ctx) => ctx,
            Err(f) => return f.fpd,
        };
        let pde = match read_pasid_dir_entry(&self.mem, &ctx, pasid, &self.entry_checks) {
            Ok(pde) => pde,
            Err(f) => return f.fpd,
        };
        match read_pasid_entry(&self.mem, &ctx, pasid, &self.entry_checks) {
            Ok(entry) => ctx.fpd || pde.fpd || entry.fpd(),
            Err(f) => f.fpd,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(reason: UnrecoverableReason, perm: [bool; 4]) -> UnrecoverableFault {
        UnrecoverableFault {
            reason,
            pasid: Some(Pasid::new(5).unwrap()),
            read: perm[0],
            write: perm[1],
            exec: perm[2],
            privileged: perm[3],
            addr: Some(0x1000),
            fetch_addr: None,
        }
    }

    #[test]
    fn generic_reasons_map_to_first_level_codes() {
        use UnrecoverableReason::*;
        let r = |reason, perm| vtd_reason(&fault(reason, perm)).map(|r| r.code());
        assert_eq!(r(PteFetch, [true, false, false, false]), Some(0x71));
        assert_eq!(r(WalkEabt, [true, false, false, false]), Some(0x70));
        assert_eq!(r(Access, [false, true, false, false]), Some(0x91));
        assert_eq!(r(OorAddress, [true, false, false, false]), Some(0x83));
        assert_eq!(r(Permission, [true, false, true, false]), Some(0x82));
        assert_eq!(r(Permission, [false, true, false, true]), Some(0x85));
        assert_eq!(r(Permission, [true, false, false, false]), Some(0x81));
        assert_eq!(r(Permission, [true, false, false, true]), Some(0x86));
        for reason in [Unknown, PasidFetch, BadPasidEntry, PasidInvalid] {
            assert_eq!(r(reason, [true, false, false, false]), None, "{reason:?}");
        }
    }
}
