//! Which SMMU event records are the guest's, and the `iommu_fault` record each becomes
//! (the nested-stage series' `arm_smmu_handle_evt` for nested domains): faults of the
//! guest's own configuration and stage 1, for a transaction with a SubstreamID. A stage-2
//! fault (S2 = 1: the IPA, a CD or a stage-1 table fetched through stage 2) is the host's
//! and is not forwarded, nor is anything without a SubstreamID.

use vsva_smmuv3::{event::Event, event::EventType};
use vsva_uapi::request::{UnrecoverableFault, UnrecoverableReason};
use vsva_vtd::addr::Pasid;

/// The guest's unrecoverable fault for `event`, if the guest owns it.
pub(crate) fn guest_fault(event: &Event) -> Option<UnrecoverableFault> {
    use UnrecoverableReason as R;
    if event.s2 {
        return None;
    }
    // F_WALK_EABT and F_CD_FETCH carry FetchAddr, the physical address of the failed
    // fetch after stage 2 (IHI 0070 §7.3, the two records): a host physical address, which a
    // VM must not learn, so the record goes out without a fetch address.
    let (reason, addr) = match event.event_type {
        EventType::Translation => (R::PteFetch, Some(event.input_addr & !0xfff)),
        EventType::AddrSize => (R::OorAddress, Some(event.input_addr & !0xfff)),
        EventType::Access => (R::Access, Some(event.input_addr & !0xfff)),
        EventType::Permission => (R::Permission, Some(event.input_addr & !0xfff)),
        EventType::WalkEabt => (R::WalkEabt, Some(event.input_addr & !0xfff)),
        EventType::BadSubstreamId => (R::PasidInvalid, None),
        EventType::CdFetch => (R::PasidFetch, None),
        EventType::BadCd => (R::BadPasidEntry, None),
        _ => return None,
    };
    let pasid = Pasid::new(event.ssid?).ok()?;
    Some(UnrecoverableFault {
        reason,
        pasid: Some(pasid),
        read: event.rnw,
        write: !event.rnw,
        exec: event.ind,
        privileged: event.pnu,
        addr,
        fetch_addr: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsva_smmuv3::walk::FaultClass;

    #[test]
    fn stage1_faults_with_a_substream_are_the_guests() {
        let write = |t: EventType, s2: bool, ssid: Option<u32>| Event {
            rnw: false,
            s2,
            class: FaultClass::Tt,
            input_addr: 0x7f00_1234_5678,
            addr2: 0x8_0000_1000,
            ..Event::new(t, 9, ssid)
        };
        let f = guest_fault(&write(EventType::Translation, false, Some(3))).unwrap();
        assert_eq!(f.reason, UnrecoverableReason::PteFetch);
        assert_eq!(f.pasid, Some(Pasid::new(3).unwrap()));
        assert_eq!(f.addr, Some(0x7f00_1234_5000));
        assert!(f.write && !f.read);
        for (t, r) in [
            (EventType::Permission, UnrecoverableReason::Permission),
            (EventType::Access, UnrecoverableReason::Access),
            (EventType::AddrSize, UnrecoverableReason::OorAddress),
            (EventType::BadCd, UnrecoverableReason::BadPasidEntry),
            (EventType::CdFetch, UnrecoverableReason::PasidFetch),
            (EventType::BadSubstreamId, UnrecoverableReason::PasidInvalid),
        ] {
            assert_eq!(guest_fault(&write(t, false, Some(1))).unwrap().reason, r);
        }
        // A fetch address is a host physical address: never forwarded.
        for t in [EventType::WalkEabt, EventType::CdFetch] {
            assert_eq!(
                guest_fault(&write(t, false, Some(1))).unwrap().fetch_addr,
                None
            );
        }
        // Stage 2, no SubstreamID, and the host's own configuration are not forwarded.
        assert_eq!(
            guest_fault(&write(EventType::Translation, true, Some(3))),
            None
        );
        assert_eq!(
            guest_fault(&write(EventType::Translation, false, None)),
            None
        );
        assert_eq!(guest_fault(&write(EventType::BadSte, false, Some(3))), None);
    }
}
