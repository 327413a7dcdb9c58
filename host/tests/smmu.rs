//! The host SMMUv3 driver against the physical SMMUv3 model (strict mode) and the DMA
//! engine: VFIO containers map guest RAM (stage 2), attach the guest's CD table
//! (`VFIO_IOMMU_ATTACH_PASID_TABLE`, nested), forward the guest's TLB invalidations
//! (`VFIO_IOMMU_CACHE_INVALIDATE`) and detach; real bytes move through the guest's
//! stage-1 tables nested over stage 2; bad input changes nothing; closing leaves nothing.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vsva_mem::MemWindow;
use vsva_mem::PhysMem;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::smmu::{SmmuDomain, SmmuHost};
use vsva_host::{container::Container, container::SharedPasidAllocator, pasid::PasidAllocator};
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN};
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DmaEngine, DmaEngineConfig,
    Operation,
};
use vsva_hw::smmuv3::{Smmu, SmmuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory, memory::PAGE_SIZE};
use vsva_smmuv3::desc::Descriptor as D;
use vsva_smmuv3::{
    builder::TableBuilder, cd::ContextDescriptor, features::Features, features::StallModel,
    walk::PageSize,
};
use vsva_uapi::iommu::{
    ARM_PGTBL_64_LPAE_S1, IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB,
    IOMMU_NESTING_FEAT_CACHE_INVLD,
};
use vsva_uapi::request::{
    CacheInvalidate, DmaMap, InvGranularity, NestingInfo, NestingVendor, PageResponse,
    PageResponseCode, PasidConfig, PasidTableConfig,
};
use vsva_uapi::{file::IommuModel, file::VfioIoctls};
use vsva_vtd::{addr::Gpa, addr::Hpa, addr::Iova, addr::Pasid, addr::SourceId};

/// Guest RAM of a VM: 32 MiB at GPA 0.
const RAM: u64 = 32 << 20;
/// The guest's CD table (16 CDs, linear) and its stage-1 table frames.
const CD_GPA: u64 = 0x8_0000;
const PT_GPA: u64 = 0x10_0000;
const SRC_GPA: u64 = 0x100_0000;
const DST_GPA: u64 = 0x140_0000;
const NEW_DST_GPA: u64 = 0x180_0000;
const COMP_GPA: u64 = 0x1c0_0000;
const SRC_GVA: u64 = 0x7f00_1234_0000;
const DST_GVA: u64 = 0x7f00_5678_0000;
const COMP_GVA: u64 = 0x7f00_9abc_0000;
const SSID: u32 = 3;
const ASID: u16 = 0x21;
const RW_EL0: u64 = D::AF | D::AP_EL0 | D::NG;

struct Host {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hw: Arc<Smmu>,
    smmu: Arc<SmmuHost>,
}

fn host() -> Host {
    host_with(SmmuConfig {
        strict: true,
        ..SmmuConfig::default()
    })
}

fn host_with(cfg: SmmuConfig) -> Host {
    let mem = HostMemory::new(256 << 20).unwrap();
    let frames = Arc::new(FrameAllocator::new(mem.clone()));
    let hw = Arc::new(Smmu::new(mem.clone(), cfg));
    let smmu = SmmuHost::new(hw.clone(), frames.clone()).unwrap();
    Host {
        mem,
        frames,
        hw,
        smmu,
    }
}

fn allocator() -> SharedPasidAllocator {
    Arc::new(Mutex::new(PasidAllocator::new()))
}

type GuestPhys = MemWindow<Arc<HostMemory>>;

/// A VM: its RAM mapped into this (VMM) process, its container with one DMA engine
/// attached and the RAM mapped, and a guest process's AArch64 stage-1 tables in its RAM.
struct Guest {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hpa: Hpa,
    ram: GuestMemoryMmap,
    container: Option<Container<SmmuDomain>>,
    dev: Arc<DmaEngine>,
    sid: SourceId,
    s1: TableBuilder,
    next_pt: u64,
}

impl Guest {
    fn new(host: &Host, alloc: &SharedPasidAllocator, sid: SourceId) -> Guest {
        Guest::with(host, alloc, sid, CTRL_PASID_EN)
    }

    fn with(host: &Host, alloc: &SharedPasidAllocator, sid: SourceId, ctrl: u64) -> Guest {
        let hpa = host.frames.alloc_range(RAM, 2 << 20).unwrap();
        let ram = host.mem.guest_memory(&[(Gpa(0), hpa, RAM)]).unwrap();
        let domain = SmmuDomain::new(&host.smmu).unwrap();
        let mut container = Container::new(alloc.clone(), 16, domain).unwrap();
        container.set_iommu(IommuModel::Type1Nesting).unwrap();
        let dev = Arc::new(DmaEngine::new(DmaEngineConfig::new(sid), host.hw.clone()).unwrap());
        host.hw.attach_endpoint(sid.rid() as u32, dev.clone());
        dev.enable(ctrl).unwrap();
        container.attach_device(sid).unwrap();
        let vaddr = ram.get_host_address(GuestAddress(0)).unwrap() as u64;
        container
            .map_dma(&DmaMap {
                iova: Iova(0),
                vaddr,
                size: RAM,
                read: true,
                write: true,
            })
            .unwrap();
        let cd = Self::cd();
        let s1 = TableBuilder::stage1(&cd.s1_config(&Features::VSVA).unwrap());
        let mut g = Guest {
            mem: host.mem.clone(),
            frames: host.frames.clone(),
            hpa,
            ram,
            container: Some(container),
            dev,
            sid,
            s1,
            next_pt: PT_GPA + PAGE_SIZE,
        };
        // The guest driver's CD table: CD SSID for the process (ASID, TTB0 at PT_GPA).
        let words = cd.encode();
        for (i, w) in words.iter().enumerate() {
            g.phys()
                .write_u64(CD_GPA + SSID as u64 * 64 + 8 * i as u64, *w)
                .unwrap();
        }
        g.map(SRC_GVA, SRC_GPA, 4);
        g.map(DST_GVA, DST_GPA, 4);
        g.map(COMP_GVA, COMP_GPA, 1);
        g
    }

    fn cd() -> ContextDescriptor {
        ContextDescriptor::new(PT_GPA, 16, ASID)
    }

    fn phys(&self) -> GuestPhys {
        MemWindow::new(self.mem.clone(), self.hpa.0, RAM)
    }

    fn c(&mut self) -> &mut Container<SmmuDomain> {
        self.container.as_mut().unwrap()
    }

    fn map(&mut self, gva: u64, gpa: u64, pages: u64) {
        let phys = self.phys();
        for i in 0..pages {
            let mut next = self.next_pt;
            let mut alloc = || {
                let f = next;
                next += PAGE_SIZE;
                Some(f)
            };
            self.s1
                .map(
                    &phys,
                    &mut alloc,
                    gva + i * PAGE_SIZE,
                    gpa + i * PAGE_SIZE,
                    PageSize::Size4K,
                    RW_EL0,
                )
                .unwrap();
            self.next_pt = next;
        }
    }

    /// Points `gva` at another page, as the guest kernel does, without invalidating.
    fn remap(&mut self, gva: u64, gpa: u64) {
        self.s1.unmap(&self.phys(), gva, PageSize::Size4K).unwrap();
        self.map(gva, gpa, 1);
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write(self.hpa.0 + gpa, bytes).unwrap();
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.mem.read(self.hpa.0 + gpa, &mut b).unwrap();
        b
    }

    /// A memmove of `len` bytes by the device, with `pasid`, at device addresses; returns
    /// the completion status (the record is at `comp`, guest physical `comp_gpa`).
    fn memmove(
        &self,
        pasid: Option<Pasid>,
        src: u64,
        dst: u64,
        len: u32,
        comp: (u64, u64),
    ) -> CompletionStatus {
        self.write(comp.1, &[0; 32]);
        let d = Descriptor {
            pasid,
            privileged: false,
            block_on_fault: false,
            completion: CompletionRequest::Always(comp.0),
            op: Operation::Memmove {
                src,
                dst,
                size: len,
            },
        };
        self.dev.portal_write(0, &d.encode()).unwrap();
        self.dev.process();
        CompletionRecord::from_bytes(&self.read(comp.1, 32).try_into().unwrap())
            .map_or(CompletionStatus::None, |r| r.status)
    }

    fn table(&self) -> PasidTableConfig {
        PasidTableConfig {
            base_ptr: Gpa(CD_GPA),
            pasid_bits: 4,
            config: PasidConfig::Translate { s1fmt: 0, s1dss: 1 },
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.container = None;
        self.mem.release_guest_memory(&self.ram);
        self.frames.free(self.hpa).unwrap();
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sid(dev: u8) -> SourceId {
    SourceId::new(0, dev, 0).unwrap()
}

fn pasid() -> Option<Pasid> {
    Some(Pasid::new(SSID).unwrap())
}

fn invalidate_va(gva: u64) -> CacheInvalidate {
    CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity: InvGranularity::Addr {
            pasid: pasid(),
            archid: Some(ASID as u32),
            addr: gva,
            granule_size: PAGE_SIZE,
            nb_granules: 1,
            leaf: true,
        },
    }
}

#[test]
fn stage2_dma_then_nested_dma_through_the_guest_cd_table() {
    let host = host();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(3));
    // Stage 2 alone: device addresses are guest physical.
    let data = pattern(8192, 1);
    g.write(SRC_GPA, &data);
    let st = g.memmove(None, SRC_GPA, DST_GPA, 8192, (COMP_GPA, COMP_GPA));
    assert_eq!(st, CompletionStatus::Success);
    assert_eq!(g.read(DST_GPA, 8192), data);
    // No PASID table yet: a request with a SubstreamID is refused.
    let st = g.memmove(pasid(), SRC_GVA, DST_GVA, 64, (COMP_GPA, COMP_GPA));
    assert_ne!(st, CompletionStatus::Success);
    // The guest's CD table, nested over stage 2: guest virtual addresses.
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    let data = pattern(3 * 4096 + 100, 7);
    g.write(SRC_GPA + 0x10, &data);
    let st = g.memmove(
        pasid(),
        SRC_GVA + 0x10,
        DST_GVA + 0x20,
        data.len() as u32,
        (COMP_GVA, COMP_GPA),
    );
    assert_eq!(st, CompletionStatus::Success);
    assert_eq!(g.read(DST_GPA + 0x20, data.len()), data);
    // Requests without SubstreamID bypass stage 1 (S1DSS bypass): stage 2 still serves.
    let st = g.memmove(None, SRC_GPA, DST_GPA, 64, (COMP_GPA, COMP_GPA));
    assert_eq!(st, CompletionStatus::Success);
    assert_eq!(host.hw.take_stale(), []);
}

#[test]
fn guest_tlbi_through_cache_invalidate_removes_the_stale_translation() {
    let host = host();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(4));
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    let one = pattern(256, 3);
    g.write(SRC_GPA, &one);
    assert_eq!(
        g.memmove(pasid(), SRC_GVA, DST_GVA, 256, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert_eq!(g.read(DST_GPA, 256), one);
    // The guest moves DST_GVA to another page and forgets to invalidate: the SMMU's TLB
    // still sends the bytes to the old page, and strict mode names the missing command.
    g.remap(DST_GVA, NEW_DST_GPA);
    let two = pattern(256, 9);
    g.write(SRC_GPA, &two);
    assert_eq!(
        g.memmove(pasid(), SRC_GVA, DST_GVA, 256, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert_eq!(g.read(DST_GPA, 256), two);
    assert_ne!(g.read(NEW_DST_GPA, 256), two);
    let stale = host.hw.take_stale();
    assert!(!stale.is_empty());
    let vmid = g.c().backend().vmid();
    assert!(
        stale.iter().all(|s| matches!(s.missing, vsva_smmuv3::cmd::Cmd::TlbiNhVa { vmid: v, asid: ASID, .. } if v == vmid)),
        "{stale:?}"
    );
    // The guest's CMD_TLBI_NH_VA, forwarded: the next DMA reaches the new page.
    g.c().cache_invalidate(&invalidate_va(DST_GVA)).unwrap();
    let three = pattern(256, 11);
    g.write(SRC_GPA, &three);
    assert_eq!(
        g.memmove(pasid(), SRC_GVA, DST_GVA, 256, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert_eq!(g.read(NEW_DST_GPA, 256), three);
    assert_eq!(g.read(DST_GPA, 256), two);
    assert_eq!(host.hw.take_stale(), []);
}

#[test]
fn hostile_tables_and_streams_are_refused_and_change_nothing() {
    let host = host();
    let alloc = allocator();
    let mut a = Guest::new(&host, &alloc, sid(5));
    let sid_a = a.sid.rid() as u32;
    let before = host.smmu.ste(sid_a);
    let bad = [
        // Beyond the VM's memory.
        PasidTableConfig {
            base_ptr: Gpa(RAM + 0x1000),
            ..a.table()
        },
        // A linear table of 2^20 CDs (64 MiB) running past the end of the 32 MiB RAM.
        PasidTableConfig {
            pasid_bits: 20,
            ..a.table()
        },
        // Reserved S1DSS, S1Fmt (uapi decoding lets nothing like this through; the driver
        // checks again).
        PasidTableConfig {
            config: PasidConfig::Translate { s1fmt: 3, s1dss: 0 },
            ..a.table()
        },
    ];
    for cfg in bad {
        let e = a.c().attach_pasid_table(&cfg).unwrap_err();
        assert_eq!(e.errno(), -libc::EINVAL, "{cfg:?}: {e}");
        assert_eq!(host.smmu.ste(sid_a), before, "{cfg:?}");
        assert_eq!(a.c().state().pasid_table, None);
    }
    // Another VM cannot take A's stream, nor reach A's TLB entries with A's ASID.
    let mut b = Guest::new(&host, &alloc, sid(6));
    let e = b.c().attach_device(a.sid).unwrap_err();
    assert_eq!(e.errno(), -libc::EBUSY);
    let table = a.table();
    a.c().attach_pasid_table(&table).unwrap();
    // No stage-1 to stage-1 transition: a second translating table is refused.
    let nested = host.smmu.ste(sid_a);
    let other = PasidTableConfig {
        base_ptr: Gpa(CD_GPA + 0x1000),
        ..a.table()
    };
    let e = a.c().attach_pasid_table(&other).unwrap_err();
    assert_eq!(e.errno(), -libc::EINVAL);
    assert_eq!(host.smmu.ste(sid_a), nested);
    assert_eq!(a.c().state().pasid_table, Some(table));
    let one = pattern(64, 1);
    a.write(SRC_GPA, &one);
    assert_eq!(
        a.memmove(pasid(), SRC_GVA, DST_GVA, 64, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    a.remap(DST_GVA, NEW_DST_GPA);
    let table_b = b.table();
    b.c().attach_pasid_table(&table_b).unwrap();
    b.c().cache_invalidate(&invalidate_va(DST_GVA)).unwrap();
    let two = pattern(64, 2);
    a.write(SRC_GPA, &two);
    assert_eq!(
        a.memmove(pasid(), SRC_GVA, DST_GVA, 64, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert_eq!(
        a.read(DST_GPA, 64),
        two,
        "B's invalidation reached A's VMID"
    );
    assert!(!host.hw.take_stale().is_empty());
    a.c().cache_invalidate(&invalidate_va(DST_GVA)).unwrap();
    assert_eq!(host.hw.take_stale(), []);
}

#[test]
fn detach_and_close_leave_nothing_behind() {
    let host = host();
    let alloc = allocator();
    let baseline = host.frames.allocated_bytes();
    let (tlb0, _, _) = host.hw.cached_entries();
    assert_eq!(tlb0, 0);
    {
        let mut g = Guest::new(&host, &alloc, sid(7));
        let table = g.table();
        g.c().attach_pasid_table(&table).unwrap();
        let data = pattern(512, 5);
        g.write(SRC_GPA, &data);
        assert_eq!(
            g.memmove(pasid(), SRC_GVA, DST_GVA, 512, (COMP_GVA, COMP_GPA)),
            CompletionStatus::Success
        );
        assert!(host.hw.cached_entries().0 > 0);
        // DETACH: stage 2 alone again; the guest's stage-1 and nested entries are gone.
        g.c().detach_pasid_table().unwrap();
        assert_eq!(host.hw.cached_entries().2, 0, "CDs cached after detach");
        assert_ne!(
            g.memmove(pasid(), SRC_GVA, DST_GVA, 64, (COMP_GPA, COMP_GPA)),
            CompletionStatus::Success
        );
        assert_eq!(
            g.memmove(None, SRC_GPA, DST_GPA, 64, (COMP_GPA, COMP_GPA)),
            CompletionStatus::Success
        );
        assert_eq!(host.hw.take_stale(), []);
        assert_eq!(host.smmu.vmids().len(), 1);
    }
    // Closing the container: no TLB entry, no CD, no owned stream or VMID, no frame.
    let (tlb, _, cds) = host.hw.cached_entries();
    assert_eq!((tlb, cds), (0, 0));
    assert!(host.smmu.owned_streams().is_empty());
    assert!(host.smmu.vmids().is_empty());
    // What stays is the level-2 stream table made for the stream, which the driver keeps
    // for the SMMU's lifetime as Linux does.
    let l2 = 64u64 << vsva_smmuv3_driver::STRTAB_SPLIT;
    assert_eq!(host.frames.allocated_bytes(), baseline + l2);
    let ste = host.smmu.ste(7 << 3).unwrap();
    assert_eq!(ste[0] & 0xf, 1, "the stream aborts (V=1, Config=abort)");
}

#[test]
fn page_requests_reach_the_container_and_responses_resume_the_dma() {
    let host = host();
    let alloc = allocator();
    let ctrl = CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN;
    let mut g = Guest::with(&host, &alloc, sid(8), ctrl);
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    let lazy = 0x7f00_dead_0000;
    let data = pattern(100, 4);
    g.write(SRC_GPA, &data);
    g.write(COMP_GPA, &[0; 32]);
    let d = Descriptor {
        pasid: pasid(),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::Always(COMP_GVA),
        op: Operation::Memmove {
            src: SRC_GVA,
            dst: lazy + 8,
            size: 100,
        },
    };
    g.dev.portal_write(0, &d.encode()).unwrap();
    g.dev.process();
    assert_eq!(g.dev.waiting_for_page_response(), 1);
    // The PRI queue handler takes the request to the container that owns the stream.
    assert_eq!(host.smmu.handle_queues(), 1);
    let faults = g.c().read_faults();
    assert_eq!(faults.len(), 1, "{faults:?}");
    let req = faults[0].request;
    assert_eq!((faults[0].sid, req.pasid, req.addr), (g.sid, pasid(), lazy));
    assert!(req.write && req.last_page && req.needs_pasid);
    // The guest's fault handler maps the page; its response goes down as CMD_PRI_RESP.
    g.map(lazy, NEW_DST_GPA, 1);
    g.c()
        .page_response(&PageResponse {
            pasid: pasid(),
            grpid: req.grpid,
            code: PageResponseCode::Success,
        })
        .unwrap();
    g.dev.process();
    let r = CompletionRecord::from_bytes(&g.read(COMP_GPA, 32).try_into().unwrap()).unwrap();
    assert_eq!(r.status, CompletionStatus::Success, "{r:?}");
    assert_eq!(g.read(NEW_DST_GPA + 8, 100), data);
    assert!(g.c().pending_page_requests().is_empty());
    // After DETACH the guest's SubstreamIDs are not the container's any more.
    let sink = g.c().fault_sink();
    g.c().detach_pasid_table().unwrap();
    let e = sink.report(g.sid, req).unwrap_err();
    assert_eq!(e.errno(), -libc::EPERM);
    assert!(g.c().read_faults().is_empty());
}

#[test]
fn the_device_atc_keeps_a_stale_translation_until_dev_iotlb_invalidation() {
    let host = host();
    let alloc = allocator();
    let mut g = Guest::with(&host, &alloc, sid(9), CTRL_PASID_EN | CTRL_ATS_EN);
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    let one = pattern(128, 1);
    g.write(SRC_GPA, &one);
    assert_eq!(
        g.memmove(pasid(), SRC_GVA, DST_GVA, 128, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert!(g.dev.devtlb_len() > 0);
    g.remap(DST_GVA, NEW_DST_GPA);
    // The SMMU's TLB entry goes, but the device's ATC still holds the old page.
    g.c().cache_invalidate(&invalidate_va(DST_GVA)).unwrap();
    let two = pattern(128, 2);
    g.write(SRC_GPA, &two);
    assert_eq!(
        g.memmove(pasid(), SRC_GVA, DST_GVA, 128, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert_eq!(g.read(DST_GPA, 128), two);
    // The guest's CMD_ATC_INV, forwarded as a device-TLB invalidation.
    let atc = CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
        ..invalidate_va(DST_GVA)
    };
    g.c().cache_invalidate(&atc).unwrap();
    let three = pattern(128, 3);
    g.write(SRC_GPA, &three);
    assert_eq!(
        g.memmove(pasid(), SRC_GVA, DST_GVA, 128, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert_eq!(g.read(NEW_DST_GPA, 128), three);
    assert_eq!(host.hw.take_stale(), []);
}

#[test]
fn the_guests_stage1_faults_reach_the_container_and_stage2_faults_do_not() {
    let host = host();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(10));
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    // A write to a guest virtual page the guest never mapped: F_TRANSLATION at stage 1.
    let hole = 0x7f00_0bad_0000;
    assert_ne!(
        g.memmove(pasid(), SRC_GVA, hole + 0x10, 64, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    // A guest mapping to a guest physical page beyond the VM's RAM: a stage-2 fault.
    let beyond = 0x7f00_0bee_0000;
    g.map(beyond, RAM + 0x10_0000, 1);
    assert_ne!(
        g.memmove(pasid(), SRC_GVA, beyond, 64, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    host.smmu.handle_queues();
    let faults = g.c().read_unrecoverable_faults();
    assert_eq!(faults.len(), 1, "{faults:?}");
    let f = faults[0];
    assert_eq!(f.sid, g.sid);
    assert_eq!(
        f.fault.reason,
        vsva_uapi::request::UnrecoverableReason::PteFetch
    );
    assert_eq!((f.fault.pasid, f.fault.addr), (pasid(), Some(hole)));
    assert!(f.fault.write);
    // Another VM sees nothing of it.
    let mut other = Guest::new(&host, &alloc, sid(11));
    assert!(other.c().read_unrecoverable_faults().is_empty());
}

#[test]
fn a_two_level_guest_cd_table_is_walked_through_stage_2() {
    let host = host();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(12));
    // 2^12 SubstreamIDs in 64 KiB leaves: the L1CD of SubstreamID 1500 (index 1) points to
    // a leaf at GPA 0xa_0000, whose CD 476 is the process's.
    let ssid = 1500u32;
    let leaf = 0xa_0000u64;
    let phys = g.phys();
    phys.write_u64(CD_GPA + 8, vsva_smmuv3::cd::L1Cd::new(leaf).0)
        .unwrap();
    for (i, w) in Guest::cd().encode().iter().enumerate() {
        phys.write_u64(leaf + 476 * 64 + 8 * i as u64, *w).unwrap();
    }
    let table = PasidTableConfig {
        base_ptr: Gpa(CD_GPA),
        pasid_bits: 12,
        config: PasidConfig::Translate { s1fmt: 2, s1dss: 1 },
    };
    g.c().attach_pasid_table(&table).unwrap();
    let p = Some(Pasid::new(ssid).unwrap());
    let data = pattern(300, 6);
    g.write(SRC_GPA, &data);
    assert_eq!(
        g.memmove(p, SRC_GVA, DST_GVA, 300, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert_eq!(g.read(DST_GPA, 300), data);
    // A SubstreamID whose L1CD is invalid is the guest's C_BAD_SUBSTREAMID.
    let q = Some(Pasid::new(3000).unwrap());
    assert_ne!(
        g.memmove(q, SRC_GVA, DST_GVA, 64, (COMP_GPA, COMP_GPA)),
        CompletionStatus::Success
    );
    host.smmu.handle_queues();
    // The data write and the completion record write each fault.
    let faults = g.c().read_unrecoverable_faults();
    assert!(!faults.is_empty());
    for f in &faults {
        assert_eq!(
            (f.fault.reason, f.fault.pasid),
            (vsva_uapi::request::UnrecoverableReason::PasidInvalid, q)
        );
    }
    assert_eq!(host.hw.take_stale(), []);
}

#[test]
fn get_info_reports_the_smmuv3_nesting_format() {
    let host = host();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(3));
    let info = g.c().get_info().unwrap();
    // The SMMUv3 format of iommu_nesting_info: guest CD tables with 16-bit ASIDs and
    // AArch64 stage-1 tables, 20 SubstreamID bits, stage-1 invalidations to propagate (no
    // page-table bind).
    assert_eq!(
        info.nesting,
        Some(NestingInfo {
            features: IOMMU_NESTING_FEAT_CACHE_INVLD,
            addr_width: 48,
            pasid_bits: 20,
            vendor: NestingVendor::ArmSmmuV3 {
                asid_bits: 16,
                pgtbl_fmt: ARM_PGTBL_64_LPAE_S1,
            },
        })
    );
}

// ----- The interrupt path: nothing below calls `handle_queues`. -----

/// How long a test waits for the interrupt thread: generous, as the machine may be loaded.
const IRQ_WAIT: Duration = Duration::from_secs(30);

/// Waits until `cond` holds, at most [`IRQ_WAIT`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + IRQ_WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A channel the container's fault notifier sends on.
fn notified(g: &mut Guest) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    g.c().set_fault_notifier(move || {
        let _ = tx.send(());
    });
    rx
}

fn active_gerrors(host: &Host) -> u32 {
    use vsva_smmuv3::regs::offset::{GERROR, GERRORN};
    (host.hw.mmio_read(GERROR, 4).unwrap() ^ host.hw.mmio_read(GERRORN, 4).unwrap()) as u32
}

#[test]
fn the_interrupt_thread_delivers_a_page_request_and_the_response_resumes_the_dma() {
    let host = host();
    host.smmu.enable_interrupts().unwrap();
    assert!(host.smmu.interrupts_enabled());
    let alloc = allocator();
    let ctrl = CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN;
    let mut g = Guest::with(&host, &alloc, sid(13), ctrl);
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    let note = notified(&mut g);
    let lazy = 0x7f00_dead_0000;
    let data = pattern(100, 5);
    g.write(SRC_GPA, &data);
    g.write(COMP_GPA, &[0; 32]);
    let d = Descriptor {
        pasid: pasid(),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::Always(COMP_GVA),
        op: Operation::Memmove {
            src: SRC_GVA,
            dst: lazy + 8,
            size: 100,
        },
    };
    g.dev.portal_write(0, &d.encode()).unwrap();
    g.dev.process();
    assert_eq!(g.dev.waiting_for_page_response(), 1);
    // The PRI queue's MSI woke the interrupt thread, which gave the request to the
    // container that owns the stream.
    note.recv_timeout(IRQ_WAIT)
        .expect("the page request reaches the container");
    let faults = g.c().read_faults();
    assert_eq!(faults.len(), 1, "{faults:?}");
    let req = faults[0].request;
    assert_eq!((faults[0].sid, req.pasid, req.addr), (g.sid, pasid(), lazy));
    let stats = host.smmu.irq_stats();
    assert_eq!(stats.page_requests, 1);
    assert!(stats.msis >= 1);
    // The VMM's response goes down as CMD_PRI_RESP and the device finishes the copy.
    g.map(lazy, NEW_DST_GPA, 1);
    g.c()
        .page_response(&PageResponse {
            pasid: pasid(),
            grpid: req.grpid,
            code: PageResponseCode::Success,
        })
        .unwrap();
    g.dev.process();
    let r = CompletionRecord::from_bytes(&g.read(COMP_GPA, 32).try_into().unwrap()).unwrap();
    assert_eq!(r.status, CompletionStatus::Success, "{r:?}");
    assert_eq!(g.read(NEW_DST_GPA + 8, 100), data);
    assert_eq!(host.hw.take_stale(), []);
    host.smmu.disable_interrupts().unwrap();
    assert!(!host.smmu.interrupts_enabled());
}

#[test]
fn the_interrupt_thread_finds_and_acknowledges_an_event_queue_overflow() {
    use std::sync::atomic::Ordering::Relaxed;
    use vsva_smmuv3::regs::{offset, OVERFLOW};
    // An event queue of two records.
    let host = host_with(SmmuConfig {
        strict: true,
        queue_log2: [8, 1, 8],
        ..SmmuConfig::default()
    });
    host.smmu.enable_interrupts().unwrap();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(14));
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    // The container's notifier holds the interrupt thread, inside its first drain, until
    // the test opens the gate: meanwhile the device's faults overflow the queue.
    let (note_tx, note) = mpsc::channel();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let gate = Mutex::new(Some(gate_rx));
    g.c().set_fault_notifier(move || {
        let _ = note_tx.send(());
        if let Some(rx) = gate.lock().unwrap().take() {
            let _ = rx.recv_timeout(IRQ_WAIT);
        }
    });
    let hole = 0x7f00_0bad_0000;
    assert_ne!(
        g.memmove(pasid(), SRC_GVA, hole, 64, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    note.recv_timeout(IRQ_WAIT)
        .expect("the first fault reaches the container");
    for i in 1..=4 {
        assert_ne!(
            g.memmove(
                pasid(),
                SRC_GVA,
                hole + i * PAGE_SIZE,
                64,
                (COMP_GVA, COMP_GPA)
            ),
            CompletionStatus::Success
        );
    }
    let hw = host.hw.stats();
    assert!(hw.events_lost.load(Relaxed) > 0, "the queue overflowed");
    gate_tx.send(()).unwrap();
    // Every record the SMMU wrote is served, and the overflow found once.
    wait_until("the overflow to be served", || {
        let s = host.smmu.irq_stats();
        s.event_overflows == 1 && s.events == hw.events.load(Relaxed)
    });
    let prod = host.hw.mmio_read(offset::EVENTQ_PROD, 4).unwrap() as u32;
    let cons = host.hw.mmio_read(offset::EVENTQ_CONS, 4).unwrap() as u32;
    assert_eq!(prod, cons, "consumed, OVACKFLG = OVFLG");
    assert_ne!(prod & OVERFLOW, 0, "the overflow flag toggled once");
    // After the acknowledgement the queue records again: one more fault is delivered.
    let before = hw.events.load(Relaxed);
    assert_ne!(
        g.memmove(
            pasid(),
            SRC_GVA,
            hole + 9 * PAGE_SIZE,
            64,
            (COMP_GVA, COMP_GPA)
        ),
        CompletionStatus::Success
    );
    assert!(hw.events.load(Relaxed) > before);
    wait_until("the last fault to be served", || {
        host.smmu.irq_stats().events == hw.events.load(Relaxed)
    });
    // Joined: every report the thread made is in the container.
    host.smmu.disable_interrupts().unwrap();
    let stats = host.smmu.irq_stats();
    assert_eq!(stats.event_overflows, 1);
    let faults = g.c().read_unrecoverable_faults();
    assert_eq!(faults.len() as u64, stats.events, "{faults:?}");
    assert!(faults
        .iter()
        .any(|f| f.fault.addr == Some(hole + 9 * PAGE_SIZE)));
    assert_eq!(stats.gerrors, 0);
    assert_eq!(active_gerrors(&host), 0);
}

#[test]
fn an_aborted_msi_is_a_global_error_the_interrupt_thread_acknowledges() {
    use vsva_smmuv3::regs::{gerror, offset};
    let host = host();
    host.smmu.enable_interrupts().unwrap();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(15));
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    let note = notified(&mut g);
    // The event queue's MSI target now lies beyond host memory: its MSI write aborts.
    host.hw
        .mmio_write(offset::EVENTQ_IRQ_CFG0, 8, 1 << 40)
        .unwrap();
    let hole = 0x7f00_0bad_0000;
    let before = host
        .hw
        .stats()
        .events
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_ne!(
        g.memmove(pasid(), SRC_GVA, hole, 64, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    // One record, whose MSI aborted once.
    let events = host
        .hw
        .stats()
        .events
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(events - before, 1);
    // GERROR's MSI still arrives: the thread acknowledges MSI_EVENTQ_ABT_ERR in GERRORN
    // and serves the event queue whose interrupt was lost.
    note.recv_timeout(IRQ_WAIT)
        .expect("the fault reaches the container");
    // (The thread's first pass, for what was queued before the MSIs were enabled, may
    // have drained the record before GERROR's MSI came; the acknowledgement follows.)
    wait_until("GERROR to be acknowledged", || {
        host.smmu.irq_stats().gerrors == 1
    });
    let stats = host.smmu.irq_stats();
    assert_eq!(stats.gerror_bits, gerror::MSI_EVENTQ_ABT_ERR);
    assert_eq!(active_gerrors(&host), 0);
    let faults = g.c().read_unrecoverable_faults();
    assert!(!faults.is_empty());
    assert_eq!(faults[0].fault.addr, Some(hole));
    host.smmu.disable_interrupts().unwrap();
}

#[test]
fn interrupts_stop_cleanly_and_records_queued_meanwhile_are_served_on_enable() {
    use vsva_smmuv3::regs::offset;
    let host = host();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(16));
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    let note = notified(&mut g);
    host.smmu.enable_interrupts().unwrap();
    // Enabling twice changes nothing.
    host.smmu.enable_interrupts().unwrap();
    host.smmu.disable_interrupts().unwrap();
    assert!(!host.smmu.interrupts_enabled());
    assert_eq!(host.hw.mmio_read(offset::IRQ_CTRLACK, 4).unwrap(), 0);
    host.smmu.disable_interrupts().unwrap();
    // With interrupts off a fault waits in the event queue.
    let hole = 0x7f00_0bad_0000;
    assert_ne!(
        g.memmove(pasid(), SRC_GVA, hole, 64, (COMP_GVA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert_eq!(host.smmu.irq_stats().msis, 0);
    assert!(note.try_recv().is_err());
    // Enabled again, the thread serves what was queued before.
    host.smmu.enable_interrupts().unwrap();
    note.recv_timeout(IRQ_WAIT)
        .expect("the queued fault reaches the container");
    assert_eq!(g.c().read_unrecoverable_faults()[0].fault.addr, Some(hole));
    // Dropping the test's last reference with the thread running stops it: the SMMU host
    // goes at once, or, when the thread still serves the fault above, as the thread ends.
    drop(g);
    let Host { smmu, .. } = host;
    let weak = Arc::downgrade(&smmu);
    drop(smmu);
    wait_until("the SMMU host to be dropped", || weak.strong_count() == 0);
}

/// A host whose SMMU can stall (IDR0.STALL_MODEL 0b00).
fn stall_host() -> Host {
    host_with(SmmuConfig {
        strict: true,
        features: Features {
            stall_model: StallModel::StallAndTerminate,
            ..Features::VSVA
        },
        ..SmmuConfig::default()
    })
}

/// The guest driver sets CD.S in its process's CD: its faults stall (Linux sets it for a
/// master with `stall_enabled`).
fn stall_faults(g: &Guest) {
    let cd = ContextDescriptor {
        s: true,
        ..Guest::cd()
    };
    for (i, w) in cd.encode().iter().enumerate() {
        g.phys()
            .write_u64(CD_GPA + SSID as u64 * 64 + 8 * i as u64, *w)
            .unwrap();
    }
}

/// Starts a copy of 100 bytes from SRC_GVA to `dst` on a thread of the device; the thread
/// returns how many descriptors completed.
fn copy_on_a_thread(g: &Guest, dst: u64) -> std::thread::JoinHandle<usize> {
    g.write(COMP_GPA, &[0; 32]);
    let d = Descriptor {
        pasid: pasid(),
        privileged: false,
        block_on_fault: false,
        completion: CompletionRequest::Always(COMP_GVA),
        op: Operation::Memmove {
            src: SRC_GVA,
            dst,
            size: 100,
        },
    };
    g.dev.portal_write(0, &d.encode()).unwrap();
    let dev = g.dev.clone();
    std::thread::spawn(move || dev.process())
}

#[test]
fn a_stalled_dma_reaches_the_container_and_its_response_resumes_it() {
    let host = stall_host();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(9));
    host.smmu.set_stall_capable(g.sid.rid() as u32, true);
    stall_faults(&g);
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    let mut other = Guest::new(&host, &alloc, sid(10));
    let lazy = 0x7f00_dead_0000;
    let data = pattern(100, 7);
    g.write(SRC_GPA, &data);
    let dma = copy_on_a_thread(&g, lazy + 8);
    wait_until("the stall", || {
        host.hw.stalled(Some(g.sid.rid() as u32)) == 1
    });
    // The event queue handler gives the stalled transaction to the container as a page
    // request whose group is the STAG.
    host.smmu.handle_queues();
    let faults = g.c().read_faults();
    assert_eq!(faults.len(), 1, "{faults:?}");
    let req = faults[0].request;
    assert_eq!((faults[0].sid, req.pasid, req.addr), (g.sid, pasid(), lazy));
    assert!(req.write && req.last_page && req.needs_pasid);
    assert_eq!(host.smmu.irq_stats().stalls, 1);
    // Another VM cannot resume it: it has no such group pending.
    let resume = PageResponse {
        pasid: pasid(),
        grpid: req.grpid,
        code: PageResponseCode::Success,
    };
    assert!(other.c().page_response(&resume).is_err());
    assert_eq!(host.hw.stalled(None), 1);
    // The guest maps the page; the response goes down as CMD_RESUME Retry.
    g.map(lazy, NEW_DST_GPA, 1);
    g.c().page_response(&resume).unwrap();
    assert_eq!(dma.join().unwrap(), 1);
    let r = CompletionRecord::from_bytes(&g.read(COMP_GPA, 32).try_into().unwrap()).unwrap();
    assert_eq!(r.status, CompletionStatus::Success, "{r:?}");
    assert_eq!(g.read(NEW_DST_GPA + 8, 100), data);
    assert_eq!(host.hw.stalled(None), 0);
    assert!(g.c().pending_page_requests().is_empty());
    assert_eq!(host.hw.take_stale(), []);
}

#[test]
fn a_device_that_cannot_stall_never_stalls_whatever_the_guests_cd_says() {
    let host = stall_host();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(11));
    stall_faults(&g);
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    // STE.S1STALLD: the fault terminates at once, as an unrecoverable fault.
    let status = g.memmove(
        pasid(),
        SRC_GVA,
        0x7f00_dead_0000,
        100,
        (COMP_GVA, COMP_GPA),
    );
    assert_eq!(status, CompletionStatus::PageFault);
    assert_eq!(host.hw.stalled(None), 0);
    host.smmu.handle_queues();
    let faults = g.c().read_unrecoverable_faults();
    assert_eq!(faults.len(), 1, "{faults:?}");
    assert!(g.c().read_faults().is_empty());
    assert_eq!(host.smmu.irq_stats().stalls, 0);
}

#[test]
fn a_vm_that_dies_with_a_stall_outstanding_leaves_nothing_held() {
    let host = stall_host();
    let alloc = allocator();
    let mut g = Guest::new(&host, &alloc, sid(12));
    let stream = g.sid.rid() as u32;
    host.smmu.set_stall_capable(stream, true);
    stall_faults(&g);
    let table = g.table();
    g.c().attach_pasid_table(&table).unwrap();
    let dma = copy_on_a_thread(&g, 0x7f00_dead_0000);
    wait_until("the stall", || host.hw.stalled(Some(stream)) == 1);
    host.smmu.handle_queues();
    assert_eq!(g.c().pending_page_requests().len(), 1);
    // The VMM exits: closing the container aborts the stalled transaction.
    g.container = None;
    dma.join().unwrap();
    assert_eq!(host.hw.stalled(None), 0);
    assert!(host.smmu.owned_streams().is_empty());
    assert!(host.smmu.vmids().is_empty());
}
