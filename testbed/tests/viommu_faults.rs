//! Unrecoverable faults the host reports for a passthrough device (issue 13 §4): recorded
//! in the guest's fault recording registers with the guest's requester id and the VT-d
//! reason, under the guest's FPD fields and the registers' overflow rule; refused for a
//! device, PASID or reason that is not the guest's.

mod viommu;

use std::sync::Arc;

use viommu::*;
use vsva_uapi::{request::UnrecoverableFault, request::UnrecoverableReason};
use vsva_vmm::{HostFaultOutcome, VIommuError};
use vsva_vtd::regs::layout::{fsts, offset};
use vsva_vtd::regs::{AddressType, EventSource, FaultOutcome, FaultRecord, RequestType};
use vsva_vtd::{addr::Pasid, addr::SourceId, fault::FaultReason, flpte::FlPagingMode};

const HOST_SID: SourceId = SourceId::from_rid(0x8100);

fn setup() -> (Arc<MockHost>, Guest, SourceId, Pasid) {
    let host = MockHost::new();
    let g = Guest::new(host.clone());
    g.enable();
    let dev = sid(0, 3, 0);
    g.viommu
        .attach_passthrough(dev, HOST_SID, host.clone())
        .unwrap();
    g.attach(dev, true);
    let p = g.alloc_pasid();
    g.set_pasid_entry(
        dev,
        p,
        Some(fl_entry(1, 0x10_0000, FlPagingMode::FourLevel)),
    );
    g.take_irqs();
    (host, g, dev, p)
}

fn fault(p: Pasid, page: u64) -> UnrecoverableFault {
    UnrecoverableFault {
        reason: UnrecoverableReason::PteFetch,
        pasid: Some(p),
        read: false,
        write: true,
        exec: false,
        privileged: false,
        addr: Some(page << 12),
        fetch_addr: None,
    }
}

fn record(g: &Guest, i: u64) -> (FaultRecord, bool) {
    let base = g.viommu.config().cap().fault_recording_offset() + 16 * i;
    let raw = [g.read(base, 8), g.read(base + 8, 8)];
    (
        FaultRecord::from_raw(raw).unwrap(),
        raw[1] & vsva_vtd::regs::FRCD_F != 0,
    )
}

#[test]
fn a_host_fault_is_recorded_with_the_guest_requester_id_and_an_interrupt() {
    let (_host, g, dev, p) = setup();
    g.write(offset::FEDATA, 4, 0x42);
    g.write(offset::FECTL, 4, 0); // unmask the fault event
    let out = g
        .viommu
        .inject_host_fault(HOST_SID, &fault(p, 0x7f001))
        .unwrap();
    assert_eq!(out, HostFaultOutcome::Recorded(FaultOutcome::Recorded(0)));
    assert_eq!(
        record(&g, 0),
        (
            FaultRecord {
                fault_info: 0x7f00_1000,
                sid: dev,
                reason: FaultReason::Sfl2.code(),
                pasid: Some(p),
                exe: false,
                privileged: false,
                request: RequestType::Write,
                address_type: AddressType::Untranslated,
            },
            true
        )
    );
    assert_ne!(g.read(offset::FSTS, 4) as u32 & fsts::PPF, 0);
    let irqs = g.take_irqs();
    assert_eq!(irqs.len(), 1, "{irqs:?}");
    assert_eq!(irqs[0].source, EventSource::Fault);
}

#[test]
fn faults_that_are_not_the_guests_are_refused_and_record_nothing() {
    let (_host, g, _dev, p) = setup();
    let other_device = SourceId::from_rid(0x8200);
    assert!(matches!(
        g.viommu.inject_host_fault(other_device, &fault(p, 1)),
        Err(VIommuError::NotAttached(s)) if s == other_device
    ));
    let not_held = Pasid::new(p.raw() + 1).unwrap();
    let mut no_pasid = fault(p, 1);
    no_pasid.pasid = None;
    let mut no_addr = fault(p, 1);
    no_addr.addr = None;
    let mut host_table = fault(p, 1);
    host_table.reason = UnrecoverableReason::BadPasidEntry;
    for f in [fault(not_held, 1), no_pasid, no_addr, host_table] {
        assert!(
            matches!(
                g.viommu.inject_host_fault(HOST_SID, &f),
                Err(VIommuError::HostFault { sid, .. }) if sid == HOST_SID
            ),
            "{f:?}"
        );
    }
    assert_eq!(g.read(offset::FSTS, 4) as u32 & fsts::PPF, 0);
    assert!(g.take_irqs().is_empty());
    assert_eq!(g.viommu.stats().faults_recorded, 0);
}

#[test]
fn an_fpd_field_of_the_guest_disables_recording() {
    let (_host, g, dev, p) = setup();
    let mut entry = fl_entry(1, 0x10_0000, FlPagingMode::FourLevel);
    entry.fpd = true;
    g.set_pasid_entry(dev, p, Some(entry));
    assert_eq!(
        g.viommu.inject_host_fault(HOST_SID, &fault(p, 1)).unwrap(),
        HostFaultOutcome::Disabled
    );
    assert_eq!(g.read(offset::FSTS, 4) as u32 & fsts::PPF, 0);
    assert!(g.take_irqs().is_empty());
}

#[test]
fn a_flood_of_host_faults_overflows_and_is_lost() {
    let (_host, g, _dev, p) = setup();
    let n = g.viommu.config().cap().fault_recording_count() as u64;
    for i in 0..n {
        assert_eq!(
            g.viommu.inject_host_fault(HOST_SID, &fault(p, i)).unwrap(),
            HostFaultOutcome::Recorded(FaultOutcome::Recorded(i as usize))
        );
    }
    assert_eq!(
        g.viommu.inject_host_fault(HOST_SID, &fault(p, n)).unwrap(),
        HostFaultOutcome::Recorded(FaultOutcome::Overflow)
    );
    for i in n + 1..n + 100 {
        assert_eq!(
            g.viommu.inject_host_fault(HOST_SID, &fault(p, i)).unwrap(),
            HostFaultOutcome::Recorded(FaultOutcome::Dropped)
        );
    }
    let status = g.read(offset::FSTS, 4) as u32;
    assert_eq!(status & (fsts::PPF | fsts::PFO), fsts::PPF | fsts::PFO);
    // The registers hold the first n, nothing was overwritten.
    for i in 0..n {
        assert_eq!(record(&g, i).0.fault_info, i << 12);
    }
}
