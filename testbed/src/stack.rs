//! The whole vsva stack, assembled as a VMM and a host would: one host (memory, physical
//! IOMMU, its driver, the PASID allocator) and VMs, each with guest RAM mapped through VFIO,
//! a vIOMMU shadowing to the VM's VFIO container, a passthrough DMA engine, and a guest OS
//! whose IOMMU driver programs the vIOMMU.
//!
//! A VM reaches the host through either uAPI ([`Uapi`]): the seed's VFIO type1 container, or
//! iommufd (`/dev/iommu` with the device's VFIO cdev: an IOAS of guest RAM, a nest-parent
//! HWPT, nested HWPTs at the guest's PASIDs). The vIOMMU is the same; only its host calls
//! differ.
//!
//! Every layer talks to the next through its public interface only: the guest through the
//! vIOMMU's registers and its own RAM, the vIOMMU through the uAPI's ioctls, the host
//! driver through the physical IOMMU's registers and host memory, the device through its
//! portal and the IOMMU's DMA port.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_guest::{
    frames::GuestFrames, iommu::DeviceConfig, iommu::IommuDriver, iommu::Mmio, process::Process,
};
use vsva_host::driver::{HostIommu, VtdDomain};
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::{
    container::Container, error::HostError, file::ContainerFile, pasid::PasidAllocator,
};
use vsva_hw::dma::descriptor::DESCRIPTOR_SIZE;
use vsva_hw::dma::regs::{
    CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN, REG_SWERR0, REG_SWERR1, SWERR_OVERFLOW, SWERR_VALID,
};
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, Descriptor, DmaEngine, DmaEngineConfig, DmaPort,
    Operation, SoftwareError,
};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory};
use vsva_uapi::request::DmaMap;
use vsva_uapi::{
    error::Errno, file::IommuModel, file::UapiFile, file::VfioIoctls, request::QueuedFault,
};
use vsva_vmm::{
    GuestPasids, HostSva, Iommufd, IommufdDevice, PasidSource, UserBuffer, VIommu, VIommuConfig,
};
use vsva_vtd::{
    addr::Gpa, addr::Gva, addr::Hpa, addr::Iova, addr::Pasid, addr::SourceId, flpte::FlPagingMode,
};

/// Guest RAM starts at GPA 0; the guest's frame allocator starts above the first MiB.
const GUEST_FRAMES_START: u64 = 1 << 20;
/// The passthrough device's requester id as the guest sees it.
pub const GUEST_DEVICE_SID: SourceId = SourceId::from_rid(0x0018);

/// A failure while building or running the stack.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The sparse host memory could not be created.
    #[error("host memory: {0}")]
    HostMemory(#[from] vsva_hw::memory::HostMemoryError),
    /// The IOMMU model refused its configuration.
    #[error("IOMMU model: {0}")]
    Iommu(#[from] vsva_hw::iommu::IommuConfigError),
    /// The host VT-d driver failed.
    #[error("host driver: {0}")]
    Driver(#[from] vsva_host::driver::DriverError),
    /// A VFIO ioctl on a VM's container failed.
    #[error("VFIO: {0}")]
    Vfio(#[from] HostError),
    /// The vIOMMU refused an operation.
    #[error("vIOMMU: {0}")]
    VIommu(#[from] vsva_vmm::VIommuError),
    /// The guest (its IOMMU driver or a process) failed; the message says what.
    #[error("guest: {0}")]
    Guest(String),
    /// The passthrough DMA engine refused an operation.
    #[error("device: {0}")]
    Device(#[from] vsva_hw::dma::DmaError),
    /// The scale scenario could not run.
    #[error("scale scenario: {0}")]
    Scale(String),
    /// Host memory refused an access.
    #[error("host memory: {0}")]
    Memory(#[from] vsva_mem::MemError),
    /// Reading the container's fault queue failed.
    #[error("fault queue: {0}")]
    FaultQueue(Errno),
    /// A VFIO type1 container was asked of a VM over iommufd.
    #[error("the VM runs over iommufd: it has no VFIO type1 container")]
    NoContainer,
    /// An iommufd call of the VMM failed.
    #[error("iommufd: {0}")]
    Iommufd(Errno),
    /// Page requests were still outstanding after this many service rounds.
    #[error("page requests never resolved after {0} rounds")]
    Stuck(usize),
    /// A call to the host's passthrough device failed (over `vsva host`'s socket, the
    /// errno it answered; `ENOTCONN` once the host is gone).
    #[error("passthrough device: {0}")]
    DeviceCall(Errno),
}

/// The host: memory, the physical IOMMU and its driver, and the PASID space.
pub struct Host {
    /// Host physical memory (the memfd; HPA = offset).
    pub mem: Arc<HostMemory>,
    /// Host frames for the driver's tables and VMs' RAM.
    pub frames: Arc<FrameAllocator>,
    /// The physical IOMMU model.
    pub iommu: Arc<Iommu>,
    /// The host VT-d driver's unit (its tables, queue and interrupts).
    pub unit: Arc<HostIommu>,
    /// The host's PASID space, shared by every VM's container.
    pub pasids: Arc<Mutex<PasidAllocator>>,
}

impl Host {
    /// A host with `size` bytes of sparse memory and a strict-mode IOMMU when `strict`.
    pub fn new(size: u64, strict: bool) -> Result<Host, StackError> {
        let mem = HostMemory::new(size)?;
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let iommu = Iommu::new(
            mem.clone(),
            IommuConfig {
                strict,
                ..IommuConfig::default()
            },
        )?;
        let unit = HostIommu::new(iommu.clone(), frames.clone())?;
        Ok(Host {
            mem,
            frames,
            iommu,
            unit,
            pasids: Arc::new(Mutex::new(PasidAllocator::new())),
        })
    }
}

/// The vIOMMU's register page as the guest reaches it (an MMIO BAR trapped to the VMM).
struct VIommuMmio(Arc<VIommu>);

impl Mmio for VIommuMmio {
    fn read(&self, offset: u64, size: usize) -> u64 {
        // A faulting register read returns all ones, as a PCI read of nothing does.
        self.0.read(offset, size).unwrap_or(u64::MAX)
    }

    fn write(&self, offset: u64, size: usize, value: u64) {
        if let Err(e) = self.0.write(offset, size, value) {
            tracing::warn!("guest register write at {offset:#x} refused: {e}");
        }
    }
}

/// The passthrough device as its VMM reaches it: descriptors written to its portal (a BAR
/// region), and the model's moment to work through them. In one process it is the DMA
/// engine itself; across processes the host runs it on `DEVICE_WRITE`/`DEVICE_RUN`.
pub trait Passthrough: Send + Sync {
    /// Writes one descriptor at `offset` in the portal.
    fn portal_write(
        &self,
        offset: u64,
        descriptor: &[u8; DESCRIPTOR_SIZE],
    ) -> Result<(), StackError>;

    /// Lets the device work through what was submitted; returns how many descriptors wait
    /// for a page response.
    fn process(&self) -> Result<usize, StackError>;

    /// Reads the 64-bit register at `offset` of its register BAR.
    fn reg_read(&self, offset: u64) -> Result<u64, StackError>;

    /// Writes `value` to the 64-bit register at `offset` of its register BAR.
    fn reg_write(&self, offset: u64, value: u64) -> Result<(), StackError>;
}

impl Passthrough for DmaEngine {
    fn portal_write(
        &self,
        offset: u64,
        descriptor: &[u8; DESCRIPTOR_SIZE],
    ) -> Result<(), StackError> {
        Ok(DmaEngine::portal_write(self, offset, descriptor)?)
    }

    fn process(&self) -> Result<usize, StackError> {
        DmaEngine::process(self);
        Ok(self.waiting_for_page_response())
    }

    fn reg_read(&self, offset: u64) -> Result<u64, StackError> {
        Ok(self.mmio_read(offset)?)
    }

    fn reg_write(&self, offset: u64, value: u64) -> Result<(), StackError> {
        Ok(self.mmio_write(offset, value)?)
    }
}

/// A VM's VFIO container, shared by the VMM's vIOMMU and the VMM itself.
pub type VmContainer = Arc<ContainerFile<VtdDomain>>;

/// The uAPI a VM's VMM uses to reach the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Uapi {
    /// The seed's VFIO type1 nesting container (`VFIO_IOMMU_BIND`, `CACHE_INVALIDATE`).
    #[default]
    Type1,
    /// iommufd: nested HWPTs attached at PASIDs, `IOMMU_HWPT_INVALIDATE` arrays, the
    /// fault queue file.
    Iommufd,
}

/// Bytes of the VMM buffer iommufd pointer arguments go through.
const IOMMUFD_SCRATCH: u64 = 16 << 10;

/// A VM's iommufd, as its VMM holds it: the fd table, the fd number of `/dev/iommu`, the
/// vIOMMU's view of it ([`Iommufd`], [`IommufdDevice`]), the device's cdev and the VMM
/// buffer.
pub struct VmIommufd {
    /// The VMM process's fd table of iommufd files.
    pub fds: Arc<Iommufds>,
    /// The fd number of `/dev/iommu`.
    pub fd: i32,
    /// The VM's objects on it.
    pub iommufd: Arc<Iommufd>,
    /// The passthrough device on it.
    pub device: Arc<IommufdDevice>,
    cdev: Arc<VfioDeviceFile>,
    /// Last: the buffer goes when everything that could use it has gone.
    _release: ScratchRelease,
}

impl VmIommufd {
    /// The device's HWPTs are destroyed, its cdev closed (unbinding it), then the fault
    /// queue's fd and `/dev/iommu`'s (which destroys the IOAS and the fault queue).
    fn close(self) {
        let VmIommufd {
            fds,
            fd,
            iommufd,
            device,
            cdev,
            _release,
        } = self;
        drop(device);
        drop(cdev);
        let fault_fd = iommufd.fault_fd();
        drop(iommufd);
        fds.close(fault_fd);
        fds.close(fd);
    }
}

/// Releases the VMM buffer's window and frees its frames when dropped.
struct ScratchRelease {
    scratch: Arc<GuestMemoryMmap>,
    hpa: Hpa,
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
}

impl Drop for ScratchRelease {
    fn drop(&mut self) {
        self.mem.release_guest_memory(&self.scratch);
        if let Err(e) = self.frames.free(self.hpa) {
            tracing::warn!("VMM buffer at {}: {e}", self.hpa);
        }
    }
}

/// How an in-process VM reaches the host.
pub enum VmHost {
    /// Its VFIO container.
    Type1(VmContainer),
    /// Its iommufd.
    Iommufd(VmIommufd),
}

/// What a VMM process holds of its VM: guest RAM, the VM's container as an open uAPI
/// file, the passthrough device, the vIOMMU shadowing to the container, and the guest OS
/// booted on them. The same code runs over the in-process container ([`Vm`]) and over a
/// file `vsva host` serves in another process (`vsva vm`).
pub struct Vmm {
    /// The VM's index, from 0.
    pub index: usize,
    /// Guest RAM as the VMM maps it.
    pub mem: Arc<GuestMemoryMmap>,
    /// Guest RAM size in bytes.
    pub ram_size: u64,
    /// The VM's VFIO container (or, over iommufd, `/dev/iommu`), as an open file.
    pub file: Arc<dyn UapiFile>,
    /// Over iommufd, the VM's objects there: page requests come from its fault queue.
    pub iommufd: Option<Arc<Iommufd>>,
    /// The passthrough device (its portal is mapped into the guest).
    pub device: Arc<dyn Passthrough>,
    /// The passthrough device's requester id on the host.
    pub host_sid: SourceId,
    /// The VM's virtual VT-d.
    pub viommu: Arc<VIommu>,
    /// The guest OS's frame allocator over guest RAM.
    pub guest_frames: Arc<GuestFrames>,
    /// The guest's intel-iommu driver, programming the vIOMMU.
    pub driver: Arc<IommuDriver>,
}

impl Vmm {
    /// Boots the VM's VMM side: the vIOMMU over `file` (a nesting container holding all of
    /// guest RAM at IOVA 0, with the device `host_sid` attached), the device behind it as
    /// [`GUEST_DEVICE_SID`], and the guest's frame allocator and IOMMU driver.
    pub fn boot<F: UapiFile + 'static>(
        index: usize,
        mem: Arc<GuestMemoryMmap>,
        ram_size: u64,
        file: Arc<F>,
        device: Arc<dyn Passthrough>,
        host_sid: SourceId,
    ) -> Result<Vmm, StackError> {
        let shadow = Shadow {
            pasids: file.clone(),
            sva: file.clone(),
            iommufd: None,
        };
        Self::boot_on(index, mem, ram_size, file, shadow, device, host_sid)
    }

    /// Boots the VM's VMM side over iommufd: the vIOMMU shadows to `sva` (the device on
    /// the VM's iommufd `iommufd`, which also holds the VM's own PASID space); its `file`
    /// is `/dev/iommu`.
    pub fn boot_iommufd(
        index: usize,
        mem: Arc<GuestMemoryMmap>,
        ram_size: u64,
        iommufd: Arc<Iommufd>,
        sva: Arc<IommufdDevice>,
        device: Arc<dyn Passthrough>,
        host_sid: SourceId,
    ) -> Result<Vmm, StackError> {
        let file = iommufd.file();
        let shadow = Shadow {
            pasids: iommufd.pasids(),
            sva,
            iommufd: Some(iommufd),
        };
        Self::boot_on(index, mem, ram_size, file, shadow, device, host_sid)
    }

    fn boot_on(
        index: usize,
        mem: Arc<GuestMemoryMmap>,
        ram_size: u64,
        file: Arc<dyn UapiFile>,
        shadow: Shadow,
        device: Arc<dyn Passthrough>,
        host_sid: SourceId,
    ) -> Result<Vmm, StackError> {
        let viommu = VIommu::new(mem.clone(), VIommuConfig::default(), shadow.pasids)?;
        viommu.attach_passthrough(GUEST_DEVICE_SID, host_sid, shadow.sva)?;

        // The guest boots: its frame allocator and IOMMU driver.
        let guest_frames = Arc::new(
            GuestFrames::new(
                mem.clone(),
                Gpa(GUEST_FRAMES_START),
                ram_size - GUEST_FRAMES_START,
            )
            .map_err(|e| StackError::Guest(e.to_string()))?,
        );
        let driver = IommuDriver::init(Arc::new(VIommuMmio(viommu.clone())), guest_frames.clone())
            .map_err(|e| StackError::Guest(e.to_string()))?;
        driver
            .attach_device(DeviceConfig {
                sid: GUEST_DEVICE_SID,
                pasid_bits: 20,
                ats: true,
                pri: true,
                // The passthrough engine's ATS capability (every stack builds it with
                // `DmaEngineConfig::new`'s), as the guest reads it.
                ats_queue_depth: DmaEngineConfig::new(host_sid).ats_queue_depth,
            })
            .map_err(|e| StackError::Guest(e.to_string()))?;
        Ok(Vmm {
            index,
            mem,
            ram_size,
            file,
            iommufd: shadow.iommufd,
            device,
            host_sid,
            viommu,
            guest_frames,
            driver,
        })
    }

    /// A new guest process with its own page tables.
    pub fn spawn(&self, mode: FlPagingMode) -> Result<Arc<Process>, StackError> {
        Process::new(self.mem.clone(), self.guest_frames.clone(), mode)
            .map(Arc::new)
            .map_err(|e| StackError::Guest(e.to_string()))
    }

    /// Binds `process` to the passthrough device (Linux's `iommu_sva_bind_device`).
    pub fn bind(&self, process: &Arc<Process>) -> Result<Pasid, StackError> {
        self.driver
            .sva_bind(GUEST_DEVICE_SID, process)
            .map_err(|e| StackError::Guest(e.to_string()))
    }

    /// Submits `op` in `pasid` from `process` (a write to the device's portal), with its
    /// completion record at `record`, and runs the device until it completes: page
    /// requests go up from the IOMMU to the host driver, the VFIO fault queue, the vIOMMU
    /// and the guest, and the guest's responses come back down. Returns the completion
    /// record as the process reads it.
    pub fn run(
        &self,
        process: &Process,
        pasid: Pasid,
        op: Operation,
        record: Gva,
    ) -> Result<CompletionRecord, StackError> {
        process
            .write(record, &[0; 32])
            .map_err(|e| StackError::Guest(e.to_string()))?;
        let desc = Descriptor {
            pasid: Some(pasid),
            privileged: false,
            block_on_fault: true,
            completion: CompletionRequest::Always(record.0),
            op,
        };
        self.device.portal_write(0, &desc.encode())?;
        self.run_device()?;
        let mut raw = [0u8; 32];
        process
            .read(record, &mut raw)
            .map_err(|e| StackError::Guest(e.to_string()))?;
        CompletionRecord::from_bytes(&raw)
            .ok_or_else(|| StackError::Guest("unreadable completion record".into()))
    }

    /// Reads the device's software error register (SWERR0 and SWERR1) and clears it (its
    /// valid and overflow bits are write-1-to-clear), as a driver's error handler does:
    /// the first error the device could not report in a completion record since the
    /// register was last cleared, if any.
    pub fn take_software_error(&self) -> Result<Option<SoftwareError>, StackError> {
        let w0 = self.device.reg_read(REG_SWERR0)?;
        let held = w0 & (SWERR_VALID | SWERR_OVERFLOW);
        if held == 0 {
            return Ok(None);
        }
        let w1 = self.device.reg_read(REG_SWERR1)?;
        self.device.reg_write(REG_SWERR0, held)?;
        Ok(SoftwareError::from_regs(w0, w1))
    }

    /// Runs the device until it has nothing to do, serving its page requests.
    pub fn run_device(&self) -> Result<(), StackError> {
        const ROUNDS: usize = 10_000;
        for _ in 0..ROUNDS {
            if self.device.process()? == 0 {
                return Ok(());
            }
            self.serve_page_requests()?;
        }
        Err(StackError::Stuck(ROUNDS))
    }

    /// The VMM's fault handler and the guest's page request interrupt: the VMM reads the
    /// container's fault records as bytes (`read`), host-reported page requests go into the
    /// guest's queue and unrecoverable faults into its fault recording registers, and the
    /// guest handles the page requests. Returns how many the guest handled.
    pub fn serve_page_requests(&self) -> Result<usize, StackError> {
        if let Some(iommufd) = &self.iommufd {
            // Over iommufd, the fault queue file: whole groups, each group's cookie kept
            // for the guest's answer.
            let requests = iommufd
                .read_page_requests()
                .map_err(StackError::FaultQueue)?;
            for (sid, request) in &requests {
                self.viommu.inject_host_page_request(*sid, request)?;
            }
            return Ok(self.driver.handle_page_requests());
        }
        // Each record is injected as it is read; after a failed injection the rest of
        // what was read is dropped and the first error returned.
        let mut injected = Ok(());
        self.file
            .read_faults_each(&mut |record| {
                if injected.is_ok() {
                    injected = match record {
                        QueuedFault::PageRequest(f) => self
                            .viommu
                            .inject_host_page_request(f.sid, &f.request)
                            .map(drop),
                        QueuedFault::Unrecoverable(f) => {
                            self.viommu.inject_host_fault(f.sid, &f.fault).map(drop)
                        }
                    };
                }
            })
            .map_err(StackError::FaultQueue)?;
        injected?;
        Ok(self.driver.handle_page_requests())
    }

    /// Shuts the VMM side down: the guest and its vIOMMU go (unbinding what they
    /// shadowed); returns guest RAM and the container's file, which the caller closes.
    pub fn shutdown(self) -> Result<(Arc<GuestMemoryMmap>, Arc<dyn UapiFile>), StackError> {
        let Vmm {
            mem,
            file,
            viommu,
            guest_frames,
            driver,
            ..
        } = self;
        drop(driver);
        drop(guest_frames);
        viommu.detach_passthrough(GUEST_DEVICE_SID)?;
        drop(viommu);
        Ok((mem, file))
    }
}

/// What the vIOMMU of a VMM shadows to: where its PASIDs come from, the host calls, and
/// over iommufd the VM's objects there.
struct Shadow {
    pasids: Arc<dyn PasidSource>,
    sva: Arc<dyn HostSva>,
    iommufd: Option<Arc<Iommufd>>,
}

/// One VM of an in-process stack: its VMM side ([`Vmm`], which a `Vm` dereferences to)
/// and what the host side holds for it (its RAM's frames, its container or iommufd, its
/// device).
pub struct Vm {
    /// The VMM side: RAM, container file, device, vIOMMU and guest.
    pub vmm: Vmm,
    /// Where guest RAM starts in host memory.
    pub ram_hpa: Hpa,
    /// The VM's VFIO container or iommufd.
    pub host: VmHost,
    /// The passthrough DMA engine (its portal is mapped into the guest).
    pub engine: Arc<DmaEngine>,
    host_mem: Arc<HostMemory>,
    host_frames: Arc<FrameAllocator>,
    host_iommu: Arc<Iommu>,
}

impl Deref for Vm {
    type Target = Vmm;

    fn deref(&self) -> &Vmm {
        &self.vmm
    }
}

impl Vm {
    /// Boots VM `index` with `ram_size` bytes of RAM on `host`, with a PASID quota, over
    /// a VFIO type1 container.
    pub fn new(host: &Host, index: usize, ram_size: u64, quota: u32) -> Result<Vm, StackError> {
        Self::with_uapi(host, index, ram_size, quota, Uapi::Type1)
    }

    /// Boots VM `index` with `ram_size` bytes of RAM on `host` over `uapi`; `quota` bounds
    /// the PASIDs it holds (from the host's PASID space with type1, its own with iommufd).
    pub fn with_uapi(
        host: &Host,
        index: usize,
        ram_size: u64,
        quota: u32,
        uapi: Uapi,
    ) -> Result<Vm, StackError> {
        let ram_hpa = host.frames.alloc_range(ram_size, 2 << 20)?;
        let built = match uapi {
            Uapi::Type1 => Self::build(host, index, ram_hpa, ram_size, quota),
            Uapi::Iommufd => Self::build_iommufd(host, index, ram_hpa, ram_size, quota),
        };
        if built.is_err() {
            let _ = host.frames.free(ram_hpa);
        }
        built
    }

    /// The device's requester id on the host for VM `index`.
    fn host_sid(index: usize) -> SourceId {
        SourceId::new(1 + (index / 32) as u8, (index % 32) as u8, 0)
            .expect("device and function in range")
    }

    /// The VMM over iommufd: `/dev/iommu` with an IOAS of all guest RAM and a fault queue,
    /// the device's cdev bound with its RID on a nest-parent HWPT.
    fn build_iommufd(
        host: &Host,
        index: usize,
        ram_hpa: Hpa,
        ram_size: u64,
        quota: u32,
    ) -> Result<Vm, StackError> {
        let mem = Arc::new(host.mem.guest_memory(&[(Gpa(0), ram_hpa, ram_size)])?);
        let host_sid = Self::host_sid(index);
        let opened = Self::open_iommufd(host, host_sid, quota, &mem);
        let (vmm_fd, engine) = match opened {
            Ok(o) => o,
            Err(e) => {
                host.mem.release_guest_memory(&mem);
                return Err(e);
            }
        };
        let vmm = Vmm::boot_iommufd(
            index,
            mem.clone(),
            ram_size,
            vmm_fd.iommufd.clone(),
            vmm_fd.device.clone(),
            engine.clone(),
            host_sid,
        );
        match vmm {
            Ok(vmm) => Ok(Vm {
                vmm,
                ram_hpa,
                host: VmHost::Iommufd(vmm_fd),
                engine,
                host_mem: host.mem.clone(),
                host_frames: host.frames.clone(),
                host_iommu: host.iommu.clone(),
            }),
            Err(e) => {
                vmm_fd.close();
                host.iommu.detach_endpoint(host_sid);
                host.mem.release_guest_memory(&mem);
                Err(e)
            }
        }
    }

    /// Opens the VMM's iommufd (with its buffer) for the device `host_sid`, maps guest RAM
    /// `mem` into its IOAS at IOVA 0, and puts the device on the bus and on the iommufd.
    fn open_iommufd(
        host: &Host,
        host_sid: SourceId,
        quota: u32,
        mem: &GuestMemoryMmap,
    ) -> Result<(VmIommufd, Arc<DmaEngine>), StackError> {
        let scratch_hpa = host.frames.alloc_range(IOMMUFD_SCRATCH, 4096)?;
        let scratch = match host
            .mem
            .guest_memory(&[(Gpa(0), scratch_hpa, IOMMUFD_SCRATCH)])
        {
            Ok(s) => Arc::new(s),
            Err(e) => {
                let _ = host.frames.free(scratch_hpa);
                return Err(e.into());
            }
        };
        let release = ScratchRelease {
            scratch: scratch.clone(),
            hpa: scratch_hpa,
            mem: host.mem.clone(),
            frames: host.frames.clone(),
        };
        let fds = Iommufds::new();
        let (fd, file) = fds.open(&host.unit);
        let lookup = |n: i32| fds.fault(n).map(|f| f as Arc<dyn UapiFile>);
        let buffer = UserBuffer::new(scratch).map_err(StackError::Iommufd)?;
        let iommufd = Iommufd::open(file, fd, &lookup, buffer, GuestPasids::new(quota as usize))
            .map_err(StackError::Iommufd)?;
        let vaddr = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| StackError::Guest(e.to_string()))? as u64;
        let ram_size = mem.last_addr().0 + 1;
        iommufd
            .map(vaddr, ram_size, 0)
            .map_err(StackError::Iommufd)?;
        // On the bus before the cdev attaches it: the host driver reads its capabilities.
        let engine = Arc::new(DmaEngine::new(
            DmaEngineConfig::new(host_sid),
            host.iommu.clone() as Arc<dyn DmaPort>,
        )?);
        host.iommu.attach_endpoint(engine.clone());
        let cdev = Arc::new(VfioDeviceFile::open(host_sid, fds.clone()));
        let attached = iommufd
            .attach_device(cdev.clone(), host_sid)
            .map_err(StackError::Iommufd)
            .and_then(|d| {
                engine.enable(CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN)?;
                Ok(d)
            });
        let device = match attached {
            Ok(d) => d,
            Err(e) => {
                host.iommu.detach_endpoint(host_sid);
                return Err(e);
            }
        };
        Ok((
            VmIommufd {
                fds,
                fd,
                iommufd,
                device,
                cdev,
                _release: release,
            },
            engine,
        ))
    }

    fn build(
        host: &Host,
        index: usize,
        ram_hpa: Hpa,
        ram_size: u64,
        quota: u32,
    ) -> Result<Vm, StackError> {
        let mem = Arc::new(host.mem.guest_memory(&[(Gpa(0), ram_hpa, ram_size)])?);
        // The VMM: a nesting VFIO container holding all of guest RAM, and the device.
        let host_sid = Self::host_sid(index);
        let domain = VtdDomain::new(&host.unit)?;
        let mut container = Container::new(host.pasids.clone(), quota, domain)?;
        container.set_iommu(IommuModel::Type1Nesting)?;
        let vaddr = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| StackError::Guest(e.to_string()))? as u64;
        container.map_dma(&DmaMap {
            iova: Iova(0),
            vaddr,
            size: ram_size,
            read: true,
            write: true,
        })?;
        // The device is on the bus before VFIO attaches it: the host driver reads its
        // ATS/PRI/PASID capabilities at attach.
        let engine = Arc::new(DmaEngine::new(
            DmaEngineConfig::new(host_sid),
            host.iommu.clone() as Arc<dyn DmaPort>,
        )?);
        host.iommu.attach_endpoint(engine.clone());
        let attached = container
            .attach_device(host_sid)
            .map_err(StackError::from)
            .and_then(|()| Ok(engine.enable(CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN)?));
        if let Err(e) = attached {
            host.iommu.detach_endpoint(host_sid);
            return Err(e);
        }
        let container: VmContainer = Arc::new(ContainerFile::new(container));
        let vmm = Vmm::boot(
            index,
            mem,
            ram_size,
            container.clone(),
            engine.clone(),
            host_sid,
        )?;
        Ok(Vm {
            vmm,
            ram_hpa,
            host: VmHost::Type1(container),
            engine,
            host_mem: host.mem.clone(),
            host_frames: host.frames.clone(),
            host_iommu: host.iommu.clone(),
        })
    }

    /// The VFIO container, for a VM over type1.
    pub fn container(&self) -> Option<&VmContainer> {
        match &self.host {
            VmHost::Type1(c) => Some(c),
            VmHost::Iommufd(_) => None,
        }
    }

    /// The VMM's iommufd, for a VM over iommufd.
    pub fn iommufd(&self) -> Option<&VmIommufd> {
        match &self.host {
            VmHost::Iommufd(f) => Some(f),
            VmHost::Type1(_) => None,
        }
    }

    /// The uAPI the VM uses.
    pub fn uapi(&self) -> Uapi {
        match self.host {
            VmHost::Type1(_) => Uapi::Type1,
            VmHost::Iommufd(_) => Uapi::Iommufd,
        }
    }

    /// The container, locked; [`StackError::NoContainer`] for a VM over iommufd, which
    /// has none.
    pub fn vfio(&self) -> Result<std::sync::MutexGuard<'_, Container<VtdDomain>>, StackError> {
        Ok(self.container().ok_or(StackError::NoContainer)?.lock())
    }
}

impl Vm {
    /// Shuts the VM down as a VMM does, leaving nothing on the host: the guest and its
    /// vIOMMU go (unbinding what they shadowed), the device is detached, closing the VFIO
    /// container unbinds, unmaps and frees its PASID set (over iommufd: the device's
    /// parent HWPT is destroyed, its cdev closed, then `/dev/iommu` with its IOAS and
    /// fault queue), and guest RAM is freed. The VM's
    /// processes and device models must be gone first: RAM they still map stays allocated,
    /// and the call fails.
    pub fn shutdown(self) -> Result<(), StackError> {
        let Vm {
            vmm,
            ram_hpa,
            host,
            engine,
            host_mem,
            host_frames,
            host_iommu,
        } = self;
        let host_sid = vmm.host_sid;
        let (mem, file) = vmm.shutdown()?;
        drop(file);
        host_iommu.detach_endpoint(host_sid);
        drop(engine);
        match host {
            VmHost::Type1(container) => {
                let container = Arc::try_unwrap(container)
                    .map_err(|_| StackError::Guest("the VFIO container is still in use".into()))?;
                drop(container.into_inner());
            }
            VmHost::Iommufd(f) => f.close(),
        }
        host_mem.release_guest_memory(&mem);
        // A process or device model of the VM that is still alive maps guest RAM: freed now,
        // the frames would go to the next VM while that mapping still reaches them. They
        // stay allocated instead.
        if Arc::strong_count(&mem) > 1 {
            return Err(StackError::Guest(
                "guest RAM is still mapped (a process or device model of the VM is alive): not freed".into(),
            ));
        }
        drop(mem);
        host_frames.free(ram_hpa)?;
        Ok(())
    }
}
