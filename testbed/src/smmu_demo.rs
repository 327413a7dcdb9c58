//! The demo on an SMMUv3 host (`vsva demo --iommu smmuv3`): arm64 VMs whose guest
//! arm-smmu-v3 driver ([`SmmuSva`]) programs a virtual SMMUv3 ([`VSmmu`]) that hands the
//! guest's CD tables to each VM's VFIO container on the host SMMUv3 driver and the physical
//! SMMUv3 model (strict mode). Each process binds its AArch64 address space to its VM's DMA
//! engine and checks, at virtual addresses: a copy, a fill, a compare that must find the
//! byte the demo changed, a page request served by the guest's fault handler, and a DMA
//! after munmap that must fault at the unmapped address in the guest's event queue. With
//! two VMs or more, each VM's container must refuse a CD table outside the VM's memory and
//! a page response for another VM's device. The summary line is the VT-d demo's, named
//! `demo (smmuv3)`.
//!
//! [`run_vm`] is one such VM against a `vsva host --iommu smmuv3` process (`vsva vm
//! --iommu smmuv3`): the same guest, vSMMU and checks, its container a
//! [`HostLink`] over the socket, its RAM a shared memfd, its device the host's; the host's
//! interrupt thread queues the SMMU's faults and page requests for the VMM to read.
//! [`split_demo`](crate::remote::split_demo) runs the demo as such processes (`vsva demo --split --iommu smmuv3`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
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
use vsva_service::load::Held;
use vsva_service::{
    client::RemoteFile, client::SharedRam, protocol::FILE_IOMMUFD, server::IommuArch,
};
use vsva_smmuv3::{cmd::Cmd, event::EventType, regs::RegError};
use vsva_smmuv3_driver::Registers;
use vsva_uapi::{
    error::Errno, file::IommuModel, file::UapiFile, file::VfioIoctls, request::DmaMap,
    request::PageResponse, request::PageResponseCode, request::PasidConfig,
    request::PasidTableConfig, request::QueuedFault,
};
use vsva_vmm::{
    HostPasidTable, SmmuIommufd, SmmuIommufdDevice, UserBuffer, VSmmu, VSmmuConfig, VSmmuError,
    Vevent,
};
use vsva_vtd::{addr::Gpa, addr::Gva, addr::Hpa, addr::Iova, addr::Pasid, addr::SourceId};

use crate::demo::{DemoError, DemoIommu, DemoOptions, DemoSummary, VmReport};
use crate::remote::{load_loop, HostLink, Stage, VmError, VmOptions, CROSS_VM};
use crate::stack::{Passthrough, StackError, Uapi};

/// Guest RAM of each VM.
const RAM: u64 = 64 << 20;
/// Where the guest kernel's frames start.
const FRAMES_START: u64 = 16 << 20;
/// The passthrough device's StreamID in every guest.
const GSID: u32 = 0x18;
const PAGE: u64 = 4096;

/// The guest kernel's register accesses: MMIO to its VM's vSMMU.
pub struct VSmmuMmio(pub Arc<VSmmu>);

impl Registers for VSmmuMmio {
    fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        self.0.read(offset, size).map_err(reg_error)
    }
    fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
        self.0.write(offset, size, value).map_err(reg_error)
    }
}

/// A vSMMU refusal as the register error a guest sees: only register accesses are made.
fn reg_error(e: VSmmuError) -> RegError {
    match e {
        VSmmuError::Register(r) => r,
        _ => RegError::Unsupported("a vSMMU refusal other than a register access"),
    }
}

/// Bytes of the VMM buffer iommufd pointer arguments go through.
const SCRATCH: u64 = 16 << 10;

/// How the vSMMU reaches the host for the VM's device.
enum HostDev {
    /// The VM's VFIO type1 nesting container (`VFIO_IOMMU_ATTACH_PASID_TABLE`).
    Container(Arc<dyn HostPasidTable>),
    /// `/dev/iommu` with the device's cdev (nested HWPTs under a vIOMMU).
    Iommufd(VmIommufd),
}

/// A VM's iommufd as its VMM holds it: the vSMMU's view of it and of its device and, in
/// one process, the host side the VMM made.
struct VmIommufd {
    iommufd: Arc<SmmuIommufd>,
    device: Arc<SmmuIommufdDevice>,
    /// In one process: the fd table and `/dev/iommu`'s number in it, the device's cdev and
    /// the VMM buffer (host frames at `scratch_hpa`). Over `vsva host` the connection is
    /// `/dev/iommu`, and closing it releases what the host made.
    local: Option<LocalIommufd>,
}

/// The in-process side of a VM's iommufd (see [`VmIommufd`]).
struct LocalIommufd {
    fds: Arc<Iommufds>,
    fd: i32,
    cdev: Arc<VfioDeviceFile>,
    scratch: Arc<GuestMemoryMmap>,
    scratch_hpa: Hpa,
}

impl VmIommufd {
    /// `/dev/iommu` on the host SMMU with guest RAM (at VMM address `vaddr`) in an IOAS
    /// at IPA 0, the device's cdev bound, its vDEVICE with the guest's StreamID.
    fn open(
        mem: &Arc<HostMemory>,
        host_frames: &Arc<FrameAllocator>,
        host: &Arc<SmmuHost>,
        host_sid: SourceId,
        vaddr: u64,
    ) -> Result<VmIommufd, DemoError> {
        let scratch_hpa = host_frames
            .alloc_range(SCRATCH, PAGE)
            .map_err(|e| err("VMM buffer", e))?;
        let scratch = match mem.guest_memory(&[(Gpa(0), scratch_hpa, SCRATCH)]) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                let _ = host_frames.free(scratch_hpa);
                return Err(err("VMM buffer", e));
            }
        };
        let fds = Iommufds::new();
        let (fd, file) = fds.open_smmu(host);
        let cdev = Arc::new(VfioDeviceFile::open(host_sid, fds.clone()));
        let lookup = |n: i32| {
            fds.veventq(n)
                .map(|f| f as Arc<dyn UapiFile>)
                .or_else(|| fds.fault(n).map(|f| f as Arc<dyn UapiFile>))
        };
        let opened = UserBuffer::new(scratch.clone())
            .and_then(|buffer| SmmuIommufd::open(file, fd, buffer))
            .and_then(|iommufd| {
                iommufd.map(vaddr, RAM, 0)?;
                let device = iommufd.attach_device(cdev.clone(), GSID, &lookup)?;
                Ok((iommufd, device))
            });
        match opened {
            Ok((iommufd, device)) => Ok(VmIommufd {
                iommufd,
                device,
                local: Some(LocalIommufd {
                    fds,
                    fd,
                    cdev,
                    scratch,
                    scratch_hpa,
                }),
            }),
            Err(e) => {
                drop(cdev);
                fds.close(fd);
                mem.release_guest_memory(&scratch);
                let _ = host_frames.free(scratch_hpa);
                Err(err("iommufd", e))
            }
        }
    }

    /// The device's objects, the vIOMMU's and the IOAS, then (in one process) the files
    /// and the buffer.
    fn close(self, mem: &HostMemory, host_frames: &FrameAllocator) {
        let veventq = self.iommufd.veventq_fd();
        drop(self.device);
        drop(self.iommufd);
        let Some(local) = self.local else {
            return;
        };
        if let Some(q) = veventq {
            local.fds.close(q);
        }
        local.fds.close(local.fd);
        drop(local.cdev);
        mem.release_guest_memory(&local.scratch);
        let _ = host_frames.free(local.scratch_hpa);
    }
}

/// One arm64 VM: RAM, container, passthrough device, vSMMU and guest driver.
struct Vm {
    ram: Arc<GuestMemoryMmap>,
    host_sid: SourceId,
    file: Arc<dyn UapiFile>,
    dev: Arc<dyn Passthrough>,
    vsmmu: Arc<VSmmu>,
    guest: Arc<SmmuSva<VSmmuMmio>>,
    frames: Arc<GuestFrames>,
    /// The host SMMU in this process, whose queue handlers the VMM's fault pump runs; a
    /// host process's interrupt thread runs them there.
    host: Option<Arc<SmmuHost>>,
    /// Over iommufd, the VM's objects there (`file` is then `/dev/iommu`).
    ifd: Option<VmIommufd>,
}

/// The in-process host side of a VM: its RAM and its DMA engine.
struct Local {
    hpa: Hpa,
    dev: Arc<DmaEngine>,
}

fn err(what: &str, e: impl std::fmt::Display) -> DemoError {
    DemoError::Options(format!("smmuv3 demo: {what}: {e}"))
}

/// How long the fault pump waits for the host's interrupt thread to queue a fault the VMM
/// expects (generous: a loaded machine).
const FAULT_WAIT: Duration = Duration::from_secs(20);

impl Vm {
    /// The VMM and guest side of a VM whose container is `file` (`table`, the same file,
    /// as the vSMMU's host) and whose device `host_sid` is `dev`: the vSMMU with the
    /// device passed through, the guest kernel's frames and its arm-smmu-v3 driver.
    fn boot_guest(
        ram: Arc<GuestMemoryMmap>,
        host_sid: SourceId,
        table: HostDev,
        file: Arc<dyn UapiFile>,
        dev: Arc<dyn Passthrough>,
        host: Option<Arc<SmmuHost>>,
    ) -> Result<Vm, DemoError> {
        let vsmmu = VSmmu::new(ram.clone(), VSmmuConfig::default()).map_err(|e| err("vSMMU", e))?;
        let ifd = match table {
            HostDev::Container(table) => vsmmu
                .attach_passthrough(GSID, host_sid, table)
                .map(|()| None),
            HostDev::Iommufd(fd) => vsmmu
                .attach_iommufd(GSID, host_sid, fd.device.clone())
                .map(|()| Some(fd)),
        }
        .map_err(|e| err("vSMMU", e))?;
        let frames = Arc::new(
            GuestFrames::new(ram.clone(), Gpa(FRAMES_START), RAM - FRAMES_START)
                .map_err(|e| err("guest frames", e))?,
        );
        let guest = SmmuSva::new(VSmmuMmio(vsmmu.clone()), ram.clone(), frames.clone())
            .map_err(|e| err("guest SMMU driver", e))?;
        guest
            .attach_device(GSID)
            .map_err(|e| err("guest attach", e))?;
        Ok(Vm {
            ram,
            host_sid,
            file,
            dev,
            vsmmu,
            guest,
            frames,
            host,
            ifd,
        })
    }

    fn boot(
        i: usize,
        uapi: Uapi,
        mem: &Arc<HostMemory>,
        host_frames: &Arc<FrameAllocator>,
        hw: &Arc<Smmu>,
        host: &Arc<SmmuHost>,
    ) -> Result<(Vm, Local), DemoError> {
        let hpa = host_frames
            .alloc_range(RAM, 2 << 20)
            .map_err(|e| err("guest RAM", e))?;
        let ram = Arc::new(
            mem.guest_memory(&[(Gpa(0), hpa, RAM)])
                .map_err(|e| err("guest RAM", e))?,
        );
        let host_sid = SourceId::from_rid(0x100 + i as u16);
        let dev = Arc::new(
            DmaEngine::new(DmaEngineConfig::new(host_sid), hw.clone())
                .map_err(|e| err("DMA engine", e))?,
        );
        hw.attach_endpoint(host_sid.rid().into(), dev.clone());
        dev.enable(CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN)
            .map_err(|e| err("DMA engine", e))?;
        let vaddr = ram
            .get_host_address(GuestAddress(0))
            .map_err(|e| err("guest RAM", e))? as u64;
        let (table, file): (HostDev, Arc<dyn UapiFile>) = match uapi {
            Uapi::Type1 => {
                let file = Self::container(host, host_sid, vaddr)?;
                (HostDev::Container(file.clone()), file)
            }
            Uapi::Iommufd => {
                let fd = VmIommufd::open(mem, host_frames, host, host_sid, vaddr)?;
                let file = fd.iommufd.file();
                (HostDev::Iommufd(fd), file)
            }
        };
        let vm = Vm::boot_guest(ram, host_sid, table, file, dev.clone(), Some(host.clone()))?;
        Ok((vm, Local { hpa, dev }))
    }

    /// A type1 nesting container on a stage-2 domain with the device attached and guest
    /// RAM (at VMM address `vaddr`) mapped at IPA 0.
    fn container(
        host: &Arc<SmmuHost>,
        host_sid: SourceId,
        vaddr: u64,
    ) -> Result<Arc<ContainerFile<SmmuDomain>>, DemoError> {
        let allocator = Arc::new(Mutex::new(PasidAllocator::new()));
        let domain = SmmuDomain::new(host).map_err(|e| err("domain", e))?;
        let mut c = Container::new(allocator, 16, domain).map_err(|e| err("container", e))?;
        c.set_iommu(IommuModel::Type1Nesting)
            .map_err(|e| err("SET_IOMMU", e))?;
        c.attach_device(host_sid).map_err(|e| err("attach", e))?;
        let file = Arc::new(ContainerFile::new(c));
        let map = DmaMap {
            iova: Iova(0),
            vaddr,
            size: RAM,
            read: true,
            write: true,
        };
        VfioIoctls::map_dma(&mut &*file, &map).map_err(|e| err("MAP_DMA", e))?;
        Ok(file)
    }

    /// Shuts the guest driver down and detaches the device from the vSMMU; returns the
    /// container and the RAM, which the caller closes and gives back.
    fn shutdown_guest(self) -> (Result<(), String>, Arc<dyn UapiFile>, Arc<GuestMemoryMmap>) {
        let down = self
            .guest
            .shutdown()
            .map_err(|e| e.to_string())
            .and_then(|()| {
                self.vsmmu
                    .detach_passthrough(GSID)
                    .map_err(|e| e.to_string())
            });
        (down, self.file, self.ram)
    }

    /// Shuts the guest driver down, detaches the device from the vSMMU and the SMMU,
    /// closes the container and gives the RAM back.
    fn shutdown(
        mut self,
        local: Local,
        mem: &HostMemory,
        host_frames: &FrameAllocator,
        hw: &Smmu,
    ) -> Result<(), String> {
        let host_sid = self.host_sid;
        let ifd = self.ifd.take();
        let (down, file, ram) = self.shutdown_guest();
        drop(file);
        if let Some(fd) = ifd {
            fd.close(mem, host_frames);
        }
        hw.detach_endpoint(host_sid.rid().into());
        drop(local.dev);
        mem.release_guest_memory(&ram);
        let _ = host_frames.free(local.hpa);
        down
    }

    /// The VMM's fault handling: the host's queue handlers (in this process), then the
    /// container's fault queue (over iommufd: the fault queue's page requests and the
    /// vEVENT queue's events) injected into the vSMMU.
    fn pump(&self) {
        if let Some(host) = &self.host {
            host.handle_queues();
        }
        if let Some(fd) = &self.ifd {
            for (sid, req) in fd.iommufd.read_page_requests().unwrap_or_default() {
                let _ = self.vsmmu.inject_page_request(sid, &req);
            }
            for e in fd.iommufd.read_events().unwrap_or_default() {
                match e {
                    Vevent::Event(record) => {
                        let _ = self.vsmmu.inject_vevent(record);
                    }
                    Vevent::Lost => {
                        self.vsmmu.inject_vevents_lost();
                    }
                }
            }
            return;
        }
        for f in self.file.read_faults().unwrap_or_default() {
            let _ = match f {
                QueuedFault::PageRequest(e) => self
                    .vsmmu
                    .inject_page_request(e.sid, &e.request)
                    .map(|_| ()),
                QueuedFault::Unrecoverable(e) => {
                    self.vsmmu.inject_host_fault(e.sid, &e.fault).map(|_| ())
                }
            };
        }
    }

    /// Pumps faults until `seen`, which looks at what reached the guest, finds what it
    /// waits for (a host process's interrupt thread queues the SMMU's records on its own
    /// time); `None` when it did not within [`FAULT_WAIT`].
    fn await_faults<T>(
        &self,
        mut seen: impl FnMut() -> Result<Option<T>, String>,
    ) -> Result<Option<T>, String> {
        let deadline = Instant::now() + FAULT_WAIT;
        loop {
            self.pump();
            if let Some(t) = seen()? {
                return Ok(Some(t));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs `op` on the device with SubstreamID `ssid`; returns the completion record.
    fn dma(
        &self,
        p: &Process,
        ssid: u32,
        op: Operation,
        comp: u64,
        block: bool,
    ) -> Option<CompletionRecord> {
        p.write(Gva(comp), &[0; 32]).ok()?;
        let d = Descriptor {
            pasid: Pasid::new(ssid).ok(),
            privileged: false,
            block_on_fault: block,
            completion: CompletionRequest::Always(comp),
            op,
        };
        self.dev.portal_write(0, &d.encode()).ok()?;
        self.dev.process().ok()?;
        self.record(p, comp)
    }

    fn record(&self, p: &Process, comp: u64) -> Option<CompletionRecord> {
        let mut rec = [0; 32];
        p.read(Gva(comp), &mut rec).ok()?;
        CompletionRecord::from_bytes(&rec)
    }

    /// A page request: the device copies [`PRQ_BYTES`] of `src` to the page at `lazy`,
    /// which `p` has not touched, waiting on the page request the guest's fault handler
    /// serves; then the copy completes and its bytes are `data`'s first ones.
    fn page_request_check(
        &self,
        p: &Process,
        ssid: u32,
        src: u64,
        lazy: u64,
        comp: u64,
        data: &[u8],
    ) -> Result<(), String> {
        let op = Operation::Memmove {
            src,
            dst: lazy,
            size: PRQ_BYTES,
        };
        self.dma(p, ssid, op, comp, true);
        let served = self.await_faults(|| {
            self.guest.read_events().map_err(|e| e.to_string())?;
            let served = self
                .guest
                .handle_page_requests()
                .map_err(|e| e.to_string())?;
            Ok((served.requests > 0).then_some(served))
        })?;
        let Some(served) = served else {
            return Err("page request: none reached the guest".into());
        };
        self.dev.process().map_err(|e| e.to_string())?;
        let mut got = vec![0; PRQ_BYTES as usize];
        p.read(Gva(lazy), &mut got).map_err(|e| e.to_string())?;
        if served.succeeded != 1
            || !succeeded(self.record(p, comp))
            || data.get(..got.len()) != Some(&got[..])
        {
            return Err(format!("page request: {served:?}"));
        }
        Ok(())
    }

    /// Unmaps the page of `p` at `gone`, then `op` (which reaches it) must fail and an
    /// F_TRANSLATION at `gone` reach the guest's event queue.
    fn munmap_check(
        &self,
        p: &Process,
        ssid: u32,
        gone: u64,
        op: Operation,
        comp: u64,
    ) -> Result<(), String> {
        p.munmap(Gva(gone), PAGE).map_err(|e| e.to_string())?;
        if succeeded(self.dma(p, ssid, op, comp, false)) {
            return Err("DMA after munmap completed".into());
        }
        let mut events = Vec::new();
        let found = self.await_faults(|| {
            events.extend(self.guest.read_events().map_err(|e| e.to_string())?);
            Ok(events
                .iter()
                .any(|e| {
                    e.event_type == EventType::Translation
                        && e.ssid == Some(ssid)
                        && e.input_addr == gone
                })
                .then_some(()))
        })?;
        if found.is_none() {
            return Err(format!(
                "no F_TRANSLATION at {gone:#x} after munmap: {events:?}"
            ));
        }
        Ok(())
    }
}

/// Whether a completion record came back and says Success.
fn succeeded(r: Option<CompletionRecord>) -> bool {
    r.is_some_and(|r| r.status == CompletionStatus::Success)
}

/// Bytes of the untouched page a page request check copies to.
const PRQ_BYTES: u32 = 256;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(2654435761).wrapping_add(seed) as u8)
        .collect()
}

/// One process's checks. The process is pushed to `keep` once it is bound: it stays bound
/// until its VM shuts down (the guest driver's shutdown unbinds it).
fn process_checks(
    vm: &Vm,
    seed: u64,
    bytes: u64,
    report: &mut VmReport,
    keep: &mut Vec<Arc<Process>>,
) -> Result<(), String> {
    let p = Arc::new(
        Process::new_aarch64(vm.ram.clone(), vm.frames.clone()).map_err(|e| e.to_string())?,
    );
    let len = bytes.div_ceil(PAGE).max(1) * PAGE;
    let src = p.mmap(len, Prot::READ_WRITE).map_err(|e| e.to_string())?.0;
    let dst = p.mmap(len, Prot::READ_WRITE).map_err(|e| e.to_string())?.0;
    let comp = p.mmap(PAGE, Prot::READ_WRITE).map_err(|e| e.to_string())?.0;
    let data = pattern(len as usize, seed);
    p.write(Gva(src), &data).map_err(|e| e.to_string())?;
    let ssid = vm.guest.bind(GSID, &p).map_err(|e| e.to_string())?;
    report.pasids.push(ssid);
    keep.push(p.clone());
    let size = len as u32;
    // Copy.
    if !succeeded(vm.dma(&p, ssid, Operation::Memmove { src, dst, size }, comp, false)) {
        return Err("copy did not complete".into());
    }
    let mut back = vec![0; len as usize];
    p.read(Gva(dst), &mut back).map_err(|e| e.to_string())?;
    if back != data {
        return Err("copy: destination differs".into());
    }
    report.bytes_verified += len;
    // Fill.
    let fill = 0x0102_0304_0506_0708u64 ^ seed;
    if !succeeded(vm.dma(
        &p,
        ssid,
        Operation::Fill {
            pattern: fill,
            dst,
            size,
        },
        comp,
        false,
    )) {
        return Err("fill did not complete".into());
    }
    p.read(Gva(dst), &mut back).map_err(|e| e.to_string())?;
    if back.chunks(8).any(|c| c != &fill.to_le_bytes()[..c.len()]) {
        return Err("fill: destination differs".into());
    }
    report.bytes_verified += len;
    // Compare: equal, then one byte changed.
    p.write(Gva(dst), &data).map_err(|e| e.to_string())?;
    let at = (seed % len) as usize;
    let cmp = Operation::Compare {
        src1: src,
        src2: dst,
        size,
    };
    match vm.dma(&p, ssid, cmp, comp, false) {
        Some(r) if r.status == CompletionStatus::Success && r.result == 0 => {}
        r => return Err(format!("compare of equal buffers: {r:?}")),
    }
    p.write(Gva(dst + at as u64), &[data[at] ^ 0xff])
        .map_err(|e| e.to_string())?;
    match vm.dma(&p, ssid, cmp, comp, false) {
        Some(r) if r.status == CompletionStatus::Success && r.result == 1 => {}
        r => return Err(format!("compare after a changed byte: {r:?}")),
    }
    report.bytes_verified += 2 * len;
    // A page request: a page the process has not touched (over iommufd, through the
    // vIOMMU's fault queue).
    let lazy = p
        .mmap_lazy(PAGE, Prot::READ_WRITE)
        .map_err(|e| e.to_string())?
        .0;
    vm.page_request_check(&p, ssid, src, lazy, comp, &data)?;
    report.page_requests_served += 1;
    report.bytes_verified += u64::from(PRQ_BYTES);
    // munmap: the next DMA faults at the unmapped address.
    vm.munmap_check(
        &p,
        ssid,
        dst + len - PAGE,
        Operation::Memmove { src, dst, size },
        comp,
    )?;
    report.munmap_faults += 1;
    Ok(())
}

/// The VM's vSMMU counts into `report`, and its line of the demo.
fn vm_stats(vm: &Vm, report: &mut VmReport, log: &mut dyn FnMut(String)) {
    let stats = vm.vsmmu.stats();
    report.invalidations_forwarded = stats.invalidations;
    report.binds = stats.table_attaches;
    report.host_errors = stats.host_errors;
    log(format!(
        "smmuv3 VM {}: {} processes bound, {} bytes verified, {} page requests served, {} munmap faults",
        report.vm,
        report.pasids.len(),
        report.bytes_verified,
        report.page_requests_served,
        report.munmap_faults
    ));
}

/// The VM's container must refuse a CD table beyond the VM's RAM (counted in `report`).
fn refuse_outside_table(vm: &Vm, report: &mut VmReport) {
    let outside = PasidTableConfig {
        base_ptr: Gpa(RAM),
        pasid_bits: 4,
        config: PasidConfig::Translate { s1fmt: 0, s1dss: 1 },
    };
    match VfioIoctls::attach_pasid_table(&mut &*vm.file, &outside) {
        Err(_) => report.cross_vm_refusals += 1,
        Ok(()) => report.errors.push(format!(
            "VM {}: a CD table beyond its RAM was attached",
            report.vm
        )),
    }
}

/// The VM's container must refuse a page response for the device `other` of another VM
/// (counted in `report`).
fn refuse_response_to(vm: &Vm, other: SourceId, report: &mut VmReport) {
    let resp = PageResponse {
        pasid: Pasid::new(1).ok(),
        grpid: 0,
        code: PageResponseCode::Success,
    };
    match VfioIoctls::page_response_to(&mut &*vm.file, other, &resp) {
        Err(_) => report.cross_vm_refusals += 1,
        Ok(()) => report.errors.push(format!(
            "VM {}: a page response reached another VM's device",
            report.vm
        )),
    }
}

/// The cross-VM checks of a VM's iommufd: a CD invalidation and an ATC invalidation
/// naming another VM's device (its StreamID `other` as the vSID) are refused by the
/// vIOMMU with nothing carried out (counted in `report`).
fn iommufd_cross_vm(fd: &VmIommufd, other: SourceId, report: &mut VmReport) {
    let sid = u32::from(other.rid());
    let cmds = [
        Cmd::CfgiCdAll { sid },
        Cmd::AtcInv {
            sid,
            ssid: None,
            global: true,
            addr: 0,
            size: 0,
        },
    ];
    for cmd in cmds {
        match fd.iommufd.invalidate(&[cmd.encode()]) {
            Err((0, _)) => report.cross_vm_refusals += 1,
            r => report.errors.push(format!(
                "VM {}: {cmd:?} naming another VM's device was not refused: {r:?}",
                report.vm
            )),
        }
    }
}

/// Runs the demo on an SMMUv3 host over `opts.uapi`.
pub fn run(opts: &DemoOptions, log: &mut dyn FnMut(String)) -> Result<DemoSummary, DemoError> {
    opts.validate()?;
    let start = Instant::now();
    let mem = HostMemory::new(opts.host_memory).map_err(|e| err("host memory", e))?;
    let host_frames = Arc::new(FrameAllocator::new(mem.clone()));
    let hw = Arc::new(Smmu::new(
        mem.clone(),
        SmmuConfig {
            strict: true,
            ..SmmuConfig::default()
        },
    ));
    let host = SmmuHost::new(hw.clone(), host_frames.clone()).map_err(|e| err("host SMMU", e))?;
    let baseline = host_frames.allocated_bytes();
    let (vms, locals): (Vec<Vm>, Vec<Local>) = (0..opts.vms)
        .map(|i| Vm::boot(i, opts.uapi, &mem, &host_frames, &hw, &host))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    let mut summary = DemoSummary {
        iommu: DemoIommu::Smmuv3,
        uapi: opts.uapi,
        vms: vms.len(),
        ..DemoSummary::default()
    };
    let mut processes = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        let mut report = VmReport {
            vm: i,
            ..VmReport::default()
        };
        for j in 0..opts.processes {
            let seed = opts.seed.wrapping_add((i * opts.processes + j) as u64);
            if let Err(e) = process_checks(vm, seed, opts.bytes, &mut report, &mut processes) {
                report.errors.push(format!("VM {i} process {j}: {e}"));
            }
        }
        vm_stats(vm, &mut report, log);
        summary.per_vm.push(report);
    }
    // Cross-VM: a CD table outside the VM's memory, a page response to another VM's device.
    if vms.len() >= 2 {
        summary.cross_vm_checked = true;
        for (i, vm) in vms.iter().enumerate() {
            let other = &vms[(i + 1) % vms.len()];
            let report = &mut summary.per_vm[i];
            if let Some(fd) = &vm.ifd {
                iommufd_cross_vm(fd, other.host_sid, report);
            } else {
                refuse_outside_table(vm, report);
                refuse_response_to(vm, other.host_sid, report);
            }
        }
    }
    summary.stale_translations = hw.take_stale().len();
    // The processes stay until their VMs are down: the guest drivers unbind them.
    let processes = processes;
    // Shutdown: guest drivers, vSMMUs, containers, RAM.
    for (i, (vm, local)) in vms.into_iter().zip(locals).enumerate() {
        if let Err(e) = vm.shutdown(local, &mem, &host_frames, &hw) {
            summary.per_vm[i]
                .errors
                .push(format!("VM {i} shutdown: {e}"));
            summary.failed_shutdowns += 1;
        }
    }
    drop(processes);
    let (tlb, _, cds) = hw.cached_entries();
    let left = host_frames.allocated_bytes().saturating_sub(baseline);
    // The host keeps the level-2 stream tables it made (one per StreamID group), as
    // Linux does for the SMMU's lifetime.
    let l2 = (64u64 << vsva_smmuv3_driver::STRTAB_SPLIT) * opts.vms.div_ceil(256).max(1) as u64;
    if tlb != 0 || cds != 0 || !host.vmids().is_empty() || left > l2 {
        summary.per_vm[0].errors.push(format!(
            "left after shutdown: {tlb} TLB entries, {cds} CDs, VMIDs {:?}, {left} bytes",
            host.vmids()
        ));
    }
    for r in &summary.per_vm {
        summary.pasids += r.pasids.len();
        summary.bytes_verified += r.bytes_verified;
        summary.page_requests_served += r.page_requests_served;
        summary.invalidations_forwarded += r.invalidations_forwarded;
        summary.host_errors += r.host_errors;
        summary.errors += r.error_count();
        for e in &r.errors {
            log(format!("error: {e}"));
        }
    }
    summary.errors += summary.stale_translations + summary.failed_shutdowns;
    summary.wall_seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// `vsva explain --iommu smmuv3`: the physical SMMU's walk of one transaction of VM `vm`'s
/// device (the VM's only one booted) with SubstreamID `ssid` (default: its first process's)
/// at `addr` (default: the first byte of that process's buffer): STE, CD, and each stage-1
/// step with the stage-2 walk of its table address, then the result or the fault.
pub fn explain(vm: usize, ssid: Option<u32>, addr: Option<u64>) -> Result<String, DemoError> {
    let mem =
        HostMemory::new(DemoOptions::default().host_memory).map_err(|e| err("host memory", e))?;
    let host_frames = Arc::new(FrameAllocator::new(mem.clone()));
    let hw = Arc::new(Smmu::new(mem.clone(), SmmuConfig::default()));
    let host = SmmuHost::new(hw.clone(), host_frames.clone()).map_err(|e| err("host SMMU", e))?;
    let (v, local) = Vm::boot(vm, Uapi::Type1, &mem, &host_frames, &hw, &host)?;
    let text = (|| {
        let p = Arc::new(
            Process::new_aarch64(v.ram.clone(), v.frames.clone()).map_err(|e| err("process", e))?,
        );
        let buf = p
            .mmap(4 * PAGE, Prot::READ_WRITE)
            .map_err(|e| err("mmap", e))?
            .0;
        p.write(Gva(buf), &pattern(4 * PAGE as usize, 1))
            .map_err(|e| err("process", e))?;
        let bound = v.guest.bind(GSID, &p).map_err(|e| err("bind", e))?;
        let e = hw.explain(
            v.host_sid.rid().into(),
            Some(ssid.unwrap_or(bound)),
            addr.unwrap_or(buf),
            vsva_smmuv3::walk::AccessRequest::READ,
        );
        Ok::<_, DemoError>(format!("{e}"))
    })();
    let down = v.shutdown(local, &mem, &host_frames, &hw);
    let text = text?;
    down.map_err(|e| err("shutdown", e))?;
    Ok(text)
}

/// `e`, or [`VmError::HostGone`] when the host went away (which is why it failed).
fn gone_or(link: &HostLink, e: String) -> VmError {
    if link.file.host_gone() {
        VmError::HostGone
    } else {
        VmError::Stack(StackError::Guest(e))
    }
}

/// Connects to the SMMUv3 host at `path` and boots an arm64 VM on it: a nesting
/// container, its memfd RAM mapped at IOVA 0, the host's device, the vSMMU with the
/// device passed through and the guest's arm-smmu-v3 driver. Returns the VM, its link
/// and its RAM.
fn connect_vm(
    path: &Path,
    pause_at: Option<Stage>,
) -> Result<(Vm, Arc<HostLink>, SharedRam), VmError> {
    let file = RemoteFile::connect(path)?;
    let ram = SharedRam::new(RAM)?;
    ram.nesting_container(&file)
        .map_err(|(what, errno)| VmError::Setup { what, errno })?;
    let host_sid = file.device_add().map_err(|errno| VmError::Setup {
        what: "DEVICE_ADD",
        errno,
    })?;
    let link = Arc::new(HostLink::new(
        file,
        IommuArch::Smmuv3,
        Uapi::Type1,
        pause_at,
    ));
    let vm = Vm::boot_guest(
        ram.mem.clone(),
        host_sid,
        HostDev::Container(link.clone()),
        link.clone(),
        link.clone(),
        None,
    )
    .map_err(|e| gone_or(&link, e.to_string()))?;
    Ok((vm, link, ram))
}

/// `vsva vm --iommu smmuv3`: the per-VM part of the SMMUv3 demo against the host process
/// at `path`: boots the VM (a nesting container, or with `opts.uapi` iommufd an iommufd
/// connection (`iommufd_vm`); its memfd RAM mapped at IOVA 0, the host's device, the
/// vSMMU and the arm64 guest), runs each process's checks as the in-process demo does
/// (copy, fill, compare, a page request, a fault after munmap), and shuts down. With `opts.cross_vm` (`vsva demo --split`), its
/// container must first refuse a CD table beyond its RAM; then it prints `cross-vm ready
/// <its StreamID>` and follows lines from stdin: `refuse <StreamID>`: a page response for
/// that (another VM's) device must be refused (over iommufd: a CFGI_CD_ALL and an ATC_INV
/// naming it, by the vIOMMU) (`cross-vm refused`), until `end` or the end of stdin. The
/// report's errors are the failed checks; a host that went away is
/// [`VmError::HostGone`].
pub fn run_vm(
    path: &Path,
    opts: &VmOptions,
    log: &mut dyn FnMut(String),
) -> Result<VmReport, VmError> {
    opts.demo
        .validate()
        .map_err(|e| VmError::Options(e.to_string()))?;
    let (vm, link, ram, buffer) = match opts.uapi {
        Uapi::Type1 => {
            let (vm, link, ram) = connect_vm(path, opts.pause_at)?;
            (vm, link, ram, None)
        }
        Uapi::Iommufd => {
            let ram = SharedRam::new(RAM)?;
            let (link, host_sid, fd, buffer) = iommufd_vm(path, &ram, opts.pause_at)?;
            let vm = Vm::boot_guest(
                ram.mem.clone(),
                host_sid,
                HostDev::Iommufd(fd),
                link.clone(),
                link.clone(),
                None,
            )
            .map_err(|e| gone_or(&link, e.to_string()))?;
            (vm, link, ram, Some(buffer))
        }
    };
    let mut report = VmReport {
        vm: opts.index,
        ..VmReport::default()
    };
    let mut processes = Vec::new();
    for j in 0..opts.demo.processes {
        let seed = opts.demo.seed.wrapping_add(j as u64);
        if let Err(e) = process_checks(&vm, seed, opts.demo.bytes, &mut report, &mut processes) {
            report
                .errors
                .push(format!("VM {} process {j}: {e}", opts.index));
        }
        if link.file.host_gone() {
            return Err(VmError::HostGone);
        }
    }
    if opts.cross_vm {
        if vm.ifd.is_none() {
            refuse_outside_table(&vm, &mut report);
        }
        cross_vm_phase(
            &vm,
            &mut std::io::stdin().lock(),
            &mut std::io::stdout(),
            &mut report,
        );
    }
    vm_stats(&vm, &mut report, log);
    if link.file.host_gone() {
        return Err(VmError::HostGone);
    }
    let (down, file, _ram) = vm.shutdown_guest();
    drop(processes);
    if let Err(e) = down {
        if link.file.host_gone() {
            return Err(VmError::HostGone);
        }
        report
            .errors
            .push(format!("VM {} shutdown: {e}", opts.index));
    }
    drop((file, link, ram, buffer));
    Ok(report)
}

/// The buffer a `vsva load --iommu smmuv3` VM's device fills at its start and the VM
/// checks at its end.
const KEEPER_LEN: u64 = 64 << 10;

/// A `vsva load` SMMU VM's keeper: a guest process bound to the device and a buffer the
/// device filled with one byte value.
struct Keeper {
    process: Arc<Process>,
    buf: u64,
    byte: u8,
}

impl Keeper {
    fn start(vm: &Vm, byte: u8) -> Result<Keeper, String> {
        let p = Arc::new(
            Process::new_aarch64(vm.ram.clone(), vm.frames.clone()).map_err(|e| e.to_string())?,
        );
        let buf = p
            .mmap(KEEPER_LEN, Prot::READ_WRITE)
            .map_err(|e| e.to_string())?
            .0;
        let comp = p.mmap(PAGE, Prot::READ_WRITE).map_err(|e| e.to_string())?.0;
        let ssid = vm.guest.bind(GSID, &p).map_err(|e| e.to_string())?;
        let fill = Operation::Fill {
            pattern: u64::from_ne_bytes([byte; 8]),
            dst: buf,
            size: KEEPER_LEN as u32,
        };
        match vm.dma(&p, ssid, fill, comp, false) {
            Some(r) if r.status == CompletionStatus::Success => {}
            r => return Err(format!("the keeper fill: {r:?}")),
        }
        let keeper = Keeper {
            process: p,
            buf,
            byte,
        };
        keeper.check()?;
        Ok(keeper)
    }

    /// The bytes checked, or an error if one changed.
    fn check(&self) -> Result<u64, String> {
        let mut got = vec![0u8; KEEPER_LEN as usize];
        self.process
            .read(Gva(self.buf), &mut got)
            .map_err(|e| e.to_string())?;
        if got.iter().any(|&b| b != self.byte) {
            return Err("the keeper buffer changed".into());
        }
        Ok(KEEPER_LEN)
    }
}

/// One cycle of a `vsva load --iommu smmuv3` VM: a new process maps two buffers of
/// `pages` pages and a page it has not touched, binds (a CD in the guest's table, which
/// the host's STE points at), has the device copy one buffer to the other and checks the
/// copy; copies into the untouched page with the device waiting on the page request
/// (PRI) the guest's fault handler serves; unmaps the destination's last page (the
/// guest's TLBI is forwarded as `VFIO_IOMMU_CACHE_INVALIDATE`) and checks that DMA to it
/// now faults (an F_TRANSLATION at that address reaches the guest's event queue); and
/// unbinds. Returns the bytes verified.
fn cycle(vm: &Vm, rng: &mut StdRng, pages: u64) -> Result<u64, String> {
    let p = Arc::new(
        Process::new_aarch64(vm.ram.clone(), vm.frames.clone()).map_err(|e| e.to_string())?,
    );
    let len = pages * PAGE;
    let src = p.mmap(len, Prot::READ_WRITE).map_err(|e| e.to_string())?.0;
    let dst = p.mmap(len, Prot::READ_WRITE).map_err(|e| e.to_string())?.0;
    let lazy = p
        .mmap_lazy(PAGE, Prot::READ_WRITE)
        .map_err(|e| e.to_string())?
        .0;
    let comp = p.mmap(PAGE, Prot::READ_WRITE).map_err(|e| e.to_string())?.0;
    let mut data = vec![0u8; len as usize];
    rng.fill_bytes(&mut data);
    p.write(Gva(src), &data).map_err(|e| e.to_string())?;
    let ssid = vm.guest.bind(GSID, &p).map_err(|e| e.to_string())?;
    let checked = (|| {
        let size = len as u32;
        if !succeeded(vm.dma(&p, ssid, Operation::Memmove { src, dst, size }, comp, false)) {
            return Err("copy did not complete".to_string());
        }
        let mut got = vec![0u8; len as usize];
        p.read(Gva(dst), &mut got).map_err(|e| e.to_string())?;
        if got != data {
            return Err("copy: destination differs".into());
        }
        // The page request round trip.
        vm.page_request_check(&p, ssid, src, lazy, comp, &data)?;
        // munmap: the invalidation is forwarded, and DMA there faults.
        let op = Operation::Memmove { src, dst, size };
        vm.munmap_check(&p, ssid, dst + len - PAGE, op, comp)?;
        Ok(len + u64::from(PRQ_BYTES))
    })();
    let unbound = vm.guest.unbind(GSID, ssid).map_err(|e| e.to_string());
    let verified = checked?;
    unbound?;
    Ok(verified)
}

/// `vsva load-worker --iommu smmuv3`: one VM process of `vsva load --iommu smmuv3`, the
/// arm64 VM of `vsva vm --iommu smmuv3` looping `cycle`. Boots (with a keeper buffer
/// its device fills), runs the VT-d worker's loop (`remote::load_loop`, with the link's
/// [`Timings`](crate::remote::Timings)) for `duration` with buffers of 1 to `max_pages` pages, and shuts down. Returns the exit
/// code: 0, or 1 when it could not start.
pub fn load_worker(socket: &Path, seed: u64, duration: Duration, max_pages: u64) -> i32 {
    let started = connect_vm(socket, None).and_then(|(vm, link, ram)| {
        let keeper = Keeper::start(&vm, (seed as u8) | 1).map_err(|e| gone_or(&link, e))?;
        Ok((vm, link, ram, keeper))
    });
    let (vm, link, ram, keeper) = match started {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vsva load worker: {e}");
            return 1;
        }
    };
    // Between cycles the VM holds no PASID on the host: the guest's CD table is attached
    // (VFIO_IOMMU_ATTACH_PASID_TABLE), which allocates none and binds none.
    load_loop(
        seed,
        duration,
        max_pages,
        &|| link.file.host_gone(),
        &mut |rng, pages| cycle(&vm, rng, pages),
        &|| keeper.check(),
        &|| link.take_timings(),
        Held::load_vm(RAM, 0),
    );
    let (down, file, _ram) = vm.shutdown_guest();
    drop(keeper);
    drop((file, link, ram));
    match down {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vsva load worker: shutting down: {e}");
            2
        }
    }
}

/// An SMMU VM's iommufd connection to the host at `path`, as the in-process VMM over
/// iommufd sets it up: `/dev/iommu` (`HELLO` file kind 2), guest RAM and the VMM's buffer
/// shared (`ADD_MEMORY`), the host's device plugged and bound (`DEVICE_ADD`), an IOAS
/// with guest RAM at IPA 0 (`IOMMU_IOAS_MAP`), then the device's nest parent, vIOMMU,
/// vEVENT and fault queues (their fds passed by the host) and vDEVICE
/// ([`SmmuIommufd::attach_bound`]).
/// A step that fails closes the connection, which releases what the host made.
fn iommufd_vm(
    path: &Path,
    ram: &SharedRam,
    pause_at: Option<Stage>,
) -> Result<(Arc<HostLink>, SourceId, VmIommufd, SharedRam), VmError> {
    let file = RemoteFile::connect_kind(path, FILE_IOMMUFD)?;
    let buffer = SharedRam::new(SCRATCH)?;
    let setup = |what, r: Result<(), Errno>| r.map_err(|errno| VmError::Setup { what, errno });
    setup("ADD_MEMORY (guest RAM)", ram.share(&file))?;
    setup("ADD_MEMORY (the VMM's buffer)", buffer.share(&file))?;
    let (host_sid, dev_id) = file.device_add_bound().map_err(|errno| VmError::Setup {
        what: "DEVICE_ADD",
        errno,
    })?;
    let link = Arc::new(HostLink::new(
        file,
        IommuArch::Smmuv3,
        Uapi::Iommufd,
        pause_at,
    ));
    let gone = |what, errno| {
        if link.file.host_gone() {
            VmError::HostGone
        } else {
            VmError::Setup { what, errno }
        }
    };
    let user = UserBuffer::new(buffer.mem.clone()).map_err(|e| gone("the VMM's buffer", e))?;
    let iommufd =
        SmmuIommufd::open(link.clone(), -1, user).map_err(|e| gone("IOMMU_IOAS_ALLOC", e))?;
    iommufd
        .map(ram.addr(), RAM, 0)
        .map_err(|e| gone("IOMMU_IOAS_MAP", e))?;
    let device = iommufd
        .attach_bound(link.clone(), dev_id, GSID, &|fd| link.queue_file(fd))
        .map_err(|e| {
            gone(
                "the nest parent, IOMMU_VIOMMU_ALLOC, IOMMU_VEVENTQ_ALLOC, IOMMU_VDEVICE_ALLOC",
                e,
            )
        })?;
    let fd = VmIommufd {
        iommufd,
        device,
        local: None,
    };
    Ok((link, host_sid, fd, buffer))
}

/// The SMMU VM's side of `vsva demo --split`'s cross-VM checks (see [`run_vm`]).
fn cross_vm_phase(
    vm: &Vm,
    input: &mut dyn std::io::BufRead,
    output: &mut dyn std::io::Write,
    report: &mut VmReport,
) {
    let mut say = |line: String| {
        let _ = writeln!(output, "{CROSS_VM}{line}");
        let _ = output.flush();
    };
    say(format!("ready {}", vm.host_sid.rid()));
    let mut line = String::new();
    loop {
        line.clear();
        if !matches!(input.read_line(&mut line), Ok(n) if n > 0) {
            break;
        }
        let (cmd, arg) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        match (cmd, arg.parse::<u16>()) {
            ("end", _) => break,
            ("refuse", Ok(sid)) if sid != vm.host_sid.rid() => {
                match &vm.ifd {
                    Some(fd) => iommufd_cross_vm(fd, SourceId::from_rid(sid), report),
                    None => refuse_response_to(vm, SourceId::from_rid(sid), report),
                }
                say("refused".into());
            }
            _ => {
                report
                    .errors
                    .push(format!("cross-VM command {:?} not understood", line.trim()));
                say(format!("error {:?}", line.trim()));
            }
        }
    }
}
