//! Whatever the guest writes into the registers, its tables and its invalidation queue,
//! the vIOMMU answers without panicking, and refused accesses change nothing.

mod viommu;

use proptest::prelude::*;
use viommu::*;
use vsva_mem::PhysMem;
use vsva_vtd::inv_desc::{
    ContextCacheGranularity, IotlbGranularity, PasidCacheGranularity, PasidIotlbGranularity,
    ResponseCode,
};
use vsva_vtd::regs::layout::offset;
use vsva_vtd::{
    addr::DomainId, addr::Pasid, addr::SourceId, context::ScalableContextEntry,
    flpte::FlPagingMode, inv_desc::InvDesc, pasid::PasidDirEntry, walk::AccessRequest,
};

/// A PASID-cache invalidation of `granularity`.
fn pasid_cache(granularity: PasidCacheGranularity, did: u16, p: u32) -> InvDesc {
    InvDesc::PasidCache {
        granularity,
        did: DomainId(did),
        pasid: Pasid::new(p).unwrap(),
    }
}

/// A hostile guest fills a maximum-size PASID directory (PDTS = 7: 2^14 directory entries,
/// 2^20 PASIDs) with valid first-level entries, every directory entry pointing to one full
/// PASID table, and floods the invalidation queue with PASID-cache flushes. What one
/// register write costs is counted: host calls and guest PASID-table words read stay in
/// proportion to the PASIDs the VM holds, whatever the directory holds.
#[test]
fn a_full_maximum_directory_costs_what_the_vm_holds() {
    let host = MockHost::new();
    let g = Guest::new(host.clone());
    g.enable();
    let dev = sid(0, 3, 0);
    g.viommu
        .attach_passthrough(dev, sid(0x81, 0, 0), host.clone())
        .unwrap();
    const DIR_ENTRIES: u64 = 1 << 14;
    let dir = g.alloc_frame();
    for i in 1..DIR_ENTRIES * 8 / 4096 {
        assert_eq!(g.alloc_frame(), dir + i * 4096, "a contiguous directory");
    }
    let table = g.alloc_frame();
    let cr3 = g.alloc_frame();
    for i in 0..64 {
        let raw = fl_entry(1, cr3, FlPagingMode::FourLevel).to_raw();
        for (q, v) in raw.iter().enumerate().rev() {
            g.mem.write_u64(table + 64 * i + 8 * q as u64, *v).unwrap();
        }
    }
    let pde = PasidDirEntry {
        fpd: false,
        smptblptr: table,
    }
    .to_raw();
    for i in 0..DIR_ENTRIES {
        g.mem.write_u64(dir + 8 * i, pde).unwrap();
    }
    g.write_context(
        dev,
        Some(ScalableContextEntry {
            fpd: false,
            dte: true,
            paside: true,
            pre: false,
            pdts: 7,
            pasiddirptr: dir,
            rid_pasid: Pasid::RID_PASID,
            rid_priv: false,
        }),
    );
    // The VM holds two PASIDs.
    let held = [g.alloc_pasid(), g.alloc_pasid()];
    host.take();
    // Every word of the directory and of the table is counted.
    let tables = dir..table + 4096;
    g.ram.watch(tables.clone());
    // Per held PASID at most: its directory entry and its 8-qword PASID entry.
    let bound = held.len() as u64 * 9;

    // One global flush binds the held PASIDs and nothing else.
    assert!(g.submit_sync(&[pasid_cache(PasidCacheGranularity::Global, 0, 0)]));
    assert_eq!(
        host.take(),
        held.iter()
            .map(|&p| Call::Bind(bind(p, cr3)))
            .collect::<Vec<_>>()
    );
    assert!(g.ram.reads() <= bound);

    // A queue full of flushes (127 of the 128 slots, waits in between or not) is one
    // pass: each held PASID's entry is read once and nothing changes on the host.
    let mut flood = Vec::new();
    for i in 0..63u32 {
        flood.push(pasid_cache(PasidCacheGranularity::Global, 0, 0));
        flood.push(match i % 3 {
            0 => pasid_cache(PasidCacheGranularity::DomainSelective, i as u16, 0),
            1 => pasid_cache(PasidCacheGranularity::PasidSelective, 1, held[0].raw()),
            _ => InvDesc::InvWait {
                sw: true,
                interrupt: false,
                fence: true,
                pd: false,
                status_data: 2,
                status_addr: STATUS + 8,
            },
        });
    }
    assert!(g.submit_sync(&flood));
    assert!(host.take().is_empty());
    assert!(g.ram.reads() <= bound);
    // Domain-selective flushes of 126 domains: the same.
    let domains: Vec<_> = (0..126u16)
        .map(|d| pasid_cache(PasidCacheGranularity::DomainSelective, d, 0))
        .collect();
    assert!(g.submit_sync(&domains));
    assert!(host.take().is_empty());
    assert!(g.ram.reads() <= bound);
    // PASID-selective flushes of PASIDs the VM does not hold: no read, no host call.
    let foreign: Vec<_> = (0..126u32)
        .map(|i| pasid_cache(PasidCacheGranularity::PasidSelective, 1, 1 + i * 8191))
        .collect();
    assert!(g.submit_sync(&foreign));
    assert!(host.take().is_empty());
    assert_eq!(g.ram.reads(), 0);

    // A change the guest flushes is still seen: a held entry cleared, then a global flush.
    g.mem
        .write_u64(table + 64 * held[0].table_index() as u64, 0)
        .unwrap();
    assert!(g.submit_sync(&[pasid_cache(PasidCacheGranularity::Global, 0, 0)]));
    assert_eq!(host.take(), vec![Call::Unbind(bind(held[0], cr3))]);
    assert!(g.ram.reads() <= bound);
    assert_eq!(g.viommu.stats().host_errors, 0);
}

/// One guest action.
#[derive(Clone, Debug)]
enum Action {
    /// A register write (possibly refused).
    Write { off: u64, size: usize, value: u64 },
    /// A raw 256-bit descriptor queued at the tail.
    Descriptor([u64; 4]),
    /// A well-formed descriptor queued at the tail.
    Valid(InvDesc),
    /// A raw guest RAM write into the vIOMMU's tables region.
    Ram { addr: u64, value: u64 },
    /// A DMA translation of an emulated or passthrough device.
    Translate {
        dev: u8,
        pasid: Option<u32>,
        addr: u64,
    },
}

/// Well-formed descriptors with arbitrary fields, naming the test's devices and PASIDs
/// often enough to reach the shadowing paths.
fn descriptor() -> impl Strategy<Value = InvDesc> {
    let pasid =
        prop_oneof![Just(100u32), Just(0), 0u32..1 << 20].prop_map(|p| Pasid::new(p).unwrap());
    let did = prop_oneof![Just(1u16), any::<u16>()].prop_map(DomainId);
    let dev = prop_oneof![Just(0x0018u16), Just(0x0020), any::<u16>()].prop_map(SourceId::from_rid);
    let page = any::<u64>().prop_map(|a| a & !0xfff);
    prop_oneof![
        (0usize..3, did.clone(), dev.clone(), 0u8..4).prop_map(|(g, did, sid, fm)| {
            let granularity = [
                ContextCacheGranularity::Global,
                ContextCacheGranularity::DomainSelective,
                ContextCacheGranularity::DeviceSelective,
            ][g];
            InvDesc::ContextCache {
                granularity,
                did,
                sid,
                fm,
            }
        }),
        (0usize..3, did.clone(), pasid.clone()).prop_map(|(g, did, pasid)| {
            let granularity = [
                PasidCacheGranularity::Global,
                PasidCacheGranularity::DomainSelective,
                PasidCacheGranularity::PasidSelective,
            ][g];
            InvDesc::PasidCache {
                granularity,
                did,
                pasid,
            }
        }),
        (
            any::<bool>(),
            did.clone(),
            pasid.clone(),
            page.clone(),
            any::<bool>(),
            0u8..64
        )
            .prop_map(|(psi, did, pasid, addr, ih, am)| InvDesc::PasidIotlb {
                granularity: if psi {
                    PasidIotlbGranularity::PageSelectiveWithinPasid
                } else {
                    PasidIotlbGranularity::PasidSelective
                },
                did,
                pasid,
                addr,
                ih,
                am,
            }),
        (0usize..3, did, page.clone(), 0u8..64).prop_map(|(g, did, addr, am)| InvDesc::Iotlb {
            granularity: [
                IotlbGranularity::Global,
                IotlbGranularity::DomainSelective,
                IotlbGranularity::PageSelective,
            ][g],
            dr: true,
            dw: true,
            did,
            addr,
            ih: false,
            am,
        }),
        (
            dev.clone(),
            pasid.clone(),
            page,
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(sid, pasid, addr, size, global)| InvDesc::PasidDevIotlb {
                sid,
                pfsid: sid,
                pasid,
                max_invs_pend: 0,
                addr,
                size,
                global,
            }),
        (dev, any::<bool>(), pasid, 0usize..3, 0u16..512).prop_map(
            |(rid, pasid_present, pasid, rc, prg_index)| InvDesc::PageGroupResponse {
                rid,
                pasid_present,
                pasid,
                private_data_present: false,
                response: [
                    ResponseCode::Success,
                    ResponseCode::InvalidRequest,
                    ResponseCode::ResponseFailure,
                ][rc],
                last_page_in_group: true,
                prg_index,
                private_data: [0; 2],
            }
        ),
        (any::<bool>(), any::<bool>(), any::<u32>(), 0u64..1 << 40).prop_map(
            |(sw, interrupt, status_data, a)| InvDesc::InvWait {
                sw,
                interrupt,
                fence: false,
                pd: false,
                status_data,
                status_addr: a & !3,
            }
        ),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    // Offsets of real registers, so that writes reach them.
    let regs = prop::sample::select(vec![
        offset::GCMD,
        offset::RTADDR,
        offset::CCMD,
        offset::FSTS,
        offset::FECTL,
        offset::IQT,
        offset::IQA,
        offset::ICS,
        offset::IECTL,
        offset::PQH,
        offset::PQT,
        offset::PQA,
        offset::PRS,
        offset::PECTL,
        offset::VCMD,
        0x500,
        0x508,
        0x400,
        0x408,
    ]);
    prop_oneof![
        (regs, prop::sample::select(vec![4usize, 8]), any::<u64>()).prop_map(
            |(off, size, value)| Action::Write {
                off,
                size,
                value: if size == 4 {
                    value & 0xffff_ffff
                } else {
                    value
                },
            }
        ),
        (
            0u64..0x1000,
            prop::sample::select(vec![1usize, 2, 3, 8]),
            any::<u64>()
        )
            .prop_map(|(off, size, value)| Action::Write { off, size, value }),
        any::<[u64; 4]>().prop_map(Action::Descriptor),
        descriptor().prop_map(Action::Valid),
        descriptor().prop_map(Action::Valid),
        (1u8..10, any::<[u64; 4]>()).prop_map(|(code, mut raw)| {
            raw[0] = raw[0] & !0xe0f | (code as u64 & 0xf) | ((code as u64 >> 4) << 9);
            Action::Descriptor(raw)
        }),
        ((16u64 << 20)..(16u64 << 20) + 0x20000, any::<u64>()).prop_map(|(addr, value)| {
            Action::Ram {
                addr: addr & !7,
                value,
            }
        }),
        (0u8..4, proptest::option::of(0u32..1 << 20), any::<u64>())
            .prop_map(|(dev, pasid, addr)| Action::Translate { dev, pasid, addr }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_guest_behaviour_never_panics(actions in prop::collection::vec(action(), 1..40)) {
        let host = MockHost::new();
        let g = Guest::new(host.clone());
        g.enable();
        g.enable_prq();
        let devs = [sid(0, 3, 0), sid(0, 4, 0), sid(1, 0, 0), sid(0, 31, 7)];
        g.viommu.attach_passthrough(devs[0], sid(0x81, 0, 0), host.clone()).unwrap();
        for d in &devs[..3] {
            g.attach(*d, true);
        }
        let p = g.alloc_pasid();
        g.set_pasid_entry(devs[0], p, Some(fl_entry(1, g.alloc_frame(), vsva_vtd::flpte::FlPagingMode::FourLevel)));
        let iq_tail = std::cell::Cell::new(0u64);
        let queue = |raw: [u64; 4]| {
            let iqa = g.viommu.read(offset::IQA, 8).unwrap() & !0xfff;
            let t = iq_tail.get();
            for (i, q) in raw.iter().enumerate() {
                let _ = g.mem.write_u64(iqa + t * 32 + 8 * i as u64, *q);
            }
            iq_tail.set((t + 1) % 128);
            let _ = g.viommu.write(offset::IQT, 8, iq_tail.get() * 32);
        };
        for a in actions {
            match a {
                Action::Write { off, size, value } => {
                    let before = g.viommu.read(offset::RTADDR, 8).unwrap();
                    if g.viommu.write(off, size, value).is_err() {
                        prop_assert_eq!(g.viommu.read(offset::RTADDR, 8).unwrap(), before);
                    }
                }
                Action::Descriptor(raw) => queue(raw),
                Action::Valid(desc) => {
                    let raw = desc.encode().unwrap();
                    let fsts = g.viommu.read(offset::FSTS, 4).unwrap();
                    if fsts & 0x10 != 0 {
                        // Linux's qi_check_fault: the offending descriptor is replaced and
                        // IQE cleared, and the queue runs on.
                        let iqa = g.viommu.read(offset::IQA, 8).unwrap() & !0xfff;
                        let head = g.viommu.read(offset::IQH, 8).unwrap();
                        for (i, q) in raw.iter().enumerate() {
                            let _ = g.mem.write_u64(iqa + head + 8 * i as u64, *q);
                        }
                        prop_assert!(g.viommu.write(offset::FSTS, 4, 0x10).is_ok());
                    } else {
                        queue(raw);
                    }
                }
                Action::Ram { addr, value } => {
                    let _ = g.mem.write_u64(addr, value);
                }
                Action::Translate { dev, pasid, addr } => {
                    let pasid = pasid.map(|p| vsva_vtd::addr::Pasid::new(p).unwrap());
                    let _ = g.viommu.translate(devs[dev as usize], pasid, addr, AccessRequest::WRITE);
                }
            }
            // The host is only asked to bind PASIDs the guest holds.
            let held = g.viommu.guest_pasids();
            for call in host.take() {
                if let Call::Bind(b) = call {
                    prop_assert!(held.contains(&b.hpasid), "bound {:?}, held {:?}", b.hpasid, held);
                }
            }
        }
        // Still answering.
        prop_assert!(g.viommu.read(offset::GSTS, 4).is_ok());
        prop_assert!(g.viommu.write(offset::FSTS, 4, 0x7f).is_ok());
    }
}
