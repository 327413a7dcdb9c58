//! Passthrough devices: guest PASID entries shadowed into bind/unbind calls, and guest
//! invalidations turned into host cache invalidations.

mod viommu;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use vsva_mem::PhysMem;

use proptest::prelude::*;
use viommu::*;
use vsva_uapi::iommu::*;
use vsva_uapi::{request::BindGpasid, request::CacheInvalidate, request::InvGranularity};
use vsva_vmm::{
    bind_data, host_invalidations, refusal, Binding, HostCall, Refusal, VIommuConfig, VIommuError,
};
use vsva_vtd::inv_desc::{
    ContextCacheGranularity, IotlbGranularity, PasidCacheGranularity, PasidIotlbGranularity,
};
use vsva_vtd::regs::layout::{fsts, offset};
use vsva_vtd::regs::{Cap, EventSource, FaultRecord, RequestType, FRCD_F};
use vsva_vtd::{
    addr::DomainId, addr::Gpa, addr::Pasid, addr::SourceId, fault::FaultReason,
    flpte::FlPagingMode, inv_desc::AddrRange, inv_desc::InvDesc,
};

/// Attaches `dev` as a passthrough of the host device `host_sid` and gives it a
/// scalable-mode context entry with page requests enabled.
fn attach(g: &Guest, host: &Arc<MockHost>, dev: SourceId, host_sid: SourceId) {
    g.viommu
        .attach_passthrough(dev, host_sid, host.clone())
        .unwrap();
    g.attach(dev, true);
}

fn setup() -> (Arc<MockHost>, Guest, SourceId) {
    let host = MockHost::new();
    let g = Guest::new(host.clone());
    g.enable();
    let dev = sid(0, 3, 0);
    attach(&g, &host, dev, sid(0x81, 0, 0));
    host.watch(g.mem.clone());
    (host, g, dev)
}

fn pasid_cache(did: u16, p: Pasid) -> InvDesc {
    InvDesc::PasidCache {
        granularity: PasidCacheGranularity::PasidSelective,
        did: DomainId(did),
        pasid: p,
    }
}

/// Binds a fresh guest PASID with domain `did` on `dev`; returns it and its CR3.
fn bound_pasid(g: &Guest, host: &MockHost, dev: SourceId, did: u16) -> (Pasid, u64) {
    let p = g.alloc_pasid();
    let cr3 = g.alloc_frame();
    g.set_pasid_entry(dev, p, Some(fl_entry(did, cr3, FlPagingMode::FourLevel)));
    assert!(g.submit_sync(&[pasid_cache(did, p)]));
    assert_eq!(host.take(), vec![Call::Alloc(p), Call::Bind(bind(p, cr3))]);
    (p, cr3)
}

fn iotlb_pasid(p: Pasid) -> Call {
    Call::Invalidate(CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity: InvGranularity::Pasid {
            pasid: Some(p),
            archid: None,
        },
    })
}

fn addr_inv(cache: u8, p: Pasid, addr: u64, nb_granules: u64, leaf: bool) -> Call {
    Call::Invalidate(CacheInvalidate {
        cache,
        granularity: InvGranularity::Addr {
            pasid: Some(p),
            archid: None,
            addr,
            granule_size: 4096,
            nb_granules,
            leaf,
        },
    })
}

fn half(cache: u8, p: Pasid, addr: u64) -> Call {
    Call::Invalidate(CacheInvalidate {
        cache,
        granularity: InvGranularity::Addr {
            pasid: Some(p),
            archid: None,
            addr,
            granule_size: 1 << 63,
            nb_granules: 1,
            leaf: false,
        },
    })
}

#[test]
fn a_first_level_entry_is_bound_when_the_guest_flushes_it() {
    let (host, g, dev) = setup();
    let p = g.alloc_pasid();
    let cr3 = g.alloc_frame();
    assert_eq!(host.take(), vec![Call::Alloc(p)]);
    g.set_pasid_entry(dev, p, Some(fl_entry(1, cr3, FlPagingMode::FourLevel)));
    assert!(host.take().is_empty(), "nothing happens before the flush");
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert_eq!(host.take(), vec![Call::Bind(bind(p, cr3))]);
    assert_eq!(
        g.viommu.bindings(dev).unwrap(),
        vec![(
            p,
            Binding {
                bind: bind(p, cr3),
                did: DomainId(1),
                wpe: false
            }
        )]
    );
    // The same entry flushed again: already bound.
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert!(host.take().is_empty());

    // A new page table: unbind, then bind.
    let cr3b = g.alloc_frame();
    g.set_pasid_entry(dev, p, Some(fl_entry(1, cr3b, FlPagingMode::FourLevel)));
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert_eq!(
        host.take(),
        vec![Call::Unbind(bind(p, cr3)), Call::Bind(bind(p, cr3b))]
    );

    // Cleared: unbind.
    g.set_pasid_entry(dev, p, None);
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert_eq!(host.take(), vec![Call::Unbind(bind(p, cr3b))]);
    assert!(g.viommu.bindings(dev).unwrap().is_empty());
    let stats = g.viommu.stats();
    assert_eq!((stats.binds, stats.unbinds), (2, 2));
}

#[test]
fn bind_data_carries_the_entry_attributes() {
    let mut e = fl_entry(7, 0x1234_5000, FlPagingMode::FiveLevel);
    (e.sre, e.eafe, e.pcd, e.pwt, e.emte, e.cd) = (true, true, true, true, true, true);
    (e.pat, e.emt) = (0x0007_0406, 6);
    let b = bind_data(pasid(9), &e);
    assert_eq!(
        b,
        BindGpasid {
            hpasid: pasid(9),
            gpasid: Some(pasid(9)),
            gpgd: Gpa(0x1234_5000),
            addr_width: 57,
            vtd_flags: IOMMU_SVA_VTD_GPASID_SRE
                | IOMMU_SVA_VTD_GPASID_EAFE
                | IOMMU_SVA_VTD_GPASID_PCD
                | IOMMU_SVA_VTD_GPASID_PWT
                | IOMMU_SVA_VTD_GPASID_EMTE
                | IOMMU_SVA_VTD_GPASID_CD,
            pat: 0x0007_0406,
            emt: 6,
        }
    );
    // One flag at a time.
    let plain = fl_entry(7, 0x1000, FlPagingMode::FourLevel);
    assert_eq!(bind_data(pasid(9), &plain).vtd_flags, 0);
    let sre = vsva_vtd::pasid::PasidEntry { sre: true, ..plain };
    assert_eq!(
        bind_data(pasid(9), &sre).vtd_flags,
        IOMMU_SVA_VTD_GPASID_SRE
    );
    let pwt = vsva_vtd::pasid::PasidEntry { pwt: true, ..plain };
    assert_eq!(
        bind_data(pasid(9), &pwt).vtd_flags,
        IOMMU_SVA_VTD_GPASID_PWT
    );

    // Through the vIOMMU, with the capabilities that make those fields valid.
    let host = MockHost::new();
    let g = Guest::with_config(
        host.clone(),
        VIommuConfig {
            eafs: true,
            mts: true,
            ..VIommuConfig::default()
        },
    );
    g.enable();
    let dev = sid(2, 0, 1);
    attach(&g, &host, dev, sid(0x81, 0, 0));
    let p = g.alloc_pasid();
    let e = vsva_vtd::pasid::PasidEntry {
        flptptr: g.alloc_frame(),
        ..e
    };
    g.set_pasid_entry(dev, p, Some(e));
    assert!(g.submit_sync(&[pasid_cache(7, p)]));
    assert_eq!(
        host.take(),
        vec![Call::Alloc(p), Call::Bind(bind_data(p, &e))]
    );
}

#[test]
fn entries_the_unit_does_not_offer_are_not_bound() {
    let (host, g, dev) = setup();
    let p = g.alloc_pasid();
    host.take();
    // Memory-type fields without ECAP.MTS: reserved, the entry is invalid.
    let e = vsva_vtd::pasid::PasidEntry {
        pcd: true,
        ..fl_entry(1, g.alloc_frame(), FlPagingMode::FourLevel)
    };
    g.set_pasid_entry(dev, p, Some(e));
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    // Nested and pass-through are not offered to the guest.
    for pgtt in [
        vsva_vtd::pasid::Pgtt::Nested,
        vsva_vtd::pasid::Pgtt::PassThrough,
    ] {
        let e = vsva_vtd::pasid::PasidEntry {
            pgtt,
            ..fl_entry(1, g.alloc_frame(), FlPagingMode::FourLevel)
        };
        g.set_pasid_entry(dev, p, Some(e));
        assert!(g.submit_sync(&[pasid_cache(1, p)]));
    }
    // RID_PASID, which requests without PASID use, stays with the host's second level.
    g.set_pasid_entry(
        dev,
        Pasid::RID_PASID,
        Some(fl_entry(1, g.alloc_frame(), FlPagingMode::FourLevel)),
    );
    assert!(g.submit_sync(&[
        pasid_cache(1, Pasid::RID_PASID),
        InvDesc::PasidCache {
            granularity: PasidCacheGranularity::Global,
            did: DomainId(0),
            pasid: Pasid::RID_PASID,
        }
    ]));
    assert!(host.take().is_empty());
}

/// The fault recording register `i`, if its F bit is set.
fn fault_record(g: &Guest, i: u64) -> Option<FaultRecord> {
    let frcd = Cap::from_raw(g.read(offset::CAP, 8)).fault_recording_offset() + 16 * i;
    let raw = [g.read(frcd, 8), g.read(frcd + 8, 8)];
    (raw[1] & FRCD_F != 0).then(|| FaultRecord::from_raw(raw).unwrap())
}

#[test]
fn entries_the_host_entry_cannot_reproduce_are_refused_with_a_fault() {
    let (host, g, dev) = setup();
    let (p, cr3) = bound_pasid(&g, &host, dev, 1);
    let plain = fl_entry(1, cr3, FlPagingMode::FourLevel);
    g.write(offset::FECTL, 4, 0);

    // SRE and WPE: the bind data has no WPE, and SRE without it would let supervisor
    // writes through read-only pages. What was bound goes; nothing replaces it.
    let wpe = vsva_vtd::pasid::PasidEntry {
        sre: true,
        wpe: true,
        ..plain
    };
    assert_eq!(refusal(&wpe), Some(Refusal::SupervisorWriteProtect));
    g.set_pasid_entry(dev, p, Some(wpe));
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert_eq!(host.take(), vec![Call::Unbind(bind(p, cr3))]);
    assert!(g.viommu.bindings(dev).unwrap().is_empty());
    // The guest sees why: SPT.4 for the device and PASID, with an interrupt.
    let rec = fault_record(&g, 0).expect("a fault is recorded");
    assert_eq!(
        (rec.sid, rec.pasid, rec.reason),
        (dev, Some(p), FaultReason::Spt4.code())
    );
    assert!(rec.privileged && rec.request == RequestType::Write && !rec.exe);
    assert_ne!(g.read(offset::FSTS, 4) as u32 & fsts::PPF, 0);
    assert!(g.take_irqs().iter().any(|i| i.source == EventSource::Fault));
    // Flushed again, still refused: no host call, one more fault.
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert!(host.take().is_empty());
    assert!(fault_record(&g, 1).is_some());

    // ERE: the host entry's ERE is clear, execute requests the guest allowed would fault.
    let ere = vsva_vtd::pasid::PasidEntry { ere: true, ..plain };
    assert_eq!(refusal(&ere), Some(Refusal::ExecuteRequests));
    g.set_pasid_entry(dev, p, Some(ere));
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert!(host.take().is_empty());
    let rec = fault_record(&g, 2).expect("a fault is recorded");
    assert_eq!(rec.reason, FaultReason::Spt4.code());
    assert!(rec.exe && !rec.privileged && rec.request == RequestType::Read);
    let stats = g.viommu.stats();
    assert_eq!((stats.entries_refused, stats.faults_recorded), (3, 3));
    assert_eq!(stats.host_errors, 0);

    // With FPD set the refusal stays, the fault is not reported (§7.1.1).
    let quiet = vsva_vtd::pasid::PasidEntry { fpd: true, ..wpe };
    g.set_pasid_entry(dev, p, Some(quiet));
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert!(host.take().is_empty());
    assert!(fault_record(&g, 3).is_none());
    assert_eq!(g.viommu.stats().entries_refused, 4);
    assert_eq!(g.viommu.stats().faults_recorded, 3);

    // What the host entry does reproduce is bound: SRE without WPE (supervisor writes
    // ignore R/W on both sides), and NXE/SMEP, which only execute requests see, and those
    // ERE clear refuses on both sides.
    for e in [
        vsva_vtd::pasid::PasidEntry { sre: true, ..plain },
        vsva_vtd::pasid::PasidEntry {
            wpe: true,
            smep: true,
            nxe: false,
            ..plain
        },
    ] {
        assert_eq!(refusal(&e), None);
        g.set_pasid_entry(dev, p, Some(e));
        assert!(g.submit_sync(&[pasid_cache(1, p)]));
        let bound = g.viommu.bindings(dev).unwrap();
        assert_eq!(bound.len(), 1);
        assert_eq!(bound[0].1.bind, bind_data(p, &e));
        host.take();
    }
    assert_eq!(g.viommu.stats().entries_refused, 4);
}

/// Each field docs/fidelity.md lists as making the entry invalid for this vIOMMU: the
/// entry is not bound and the host is not asked; the same PASID with a plain entry is.
#[test]
fn each_field_the_unit_does_not_offer_keeps_the_entry_unbound() {
    let host = MockHost::new();
    let g = Guest::with_config(
        host.clone(),
        VIommuConfig {
            fl5lp: false,
            ..VIommuConfig::default()
        },
    );
    g.enable();
    let dev = sid(0, 3, 0);
    attach(&g, &host, dev, sid(0x81, 0, 0));
    let p = g.alloc_pasid();
    host.take();
    let plain = fl_entry(1, g.alloc_frame(), FlPagingMode::FourLevel);
    let invalid = [
        (
            "SLADE without SLADS",
            vsva_vtd::pasid::PasidEntry {
                slade: true,
                ..plain
            },
        ),
        (
            "PWSNP without SMPWC",
            vsva_vtd::pasid::PasidEntry {
                pwsnp: true,
                ..plain
            },
        ),
        (
            "PGSNP without SC",
            vsva_vtd::pasid::PasidEntry {
                pgsnp: true,
                ..plain
            },
        ),
        (
            "EAFE without EAFS",
            vsva_vtd::pasid::PasidEntry {
                eafe: true,
                ..plain
            },
        ),
        (
            "PAT without MTS",
            vsva_vtd::pasid::PasidEntry { pat: 6, ..plain },
        ),
        (
            "second level",
            vsva_vtd::pasid::PasidEntry {
                pgtt: vsva_vtd::pasid::Pgtt::SecondLevel,
                ..plain
            },
        ),
        (
            "5-level without FL5LP",
            vsva_vtd::pasid::PasidEntry {
                flpm: FlPagingMode::FiveLevel,
                ..plain
            },
        ),
        (
            "FLPTPTR beyond the guest address width",
            vsva_vtd::pasid::PasidEntry {
                flptptr: 1 << 48,
                ..plain
            },
        ),
    ];
    for (what, e) in invalid {
        g.set_pasid_entry(dev, p, Some(e));
        assert!(g.submit_sync(&[pasid_cache(1, p)]));
        assert!(host.take().is_empty(), "{what}");
        assert!(g.viommu.bindings(dev).unwrap().is_empty(), "{what}");
    }
    // A reserved bit (q0 bit 10).
    g.set_pasid_entry(dev, p, Some(plain));
    let slot = g.pasid_slot(dev, p);
    g.mem.write_u64(slot, plain.to_raw()[0] | 1 << 10).unwrap();
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert!(host.take().is_empty());
    // The plain entry is bound: the PASID itself was never the reason.
    g.set_pasid_entry(dev, p, Some(plain));
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert_eq!(host.take(), vec![Call::Bind(bind_data(p, &plain))]);
    assert_eq!(g.viommu.stats().entries_refused, 0);
}

#[test]
fn domain_and_global_flushes_revalidate_the_pasids_the_vm_holds() {
    let (host, g, dev) = setup();
    let [a, b, c] = [g.alloc_pasid(), g.alloc_pasid(), g.alloc_pasid()];
    // A PASID in another PASID table of the directory.
    host.next_pasid(64 * 5 + 3);
    let far = g.alloc_pasid();
    assert_eq!(far, pasid(64 * 5 + 3));
    host.take();
    let cr3 = [g.alloc_frame(), g.alloc_frame(), g.alloc_frame()];
    g.set_pasid_entry(dev, a, Some(fl_entry(1, cr3[0], FlPagingMode::FourLevel)));
    g.set_pasid_entry(dev, b, Some(fl_entry(2, cr3[1], FlPagingMode::FourLevel)));
    g.set_pasid_entry(dev, far, Some(fl_entry(1, cr3[2], FlPagingMode::FourLevel)));
    // Valid entries of PASIDs the VM was never given: the host would refuse them, so
    // no flush asks it (a PASID of another table, and one next to `a`).
    for other in [pasid(64 * 9 + 1), pasid(a.raw() + 10)] {
        g.set_pasid_entry(
            dev,
            other,
            Some(fl_entry(1, g.alloc_frame(), FlPagingMode::FourLevel)),
        );
        assert!(g.submit_sync(&[pasid_cache(1, other)]));
    }
    // A PASID-selective flush of the wrong domain, and a domain with no entries: nothing.
    assert!(g.submit_sync(&[
        pasid_cache(2, a),
        InvDesc::PasidCache {
            granularity: PasidCacheGranularity::DomainSelective,
            did: DomainId(3),
            pasid: c,
        }
    ]));
    assert!(host.take().is_empty());
    // Domain 1: a and far.
    assert!(g.submit_sync(&[InvDesc::PasidCache {
        granularity: PasidCacheGranularity::DomainSelective,
        did: DomainId(1),
        pasid: c,
    }]));
    assert_eq!(
        host.take(),
        vec![Call::Bind(bind(a, cr3[0])), Call::Bind(bind(far, cr3[2]))]
    );
    // Global: b as well; a cleared entry of domain 1 goes.
    g.set_pasid_entry(dev, a, None);
    assert!(g.submit_sync(&[InvDesc::PasidCache {
        granularity: PasidCacheGranularity::Global,
        did: DomainId(0),
        pasid: c,
    }]));
    assert_eq!(
        host.take(),
        vec![Call::Unbind(bind(a, cr3[0])), Call::Bind(bind(b, cr3[1]))]
    );
    let bound: Vec<_> = g
        .viommu
        .bindings(dev)
        .unwrap()
        .into_iter()
        .map(|(p, b)| (p, b.did))
        .collect();
    assert_eq!(bound, vec![(b, DomainId(2)), (far, DomainId(1))]);
}

#[test]
fn a_refused_bind_is_reported_and_retried_on_the_next_flush() {
    let (host, g, dev) = setup();
    let p = g.alloc_pasid();
    host.take();
    let cr3 = g.alloc_frame();
    g.set_pasid_entry(dev, p, Some(fl_entry(1, cr3, FlPagingMode::FourLevel)));
    host.refuse_bind.store(true, Ordering::Relaxed);
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert!(g.viommu.bindings(dev).unwrap().is_empty());
    let errors = g.viommu.take_host_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].call, HostCall::Bind(bind(p, cr3)));
    assert_eq!(g.viommu.stats().host_errors, 1);
    host.refuse_bind.store(false, Ordering::Relaxed);
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert_eq!(host.take(), vec![Call::Bind(bind(p, cr3))]);
}

#[test]
fn a_device_the_guest_takes_away_loses_its_bindings() {
    let (host, g, dev) = setup();
    let other = sid(0, 4, 0);
    attach(&g, &host, other, sid(0x82, 0, 0));
    let (p, cr3) = bound_pasid(&g, &host, dev, 1);
    let q = g.alloc_pasid();
    let cr3q = g.alloc_frame();
    g.set_pasid_entry(other, q, Some(fl_entry(1, cr3q, FlPagingMode::FourLevel)));
    assert!(g.submit_sync(&[pasid_cache(1, q)]));
    host.take();
    // The guest clears the context entry of `dev` and flushes it device-selectively.
    g.write_context(dev, None);
    assert!(g.submit_sync(&[InvDesc::ContextCache {
        granularity: ContextCacheGranularity::DeviceSelective,
        did: DomainId(0),
        sid: dev,
        fm: 0,
    }]));
    assert_eq!(host.take(), vec![Call::Unbind(bind(p, cr3))]);
    assert_eq!(g.viommu.bindings(other).unwrap().len(), 1);
    // Detaching the other device unbinds what it had.
    g.viommu.detach_passthrough(other).unwrap();
    assert_eq!(host.take(), vec![Call::Unbind(bind(q, cr3q))]);
    assert!(matches!(
        g.viommu.bindings(other),
        Err(VIommuError::NotAttached(_))
    ));
    assert!(matches!(
        g.viommu.detach_passthrough(other),
        Err(VIommuError::NotAttached(_))
    ));
    assert!(matches!(
        g.viommu
            .attach_passthrough(dev, sid(0x99, 0, 0), host.clone()),
        Err(VIommuError::AlreadyAttached(_))
    ));
    assert!(matches!(
        g.viommu
            .attach_passthrough(other, sid(0x81, 0, 0), host.clone()),
        Err(VIommuError::HostDeviceAttached(_))
    ));
}

#[test]
fn freeing_a_bound_pasid_unbinds_it_first() {
    let (host, g, dev) = setup();
    let (p, cr3) = bound_pasid(&g, &host, dev, 1);
    let cmd = (p.raw() as u64) << 8 | 2;
    assert_eq!(g.vcmd(cmd), 0);
    assert_eq!(host.take(), vec![Call::Unbind(bind(p, cr3)), Call::Free(p)]);
    assert!(g.viommu.bindings(dev).unwrap().is_empty());
}

#[test]
fn invalidations_become_host_invalidations_of_the_bound_pasids() {
    let (host, g, dev) = setup();
    let (p, _) = bound_pasid(&g, &host, dev, 1);
    let (q, _) = bound_pasid(&g, &host, dev, 2);
    let unbound = pasid(0x777);
    let piotlb = |did: u16, pasid: Pasid, g: PasidIotlbGranularity, addr: u64, am: u8, ih| {
        InvDesc::PasidIotlb {
            granularity: g,
            did: DomainId(did),
            pasid,
            addr,
            ih,
            am,
        }
    };
    let cases: Vec<(InvDesc, Vec<Call>)> = vec![
        (
            piotlb(1, p, PasidIotlbGranularity::PasidSelective, 0, 0, false),
            vec![iotlb_pasid(p)],
        ),
        (
            piotlb(
                1,
                p,
                PasidIotlbGranularity::PageSelectiveWithinPasid,
                0x7000_3000,
                2,
                true,
            ),
            vec![addr_inv(
                IOMMU_CACHE_INV_TYPE_IOTLB,
                p,
                0x7000_0000,
                4,
                true,
            )],
        ),
        (
            piotlb(
                2,
                q,
                PasidIotlbGranularity::PageSelectiveWithinPasid,
                0x5000,
                0,
                false,
            ),
            vec![addr_inv(IOMMU_CACHE_INV_TYPE_IOTLB, q, 0x5000, 1, false)],
        ),
        // Another domain's PASID, or one not bound: nothing to forward.
        (
            piotlb(2, p, PasidIotlbGranularity::PasidSelective, 0, 0, false),
            vec![],
        ),
        (
            piotlb(
                1,
                unbound,
                PasidIotlbGranularity::PasidSelective,
                0,
                0,
                false,
            ),
            vec![],
        ),
        (
            InvDesc::global_iotlb(true, true),
            vec![iotlb_pasid(p), iotlb_pasid(q)],
        ),
        (
            InvDesc::Iotlb {
                granularity: IotlbGranularity::DomainSelective,
                dr: true,
                dw: true,
                did: DomainId(2),
                addr: 0,
                ih: false,
                am: 0,
            },
            vec![iotlb_pasid(q)],
        ),
        (
            InvDesc::PasidDevIotlb {
                sid: dev,
                pfsid: dev,
                pasid: p,
                max_invs_pend: 0,
                addr: 0x7000_0000,
                size: false,
                global: false,
            },
            vec![addr_inv(
                IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
                p,
                0x7000_0000,
                1,
                false,
            )],
        ),
        // Page-selective in scalable mode drops the domain's first-level entries whole (and
        // with them p's device TLB: the next case is of q).
        (
            InvDesc::Iotlb {
                granularity: IotlbGranularity::PageSelective,
                dr: true,
                dw: true,
                did: DomainId(1),
                addr: 0x4000,
                ih: false,
                am: 0,
            },
            vec![iotlb_pasid(p)],
        ),
        // S set and bit 12 set, bit 13 clear: 16 KiB.
        (
            InvDesc::PasidDevIotlb {
                sid: dev,
                pfsid: dev,
                pasid: q,
                max_invs_pend: 0,
                addr: 0x7000_1000,
                size: true,
                global: false,
            },
            vec![addr_inv(
                IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
                q,
                0x7000_0000,
                4,
                false,
            )],
        ),
        // G: every bound PASID of the device.
        (
            InvDesc::PasidDevIotlb {
                sid: dev,
                pfsid: dev,
                pasid: p,
                max_invs_pend: 0,
                addr: 0x8000,
                size: false,
                global: true,
            },
            vec![
                addr_inv(IOMMU_CACHE_INV_TYPE_DEV_IOTLB, p, 0x8000, 1, false),
                addr_inv(IOMMU_CACHE_INV_TYPE_DEV_IOTLB, q, 0x8000, 1, false),
            ],
        ),
        // The whole address space has no granule count: its two halves for the device TLB,
        // the whole PASID for the IOTLB.
        (
            InvDesc::PasidDevIotlb {
                sid: dev,
                pfsid: dev,
                pasid: p,
                max_invs_pend: 0,
                addr: 0x7fff_ffff_ffff_f000,
                size: true,
                global: false,
            },
            vec![
                half(IOMMU_CACHE_INV_TYPE_DEV_IOTLB, p, 0),
                half(IOMMU_CACHE_INV_TYPE_DEV_IOTLB, p, 1 << 63),
            ],
        ),
        (
            piotlb(
                1,
                p,
                PasidIotlbGranularity::PageSelectiveWithinPasid,
                0x7000_0000,
                63,
                false,
            ),
            vec![iotlb_pasid(p)],
        ),
        // Another device's device TLB.
        (
            InvDesc::PasidDevIotlb {
                sid: sid(0, 9, 0),
                pfsid: sid(0, 9, 0),
                pasid: p,
                max_invs_pend: 0,
                addr: 0,
                size: false,
                global: false,
            },
            vec![],
        ),
        // Requests without PASID use the host's second level: nothing of the guest's.
        (
            InvDesc::DevIotlb {
                sid: dev,
                pfsid: dev,
                max_invs_pend: 0,
                addr: 0,
                size: false,
            },
            vec![],
        ),
    ];
    let mut forwarded = 0;
    for (desc, want) in cases {
        assert!(g.submit_sync(&[desc]));
        assert_eq!(host.take(), want, "{desc:?}");
        forwarded += want.len() as u64;
    }
    assert_eq!(g.viommu.stats().invalidations_forwarded, forwarded);
}

#[test]
fn the_wait_completes_after_every_host_call_returned() {
    let (host, g, dev) = setup();
    let (p, cr3) = bound_pasid(&g, &host, dev, 1);
    // Linux's teardown: clear the entry, flush the PASID cache, the IOTLB and the device
    // TLB, then wait.
    g.set_pasid_entry(dev, p, None);
    assert!(g.submit_sync(&[pasid_cache(1, p), piotlb(p)]));
    // A new binding and its flushes in one batch.
    let cr3b = g.alloc_frame();
    g.set_pasid_entry(dev, p, Some(fl_entry(1, cr3b, FlPagingMode::FourLevel)));
    assert!(g.submit_sync(&[
        pasid_cache(1, p),
        piotlb(p),
        InvDesc::PasidDevIotlb {
            sid: dev,
            pfsid: dev,
            pasid: p,
            max_invs_pend: 0,
            addr: 0,
            size: false,
            global: false,
        },
    ]));
    let calls = host.take_with_status();
    assert_eq!(
        calls.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>(),
        vec![
            Call::Unbind(bind(p, cr3)),
            Call::Bind(bind(p, cr3b)),
            // The host IOTLB invalidation is inclusive: the device TLB needs no call.
            iotlb_pasid(p),
        ]
    );
    assert!(
        calls.iter().all(|&(_, status)| status == 0),
        "no status write before a host call returned: {calls:?}"
    );
}

fn piotlb(p: Pasid) -> InvDesc {
    InvDesc::PasidIotlb {
        granularity: PasidIotlbGranularity::PasidSelective,
        did: DomainId(1),
        pasid: p,
        addr: 0,
        ih: false,
        am: 0,
    }
}

fn whole_dev_tlb(dev: SourceId, p: Pasid) -> InvDesc {
    InvDesc::PasidDevIotlb {
        sid: dev,
        pfsid: dev,
        pasid: p,
        max_invs_pend: 0,
        addr: 0x7fff_ffff_ffff_f000,
        size: true,
        global: false,
    }
}

#[test]
fn a_device_tlb_flush_right_after_an_inclusive_iotlb_flush_is_not_forwarded() {
    let (host, g, dev) = setup();
    let (p, _) = bound_pasid(&g, &host, dev, 1);
    let (q, _) = bound_pasid(&g, &host, dev, 1);
    let dev_halves = |p| {
        vec![
            half(IOMMU_CACHE_INV_TYPE_DEV_IOTLB, p, 0),
            half(IOMMU_CACHE_INV_TYPE_DEV_IOTLB, p, 1 << 63),
        ]
    };
    // Linux's flush: each descriptor waited for. The PASID-granular host IOTLB
    // invalidation of p covered p's device TLB.
    assert!(g.submit_sync(&[piotlb(p)]));
    assert!(g.submit_sync(&[whole_dev_tlb(dev, p)]));
    assert_eq!(host.take(), vec![iotlb_pasid(p)]);
    // Not q's, and only for the descriptor right after it.
    assert!(g.submit_sync(&[piotlb(p), whole_dev_tlb(dev, q), whole_dev_tlb(dev, p)]));
    assert_eq!(
        host.take(),
        [vec![iotlb_pasid(p)], dev_halves(q), dev_halves(p)].concat()
    );
    // Not across a PASID-cache invalidation.
    assert!(g.submit_sync(&[piotlb(p), pasid_cache(1, q), whole_dev_tlb(dev, p)]));
    assert_eq!(host.take(), [vec![iotlb_pasid(p)], dev_halves(p)].concat());
    // A page-selective IOTLB invalidation covers only its pages.
    let page = InvDesc::PasidIotlb {
        granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
        did: DomainId(1),
        pasid: p,
        addr: 0x1000,
        ih: false,
        am: 0,
    };
    assert!(g.submit_sync(&[page, whole_dev_tlb(dev, p)]));
    assert_eq!(
        host.take(),
        [
            vec![addr_inv(IOMMU_CACHE_INV_TYPE_IOTLB, p, 0x1000, 1, false)],
            dev_halves(p)
        ]
        .concat()
    );
    assert_eq!(g.viommu.stats().invalidations_forwarded, 12);
}

#[test]
fn a_queue_full_of_iotlb_flushes_forwards_each_invalidation_once() {
    let (host, g, dev) = setup();
    let (p, cr3) = bound_pasid(&g, &host, dev, 1);
    let (q, _) = bound_pasid(&g, &host, dev, 1);
    let global = InvDesc::global_iotlb(true, true);
    // 125 IOTLB flushes (global, and PASID-selective of p) in one tail write: each bound
    // PASID's host IOTLB is invalidated once.
    let mut flood = vec![global; 63];
    flood.extend([global, piotlb(p)].repeat(31));
    assert!(g.submit_sync(&flood));
    assert_eq!(host.take(), vec![iotlb_pasid(p), iotlb_pasid(q)]);
    assert_eq!(g.viommu.stats().descriptors, 4 + 125 + 1);
    // The next tail write is a new pass.
    assert!(g.submit_sync(&[global]));
    assert_eq!(host.take(), vec![iotlb_pasid(p), iotlb_pasid(q)]);
    // A binding that changes within the pass: forwarded again after it.
    let cr3b = g.alloc_frame();
    g.set_pasid_entry(dev, p, Some(fl_entry(1, cr3b, FlPagingMode::FourLevel)));
    assert!(g.submit_sync(&[global, pasid_cache(1, p), global, global]));
    assert_eq!(
        host.take(),
        vec![
            iotlb_pasid(p),
            iotlb_pasid(q),
            Call::Unbind(bind(p, cr3)),
            Call::Bind(bind(p, cr3b)),
            iotlb_pasid(p),
            iotlb_pasid(q),
        ]
    );
}

#[test]
fn a_container_shared_by_two_devices_gets_each_invalidation_once() {
    let (host, g, dev) = setup();
    let dev2 = sid(0, 5, 0);
    attach(&g, &host, dev2, sid(0x83, 0, 0));
    let (p, cr3) = bound_pasid(&g, &host, dev, 1);
    g.set_pasid_entry(dev2, p, Some(fl_entry(1, cr3, FlPagingMode::FourLevel)));
    assert!(g.submit_sync(&[pasid_cache(1, p)]));
    assert_eq!(host.take(), vec![Call::Bind(bind(p, cr3))]);
    assert!(g.submit_sync(&[piotlb(p)]));
    assert_eq!(host.take(), vec![iotlb_pasid(p)]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Every invalidation forwarded for a page-selective or device-TLB descriptor passes
    /// the host's uAPI validation and covers exactly the descriptor's range.
    #[test]
    fn forwarded_ranges_are_valid_and_exact(page in 0u64..1 << 52, am in 0u8..64, size: bool,
                                            ih: bool, dev_tlb: bool, raw_pasid in 1u32..1 << 20) {
        let p = pasid(raw_pasid);
        let s = sid(1, 2, 3);
        let desc = if dev_tlb {
            InvDesc::PasidDevIotlb { sid: s, pfsid: s, pasid: p, max_invs_pend: 0, addr: page << 12, size, global: false }
        } else {
            InvDesc::PasidIotlb { granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
                                  did: DomainId(4), pasid: p, addr: page << 12, ih, am }
        };
        let bound = [(p, Binding { bind: bind(p, 0x1000), did: DomainId(4), wpe: false })].into();
        let invs = host_invalidations(&desc, s, &bound);
        let range: AddrRange = desc.range().unwrap();
        // The pieces, in order, cover the range exactly.
        let mut next = Some(range.start);
        for inv in &invs {
            let info = IommuCacheInvalidateInfo::from(inv);
            let decoded = IommuCacheInvalidateInfo::from_bytes(&info.to_bytes());
            prop_assert!(decoded.is_ok(), "{:?}", decoded);
            let cache = if dev_tlb { IOMMU_CACHE_INV_TYPE_DEV_IOTLB } else { IOMMU_CACHE_INV_TYPE_IOTLB };
            prop_assert_eq!(inv.cache, cache);
            prop_assert_eq!(inv.pasid(), Some(p));
            match inv.granularity {
                InvGranularity::Addr { addr, granule_size, nb_granules, leaf, .. } => {
                    prop_assert_eq!(Some(addr), next);
                    let last = addr + (granule_size * nb_granules - 1);
                    next = last.checked_add(1);
                    prop_assert_eq!(leaf, ih && !dev_tlb);
                }
                InvGranularity::Pasid { .. } => {
                    // Only the IOTLB of the whole space; the host has no PASID
                    // granularity for device TLBs.
                    prop_assert!(!dev_tlb);
                    prop_assert_eq!((range.start, range.last), (0, u64::MAX));
                    next = None;
                }
                InvGranularity::Domain => prop_assert!(false, "no domain granularity on VT-d"),
            }
        }
        prop_assert!(!invs.is_empty());
        prop_assert_eq!(next, range.last.checked_add(1));
        // Nothing for a PASID that is not bound.
        prop_assert!(host_invalidations(&desc, s, &Default::default()).is_empty());
    }
}
