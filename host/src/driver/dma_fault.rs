//! Unrecoverable faults of guest page tables (issue 13 §4): which faults the unit records
//! (VT-d §7.1.3, §10.4.14) belong to the guest that bound the PASID, and the
//! `iommu_fault_unrecoverable` record the driver reports to that guest's container.
//!
//! The faults reported are those of the first level, the guest's own tables: a missing or
//! malformed first-level entry, an access it does not permit, an input address outside it.
//! Faults of what the host programmed (context and PASID entries, the second level and the
//! nested second-level checks SFL.6–SFL.9, SGN.5, SGN.8) stay in the host's log: the guest
//! cannot see or fix them, and reporting them would tell it about the host's tables.

use vsva_uapi::{request::UnrecoverableFault, request::UnrecoverableReason};
use vsva_vtd::fault::FaultReason;
use vsva_vtd::regs::{FaultRecord, RequestType};

/// The generic reason of a first-level fault condition, or `None` for a fault that is not
/// the guest's.
fn guest_reason(reason: FaultReason) -> Option<UnrecoverableReason> {
    use FaultReason::*;
    Some(match reason {
        Sfl1 | Sfl4 => UnrecoverableReason::WalkEabt,
        Sfl2 | Sfl3 => UnrecoverableReason::PteFetch,
        Sfl10 => UnrecoverableReason::Access,
        Sfl5 | Sgn1 | Sgn4 => UnrecoverableReason::OorAddress,
        Sgn2 | Sgn3 | Sgn6 | Sgn7 => UnrecoverableReason::Permission,
        _ => return None,
    })
}

/// The record reported to the owner of the fault's PASID, when the fault is a first-level
/// fault of an untranslated or translation request with a PASID: the reason, the PASID, the
/// page address (FI) and the request's permissions (T, EXE, PRIV).
pub(crate) fn guest_fault(record: &FaultRecord) -> Option<UnrecoverableFault> {
    let reason = guest_reason(FaultReason::from_code(record.reason)?)?;
    let pasid = record.pasid?;
    Some(UnrecoverableFault {
        reason,
        pasid: Some(pasid),
        read: record.request == RequestType::Read,
        write: record.request == RequestType::Write,
        exec: record.exe,
        privileged: record.privileged,
        addr: Some(record.fault_info & !0xfff),
        fetch_addr: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsva_vtd::regs::AddressType;
    use vsva_vtd::{addr::Pasid, addr::SourceId};

    fn record(reason: FaultReason, pasid: Option<Pasid>) -> FaultRecord {
        FaultRecord {
            fault_info: 0x7f_1234_5000,
            sid: SourceId::from_rid(0x100),
            reason: reason.code(),
            pasid,
            exe: false,
            privileged: true,
            request: RequestType::Write,
            address_type: AddressType::Untranslated,
        }
    }

    #[test]
    fn only_first_level_faults_with_a_pasid_are_the_guests() {
        let pasid = Pasid::new(9).unwrap();
        let reported: Vec<FaultReason> = FaultReason::ALL
            .iter()
            .copied()
            .filter(|&r| guest_fault(&record(r, Some(pasid))).is_some())
            .collect();
        use FaultReason::*;
        assert_eq!(
            reported,
            [Sfl1, Sfl2, Sfl3, Sfl4, Sfl5, Sfl10, Sgn1, Sgn2, Sgn3, Sgn4, Sgn6, Sgn7]
        );
        // Without a PASID there is no guest table and no owner to report to.
        assert!(FaultReason::ALL
            .iter()
            .all(|&r| guest_fault(&record(r, None)).is_none()));
        // An undefined reason code is not reported either.
        let mut bad = record(Sfl2, Some(pasid));
        bad.reason = 0xff;
        assert_eq!(guest_fault(&bad), None);
    }

    #[test]
    fn the_record_carries_reason_pasid_address_and_permissions() {
        let pasid = Pasid::new(9).unwrap();
        let f = guest_fault(&record(FaultReason::Sgn6, Some(pasid))).unwrap();
        assert_eq!(
            f,
            UnrecoverableFault {
                reason: UnrecoverableReason::Permission,
                pasid: Some(pasid),
                read: false,
                write: true,
                exec: false,
                privileged: true,
                addr: Some(0x7f_1234_5000),
                fetch_addr: None,
            }
        );
        assert_eq!(
            guest_fault(&record(FaultReason::Sfl2, Some(pasid))).map(|f| f.reason),
            Some(UnrecoverableReason::PteFetch)
        );
    }
}
