//! The vIOMMU over iommufd, on the real host: the host VT-d driver and the physical IOMMU
//! model, a DMA engine as the passthrough device, guest RAM in host memory. The guest's
//! PASID entry becomes a nested HWPT attached at the PASID, a changed entry a new HWPT
//! replacing it, the invalidations of one queue-tail write one `IOMMU_HWPT_INVALIDATE`,
//! and page requests go through the fault queue file. Each check is on bytes the device
//! wrote: a HWPT not replaced or an IOTLB not invalidated sends them to the old page.

mod viommu;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use viommu::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::driver::HostIommu;
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::iommufd::{IommufdFile, ObjectState};
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN};
use vsva_hw::dma::{CompletionRequest, Descriptor, DmaEngine, DmaEngineConfig, Operation};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory};
use vsva_uapi::iommu::IOMMU_CACHE_INV_TYPE_IOTLB;
use vsva_uapi::iommufd::IOMMU_HWPT_INVALIDATE;
use vsva_uapi::{
    error::Errno, file::EventNotifier, file::UapiFile, request::CacheInvalidate,
    request::InvGranularity,
};
use vsva_vmm::{
    GuestPasids, HostSva, Iommufd, IommufdDevice, PageRequestOutcome, PasidSource, UserBuffer,
    VIommuConfig,
};
use vsva_vtd::inv_desc::{PasidCacheGranularity, PasidIotlbGranularity, ResponseCode};
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::{
    addr::DomainId, addr::Pasid, addr::SourceId, flpte::FlPagingMode, inv_desc::InvDesc,
    walk::PageSize,
};

const HOST_SID: SourceId = SourceId::from_rid(0x8100);
const VA: u64 = 0x4000_0000;
const PAGE: u64 = 4096;

/// The VM's `/dev/iommu` as the VMM holds it, counting the ioctls made on it.
struct Counting {
    file: Arc<IommufdFile>,
    calls: Mutex<BTreeMap<u32, usize>>,
    total: AtomicUsize,
}

impl Counting {
    fn count(&self, cmd: u32) -> usize {
        self.calls.lock().unwrap().get(&cmd).copied().unwrap_or(0)
    }
}

impl UapiFile for Counting {
    fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
        *self.calls.lock().unwrap().entry(cmd).or_default() += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        self.file.ioctl(cmd, arg)
    }
    fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        self.file.read(buf)
    }
    fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        self.file.write(buf)
    }
    fn set_event_notifier(&self, n: Option<Arc<dyn EventNotifier>>) {
        self.file.set_event_notifier(n)
    }
}

struct Vm {
    mem: Arc<HostMemory>,
    unit: Arc<HostIommu>,
    engine: Arc<DmaEngine>,
    file: Arc<Counting>,
    raw: Arc<IommufdFile>,
    dev: Arc<IommufdDevice>,
    fd: Arc<Iommufd>,
    g: Guest,
    dev_sid: SourceId,
    prq: u64,
    ram: Arc<GuestMemoryMmap>,
    _cdev: Arc<VfioDeviceFile>,
    _fds: Arc<Iommufds>,
    _scratch: Arc<GuestMemoryMmap>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.mem.release_guest_memory(&self.ram);
        self.mem.release_guest_memory(&self._scratch);
    }
}

fn vm() -> Vm {
    let mem = HostMemory::new(RAM + (32 << 20)).unwrap();
    let frames = Arc::new(FrameAllocator::new(mem.clone()));
    let hw = Iommu::new(mem.clone(), IommuConfig::default()).unwrap();
    let unit = HostIommu::new(hw.clone(), frames.clone()).unwrap();
    let ram_hpa = frames.alloc_range(RAM, 2 << 20).unwrap();
    let ram = Arc::new(
        mem.guest_memory(&[(vsva_vtd::addr::Gpa(0), ram_hpa, RAM)])
            .unwrap(),
    );
    let scratch_hpa = frames.alloc_range(4 * PAGE, PAGE).unwrap();
    let scratch = Arc::new(
        mem.guest_memory(&[(vsva_vtd::addr::Gpa(0), scratch_hpa, 4 * PAGE)])
            .unwrap(),
    );

    let fds = Iommufds::new();
    let (fdnum, raw) = fds.open(&unit);
    let file = Arc::new(Counting {
        file: raw.clone(),
        calls: Mutex::default(),
        total: AtomicUsize::new(0),
    });
    let lookup = |n: i32| fds.fault(n).map(|f| f as Arc<dyn UapiFile>);
    let fd = Iommufd::open(
        file.clone(),
        fdnum,
        &lookup,
        UserBuffer::new(scratch.clone()).unwrap(),
        GuestPasids::new(16),
    )
    .unwrap();
    let va = ram.get_host_address(GuestAddress(0)).unwrap() as u64;
    fd.map(va, RAM, 0).unwrap();

    let engine = Arc::new(DmaEngine::new(DmaEngineConfig::new(HOST_SID), hw.clone()).unwrap());
    hw.attach_endpoint(engine.clone());
    let cdev = Arc::new(VfioDeviceFile::open(HOST_SID, fds.clone()));
    let dev = fd.attach_device(cdev.clone(), HOST_SID).unwrap();
    engine
        .enable(CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN)
        .unwrap();

    let g = Guest::with_memory(ram.clone(), fd.pasids(), VIommuConfig::default());
    g.enable();
    let prq = g.enable_prq();
    let dev_sid = sid(0, 3, 0);
    g.viommu
        .attach_passthrough(dev_sid, HOST_SID, dev.clone())
        .unwrap();
    g.attach(dev_sid, true);
    Vm {
        mem,
        unit,
        engine,
        file,
        raw,
        dev,
        fd,
        g,
        dev_sid,
        prq,
        ram,
        _cdev: cdev,
        _fds: fds,
        _scratch: scratch,
    }
}

fn pasid_cache(p: Pasid) -> InvDesc {
    InvDesc::PasidCache {
        granularity: PasidCacheGranularity::PasidSelective,
        did: DomainId(1),
        pasid: p,
    }
}

fn page_inv(p: Pasid, addr: u64) -> InvDesc {
    InvDesc::PasidIotlb {
        granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
        did: DomainId(1),
        pasid: p,
        addr,
        ih: false,
        am: 0,
    }
}

fn dev_tlb(dev: SourceId, p: Pasid, addr: u64) -> InvDesc {
    InvDesc::PasidDevIotlb {
        sid: dev,
        pfsid: dev,
        pasid: p,
        max_invs_pend: 0,
        addr,
        size: false,
        global: false,
    }
}

impl Vm {
    /// The device fills 8 bytes at `va` in `p`; with `block`, a fault waits for a page
    /// response.
    fn fill(&self, p: Pasid, va: u64, pattern: u64, block: bool) {
        let desc = Descriptor {
            pasid: Some(p),
            privileged: false,
            block_on_fault: block,
            completion: CompletionRequest::None,
            op: Operation::Fill {
                pattern,
                dst: va,
                size: 8,
            },
        };
        self.engine.portal_write(0, &desc.encode()).unwrap();
        self.engine.process();
    }

    fn word(&self, gpa: u64) -> u64 {
        self.ram.read_obj(GuestAddress(gpa)).unwrap()
    }

    fn nested(&self) -> Vec<u32> {
        self.raw
            .lock()
            .objects()
            .into_iter()
            .filter_map(|(id, o)| matches!(o, ObjectState::HwptNested { .. }).then_some(id))
            .collect()
    }
}

#[test]
fn nested_hwpts_follow_the_guest_entry_and_invalidations_reach_the_iotlb() {
    let vm = vm();
    let g = &vm.g;
    let p = g.alloc_pasid();
    assert_eq!(p.raw(), 1, "the VM's own PASID space");
    let (a, b, c) = (g.alloc_frame(), g.alloc_frame(), g.alloc_frame());
    let mut pt = g.page_table();
    g.map(&mut pt, VA, a);
    g.set_pasid_entry(
        vm.dev_sid,
        p,
        Some(fl_entry(1, pt.root(), FlPagingMode::FourLevel)),
    );
    assert!(g.submit_sync(&[pasid_cache(p)]));
    assert!(g.viommu.take_host_errors().is_empty());
    let first = vm.dev.nested_hwpts();
    assert_eq!(first.len(), 1);
    assert_eq!(vm.nested(), vec![first[0].1]);
    let entry = vm.unit.pasid_entry(HOST_SID, p).unwrap();
    assert_eq!(entry.flptptr, pt.root());

    vm.fill(p, VA, 0x1111, false);
    assert_eq!(vm.word(a), 0x1111);

    // The guest moves the page and invalidates it, with its device-TLB pair, in one
    // queue-tail write: one IOMMU_HWPT_INVALIDATE, and the device writes the new page.
    pt.unmap(&*g.mem, VA, PageSize::Size4K).unwrap();
    g.map(&mut pt, VA, b);
    let before = vm.file.count(IOMMU_HWPT_INVALIDATE);
    assert!(g.submit_sync(&[
        page_inv(p, VA),
        dev_tlb(vm.dev_sid, p, VA),
        page_inv(p, VA + PAGE),
        page_inv(p, VA + 2 * PAGE),
    ]));
    assert!(g.viommu.take_host_errors().is_empty());
    vm.fill(p, VA, 0x2222, false);
    assert_eq!(
        (vm.word(a), vm.word(b)),
        (0x1111, 0x2222),
        "stale IOTLB entry used"
    );
    assert_eq!(vm.file.count(IOMMU_HWPT_INVALIDATE) - before, 1);

    // A new page table in the entry: a new nested HWPT replaces the old one at the PASID,
    // which is destroyed; the device now walks the new table.
    let mut pt2 = g.page_table();
    g.map(&mut pt2, VA, c);
    g.set_pasid_entry(
        vm.dev_sid,
        p,
        Some(fl_entry(1, pt2.root(), FlPagingMode::FourLevel)),
    );
    assert!(g.submit_sync(&[
        pasid_cache(p),
        InvDesc::PasidIotlb {
            granularity: PasidIotlbGranularity::PasidSelective,
            did: DomainId(1),
            pasid: p,
            addr: 0,
            ih: false,
            am: 0,
        },
    ]));
    assert!(g.viommu.take_host_errors().is_empty());
    vm.fill(p, VA, 0x3333, false);
    assert_eq!(
        (vm.word(b), vm.word(c)),
        (0x2222, 0x3333),
        "the old table was walked"
    );
    let second = vm.dev.nested_hwpts();
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].1, first[0].1, "the HWPT was not replaced");
    assert_eq!(vm.nested(), vec![second[0].1], "the old HWPT is destroyed");

    // WPE goes down with the entry (the seed's bind could not carry it).
    let mut wpe = fl_entry(1, pt2.root(), FlPagingMode::FourLevel);
    wpe.sre = true;
    wpe.wpe = true;
    g.set_pasid_entry(vm.dev_sid, p, Some(wpe));
    assert!(g.submit_sync(&[pasid_cache(p)]));
    assert!(g.viommu.take_host_errors().is_empty());
    let entry = vm.unit.pasid_entry(HOST_SID, p).unwrap();
    assert!(entry.wpe && entry.sre);

    // The entry cleared: detached and destroyed; the device's DMA faults.
    g.set_pasid_entry(vm.dev_sid, p, None);
    assert!(g.submit_sync(&[pasid_cache(p)]));
    assert!(vm.dev.nested_hwpts().is_empty());
    assert!(vm.nested().is_empty());
    assert_eq!(vm.unit.pasid_entry(HOST_SID, p), None);
    vm.fill(p, VA, 0x4444, false);
    assert_eq!(vm.word(c), 0x3333);
    let stats = g.viommu.stats();
    assert_eq!((stats.binds, stats.unbinds), (3, 1));
}

#[test]
fn page_requests_come_from_the_fault_queue_and_answers_carry_the_cookie() {
    let vm = vm();
    let g = &vm.g;
    let p = g.alloc_pasid();
    let mut pt = g.page_table();
    g.set_pasid_entry(
        vm.dev_sid,
        p,
        Some(fl_entry(1, pt.root(), FlPagingMode::FourLevel)),
    );
    assert!(g.submit_sync(&[pasid_cache(p)]));

    // The page is not mapped: the device asks and waits.
    vm.fill(p, VA, 0x5555, true);
    assert_eq!(vm.engine.waiting_for_page_response(), 1);
    vm.unit.service_page_requests();
    let reqs = vm.fd.read_page_requests().unwrap();
    assert_eq!(reqs.len(), 1);
    let (host_sid, req) = reqs[0];
    assert_eq!((host_sid, req.pasid, req.addr), (HOST_SID, Some(p), VA));
    assert!(req.write && req.last_page);
    let out = g.viommu.inject_host_page_request(host_sid, &req).unwrap();
    assert_eq!(out, PageRequestOutcome::Queued);
    let desc = PageRequestDesc::decode(g.page_request(vm.prq, 0)).unwrap();
    assert_eq!((desc.rid, desc.pasid, desc.addr), (vm.dev_sid, Some(p), VA));

    // The guest maps the page and answers the group: the cookie goes down, the device
    // retries and the bytes land.
    let page = g.alloc_frame();
    g.map(&mut pt, VA, page);
    assert!(g.submit_sync(&[InvDesc::PageGroupResponse {
        rid: vm.dev_sid,
        pasid_present: true,
        pasid: p,
        private_data_present: false,
        response: ResponseCode::Success,
        last_page_in_group: true,
        prg_index: desc.prg_index,
        private_data: [0; 2],
    }]));
    assert!(g.viommu.take_host_errors().is_empty());
    vm.engine.process();
    assert_eq!(vm.engine.waiting_for_page_response(), 0);
    assert_eq!(vm.word(page), 0x5555);
    // A second answer to the same group has no cookie left: refused, and kept as an error.
    assert!(g.submit_sync(&[InvDesc::PageGroupResponse {
        rid: vm.dev_sid,
        pasid_present: true,
        pasid: p,
        private_data_present: false,
        response: ResponseCode::Success,
        last_page_in_group: true,
        prg_index: desc.prg_index,
        private_data: [0; 2],
    }]));
    let errors = g.viommu.take_host_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].error, Errno::EINVAL);
}

#[test]
fn a_refused_entry_of_a_batch_fails_alone() {
    let vm = vm();
    let g = &vm.g;
    let p = g.alloc_pasid();
    let pt = g.page_table();
    g.set_pasid_entry(
        vm.dev_sid,
        p,
        Some(fl_entry(1, pt.root(), FlPagingMode::FourLevel)),
    );
    assert!(g.submit_sync(&[pasid_cache(p)]));
    let inv = |addr, nb_granules| CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity: InvGranularity::Addr {
            pasid: Some(p),
            archid: None,
            addr,
            granule_size: PAGE,
            nb_granules,
            leaf: false,
        },
    };
    let other = CacheInvalidate {
        granularity: InvGranularity::Pasid {
            pasid: Some(pasid(9)),
            archid: None,
        },
        ..inv(0, 1)
    };
    let before = vm.file.count(IOMMU_HWPT_INVALIDATE);
    // The host refuses an entry of U64_MAX pages not at 0 (EINVAL): the entry before it is
    // done, the one after it goes down again; PASID 9 has no HWPT.
    let results =
        vm.dev
            .cache_invalidate_batch(&[inv(VA, 1), inv(VA, u64::MAX), other, inv(VA + PAGE, 2)]);
    assert_eq!(
        results,
        vec![Ok(()), Err(Errno::EINVAL), Err(Errno::ENOENT), Ok(())]
    );
    assert_eq!(vm.file.count(IOMMU_HWPT_INVALIDATE) - before, 2);
    // An unbound PASID has nothing to unbind.
    assert_eq!(
        vm.dev.unbind_gpasid(&bind(pasid(9), 0x1000)),
        Err(Errno::ENOENT)
    );
    assert!(vm.file.total.load(Ordering::Relaxed) > 0);
    drop(pt);
}

proptest! {
    /// Allocation hands out the lowest free PASID of the range, never one held, and
    /// frees only what is held.
    #[test]
    fn guest_pasids_hand_out_the_lowest_free(ops in proptest::collection::vec((any::<bool>(), 0u32..40, 0u32..40), 1..80)) {
        let space = GuestPasids::new(16);
        let mut model = BTreeSet::new();
        for (alloc, a, b) in ops {
            if alloc {
                let (min, max) = (a.min(b), a.max(b));
                let want = (min.max(1)..=max).find(|p| !model.contains(p));
                let got = space.pasid_alloc(min, max);
                match want {
                    Some(p) if model.len() < 16 => {
                        prop_assert_eq!(got.map(Pasid::raw), Ok(p));
                        model.insert(p);
                    }
                    _ => prop_assert!(got.is_err()),
                }
            } else if let Ok(p) = Pasid::new(a) {
                let got = space.pasid_free(p);
                prop_assert_eq!(got.is_ok(), model.remove(&a));
            }
            prop_assert_eq!(space.held(), model.iter().copied().collect::<Vec<_>>());
        }
    }
}
