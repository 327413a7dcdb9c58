//! The host VT-d driver against the physical VT-d model and the DMA engine: VFIO
//! containers map guest RAM, bind guest page tables and invalidate, and real bytes move
//! through second-level and nested translation; what a missing invalidation leaves
//! behind is observable, and closing everything leaves nothing.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use vsva_mem::MemWindow;
use vsva_mem::PhysMem;

use proptest::prelude::*;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::driver::{HostIommu, VtdDomain, ADDR_WIDTH_4LEVEL, RID_PASID};
use vsva_host::{
    container::Container, container::IommuBackend, container::SharedPasidAllocator,
    pasid::PasidAllocator,
};
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN};
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DmaEngine, DmaEngineConfig,
    Operation,
};
use vsva_hw::iommu::{Iommu, IommuConfig, Source};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory, memory::PAGE_SIZE};
use vsva_uapi::iommu::{IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB};
use vsva_uapi::request::{
    BindGpasid, CacheInvalidate, DmaMap, InvGranularity, PageRequest, PageResponse,
    PageResponseCode,
};
use vsva_uapi::{file::IommuModel, file::VfioIoctls};
use vsva_vtd::context::read_context_entry;
use vsva_vtd::inv_desc::PasidIotlbGranularity;
use vsva_vtd::regs::layout::offset;
use vsva_vtd::{
    addr::Gpa, addr::Hpa, addr::Iova, addr::Pasid, addr::SourceId, builder::FrameSource,
    builder::MapFlags, builder::PageTableBuilder, builder::TableFormat, fault::FaultReason,
    flpte::FlPagingMode, inv_desc::InvDesc, pasid::Pgtt, root::EntryChecks, walk::AccessRequest,
    walk::PageSize,
};

/// Guest RAM of a VM: 64 MiB at GPA 0.
const RAM: u64 = 64 << 20;
/// Guest frames for first-level tables: [1 MiB, 2 MiB).
const PT_GPA: u64 = 0x10_0000;
const SRC_GPA: u64 = 0x100_0000;
const DST_GPA: u64 = 0x200_0000;
const NEW_DST_GPA: u64 = 0x280_0000;
const COMP_GPA: u64 = 0x300_0000;
/// Where the guest process sees them.
const SRC_GVA: u64 = 0x7f00_1234_0000;
const DST_GVA: u64 = 0x7f00_5678_0000;
const COMP_GVA: u64 = 0x7f00_9abc_0000;

struct Host {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hw: Arc<Iommu>,
    unit: Arc<HostIommu>,
}

fn host_with(size: u64) -> Host {
    let mem = HostMemory::new(size).unwrap();
    let frames = Arc::new(FrameAllocator::new(mem.clone()));
    let hw = Iommu::new(mem.clone(), IommuConfig::default()).unwrap();
    let unit = HostIommu::new(hw.clone(), frames.clone()).unwrap();
    Host {
        mem,
        frames,
        hw,
        unit,
    }
}

fn host() -> Host {
    host_with(1 << 30)
}

fn pasid(p: u32) -> Pasid {
    Pasid::new(p).unwrap()
}

fn allocator() -> SharedPasidAllocator {
    Arc::new(Mutex::new(PasidAllocator::new()))
}

/// A VM's RAM: host frames mapped into this (VMM) process through vm-memory.
struct Vm {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hpa: Hpa,
    ram: GuestMemoryMmap,
}

impl Vm {
    fn new(host: &Host, size: u64, align: u64) -> Vm {
        let hpa = host.frames.alloc_range(size, align).unwrap();
        let ram = host.mem.guest_memory(&[(Gpa(0), hpa, size)]).unwrap();
        Vm {
            mem: host.mem.clone(),
            frames: host.frames.clone(),
            hpa,
            ram,
        }
    }

    /// The VMM's address of guest physical `gpa`.
    fn vaddr(&self, gpa: u64) -> u64 {
        self.ram.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    fn map_all(&self, size: u64) -> DmaMap {
        DmaMap {
            iova: Iova(0),
            vaddr: self.vaddr(0),
            size,
            read: true,
            write: true,
        }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write(self.hpa.0 + gpa, bytes).unwrap();
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.mem.read(self.hpa.0 + gpa, &mut b).unwrap();
        b
    }

    fn phys(&self) -> GuestPhys {
        MemWindow::new(self.mem.clone(), self.hpa.0, RAM)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.mem.release_guest_memory(&self.ram);
        self.frames.free(self.hpa).unwrap();
    }
}

/// Guest physical memory as the guest's page-table code writes it.
type GuestPhys = MemWindow<Arc<HostMemory>>;

/// The guest kernel's page-table frames.
struct GuestFrames(u64);

impl FrameSource for GuestFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        let f = self.0;
        (f < PT_GPA + 0x10_0000).then(|| {
            self.0 += PAGE_SIZE;
            f
        })
    }
    fn free_table(&mut self, _: u64) {}
}

/// A guest process's page tables (4-level, GVA to GPA), built in guest RAM.
struct GuestTables {
    phys: GuestPhys,
    frames: GuestFrames,
    pt: PageTableBuilder,
}

fn user_rw() -> MapFlags {
    MapFlags::READ | MapFlags::WRITE | MapFlags::USER
}

impl GuestTables {
    fn new(vm: &Vm) -> GuestTables {
        let phys = vm.phys();
        let mut frames = GuestFrames(PT_GPA);
        let pt = PageTableBuilder::new(
            TableFormat::FirstLevel(FlPagingMode::FourLevel),
            &phys,
            &mut frames,
        )
        .unwrap();
        GuestTables { phys, frames, pt }
    }

    fn root(&self) -> Gpa {
        Gpa(self.pt.root())
    }

    fn map(&mut self, gva: u64, gpa: u64, pages: u64) {
        for i in 0..pages {
            let (va, pa) = (gva + i * PAGE_SIZE, gpa + i * PAGE_SIZE);
            self.pt
                .map(
                    &self.phys,
                    &mut self.frames,
                    va,
                    pa,
                    PageSize::Size4K,
                    user_rw(),
                )
                .unwrap();
        }
    }

    /// Points `gva` at another page, as the guest kernel does, without any invalidation.
    fn remap(&mut self, gva: u64, gpa: u64) {
        assert!(self.pt.unmap(&self.phys, gva, PageSize::Size4K).unwrap());
        self.map(gva, gpa, 1);
    }

    /// The usual process: source, destination and completion pages.
    fn process(vm: &Vm) -> GuestTables {
        let mut t = GuestTables::new(vm);
        t.map(SRC_GVA, SRC_GPA, 4);
        t.map(DST_GVA, DST_GPA, 4);
        t.map(COMP_GVA, COMP_GPA, 1);
        t
    }
}

fn engine(host: &Host, sid: SourceId, ctrl: u64) -> Arc<DmaEngine> {
    let dev = Arc::new(DmaEngine::new(DmaEngineConfig::new(sid), host.hw.clone()).unwrap());
    host.hw.attach_endpoint(dev.clone());
    dev.enable(ctrl).unwrap();
    dev
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

/// Submits a descriptor with its completion record at `comp` (a device address that is
/// `comp_gpa` in guest RAM), runs the engine and returns the record.
fn run(vm: &Vm, dev: &DmaEngine, d: Descriptor, comp_gpa: u64) -> CompletionRecord {
    vm.write(comp_gpa, &[0; 32]);
    dev.portal_write(0, &d.encode()).unwrap();
    dev.process();
    CompletionRecord::from_bytes(&vm.read(comp_gpa, 32).try_into().unwrap()).unwrap()
}

fn memmove(p: Option<Pasid>, src: u64, dst: u64, size: u32, comp: u64) -> Descriptor {
    Descriptor {
        pasid: p,
        privileged: false,
        block_on_fault: false,
        completion: CompletionRequest::Always(comp),
        op: Operation::Memmove { src, dst, size },
    }
}

fn bind_of(hpasid: Pasid, gpgd: Gpa) -> BindGpasid {
    BindGpasid {
        hpasid,
        gpasid: Some(pasid(hpasid.raw() + 100)),
        gpgd,
        addr_width: ADDR_WIDTH_4LEVEL,
        vtd_flags: 0,
        pat: 0,
        emt: 0,
    }
}

fn invalidate_page(p: Pasid, gva: u64, cache: u8) -> CacheInvalidate {
    CacheInvalidate {
        cache,
        granularity: InvGranularity::Addr {
            pasid: Some(p),
            archid: None,
            addr: gva,
            granule_size: PAGE_SIZE,
            nb_granules: 1,
            leaf: true,
        },
    }
}

/// A VM with its container on `host`, one device attached, its RAM mapped.
struct Guest {
    vm: Vm,
    container: Container<VtdDomain>,
    dev: Arc<DmaEngine>,
    sid: SourceId,
}

fn guest(host: &Host, alloc: &SharedPasidAllocator, sid: SourceId, ctrl: u64) -> Guest {
    let vm = Vm::new(host, RAM, 2 << 20);
    let domain = VtdDomain::new(&host.unit).unwrap();
    let mut container = Container::new(alloc.clone(), 16, domain).unwrap();
    container.set_iommu(IommuModel::Type1Nesting).unwrap();
    let dev = engine(host, sid, ctrl);
    container.attach_device(sid).unwrap();
    container.map_dma(&vm.map_all(RAM)).unwrap();
    Guest {
        vm,
        container,
        dev,
        sid,
    }
}

fn sid(dev: u8) -> SourceId {
    SourceId::new(0, dev, 0).unwrap()
}

#[test]
fn map_dma_then_dma_without_pasid_moves_bytes() {
    let host = host();
    let g = guest(&host, &allocator(), sid(3), CTRL_PASID_EN);
    let data = pattern(3 * PAGE_SIZE as usize + 77, 5);
    g.vm.write(SRC_GPA + 0x123, &data);
    let r = run(
        &g.vm,
        &g.dev,
        memmove(
            None,
            SRC_GPA + 0x123,
            DST_GPA + 0xff0,
            data.len() as u32,
            COMP_GPA,
        ),
        COMP_GPA,
    );
    assert_eq!(r.status, CompletionStatus::Success, "{r:?}");
    assert_eq!(g.vm.read(DST_GPA + 0xff0, data.len()), data);
    // 64 MiB of 2 MiB aligned RAM is mapped with 2 MiB pages.
    let t = host
        .hw
        .translate(g.sid, None, SRC_GPA + 0x123, AccessRequest::READ)
        .unwrap();
    assert_eq!((t.page_shift, t.hpa), (21, g.vm.hpa.0 + SRC_GPA + 0x123));
    assert_eq!(
        g.container.backend().lookup(Iova(SRC_GPA)),
        Some((Hpa(g.vm.hpa.0 + SRC_GPA), PageSize::Size2M))
    );
    // The context entry and RID_PASID entry are what intel-iommu writes.
    let pe = host.unit.pasid_entry(g.sid, RID_PASID).unwrap();
    assert_eq!(pe.pgtt, Pgtt::SecondLevel);
    assert_eq!(pe.did, g.container.backend().did());
    assert_eq!(pe.slptptr, g.container.backend().second_level_root().0);
}

#[test]
fn one_gib_pages_when_both_sides_are_aligned() {
    let host = host_with(4 << 30);
    let size = (1 << 30) + (2 << 20) + PAGE_SIZE;
    let vm = Vm::new(&host, size + PAGE_SIZE * 511, 1 << 30);
    let mut d = VtdDomain::new(&host.unit).unwrap();
    d.attach_device(sid(1)).unwrap();
    d.map_dma(&DmaMap {
        iova: Iova(1 << 30),
        vaddr: vm.vaddr(0),
        size,
        read: true,
        write: false,
    })
    .unwrap();
    let base = vm.hpa.0;
    assert_eq!(d.lookup(Iova(1 << 30)), Some((Hpa(base), PageSize::Size1G)));
    assert_eq!(
        d.lookup(Iova(2 << 30)),
        Some((Hpa(base + (1 << 30)), PageSize::Size2M))
    );
    assert_eq!(
        d.lookup(Iova((2 << 30) + (2 << 20))),
        Some((Hpa(base + (1 << 30) + (2 << 20)), PageSize::Size4K))
    );
    assert_eq!(d.lookup(Iova((2 << 30) + (2 << 20) + PAGE_SIZE)), None);
    let t = host
        .hw
        .translate(sid(1), None, (1 << 30) + 0x1234, AccessRequest::READ)
        .unwrap();
    assert_eq!((t.page_shift, t.hpa), (30, base + 0x1234));
    // Read-only: a write faults with the second level's reason.
    let f = host
        .hw
        .translate(sid(1), None, 1 << 30, AccessRequest::WRITE)
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::Sgn6);
    // Unaligned host memory gets 4 KiB pages.
    d.map_dma(&DmaMap {
        iova: Iova(4 << 30),
        vaddr: vm.vaddr(PAGE_SIZE),
        size: 2 << 20,
        read: true,
        write: true,
    })
    .unwrap();
    assert_eq!(
        d.lookup(Iova(4 << 30)),
        Some((Hpa(base + PAGE_SIZE), PageSize::Size4K))
    );
}

#[test]
fn unmap_invalidates_a_range_with_one_descriptor() {
    let host = host();
    let alloc = allocator();
    let vm = Vm::new(&host, RAM, 2 << 20);
    let mut c = Container::new(alloc, 4, VtdDomain::new(&host.unit).unwrap()).unwrap();
    c.set_iommu(IommuModel::Type1v2).unwrap();
    let dev = engine(&host, sid(2), CTRL_PASID_EN);
    c.attach_device(sid(2)).unwrap();
    // [0, 32 MiB) in 2 MiB pages; 4 MiB at 32 MiB in 4 KiB pages (the VMM's addresses
    // are one page off), to be unmapped.
    c.map_dma(&vm.map_all(32 << 20)).unwrap();
    let tables = c.backend().table_frames();
    let b = DmaMap {
        iova: Iova(32 << 20),
        vaddr: vm.vaddr((32 << 20) + PAGE_SIZE),
        size: 4 << 20,
        read: true,
        write: true,
    };
    c.map_dma(&b).unwrap();
    assert_eq!(
        c.backend().lookup(Iova(33 << 20)).unwrap().1,
        PageSize::Size4K
    );
    let data = pattern(8 * PAGE_SIZE as usize, 1);
    vm.write(SRC_GPA, &data);
    let dst = (32 << 20) + 0x1000;
    let comp = 0x180_0000;
    let r = run(
        &vm,
        &dev,
        memmove(None, SRC_GPA, dst, data.len() as u32, comp),
        comp,
    );
    assert_eq!(r.status, CompletionStatus::Success);
    assert_eq!(vm.read(dst + PAGE_SIZE, data.len()), data);
    let cached = || host.hw.translate(sid(2), None, dst, AccessRequest::WRITE);
    cached().unwrap();
    assert_eq!(cached().unwrap().source, Source::Iotlb);
    let before = host
        .hw
        .stats()
        .descriptors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(c.unmap_dma(b.iova, b.size).unwrap(), b.size);
    let used = host
        .hw
        .stats()
        .descriptors
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    // IOTLB page-selective (AM 10), device TLB, wait: not 1024 descriptors.
    assert_eq!(used, 3);
    assert_eq!(c.backend().lookup(Iova(dst)), None);
    assert_eq!(cached().unwrap_err().reason, FaultReason::Ssl2);
    let r = run(&vm, &dev, memmove(None, SRC_GPA, dst, 64, comp), comp);
    assert_eq!(r.status, CompletionStatus::TranslationFail);
    assert_eq!(r.fault_reason, FaultReason::Ssl2.code());
    assert_eq!(r.fault_addr, dst);
    let faults = host.unit.take_faults();
    assert!(faults
        .iter()
        .any(|f| f.reason == FaultReason::Ssl2.code() && f.sid == sid(2) && f.pasid.is_none()));
    // Mapped again with 2 MiB alignment: the emptied tables make way for large pages.
    c.map_dma(&DmaMap {
        vaddr: vm.vaddr(32 << 20),
        ..b
    })
    .unwrap();
    assert_eq!(c.backend().lookup(Iova(dst)).unwrap().1, PageSize::Size2M);
    assert_eq!(c.backend().table_frames(), tables);
}

/// A guest with a process whose address space is bound to `hpasid`.
fn bound_guest(
    host: &Host,
    alloc: &SharedPasidAllocator,
    dev: u8,
    ctrl: u64,
) -> (Guest, GuestTables, Pasid) {
    let mut g = guest(host, alloc, sid(dev), ctrl | CTRL_PASID_EN);
    let tables = GuestTables::process(&g.vm);
    let p = g.container.pasid_alloc(1, 1000).unwrap();
    g.container.bind_gpasid(&bind_of(p, tables.root())).unwrap();
    (g, tables, p)
}

#[test]
fn bound_guest_tables_translate_pasid_dma() {
    let host = host();
    let (g, tables, p) = bound_guest(&host, &allocator(), 4, 0);
    let e = host.unit.pasid_entry(g.sid, p).unwrap();
    assert_eq!(e.pgtt, Pgtt::Nested);
    assert_eq!(e.flptptr, tables.root().0);
    assert_eq!(e.slptptr, g.container.backend().second_level_root().0);
    assert_eq!(e.did, g.container.backend().did());
    assert_eq!(e.flpm, FlPagingMode::FourLevel);
    let data = pattern(2 * PAGE_SIZE as usize + 100, 9);
    g.vm.write(SRC_GPA + 0x10, &data);
    let r = run(
        &g.vm,
        &g.dev,
        memmove(
            Some(p),
            SRC_GVA + 0x10,
            DST_GVA + 0x20,
            data.len() as u32,
            COMP_GVA,
        ),
        COMP_GPA,
    );
    assert_eq!(r.status, CompletionStatus::Success, "{r:?}");
    assert_eq!(g.vm.read(DST_GPA + 0x20, data.len()), data);
    // The walk set the guest's accessed and dirty bits, through the second level.
    let leaf = tables.pt.lookup(&tables.phys, DST_GVA).unwrap().unwrap();
    assert_eq!(leaf.entry & 0x60, 0x60);
}

#[test]
fn guest_invalidation_makes_the_new_translation_visible_and_its_absence_is_stale() {
    let host = host();
    let (g, mut tables, p) = bound_guest(&host, &allocator(), 5, 0);
    host.hw.set_strict(true);
    let one = pattern(64, 1);
    g.vm.write(SRC_GPA, &one);
    let copy = |len| {
        run(
            &g.vm,
            &g.dev,
            memmove(Some(p), SRC_GVA, DST_GVA, len, COMP_GVA),
            COMP_GPA,
        )
    };
    assert_eq!(copy(64).status, CompletionStatus::Success);
    assert_eq!(g.vm.read(DST_GPA, 64), one);
    assert!(host.hw.take_stale_translations().is_empty());

    // The guest moves the destination page and forgets to invalidate: the IOTLB still
    // sends the bytes to the old page, and strict mode names the missing descriptor.
    tables.remap(DST_GVA, NEW_DST_GPA);
    let two = pattern(64, 2);
    g.vm.write(SRC_GPA, &two);
    assert_eq!(copy(64).status, CompletionStatus::Success);
    assert_eq!(g.vm.read(DST_GPA, 64), two, "stale translation used");
    assert_eq!(g.vm.read(NEW_DST_GPA, 64), vec![0; 64]);
    let stale = host.hw.take_stale_translations();
    assert!(!stale.is_empty());
    assert!(stale
        .iter()
        .all(|s| s.pasid == p && s.addr & !0xfff == DST_GVA));
    assert!(matches!(
        stale[0].missing,
        InvDesc::PasidIotlb {
            granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
            addr: DST_GVA,
            ..
        }
    ));

    // The guest's invalidation, passed down: the new page is used.
    let mut c = g.container;
    c.cache_invalidate(&invalidate_page(p, DST_GVA, IOMMU_CACHE_INV_TYPE_IOTLB))
        .unwrap();
    let three = pattern(64, 3);
    g.vm.write(SRC_GPA, &three);
    let r = run(
        &g.vm,
        &g.dev,
        memmove(Some(p), SRC_GVA, DST_GVA, 64, COMP_GVA),
        COMP_GPA,
    );
    assert_eq!(r.status, CompletionStatus::Success);
    assert_eq!(g.vm.read(NEW_DST_GPA, 64), three);
    assert_eq!(g.vm.read(DST_GPA, 64), two);
    assert!(host.hw.take_stale_translations().is_empty());
}

/// A DMA translates once per run of pages that hit in the IOTLB and continue in host
/// memory; every page of a run is an IOTLB entry of its own, checked by strict mode, and an
/// invalidated page ends the run there.
#[test]
fn runs_of_iotlb_hits_translate_once_and_strict_mode_checks_every_page() {
    let host = host();
    let (g, mut tables, p) = bound_guest(&host, &allocator(), 6, 0);
    host.hw.set_strict(true);
    let len = 4 * PAGE_SIZE;
    let copy = |seed| {
        let bytes = pattern(len as usize, seed);
        g.vm.write(SRC_GPA, &bytes);
        let before = g.dev.stats().translations;
        let desc = memmove(Some(p), SRC_GVA, DST_GVA, len as u32, COMP_GVA);
        let r = run(&g.vm, &g.dev, desc, COMP_GPA);
        assert_eq!(r.status, CompletionStatus::Success, "{r:?}");
        (bytes, g.dev.stats().translations - before)
    };
    let page = |gpa: u64, i: u64| g.vm.read(gpa + i * PAGE_SIZE, PAGE_SIZE as usize);
    let part =
        |bytes: &[u8], i: u64| bytes[(i * PAGE_SIZE) as usize..][..PAGE_SIZE as usize].to_vec();

    // Cold: each page is walked, and a miss ends a run, so each page is a request of its
    // own (4 source, 4 destination, the completion record).
    let (one, translated) = copy(1);
    assert_eq!(translated, 4 + 4 + 1);
    assert_eq!(g.vm.read(DST_GPA, len as usize), one);
    // Warm: one run per operand.
    let (two, translated) = copy(2);
    assert_eq!(translated, 1 + 1 + 1);
    assert_eq!(g.vm.read(DST_GPA, len as usize), two);
    assert!(host.hw.take_stale_translations().is_empty());

    // The third destination page moves without an invalidation: the run still uses its
    // IOTLB entry, and strict mode names it although it is not the run's first page.
    let moved = DST_GVA + 2 * PAGE_SIZE;
    tables.remap(moved, NEW_DST_GPA);
    let (three, translated) = copy(3);
    assert_eq!(translated, 1 + 1 + 1);
    assert_eq!(
        g.vm.read(DST_GPA, len as usize),
        three,
        "stale translation used"
    );
    let stale = host.hw.take_stale_translations();
    assert!(!stale.is_empty());
    assert!(stale
        .iter()
        .all(|s| s.pasid == p && s.addr & !0xfff == moved));

    // Invalidated, the page is a miss: the destination's run stops before it, the page is
    // walked to its new frame, which does not continue the run, nor does the page after.
    let mut c = g.container;
    c.cache_invalidate(&invalidate_page(p, moved, IOMMU_CACHE_INV_TYPE_IOTLB))
        .unwrap();
    let (four, translated) = copy(4);
    assert_eq!(translated, 1 + 3 + 1);
    for i in [0, 1, 3] {
        assert_eq!(page(DST_GPA, i), part(&four, i));
    }
    assert_eq!(page(DST_GPA, 2), part(&three, 2));
    assert_eq!(page(NEW_DST_GPA, 0), part(&four, 2));
    assert!(host.hw.take_stale_translations().is_empty());
}

#[test]
fn guest_invalidation_reaches_the_device_tlb() {
    let host = host();
    let (g, mut tables, p) = bound_guest(&host, &allocator(), 6, CTRL_ATS_EN);
    let copy = |seed| {
        g.vm.write(SRC_GPA, &pattern(64, seed));
        run(
            &g.vm,
            &g.dev,
            memmove(Some(p), SRC_GVA, DST_GVA, 64, COMP_GVA),
            COMP_GPA,
        )
    };
    assert_eq!(copy(1).status, CompletionStatus::Success);
    assert!(g.dev.devtlb_len() > 0);
    tables.remap(DST_GVA, NEW_DST_GPA);
    assert_eq!(copy(2).status, CompletionStatus::Success);
    assert_eq!(
        g.vm.read(DST_GPA, 64),
        pattern(64, 2),
        "the device TLB is stale"
    );
    let mut c = g.container;
    // An IOTLB invalidation also invalidates the device TLB, as intel-iommu does.
    c.cache_invalidate(&invalidate_page(p, DST_GVA, IOMMU_CACHE_INV_TYPE_IOTLB))
        .unwrap();
    assert_eq!(copy(3).status, CompletionStatus::Success);
    assert_eq!(g.vm.read(NEW_DST_GPA, 64), pattern(64, 3));
    // And a device-TLB invalidation by address on its own.
    tables.remap(DST_GVA, DST_GPA);
    c.cache_invalidate(&invalidate_page(
        p,
        DST_GVA,
        IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
    ))
    .unwrap();
    assert_eq!(copy(4).status, CompletionStatus::Success);
    assert_eq!(g.vm.read(DST_GPA, 64), pattern(64, 4));
}

#[test]
fn unbound_pasid_faults_with_spt2() {
    let host = host();
    let (mut g, tables, p) = bound_guest(&host, &allocator(), 7, 0);
    g.vm.write(SRC_GPA, &pattern(64, 1));
    let r = run(
        &g.vm,
        &g.dev,
        memmove(Some(p), SRC_GVA, DST_GVA, 64, COMP_GVA),
        COMP_GPA,
    );
    assert_eq!(r.status, CompletionStatus::Success);
    g.container
        .unbind_gpasid(&bind_of(p, tables.root()))
        .unwrap();
    assert_eq!(host.unit.pasid_entry(g.sid, p), None);
    let _ = host.unit.take_faults();
    g.dev
        .portal_write(
            0,
            &memmove(Some(p), SRC_GVA, DST_GVA, 64, COMP_GVA).encode(),
        )
        .unwrap();
    g.dev.process();
    // Nothing is translated any more, the completion record included.
    let err = g.dev.software_error().unwrap();
    assert_eq!(err.status, CompletionStatus::CompletionAddrTranslation);
    let faults = host.unit.take_faults();
    assert!(!faults.is_empty());
    for f in &faults {
        assert_eq!(
            (f.reason, f.sid, f.pasid),
            (FaultReason::Spt2.code(), g.sid, Some(p))
        );
    }
    assert_eq!(host.unit.page_request_routes(), 0);
}

/// A nested walk caches second-level paging-structure entries and mappings under the
/// domain id only; tearing the nested entry down must drop them (the domain-selective
/// IOTLB invalidation of §6.5.3.3), not only the PASID's first-level entries.
#[test]
fn unbind_drops_the_second_level_caches_a_nested_walk_filled() {
    let host = host();
    let (mut g, tables, p) = bound_guest(&host, &allocator(), 7, 0);
    g.vm.write(SRC_GPA, &pattern(64, 1));
    let r = run(
        &g.vm,
        &g.dev,
        memmove(Some(p), SRC_GVA, DST_GVA, 64, COMP_GVA),
        COMP_GPA,
    );
    assert_eq!(r.status, CompletionStatus::Success);
    let filled = host.hw.paging_structure_caches().len();
    assert!(
        filled.second_level > 0 && filled.nested_mappings > 0,
        "{filled:?}"
    );
    g.container
        .unbind_gpasid(&bind_of(p, tables.root()))
        .unwrap();
    let left = host.hw.paging_structure_caches().len();
    assert_eq!(
        (left.second_level, left.nested_mappings),
        (0, 0),
        "{left:?}"
    );
    assert_eq!(host.hw.iotlb().len(), 0);
}

#[test]
fn page_requests_go_up_to_the_container_and_responses_resume_the_dma() {
    let host = host();
    let (mut g, mut tables, p) = bound_guest(&host, &allocator(), 8, CTRL_ATS_EN | CTRL_PRI_EN);
    let lazy = 0x7f00_dead_0000;
    let data = pattern(100, 4);
    g.vm.write(SRC_GPA, &data);
    let mut d = memmove(Some(p), SRC_GVA, lazy + 8, 100, COMP_GVA);
    d.block_on_fault = true;
    g.vm.write(COMP_GPA, &[0; 32]);
    g.dev.portal_write(0, &d.encode()).unwrap();
    g.dev.process();
    assert_eq!(g.dev.waiting_for_page_response(), 1);
    let faults = g.container.read_faults();
    assert_eq!(faults.len(), 1, "{faults:?}");
    let req = faults[0].request;
    assert_eq!((faults[0].sid, req.pasid, req.addr), (g.sid, Some(p), lazy));
    assert!(req.write && req.last_page);
    // The guest's fault handler maps the page; its response comes back down.
    tables.map(lazy, DST_GPA + 0x10_0000, 1);
    g.container
        .page_response(&PageResponse {
            pasid: Some(p),
            grpid: req.grpid,
            code: PageResponseCode::Success,
        })
        .unwrap();
    g.dev.process();
    let r = CompletionRecord::from_bytes(&g.vm.read(COMP_GPA, 32).try_into().unwrap()).unwrap();
    assert_eq!(r.status, CompletionStatus::Success, "{r:?}");
    assert_eq!(g.vm.read(DST_GPA + 0x10_0008, 100), data);
    assert!(g.container.pending_page_requests().is_empty());
}

#[test]
fn page_requests_nobody_takes_are_answered_invalid() {
    let host = host();
    let vm = Vm::new(&host, RAM, 2 << 20);
    let mut d = VtdDomain::new(&host.unit).unwrap();
    let dev = engine(&host, sid(9), CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN);
    d.attach_device(sid(9)).unwrap();
    d.map_dma(&vm.map_all(RAM)).unwrap();
    let tables = GuestTables::process(&vm);
    d.bind_gpasid(&bind_of(pasid(3), tables.root())).unwrap();
    let mut desc = memmove(Some(pasid(3)), SRC_GVA, 0x7f00_beef_0000, 64, COMP_GVA);
    desc.block_on_fault = true;
    let r = run(&vm, &dev, desc, COMP_GPA);
    assert_eq!(r.status, CompletionStatus::PageResponseError);
    assert_eq!(r.fault_reason, FaultReason::Sfl2.code());
    assert_eq!(dev.waiting_for_page_response(), 0);
    // A response for a PASID the domain did not bind is refused.
    let resp = PageResponse {
        pasid: Some(pasid(4)),
        grpid: 0,
        code: PageResponseCode::Success,
    };
    let request = PageRequest {
        pasid: Some(pasid(4)),
        grpid: 0,
        read: true,
        write: false,
        exec: false,
        privileged: false,
        addr: 0,
        last_page: true,
        needs_pasid: true,
        private_data: None,
    };
    assert_eq!(
        d.page_response(sid(9), &request, &resp)
            .unwrap_err()
            .errno(),
        -libc::ENODEV
    );
}

#[test]
fn one_vm_cannot_touch_another_vms_translations() {
    let host = host();
    let alloc = allocator();
    let (a, _ta, pa) = bound_guest(&host, &alloc, 10, 0);
    let (b, _tb, pb) = bound_guest(&host, &alloc, 11, 0);
    assert_ne!(a.container.backend().did(), b.container.backend().did());
    // Twice each, so that every translation is cached.
    for (g, p) in [(&a, pa), (&b, pb), (&a, pa), (&b, pb)] {
        let r = run(
            &g.vm,
            &g.dev,
            memmove(Some(p), SRC_GVA, DST_GVA, 64, COMP_GVA),
            COMP_GPA,
        );
        assert_eq!(r.status, CompletionStatus::Success);
    }
    let entries = host.hw.iotlb().len();
    // A's PASID-wide invalidation of its own PASID, and an attempt on B's, which the
    // container refuses before the driver sees it.
    let mut ca = a.container;
    let all = |p| CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity: InvGranularity::Pasid {
            pasid: Some(p),
            archid: None,
        },
    };
    assert_eq!(
        ca.cache_invalidate(&all(pb)).unwrap_err().errno(),
        -libc::EPERM
    );
    assert_eq!(host.hw.iotlb().len(), entries);
    ca.cache_invalidate(&all(pa)).unwrap();
    let left = host.hw.iotlb().len();
    assert!(left < entries && left > 0, "{left} of {entries}");
    // B still hits its cached translations.
    let r = run(
        &b.vm,
        &b.dev,
        memmove(Some(pb), SRC_GVA, DST_GVA, 64, COMP_GVA),
        COMP_GPA,
    );
    assert_eq!(r.status, CompletionStatus::Success);
    assert_eq!(host.hw.iotlb().len(), left);
    // A device of B cannot join A's domain.
    let mut other = VtdDomain::new(&host.unit).unwrap();
    assert_eq!(
        other.attach_device(b.sid).unwrap_err().errno(),
        -libc::EBUSY
    );
    assert_eq!(
        host.unit.device_domain(b.sid),
        Some(b.container.backend().did())
    );
}

/// `intel_svm_bind_gpasid`: a guest table pointer beyond the end of the highest mapping
/// (`max_addr`, kept by map and unmap) is EINVAL, so a bind before any MAP_DMA fails.
#[test]
fn bind_refuses_a_guest_table_beyond_the_mapped_memory() {
    let host = host();
    let alloc = allocator();
    let vm = Vm::new(&host, RAM, 2 << 20);
    let mut c = Container::new(alloc, 4, VtdDomain::new(&host.unit).unwrap()).unwrap();
    c.set_iommu(IommuModel::Type1Nesting).unwrap();
    let _dev = engine(&host, sid(13), CTRL_PASID_EN);
    c.attach_device(sid(13)).unwrap();
    let p = c.pasid_alloc(1, 10).unwrap();
    let root = Gpa(PT_GPA);
    let einval = |c: &mut Container<VtdDomain>, gpgd: Gpa| {
        c.bind_gpasid(&bind_of(p, gpgd)).unwrap_err().errno()
    };
    assert_eq!(einval(&mut c, root), -libc::EINVAL);
    // [0, 8 MiB) and [16 MiB, 32 MiB): up to 32 MiB; Linux compares `gpgd > max_addr`.
    c.map_dma(&vm.map_all(8 << 20)).unwrap();
    let top = DmaMap {
        iova: Iova(16 << 20),
        vaddr: vm.vaddr(16 << 20),
        size: 16 << 20,
        read: true,
        write: true,
    };
    c.map_dma(&top).unwrap();
    assert_eq!(einval(&mut c, Gpa((32 << 20) + PAGE_SIZE)), -libc::EINVAL);
    // Unmapping the top mapping lowers the end to its start.
    assert_eq!(c.unmap_dma(top.iova, top.size).unwrap(), top.size);
    assert_eq!(einval(&mut c, Gpa((16 << 20) + PAGE_SIZE)), -libc::EINVAL);
    assert_eq!(host.unit.pasid_entry(sid(13), p), None);
    let before = host.hw.stats().descriptors.load(Ordering::Relaxed);
    c.bind_gpasid(&bind_of(p, root)).unwrap();
    assert_eq!(host.unit.pasid_entry(sid(13), p).unwrap().flptptr, PT_GPA);
    // `pasid_flush_caches`: the PASID cache and the PASID's IOTLB, then the wait; no
    // device-TLB invalidation for an entry that was not present (F11).
    assert_eq!(
        host.hw.stats().descriptors.load(Ordering::Relaxed) - before,
        3
    );
}

/// A unit whose MGAW + 1 (46) is below its only second-level width (4-level, 48 bits):
/// the domain still uses the 4-level table (`iommu_calculate_agaw`) and limits IOVAs to 46
/// bits (`gaw = min(agaw width, cap_mgaw)`); beyond them MAP_DMA is EINVAL, as VFIO's
/// aperture check gives.
#[test]
fn map_dma_is_limited_to_the_units_address_width() {
    let mem = HostMemory::new(1 << 28).unwrap();
    let frames = Arc::new(FrameAllocator::new(mem.clone()));
    let config = IommuConfig {
        caps: vsva_vtd::root::Capabilities::full(46, 0b0100),
        ..IommuConfig::default()
    };
    let hw = Iommu::new(mem.clone(), config).unwrap();
    let unit = HostIommu::new(hw, frames).unwrap();
    let host = Host {
        mem,
        frames: unit.frames().clone(),
        hw: unit.hardware().clone(),
        unit,
    };
    let vm = Vm::new(&host, 4 << 20, 2 << 20);
    let mut c = Container::new(allocator(), 4, VtdDomain::new(&host.unit).unwrap()).unwrap();
    c.set_iommu(IommuModel::Type1Nesting).unwrap();
    assert_eq!(c.backend().levels(), vsva_vtd::slpte::SlLevels::Four);
    assert_eq!(c.backend().addr_width(), 46);
    assert_eq!(c.get_info().unwrap().nesting.unwrap().addr_width, 46);
    let at = |iova: u64| DmaMap {
        iova: Iova(iova),
        vaddr: vm.vaddr(0),
        size: 2 << 20,
        read: true,
        write: true,
    };
    c.map_dma(&at((1 << 46) - (4 << 20))).unwrap();
    for iova in [(1 << 46) - (1 << 20), 1 << 46, 1 << 47] {
        assert_eq!(
            c.map_dma(&at(iova)).unwrap_err().errno(),
            -libc::EINVAL,
            "{iova:#x}"
        );
        assert_eq!(c.backend().lookup(Iova(iova)), None);
    }
}

#[test]
fn refused_requests_change_nothing() {
    let host = host();
    let alloc = allocator();
    let mut g = guest(&host, &alloc, sid(12), CTRL_PASID_EN);
    let frames = host.frames.allocated_bytes();
    let p = g.container.pasid_alloc(1, 10).unwrap();
    let tables = GuestTables::process(&g.vm);
    let mut bad = bind_of(p, tables.root());
    bad.addr_width = 39;
    assert_eq!(
        g.container.bind_gpasid(&bad).unwrap_err().errno(),
        -libc::EINVAL
    );
    bad = bind_of(p, Gpa(1 << 48));
    assert_eq!(
        g.container.bind_gpasid(&bad).unwrap_err().errno(),
        -libc::EINVAL
    );
    assert_eq!(host.unit.pasid_entry(g.sid, p), None);
    // Memory the VMM does not have, or IOVAs beyond the second level.
    let mut m = g.vm.map_all(PAGE_SIZE);
    m.iova = Iova(1 << 40);
    m.vaddr = 0x1000;
    assert_eq!(g.container.map_dma(&m).unwrap_err().errno(), -libc::EFAULT);
    m.vaddr = g.vm.vaddr(0);
    m.iova = Iova(1 << 48);
    assert_eq!(g.container.map_dma(&m).unwrap_err().errno(), -libc::EINVAL);
    assert_eq!(g.container.backend().lookup(Iova(1 << 40)), None);
    // Invalidations the granularity table refuses.
    let dom = CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity: InvGranularity::Domain,
    };
    assert_eq!(
        g.container.cache_invalidate(&dom).unwrap_err().errno(),
        -libc::EINVAL
    );
    let mut misaligned = invalidate_page(p, DST_GVA + PAGE_SIZE, IOMMU_CACHE_INV_TYPE_IOTLB);
    if let InvGranularity::Addr { nb_granules, .. } = &mut misaligned.granularity {
        *nb_granules = 2;
    }
    assert_eq!(
        g.container
            .cache_invalidate(&misaligned)
            .unwrap_err()
            .errno(),
        -libc::ERANGE
    );
    assert_eq!(host.frames.allocated_bytes(), frames);
}

#[test]
fn closing_everything_leaves_nothing() {
    let mem = HostMemory::new(1 << 30).unwrap();
    let frames = Arc::new(FrameAllocator::new(mem.clone()));
    let hw = Iommu::new(mem.clone(), IommuConfig::default()).unwrap();
    let unit = HostIommu::new(hw.clone(), frames.clone()).unwrap();
    let host = Host {
        mem,
        frames: frames.clone(),
        hw: hw.clone(),
        unit,
    };
    let alloc = allocator();
    let baseline = frames.allocated_bytes();
    let dids: Vec<_> = {
        let (a, _ta, pa) = bound_guest(&host, &alloc, 20, CTRL_ATS_EN | CTRL_PRI_EN);
        let (b, _tb, pb) = bound_guest(&host, &alloc, 21, 0);
        for (g, p) in [(&a, pa), (&b, pb)] {
            let r = run(
                &g.vm,
                &g.dev,
                memmove(Some(p), SRC_GVA, DST_GVA, 64, COMP_GVA),
                COMP_GPA,
            );
            assert_eq!(r.status, CompletionStatus::Success);
            let r = run(
                &g.vm,
                &g.dev,
                memmove(None, SRC_GPA, DST_GPA, 64, COMP_GPA),
                COMP_GPA,
            );
            assert_eq!(r.status, CompletionStatus::Success);
        }
        assert!(!hw.iotlb().is_empty());
        assert_ne!(hw.cached_entries(), (0, 0));
        assert_eq!(host.unit.domain_ids_in_use(), 2);
        assert_eq!(host.unit.page_request_routes(), 2);
        assert!(frames.allocated_bytes() > baseline);
        let dids = vec![a.container.backend().did(), b.container.backend().did()];
        drop((a, b));
        dids
    };
    assert_eq!(frames.allocated_bytes(), baseline);
    assert!(hw.iotlb().is_empty(), "{} IOTLB entries", hw.iotlb().len());
    assert_eq!(hw.cached_entries(), (0, 0));
    assert_eq!(host.unit.domain_ids_in_use(), 0);
    for did in dids {
        assert!(!host.unit.is_domain_id_allocated(did));
    }
    assert_eq!(host.unit.attached_devices(), 0);
    assert_eq!(host.unit.page_request_routes(), 0);
    assert_eq!(host.unit.page_request_sinks(), 0);
    assert_eq!(alloc.lock().unwrap().total_allocated(), 0);
    // The unit's own root table and queues go with it.
    assert!(baseline > 0);
    let Host { unit, .. } = host;
    drop(unit);
    assert_eq!(frames.allocated_bytes(), 0);
}

/// A mapping of the model: IOVA range and the guest physical address it starts at.
#[derive(Clone, Copy, Debug)]
struct Mapped {
    iova: u64,
    size: u64,
    gpa: u64,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random MAP_DMA and UNMAP_DMA through a container: after each, every probed IOVA
    /// translates through the unit (IOTLB first, which earlier probes filled) to exactly
    /// the host byte the mappings say, or faults with SSL.2, whatever page sizes the
    /// alignments allowed.
    #[test]
    fn the_second_level_follows_map_and_unmap(
        ops in proptest::collection::vec((any::<bool>(), 0u64..16, 1u64..=4, any::<bool>(), any::<usize>()), 1..16),
        probes in proptest::collection::vec(0u64..(64 << 20), 24),
    ) {
        let host = host();
        let vm = Vm::new(&host, 128 << 20, 2 << 20);
        let mut c = Container::new(allocator(), 4, VtdDomain::new(&host.unit).unwrap()).unwrap();
        c.set_iommu(IommuModel::Type1v2).unwrap();
        let s = sid(30);
        c.attach_device(s).unwrap();
        let mut model: Vec<Mapped> = Vec::new();
        for (map, slot, mib, skew, pick) in ops {
            if map {
                let m = Mapped {
                    iova: slot * (4 << 20),
                    size: mib << 20,
                    gpa: slot * (4 << 20) + if skew { PAGE_SIZE } else { 0 },
                };
                let overlaps = model
                    .iter()
                    .any(|o| o.iova < m.iova + m.size && m.iova < o.iova + o.size);
                let r = c.map_dma(&DmaMap {
                    iova: Iova(m.iova),
                    vaddr: vm.vaddr(m.gpa),
                    size: m.size,
                    read: true,
                    write: true,
                });
                prop_assert_eq!(r.is_ok(), !overlaps, "{:?}", r);
                if !overlaps {
                    model.push(m);
                }
            } else if !model.is_empty() {
                let m = model.remove(pick % model.len());
                prop_assert_eq!(c.unmap_dma(Iova(m.iova), m.size).unwrap(), m.size);
            }
            for &p in &probes {
                let want = model
                    .iter()
                    .find(|m| m.iova <= p && p < m.iova + m.size)
                    .map(|m| vm.hpa.0 + m.gpa + (p - m.iova));
                for _ in 0..2 {
                    let got = host.hw.translate(s, None, p, AccessRequest::WRITE);
                    match want {
                        Some(hpa) => prop_assert_eq!(got.map(|t| t.hpa), Ok(hpa)),
                        None => prop_assert_eq!(got.map_err(|f| f.reason).map(|t| t.hpa), Err(FaultReason::Ssl2)),
                    }
                }
            }
        }
        drop(c);
        prop_assert!(host.hw.iotlb().is_empty());
    }
}

/// `VFIO_IOMMU_GET_INFO` on a container of the real host driver reports the page sizes the
/// physical unit's CAP register offers the second level (4 KiB always, 2 MiB and 1 GiB
/// as CAP.SLLPS bits 0 and 1 say), read from the model's register, not a constant.
#[test]
fn get_info_reports_the_page_sizes_of_cap_sllps() {
    let host = host();
    let raw = host
        .hw
        .mmio_read(vsva_vtd::regs::layout::offset::CAP, 8)
        .unwrap();
    let sllps = vsva_vtd::regs::Cap::from_raw(raw).sllps;
    let mut want = 1u64 << 12;
    if sllps & 1 != 0 {
        want |= 1 << 21;
    }
    if sllps & 2 != 0 {
        want |= 1 << 30;
    }
    assert_ne!(sllps, 0, "the model offers large second-level pages");
    for model in [IommuModel::Type1v2, IommuModel::Type1Nesting] {
        let mut c = Container::new(allocator(), 4, VtdDomain::new(&host.unit).unwrap()).unwrap();
        c.set_iommu(model).unwrap();
        let info = c.get_info().unwrap();
        assert_eq!(info.iova_pgsizes, want, "{model:?}: CAP.SLLPS {sllps:#b}");
        assert_eq!(c.backend().info().iova_pgsizes, want);
    }
}

/// What attach reads of each device's PCIe capabilities decides its context entry's DTE
/// and PRE (F13, `info->ats_supported` and `info->pri_supported`) and whether an unmap
/// invalidates its device TLB (F8, `info->ats_enabled`).
#[test]
fn device_capabilities_decide_dte_pre_and_device_tlb_invalidations() {
    let host = host();
    let vm = Vm::new(&host, RAM, 2 << 20);
    let mut c = Container::new(allocator(), 4, VtdDomain::new(&host.unit).unwrap()).unwrap();
    c.set_iommu(IommuModel::Type1v2).unwrap();
    let plain = DmaEngineConfig {
        ats: false,
        prs: false,
        ..DmaEngineConfig::new(sid(3))
    };
    let ats_only = DmaEngineConfig {
        prs: false,
        ats_queue_depth: 5,
        ..DmaEngineConfig::new(sid(4))
    };
    let full = DmaEngineConfig::new(sid(5));
    for config in [plain, ats_only, full] {
        let dev = Arc::new(DmaEngine::new(config, host.hw.clone()).unwrap());
        host.hw.attach_endpoint(dev);
        c.attach_device(config.sid).unwrap();
    }
    let rta = host.hw.mmio_read(offset::RTADDR, 8).unwrap() & !0xfff;
    let ctx = |s: SourceId| {
        let e = read_context_entry(
            &**host.hw.memory(),
            rta,
            s,
            &EntryChecks::new(host.hw.capabilities()),
        )
        .unwrap();
        (e.dte, e.pre)
    };
    assert_eq!(ctx(sid(3)), (false, false));
    assert_eq!(ctx(sid(4)), (true, false));
    assert_eq!(ctx(sid(5)), (true, true));
    c.map_dma(&vm.map_all(4 << 20)).unwrap();
    let before = host.hw.stats().descriptors.load(Ordering::Relaxed);
    assert_eq!(c.unmap_dma(Iova(0), 4 << 20).unwrap(), 4 << 20);
    // IOTLB page-selective, the device TLBs of the two ATS devices, wait.
    assert_eq!(
        host.hw.stats().descriptors.load(Ordering::Relaxed) - before,
        4
    );
}

/// A device whose PASID capability is narrower than 20 bits, or that has none, cannot be
/// bound: EINVAL and no entry, as `intel_svm_bind_gpasid` (F15); a 20-bit one can.
#[test]
fn bind_needs_a_device_with_20_bit_pasids() {
    let host = host();
    let vm = Vm::new(&host, RAM, 2 << 20);
    for (width, ok) in [(Some(16), false), (None, false), (Some(20), true)] {
        let sid = sid(20 + u8::from(ok) + u8::from(width.is_some()));
        let config = DmaEngineConfig {
            pasid: width.is_some(),
            pasid_width: width.unwrap_or(20),
            ..DmaEngineConfig::new(sid)
        };
        host.hw
            .attach_endpoint(Arc::new(DmaEngine::new(config, host.hw.clone()).unwrap()));
        let mut c = Container::new(allocator(), 16, VtdDomain::new(&host.unit).unwrap()).unwrap();
        c.set_iommu(IommuModel::Type1Nesting).unwrap();
        c.attach_device(sid).unwrap();
        c.map_dma(&vm.map_all(8 << 20)).unwrap();
        let p = c.pasid_alloc(1, 10).unwrap();
        let r = c.bind_gpasid(&bind_of(p, Gpa(PT_GPA)));
        assert_eq!(r.is_ok(), ok, "width {width:?}: {r:?}");
        if !ok {
            assert_eq!(r.unwrap_err().errno(), -libc::EINVAL);
            assert_eq!(host.unit.pasid_entry(sid, p), None);
        } else {
            assert!(host.unit.pasid_entry(sid, p).is_some());
        }
    }
}

/// The unbind's page-request drain (`intel_svm_drain_prq`, F12): skipped for a device
/// without PRI, and for a device with PRI submitted again while PRS.PRO is set after it,
/// the queue serviced in between (which clears PRO).
#[test]
fn the_unbind_drain_repeats_while_pro_is_set_and_needs_pri() {
    use vsva_hw::dma::port::{DmaAccess, DmaPort, PageRequestMessage};
    use vsva_vtd::regs::layout::{event_control, pq};
    let host = host();
    let vm = Vm::new(&host, RAM, 2 << 20);
    let (pri, no_pri) = (sid(30), sid(31));
    let container = |sid: SourceId, prs: bool| {
        let config = DmaEngineConfig {
            prs,
            ..DmaEngineConfig::new(sid)
        };
        host.hw
            .attach_endpoint(Arc::new(DmaEngine::new(config, host.hw.clone()).unwrap()));
        let mut c = Container::new(allocator(), 16, VtdDomain::new(&host.unit).unwrap()).unwrap();
        c.set_iommu(IommuModel::Type1Nesting).unwrap();
        c.attach_device(sid).unwrap();
        c.map_dma(&vm.map_all(8 << 20)).unwrap();
        c
    };
    let (mut a, mut b) = (container(pri, true), container(no_pri, false));
    let bound = |c: &mut Container<VtdDomain>| {
        let p = c.pasid_alloc(1, 10).unwrap();
        c.bind_gpasid(&bind_of(p, Gpa(PT_GPA))).unwrap();
        p
    };
    let (p1, p2, q) = (bound(&mut a), bound(&mut a), bound(&mut b));
    let descriptors = || host.hw.stats().descriptors.load(Ordering::Relaxed);
    let unbind = |c: &mut Container<VtdDomain>, p| {
        let before = descriptors();
        c.unbind_gpasid(&bind_of(p, Gpa(PT_GPA))).unwrap();
        descriptors() - before
    };
    let prs = || host.hw.mmio_read(offset::PRS, 4).unwrap() as u32;
    let queued =
        || host.hw.mmio_read(offset::PQH, 8).unwrap() != host.hw.mmio_read(offset::PQT, 8).unwrap();
    // PASID cache, IOTLB (domain-selective, nested), device TLB, wait.
    let plain = unbind(&mut a, p1);
    assert_eq!(plain, 4);
    // Page-request events masked, so that nothing services the queue: it fills up and
    // one more request overflows (PRO), as if during the drain.
    host.hw
        .mmio_write(offset::PECTL, 4, event_control::IM.into())
        .unwrap();
    for i in 0..=128u16 {
        host.hw.page_request(PageRequestMessage {
            sid: pri,
            pasid: Some(pasid(99)),
            addr: u64::from(i) << 12,
            access: DmaAccess::READ,
            prgi: i,
            last: false,
        });
    }
    assert_ne!(prs() & pq::PRO, 0);
    // Without PRI: no drain, so nothing is serviced and PRO stays.
    assert_eq!(unbind(&mut b, q), plain);
    assert_ne!(prs() & pq::PRO, 0);
    assert!(queued());
    // With PRI: the drain finds PRO set, services the queue and drains again.
    assert_eq!(unbind(&mut a, p2), 2 * plain);
    assert_eq!(prs() & pq::PRO, 0);
    assert!(!queued());
}

/// The PASID directory is sized for the smaller of the device's and the unit's PASID
/// widths, at least one page (`intel_pasid_alloc_table`): PDTS 7 for 20 bits, 3 for 16,
/// 2 (one page) for 8 bits or no PASID capability.
#[test]
fn the_pasid_directory_is_sized_by_the_device_s_pasid_width() {
    let host = host();
    let mut c = Container::new(allocator(), 4, VtdDomain::new(&host.unit).unwrap()).unwrap();
    c.set_iommu(IommuModel::Type1v2).unwrap();
    let rta = |h: &Host| h.hw.mmio_read(offset::RTADDR, 8).unwrap() & !0xfff;
    for (i, (width, pdts)) in [(Some(20), 7), (Some(16), 3), (Some(8), 2), (None, 2)]
        .into_iter()
        .enumerate()
    {
        let sid = sid(24 + i as u8);
        let config = DmaEngineConfig {
            pasid: width.is_some(),
            pasid_width: width.unwrap_or(20),
            ..DmaEngineConfig::new(sid)
        };
        host.hw
            .attach_endpoint(Arc::new(DmaEngine::new(config, host.hw.clone()).unwrap()));
        c.attach_device(sid).unwrap();
        let e = read_context_entry(
            &**host.hw.memory(),
            rta(&host),
            sid,
            &EntryChecks::new(host.hw.capabilities()),
        )
        .unwrap();
        assert_eq!(e.pdts, pdts, "width {width:?}");
    }
}
