//! Tests of the IOMMU model programmed as a driver does: tables in host memory, registers
//! by MMIO, invalidations through the queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vsva_mem::PhysMem;

use vsva_mem::MemWindow;
use vsva_vtd::context::{context_entry_addr, ScalableContextEntry};
use vsva_vtd::inv_desc::{
    ContextCacheGranularity, IotlbGranularity, PasidCacheGranularity, PasidIotlbGranularity,
    ResponseCode,
};
use vsva_vtd::pasid::{pasid_dir_entry_addr, pasid_entry_addr, PasidDirEntry};
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::regs::layout::{fsts, gcmd, gsts, iq, offset};
use vsva_vtd::regs::{Cap, Ecap};
use vsva_vtd::root::root_entry_addr;
use vsva_vtd::{
    addr::DomainId, addr::Pasid, addr::SourceId, builder::MapFlags, builder::PageTableBuilder,
    builder::TableFormat, fault::FaultReason, flpte::FlPagingMode, inv_desc::InvDesc,
    pasid::PasidEntry, pasid::Pgtt, root::Capabilities, root::ScalableRootEntry, slpte::SlLevels,
    slpte::SlPte, walk::AccessRequest, walk::PageSize,
};

use super::{Iommu, IommuConfig, IommuConfigError, Source};
use crate::dma::port::{
    AtsEndpoint, DevTlbInvalidation, DmaAccess, DmaPort, PageRequestMessage, PcieCapabilities,
    PrgResponse,
};
use crate::memory::{FrameAllocator, HostMemory};

const SID: SourceId = SourceId::from_rid(0x0010);
const DID: DomainId = DomainId(7);

/// A bare-metal driver: just enough to program the model.
struct Rig {
    mem: Arc<HostMemory>,
    frames: FrameAllocator,
    iommu: Arc<Iommu>,
    iq: u64,
    tail: u64,
    ctx_table: u64,
    pasid_table: u64,
    status: u64,
}

impl Rig {
    fn new(strict: bool) -> Rig {
        let mem = HostMemory::new(256 << 20).unwrap();
        let frames = FrameAllocator::new(mem.clone());
        let iommu = Iommu::new(
            mem.clone(),
            IommuConfig {
                strict,
                ..IommuConfig::default()
            },
        )
        .unwrap();
        let root = frames.alloc_frame().unwrap().0;
        let ctx_table = frames.alloc_frame().unwrap().0;
        let pasid_dir = frames.alloc_frame().unwrap().0;
        let pasid_table = frames.alloc_frame().unwrap().0;
        let iq = frames.alloc_frame().unwrap().0;
        let status = frames.alloc_frame().unwrap().0;
        let re = ScalableRootEntry {
            lctp: Some(ctx_table),
            uctp: None,
        }
        .to_raw();
        write_qwords(&mem, root_entry_addr(root, SID.bus()), &re);
        let ce = ScalableContextEntry {
            dte: true,
            paside: true,
            pre: true,
            pdts: 0,
            pasiddirptr: pasid_dir,
            ..ScalableContextEntry::default()
        };
        write_qwords(
            &mem,
            context_entry_addr(ctx_table, SID.devfn()),
            &ce.to_raw(),
        );
        let pde = PasidDirEntry {
            fpd: false,
            smptblptr: pasid_table,
        }
        .to_raw();
        mem.write_u64(
            pasid_dir_entry_addr(pasid_dir, 0, Pasid::RID_PASID).unwrap(),
            pde,
        )
        .unwrap();
        let rig = Rig {
            mem,
            frames,
            iommu,
            iq,
            tail: 0,
            ctx_table,
            pasid_table,
            status,
        };
        rig.write(offset::RTADDR, 8, root | 1 << 10);
        rig.command(gcmd::SRTP);
        rig.write(offset::IQA, 8, iq | iq::IQA_DW);
        rig.command(gcmd::QIE);
        rig.command(gcmd::TE);
        rig
    }

    fn write(&self, off: u64, size: usize, value: u64) {
        self.iommu.mmio_write(off, size, value).unwrap();
    }

    fn read(&self, off: u64, size: usize) -> u64 {
        self.iommu.mmio_read(off, size).unwrap()
    }

    /// One GCMD command, keeping the enables already on, as Linux does.
    fn command(&self, bit: u32) {
        let keep = self.read(offset::GSTS, 4) as u32 & (gsts::TES | gsts::QIES);
        self.write(offset::GCMD, 4, (keep | bit) as u64);
    }

    /// Writes the context entry of `SID` (`None`: not present).
    fn set_context_entry(&self, ce: Option<&ScalableContextEntry>) {
        let raw = ce.map(|e| e.to_raw()).unwrap_or_default();
        write_qwords(
            &self.mem,
            context_entry_addr(self.ctx_table, SID.devfn()),
            &raw,
        );
    }

    fn set_pasid_entry(&self, pasid: Pasid, pe: Option<&PasidEntry>) {
        let raw = pe.map(|e| e.to_raw()).unwrap_or([0; 8]);
        write_qwords(&self.mem, pasid_entry_addr(self.pasid_table, pasid), &raw);
    }

    /// Queues descriptors and a wait, writes IQT, and checks the wait's status write.
    fn invalidate(&mut self, descs: &[InvDesc]) {
        let marker = self.tail as u32 + 1;
        let wait = InvDesc::InvWait {
            sw: true,
            interrupt: false,
            fence: true,
            pd: false,
            status_data: marker,
            status_addr: self.status,
        };
        for d in descs.iter().chain([&wait]) {
            write_qwords(&self.mem, self.iq + self.tail * 32, &d.encode().unwrap());
            self.tail = (self.tail + 1) % 128;
        }
        self.write(offset::IQT, 8, self.tail * 32);
        let mut b = [0u8; 4];
        self.mem.read(self.status, &mut b).unwrap();
        assert_eq!(
            u32::from_le_bytes(b),
            marker,
            "the wait descriptor wrote its status"
        );
    }

    /// A 4-level first-level table bound to `pasid` (PGTT=001b in domain `DID`).
    fn first_level(&self, pasid: Pasid) -> PageTableBuilder {
        let fl = self.tables(TableFormat::FirstLevel(FlPagingMode::FourLevel));
        self.set_pasid_entry(pasid, Some(&first_level_entry(fl.root())));
        fl
    }

    fn tables(&self, format: TableFormat) -> PageTableBuilder {
        PageTableBuilder::new(format, &*self.mem, &mut &self.frames).unwrap()
    }

    fn map(&self, t: &mut PageTableBuilder, va: u64, pa: u64, flags: MapFlags) {
        t.map(
            &*self.mem,
            &mut &self.frames,
            va,
            pa,
            PageSize::Size4K,
            flags,
        )
        .unwrap();
    }
}

fn write_qwords(mem: &HostMemory, addr: u64, qwords: &[u64]) {
    for (i, q) in qwords.iter().enumerate() {
        mem.write_u64(addr + 8 * i as u64, *q).unwrap();
    }
}

fn pasid(raw: u32) -> Pasid {
    Pasid::new(raw).unwrap()
}

fn first_level_entry(root: u64) -> PasidEntry {
    PasidEntry {
        flptptr: root,
        ..PasidEntry::new(Pgtt::FirstLevel, DID)
    }
}

fn rw() -> MapFlags {
    MapFlags::READ | MapFlags::WRITE | MapFlags::USER
}

#[test]
fn the_capability_registers_describe_what_entries_are_checked_against() {
    let full = IommuConfig::default().caps;
    let lesser = Capabilities {
        haw: 39,
        sagaw: 0b0010,
        fl5lp: false,
        nest: false,
        pt: false,
        dt: false,
        prs: false,
        mts: false,
        ..full
    };
    for caps in [full, lesser] {
        let mem = HostMemory::new(16 << 20).unwrap();
        let iommu = Iommu::new(
            mem,
            IommuConfig {
                caps,
                strict: false,
            },
        )
        .unwrap();
        let cap = Cap::from_raw(iommu.mmio_read(offset::CAP, 8).unwrap());
        let ecap = Ecap::from_raw(iommu.mmio_read(offset::ECAP, 8).unwrap());
        assert_eq!(Capabilities::from_registers(&cap, &ecap), caps);
    }
}

#[test]
fn an_address_width_the_formats_cannot_have_is_refused() {
    let mem = HostMemory::new(16 << 20).unwrap();
    for haw in [31, 53, 64] {
        let mut config = IommuConfig::default();
        config.caps.haw = haw;
        assert_eq!(
            Iommu::new(mem.clone(), config).unwrap_err(),
            IommuConfigError::AddressWidth(vsva_vtd::flpte::InvalidAddressWidth(haw))
        );
    }
}

#[test]
fn translation_disabled_passes_addresses_through() {
    let mem = HostMemory::new(16 << 20).unwrap();
    let iommu = Iommu::new(mem, IommuConfig::default()).unwrap();
    let m = iommu
        .translate(SID, None, 0x1234, AccessRequest::READ)
        .unwrap();
    assert_eq!((m.hpa, m.source), (0x1234, Source::Untranslated));
}

#[test]
fn strict_mode_and_the_root_table_latch_leave_each_other_alone() {
    let rig = Rig::new(false);
    let request = || {
        rig.iommu
            .translate(SID, Some(pasid(1)), 0x1000, AccessRequest::READ)
            .map_err(|f| f.reason)
    };
    // Translation is on: PASID 1 has no entry.
    assert_eq!(request(), Err(FaultReason::Spt2));
    assert!(!rig.iommu.strict());
    rig.iommu.set_strict(true);
    assert!(rig.iommu.strict());
    assert_eq!(request(), Err(FaultReason::Spt2));
    // Latching the root table again keeps strict mode on.
    rig.command(gcmd::SRTP);
    assert!(rig.iommu.strict());
    assert_eq!(request(), Err(FaultReason::Spt2));
    rig.iommu.set_strict(false);
    assert!(!rig.iommu.strict());
    assert_eq!(request(), Err(FaultReason::Spt2));
    // Disabling translation leaves strict mode on.
    rig.iommu.set_strict(true);
    rig.write(offset::GCMD, 4, 0);
    assert!(rig.iommu.strict());
    assert_eq!(
        rig.iommu
            .translate(SID, Some(pasid(1)), 0x1000, AccessRequest::READ)
            .map(|m| m.source),
        Ok(Source::Untranslated)
    );
}

#[test]
fn first_level_translation_hits_the_iotlb_the_second_time() {
    let rig = Rig::new(false);
    let mut fl = rig.first_level(pasid(5));
    rig.map(&mut fl, 0x7000_1000, 0x50_0000, rw());
    let first = rig
        .iommu
        .translate(SID, Some(pasid(5)), 0x7000_1234, AccessRequest::WRITE)
        .unwrap();
    assert_eq!((first.hpa, first.source), (0x50_0234, Source::Walk));
    let again = rig
        .iommu
        .translate(SID, Some(pasid(5)), 0x7000_1ff8, AccessRequest::READ)
        .unwrap();
    assert_eq!((again.hpa, again.source), (0x50_0ff8, Source::Iotlb));
}

/// VT-d IOTLB entries are tagged by domain id: once a PASID entry is re-read with another
/// domain id (after a PASID-cache invalidation, with no IOTLB invalidation; the model
/// re-reads it on the next IOTLB miss of its requester and PASID), the entries filled under
/// the old one no longer serve, however often the domain id goes back and forth; a re-read
/// with the same domain id keeps them.
#[test]
fn a_pasid_entry_read_with_another_domain_id_no_longer_hits_the_old_domains_entries() {
    let mut rig = Rig::new(false);
    let p = pasid(3);
    let (va, old_base, new_base) = (0x7000_0000, 0x50_0000, 0x60_0000);
    let mut fl = rig.first_level(p);
    let mut fl2 = rig.tables(TableFormat::FirstLevel(FlPagingMode::FourLevel));
    for i in 0..8 {
        rig.map(&mut fl, va + i * 0x1000, old_base + i * 0x1000, rw());
        rig.map(&mut fl2, va + i * 0x1000, new_base + i * 0x1000, rw());
    }
    let other = PasidEntry {
        flptptr: fl2.root(),
        ..PasidEntry::new(Pgtt::FirstLevel, DomainId(8))
    };
    let translate = |rig: &Rig, page: u64| {
        rig.iommu
            .translate(SID, Some(p), va + page * 0x1000, AccessRequest::READ)
            .map(|m| (m.hpa, m.source))
    };
    let pasid_cache = |did| InvDesc::PasidCache {
        granularity: PasidCacheGranularity::PasidSelective,
        did,
        pasid: p,
    };
    // Each round misses on pages not cached yet, which re-reads the PASID entry.
    let mut fresh = 1..8;
    let mut miss = |rig: &Rig| translate(rig, fresh.next().unwrap()).unwrap().1;
    assert_eq!(translate(&rig, 0), Ok((old_base, Source::Walk)));
    for _ in 0..2 {
        assert_eq!(translate(&rig, 0), Ok((old_base, Source::Iotlb)));
        rig.set_pasid_entry(p, Some(&other));
        rig.invalidate(&[pasid_cache(DID)]);
        assert_eq!(miss(&rig), Source::Walk);
        assert_eq!(translate(&rig, 0), Ok((new_base, Source::Walk)), "domain 8");
        rig.invalidate(&[pasid_cache(DomainId(8))]);
        assert_eq!(miss(&rig), Source::Walk);
        assert_eq!(
            translate(&rig, 0),
            Ok((new_base, Source::Iotlb)),
            "re-read in the same domain"
        );
        rig.set_pasid_entry(p, Some(&first_level_entry(fl.root())));
        rig.invalidate(&[pasid_cache(DomainId(8))]);
        assert_eq!(miss(&rig), Source::Walk);
        assert_eq!(
            translate(&rig, 0),
            Ok((old_base, Source::Walk)),
            "domain 7 again"
        );
    }
}

#[test]
fn a_stale_translation_survives_until_the_matching_invalidation() {
    let mut rig = Rig::new(true);
    let p = pasid(9);
    let mut fl = rig.first_level(p);
    rig.map(&mut fl, 0x4000, 0x60_0000, rw());
    rig.iommu
        .translate(SID, Some(p), 0x4000, AccessRequest::READ)
        .unwrap();

    // The driver remaps the page without invalidating: hardware keeps the old page.
    fl.unmap(&*rig.mem, 0x4000, PageSize::Size4K).unwrap();
    rig.map(&mut fl, 0x4000, 0x70_0000, rw());
    let stale = rig
        .iommu
        .translate(SID, Some(p), 0x4010, AccessRequest::READ)
        .unwrap();
    assert_eq!(stale.hpa, 0x60_0010, "the IOTLB still holds the old page");
    let reports = rig.iommu.take_stale_translations();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].now, Ok((0x70_0000, 12)));
    let expected = pasid_page(p, 0x4000);
    assert_eq!(reports[0].missing, expected);

    // An invalidation of another PASID or page does not help ...
    rig.invalidate(&[pasid_page(p, 0x5000)]);
    rig.invalidate(&[InvDesc::PasidIotlb {
        granularity: PasidIotlbGranularity::PasidSelective,
        did: DID,
        pasid: pasid(10),
        addr: 0,
        ih: false,
        am: 0,
    }]);
    let still = rig
        .iommu
        .translate(SID, Some(p), 0x4000, AccessRequest::READ)
        .unwrap();
    assert_eq!(still.hpa, 0x60_0000);
    assert_eq!(
        rig.iommu.take_stale_translations().len(),
        1,
        "each stale hit is reported"
    );
    // ... the one the report named does.
    rig.invalidate(&[expected]);
    let fresh = rig
        .iommu
        .translate(SID, Some(p), 0x4000, AccessRequest::READ)
        .unwrap();
    assert_eq!((fresh.hpa, fresh.source), (0x70_0000, Source::Walk));
    assert!(rig.iommu.take_stale_translations().is_empty());
}

#[test]
fn a_cleared_pasid_entry_is_used_until_the_pasid_cache_and_iotlb_are_flushed() {
    let mut rig = Rig::new(false);
    let p = pasid(3);
    let mut fl = rig.first_level(p);
    rig.map(&mut fl, 0x1000, 0x30_0000, rw());
    rig.iommu
        .translate(SID, Some(p), 0x1000, AccessRequest::READ)
        .unwrap();
    rig.set_pasid_entry(p, None);
    // Another page of the PASID walks with the cached PASID entry.
    rig.map(&mut fl, 0x2000, 0x31_0000, rw());
    assert_eq!(
        rig.iommu
            .translate(SID, Some(p), 0x2000, AccessRequest::READ)
            .unwrap()
            .hpa,
        0x31_0000
    );
    rig.invalidate(&[InvDesc::PasidCache {
        granularity: PasidCacheGranularity::PasidSelective,
        did: DID,
        pasid: p,
    }]);
    // The IOTLB still has the first page; a new page now reads the cleared entry.
    assert_eq!(
        rig.iommu
            .translate(SID, Some(p), 0x1000, AccessRequest::READ)
            .unwrap()
            .hpa,
        0x30_0000
    );
    let f = rig
        .iommu
        .translate(SID, Some(p), 0x3000, AccessRequest::READ)
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::Spt2);
    rig.invalidate(&[InvDesc::PasidIotlb {
        granularity: PasidIotlbGranularity::PasidSelective,
        did: DID,
        pasid: p,
        addr: 0,
        ih: false,
        am: 0,
    }]);
    let f = rig
        .iommu
        .translate(SID, Some(p), 0x1000, AccessRequest::READ)
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::Spt2);
    assert!(rig.iommu.iotlb().is_empty());
}

#[test]
fn second_level_and_nested_translation_and_domain_invalidation() {
    let mut rig = Rig::new(false);
    let mut sl = rig.tables(TableFormat::SecondLevel(SlLevels::Four));
    // Guest RAM: GPA 0..64 KiB at HPA 1 MiB.
    for page in 0..16u64 {
        sl.map(
            &*rig.mem,
            &mut &rig.frames,
            page << 12,
            0x10_0000 + (page << 12),
            PageSize::Size4K,
            MapFlags::READ | MapFlags::WRITE,
        )
        .unwrap();
    }
    // Guest first-level tables live in guest RAM: build them through the SL view.
    let gpa_to_hpa = |gpa: u64| 0x10_0000 + gpa;
    let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
    let fl_table = |e: u64| e | 0x7; // P, R/W, U/S
    rig.mem.write_u64(gpa_to_hpa(pml4), fl_table(pdpt)).unwrap();
    rig.mem.write_u64(gpa_to_hpa(pdpt), fl_table(pd)).unwrap();
    rig.mem.write_u64(gpa_to_hpa(pd), fl_table(pt)).unwrap();
    rig.mem
        .write_u64(gpa_to_hpa(pt) + 8 * 5, 0x9000 | 0x7)
        .unwrap(); // GVA 0x5000 -> GPA 0x9000
    let nested = PasidEntry {
        pgtt: Pgtt::Nested,
        slptptr: sl.root(),
        flptptr: pml4,
        ..first_level_entry(0)
    };
    rig.set_pasid_entry(pasid(4), Some(&nested));
    let second = PasidEntry {
        pgtt: Pgtt::SecondLevel,
        slptptr: sl.root(),
        ..first_level_entry(0)
    };
    rig.set_pasid_entry(Pasid::RID_PASID, Some(&second));

    let m = rig
        .iommu
        .translate(SID, Some(pasid(4)), 0x5abc, AccessRequest::WRITE)
        .unwrap();
    assert_eq!(m.hpa, gpa_to_hpa(0x9abc));
    // A cold nested walk, 4-level over 4-level, with every cache empty: 4 first-level
    // entries; a full 4-level second-level walk for the PML4's guest page; then the SL-PDE
    // cache entry that walk left (all guest tables and the page sit in the first 2 MiB of
    // guest RAM) starts the second-level walks of the PDPT, the PD, the page table and the
    // final address at their last level (4 × 1). Setting the accessed bits writes through
    // the second level with the cached mapping of each table page (writable, SLADE off): no
    // reads. Without the paging-structure caches this was 24 + 16 reads.
    let stats = rig.iommu.stats();
    assert_eq!(stats.walks.load(Ordering::Relaxed), 1);
    assert_eq!(stats.table_reads.load(Ordering::Relaxed), 4 + 4 + 4);
    let d = rig
        .iommu
        .translate(SID, None, 0x9000, AccessRequest::READ)
        .unwrap();
    assert_eq!(d.hpa, gpa_to_hpa(0x9000));
    let e = rig
        .iommu
        .explain(SID, Some(pasid(4)), 0x5abc, AccessRequest::READ);
    assert_eq!(e.result.unwrap().output, gpa_to_hpa(0x9abc));
    assert_eq!(e.walk.steps.len(), 24);
    let text = e.to_string();
    assert!(
        text.contains("PGTT=Nested") && text.contains("result: HPA"),
        "{text}"
    );
    let miss = rig
        .iommu
        .explain(SID, Some(pasid(4)), 0x6000, AccessRequest::READ);
    assert_eq!(miss.result, Err(FaultReason::Sfl2));
    assert!(miss.to_string().contains("SFL.2"));
    // The walk set A and D in the guest's entries, as the CPU would.
    assert_eq!(
        rig.mem.read_u64(gpa_to_hpa(pt) + 8 * 5).unwrap() & 0x60,
        0x60
    );

    // Unmapping GPA 0x9000 in the second level: a page-selective IOTLB invalidation of the
    // domain drops the second-level entry and every nested entry of the domain.
    sl.unmap(&*rig.mem, 0x9000, PageSize::Size4K).unwrap();
    assert_eq!(
        rig.iommu
            .translate(SID, Some(pasid(4)), 0x5000, AccessRequest::READ)
            .unwrap()
            .source,
        Source::Iotlb
    );
    rig.invalidate(&[InvDesc::Iotlb {
        granularity: IotlbGranularity::PageSelective,
        dr: true,
        dw: true,
        did: DID,
        addr: 0x9000,
        ih: false,
        am: 0,
    }]);
    let f = rig
        .iommu
        .translate(SID, Some(pasid(4)), 0x5000, AccessRequest::READ)
        .unwrap_err();
    assert_eq!(
        f.reason,
        FaultReason::Ssl2,
        "the final GPA is no longer mapped"
    );
    let f = rig
        .iommu
        .translate(SID, None, 0x9000, AccessRequest::READ)
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::Ssl2);
}

#[test]
fn faults_are_recorded_unless_recoverable_and_page_requests_are_queued() {
    let rig = Rig::new(false);
    rig.first_level(pasid(6));
    let irqs = Arc::new(AtomicUsize::new(0));
    let seen = irqs.clone();
    rig.iommu.set_interrupt_handler(Arc::new(move |_| {
        seen.fetch_add(1, Ordering::Relaxed);
    }));
    // Fault and page request events come out of reset masked (IM set): unmask them.
    rig.write(offset::FECTL, 4, 0);
    rig.write(offset::PECTL, 4, 0);

    // An untranslated request that faults is recorded with its reason and address.
    let f = DmaPort::remap(
        &*rig.iommu,
        SID,
        Some(pasid(6)),
        0xdead_b000,
        DmaAccess::WRITE,
    )
    .unwrap_err();
    assert_eq!(f.condition(), Some(FaultReason::Sfl2));
    assert!(!f.recoverable);
    assert_ne!(rig.read(offset::FSTS, 4) as u32 & fsts::PPF, 0);
    let lo = rig.read(0x400, 8);
    let hi = rig.read(0x408, 8);
    assert_eq!(lo, 0xdead_b000);
    assert_eq!((hi >> 32) & 0xff, FaultReason::Sfl2.code() as u64);
    assert_eq!(hi & 0xffff, SID.rid() as u64);
    assert_eq!(irqs.load(Ordering::Relaxed), 1, "fault event raised");

    // A translation request gets a recoverable fault and records nothing more.
    let f = rig
        .iommu
        .ats_translate(SID, Some(pasid(6)), 0xdead_c000, DmaAccess::READ)
        .unwrap_err();
    assert!(f.recoverable);
    assert_eq!(rig.iommu.stats().faults.load(Ordering::Relaxed), 1);

    // The page request lands in the page request queue.
    let pq = rig.frames.alloc_frame().unwrap().0;
    rig.write(offset::PQA, 8, pq);
    rig.iommu.page_request(PageRequestMessage {
        sid: SID,
        pasid: Some(pasid(6)),
        addr: 0xdead_c000,
        access: DmaAccess::READ,
        prgi: 17,
        last: true,
    });
    assert_eq!(rig.read(offset::PQT, 8), 32);
    let raw = [0, 8, 16, 24].map(|o| rig.mem.read_u64(pq + o).unwrap());
    let d = PageRequestDesc::decode(raw).unwrap();
    assert_eq!(
        (d.rid, d.pasid, d.addr, d.prg_index, d.lpig),
        (SID, Some(pasid(6)), 0xdead_c000, 17, true)
    );
    assert_eq!(irqs.load(Ordering::Relaxed), 2, "page request event raised");
}

#[test]
fn an_invalid_descriptor_stops_the_queue_with_iqe() {
    let rig = Rig::new(false);
    write_qwords(&rig.mem, rig.iq, &[0xf, 0, 0, 0]);
    rig.write(offset::IQT, 8, 32);
    assert_ne!(rig.read(offset::FSTS, 4) as u32 & fsts::IQE, 0);
    assert_eq!(
        rig.read(offset::IQH, 8),
        0,
        "IQH stays on the bad descriptor"
    );
}

/// A wait descriptor writing `marker` to `addr`.
/// Page-selective-within-PASID PASID-based-IOTLB invalidation of the 4-KiB page at `addr`
/// of `DID` and `p` (§6.5.2.4), IH clear.
fn pasid_page(p: Pasid, addr: u64) -> InvDesc {
    InvDesc::PasidIotlb {
        granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
        did: DID,
        pasid: p,
        addr,
        ih: false,
        am: 0,
    }
}

/// Domain-selective IOTLB invalidation of `did` (§6.5.2.3), with both drain hints.
fn domain_iotlb(did: DomainId) -> InvDesc {
    InvDesc::Iotlb {
        granularity: IotlbGranularity::DomainSelective,
        dr: true,
        dw: true,
        did,
        addr: 0,
        ih: false,
        am: 0,
    }
}

fn status_wait(addr: u64, marker: u32) -> InvDesc {
    InvDesc::InvWait {
        sw: true,
        interrupt: false,
        fence: false,
        pd: false,
        status_data: marker,
        status_addr: addr,
    }
}

#[test]
fn one_tail_write_drains_a_wrapping_batch_up_to_the_first_bad_descriptor() {
    let mut rig = Rig::new(false);
    // Move IQH and IQT to three slots before the end of the 128-slot queue.
    while rig.tail != 125 {
        rig.invalidate(&[]);
    }
    let status = rig.frames.alloc_frame().unwrap().0;
    let slots = [125u64, 126, 127, 0, 1];
    let good = |i: u32| {
        status_wait(status + 4 * u64::from(i), 0x100 + i)
            .encode()
            .unwrap()
    };
    // Slots 125, 126, 127 and 0 hold waits; slot 1 a reserved type; slot 2 a wait again.
    for (i, &slot) in slots[..4].iter().enumerate() {
        write_qwords(&rig.mem, rig.iq + slot * 32, &good(i as u32));
    }
    write_qwords(&rig.mem, rig.iq + 32, &[0xf, 0, 0, 0]);
    write_qwords(&rig.mem, rig.iq + 2 * 32, &good(5));
    let before = rig.iommu.stats().descriptors.load(Ordering::Relaxed);
    rig.write(offset::IQT, 8, 3 * 32);
    let word = |i: u64| {
        let mut b = [0u8; 4];
        rig.mem.read(status + 4 * i, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    assert_eq!(
        [word(0), word(1), word(2), word(3)],
        [0x100, 0x101, 0x102, 0x103],
        "every descriptor before the bad one, across the wrap, was carried out"
    );
    assert_eq!(
        word(5),
        0,
        "nothing after the bad descriptor was carried out"
    );
    assert_eq!(
        rig.iommu.stats().descriptors.load(Ordering::Relaxed) - before,
        4
    );
    assert_ne!(rig.read(offset::FSTS, 4) as u32 & fsts::IQE, 0);
    assert_eq!(
        rig.read(offset::IQH, 8),
        32,
        "IQH stays on the bad descriptor"
    );
    // Software replaces it and clears IQE; the next tail write goes on from IQH.
    write_qwords(&rig.mem, rig.iq + 32, &good(4));
    rig.write(offset::FSTS, 4, u64::from(fsts::IQE));
    rig.write(offset::IQT, 8, 3 * 32);
    assert_eq!([word(4), word(5)], [0x104, 0x105]);
    assert_eq!(rig.read(offset::IQH, 8), 3 * 32, "the queue is empty again");
    rig.tail = 3;
    rig.invalidate(&[]);
}

#[test]
fn context_cache_invalidation_makes_a_new_context_entry_visible() {
    let mut rig = Rig::new(false);
    rig.first_level(pasid(2));
    let _ = rig
        .iommu
        .translate(SID, Some(pasid(2)), 0x1000, AccessRequest::READ);
    assert_eq!(rig.iommu.cached_entries().0, 1);
    rig.invalidate(&[InvDesc::ContextCache {
        granularity: ContextCacheGranularity::DeviceSelective,
        did: DID,
        sid: SID,
        fm: 0,
    }]);
    assert_eq!(rig.iommu.cached_entries().0, 0);
}

#[test]
fn a_whole_space_address_mask_invalidates_without_overflow() {
    let mut rig = Rig::new(false);
    let p = pasid(12);
    let mut fl = rig.first_level(p);
    rig.map(&mut fl, 0xffff_f000, 0x20_0000, rw());
    rig.iommu
        .translate(SID, Some(p), 0xffff_f000, AccessRequest::READ)
        .unwrap();
    // AM is 6 bits: 52 and above cover the whole address space.
    for am in [52, 63] {
        rig.invalidate(&[InvDesc::PasidIotlb {
            granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
            did: DID,
            pasid: p,
            addr: 0,
            ih: false,
            am,
        }]);
        rig.invalidate(&[InvDesc::Iotlb {
            granularity: IotlbGranularity::PageSelective,
            dr: true,
            dw: true,
            did: DID,
            addr: 0,
            ih: false,
            am,
        }]);
    }
    assert!(rig.iommu.iotlb().is_empty());
}

#[test]
fn a_128_bit_queue_in_scalable_mode_reports_invalid_width() {
    let rig = Rig::new(false);
    rig.command(0); // leave QIE clear: IQA may only change with queued invalidation off
    let sts = rig.read(offset::GSTS, 4) as u32 & gsts::TES;
    rig.write(offset::GCMD, 4, sts as u64);
    rig.write(offset::IQA, 8, rig.iq);
    rig.command(gcmd::QIE);
    let cc = InvDesc::ContextCache {
        granularity: ContextCacheGranularity::Global,
        did: DomainId(0),
        sid: SourceId::from_rid(0),
        fm: 0,
    }
    .encode()
    .unwrap();
    write_qwords(&rig.mem, rig.iq, &cc[..2]);
    rig.write(offset::IQT, 8, 16);
    assert_ne!(rig.read(offset::FSTS, 4) as u32 & fsts::IQE, 0);
    assert_eq!(
        rig.read(offset::IQERCD, 8) & 0xf,
        5,
        "IQEI: invalid descriptor width"
    );
}

/// The paging-structure caches seen through the whole model: reads per IOTLB miss, and
/// stale entries that stay in use until the invalidation the spec names.
mod paging_structure_caches {
    use super::*;
    use vsva_vtd::{builder::FrameSource, flpte::FlPte};

    const MB: u64 = 1 << 20;
    /// Guest RAM size; the guest's page tables take frames from its first MiB.
    const GUEST_RAM: u64 = 16 * MB;
    /// Where the guest's buffer lives in guest physical memory.
    pub(super) const DATA_GPA: u64 = 8 * MB;
    /// The guest virtual address of the buffer (1 GiB aligned).
    pub(super) const GVA: u64 = 0x7f00_0000_0000;
    pub(super) const P: u32 = 21;

    /// Guest physical memory: guest physical address `g` is host physical `base + g`.
    pub(super) type GuestRam<'a> = MemWindow<&'a HostMemory>;

    /// The guest's page-table frames: the first MiB of guest RAM, in order.
    struct GuestFrames {
        next: u64,
    }

    impl FrameSource for GuestFrames {
        fn alloc_table(&mut self) -> Option<u64> {
            let f = self.next;
            self.next += 4096;
            (f < MB).then_some(f)
        }
        fn free_table(&mut self, _frame: u64) {}
    }

    /// A VM with guest RAM mapped by the host's second level in 4-KiB pages, and a guest
    /// process's first-level tables in that RAM, bound nested to PASID `P`.
    pub(super) struct Vm {
        base: u64,
        pub(super) sl: PageTableBuilder,
        fl: PageTableBuilder,
        frames: GuestFrames,
    }

    impl Vm {
        pub(super) fn new(rig: &Rig) -> Vm {
            let base = rig.frames.alloc_range(GUEST_RAM, 2 * MB).unwrap().0;
            let mut sl = rig.tables(TableFormat::SecondLevel(SlLevels::Four));
            for gpa in (0..GUEST_RAM).step_by(4096) {
                sl.map(
                    &*rig.mem,
                    &mut &rig.frames,
                    gpa,
                    base + gpa,
                    PageSize::Size4K,
                    MapFlags::READ | MapFlags::WRITE,
                )
                .unwrap();
            }
            let mut frames = GuestFrames { next: 0x1000 };
            let ram: GuestRam = MemWindow::new(&rig.mem, base, GUEST_RAM);
            let fl = PageTableBuilder::new(
                TableFormat::FirstLevel(FlPagingMode::FourLevel),
                &ram,
                &mut frames,
            )
            .unwrap();
            let vm = Vm {
                base,
                sl,
                fl,
                frames,
            };
            let nested = PasidEntry {
                pgtt: Pgtt::Nested,
                slptptr: vm.sl.root(),
                flptptr: vm.fl.root(),
                ..first_level_entry(0)
            };
            rig.set_pasid_entry(pasid(P), Some(&nested));
            let second = PasidEntry {
                pgtt: Pgtt::SecondLevel,
                slptptr: vm.sl.root(),
                ..first_level_entry(0)
            };
            rig.set_pasid_entry(Pasid::RID_PASID, Some(&second));
            vm
        }

        pub(super) fn ram<'a>(&self, mem: &'a HostMemory) -> GuestRam<'a> {
            MemWindow::new(mem, self.base, GUEST_RAM)
        }

        /// Maps guest virtual page `i` of the buffer to guest physical page `i` of it.
        pub(super) fn map_buffer(&mut self, rig: &Rig, pages: u64) {
            let ram = self.ram(&rig.mem);
            for i in 0..pages {
                self.fl
                    .map(
                        &ram,
                        &mut self.frames,
                        GVA + (i << 12),
                        DATA_GPA + (i << 12),
                        PageSize::Size4K,
                        rw(),
                    )
                    .unwrap();
            }
        }

        /// The guest physical address of the first-level entry for `gva` at `level`.
        pub(super) fn entry(&self, rig: &Rig, gva: u64, level: u8) -> u64 {
            self.fl
                .entry_address(&self.ram(&rig.mem), gva, level)
                .unwrap()
                .unwrap()
        }

        pub(super) fn hpa(&self, gpa: u64) -> u64 {
            self.base + gpa
        }
    }

    fn translate(rig: &Rig, gva: u64) -> Result<(u64, Source), FaultReason> {
        rig.iommu
            .translate(SID, Some(pasid(P)), gva, AccessRequest::READ)
            .map(|m| (m.hpa, m.source))
            .map_err(|f| f.reason)
    }

    fn reads_and_walks(rig: &Rig) -> (u64, u64) {
        let s = rig.iommu.stats();
        (
            s.table_reads.load(Ordering::Relaxed),
            s.walks.load(Ordering::Relaxed),
        )
    }

    fn pasid_iotlb(addr: u64, ih: bool) -> InvDesc {
        InvDesc::PasidIotlb {
            granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
            did: DID,
            pasid: pasid(P),
            addr,
            ih,
            am: 0,
        }
    }

    fn pasid_selective() -> InvDesc {
        InvDesc::PasidIotlb {
            granularity: PasidIotlbGranularity::PasidSelective,
            did: DID,
            pasid: pasid(P),
            addr: 0,
            ih: false,
            am: 0,
        }
    }

    fn iotlb_page(addr: u64, ih: bool) -> InvDesc {
        InvDesc::Iotlb {
            granularity: IotlbGranularity::PageSelective,
            dr: true,
            dw: true,
            did: DID,
            addr,
            ih,
            am: 0,
        }
    }

    #[test]
    fn streaming_4k_dma_through_nested_translation_reads_about_two_entries_per_miss() {
        const PAGES: u64 = 2048;
        let rig = Rig::new(false);
        let mut vm = Vm::new(&rig);
        vm.map_buffer(&rig, PAGES);
        // The first page warms the caches: context, PASID, and the paging structures.
        rig.iommu
            .translate(SID, Some(pasid(P)), GVA, AccessRequest::WRITE)
            .unwrap();
        let (reads0, walks0) = reads_and_walks(&rig);
        for i in 1..PAGES {
            let m = rig
                .iommu
                .translate(SID, Some(pasid(P)), GVA + (i << 12), AccessRequest::WRITE)
                .unwrap();
            assert_eq!(m.source, Source::Walk, "every page misses the IOTLB");
            assert_eq!(m.hpa, vm.hpa(DATA_GPA + (i << 12)));
        }
        let (reads, walks) = reads_and_walks(&rig);
        let (reads, walks) = (reads - reads0, walks - walks0);
        assert_eq!(walks, PAGES - 1);
        let per_miss = reads as f64 / walks as f64;
        eprintln!("nested 4-KiB streaming: {reads} table reads over {walks} IOTLB misses = {per_miss:.3} per miss");
        // Per miss: the first-level PTE (the PDE cache gives its page table, a cached
        // second-level mapping its host address) and the second-level PTE of the page
        // (the SL-PDE cache gives that table). A new 2 MiB region adds a few.
        assert!((2.0..=2.5).contains(&per_miss), "{per_miss}");

        // Requests without PASID through the same second level: one read per miss.
        let (reads0, walks0) = reads_and_walks(&rig);
        for i in 0..PAGES {
            let gpa = DATA_GPA + (i << 12);
            let m = rig
                .iommu
                .translate(SID, None, gpa, AccessRequest::READ)
                .unwrap();
            assert_eq!((m.hpa, m.source), (vm.hpa(gpa), Source::Walk));
        }
        let (reads, walks) = reads_and_walks(&rig);
        let per_miss = (reads - reads0) as f64 / (walks - walks0) as f64;
        assert!((1.0..=1.1).contains(&per_miss), "{per_miss}");
    }

    #[test]
    fn a_walk_whose_pasid_entry_an_invalidation_overtook_fills_no_paging_structure_cache() {
        use vsva_vtd::request::{self, RemappingUnit, Request, RootState};
        let mut rig = Rig::new(false);
        let mut vm = Vm::new(&rig);
        vm.map_buffer(&rig, 1);
        let req = Request {
            sid: SID,
            pasid: Some(pasid(P)),
            addr: GVA,
            access: AccessRequest::READ,
        };
        // A request reads its context and PASID entries, then a PASID-selective
        // invalidation runs to completion before its walk starts.
        let unit = rig.iommu.clone();
        let fill = unit.begin_fill();
        let rta = RootState::scalable_table(unit.root_word()).unwrap();
        let ctx = unit.context_entry(rta, SID).unwrap();
        let pe = request::pasid_entry(&*unit, SID, &ctx, pasid(P)).unwrap();
        rig.invalidate(&[pasid_selective()]);
        let t = unit
            .walk(fill, rta, &req, pasid(P), &pe, AccessRequest::READ)
            .unwrap();
        // The walk's result is the request's, but none of what it read is cached: the
        // entry it started from may be the one the invalidation was for.
        assert_eq!(t.output, vm.hpa(DATA_GPA));
        assert!(
            unit.paging_caches.is_empty(),
            "{:?}",
            unit.paging_caches.len()
        );
        // A walk that started after the invalidation fills them.
        let fill = unit.begin_fill();
        unit.walk(fill, rta, &req, pasid(P), &pe, AccessRequest::READ)
            .unwrap();
        assert!(!unit.paging_caches.is_empty());
    }

    /// Strict mode records a fill an invalidation overtook, with the request and the
    /// descriptor, although nothing stale is ever used; a fill nothing overtook, and any
    /// fill outside strict mode, leave no record.
    #[test]
    fn strict_mode_records_a_fill_an_invalidation_overtook() {
        use crate::iommu::OvertakenFill;
        use vsva_vtd::request::{self, RemappingUnit, Request, RootState};
        for strict in [true, false] {
            let mut rig = Rig::new(strict);
            let mut vm = Vm::new(&rig);
            vm.map_buffer(&rig, 1);
            let req = Request {
                sid: SID,
                pasid: Some(pasid(P)),
                addr: GVA,
                access: AccessRequest::READ,
            };
            let unit = rig.iommu.clone();
            let rta = RootState::scalable_table(unit.root_word()).unwrap();
            let ctx = unit.context_entry(rta, SID).unwrap();
            let pe = request::pasid_entry(&*unit, SID, &ctx, pasid(P)).unwrap();
            // Walk, then an invalidation before the fill: refused and (strict) recorded.
            let fill = unit.begin_fill();
            let t = unit
                .walk(fill, rta, &req, pasid(P), &pe, AccessRequest::READ)
                .unwrap();
            rig.invalidate(&[pasid_iotlb(GVA, false), pasid_selective()]);
            let walked = unit.iotlb_insert(fill, SID, pasid(P), GVA, &pe, &t, AccessRequest::READ);
            assert!(unit.iotlb.lookup(SID, pasid(P), GVA).is_none());
            let records = unit.take_overtaken_fills();
            if strict {
                assert_eq!(
                    records,
                    [OvertakenFill {
                        sid: SID,
                        pasid: pasid(P),
                        addr: GVA,
                        walked: walked.entry(),
                        // The first of the two: it advanced the IOTLB past the fill's token.
                        invalidation: Some(pasid_iotlb(GVA, false)),
                    }]
                );
            } else {
                assert_eq!(records, []);
            }
            // A fill nothing overtook is cached and not recorded.
            let fill = unit.begin_fill();
            let t = unit
                .walk(fill, rta, &req, pasid(P), &pe, AccessRequest::READ)
                .unwrap();
            unit.iotlb_insert(fill, SID, pasid(P), GVA, &pe, &t, AccessRequest::READ);
            assert!(unit.iotlb.lookup(SID, pasid(P), GVA).is_some());
            assert_eq!(unit.take_overtaken_fills(), []);
            assert_eq!(unit.take_stale_translations(), []);
        }
    }

    /// Real threads: one translates a nested PASID's page in a loop while another moves
    /// the page to a new guest frame and invalidates, again and again. A translation that
    /// began after invalidation `v` returned must give the frame of version `v` or of a
    /// later one: an older frame means a walk that raced an invalidation was cached.
    #[test]
    fn translations_after_an_invalidation_returned_never_give_an_older_frame() {
        use std::sync::atomic::AtomicU64;
        use std::time::{Duration, Instant};
        const FRAMES: u64 = 64;
        let mut rig = Rig::new(false);
        let mut vm = Vm::new(&rig);
        vm.map_buffer(&rig, 1);
        let pte = vm.entry(&rig, GVA, 1);
        let frame = |version: u64| DATA_GPA + (version % FRAMES) * 0x1000;
        let mem = rig.mem.clone();
        let ram = vm.ram(&mem);
        ram.write_u64(pte, frame(0) | 0x7).unwrap();
        rig.invalidate(&[pasid_selective()]);
        let published = AtomicU64::new(0);
        let checked = AtomicU64::new(0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let iommu = rig.iommu.clone();
        let versions = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                while !stop.load(Ordering::Acquire) {
                    let before = published.load(Ordering::Acquire);
                    let m = iommu
                        .translate(SID, Some(pasid(P)), GVA, AccessRequest::READ)
                        .unwrap();
                    let after = published.load(Ordering::Acquire);
                    // Versions the tables may have been at: `before` to one being written
                    // after `after`. Too many to tell apart by frame: not checked.
                    if after + 2 - before >= FRAMES {
                        continue;
                    }
                    let ok = (before..=after + 1).any(|v| m.hpa == vm.hpa(frame(v)));
                    assert!(
                        ok,
                        "translation began after invalidation {before} returned and gave \
                         {:#x} ({:?}); expected a frame of versions {before}..={}",
                        m.hpa,
                        m.source,
                        after + 1
                    );
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            });
            // Until enough of both, however the threads are scheduled (the time limit is
            // only a safety net for a stalled machine).
            let start = Instant::now();
            let mut version = 0;
            while (version < 200_000 || checked.load(Ordering::Relaxed) < 200_000)
                && start.elapsed() < Duration::from_secs(120)
                && !reader.is_finished()
            {
                version += 1;
                ram.write_u64(pte, frame(version) | 0x7).unwrap();
                rig.invalidate(&[pasid_selective()]);
                published.store(version, Ordering::Release);
            }
            stop.store(true, Ordering::Release);
            reader.join().unwrap();
            version
        });
        let checked = checked.into_inner();
        eprintln!("{checked} translations checked against {versions} invalidations");
        assert!(
            checked >= 200_000 && versions >= 200_000,
            "{checked} {versions}"
        );
    }

    #[test]
    fn a_changed_pde_uses_the_cached_page_table_until_an_invalidation_with_ih_clear() {
        let mut rig = Rig::new(true);
        let mut vm = Vm::new(&rig);
        vm.map_buffer(&rig, 2);
        let (va0, va1) = (GVA, GVA + 0x1000);
        assert_eq!(translate(&rig, va0), Ok((vm.hpa(DATA_GPA), Source::Walk)));

        // The guest builds a new page table mapping va1 elsewhere and points the PDE at
        // it, without invalidating.
        let new_page = DATA_GPA + 0x40_0000;
        let pt2 = vm.frames.alloc_table().unwrap();
        let mem = rig.mem.clone();
        let ram = vm.ram(&mem);
        ram.write_u64(pt2 + 8, new_page | 0x7).unwrap();
        let pde = vm.entry(&rig, va0, 2);
        let old_pde = ram.read_u64(pde).unwrap();
        ram.write_u64(pde, (old_pde & !FlPte::ADDR_MASK) | pt2)
            .unwrap();
        let fresh = rig
            .iommu
            .explain(SID, Some(pasid(P)), va1, AccessRequest::READ);
        assert_eq!(fresh.result.unwrap().output, vm.hpa(new_page));

        // va1 misses the IOTLB, but the PDE cache still gives the old page table.
        let old = Ok((vm.hpa(DATA_GPA + 0x1000), Source::Walk));
        assert_eq!(translate(&rig, va1), old);
        let reports = rig.iommu.take_stale_translations();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].now, Ok((vm.hpa(new_page), 12)));
        assert_eq!(reports[0].missing, pasid_iotlb(va1, false));

        // IH set says only leaf entries changed: the IOTLB entry goes, the PDE cache stays.
        rig.invalidate(&[pasid_iotlb(va1, true)]);
        assert_eq!(translate(&rig, va1), old);
        // IH clear for a page in another 2 MiB region: the PDPE and PML4E cache entries go,
        // the PDE cache entry of va1's region stays.
        rig.invalidate(&[pasid_iotlb(va0 + 4 * MB, false), pasid_iotlb(va1, true)]);
        assert_eq!(translate(&rig, va1), old);
        assert_eq!(rig.iommu.take_stale_translations().len(), 2);

        // PASID-selective: everything of the PASID goes; the new table is used.
        rig.invalidate(&[pasid_selective()]);
        assert_eq!(translate(&rig, va1), Ok((vm.hpa(new_page), Source::Walk)));
        assert!(rig.iommu.take_stale_translations().is_empty());

        // Now the PDE cache holds the new table, which does not map va0: putting the old
        // PDE back without invalidating leaves va0 faulting ...
        ram.write_u64(pde, old_pde).unwrap();
        assert_eq!(translate(&rig, va0), Err(FaultReason::Sfl2));
        // ... until a page-selective invalidation with IH clear in the same region.
        rig.invalidate(&[pasid_iotlb(va1, false)]);
        assert_eq!(translate(&rig, va0), Ok((vm.hpa(DATA_GPA), Source::Walk)));
    }

    #[test]
    fn a_second_level_change_reaches_nested_walks_after_a_page_selective_iotlb_invalidation() {
        let mut rig = Rig::new(true);
        let mut vm = Vm::new(&rig);
        vm.map_buffer(&rig, 2);
        let (va0, va1) = (GVA, GVA + 0x1000);
        assert_eq!(translate(&rig, va0), Ok((vm.hpa(DATA_GPA), Source::Walk)));
        let pt = vm.entry(&rig, va0, 1) & !0xfff;
        assert_eq!(
            rig.iommu
                .paging_structure_caches()
                .mapping(DID, pt)
                .map(|m| m.output),
            Some(vm.hpa(pt)),
            "the nested walk cached the page table's second-level mapping"
        );

        // The host moves the guest's page table to another host page (a copy that maps
        // va1 elsewhere, so that the move is visible) without invalidating.
        let moved = rig.frames.alloc_frame().unwrap().0;
        for i in 0..512 {
            let e = rig.mem.read_u64(vm.hpa(pt) + 8 * i).unwrap();
            rig.mem.write_u64(moved + 8 * i, e).unwrap();
        }
        let new_page = DATA_GPA + 0x40_0000;
        rig.mem.write_u64(moved + 8, new_page | 0x7).unwrap();
        vm.sl.unmap(&*rig.mem, pt, PageSize::Size4K).unwrap();
        vm.sl
            .map(
                &*rig.mem,
                &mut &rig.frames,
                pt,
                moved,
                PageSize::Size4K,
                MapFlags::READ | MapFlags::WRITE,
            )
            .unwrap();

        // A miss on va1 resolves the page table with the cached mapping: the old copy.
        let old = Ok((vm.hpa(DATA_GPA + 0x1000), Source::Walk));
        assert_eq!(translate(&rig, va1), old);
        let reports = rig.iommu.take_stale_translations();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].missing, iotlb_page(pt, false));
        // PASID-based invalidations do not reach second-level mappings (no PASID tag).
        rig.invalidate(&[pasid_selective()]);
        assert_eq!(translate(&rig, va1), old);
        assert_eq!(rig.iommu.take_stale_translations().len(), 1);
        assert_eq!(translate(&rig, va0), Ok((vm.hpa(DATA_GPA), Source::Walk)));
        assert_eq!(translate(&rig, va0).unwrap().1, Source::Iotlb);

        // The page-selective IOTLB invalidation of the table's guest page removes its
        // mapping (whatever IH says: it is a leaf) and every nested entry of the domain.
        rig.invalidate(&[iotlb_page(pt, true)]);
        assert_eq!(translate(&rig, va0).unwrap().1, Source::Walk);
        assert_eq!(translate(&rig, va1), Ok((vm.hpa(new_page), Source::Walk)));
        assert!(rig.iommu.take_stale_translations().is_empty());
    }

    #[test]
    fn iotlb_domain_and_global_invalidations_empty_the_paging_structure_caches() {
        let mut rig = Rig::new(false);
        let mut vm = Vm::new(&rig);
        vm.map_buffer(&rig, 1);
        translate(&rig, GVA).unwrap();
        let caches = rig.iommu.paging_structure_caches();
        assert!(caches.len().first_level > 0 && caches.len().nested_mappings > 0);
        rig.invalidate(&[domain_iotlb(DomainId(DID.0 + 1))]);
        assert!(!rig.iommu.paging_structure_caches().is_empty());
        // A PASID-cache invalidation leaves them: software follows it with IOTLB ones.
        rig.invalidate(&[InvDesc::PasidCache {
            granularity: PasidCacheGranularity::PasidSelective,
            did: DID,
            pasid: pasid(P),
        }]);
        assert!(!rig.iommu.paging_structure_caches().is_empty());
        rig.invalidate(&[domain_iotlb(DID)]);
        assert!(rig.iommu.paging_structure_caches().is_empty());
        translate(&rig, GVA).unwrap();
        rig.invalidate(&[InvDesc::global_iotlb(true, true)]);
        assert!(rig.iommu.paging_structure_caches().is_empty());
        assert!(rig.iommu.iotlb().is_empty());
    }
}

/// Second-level accessed/dirty tracking (VT-d 3.x §3.7.2, §9.8, ECAP.SLADS, PASID-entry
/// SLADE) on a second-level (RID_PASID) and a nested (PASID 4) entry over one second
/// level: a write sets D in the leaf that maps the written page, a read does not; a
/// translation the IOTLB cached from a read does not serve a write, which walks again and
/// sets D; once software clears D, a cached dirty translation keeps serving writes until
/// the IOTLB invalidation, after which the next write sets D again; ATS completions grant
/// write only where D is set. Without SLADE nothing is set.
#[test]
fn second_level_dirty_bits_follow_writes_through_the_iotlb_and_ats() {
    let mut rig = Rig::new(false);
    let ecap = Ecap::from_raw(rig.read(offset::ECAP, 8));
    assert!(
        ecap.slads,
        "the model advertises second-level A/D (ECAP.SLADS)"
    );
    let mut sl = rig.tables(TableFormat::SecondLevel(SlLevels::Four));
    for page in 0..16u64 {
        sl.map(
            &*rig.mem,
            &mut &rig.frames,
            page << 12,
            0x10_0000 + (page << 12),
            PageSize::Size4K,
            MapFlags::READ | MapFlags::WRITE,
        )
        .unwrap();
    }
    let (mem, iommu) = (rig.mem.clone(), rig.iommu.clone());
    let leaf = |gpa: u64| {
        let slot = sl.entry_address(&*mem, gpa, 1).unwrap().unwrap();
        mem.read_u64(slot).unwrap()
    };
    let clear_d = |gpa: u64| {
        let slot = sl.entry_address(&*mem, gpa, 1).unwrap().unwrap();
        let e = mem.read_u64(slot).unwrap();
        mem.write_u64(slot, e & !SlPte::D).unwrap();
    };
    let second = PasidEntry {
        slptptr: sl.root(),
        slade: true,
        ..PasidEntry::new(Pgtt::SecondLevel, DID)
    };
    rig.set_pasid_entry(Pasid::RID_PASID, Some(&second));
    let t = |gpa: u64, access| iommu.translate(SID, None, gpa, access).unwrap().source;

    // A read sets A, not D; the IOTLB keeps it.
    assert_eq!(t(0x2000, AccessRequest::READ), Source::Walk);
    assert_eq!(leaf(0x2000) & (SlPte::A | SlPte::D), SlPte::A);
    assert_eq!(t(0x2000, AccessRequest::READ), Source::Iotlb);
    // The first write after that read walks again and sets D; later writes hit.
    assert_eq!(t(0x2000, AccessRequest::WRITE), Source::Walk);
    assert_eq!(leaf(0x2000) & SlPte::D, SlPte::D);
    assert_eq!(t(0x2000, AccessRequest::WRITE), Source::Iotlb);
    // A page never written stays clean.
    assert_eq!(t(0x3000, AccessRequest::READ), Source::Walk);
    assert_eq!(leaf(0x3000) & SlPte::D, 0);

    // Software clears D (a dirty-bitmap harvest). The IOTLB still holds the translation
    // with D, so a write is served without setting D until the IOTLB is invalidated.
    clear_d(0x2000);
    assert_eq!(t(0x2000, AccessRequest::WRITE), Source::Iotlb);
    assert_eq!(
        leaf(0x2000) & SlPte::D,
        0,
        "the cached translation hid the write"
    );
    rig.invalidate(&[InvDesc::Iotlb {
        granularity: IotlbGranularity::PageSelective,
        dr: true,
        dw: true,
        did: DID,
        addr: 0x2000,
        ih: false,
        am: 0,
    }]);
    assert_eq!(t(0x2000, AccessRequest::WRITE), Source::Walk);
    assert_eq!(leaf(0x2000) & SlPte::D, SlPte::D);

    // ATS: a read-only request on a clean page gets no write permission; a write request
    // sets D and gets it.
    let ats = |gpa: u64, access| iommu.ats_translate(SID, None, gpa, access).unwrap();
    let c = ats(0x4000, DmaAccess::READ);
    assert!(c.perm.read && !c.perm.write);
    assert_eq!(leaf(0x4000) & SlPte::D, 0);
    let c = ats(0x4000, DmaAccess::WRITE);
    assert!(c.perm.write);
    assert_eq!(leaf(0x4000) & SlPte::D, SlPte::D);

    // Nested: guest tables in guest RAM map GVA 0x5000 -> GPA 0x9000.
    let gpa_to_hpa = |gpa: u64| 0x10_0000 + gpa;
    let (pml4, pdpt, pd, pt) = (0x1000u64, 0xa000u64, 0xb000u64, 0xc000u64);
    let fl_table = |e: u64| e | 0x7;
    rig.mem.write_u64(gpa_to_hpa(pml4), fl_table(pdpt)).unwrap();
    rig.mem.write_u64(gpa_to_hpa(pdpt), fl_table(pd)).unwrap();
    rig.mem.write_u64(gpa_to_hpa(pd), fl_table(pt)).unwrap();
    rig.mem
        .write_u64(gpa_to_hpa(pt) + 8 * 5, 0x9000 | 0x7)
        .unwrap();
    let nested = PasidEntry {
        slptptr: sl.root(),
        flptptr: pml4,
        slade: true,
        ..PasidEntry::new(Pgtt::Nested, DID)
    };
    rig.set_pasid_entry(pasid(4), Some(&nested));
    let n = |gva: u64, access| {
        iommu
            .translate(SID, Some(pasid(4)), gva, access)
            .unwrap()
            .source
    };
    assert_eq!(n(0x5000, AccessRequest::READ), Source::Walk);
    assert_eq!(
        leaf(0x9000) & SlPte::D,
        0,
        "a nested read leaves the GPA clean"
    );
    assert_eq!(n(0x5000, AccessRequest::READ), Source::Iotlb);
    assert_eq!(n(0x5000, AccessRequest::WRITE), Source::Walk);
    assert_eq!(leaf(0x9000) & SlPte::D, SlPte::D);
    // The first-level A/D updates are writes to the guest's table pages through the
    // second level: the page table page is dirty too.
    assert_eq!(leaf(pt) & SlPte::D, SlPte::D);

    // Without SLADE the second level is left alone.
    rig.set_pasid_entry(
        Pasid::RID_PASID,
        Some(&PasidEntry {
            slade: false,
            ..second
        }),
    );
    rig.invalidate(&[
        InvDesc::PasidCache {
            granularity: PasidCacheGranularity::PasidSelective,
            did: DID,
            pasid: Pasid::RID_PASID,
        },
        domain_iotlb(DID),
    ]);
    assert_eq!(t(0x6000, AccessRequest::WRITE), Source::Walk);
    assert_eq!(leaf(0x6000) & (SlPte::A | SlPte::D), 0);
}

/// What a device behind the unit was sent, in order.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// Invalidate requests delivered together, and how many translations the IOTLB held
    /// when they arrived.
    Invalidations(Vec<DevTlbInvalidation>, usize),
    Response(PrgResponse),
}

/// A device that records what the unit sends it.
struct Recorder {
    sid: SourceId,
    iommu: std::sync::Weak<Iommu>,
    sent: std::sync::Mutex<Vec<Sent>>,
}

impl Recorder {
    fn attach(iommu: &Arc<Iommu>, sid: SourceId) -> Arc<Recorder> {
        let r = Arc::new(Recorder {
            sid,
            iommu: Arc::downgrade(iommu),
            sent: std::sync::Mutex::default(),
        });
        iommu.attach_endpoint(r.clone());
        r
    }

    fn take(&self) -> Vec<Sent> {
        std::mem::take(&mut self.sent.lock().unwrap())
    }
}

impl AtsEndpoint for Recorder {
    fn source_id(&self) -> SourceId {
        self.sid
    }

    fn pcie_capabilities(&self) -> PcieCapabilities {
        PcieCapabilities::default()
    }

    fn invalidate_devtlb(&self, inv: DevTlbInvalidation) -> usize {
        self.invalidate_devtlb_each(&[inv])
    }

    fn invalidate_devtlb_each(&self, invs: &[DevTlbInvalidation]) -> usize {
        let cached = self.iommu.upgrade().map_or(0, |u| u.iotlb().len());
        self.sent
            .lock()
            .unwrap()
            .push(Sent::Invalidations(invs.to_vec(), cached));
        0
    }

    fn page_response(&self, resp: PrgResponse) {
        self.sent.lock().unwrap().push(Sent::Response(resp));
    }
}

#[test]
fn scattered_page_invalidations_reach_the_iotlb_first_and_each_device_once_per_run() {
    const GVA: u64 = 0x7000_0000;
    const PAGES: u64 = 16;
    let mut rig = Rig::new(true);
    let p = pasid(5);
    let mut fl = rig.first_level(p);
    for i in 0..PAGES {
        rig.map(&mut fl, GVA + (i << 12), 0x50_0000 + (i << 12), rw());
    }
    let translate = |rig: &Rig, i: u64| {
        let m = rig
            .iommu
            .translate(SID, Some(p), GVA + (i << 12), AccessRequest::READ)
            .unwrap();
        assert_eq!(m.hpa, 0x50_0000 + (i << 12));
        m.source
    };
    for i in 0..PAGES {
        assert_eq!(translate(&rig, i), Source::Walk);
    }
    let other_sid = SourceId::from_rid(0x20);
    let dev = Recorder::attach(&rig.iommu, SID);
    let other = Recorder::attach(&rig.iommu, other_sid);
    let piotlb = |addr| pasid_page(p, addr);
    let devtlb = |sid, addr| InvDesc::PasidDevIotlb {
        sid,
        pfsid: sid,
        pasid: p,
        max_invs_pend: 0,
        addr,
        size: false,
        global: false,
    };
    let request = |addr| DevTlbInvalidation::from_size_bit(Some(p), false, addr, false);
    // Every other page, each an IOTLB and a device-TLB descriptor as a driver queues
    // them, then one for the other device and one more for the first.
    let named: Vec<u64> = (0..PAGES).step_by(2).map(|i| GVA + (i << 12)).collect();
    let mut descs: Vec<InvDesc> = named
        .iter()
        .flat_map(|&a| [piotlb(a), devtlb(SID, a)])
        .collect();
    descs.extend([devtlb(other_sid, GVA), devtlb(SID, GVA + 0x1000)]);
    let counted = |rig: &Rig| rig.iommu.stats().descriptors.load(Ordering::Relaxed);
    let before = counted(&rig);
    rig.invalidate(&descs);
    assert_eq!(
        counted(&rig) - before,
        descs.len() as u64 + 1,
        "each and the wait"
    );
    // Each device got its requests in queue order, a run of them at once, once every
    // IOTLB removal of the batch was done (half the pages left).
    let left = (PAGES / 2) as usize;
    assert_eq!(
        dev.take(),
        [
            Sent::Invalidations(named.iter().map(|&a| request(a)).collect(), left),
            Sent::Invalidations(vec![request(GVA + 0x1000)], left),
        ]
    );
    assert_eq!(
        other.take(),
        [Sent::Invalidations(vec![request(GVA)], left)]
    );
    for i in 0..PAGES {
        let want = if i % 2 == 0 {
            Source::Walk
        } else {
            Source::Iotlb
        };
        assert_eq!(translate(&rig, i), want, "page {i}");
    }
    // A descriptor of another kind goes after the requests queued before it and before
    // those after it.
    let response = InvDesc::PageGroupResponse {
        rid: SID,
        pasid_present: true,
        pasid: p,
        private_data_present: false,
        response: ResponseCode::Success,
        last_page_in_group: true,
        prg_index: 3,
        private_data: [0; 2],
    };
    rig.invalidate(&[devtlb(SID, GVA), response, devtlb(SID, GVA + 0x2000)]);
    let all = PAGES as usize;
    assert_eq!(
        dev.take(),
        [
            Sent::Invalidations(vec![request(GVA)], all),
            Sent::Response(PrgResponse {
                pasid: Some(p),
                prgi: 3,
                code: ResponseCode::Success
            }),
            Sent::Invalidations(vec![request(GVA + 0x2000)], all),
        ]
    );
    assert_eq!(rig.iommu.take_stale_translations(), []);
}

/// A run of IOTLB hits the IOMMU answered is kept for the next request of the same
/// requester, PASID and access inside it (which gets the run from its first page), until
/// an IOTLB or PASID-cache invalidation; never for another access, nor in strict mode.
#[test]
fn kept_runs_serve_until_an_invalidation_and_never_in_strict_mode() {
    let mut rig = Rig::new(false);
    let p = pasid(4);
    let mut fl = rig.first_level(p);
    let (va, pa, pages) = (0x7000_0000u64, 0x50_0000u64, 8u64);
    for i in 0..pages {
        rig.map(&mut fl, va + i * 0x1000, pa + i * 0x1000, rw());
    }
    let run = |rig: &Rig, addr: u64, access: DmaAccess, len: u64| {
        let r = rig
            .iommu
            .remap_run(SID, Some(p), addr, access, len)
            .unwrap();
        (r.start(), r.size(), r.hpa_of(addr).0)
    };
    let warm = |rig: &Rig| {
        for i in 0..pages {
            rig.iommu
                .translate(SID, Some(p), va + i * 0x1000, AccessRequest::READ)
                .unwrap();
        }
    };
    warm(&rig);
    let whole = pages * 0x1000;
    assert_eq!(run(&rig, va, DmaAccess::READ, whole), (va, whole, pa));
    // Kept: a request five pages in gets the run from its first page.
    let inside = va + 5 * 0x1000 + 0x10;
    assert_eq!(
        run(&rig, inside, DmaAccess::READ, 1),
        (va, whole, pa + 0x5010)
    );
    // Not for another access.
    let (start, _, _) = run(&rig, inside, DmaAccess::WRITE, 1);
    assert_eq!(start, va + 5 * 0x1000);

    // Page 3 moves and is invalidated: no kept run holds it any more.
    fl.unmap(&*rig.mem, va + 3 * 0x1000, PageSize::Size4K)
        .unwrap();
    rig.map(&mut fl, va + 3 * 0x1000, 0x60_0000, rw());
    rig.invalidate(&[pasid_page(p, va + 3 * 0x1000)]);
    assert_eq!(run(&rig, inside, DmaAccess::READ, 1).0, va + 5 * 0x1000);
    assert_eq!(run(&rig, va, DmaAccess::READ, whole), (va, 3 * 0x1000, pa));
    assert_eq!(
        run(&rig, va + 3 * 0x1000, DmaAccess::READ, 1),
        (va + 3 * 0x1000, 0x1000, 0x60_0000)
    );

    // Kept again (pages 3 to 7 hit), then a PASID-cache invalidation drops it.
    warm(&rig);
    assert_eq!(
        run(&rig, va + 4 * 0x1000, DmaAccess::READ, 4 * 0x1000).1,
        4 * 0x1000
    );
    assert_eq!(run(&rig, inside, DmaAccess::READ, 1).0, va + 4 * 0x1000);
    rig.invalidate(&[InvDesc::PasidCache {
        granularity: PasidCacheGranularity::PasidSelective,
        did: DID,
        pasid: p,
    }]);
    assert_eq!(run(&rig, inside, DmaAccess::READ, 1).0, va + 5 * 0x1000);

    // Strict mode checks every hit: it keeps no run and uses none kept before.
    assert_eq!(
        run(&rig, va + 4 * 0x1000, DmaAccess::READ, 4 * 0x1000).1,
        4 * 0x1000
    );
    rig.iommu.set_strict(true);
    assert_eq!(run(&rig, inside, DmaAccess::READ, 1).0, va + 5 * 0x1000);
    assert_eq!(
        run(&rig, va + 4 * 0x1000, DmaAccess::READ, 4 * 0x1000).1,
        4 * 0x1000
    );
    assert_eq!(run(&rig, inside, DmaAccess::READ, 1).0, va + 5 * 0x1000);
    assert!(rig.iommu.take_stale_translations().is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever runs the IOMMU kept, after any sequence of page moves and unmaps (each
    /// invalidated as the spec asks), IOTLB fills and run requests, every page of every
    /// run answered maps where the tables say, and a request faults only where nothing is
    /// mapped.
    #[test]
    fn kept_runs_agree_with_the_tables_after_every_invalidated_change(
        ops in proptest::collection::vec((0u8..4, 0u64..16, 1u64..=16), 1..48),
    ) {
        let mut rig = Rig::new(false);
        let p = pasid(6);
        let mut fl = rig.first_level(p);
        let va = 0x7000_0000u64;
        let home = |i: u64| 0x50_0000 + i * 0x1000;
        let away = |i: u64| 0x90_0000 + i * 0x3000;
        let mut frames: Vec<Option<u64>> = (0..16).map(|i| Some(home(i))).collect();
        for i in 0..16 {
            rig.map(&mut fl, va + i * 0x1000, home(i), rw());
        }
        let page_inv = |addr| pasid_page(p, addr);
        for (op, page, len) in ops {
            let addr = va + page * 0x1000;
            match op {
                // Moves the page between its frame next to its neighbours' and one apart.
                0 => {
                    let slot = &mut frames[page as usize];
                    let to = if *slot == Some(home(page)) { away(page) } else { home(page) };
                    if slot.is_some() {
                        fl.unmap(&*rig.mem, addr, PageSize::Size4K).unwrap();
                    }
                    rig.map(&mut fl, addr, to, rw());
                    *slot = Some(to);
                    rig.invalidate(&[page_inv(addr)]);
                }
                1 => {
                    if frames[page as usize].take().is_some() {
                        fl.unmap(&*rig.mem, addr, PageSize::Size4K).unwrap();
                        rig.invalidate(&[page_inv(addr)]);
                    }
                }
                2 => {
                    let _ = rig.iommu.translate(SID, Some(p), addr, AccessRequest::READ);
                }
                _ => match rig.iommu.remap_run(SID, Some(p), addr + 0x10, DmaAccess::READ, len * 0x1000) {
                    Ok(run) => {
                        proptest::prop_assert!(run.contains(addr + 0x10));
                        for q in (run.start()..run.end().unwrap()).step_by(0x1000) {
                            let i = ((q - va) / 0x1000) as usize;
                            proptest::prop_assert_eq!(frames.get(i).copied().flatten(), Some(run.hpa_of(q).0));
                        }
                    }
                    Err(_) => proptest::prop_assert!(frames[page as usize].is_none()),
                },
            }
        }
    }
}

/// Kept runs (`runs.rs`) against what must end them: invalidations racing a device that
/// moves bytes through them while the frames are taken away and reused, PASID unbind,
/// domain detach and a context change.
mod kept_runs {
    use super::paging_structure_caches::{Vm, DATA_GPA, GVA, P};
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    const PAGE: u64 = 0x1000;
    /// Pages of the buffer the device moves bytes through.
    const PAGES: u64 = 8;
    /// What every byte of a frame the tables map holds.
    const VALID: u8 = 0xa5;
    /// What a frame holds once it was taken away and reused.
    const REUSED: u8 = 0x5a;
    /// A bound on every wait for the other thread, far above what a round takes.
    const WAIT: Duration = Duration::from_secs(120);

    fn fill(mem: &HostMemory, hpa: u64, len: u64, byte: u8) {
        mem.write(hpa, &vec![byte; len as usize]).unwrap();
    }

    fn holds_only(mem: &HostMemory, hpa: u64, len: u64, byte: u8) -> bool {
        let mut bytes = vec![0; len as usize];
        mem.read(hpa, &mut bytes).unwrap();
        bytes.iter().all(|&b| b == byte)
    }

    /// One request of the device to `addr` (`len` bytes wanted) with PASID `P`, its bytes
    /// moved in flight as the DMA engine moves them: the request's page is read through
    /// the run the IOMMU answered, and written back for a write. `None` when the drain
    /// refused the ticket (nothing moved); otherwise whether the run was a kept one (it
    /// begins below the request's page).
    fn request(iommu: &Iommu, addr: u64, access: DmaAccess, len: u64) -> Option<bool> {
        let drain = iommu.request_drain();
        let ticket = drain.ticket();
        let run = iommu
            .remap_run(SID, Some(pasid(P)), addr, access, len)
            .expect("the buffer is always mapped");
        let page = addr & !(PAGE - 1);
        let _in_flight = drain.enter(ticket)?;
        let hpa = run.hpa_of(page).0;
        let mem = iommu.memory();
        assert!(
            holds_only(mem, hpa, PAGE, VALID),
            "a {access:?} request to {addr:#x} moved bytes through {run:?}: frame {hpa:#x} \
             was reused after the invalidation that took it away completed"
        );
        if access.write {
            fill(mem, hpa, PAGE, VALID);
        }
        Some(run.start() < page)
    }

    /// A device keeps moving bytes through runs of a nested buffer (reads and writes, runs
    /// over the whole buffer and requests inside them) while, round after round, the
    /// buffer is taken away from its frames (by the guest in its first-level tables, one
    /// PASID-based page invalidation a page, or by the host in the second level, one
    /// page-selective domain invalidation) and the old frames, once the invalidation has
    /// returned, are reused. No byte moves to or from a reused frame: no request that began
    /// after an invalidation returned used a run kept before it, and a request that took
    /// one before had moved its bytes when the invalidation returned. Every round starts
    /// with the device's runs over the whole buffer kept (checked), so the invalidations
    /// meet kept runs; the threads wait for each other between rounds only, with a bound.
    #[test]
    fn no_byte_moves_through_a_kept_run_after_its_invalidation_returned() {
        const ROUNDS: u64 = 48;
        const REQUESTS: u64 = 64;
        let mut rig = Rig::new(false);
        let mut vm = Vm::new(&rig);
        vm.map_buffer(&rig, PAGES);
        let mem = rig.mem.clone();
        let mut gpa = DATA_GPA;
        let mut frames: Vec<u64> = (0..PAGES).map(|i| vm.hpa(gpa + i * PAGE)).collect();
        frames.iter().for_each(|&h| fill(&mem, h, PAGE, VALID));
        let iommu = rig.iommu.clone();
        let (ready_tx, ready) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let (checked_tx, checked) = mpsc::channel();
        let kept_in_races = std::thread::scope(|s| {
            let device = s.spawn(move || {
                let mut kept_in_races = 0u64;
                for _ in 0..ROUNDS {
                    for access in [DmaAccess::READ, DmaAccess::WRITE] {
                        for i in 0..PAGES {
                            iommu
                                .remap(SID, Some(pasid(P)), GVA + i * PAGE, access)
                                .unwrap();
                        }
                        let whole = iommu
                            .remap_run(SID, Some(pasid(P)), GVA, access, PAGES * PAGE)
                            .unwrap();
                        assert_eq!((whole.start(), whole.size()), (GVA, PAGES * PAGE));
                        let last = GVA + (PAGES - 1) * PAGE + 0x10;
                        assert_eq!(request(&iommu, last, access, 1), Some(true), "kept");
                    }
                    ready_tx.send(()).unwrap();
                    for j in 0..REQUESTS {
                        let access = if j % 3 == 2 {
                            DmaAccess::WRITE
                        } else {
                            DmaAccess::READ
                        };
                        let page = j % PAGES;
                        // Every fourth request wants the rest of the buffer: a run kept again.
                        let len = if j % 4 == 0 { (PAGES - page) * PAGE } else { 1 };
                        let addr = GVA + page * PAGE + 0x10;
                        if request(&iommu, addr, access, len) == Some(true) {
                            kept_in_races += 1;
                        }
                    }
                    done.recv_timeout(WAIT)
                        .expect("the invalidating thread's round");
                    // The invalidation returned: every request moves the tables' bytes.
                    for access in [DmaAccess::READ, DmaAccess::WRITE] {
                        for i in 0..PAGES {
                            let addr = GVA + i * PAGE + 0x10;
                            assert!(request(&iommu, addr, access, 1).is_some(), "no drain");
                        }
                    }
                    checked_tx.send(()).unwrap();
                }
                kept_in_races
            });
            for round in 0..ROUNDS {
                ready.recv_timeout(WAIT).expect("the device's kept runs");
                let old = frames.clone();
                if round % 2 == 0 {
                    // The guest moves its buffer to other guest frames.
                    let to = DATA_GPA + (round / 2 + 1) * PAGES * PAGE;
                    let ram = vm.ram(&mem);
                    let mut invs = Vec::new();
                    for i in 0..PAGES {
                        fill(&mem, vm.hpa(to + i * PAGE), PAGE, VALID);
                        let pte = vm.entry(&rig, GVA + i * PAGE, 1);
                        ram.write_u64(pte, (to + i * PAGE) | 0x7).unwrap();
                        invs.push(pasid_page(pasid(P), GVA + i * PAGE));
                    }
                    rig.invalidate(&invs);
                    gpa = to;
                    frames = (0..PAGES).map(|i| vm.hpa(gpa + i * PAGE)).collect();
                } else {
                    // The host moves the guest's frames (its second level) elsewhere.
                    let to = rig
                        .frames
                        .alloc_range(PAGES * PAGE, PAGES * PAGE)
                        .unwrap()
                        .0;
                    fill(&mem, to, PAGES * PAGE, VALID);
                    for i in 0..PAGES {
                        let g = gpa + i * PAGE;
                        assert!(vm.sl.unmap(&*mem, g, PageSize::Size4K).unwrap());
                        vm.sl
                            .map(
                                &*mem,
                                &mut &rig.frames,
                                g,
                                to + i * PAGE,
                                PageSize::Size4K,
                                MapFlags::READ | MapFlags::WRITE,
                            )
                            .unwrap();
                    }
                    rig.invalidate(&[InvDesc::Iotlb {
                        granularity: IotlbGranularity::PageSelective,
                        dr: true,
                        dw: true,
                        did: DID,
                        addr: gpa,
                        ih: false,
                        am: PAGES.trailing_zeros() as u8,
                    }]);
                    frames = (0..PAGES).map(|i| to + i * PAGE).collect();
                }
                // The invalidation returned: the old frames go to someone else.
                old.iter().for_each(|&h| fill(&mem, h, PAGE, REUSED));
                done_tx.send(()).unwrap();
                checked.recv_timeout(WAIT).expect("the device's checks");
                for &h in &old {
                    assert!(
                        holds_only(&mem, h, PAGE, REUSED),
                        "a device write reached frame {h:#x} after it was reused"
                    );
                }
            }
            device.join().unwrap()
        });
        eprintln!("{kept_in_races} requests served by kept runs while invalidations ran");
    }

    /// A run is kept for the requests inside it until a change of what translates them:
    /// a PASID unbind, a domain detach, a context entry pointing elsewhere. Each is tried
    /// in the order Linux does it (entry first, then the entry cache, then the IOTLB): once
    /// the entry cache is invalidated the kept run no longer serves (the IOTLB may still
    /// hit the page alone), and once the IOTLB is, the request faults or translates anew.
    /// Each context- or PASID-cache invalidation alone ends the run.
    #[test]
    fn no_run_is_kept_across_pasid_unbind_domain_detach_or_a_context_change() {
        let mut rig = Rig::new(false);
        let p = pasid(4);
        let va = 0x7000_0000u64;
        let mut fl = rig.first_level(p);
        for i in 0..PAGES {
            rig.map(&mut fl, va + i * PAGE, 0x50_0000 + i * PAGE, rw());
        }
        let inside = va + (PAGES - 1) * PAGE + 0x10;
        let run = |rig: &Rig| {
            rig.iommu
                .remap_run(SID, Some(p), inside, DmaAccess::READ, 1)
                .map(|r| (r.start(), r.hpa_of(inside).0))
        };
        let keep = |rig: &Rig| {
            for i in 0..PAGES {
                rig.iommu
                    .remap(SID, Some(p), va + i * PAGE, DmaAccess::READ)
                    .unwrap();
            }
            let whole = rig
                .iommu
                .remap_run(SID, Some(p), va, DmaAccess::READ, PAGES * PAGE)
                .unwrap();
            assert_eq!(whole.size(), PAGES * PAGE);
            assert_eq!(run(rig).unwrap().0, va, "kept");
        };
        let page = inside & !(PAGE - 1);
        let old = Ok((page, 0x50_0000 + (inside - va)));
        let context_cache = InvDesc::ContextCache {
            granularity: ContextCacheGranularity::DeviceSelective,
            did: DID,
            sid: SID,
            fm: 0,
        };
        let domain_iotlb = domain_iotlb(DID);

        // PASID unbind.
        keep(&rig);
        rig.set_pasid_entry(p, None);
        rig.invalidate(&[InvDesc::PasidCache {
            granularity: PasidCacheGranularity::PasidSelective,
            did: DID,
            pasid: p,
        }]);
        assert_eq!(run(&rig), old, "the IOTLB's page, not the kept run");
        rig.invalidate(&[InvDesc::PasidIotlb {
            granularity: PasidIotlbGranularity::PasidSelective,
            did: DID,
            pasid: p,
            addr: 0,
            ih: false,
            am: 0,
        }]);
        assert!(run(&rig).is_err(), "unbound");

        // Domain detach: the context entry goes.
        rig.set_pasid_entry(p, Some(&first_level_entry(fl.root())));
        keep(&rig);
        let ce_addr = context_entry_addr(rig.ctx_table, SID.devfn());
        let ce: Vec<u64> = (0..4)
            .map(|i| rig.mem.read_u64(ce_addr + 8 * i).unwrap())
            .collect();
        rig.set_context_entry(None);
        rig.invalidate(&[context_cache]);
        assert_eq!(run(&rig), old, "the IOTLB's page, not the kept run");
        rig.invalidate(&[domain_iotlb]);
        assert!(run(&rig).is_err(), "detached");

        // Context change: the device's PASIDs now come from another PASID directory,
        // where `p` maps the buffer to other frames in another domain.
        write_qwords(&rig.mem, ce_addr, &ce);
        rig.invalidate(&[context_cache]);
        keep(&rig);
        let dir = rig.frames.alloc_frame().unwrap().0;
        let table = rig.frames.alloc_frame().unwrap().0;
        let pde = PasidDirEntry {
            fpd: false,
            smptblptr: table,
        };
        rig.mem
            .write_u64(pasid_dir_entry_addr(dir, 0, p).unwrap(), pde.to_raw())
            .unwrap();
        let mut fl2 = rig.tables(TableFormat::FirstLevel(FlPagingMode::FourLevel));
        for i in 0..PAGES {
            rig.map(&mut fl2, va + i * PAGE, 0x60_0000 + i * PAGE, rw());
        }
        let pe = PasidEntry {
            flptptr: fl2.root(),
            ..PasidEntry::new(Pgtt::FirstLevel, DomainId(8))
        };
        write_qwords(&rig.mem, pasid_entry_addr(table, p), &pe.to_raw());
        rig.set_context_entry(Some(&ScalableContextEntry {
            dte: true,
            paside: true,
            pre: true,
            pdts: 0,
            pasiddirptr: dir,
            ..ScalableContextEntry::default()
        }));
        // Scalable mode: the PASID entries cached through the old entry go too.
        rig.invalidate(&[
            context_cache,
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::DomainSelective,
                did: DID,
                pasid: p,
            },
        ]);
        assert_eq!(run(&rig), old, "the IOTLB's page, not the kept run");
        rig.invalidate(&[domain_iotlb]);
        assert_eq!(run(&rig), Ok((page, 0x60_0000 + (inside - va))));
    }
}

/// A counter's threads past its owned slots share the overflow; every addition counts,
/// whatever thread made it.
#[test]
fn a_counter_sums_the_additions_of_every_thread() {
    let counter = Arc::new(super::Counter::default());
    counter.add(5);
    let threads: Vec<_> = (0..2 * super::COUNTER_SLOTS as u64)
        .map(|t| {
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    counter.add(t + 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let n = 2 * super::COUNTER_SLOTS as u64;
    assert_eq!(counter.load(Ordering::Relaxed), 5 + 1000 * n * (n + 1) / 2);
}

/// A register-based IOTLB invalidation (IVA_REG, then IOTLB_REG with IVT; queued
/// invalidation off) returns only once the requests in flight with translations taken
/// before it have left, as the queued path's wait does (§6.5.5), and a translation taken
/// before it moves no byte after it.
#[test]
fn a_register_based_iotlb_invalidation_drains_the_requests_in_flight() {
    use std::sync::atomic::AtomicBool;
    use vsva_vtd::regs::layout::iotlb;
    let iommu = Iommu::new(HostMemory::new(16 << 20).unwrap(), IommuConfig::default()).unwrap();
    let iro = Ecap::from_raw(iommu.mmio_read(offset::ECAP, 8).unwrap()).iotlb_offset();
    let drain = iommu.request_drain();
    let stale = drain.ticket();
    let in_flight = drain.enter(drain.ticket()).unwrap();
    let returned = AtomicBool::new(false);
    std::thread::scope(|s| {
        let invalidation = s.spawn(|| {
            // Page-selective, with DR and DW as Linux sets them when CAP.DRD and DWD are.
            iommu.mmio_write(iro, 8, 0x7f00_5000).unwrap();
            let cmd =
                iotlb::IVT | 3 << iotlb::IIRG_SHIFT | iotlb::DR | iotlb::DW | 1 << iotlb::DID_SHIFT;
            iommu.mmio_write(iro + 8, 8, cmd).unwrap();
            returned.store(true, Ordering::SeqCst);
        });
        // The invalidation either starts its drain (the epoch moves) or returns without.
        while drain.epoch() == 0 && !returned.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        assert!(
            !returned.load(Ordering::SeqCst),
            "the register-based invalidation returned with a request in flight"
        );
        drop(in_flight);
        invalidation.join().unwrap();
    });
    assert_eq!(
        iommu.mmio_read(iro + 8, 8).unwrap() & iotlb::IVT,
        0,
        "IVT reads clear once it returned"
    );
    assert!(
        drain.enter(stale).is_none(),
        "a translation taken before the invalidation would move bytes after it"
    );
}
