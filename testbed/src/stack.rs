//! The whole vsva stack, assembled as a VMM and a host would: one host (memory, physical
//! IOMMU, its driver, the PASID allocator) and VMs, each with guest RAM mapped through VFIO,
//! a vIOMMU shadowing to the VM's VFIO container, a passthrough DMA engine, and a guest OS
//! whose IOMMU driver programs the vIOMMU.
//!
//! Every layer talks to the next through its public interface only: the guest through the
//! vIOMMU's registers and its own RAM, the vIOMMU through the container's ioctls, the host
//! driver through the physical IOMMU's registers and host memory, the device through its
//! portal and the IOMMU's DMA port.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_guest::{DeviceConfig, GuestFrames, IommuDriver, Mmio, Process};
use vsva_host::driver::{HostIommu, VtdDomain};
use vsva_host::{Container, ContainerFile, HostError, PasidAllocator};
use vsva_hw::dma::descriptor::DESCRIPTOR_SIZE;
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN};
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, Descriptor, DmaEngine, DmaEngineConfig, DmaPort, Operation,
};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{FrameAllocator, HostMemory};
use vsva_uapi::DmaMap;
use vsva_uapi::{Errno, IommuModel, QueuedFault, UapiFile, VfioIoctls};
use vsva_vmm::{HostSva, PasidSource, VIommu, VIommuConfig};
use vsva_vtd::{FlPagingMode, Gpa, Gva, Hpa, Iova, Pasid, SourceId};

/// Guest RAM starts at GPA 0; the guest's frame allocator starts above the first MiB.
const GUEST_FRAMES_START: u64 = 1 << 20;
/// The passthrough device's requester id as the guest sees it.
pub const GUEST_DEVICE_SID: SourceId = SourceId::from_rid(0x0018);

/// A failure while building or running the stack.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The sparse host memory could not be created.
    #[error("host memory: {0}")]
    HostMemory(#[from] vsva_hw::HostMemoryError),
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
    Memory(#[from] vsva_vtd::MemError),
    /// Reading the container's fault queue failed.
    #[error("fault queue: {0}")]
    FaultQueue(Errno),
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
}

/// A VM's VFIO container, shared by the VMM's vIOMMU and the VMM itself.
pub type VmContainer = Arc<ContainerFile<VtdDomain>>;

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
    /// The VM's VFIO container, as an open file.
    pub file: Arc<dyn UapiFile>,
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
        let viommu = VIommu::new(
            mem.clone(),
            VIommuConfig::default(),
            file.clone() as Arc<dyn PasidSource>,
        )?;
        viommu.attach_passthrough(GUEST_DEVICE_SID, host_sid, file.clone() as Arc<dyn HostSva>)?;

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
            })
            .map_err(|e| StackError::Guest(e.to_string()))?;
        Ok(Vmm {
            index,
            mem,
            ram_size,
            file: file as Arc<dyn UapiFile>,
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
        let records = self.file.read_faults().map_err(StackError::FaultQueue)?;
        for record in &records {
            match record {
                QueuedFault::PageRequest(f) => {
                    self.viommu.inject_host_page_request(f.sid, &f.request)?;
                }
                QueuedFault::Unrecoverable(f) => {
                    self.viommu.inject_host_fault(f.sid, &f.fault)?;
                }
            }
        }
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

/// One VM of an in-process stack: its VMM side ([`Vmm`], which a `Vm` dereferences to)
/// and what the host side holds for it (its RAM's frames, its container, its device).
pub struct Vm {
    /// The VMM side: RAM, container file, device, vIOMMU and guest.
    pub vmm: Vmm,
    /// Where guest RAM starts in host memory.
    pub ram_hpa: Hpa,
    /// The VM's VFIO container, as an open file.
    pub container: VmContainer,
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
    /// Boots VM `index` with `ram_size` bytes of RAM on `host`, with a PASID quota.
    pub fn new(host: &Host, index: usize, ram_size: u64, quota: u32) -> Result<Vm, StackError> {
        let ram_hpa = host.frames.alloc_range(ram_size, 2 << 20)?;
        let built = Self::build(host, index, ram_hpa, ram_size, quota);
        if built.is_err() {
            let _ = host.frames.free(ram_hpa);
        }
        built
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
        let host_sid = SourceId::new(1 + (index / 32) as u8, (index % 32) as u8, 0)
            .expect("device and function in range");
        let domain = VtdDomain::new(&host.unit)?;
        let mut container = Container::new(host.pasids.clone(), quota, domain);
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
            container,
            engine,
            host_mem: host.mem.clone(),
            host_frames: host.frames.clone(),
            host_iommu: host.iommu.clone(),
        })
    }

    /// The container, locked.
    pub fn vfio(&self) -> std::sync::MutexGuard<'_, Container<VtdDomain>> {
        self.container.lock()
    }
}

impl Vm {
    /// Shuts the VM down as a VMM does, leaving nothing on the host: the guest and its
    /// vIOMMU go (unbinding what they shadowed), the device is detached, closing the VFIO
    /// container unbinds, unmaps and frees its PASID set, and guest RAM is freed. The VM's
    /// processes and device models must be gone first: RAM they still map stays allocated,
    /// and the call fails.
    pub fn shutdown(self) -> Result<(), StackError> {
        let Vm {
            vmm,
            ram_hpa,
            container,
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
        let container = Arc::try_unwrap(container)
            .map_err(|_| StackError::Guest("the VFIO container is still in use".into()))?;
        drop(container.into_inner());
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
