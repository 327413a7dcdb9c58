//! The vIOMMU's register interface: what it advertises, access rules, the virtual command
//! interface and the invalidation queue's completion and error handling.

mod viommu;

use viommu::*;
use vsva_vmm::{HostCall, VIommuConfig, VIommuError};
use vsva_vtd::inv_desc::{PasidCacheGranularity, PasidIotlbGranularity};
use vsva_vtd::regs::layout::{fsts, gcmd, gsts, ics, offset, vcmd};
use vsva_vtd::regs::{Cap, EventSource, RegError};
use vsva_vtd::{addr::DomainId, inv_desc::InvDesc, regs::Ecap};

#[test]
fn advertises_a_first_level_scalable_unit() {
    let g = Guest::new(MockHost::new());
    let cap = Cap::from_raw(g.read(offset::CAP, 8));
    let ecap = Ecap::from_raw(g.read(offset::ECAP, 8));
    // What the guest needs for SVA over a shadowing vIOMMU.
    assert!(ecap.smts && ecap.flts && ecap.pasid && ecap.qi && ecap.dt && ecap.prs);
    assert!(ecap.vcs && ecap.srs && ecap.ers);
    assert_eq!(ecap.pss, 19);
    // Nothing the host could not nest: no second level, no nesting, no pass-through.
    assert!(!ecap.nest && !ecap.slts && !ecap.pt);
    // Caching mode: the guest invalidates after making entries present.
    assert!(cap.cm);
    assert_eq!(cap.guest_address_width(), 48);
    assert!(cap.fl1gp && cap.fl5lp && cap.psi);
    assert_ne!(
        cap.sagaw, 0,
        "drivers refuse a unit without an address width"
    );
    // PASID allocation through virtual commands.
    assert_eq!(g.read(offset::VCCAP, 8), vcmd::VCCAP_PAS);
    assert_eq!(g.read(offset::VER, 4), 0x10);

    let narrow = Guest::with_config(
        MockHost::new(),
        VIommuConfig {
            gaw: 39,
            fl5lp: false,
            eafs: true,
            mts: true,
        },
    );
    let cap = Cap::from_raw(narrow.read(offset::CAP, 8));
    let ecap = Ecap::from_raw(narrow.read(offset::ECAP, 8));
    assert_eq!(cap.guest_address_width(), 39);
    assert!(!cap.fl5lp && ecap.eafs && ecap.mts);
}

#[test]
fn refuses_bad_configs_and_accesses() {
    let bad = VIommuConfig {
        gaw: 60,
        ..VIommuConfig::default()
    };
    assert!(matches!(
        vsva_vmm::VIommu::new(
            std::sync::Arc::new(
                vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(
                    vm_memory::GuestAddress(0),
                    0x1000
                )])
                .unwrap()
            ),
            bad,
            MockHost::new()
        ),
        Err(VIommuError::AddressWidth(_))
    ));

    let g = Guest::new(MockHost::new());
    let size = g.viommu.mmio_size();
    assert!(size >= 0x1000 && size % 0x1000 == 0);
    assert!(matches!(
        g.viommu.read(offset::CAP, 2),
        Err(VIommuError::Register(RegError::Width(2)))
    ));
    assert!(matches!(
        g.viommu.write(offset::RTADDR + 4, 8, 0x1000),
        Err(VIommuError::Register(RegError::Unaligned { .. }))
    ));
    assert!(matches!(
        g.viommu.write(size, 4, 0),
        Err(VIommuError::Register(RegError::OutOfRange { .. }))
    ));
    // A refused write changed nothing.
    assert_eq!(g.read(offset::RTADDR, 8), 0);
    // Read-only registers ignore writes.
    let cap = g.read(offset::CAP, 8);
    g.write(offset::CAP, 8, !cap);
    assert_eq!(g.read(offset::CAP, 8), cap);
}

#[test]
fn virtual_commands_allocate_and_free_host_pasids() {
    let host = MockHost::new();
    let g = Guest::new(host.clone());
    let a = g.alloc_pasid();
    let b = g.alloc_pasid();
    // gpasid == hpasid: the guest sees the PASIDs of the host set.
    assert_eq!(host.take(), vec![Call::Alloc(a), Call::Alloc(b)]);
    assert_eq!(g.viommu.guest_pasids(), vec![a, b]);
    assert_eq!(g.viommu.stats().pasids, 2);

    let rsp = g.vcmd((a.raw() as u64) << vcmd::OPERAND_SHIFT | vcmd::FREE_PASID as u64);
    assert_eq!(rsp, 0, "freed, no status code");
    assert_eq!(host.take(), vec![Call::Free(a)]);
    assert_eq!(g.viommu.guest_pasids(), vec![b]);

    // Freeing a PASID the guest does not hold: status code 2, the host is not asked.
    let rsp = g.vcmd((a.raw() as u64) << vcmd::OPERAND_SHIFT | vcmd::FREE_PASID as u64);
    assert_eq!(rsp >> vcmd::VCRSP_SC_SHIFT & 3, 2);
    // An operand beyond 20 bits.
    let rsp = g.vcmd(1 << 40 | vcmd::FREE_PASID as u64);
    assert_eq!(rsp >> vcmd::VCRSP_SC_SHIFT & 3, 2);
    // An undefined command: status code 1.
    let rsp = g.vcmd(0x7f);
    assert_eq!(rsp >> vcmd::VCRSP_SC_SHIFT & 3, 1);
    assert_eq!(rsp & vcmd::VCRSP_IP, 0);
    assert!(host.take().is_empty());
}

#[test]
fn pasid_allocation_failure_is_no_pasid_available() {
    let g = Guest::new(std::sync::Arc::new(LocalPasids::new(1)));
    let first = g.vcmd(vcmd::ALLOC_PASID as u64);
    assert_eq!(first & 6, 0);
    assert_eq!(
        first >> vcmd::VCRSP_RESULT_SHIFT,
        1,
        "lowest PASID above RID_PASID"
    );
    let second = g.vcmd(vcmd::ALLOC_PASID as u64);
    assert_eq!(second >> vcmd::VCRSP_SC_SHIFT & 3, 2, "quota of one");
    let errors = g.viommu.take_host_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].call, HostCall::PasidAlloc);
    assert_eq!(g.viommu.stats().host_errors, 1);
}

#[test]
fn invalidation_wait_writes_status_and_raises_completion() {
    let g = Guest::new(MockHost::new());
    g.enable();
    g.write(offset::IEDATA, 4, 0x42);
    g.write(offset::IEADDR, 4, 0xfee0_0000);
    g.write(offset::IECTL, 4, 0);
    assert!(
        g.submit_sync(&[]),
        "status written before the tail write returned"
    );
    assert!(g.take_irqs().is_empty(), "no IF, no interrupt");
    g.submit(&[InvDesc::InvWait {
        sw: false,
        interrupt: true,
        fence: false,
        pd: false,
        status_data: 0,
        status_addr: 0,
    }]);
    assert_eq!(g.read(offset::ICS, 4) as u32 & ics::IWC, ics::IWC);
    let irqs = g.take_irqs();
    assert_eq!(irqs.len(), 1);
    assert_eq!(irqs[0].source, EventSource::InvalidationCompletion);
    assert_eq!((irqs[0].address, irqs[0].data), (0xfee0_0000, 0x42));
    // IWC stays set until software clears it: no second interrupt.
    g.submit(&[InvDesc::InvWait {
        sw: false,
        interrupt: true,
        fence: false,
        pd: false,
        status_data: 0,
        status_addr: 0,
    }]);
    assert!(g.take_irqs().is_empty());
    assert_eq!(g.read(offset::IQH, 8), g.read(offset::IQT, 8));
    assert!(g.viommu.stats().descriptors >= 3);
}

#[test]
fn an_invalid_descriptor_stops_the_queue_until_iqe_is_cleared() {
    let host = MockHost::new();
    let g = Guest::new(host.clone());
    g.enable();
    g.write(offset::FECTL, 4, 0);
    let head = g.read(offset::IQH, 8);
    // A valid PASID-based IOTLB descriptor with a reserved bit set, then a wait.
    let good = InvDesc::PasidIotlb {
        granularity: PasidIotlbGranularity::PasidSelective,
        did: DomainId(1),
        pasid: pasid(5),
        addr: 0,
        ih: false,
        am: 0,
    };
    let mut raw = good.encode().unwrap();
    raw[0] |= 1 << 13;
    let bad = InvDesc::decode(raw);
    assert!(bad.is_err());
    // Write the raw descriptor by hand, followed by a wait.
    let iqa = g.read(offset::IQA, 8) & !0xfff;
    for (i, q) in raw.iter().enumerate() {
        vsva_mem::PhysMem::write_u64(&*g.mem, iqa + head + 8 * i as u64, *q).unwrap();
    }
    g.write(offset::IQT, 8, head + 32);
    assert_eq!(g.read(offset::FSTS, 4) as u32 & fsts::IQE, fsts::IQE);
    assert_eq!(
        g.read(offset::IQERCD, 8) & 0xf,
        4,
        "reserved field violation"
    );
    assert_eq!(
        g.read(offset::IQH, 8),
        head,
        "IQH stays on the bad descriptor"
    );
    assert_eq!(g.take_irqs().len(), 1, "fault event");
    // The driver replaces the descriptor and clears IQE: the queue runs on.
    let fixed = InvDesc::PasidCache {
        granularity: PasidCacheGranularity::Global,
        did: DomainId(0),
        pasid: pasid(0),
    }
    .encode()
    .unwrap();
    for (i, q) in fixed.iter().enumerate() {
        vsva_mem::PhysMem::write_u64(&*g.mem, iqa + head + 8 * i as u64, *q).unwrap();
    }
    g.write(offset::FSTS, 4, fsts::IQE as u64);
    assert_eq!(g.read(offset::FSTS, 4) as u32 & fsts::IQE, 0);
    assert_eq!(g.read(offset::IQH, 8), head + 32);
    assert!(host.take().is_empty());
}

#[test]
fn a_128_bit_queue_in_scalable_mode_reports_invalid_width() {
    let host = MockHost::new();
    let g = Guest::new(host.clone());
    g.enable();
    // With queued invalidation off, the driver moves the queue to 128-bit descriptors
    // (IQA.DW = 0) while the root table stays in scalable mode.
    g.write(
        offset::GCMD,
        4,
        u64::from(g.read(offset::GSTS, 4) as u32 & gsts::TES),
    );
    let iqa = g.read(offset::IQA, 8) & !0xfff;
    g.write(offset::IQA, 8, iqa);
    g.write(offset::IQT, 8, 0);
    g.gcmd(gcmd::QIE);
    g.write(offset::FECTL, 4, 0);
    let raw = InvDesc::PasidCache {
        granularity: PasidCacheGranularity::Global,
        did: DomainId(0),
        pasid: pasid(0),
    }
    .encode()
    .unwrap();
    for (i, q) in raw[..2].iter().enumerate() {
        vsva_mem::PhysMem::write_u64(&*g.mem, iqa + 8 * i as u64, *q).unwrap();
    }
    g.write(offset::IQT, 8, 16);
    assert_eq!(g.read(offset::FSTS, 4) as u32 & fsts::IQE, fsts::IQE);
    assert_eq!(
        g.read(offset::IQERCD, 8) & 0xf,
        5,
        "invalid descriptor width (§6.5.2)"
    );
    assert_eq!(g.read(offset::IQH, 8), 0, "IQH stays on the descriptor");
    assert!(host.take().is_empty(), "nothing reached the host");
}
