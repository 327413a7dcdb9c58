//! Emulated devices: the vIOMMU translates through the guest's first-level tables itself,
//! caching what it reads until the guest invalidates it, and serves device models written
//! against vm-memory through an `Iommu` address space.

mod viommu;

use proptest::prelude::*;
use std::sync::Arc;
use vsva_mem::PhysMem;

use viommu::*;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Iommu, IommuMemory, Permissions};
use vsva_testbed::dma_io::{read as io_read, write as io_write};
use vsva_vmm::IommuAddressSpace;
use vsva_vtd::inv_desc::{ContextCacheGranularity, PasidCacheGranularity, PasidIotlbGranularity};
use vsva_vtd::regs::layout::{fsts, offset};
use vsva_vtd::regs::{Cap, EventSource, FaultRecord, FRCD_F};
use vsva_vtd::{
    addr::DomainId, addr::Gpa, addr::Pasid, addr::SourceId, builder::MapFlags,
    builder::PageTableBuilder, fault::FaultReason, flpte::FlPagingMode, flpte::FlPte,
    inv_desc::InvDesc, walk::AccessRequest, walk::PageSize,
};

const VA: u64 = 0x7f00_0000_0000;
const PA: u64 = 0x20_0000;
const PA2: u64 = 0x30_0000;

struct Setup {
    g: Guest,
    dev: SourceId,
    p: Pasid,
    pt: PageTableBuilder,
}

/// A guest with an emulated device whose PASID `p` (domain 1) translates through a process
/// table mapping VA to PA.
fn setup(pre: bool) -> Setup {
    let g = Guest::new(Arc::new(LocalPasids::new(16)));
    g.enable();
    let dev = sid(0, 6, 0);
    g.attach(dev, pre);
    let p = g.alloc_pasid();
    let mut pt = g.page_table();
    g.map(&mut pt, VA, PA);
    g.set_pasid_entry(
        dev,
        p,
        Some(fl_entry(1, pt.root(), FlPagingMode::FourLevel)),
    );
    Setup { g, dev, p, pt }
}

fn piotlb(did: u16, p: Pasid, addr: Option<u64>) -> InvDesc {
    InvDesc::PasidIotlb {
        granularity: if addr.is_some() {
            PasidIotlbGranularity::PageSelectiveWithinPasid
        } else {
            PasidIotlbGranularity::PasidSelective
        },
        did: DomainId(did),
        pasid: p,
        addr: addr.unwrap_or(0),
        ih: false,
        am: 0,
    }
}

fn gpa(s: &Setup, va: u64, access: AccessRequest) -> u64 {
    s.g.viommu
        .translate(s.dev, Some(s.p), va, access)
        .unwrap()
        .gpa
        .raw()
}

#[test]
fn translates_through_the_guest_tables_and_caches_the_result() {
    let s = setup(false);
    let t =
        s.g.viommu
            .translate(s.dev, Some(s.p), VA + 0x123, AccessRequest::READ)
            .unwrap();
    assert_eq!(t.gpa, Gpa(PA + 0x123));
    assert_eq!(t.page_size, PageSize::Size4K);
    assert_eq!(
        (t.did, t.pasid, t.cached),
        (Some(DomainId(1)), Some(s.p), false)
    );
    assert!(t.perms.read && t.perms.write && t.perms.user && !t.dirty);
    let again =
        s.g.viommu
            .translate(s.dev, Some(s.p), VA + 0xff8, AccessRequest::READ)
            .unwrap();
    assert!(again.cached);
    assert_eq!(again.gpa, Gpa(PA + 0xff8));
    // The first write walks again to set D; the second is a hit.
    let w =
        s.g.viommu
            .translate(s.dev, Some(s.p), VA, AccessRequest::WRITE)
            .unwrap();
    assert!(!w.cached && w.dirty);
    let leaf = s.pt.lookup(&*s.g.mem, VA).unwrap().unwrap().entry;
    assert_ne!(leaf & FlPte::D, 0, "D set in the guest's table");
    assert!(
        s.g.viommu
            .translate(s.dev, Some(s.p), VA, AccessRequest::WRITE)
            .unwrap()
            .cached
    );
    assert_eq!(s.g.viommu.stats().walks, 2);
    let (ctx, pasids, iotlb) = s.g.viommu.cached_entries();
    assert_eq!((ctx, pasids), (1, 1));
    assert!(iotlb >= 1);
}

#[test]
fn a_changed_mapping_is_used_until_the_guest_invalidates_it() {
    let mut s = setup(false);
    assert_eq!(gpa(&s, VA, AccessRequest::READ), PA);
    s.pt.unmap(&*s.g.mem, VA, PageSize::Size4K).unwrap();
    s.g.map(&mut s.pt, VA, PA2);
    // The stale translation stays: a missing invalidation is observable.
    assert_eq!(gpa(&s, VA, AccessRequest::READ), PA);
    // Invalidations of another domain, another PASID, another page do not remove it.
    let other = Pasid::new(s.p.raw() + 1).unwrap();
    assert!(s.g.submit_sync(&[
        piotlb(2, s.p, None),
        piotlb(1, other, None),
        piotlb(1, s.p, Some(VA + 0x1000)),
    ]));
    assert_eq!(gpa(&s, VA, AccessRequest::READ), PA);
    // The page-selective invalidation of the page does.
    assert!(s.g.submit_sync(&[piotlb(1, s.p, Some(VA))]));
    assert_eq!(gpa(&s, VA, AccessRequest::READ), PA2);

    // Unmapped: still served until invalidated, then a fault.
    s.pt.unmap(&*s.g.mem, VA, PageSize::Size4K).unwrap();
    assert_eq!(gpa(&s, VA, AccessRequest::READ), PA2);
    assert!(s.g.submit_sync(&[InvDesc::Iotlb {
        granularity: vsva_vtd::inv_desc::IotlbGranularity::DomainSelective,
        dr: true,
        dw: true,
        did: DomainId(1),
        addr: 0,
        ih: false,
        am: 0,
    }]));
    let f =
        s.g.viommu
            .translate(s.dev, Some(s.p), VA, AccessRequest::READ)
            .unwrap_err();
    assert_eq!(f.reason, FaultReason::Sfl2);
}

#[test]
fn a_changed_pasid_entry_is_used_until_the_pasid_cache_is_invalidated() {
    let s = setup(false);
    assert_eq!(gpa(&s, VA, AccessRequest::READ), PA);
    let mut pt2 = s.g.page_table();
    s.g.map(&mut pt2, VA, PA2);
    s.g.set_pasid_entry(
        s.dev,
        s.p,
        Some(fl_entry(1, pt2.root(), FlPagingMode::FourLevel)),
    );
    // The IOTLB alone is flushed: the cached PASID entry still points at the old table.
    assert!(s.g.submit_sync(&[piotlb(1, s.p, None)]));
    assert_eq!(gpa(&s, VA, AccessRequest::READ), PA);
    // Linux's order: PASID cache, then IOTLB.
    assert!(s.g.submit_sync(&[
        InvDesc::PasidCache {
            granularity: PasidCacheGranularity::PasidSelective,
            did: DomainId(1),
            pasid: s.p,
        },
        piotlb(1, s.p, None),
    ]));
    assert_eq!(gpa(&s, VA, AccessRequest::READ), PA2);
}

#[test]
fn a_cleared_context_entry_is_used_until_the_context_cache_is_invalidated() {
    let s = setup(false);
    assert_eq!(gpa(&s, VA, AccessRequest::READ), PA);
    s.g.write_context(s.dev, None);
    assert!(s.g.submit_sync(&[
        InvDesc::PasidCache {
            granularity: PasidCacheGranularity::Global,
            did: DomainId(0),
            pasid: s.p,
        },
        piotlb(1, s.p, None),
    ]));
    // The PASID entry is read again, through the cached context entry.
    assert_eq!(gpa(&s, VA, AccessRequest::READ), PA);
    assert!(s.g.submit_sync(&[
        InvDesc::ContextCache {
            granularity: ContextCacheGranularity::DeviceSelective,
            did: DomainId(0),
            sid: s.dev,
            fm: 0,
        },
        InvDesc::PasidCache {
            granularity: PasidCacheGranularity::Global,
            did: DomainId(0),
            pasid: s.p,
        },
        piotlb(1, s.p, None),
    ]));
    let f =
        s.g.viommu
            .translate(s.dev, Some(s.p), VA, AccessRequest::READ)
            .unwrap_err();
    assert_eq!(f.reason, FaultReason::Sct2);
}

#[test]
fn faults_are_recorded_with_their_reason() {
    let s = setup(true);
    s.g.write(offset::FEDATA, 4, 0x40);
    s.g.write(offset::FECTL, 4, 0);
    let f =
        s.g.viommu
            .translate(s.dev, Some(s.p), VA + 0x5000, AccessRequest::WRITE)
            .unwrap_err();
    assert_eq!(f.reason, FaultReason::Sfl2);
    assert!(f.recoverable, "PRE set: a page request could resolve it");
    assert!(!f.fpd);
    let cap = Cap::from_raw(s.g.read(offset::CAP, 8));
    let frcd = cap.fault_recording_offset();
    let raw = [s.g.read(frcd, 8), s.g.read(frcd + 8, 8)];
    assert_ne!(raw[1] & FRCD_F, 0);
    let rec = FaultRecord::from_raw(raw).unwrap();
    assert_eq!(rec.fault_info, VA + 0x5000);
    assert_eq!(rec.sid, s.dev);
    assert_eq!(rec.pasid, Some(s.p));
    assert_eq!(rec.reason, FaultReason::Sfl2.code());
    assert_ne!(s.g.read(offset::FSTS, 4) as u32 & fsts::PPF, 0);
    let irqs = s.g.take_irqs();
    assert_eq!(irqs.len(), 1);
    assert_eq!((irqs[0].source, irqs[0].data), (EventSource::Fault, 0x40));

    // Supervisor requests need SRE, execute requests ERE.
    let sup =
        s.g.viommu
            .translate(s.dev, Some(s.p), VA, AccessRequest::READ.supervisor())
            .unwrap_err();
    assert_eq!(sup.reason, FaultReason::Spt6);
    let exe =
        s.g.viommu
            .translate(s.dev, Some(s.p), VA, AccessRequest::EXECUTE)
            .unwrap_err();
    assert_eq!(exe.reason, FaultReason::Spt5);
    // A PASID without an entry.
    let none =
        s.g.viommu
            .translate(
                s.dev,
                Some(Pasid::new(0x3f).unwrap()),
                VA,
                AccessRequest::READ,
            )
            .unwrap_err();
    assert_eq!(none.reason, FaultReason::Spt2);
    assert_eq!(s.g.viommu.stats().faults_recorded, 4);

    // FPD in the PASID entry: the fault is not recorded.
    let q = s.g.alloc_pasid();
    let mut e = fl_entry(1, s.pt.root(), FlPagingMode::FourLevel);
    e.fpd = true;
    s.g.set_pasid_entry(s.dev, q, Some(e));
    let f =
        s.g.viommu
            .translate(s.dev, Some(q), VA + 0x5000, AccessRequest::READ)
            .unwrap_err();
    assert!(f.fpd);
    assert_eq!(s.g.viommu.stats().faults_recorded, 4);
}

#[test]
fn requests_without_pasid_use_rid_pasid_and_disabled_translation_is_identity() {
    let g = Guest::new(Arc::new(LocalPasids::new(4)));
    let dev = sid(0, 7, 0);
    // Translation off: addresses are guest physical as they are.
    let t = g
        .viommu
        .translate(dev, None, 0x1234_5678, AccessRequest::WRITE)
        .unwrap();
    assert_eq!((t.gpa, t.did), (Gpa(0x1234_5678), None));
    g.enable();
    g.attach(dev, false);
    let mut pt = g.page_table();
    g.map(&mut pt, 0x40_0000, PA);
    g.set_pasid_entry(
        dev,
        Pasid::RID_PASID,
        Some(fl_entry(3, pt.root(), FlPagingMode::FourLevel)),
    );
    let t = g
        .viommu
        .translate(dev, None, 0x40_0010, AccessRequest::READ)
        .unwrap();
    assert_eq!((t.gpa, t.pasid), (Gpa(PA + 0x10), Some(Pasid::RID_PASID)));
    // A device without a context entry.
    let f = g
        .viommu
        .translate(sid(0, 8, 0), None, 0, AccessRequest::READ)
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::Sct2);
    // Read-only pages refuse writes.
    pt.map(
        &*g.mem,
        &mut Frames(&g),
        0x50_0000,
        PA2,
        PageSize::Size4K,
        MapFlags::READ | MapFlags::USER,
    )
    .unwrap();
    let f = g
        .viommu
        .translate(dev, None, 0x50_0000, AccessRequest::WRITE)
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::Sgn6);
}

type IoMem = IommuMemory<GuestMemoryMmap, IommuAddressSpace>;

#[test]
fn vm_memory_device_models_dma_through_the_guest_page_tables() {
    let mut s = setup(false);
    // A second page of the buffer, not physically contiguous with the first.
    s.g.map(&mut s.pt, VA + 0x1000, PA2);
    let first: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let second: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
    s.g.mem.write(PA, &first).unwrap();
    s.g.mem.write(PA2, &second).unwrap();

    let space = s.g.viommu.address_space(s.dev, Some(s.p), false);
    assert_eq!((space.source_id(), space.pasid()), (s.dev, Some(s.p)));
    let io: IoMem = IommuMemory::new((*s.g.mem).clone(), space, true, ());
    // A read across the page boundary gathers both pages.
    let got = io_read(&io, VA + 0xff0, 0x20).unwrap();
    assert_eq!(&got[..0x10], &first[0xff0..]);
    assert_eq!(&got[0x10..], &second[..0x10]);
    // A write lands in guest RAM at the translated address, and sets D in the table.
    io_write(&io, VA + 0x1800, b"written by DMA").unwrap();
    let mut back = [0u8; 14];
    s.g.mem.read(PA2 + 0x800, &mut back).unwrap();
    assert_eq!(&back, b"written by DMA");
    let leaf = s.pt.lookup(&*s.g.mem, VA + 0x1000).unwrap().unwrap().entry;
    assert_ne!(leaf & FlPte::D, 0);

    // Remapped without invalidation: the address space keeps using the old page.
    s.pt.unmap(&*s.g.mem, VA, PageSize::Size4K).unwrap();
    let third = vec![0x5a_u8; 4096];
    let pa3 = s.g.alloc_frame();
    s.g.mem.write(pa3, &third).unwrap();
    s.g.map(&mut s.pt, VA, pa3);
    assert_eq!(io_read(&io, VA, 4).unwrap(), first[..4]);
    // The guest invalidates the page: the new one is used.
    assert!(s.g.submit_sync(&[piotlb(1, s.p, Some(VA))]));
    assert_eq!(io_read(&io, VA, 4).unwrap(), third[..4]);
    assert_eq!(io_read(&io, VA + 0x1800, 14).unwrap(), b"written by DMA");

    // Unmapped and invalidated: the access fails.
    s.pt.unmap(&*s.g.mem, VA, PageSize::Size4K).unwrap();
    assert!(s.g.submit_sync(&[piotlb(1, s.p, None)]));
    assert!(io_read(&io, VA, 4).is_err());
    assert!(!io.check_range(GuestAddress(VA), 4, Permissions::Read));
    assert!(io.check_range(GuestAddress(VA + 0x1000), 4, Permissions::Read));
}

#[test]
fn address_spaces_honour_page_rights() {
    let mut s = setup(false);
    s.pt.map(
        &*s.g.mem,
        &mut Frames(&s.g),
        VA + 0x2000,
        PA2,
        PageSize::Size4K,
        MapFlags::READ | MapFlags::USER,
    )
    .unwrap();
    let io: IoMem = IommuMemory::new(
        (*s.g.mem).clone(),
        s.g.viommu.address_space(s.dev, Some(s.p), false),
        true,
        (),
    );
    assert!(io_read(&io, VA + 0x2000, 8).is_ok());
    assert!(io_write(&io, VA + 0x2000, &[1; 8]).is_err());
    // A supervisor address space of a PASID without SRE.
    let sup: IoMem = IommuMemory::new(
        (*s.g.mem).clone(),
        s.g.viommu.address_space(s.dev, Some(s.p), true),
        true,
        (),
    );
    assert!(io_read(&sup, VA, 8).is_err());
}

#[test]
fn enabling_translation_drops_what_address_spaces_cached_untranslated() {
    let g = Guest::new(Arc::new(LocalPasids::new(4)));
    let dev = sid(0, 6, 0);
    const ADDR: u64 = 0x40_0000;
    g.mem.write(ADDR, b"identity").unwrap();
    g.mem.write(PA, b"mapped!!").unwrap();
    let io: IoMem = IommuMemory::new(
        (*g.mem).clone(),
        g.viommu.address_space(dev, None, false),
        true,
        (),
    );
    assert_eq!(io_read(&io, ADDR, 8).unwrap(), b"identity");
    g.attach(dev, false);
    let mut pt = g.page_table();
    g.map(&mut pt, ADDR, PA);
    g.set_pasid_entry(
        dev,
        Pasid::RID_PASID,
        Some(fl_entry(1, pt.root(), FlPagingMode::FourLevel)),
    );
    g.enable();
    assert_eq!(io_read(&io, ADDR, 8).unwrap(), b"mapped!!");
}

/// The run tests' buffer: a leaf table of its own, mapped 4 KiB page by page to
/// consecutive guest frames from `RUN_PA` (below the frames the tables take).
const RUN_VA: u64 = VA + (2 << 20);
const RUN_PA: u64 = 0x80_0000;
const MIB: usize = 1 << 20;

/// Maps `pages` pages from `RUN_VA` to consecutive frames from `RUN_PA`, filled with a
/// pattern, which it returns.
fn map_run(s: &mut Setup, pages: u64) -> Vec<u8> {
    for i in 0..pages {
        s.g.map(&mut s.pt, RUN_VA + i * 4096, RUN_PA + i * 4096);
    }
    let bytes: Vec<u8> = (0..pages * 4096)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    s.g.mem.write(RUN_PA, &bytes).unwrap();
    bytes
}

fn leaf_dirty(s: &Setup, va: u64) -> bool {
    s.pt.lookup(&*s.g.mem, va).unwrap().unwrap().entry & FlPte::D != 0
}

#[test]
fn a_contiguous_mapping_costs_one_walk_per_leaf_table_not_one_per_page() {
    let mut s = setup(false);
    let bytes = map_run(&mut s, 768);
    let io: IoMem = IommuMemory::new(
        (*s.g.mem).clone(),
        s.g.viommu.address_space(s.dev, Some(s.p), false),
        true,
        (),
    );
    let walks = || s.g.viommu.stats().walks;
    // 1 MiB (256 pages) inside one leaf table: one walk, then the table's next entries.
    let before = walks();
    assert!(io_read(&io, RUN_VA, MIB).unwrap() == bytes[..MIB]);
    assert_eq!(walks() - before, 1);
    // 1 MiB across the end of that table: the half not cached yet ends with the table,
    // and the next table takes a walk of its own.
    let before = walks();
    let at = 3 * MIB / 2;
    assert!(io_read(&io, RUN_VA + at as u64, MIB).unwrap() == bytes[at..at + MIB]);
    assert_eq!(walks() - before, 2);
    // Writing the first MiB: its pages are clean, so one walk for write sets D in each
    // leaf the write covers, and in no other.
    let before = walks();
    let data = vec![0x3c; MIB];
    io_write(&io, RUN_VA, &data).unwrap();
    assert_eq!(walks() - before, 1);
    assert!((0..256).all(|i| leaf_dirty(&s, RUN_VA + i * 4096)));
    assert!(!leaf_dirty(&s, RUN_VA + 256 * 4096));
    let mut back = vec![0; MIB];
    s.g.mem.read(RUN_PA, &mut back).unwrap();
    assert!(back == data);
}

#[test]
fn invalidating_one_page_of_a_run_removes_the_whole_run() {
    let mut s = setup(false);
    let mut bytes = map_run(&mut s, 256);
    let io: IoMem = IommuMemory::new(
        (*s.g.mem).clone(),
        s.g.viommu.address_space(s.dev, Some(s.p), false),
        true,
        (),
    );
    assert!(io_read(&io, RUN_VA, MIB).unwrap() == bytes);
    // The middle page now maps another frame, not invalidated yet: the run still answers.
    let mid = RUN_VA + 128 * 4096;
    s.pt.unmap(&*s.g.mem, mid, PageSize::Size4K).unwrap();
    let other = s.g.alloc_frame();
    s.g.mem.write(other, &[0xa5; 4096]).unwrap();
    s.g.map(&mut s.pt, mid, other);
    assert!(io_read(&io, RUN_VA, MIB).unwrap() == bytes);
    // A page-selective invalidation of that page alone: the next access walks again and
    // splits the run around the page, which reads the new frame.
    assert!(s.g.submit_sync(&[piotlb(1, s.p, Some(mid))]));
    let before = s.g.viommu.stats().walks;
    bytes[128 * 4096..129 * 4096].fill(0xa5);
    assert!(io_read(&io, RUN_VA, MIB).unwrap() == bytes);
    assert_eq!(s.g.viommu.stats().walks - before, 3);
}

#[test]
fn a_run_ends_at_a_page_that_faults_and_the_fault_is_that_page_s() {
    let mut s = setup(false);
    let bytes = map_run(&mut s, 8);
    s.pt.unmap(&*s.g.mem, RUN_VA + 5 * 4096, PageSize::Size4K)
        .unwrap();
    let io: IoMem = IommuMemory::new(
        (*s.g.mem).clone(),
        s.g.viommu.address_space(s.dev, Some(s.p), false),
        true,
        (),
    );
    assert!(io_read(&io, RUN_VA, 8 * 4096).is_err());
    let cap = Cap::from_raw(s.g.read(offset::CAP, 8));
    let frcd = cap.fault_recording_offset();
    let rec = FaultRecord::from_raw([s.g.read(frcd, 8), s.g.read(frcd + 8, 8)]).unwrap();
    assert_eq!(rec.fault_info, RUN_VA + 5 * 4096);
    assert_eq!(rec.reason, FaultReason::Sfl2.code());
    assert_eq!(s.g.viommu.stats().faults_recorded, 1);
    // The pages before it were translated and cached.
    let before = s.g.viommu.stats().walks;
    assert!(io_read(&io, RUN_VA, 5 * 4096).unwrap() == bytes[..5 * 4096]);
    assert_eq!(s.g.viommu.stats().walks, before);
}

/// Pages of the run property test, across the end of `RUN_VA`'s leaf table.
const RUN_PAGES: u64 = 48;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// For random 4 KiB mappings of pages across a leaf-table boundary (mapped or not, to
    /// the frame after the previous page's or not, read-only or writable, dirty or not),
    /// multi-page reads and writes through the vIOMMU's vm-memory `Iommu` (filled a run per
    /// walk) give every page the frame it maps, and fail exactly when one of their pages
    /// may not be accessed so; afterwards every page read alone, from the runs cached, too.
    /// Every page a write went through is dirty, and no page outside the writes became so.
    #[test]
    fn runs_give_each_page_its_own_translation(
        pages in prop::collection::vec(
            (
                prop::bool::weighted(0.95),
                prop::bool::weighted(0.8),
                prop::bool::weighted(0.1),
                prop::bool::weighted(0.3),
            ),
            RUN_PAGES as usize,
        ),
        accesses in prop::collection::vec((0..RUN_PAGES, 1..=16u64, any::<bool>()), 1..12),
    ) {
        let mut s = setup(false);
        let first_va = RUN_VA + (2 << 20) - 24 * 4096;
        let va = |i: u64| first_va + i * 4096;
        let mut frame = RUN_PA;
        // Each page's frame and whether it is writable (`None`: not mapped).
        let mut mapped = Vec::new();
        for (i, &(present, follows, read_only, dirty)) in pages.iter().enumerate() {
            // A page that does not follow leaves a frame's gap after the previous one.
            frame += if follows { 4096 } else { 2 * 4096 };
            let flags = if read_only {
                MapFlags::READ | MapFlags::USER
            } else {
                MapFlags::READ | MapFlags::WRITE | MapFlags::USER
            };
            if present {
                s.pt.map(&*s.g.mem, &mut Frames(&s.g), va(i as u64), frame, PageSize::Size4K, flags)
                    .unwrap();
                if dirty {
                    let slot = leaf_slot(&s.g.mem, s.pt.root(), va(i as u64));
                    let leaf = s.g.mem.read_u64(slot).unwrap();
                    s.g.mem.write_u64(slot, leaf | FlPte::D).unwrap();
                }
            }
            mapped.push(present.then_some((frame, !read_only)));
        }
        let space = s.g.viommu.address_space(s.dev, Some(s.p), false);
        let want = |first: u64, count: u64, write: bool| -> Option<Vec<u64>> {
            (first..first + count)
                .map(|i| mapped[i as usize].filter(|&(_, w)| w || !write).map(|(pa, _)| pa))
                .collect()
        };
        // The frame of each page of what `translate` answered.
        let got = |first: u64, count: u64, write: bool| -> Option<Vec<u64>> {
            let perms = if write { Permissions::Write } else { Permissions::Read };
            let ranges = space.translate(GuestAddress(va(first)), (count * 4096) as usize, perms).ok()?;
            let mut frames = Vec::new();
            for r in ranges {
                assert_eq!(r.length % 4096, 0);
                frames.extend((0..r.length as u64 / 4096).map(|p| r.base.0 + p * 4096));
            }
            Some(frames)
        };
        // Pages a write went through, pages a write (done or not) covered.
        let mut written = vec![false; RUN_PAGES as usize];
        let mut covered = vec![false; RUN_PAGES as usize];
        for &(first, count, write) in &accesses {
            let count = count.min(RUN_PAGES - first);
            let answer = got(first, count, write);
            prop_assert_eq!(&answer, &want(first, count, write));
            for i in (first..first + count).filter(|_| write) {
                covered[i as usize] = true;
                written[i as usize] |= answer.is_some();
            }
        }
        for i in 0..RUN_PAGES {
            prop_assert_eq!(got(i, 1, false), want(i, 1, false), "page {}", i);
            if mapped[i as usize].is_some() {
                let leaf = s.g.mem.read_u64(leaf_slot(&s.g.mem, s.pt.root(), va(i))).unwrap();
                let dirty = leaf & FlPte::D != 0;
                let preset = pages[i as usize].3;
                prop_assert!(dirty || !written[i as usize], "page {} written, D clear", i);
                prop_assert!(!dirty || preset || covered[i as usize], "page {} dirty unwritten", i);
            }
        }
    }
}

/// Pages of the buffer the stress test's device reads in one access.
const STRESS_PAGES: u64 = 4;
/// Guest frames (`STRESS_PAGES` contiguous pages each) the guest maps the buffer to in
/// turn; the one it just unmapped is filled with another owner's bytes.
const STRESS_BLOCKS: u64 = 3;
/// Rounds of remap (or unmap) + invalidation + reuse of the old frames.
const STRESS_ROUNDS: u64 = 600;
/// Mapping generations the device's checks can look back on (an access spans two rounds
/// at most: each round waits for the device first).
const STRESS_RING: u64 = 8;
/// What the old frames hold once they belong to someone else.
const POISON: u64 = u64::MAX;
/// How long one side waits for the other before declaring it stuck (never reached when
/// both run; generous for a loaded machine).
const STRESS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// The address of the first-level leaf entry of `va` in the 4-level table at `root`.
fn leaf_slot(mem: &GuestMemoryMmap, root: u64, va: u64) -> u64 {
    let mut table = root;
    for level in (2..=4u32).rev() {
        let index = (va >> (12 + 9 * (level - 1))) & 0x1ff;
        let entry = mem.read_u64(table + index * 8).unwrap();
        assert_ne!(entry & FlPte::P, 0);
        table = entry & FlPte::ADDR_MASK;
    }
    table + ((va >> 12) & 0x1ff) * 8
}

/// Fills `STRESS_PAGES` pages at `gpa` with the 8-byte word `word`.
fn fill_block(mem: &GuestMemoryMmap, gpa: u64, word: u64) {
    let bytes: Vec<u8> = std::iter::repeat_n(word.to_le_bytes(), (STRESS_PAGES * 512) as usize)
        .flatten()
        .collect();
    mem.write(gpa, &bytes).unwrap();
}

/// Waits until `done` holds; false if `stop` came first.
fn wait_until(done: impl Fn() -> bool, stop: impl Fn() -> bool) -> bool {
    let start = std::time::Instant::now();
    while !done() {
        if stop() {
            return false;
        }
        assert!(
            start.elapsed() < STRESS_PATIENCE,
            "the other side made no progress"
        );
        std::thread::yield_now();
    }
    true
}

/// What the stress test's guest has published: the mapping generations it installed and
/// those whose invalidation wait completed, the frame block of each (0: unmapped), and
/// the hold it puts on the device's next walk.
#[derive(Default)]
struct Published {
    installed: std::sync::atomic::AtomicU64,
    completed: std::sync::atomic::AtomicU64,
    blocks: [std::sync::atomic::AtomicU64; STRESS_RING as usize],
    /// The next walk that reads a leaf of the buffer is held after the read...
    hold: std::sync::atomic::AtomicBool,
    /// ...and says so here...
    holding: std::sync::atomic::AtomicBool,
    /// ...until the guest has completed another invalidation.
    stop: std::sync::atomic::AtomicBool,
}

impl Published {
    /// Whether some generation from `from` to `to` (an access began after `from`'s
    /// invalidation completed and ended before `to + 1` was installed) had a frame block
    /// for which `ok` holds.
    fn any(&self, from: u64, to: u64, ok: impl Fn(u64) -> bool) -> bool {
        use std::sync::atomic::Ordering;
        assert!(
            to - from < STRESS_RING,
            "generations {from}..={to} overran the ring"
        );
        (from..=to).any(|g| ok(self.blocks[(g % STRESS_RING) as usize].load(Ordering::Acquire)))
    }
}

/// The vIOMMU's promise to emulated devices, with real threads: once the guest's
/// invalidation wait descriptor completes, no access of an emulated device uses a
/// translation it removed, whether the access went through a vm-memory address space (which
/// holds its IOTLB's read guard from translation to the last byte copied) or asked the
/// vIOMMU for a translation. One thread is the device; the other is the guest, which
/// remaps (or unmaps) the buffer, invalidates with a wait, and then hands the old frames
/// to another owner (fills them with `POISON`). Every word the device reads, and every
/// translation it gets, must belong to a mapping no older than the last one whose wait had
/// completed when the access began.
///
/// Every other round the guest first makes the device walk, holds that walk after it read
/// the old leaf entry, and only then remaps and invalidates: the walk's fill races the
/// invalidation (the case the vIOMMU's and the address spaces' fill epochs are for). The
/// other rounds invalidate while the device copies through cached translations (the case
/// the read guard is for). Bounded by rounds, not time.
#[test]
fn no_emulated_dma_uses_a_translation_after_its_invalidation_wait_completed() {
    use std::sync::atomic::{AtomicU64, Ordering};

    let s = setup(false);
    let (g, dev, p) = (&s.g, s.dev, s.p);
    let block_gpa = |gen: u64| 0x80_0000 + (gen % STRESS_BLOCKS) * STRESS_PAGES * 4096;
    // The buffer: STRESS_PAGES pages at VA, mapped to the block of generation 0.
    let mut pt = g.page_table();
    for i in 0..STRESS_PAGES {
        g.map(&mut pt, VA + i * 4096, block_gpa(0) + i * 4096);
    }
    g.set_pasid_entry(
        dev,
        p,
        Some(fl_entry(1, pt.root(), FlPagingMode::FourLevel)),
    );
    let slots: Vec<u64> = (0..STRESS_PAGES)
        .map(|i| leaf_slot(&g.mem, pt.root(), VA + i * 4096))
        .collect();
    // Accessed already, so that a walk reads the leaf and writes nothing back to it.
    let leaf_flags: Vec<u64> = slots
        .iter()
        .map(|&at| g.mem.read_u64(at).unwrap() & !FlPte::ADDR_MASK | FlPte::A)
        .collect();
    fill_block(&g.mem, block_gpa(0), 0);

    let published = Arc::new(Published::default());
    published.blocks[0].store(block_gpa(0), Ordering::Release);
    let (hold_slots, hold) = (slots.clone(), published.clone());
    g.ram.on_read(Arc::new(move |addr| {
        if hold_slots.contains(&addr) && hold.hold.swap(false, Ordering::AcqRel) {
            let seen = hold.completed.load(Ordering::Acquire);
            hold.holding.store(true, Ordering::Release);
            wait_until(
                || hold.completed.load(Ordering::Acquire) != seen,
                || hold.stop.load(Ordering::Acquire),
            );
            hold.holding.store(false, Ordering::Release);
        }
    }));
    let accesses = AtomicU64::new(0);
    let io: IoMem = IommuMemory::new(
        (*g.mem).clone(),
        g.viommu.address_space(dev, Some(p), false),
        true,
        (),
    );

    std::thread::scope(|scope| {
        let device = scope.spawn(|| -> Result<(u64, u64), String> {
            let len = (STRESS_PAGES * 4096) as usize;
            let (mut read, mut refused) = (0, 0);
            while !published.stop.load(Ordering::Acquire) {
                // An access through the vm-memory address space.
                let from = published.completed.load(Ordering::Acquire);
                let got = io_read(&io, VA, len);
                let to = published.installed.load(Ordering::Acquire);
                match got {
                    Ok(bytes) => {
                        read += 1;
                        for (i, w) in bytes.chunks_exact(8).enumerate() {
                            let w = u64::from_le_bytes(w.try_into().unwrap());
                            if !(from..=to).contains(&w) {
                                return Err(format!(
                                    "word {i} of an access that began after generation {from}'s \
                                     invalidation completed holds {w:#x} (generations {from}..={to} \
                                     are current): a translation outlived its invalidation"
                                ));
                            }
                        }
                    }
                    // Invalidations raced each of its fills: nothing was read.
                    Err(e) if e.to_string().contains("invalidations kept removing") => {}
                    Err(e) => {
                        refused += 1;
                        if !published.any(from, to, |block| block == 0) {
                            return Err(format!(
                                "an access during generations {from}..={to}, all mapped, failed: {e}"
                            ));
                        }
                    }
                }
                // Translations asked of the vIOMMU, page by page, every other access.
                let raw = if read % 2 == 0 { STRESS_PAGES } else { 0 };
                for i in 0..raw {
                    let from = published.completed.load(Ordering::Acquire);
                    let t = g.viommu.translate(dev, Some(p), VA + i * 4096, AccessRequest::READ);
                    let to = published.installed.load(Ordering::Acquire);
                    let fits = match &t {
                        Ok(t) => published.any(from, to, |block| {
                            block != 0 && t.gpa.raw() == block + i * 4096
                        }),
                        Err(_) => published.any(from, to, |block| block == 0),
                    };
                    if !fits {
                        return Err(format!(
                            "page {i} translated to {t:?} during generations {from}..={to}"
                        ));
                    }
                }
                accesses.fetch_add(1, Ordering::AcqRel);
            }
            Ok((read, refused))
        });
        let stopped = || device.is_finished();
        let flush = |gen: u64| match gen % 3 {
            0 => InvDesc::PasidIotlb {
                granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
                did: DomainId(1),
                pasid: p,
                addr: VA,
                ih: false,
                am: STRESS_PAGES.trailing_zeros() as u8,
            },
            1 => piotlb(1, p, None),
            _ => InvDesc::Iotlb {
                granularity: vsva_vtd::inv_desc::IotlbGranularity::Global,
                dr: true,
                dw: true,
                did: DomainId(0),
                addr: 0,
                ih: false,
                am: 0,
            },
        };

        let (mut held, mut copying) = (0, 0);
        for gen in 1..=STRESS_ROUNDS {
            if gen % 2 == 1 {
                // Make the device walk, and hold the walk once it read the leaf.
                published.hold.store(true, Ordering::Release);
                assert!(g.submit_sync(&[piotlb(1, p, None)]));
                if !wait_until(|| published.holding.load(Ordering::Acquire), stopped) {
                    break;
                }
                held += 1;
            } else {
                // The device translated the current mapping and is copying through it.
                let target = accesses.load(Ordering::Acquire) + 2;
                if !wait_until(|| accesses.load(Ordering::Acquire) >= target, stopped) {
                    break;
                }
                copying += 1;
            }
            // Every fifth generation leaves the buffer unmapped.
            let block = if gen % 5 == 0 { 0 } else { block_gpa(gen) };
            if block != 0 {
                fill_block(&g.mem, block, gen);
            }
            published.blocks[(gen % STRESS_RING) as usize].store(block, Ordering::Release);
            published.installed.store(gen, Ordering::Release);
            for (i, (&at, &flags)) in slots.iter().zip(&leaf_flags).enumerate() {
                let leaf = if block == 0 {
                    0
                } else {
                    (block + i as u64 * 4096) | flags
                };
                g.mem.write_u64(at, leaf).unwrap();
            }
            assert!(
                g.submit_sync(&[flush(gen)]),
                "generation {gen}: the wait did not complete"
            );
            published.completed.store(gen, Ordering::Release);
            // The wait completed: the old frames belong to someone else now.
            let old = published.blocks[((gen - 1) % STRESS_RING) as usize].load(Ordering::Acquire);
            if old != 0 {
                fill_block(&g.mem, old, POISON);
            }
        }
        published.stop.store(true, Ordering::Release);
        let (read, refused) = device.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        // The race ran: every round raced a held walk or copies.
        assert_eq!(held + copying, STRESS_ROUNDS);
        assert!(
            read > 0 && refused > 0,
            "{read} accesses read, {refused} refused"
        );
        eprintln!("{held} walks held, {copying} rounds during copies; {read} accesses read, {refused} refused");
    });
}
