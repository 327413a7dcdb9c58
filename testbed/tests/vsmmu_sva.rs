//! An arm64 guest end to end on an SMMUv3 host: the guest's arm-smmu-v3 driver
//! (`vsva_guest::smmu::SmmuSva`) programs the virtual SMMUv3 (`vsva_vmm::VSmmu`), which hands the
//! guest's CD table to the VM's VFIO container (`VFIO_IOMMU_ATTACH_PASID_TABLE`) on the
//! host SMMUv3 driver and the physical SMMUv3 model (strict mode); a DMA engine with the
//! guest's SubstreamID moves bytes at the process's virtual addresses through its AArch64
//! tables nested over stage 2; munmap's invalidations reach the host before CMD_SYNC
//! completes, so the next access faults at the unmapped address and the guest reads that
//! fault from its event queue; a page request is served by the guest's fault handler.
//! The stall tests run the same VM over iommufd as well (a nested HWPT under the VM's
//! vIOMMU, stalls from its fault queue, the guest's CMD_RESUME back by the group's
//! cookie).

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use vsva_mem::PhysMem;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_guest::{frames::GuestFrames, process::Process, process::Prot, smmu::SmmuSva};
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::smmu::{SmmuDomain, SmmuHost};
use vsva_host::{container::Container, file::ContainerFile, pasid::PasidAllocator};
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN};
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DmaEngine, DmaEngineConfig,
    Operation,
};
use vsva_hw::smmuv3::{Smmu, SmmuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory};
use vsva_smmuv3::{
    cmd::ResumeAction, event::EventType, features::Features, features::Httu, features::StallModel,
    regs::RegError,
};
use vsva_smmuv3_driver::Registers;
use vsva_uapi::{
    file::IommuModel, file::UapiFile, file::VfioIoctls, request::DmaMap, request::QueuedFault,
};
use vsva_vmm::{
    HostConfig, SmmuIommufd, SmmuIommufdDevice, UserBuffer, VSmmu, VSmmuConfig, VSmmuError, Vevent,
};
use vsva_vtd::{addr::Gpa, addr::Gva, addr::Hpa, addr::Iova, addr::Pasid, addr::SourceId};

const RAM: u64 = 64 << 20;
/// The device's StreamID in the guest, and its requester id on the host.
const GSID: u32 = 0x18;
const PAGE: u64 = 4096;

struct Mmio(Arc<VSmmu>);

impl Registers for Mmio {
    fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        self.0.read(offset, size).map_err(reg_error)
    }
    fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
        self.0.write(offset, size, value).map_err(reg_error)
    }
}

fn reg_error(e: VSmmuError) -> RegError {
    match e {
        VSmmuError::Register(r) => r,
        e => panic!("a register access failed with {e}"),
    }
}

/// The host: its memory, the SMMUv3 model (strict mode) and the host's SMMU driver.
#[derive(Clone)]
struct HostParts {
    mem: Arc<HostMemory>,
    host_frames: Arc<FrameAllocator>,
    hw: Arc<Smmu>,
    host: Arc<SmmuHost>,
}

impl HostParts {
    fn new(stall_model: StallModel) -> HostParts {
        let mem = HostMemory::new(256 << 20).unwrap();
        let host_frames = Arc::new(FrameAllocator::new(mem.clone()));
        let defaults = SmmuConfig::default();
        let hw = Arc::new(Smmu::new(
            mem.clone(),
            SmmuConfig {
                strict: true,
                features: Features {
                    stall_model,
                    ..defaults.features
                },
                ..defaults
            },
        ));
        let host = SmmuHost::new(hw.clone(), host_frames.clone()).unwrap();
        HostParts {
            mem,
            host_frames,
            hw,
            host,
        }
    }
}

/// Which uAPI the VMM gives the guest's STE to the host through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Uapi {
    /// A VFIO type1 nesting container (`VFIO_IOMMU_ATTACH_PASID_TABLE`).
    Type1,
    /// iommufd: a nested HWPT under the VM's vIOMMU, page requests and stalls from its
    /// fault queue.
    Iommufd,
}

/// Bytes of the VMM buffer iommufd pointer arguments go through.
const SCRATCH: u64 = 16 << 10;

/// A VM's iommufd as its VMM holds it.
struct VmIommufd {
    fds: Arc<Iommufds>,
    fd: i32,
    iommufd: Arc<SmmuIommufd>,
    device: Arc<SmmuIommufdDevice>,
    cdev: Arc<VfioDeviceFile>,
    scratch_hpa: Hpa,
    scratch: Arc<GuestMemoryMmap>,
}

impl VmIommufd {
    /// `/dev/iommu` with guest RAM (at VMM address `vaddr`) mapped at IPA 0 and the
    /// device `host_sid` bound, attached to the nest parent and given vSID [`GSID`].
    fn open(parts: &HostParts, host_sid: SourceId, vaddr: u64) -> VmIommufd {
        let scratch_hpa = parts.host_frames.alloc_range(SCRATCH, 4096).unwrap();
        let scratch = Arc::new(
            parts
                .mem
                .guest_memory(&[(Gpa(0), scratch_hpa, SCRATCH)])
                .unwrap(),
        );
        let fds = Iommufds::new();
        let (fd, file) = fds.open_smmu(&parts.host);
        let iommufd =
            SmmuIommufd::open(file, fd, UserBuffer::new(scratch.clone()).unwrap()).unwrap();
        iommufd.map(vaddr, RAM, 0).unwrap();
        let cdev = Arc::new(VfioDeviceFile::open(host_sid, fds.clone()));
        let lookup = |n: i32| {
            fds.veventq(n)
                .map(|f| f as Arc<dyn UapiFile>)
                .or_else(|| fds.fault(n).map(|f| f as Arc<dyn UapiFile>))
        };
        let device = iommufd.attach_device(cdev.clone(), GSID, &lookup).unwrap();
        VmIommufd {
            fds,
            fd,
            iommufd,
            device,
            cdev,
            scratch_hpa,
            scratch,
        }
    }

    /// Groups the host's fault queue holds: read and unanswered, and not read yet.
    fn pending(&self) -> (usize, usize) {
        let fd = self.iommufd.fault_fd().unwrap();
        self.fds.fault(fd).unwrap().pending()
    }

    /// Closes every object and file (the device detached from the vSMMU already).
    fn close(self, parts: &HostParts) {
        let queues = [self.iommufd.veventq_fd(), self.iommufd.fault_fd()];
        drop(self.device);
        drop(self.iommufd);
        for fd in queues.into_iter().flatten() {
            self.fds.close(fd);
        }
        self.fds.close(self.fd);
        drop(self.cdev);
        parts.mem.release_guest_memory(&self.scratch);
        parts.host_frames.free(self.scratch_hpa).unwrap();
    }
}

/// The host (memory, SMMUv3 model, its driver), one VM (RAM, container or iommufd,
/// device, vSMMU) and the guest's SMMU driver.
struct Stack {
    parts: HostParts,
    mem: Arc<HostMemory>,
    host_frames: Arc<FrameAllocator>,
    hw: Arc<Smmu>,
    host: Arc<SmmuHost>,
    hpa: Hpa,
    ram: Arc<GuestMemoryMmap>,
    file: Option<Arc<ContainerFile<SmmuDomain>>>,
    ifd: Option<VmIommufd>,
    dev: Arc<DmaEngine>,
    vsmmu: Arc<VSmmu>,
    guest: Option<Arc<SmmuSva<Mmio>>>,
    frames: Arc<GuestFrames>,
}

impl Stack {
    fn new() -> Stack {
        Stack::build(false)
    }

    /// With `stall`, SMMUs that can stall (IDR0.STALL_MODEL 0b00, host and vSMMU) and a
    /// device that stalls its faults instead of using ATS and PRI, declared so to the
    /// host, the vSMMU and the guest.
    fn build(stall: bool) -> Stack {
        Stack::over(Uapi::Type1, stall, VSmmuConfig::default())
    }

    /// [`Stack::build`] over `uapi`, its vSMMU offering `config`'s features (and stalls
    /// with `stall`).
    fn over(uapi: Uapi, stall: bool, config: VSmmuConfig) -> Stack {
        let stall_model = if stall {
            StallModel::StallAndTerminate
        } else {
            StallModel::Terminate
        };
        Stack::on_with(&HostParts::new(stall_model), GSID, stall, uapi, config)
    }

    /// A VM on `parts` whose device is the host's StreamID `host_rid` (StreamID
    /// [`GSID`] in the guest whatever it is on the host).
    fn on(parts: &HostParts, host_rid: u32, stall: bool) -> Stack {
        Stack::on_with(parts, host_rid, stall, Uapi::Type1, VSmmuConfig::default())
    }

    fn on_with(
        parts: &HostParts,
        host_rid: u32,
        stall: bool,
        uapi: Uapi,
        mut config: VSmmuConfig,
    ) -> Stack {
        let stall_model = parts.hw.features().stall_model;
        let HostParts {
            mem,
            host_frames,
            hw,
            host,
        } = parts.clone();
        host.set_stall_capable(host_rid, stall);
        let hpa = host_frames.alloc_range(RAM, 2 << 20).unwrap();
        let ram = Arc::new(mem.guest_memory(&[(Gpa(0), hpa, RAM)]).unwrap());
        let host_sid = SourceId::from_rid(host_rid as u16);
        let dev = Arc::new(DmaEngine::new(DmaEngineConfig::new(host_sid), hw.clone()).unwrap());
        hw.attach_endpoint(host_rid, dev.clone());
        let ctrl = if stall {
            CTRL_PASID_EN
        } else {
            CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN
        };
        dev.enable(ctrl).unwrap();
        config.features.stall_model = stall_model;
        let vsmmu = VSmmu::new(ram.clone(), config).unwrap();
        let vaddr = ram.get_host_address(GuestAddress(0)).unwrap() as u64;
        let (file, ifd) = match uapi {
            Uapi::Type1 => {
                // The VMM: a container with the device and all guest RAM mapped.
                let allocator = Arc::new(Mutex::new(PasidAllocator::new()));
                let mut c = Container::new(allocator, 16, SmmuDomain::new(&host).unwrap()).unwrap();
                c.set_iommu(IommuModel::Type1Nesting).unwrap();
                c.attach_device(host_sid).unwrap();
                let file = Arc::new(ContainerFile::new(c));
                VfioIoctls::map_dma(
                    &mut &*file,
                    &DmaMap {
                        iova: Iova(0),
                        vaddr,
                        size: RAM,
                        read: true,
                        write: true,
                    },
                )
                .unwrap();
                vsmmu
                    .attach_passthrough(GSID, host_sid, file.clone())
                    .unwrap();
                (Some(file), None)
            }
            Uapi::Iommufd => {
                let ifd = VmIommufd::open(parts, host_sid, vaddr);
                vsmmu
                    .attach_iommufd(GSID, host_sid, ifd.device.clone())
                    .unwrap();
                (None, Some(ifd))
            }
        };
        if stall {
            vsmmu.set_stall_capable(GSID, true).unwrap();
        }
        // The guest kernel: frames from 16 MiB, its SMMU driver.
        let frames = Arc::new(GuestFrames::new(ram.clone(), Gpa(16 << 20), 48 << 20).unwrap());
        let guest = SmmuSva::new(Mmio(vsmmu.clone()), ram.clone(), frames.clone()).unwrap();
        guest.set_stall_capable(GSID, stall);
        Stack {
            parts: parts.clone(),
            mem,
            host_frames,
            hw,
            host,
            hpa,
            ram,
            file,
            ifd,
            dev,
            vsmmu,
            guest: Some(guest),
            frames,
        }
    }

    fn guest(&self) -> &Arc<SmmuSva<Mmio>> {
        self.guest.as_ref().unwrap()
    }

    fn file(&self) -> &Arc<ContainerFile<SmmuDomain>> {
        self.file.as_ref().unwrap()
    }

    /// The VMM's fault handling: the host driver's queue handlers run, and what the
    /// container's fault queue holds (over iommufd: the fault queue's page requests and
    /// the vEVENT queue's events) is injected into the vSMMU; how many records.
    fn pump(&self) -> usize {
        self.host.handle_queues();
        if let Some(ifd) = &self.ifd {
            let reqs = ifd.iommufd.read_page_requests().unwrap();
            for (sid, req) in &reqs {
                self.vsmmu.inject_page_request(*sid, req).unwrap();
            }
            let events = ifd.iommufd.read_events().unwrap();
            for e in &events {
                match *e {
                    Vevent::Event(record) => {
                        self.vsmmu.inject_vevent(record).unwrap();
                    }
                    Vevent::Lost => {
                        self.vsmmu.inject_vevents_lost();
                    }
                }
            }
            return reqs.len() + events.len();
        }
        let faults = self.file().read_faults().unwrap();
        for f in &faults {
            match f {
                QueuedFault::PageRequest(e) => {
                    self.vsmmu.inject_page_request(e.sid, &e.request).unwrap();
                }
                QueuedFault::Unrecoverable(e) => {
                    self.vsmmu.inject_host_fault(e.sid, &e.fault).unwrap();
                }
            }
        }
        faults.len()
    }

    /// Whether the host holds no page request group of the VM: none unanswered in the
    /// container, or none read or unread on the fault queue.
    fn no_host_groups(&self) -> bool {
        match &self.ifd {
            Some(ifd) => ifd.pending() == (0, 0),
            None => self.file().lock().pending_page_requests().is_empty(),
        }
    }

    /// A memmove by the device with SubstreamID `ssid`, its completion record at `comp`
    /// in `p`; returns the record's status.
    fn memmove(
        &self,
        p: &Process,
        ssid: u32,
        src: u64,
        dst: u64,
        len: u32,
        comp: u64,
    ) -> CompletionStatus {
        self.submit(p, ssid, src, dst, len, comp, false);
        self.status(p, comp)
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(&self, p: &Process, ssid: u32, src: u64, dst: u64, len: u32, comp: u64, block: bool) {
        p.write(Gva(comp), &[0; 32]).unwrap();
        let d = Descriptor {
            pasid: Some(Pasid::new(ssid).unwrap()),
            privileged: false,
            block_on_fault: block,
            completion: CompletionRequest::Always(comp),
            op: Operation::Memmove {
                src,
                dst,
                size: len,
            },
        };
        self.dev.portal_write(0, &d.encode()).unwrap();
        self.dev.process();
    }

    fn status(&self, p: &Process, comp: u64) -> CompletionStatus {
        let mut rec = [0; 32];
        p.read(Gva(comp), &mut rec).unwrap();
        CompletionRecord::from_bytes(&rec).map_or(CompletionStatus::None, |r| r.status)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(g) = self.guest.take() {
            g.shutdown().unwrap();
        }
        let _ = self.vsmmu.detach_passthrough(GSID);
        self.file = None;
        if let Some(ifd) = self.ifd.take() {
            ifd.close(&self.parts);
        }
        self.mem.release_guest_memory(&self.ram);
        self.host_frames.free(self.hpa).unwrap();
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

#[test]
fn an_arm64_process_bound_through_the_vsmmu_moves_bytes_at_its_virtual_addresses() {
    let s = Stack::new();
    // The guest attaches the device: its STE becomes the host's nested configuration.
    s.guest().attach_device(GSID).unwrap();
    let HostConfig::Translate(table) = s.vsmmu.host_config(GSID).unwrap() else {
        panic!("the guest's CD table is not attached");
    };
    assert_eq!(
        s.file().lock().backend().pasid_table(),
        Some(table),
        "the container holds the guest's table"
    );
    let p = Arc::new(Process::new_aarch64(s.ram.clone(), s.frames.clone()).unwrap());
    let src = p.mmap(3 * PAGE, Prot::READ_WRITE).unwrap().0;
    let dst = p.mmap(3 * PAGE, Prot::READ_WRITE).unwrap().0;
    let comp = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let data = pattern(2 * PAGE as usize + 300, 5);
    p.write(Gva(src + 0x10), &data).unwrap();
    let ssid = s.guest().bind(GSID, &p).unwrap();
    assert_eq!(ssid, 1);
    assert_eq!(
        s.memmove(&p, ssid, src + 0x10, dst + 0x20, data.len() as u32, comp),
        CompletionStatus::Success
    );
    let mut back = vec![0; data.len()];
    p.read(Gva(dst + 0x20), &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(s.hw.take_stale(), [], "strict mode: no stale translation");
    // munmap of the second destination page: the guest's TLBI and ATC invalidation reach
    // the host before CMD_SYNC completes, so the device's next access to it faults, and
    // the fault comes back to the guest's event queue at that address.
    p.munmap(Gva(dst + PAGE), PAGE).unwrap();
    assert_eq!(s.vsmmu.take_host_errors(), []);
    let st = s.memmove(&p, ssid, src, dst, 2 * PAGE as u32, comp);
    assert_ne!(st, CompletionStatus::Success);
    assert_eq!(
        s.hw.take_stale(),
        [],
        "the unmapped page was not used from a cache"
    );
    assert_eq!(s.pump(), 1);
    let events = s.guest().read_events().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (e.event_type, e.sid, e.ssid, e.input_addr, e.rnw),
        (EventType::Translation, GSID, Some(ssid), dst + PAGE, false)
    );
    // A page the process has not touched yet: the device's page request goes to the
    // guest's PRI queue, its fault handler maps the page, CMD_PRI_RESP resumes the DMA.
    let lazy = p.mmap_lazy(2 * PAGE, Prot::READ_WRITE).unwrap().0;
    let small = pattern(100, 9);
    p.write(Gva(src), &small).unwrap();
    s.submit(&p, ssid, src, lazy + 8, 100, comp, true);
    assert_eq!(s.dev.waiting_for_page_response(), 1);
    // The model's SMMU records the translation fault of the device's first access as
    // well as its page request: both reach the guest.
    assert_eq!(s.pump(), 2);
    let events = s.guest().read_events().unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.event_type, e.input_addr))
            .collect::<Vec<_>>(),
        [(EventType::Translation, lazy)]
    );
    let stats = s.guest().handle_page_requests().unwrap();
    assert_eq!((stats.requests, stats.resolved, stats.succeeded), (1, 1, 1));
    s.dev.process();
    assert_eq!(s.status(&p, comp), CompletionStatus::Success);
    let mut back = vec![0; 100];
    p.read(Gva(lazy + 8), &mut back).unwrap();
    assert_eq!(back, small);
    // Unbind: the CD goes; the SubstreamID's requests now fail and report C_BAD_CD.
    s.guest().unbind(GSID, ssid).unwrap();
    assert_ne!(
        s.memmove(&p, ssid, src, dst, 64, comp),
        CompletionStatus::Success
    );
    s.pump();
    let events = s.guest().read_events().unwrap();
    assert!(
        events
            .iter()
            .all(|e| e.event_type == EventType::BadCd && e.ssid == Some(ssid)),
        "{events:?}"
    );
    assert_eq!(s.hw.take_stale(), []);
    assert_eq!(s.vsmmu.take_host_errors(), []);
}

#[test]
fn shutting_the_guest_and_the_vm_down_leaves_nothing_on_the_host() {
    let mut s = Stack::new();
    s.guest().attach_device(GSID).unwrap();
    let p = Arc::new(Process::new_aarch64(s.ram.clone(), s.frames.clone()).unwrap());
    let buf = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let comp = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let ssid = s.guest().bind(GSID, &p).unwrap();
    assert_eq!(
        s.memmove(&p, ssid, buf, buf + 64, 64, comp),
        CompletionStatus::Success
    );
    assert_eq!(s.host.vmids().len(), 1);
    let (tlb, _, cds) = s.hw.cached_entries();
    assert!(tlb > 0 && cds > 0);
    // The guest shuts its driver down (the device's STE aborts: an aborting attach), the
    // VMM detaches the device and closes the container.
    let guest_frames = s.frames.allocated_frames();
    s.guest.take().unwrap().shutdown().unwrap();
    assert_eq!(
        s.frames.allocated_frames(),
        guest_frames - vsva_guest::smmu::DMA_REGION / PAGE,
        "the driver's region is back"
    );
    assert_eq!(s.vsmmu.host_config(GSID).unwrap(), HostConfig::Abort);
    s.vsmmu.detach_passthrough(GSID).unwrap();
    assert_eq!(s.file().lock().backend().pasid_table(), None);
    s.file = None;
    let (tlb, _, cds) = s.hw.cached_entries();
    assert_eq!((tlb, cds), (0, 0));
    assert!(s.host.vmids().is_empty());
    assert!(s.host.owned_streams().is_empty());
    assert_eq!(s.hw.take_stale(), []);
    assert_eq!(s.vsmmu.take_host_errors(), []);
}

/// Waits (bounded) until `done` holds.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
    }
}

/// Starts a memmove by the device on a thread of its own (a stalled transaction holds the
/// device's thread); the thread returns how many descriptors completed.
fn submit_on_a_thread(
    s: &Stack,
    p: &Process,
    ssid: u32,
    src: u64,
    dst: u64,
    len: u32,
    comp: u64,
) -> std::thread::JoinHandle<usize> {
    p.write(Gva(comp), &[0; 32]).unwrap();
    let d = Descriptor {
        pasid: Some(Pasid::new(ssid).unwrap()),
        privileged: false,
        block_on_fault: false,
        completion: CompletionRequest::Always(comp),
        op: Operation::Memmove {
            src,
            dst,
            size: len,
        },
    };
    s.dev.portal_write(0, &d.encode()).unwrap();
    let dev = s.dev.clone();
    std::thread::spawn(move || dev.process())
}

/// A stalled DMA over `uapi` resumes after the guest maps the page; a CMD_RESUME of a
/// vSTAG the guest was not given changes nothing.
fn stalled_dma_resumes(uapi: Uapi) {
    let s = Stack::over(uapi, true, VSmmuConfig::default());
    s.guest().attach_device(GSID).unwrap();
    let p = Arc::new(Process::new_aarch64(s.ram.clone(), s.frames.clone()).unwrap());
    let src = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let comp = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let lazy = p.mmap_lazy(2 * PAGE, Prot::READ_WRITE).unwrap().0;
    let data = pattern(100, 3);
    p.write(Gva(src), &data).unwrap();
    let ssid = s.guest().bind(GSID, &p).unwrap();
    // The device writes to a page the process has not touched: the host SMMU stalls the
    // write and the VMM shows the stall to the guest under a vSTAG.
    let dma = submit_on_a_thread(&s, &p, ssid, src, lazy + 8, 100, comp);
    wait_until("the stall", || s.hw.stalled(Some(GSID)) == 1);
    assert_eq!(s.pump(), 1);
    assert_eq!(s.vsmmu.stalled(Some(GSID)), 1);
    assert_eq!(s.vsmmu.stats().stalls, 1);
    // A CMD_RESUME naming a STAG the guest was not given, or another StreamID, changes
    // nothing: no host call, the transaction stays stalled.
    let calls = s.vsmmu.stats().host_calls;
    let vstag = {
        let events = s.guest().read_events().unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        let e = events[0];
        assert!(e.stall);
        assert_eq!(
            (e.event_type, e.sid, e.ssid, e.input_addr, e.rnw),
            (EventType::Translation, GSID, Some(ssid), lazy, false)
        );
        e.stag
    };
    for (sid, stag) in [(GSID, vstag.wrapping_add(1)), (GSID + 1, vstag)] {
        s.guest().resume(sid, stag, ResumeAction::Retry).unwrap();
    }
    assert_eq!(s.vsmmu.stats().host_calls, calls);
    assert_eq!(s.hw.stalled(Some(GSID)), 1);
    assert_eq!(s.vsmmu.stalled(Some(GSID)), 1);
    assert_eq!(s.vsmmu.take_host_errors(), []);
    // The guest maps the page and resumes the transaction with its vSTAG: CMD_RESUME
    // Retry becomes the host's CMD_RESUME of the host's STAG.
    assert!(p.handle_fault(Gva(lazy), true));
    s.guest().resume(GSID, vstag, ResumeAction::Retry).unwrap();
    assert_eq!(dma.join().unwrap(), 1);
    assert_eq!(s.status(&p, comp), CompletionStatus::Success);
    let mut back = vec![0; 100];
    p.read(Gva(lazy + 8), &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(s.vsmmu.stalled(None), 0);
    assert_eq!(s.hw.stalled(None), 0);
    assert!(s.no_host_groups());
    // Second page: the guest driver's own event handling maps it and resumes.
    let dma = submit_on_a_thread(&s, &p, ssid, src, lazy + PAGE, 100, comp);
    wait_until("the second stall", || s.hw.stalled(Some(GSID)) == 1);
    assert_eq!(s.pump(), 1);
    let (others, stats) = s.guest().handle_events().unwrap();
    assert_eq!(others, []);
    assert_eq!((stats.requests, stats.resolved, stats.succeeded), (1, 1, 1));
    assert_eq!(dma.join().unwrap(), 1);
    assert_eq!(s.status(&p, comp), CompletionStatus::Success);
    p.read(Gva(lazy + PAGE), &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(s.hw.take_stale(), []);
    assert_eq!(s.vsmmu.take_host_errors(), []);
}

#[test]
fn a_stalled_dma_resumes_after_the_guest_maps_the_page_and_its_bytes_land() {
    stalled_dma_resumes(Uapi::Type1);
}

#[test]
fn over_iommufd_a_stalled_dma_resumes_after_the_guest_maps_the_page_and_its_bytes_land() {
    stalled_dma_resumes(Uapi::Iommufd);
}

/// How a stall the guest does not answer ends.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// The VMM detaches the device from the vSMMU.
    Detach,
    /// The guest detaches the device (its STE aborts: the host configuration changes).
    GuestDetach,
}

/// A stall over `uapi` the guest never answers ends with Abort as `ending` says, and
/// nothing stays held on the host or in the vSMMU.
fn unanswered_stall_ends(uapi: Uapi, ending: Ending) {
    let s = Stack::over(uapi, true, VSmmuConfig::default());
    s.guest().attach_device(GSID).unwrap();
    let p = Arc::new(Process::new_aarch64(s.ram.clone(), s.frames.clone()).unwrap());
    let src = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let comp = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let lazy = p.mmap_lazy(PAGE, Prot::READ_WRITE).unwrap().0;
    let ssid = s.guest().bind(GSID, &p).unwrap();
    let dma = submit_on_a_thread(&s, &p, ssid, src, lazy, 64, comp);
    wait_until("the stall", || s.hw.stalled(Some(GSID)) == 1);
    assert_eq!(s.pump(), 1);
    assert_eq!(s.vsmmu.stalled(Some(GSID)), 1);
    // The guest ignores it; the device goes: the stall ends with an Abort and nothing
    // stays held on the host or in the vSMMU.
    match ending {
        Ending::Detach => s.vsmmu.detach_passthrough(GSID).unwrap(),
        Ending::GuestDetach => s.guest().detach_device(GSID).unwrap(),
    }
    dma.join().unwrap();
    assert_ne!(s.status(&p, comp), CompletionStatus::Success);
    assert_eq!(s.vsmmu.stalled(None), 0);
    assert_eq!(s.hw.stalled(None), 0);
    assert!(s.no_host_groups());
    assert_eq!(s.vsmmu.stats().stalls_aborted, 1);
    assert_eq!(s.vsmmu.take_host_errors(), []);
}

#[test]
fn a_stall_the_guest_never_answers_ends_with_the_device_and_holds_nothing() {
    unanswered_stall_ends(Uapi::Type1, Ending::Detach);
    unanswered_stall_ends(Uapi::Type1, Ending::GuestDetach);
}

#[test]
fn over_iommufd_a_stall_the_guest_never_answers_ends_with_the_device_and_holds_nothing() {
    unanswered_stall_ends(Uapi::Iommufd, Ending::Detach);
    unanswered_stall_ends(Uapi::Iommufd, Ending::GuestDetach);
}

/// The stage-1 leaf descriptor's address of `va` in `p`'s tables (4 KiB granule, four
/// levels from TTB0), read from guest RAM as the SMMU walks it.
fn leaf_address(s: &Stack, p: &Process, va: u64) -> u64 {
    let mut table = p.cr3().0;
    for level in 0..3 {
        let entry = table + ((va >> (39 - 9 * level)) & 0x1ff) * 8;
        let desc = s.ram.read_u64(entry).unwrap();
        assert_eq!(desc & 0b11, 0b11, "a table descriptor at level {level}");
        table = desc & 0x0000_ffff_ffff_f000;
    }
    table + ((va >> 12) & 0x1ff) * 8
}

/// The class of a stall over `uapi`: the device writes to `page` of a process that
/// `setup` prepared, the host stalls it, `meanwhile` runs before the VMM reads the stall,
/// and the guest's stall record must say `class` (found by the vSMMU from the guest's
/// stage 1: the host's page request does not say which fault it was) with the guest's
/// tables left as they were; the guest aborts it and nothing stays held.
fn stall_class(
    uapi: Uapi,
    config: VSmmuConfig,
    class: EventType,
    setup: impl FnOnce(&Stack, &Process) -> u64,
    meanwhile: impl FnOnce(&Stack, &Process, u64),
) {
    let s = Stack::over(uapi, true, config);
    s.guest().attach_device(GSID).unwrap();
    let p = Arc::new(Process::new_aarch64(s.ram.clone(), s.frames.clone()).unwrap());
    let src = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let comp = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let page = setup(&s, &p);
    let ssid = s.guest().bind(GSID, &p).unwrap();
    let dma = submit_on_a_thread(&s, &p, ssid, src, page + 8, 64, comp);
    wait_until("the stall", || s.hw.stalled(Some(GSID)) == 1);
    meanwhile(&s, &p, page);
    let before = s.ram_digest(&p, page);
    assert_eq!(s.pump(), 1);
    let events = s.guest().read_events().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert!(e.stall);
    assert_eq!(
        (e.event_type, e.sid, e.ssid, e.input_addr, e.rnw),
        (class, GSID, Some(ssid), page, false),
        "{uapi:?}"
    );
    assert_eq!(
        s.ram_digest(&p, page),
        before,
        "the vSMMU's walk changed no descriptor"
    );
    s.guest().resume(GSID, e.stag, ResumeAction::Abort).unwrap();
    dma.join().unwrap();
    assert_ne!(s.status(&p, comp), CompletionStatus::Success);
    assert_eq!((s.vsmmu.stalled(None), s.hw.stalled(None)), (0, 0));
    assert!(s.no_host_groups());
    assert_eq!(s.vsmmu.take_host_errors(), []);
}

impl Stack {
    /// The leaf descriptor of `page` in `p`'s tables (0 where it has none).
    fn ram_digest(&self, p: &Process, page: u64) -> u64 {
        match p.translate(Gva(page)) {
            Some(_) => self.ram.read_u64(leaf_address(self, p, page)).unwrap(),
            None => 0,
        }
    }
}

/// A page the process has not touched: no leaf, F_TRANSLATION.
fn untouched(_: &Stack, p: &Process) -> u64 {
    p.mmap_lazy(PAGE, Prot::READ_WRITE).unwrap().0
}

/// A read-only page the device writes to: F_PERMISSION.
fn read_only(_: &Stack, p: &Process) -> u64 {
    p.mmap(PAGE, Prot::READ).unwrap().0
}

/// A page whose leaf has AF = 0, on a vSMMU without hardware Access flag updates (so the
/// guest's CD clears HA): F_ACCESS.
fn not_accessed(s: &Stack, p: &Process) -> u64 {
    let page = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
    let leaf = leaf_address(s, p, page);
    let desc = s.ram.read_u64(leaf).unwrap();
    s.ram.write_u64(leaf, desc & !(1 << 10)).unwrap();
    page
}

fn no_httu() -> VSmmuConfig {
    let mut config = VSmmuConfig::default();
    config.features.httu = Httu::None;
    config
}

#[test]
fn a_stall_shows_the_class_of_its_fault_over_both_uapis() {
    let nothing = |_: &Stack, _: &Process, _: u64| {};
    for uapi in [Uapi::Type1, Uapi::Iommufd] {
        let config = VSmmuConfig::default();
        stall_class(uapi, config, EventType::Translation, untouched, nothing);
        stall_class(uapi, config, EventType::Permission, read_only, nothing);
        stall_class(uapi, no_httu(), EventType::Access, not_accessed, nothing);
    }
}

#[test]
fn the_vsmmus_walk_sets_no_access_flag_of_a_page_mapped_meanwhile() {
    // The page is mapped, with AF = 0, after the host stalled the write: the vSMMU's walk
    // finds a leaf its hardware Access flag update would set, and must neither set it nor
    // call it a fault of its own (the tables changed: F_TRANSLATION).
    let map_not_accessed = |s: &Stack, p: &Process, page: u64| {
        assert!(p.handle_fault(Gva(page), true));
        let leaf = leaf_address(s, p, page);
        let desc = s.ram.read_u64(leaf).unwrap();
        s.ram.write_u64(leaf, desc & !(1 << 10)).unwrap();
    };
    for uapi in [Uapi::Type1, Uapi::Iommufd] {
        let config = VSmmuConfig::default();
        assert_ne!(config.features.httu, Httu::None);
        stall_class(
            uapi,
            config,
            EventType::Translation,
            untouched,
            map_not_accessed,
        );
    }
}

/// Pages of the process each VM binds in [`two_vms_with_equal_asids_and_ssids_stay_apart`].
const PAGES: u64 = 4;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Two VMs on one host SMMU, each guest binding a process with the same SubstreamID
    /// and ASID at the same virtual addresses, each page holding bytes of its own VM.
    /// Whatever the VMs do (their devices read a page, a process unmaps a page and maps
    /// it again with new bytes, or only unmaps it): every host TLB entry is tagged by one
    /// of the two VMs' VMIDs (a guest ASID never stands alone), each device reads its own
    /// VM's bytes or faults where its process unmapped, no stale translation is ever
    /// used (strict mode), and one VM's invalidations remove none of the other's entries.
    #[test]
    fn two_vms_with_equal_asids_and_ssids_stay_apart(
        ops in proptest::collection::vec((0usize..2, 0u8..3, 0..PAGES), 1..20)
    ) {
        let parts = HostParts::new(StallModel::Terminate);
        let vms = [Stack::on(&parts, GSID, false), Stack::on(&parts, GSID + 1, false)];
        let vmid = vms.each_ref().map(|s| s.file().lock().backend().vmid());
        prop_assert_ne!(vmid[0], vmid[1]);
        let mut procs = Vec::new();
        let mut contents = [[0u8; PAGES as usize]; 2];
        let mut mapped = [[true; PAGES as usize]; 2];
        for (i, s) in vms.iter().enumerate() {
            s.guest().attach_device(GSID).unwrap();
            let p = Arc::new(Process::new_aarch64(s.ram.clone(), s.frames.clone()).unwrap());
            let buf = p.mmap(PAGES * PAGE, Prot::READ_WRITE).unwrap().0;
            let dst = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
            let comp = p.mmap(PAGE, Prot::READ_WRITE).unwrap().0;
            for (k, seed) in contents[i].iter_mut().enumerate() {
                *seed = (i * 16 + k) as u8;
                p.write(Gva(buf + k as u64 * PAGE), &pattern(64, *seed)).unwrap();
            }
            s.guest().bind(GSID, &p).unwrap();
            procs.push((p, buf, dst, comp));
        }
        let bonds = vms.each_ref().map(|s| s.guest().bonds(GSID));
        prop_assert_eq!(&bonds[0], &bonds[1], "the same SubstreamID and ASID");
        let ssid = bonds[0][0].0;
        prop_assert_eq!((procs[0].1, procs[0].2), (procs[1].1, procs[1].2));
        let mut next_seed = 0x80u8;
        for (i, op, k) in ops {
            let (s, (p, buf, dst, comp)) = (&vms[i], &procs[i]);
            let (page, k) = (buf + k * PAGE, k as usize);
            let other = parts.hw.tlb_entries_of(vmid[1 - i]);
            match op {
                0 => {
                    let st = s.memmove(p, ssid, page, *dst, 64, *comp);
                    if mapped[i][k] {
                        prop_assert_eq!(st, CompletionStatus::Success);
                        let mut back = vec![0; 64];
                        p.read(Gva(*dst), &mut back).unwrap();
                        prop_assert_eq!(back, pattern(64, contents[i][k]));
                    } else {
                        prop_assert_ne!(st, CompletionStatus::Success);
                        s.pump();
                        s.guest().read_events().unwrap();
                    }
                }
                _ => {
                    p.munmap(Gva(page), PAGE).unwrap();
                    mapped[i][k] = false;
                    prop_assert_eq!(
                        parts.hw.tlb_entries_of(vmid[1 - i]),
                        other,
                        "VM {}'s invalidations removed VM {}'s entries", i, 1 - i
                    );
                    if op == 1 {
                        p.mmap_fixed(Gva(page), PAGE, Prot::READ_WRITE, true).unwrap();
                        contents[i][k] = next_seed;
                        next_seed = next_seed.wrapping_add(1);
                        p.write(Gva(page), &pattern(64, contents[i][k])).unwrap();
                        mapped[i][k] = true;
                    }
                }
            }
            prop_assert_eq!(parts.hw.take_stale(), []);
            let (tlb, _, _) = parts.hw.cached_entries();
            prop_assert_eq!(
                tlb,
                parts.hw.tlb_entries_of(vmid[0]) + parts.hw.tlb_entries_of(vmid[1]),
                "a TLB entry outside the VMs' VMIDs"
            );
        }
        for s in &vms {
            prop_assert_eq!(s.vsmmu.take_host_errors(), []);
        }
    }
}
