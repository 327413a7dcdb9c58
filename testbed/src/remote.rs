//! One VM against a `vsva host` process: what `vsva vm` runs. The VMM side is the same
//! [`Vmm`] as in one process; only its container file (or its `/dev/iommu`) is a
//! [`RemoteFile`] (the uAPI over the socket, docs/protocol.md), its RAM a memfd both
//! processes map ([`SharedRam`]) and its passthrough device the host's, reached through
//! `DEVICE_WRITE`/`DEVICE_RUN`. Over iommufd the host binds the device to the connection
//! on `DEVICE_ADD`, the VMM's pointer arguments go through a second shared memfd (its
//! buffer) and its fault queue is the fd `IOMMU_FAULT_QUEUE_ALLOC` passed.
//! [`split_demo`] runs the whole demo as such processes (`vsva demo --split`).

use std::io::{BufRead, Write};
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use vsva_guest::process::Prot;
use vsva_hw::dma::descriptor::DESCRIPTOR_SIZE;
use vsva_hw::dma::{CompletionStatus, Operation};
use vsva_service::client::FaultQueueFd;
use vsva_service::load::{Held, Samples, WorkerReport};
use vsva_service::protocol::{HostState, FILE_IOMMUFD};
use vsva_service::{
    client::ClientError, client::RemoteFile, client::SharedRam, process::HostProcess,
    server::IommuArch,
};
use vsva_uapi::iommufd::{
    IommuFaultAlloc, IommuHwptAlloc, IOMMU_FAULT_QUEUE_ALLOC, IOMMU_HWPT_ALLOC,
    IOMMU_HWPT_DATA_ARM_SMMUV3, IOMMU_HWPT_INVALIDATE, VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    VFIO_DEVICE_ATTACH_PASID,
};
use vsva_uapi::vfio::{
    VfioIommuType1Fault, VFIO_IOMMU_ATTACH_PASID_TABLE, VFIO_IOMMU_BIND,
    VFIO_IOMMU_CACHE_INVALIDATE, VFIO_IOMMU_PAGE_RESPONSE,
};
use vsva_uapi::{error::Errno, file::EventNotifier, file::UapiFile};
use vsva_vmm::{GuestPasids, Iommufd, UserBuffer};
use vsva_vtd::flpte::FlPagingMode;

use crate::demo::{self, DemoIommu, DemoOptions, DemoSummary, Target, VmReport};
use crate::holdings::HostHoldings;
use crate::stack::{Passthrough, StackError, Uapi, Vmm, GUEST_DEVICE_SID};

/// Why a VM against a host process could not run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The options ask for nothing to check.
    #[error("{0}")]
    Options(String),
    /// The host could not be reached or refused the connection.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The host refused to set up the VM's container, RAM or device.
    #[error("setting up the VM on the host: {what}: {errno}")]
    Setup {
        /// The step that failed.
        what: &'static str,
        /// What the host answered.
        errno: Errno,
    },
    /// Booting or running the VM failed.
    #[error(transparent)]
    Stack(#[from] StackError),
    /// `vsva demo --split` could not run its processes.
    #[error("split demo: {0}")]
    Split(String),
    /// The host went away (exited, was killed or restarted) while the VM ran.
    #[error("the vsva host connection was lost (the host exited or restarted); the VM's checks are incomplete")]
    HostGone,
}

/// A point of the VM's run where a test can kill it (`vsva vm --pause-at`): the VM prints
/// `paused at <stage>` on stdout and, but for `dma`, waits for a line on stdin (or its
/// end) before it goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// Before the first `VFIO_IOMMU_BIND` (over iommufd: the first
    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` at a PASID): the PASID is allocated (on the host;
    /// over iommufd by the VM), the guest's PASID entry written, the host's bind not made.
    Bind,
    /// Before the first `VFIO_IOMMU_CACHE_INVALIDATE` (over iommufd:
    /// `IOMMU_HWPT_INVALIDATE`) after the device ran: the host's caches hold the process's
    /// translations.
    Invalidate,
    /// Right before the first `DEVICE_RUN` (the demo's copy of `--bytes` bytes), without
    /// waiting: a kill on the announcement lands while the host runs the copy (or just
    /// before it starts).
    Dma,
    /// After the first `DEVICE_RUN` that left a descriptor waiting for a page response:
    /// the device is stopped on a page request whose record sits unread in the host's
    /// fault queue (a VM pausing here does not take records with `DEVICE_RUN`).
    PageRequest,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Bind => "bind",
            Stage::Invalidate => "invalidate",
            Stage::Dma => "dma",
            Stage::PageRequest => "page-request",
        }
    }
}

/// The VM's connection to the host: its container file (or `/dev/iommu`) and its device,
/// with the pause hook of [`Stage`] and the timings of `LinkHooks`; a VT-d or an SMMUv3
/// VM's.
pub struct HostLink {
    pub(crate) file: RemoteFile,
    /// The host's IOMMU: which calls bind and invalidate follows it.
    iommu: IommuArch,
    /// The uAPI of `file`: the ioctl numbers of the two overlap (`IOMMU_DESTROY` is the
    /// seed's `VFIO_IOMMU_BIND`), so the hooks go by it.
    uapi: Uapi,
    /// Over iommufd, the fault queue the host passed.
    fault_queue: OnceLock<Arc<FaultQueueFd>>,
    /// Over iommufd, the fd number `IOMMU_FAULT_QUEUE_ALLOC` gave the fault queue.
    fault_fd: OnceLock<i32>,
    /// Over a container, whether `DEVICE_RUN` takes the fault records queued with its
    /// reply (not when pausing at [`Stage::PageRequest`], whose record stays unread).
    take_records: bool,
    /// Fault records a `DEVICE_RUN` took, not yet read: `read` gives them first.
    taken: Mutex<Vec<u8>>,
    hooks: LinkHooks,
}

/// What a VM's link to a host process does around the calls that cross to it, for the
/// links ([`HostLink`]) of both IOMMUs: the pause of
/// `vsva vm --pause-at` ([`Stage`], announced once) and the latencies `vsva load`
/// reports ([`Timings`]).
pub(crate) struct LinkHooks {
    pause_at: Option<Stage>,
    paused: AtomicBool,
    device_ran: AtomicBool,
    timings: Mutex<Timings>,
    /// When the device last stopped on a page request, until its first response.
    page_request_at: Mutex<Option<Instant>>,
}

impl LinkHooks {
    /// Hooks pausing at `pause_at`.
    pub(crate) fn new(pause_at: Option<Stage>) -> LinkHooks {
        LinkHooks {
            pause_at,
            paused: AtomicBool::new(false),
            device_ran: AtomicBool::new(false),
            timings: Mutex::default(),
            page_request_at: Mutex::new(None),
        }
    }

    /// Announces `stage` (once, if it is the one asked for) and waits for a line on stdin
    /// when `wait`.
    fn pause(&self, stage: Stage, wait: bool) {
        if self.pause_at != Some(stage) || self.paused.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "paused at {}", stage.name());
        let _ = out.flush();
        drop(out);
        if wait {
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
        }
    }

    /// Before an ioctl: the bind pause before the call that binds, the invalidate pause
    /// before a forwarded invalidation once the device ran.
    pub(crate) fn before_ioctl(&self, bind: bool, invalidate: bool) {
        if bind {
            self.pause(Stage::Bind, true);
        } else if invalidate && self.device_ran.load(Ordering::Acquire) {
            self.pause(Stage::Invalidate, true);
        }
    }

    /// After an ioctl the host took, started at `start`: a forwarded invalidation is
    /// timed, and a page response ends the page request round trip waiting, if one is.
    pub(crate) fn after_ioctl(&self, start: Instant, invalidate: bool, page_response: bool) {
        if invalidate {
            self.timings().fwd_inv.push(start.elapsed());
        } else if page_response {
            let at = self
                .page_request_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(at) = at {
                self.timings().prq.push(at.elapsed());
            }
        }
    }

    /// Before `DEVICE_RUN`: the dma pause (without waiting).
    pub(crate) fn before_run(&self) {
        self.pause(Stage::Dma, false);
    }

    /// After `DEVICE_RUN` left `waiting` descriptors waiting for a page response: a page
    /// request round trip starts, and the page-request pause.
    pub(crate) fn after_run(&self, waiting: u64) {
        self.device_ran.store(true, Ordering::Release);
        if waiting > 0 {
            *self
                .page_request_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            self.pause(Stage::PageRequest, true);
        }
    }

    /// Takes the latencies timed so far.
    pub(crate) fn take_timings(&self) -> Timings {
        std::mem::take(&mut *self.timings())
    }

    fn timings(&self) -> MutexGuard<'_, Timings> {
        self.timings.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Latencies of the calls that cross to the host, as `vsva load` reports them.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Each forwarded invalidation: a `VFIO_IOMMU_CACHE_INVALIDATE` over the socket.
    pub fwd_inv: Samples,
    /// Each page request round trip: from the host's `DEVICE_RUN` saying the device waits
    /// on a page request (over a container, its reply carrying the record), through
    /// reading it from the host's fault queue over iommufd, the vIOMMU and
    /// the guest's handler, to the host acknowledging the first page response.
    pub prq: Samples,
}

impl HostLink {
    /// The link over `file` to a host with `iommu`, over `uapi`, pausing at `pause_at`.
    pub(crate) fn new(
        file: RemoteFile,
        iommu: IommuArch,
        uapi: Uapi,
        pause_at: Option<Stage>,
    ) -> HostLink {
        HostLink {
            file,
            iommu,
            uapi,
            fault_queue: OnceLock::new(),
            fault_fd: OnceLock::new(),
            take_records: uapi == Uapi::Type1 && pause_at != Some(Stage::PageRequest),
            taken: Mutex::default(),
            hooks: LinkHooks::new(pause_at),
        }
    }

    fn taken(&self) -> MutexGuard<'_, Vec<u8>> {
        self.taken.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the fault queue fd `fd` an `IOMMU_FAULT_QUEUE_ALLOC` gave, keeping it to
    /// wait on.
    fn take_fault_queue(&self, fd: i32) -> Option<Arc<dyn UapiFile>> {
        let queue = Arc::new(FaultQueueFd(self.file.take_fd(fd)?));
        self.fault_queue.set(queue.clone()).ok()?;
        Some(queue)
    }

    /// The queue file of fd `fd` an allocation on the link gave: the fault queue (kept
    /// to wait on, as [`HostLink::take_fault_queue`] keeps it), or else a vEVENT queue.
    pub(crate) fn queue_file(&self, fd: i32) -> Option<Arc<dyn UapiFile>> {
        if self.fault_fd.get() == Some(&fd) {
            self.take_fault_queue(fd)
        } else {
            self.file.veventq(fd)
        }
    }

    /// Whether `cmd` (argument `arg`) is the call that binds (a PASID on VT-d; on SMMUv3
    /// the guest's CD table: `VFIO_IOMMU_ATTACH_PASID_TABLE`, or over iommufd a nested
    /// HWPT carrying the guest's STE), whether it is a forwarded invalidation, and whether
    /// it is a page response, over the link's uAPI.
    fn kind_of(&self, cmd: u32, arg: &[u8]) -> (bool, bool, bool) {
        let word = |at: usize| {
            arg.get(at..at + 4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        let type1 = self.uapi == Uapi::Type1;
        let page_response = type1 && cmd == VFIO_IOMMU_PAGE_RESPONSE;
        let (bind, invalidate) = match (self.iommu, self.uapi) {
            (IommuArch::Vtd, Uapi::Type1) => {
                (cmd == VFIO_IOMMU_BIND, cmd == VFIO_IOMMU_CACHE_INVALIDATE)
            }
            // `vfio_device_attach_iommufd_pt`: u32 argsz, u32 flags, ...
            (IommuArch::Vtd, Uapi::Iommufd) => (
                cmd == VFIO_DEVICE_ATTACH_IOMMUFD_PT && word(4) & VFIO_DEVICE_ATTACH_PASID != 0,
                cmd == IOMMU_HWPT_INVALIDATE,
            ),
            (IommuArch::Smmuv3, Uapi::Type1) => (
                cmd == VFIO_IOMMU_ATTACH_PASID_TABLE,
                cmd == VFIO_IOMMU_CACHE_INVALIDATE,
            ),
            (IommuArch::Smmuv3, Uapi::Iommufd) => (
                cmd == IOMMU_HWPT_ALLOC
                    && word(offset_of!(IommuHwptAlloc, data_type)) == IOMMU_HWPT_DATA_ARM_SMMUV3,
                cmd == IOMMU_HWPT_INVALIDATE,
            ),
        };
        (bind, invalidate, page_response)
    }

    /// Over iommufd a group the host queues reaches the VMM on the fault queue's own
    /// socket, and a response the VMM writes there reaches the device apart from the
    /// connection: while the device waits on a page request and no group is readable
    /// yet, the device is run again after a short wait (the response may be on its way),
    /// bounded by [`FAULT_WAIT`]. Returns how many descriptors still wait, with a group
    /// readable when any do.
    fn settle_fault_queue(&self, queue: &FaultQueueFd, mut waiting: u64) -> Result<u64, Errno> {
        let deadline = Instant::now() + FAULT_WAIT;
        let mut pause = Duration::from_micros(20);
        while waiting > 0 {
            if queue.wait_readable(pause) {
                return Ok(waiting);
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    "the device waits on a page request and no group reached the fault queue"
                );
                return Err(Errno::ETIMEDOUT);
            }
            pause = (pause * 2).min(Duration::from_millis(10));
            waiting = self.file.device_run()?;
        }
        Ok(0)
    }

    /// The connection.
    pub fn file(&self) -> &RemoteFile {
        &self.file
    }

    /// Takes the latencies timed so far.
    pub fn take_timings(&self) -> Timings {
        self.hooks.take_timings()
    }
}

impl UapiFile for HostLink {
    fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
        let (bind, invalidate, page_response) = self.kind_of(cmd, arg);
        self.hooks.before_ioctl(bind, invalidate);
        let start = Instant::now();
        let result = self.file.ioctl(cmd, arg);
        if result.is_ok() {
            self.hooks.after_ioctl(start, invalidate, page_response);
            if self.uapi == Uapi::Iommufd && cmd == IOMMU_FAULT_QUEUE_ALLOC {
                let at = offset_of!(IommuFaultAlloc, out_fault_fd);
                if let Some(fd) = arg.get(at..at + 4) {
                    let fd = i32::from_le_bytes(fd.try_into().expect("4 bytes"));
                    let _ = self.fault_fd.set(fd);
                }
            }
        }
        result
    }

    /// The records the last `DEVICE_RUN` took, as many whole ones as fit, before any the
    /// host still queues.
    fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        const RECORD: usize = size_of::<VfioIommuType1Fault>();
        let mut taken = self.taken();
        if taken.is_empty() {
            drop(taken);
            return self.file.read(buf);
        }
        if buf.len() < RECORD {
            return Err(Errno::EINVAL);
        }
        let n = taken.len().min(buf.len() / RECORD * RECORD);
        buf[..n].copy_from_slice(&taken[..n]);
        taken.drain(..n);
        Ok(n)
    }

    fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        self.file.write(buf)
    }

    fn set_event_notifier(&self, notifier: Option<Arc<dyn EventNotifier>>) {
        self.file.set_event_notifier(notifier)
    }
}

impl Passthrough for HostLink {
    fn portal_write(
        &self,
        offset: u64,
        descriptor: &[u8; DESCRIPTOR_SIZE],
    ) -> Result<(), StackError> {
        self.file
            .device_write(offset, descriptor)
            .map_err(StackError::DeviceCall)
    }

    fn process(&self) -> Result<usize, StackError> {
        self.hooks.before_run();
        let mut waiting = match self.take_records {
            true => {
                let (waiting, records) = self
                    .file
                    .device_run_taking_records()
                    .map_err(StackError::DeviceCall)?;
                self.taken().extend_from_slice(&records);
                waiting
            }
            false => self.file.device_run().map_err(StackError::DeviceCall)?,
        };
        if let Some(queue) = self.fault_queue.get() {
            waiting = self
                .settle_fault_queue(queue, waiting)
                .map_err(StackError::DeviceCall)?;
        }
        self.hooks.after_run(waiting);
        usize::try_from(waiting).map_err(|_| StackError::DeviceCall(Errno::EIO))
    }

    fn reg_read(&self, offset: u64) -> Result<u64, StackError> {
        self.file
            .device_reg_read(offset)
            .map_err(StackError::DeviceCall)
    }

    fn reg_write(&self, offset: u64, value: u64) -> Result<(), StackError> {
        self.file
            .device_reg_write(offset, value)
            .map_err(StackError::DeviceCall)
    }
}

/// A VM whose host is a `vsva host` process: the VMM side, its RAM and its connection.
pub struct RemoteVm {
    /// The VMM side (vIOMMU, device, guest), exactly as in one process.
    pub vmm: Vmm,
    /// Guest RAM, shared with the host.
    pub ram: SharedRam,
    /// Over iommufd, the VMM's buffer its pointer arguments go through, shared with the
    /// host.
    buffer: Option<SharedRam>,
    link: Arc<HostLink>,
}

/// How long a VM over iommufd waits for a page request group to reach its fault queue
/// (generous: a loaded machine runs many processes on few cores).
const FAULT_WAIT: Duration = Duration::from_secs(60);

/// Bytes of the VMM buffer iommufd pointer arguments go through.
const IOMMUFD_BUFFER: u64 = 16 << 10;

impl RemoteVm {
    /// Connects to the host at `path` and boots VM `index` with `ram_size` bytes of RAM
    /// over `uapi`: a nesting container (or an iommufd, `RemoteVm::connect_iommufd`),
    /// the RAM shared and mapped at IOVA 0, the host's passthrough device attached, then
    /// the vIOMMU and the guest.
    pub fn connect(
        path: &Path,
        index: usize,
        ram_size: u64,
        pause_at: Option<Stage>,
        uapi: Uapi,
    ) -> Result<RemoteVm, VmError> {
        if uapi == Uapi::Iommufd {
            return Self::connect_iommufd(path, index, ram_size, pause_at);
        }
        let file = RemoteFile::connect(path)?;
        let ram = SharedRam::new(ram_size)?;
        ram.nesting_container(&file)
            .map_err(|(what, errno)| VmError::Setup { what, errno })?;
        let host_sid = file.device_add().map_err(|errno| VmError::Setup {
            what: "DEVICE_ADD",
            errno,
        })?;
        let link = Arc::new(HostLink::new(file, IommuArch::Vtd, Uapi::Type1, pause_at));
        let vmm = Vmm::boot(
            index,
            ram.mem.clone(),
            ram_size,
            link.clone(),
            link.clone() as Arc<dyn Passthrough>,
            host_sid,
        )
        .map_err(|e| gone_or(&link, e.into()))?;
        Ok(RemoteVm {
            vmm,
            ram,
            buffer: None,
            link,
        })
    }

    /// [`RemoteVm::connect`] over iommufd, as the in-process stack's VMM over iommufd:
    /// the connection opens `/dev/iommu` (`HELLO` file kind 2), guest RAM and the VMM's
    /// buffer are shared (`ADD_MEMORY`), the host's device is plugged and bound
    /// (`DEVICE_ADD`), then [`Iommufd::open`] (an IOAS and a fault queue, whose fd the
    /// host passes), guest RAM mapped into the IOAS at IOVA 0 (`IOMMU_IOAS_MAP`), the
    /// device's RID attached to a nest-parent HWPT ([`Iommufd::attach_bound`]), and
    /// [`Vmm::boot_iommufd`]. A step that fails closes the connection, which releases
    /// what the host made.
    fn connect_iommufd(
        path: &Path,
        index: usize,
        ram_size: u64,
        pause_at: Option<Stage>,
    ) -> Result<RemoteVm, VmError> {
        let file = RemoteFile::connect_kind(path, FILE_IOMMUFD)?;
        let ram = SharedRam::new(ram_size)?;
        let buffer = SharedRam::new(IOMMUFD_BUFFER)?;
        let setup = |what, r: Result<(), Errno>| r.map_err(|errno| VmError::Setup { what, errno });
        setup("ADD_MEMORY (guest RAM)", ram.share(&file))?;
        setup("ADD_MEMORY (the VMM's buffer)", buffer.share(&file))?;
        let (host_sid, dev_id) = file.device_add_bound().map_err(|errno| VmError::Setup {
            what: "DEVICE_ADD",
            errno,
        })?;
        let link = Arc::new(HostLink::new(file, IommuArch::Vtd, Uapi::Iommufd, pause_at));
        let gone = |what, errno| {
            if link.file.host_gone() {
                VmError::HostGone
            } else {
                VmError::Setup { what, errno }
            }
        };
        let user = UserBuffer::new(buffer.mem.clone()).map_err(|e| gone("the VMM's buffer", e))?;
        let iommufd = Iommufd::open(
            link.clone(),
            -1,
            &|fd| link.take_fault_queue(fd),
            user,
            GuestPasids::new(vsva_host::pasid::DEFAULT_QUOTA as usize),
        )
        .map_err(|e| gone("IOMMU_IOAS_ALLOC, IOMMU_FAULT_QUEUE_ALLOC", e))?;
        iommufd
            .map(ram.addr(), ram_size, 0)
            .map_err(|e| gone("IOMMU_IOAS_MAP", e))?;
        let device = iommufd
            .attach_bound(link.clone(), dev_id, host_sid)
            .map_err(|e| gone("IOMMU_HWPT_ALLOC, VFIO_DEVICE_ATTACH_IOMMUFD_PT", e))?;
        let vmm = Vmm::boot_iommufd(
            index,
            ram.mem.clone(),
            ram_size,
            iommufd,
            device,
            link.clone() as Arc<dyn Passthrough>,
            host_sid,
        )
        .map_err(|e| gone_or(&link, e.into()))?;
        Ok(RemoteVm {
            vmm,
            ram,
            buffer: Some(buffer),
            link,
        })
    }

    /// The connection to the host.
    pub fn link(&self) -> &HostLink {
        &self.link
    }

    /// Whether the host went away.
    pub fn host_gone(&self) -> bool {
        self.link.file.host_gone()
    }

    /// Shuts the VM down as a VMM does: the guest and the vIOMMU go (unbinding what they
    /// shadowed), then the connection closes, which releases what the host still held for
    /// it (the container's PASIDs and mappings, the device, the RAM window).
    pub fn shutdown(self) -> Result<(), VmError> {
        let RemoteVm {
            vmm,
            ram,
            buffer,
            link,
        } = self;
        match vmm.shutdown() {
            Ok((mem, file)) => {
                drop((mem, file, link, ram, buffer));
                Ok(())
            }
            Err(e) => Err(gone_or(&link, e.into())),
        }
    }
}

/// `e`, or [`VmError::HostGone`] when the host went away (which is why it failed).
fn gone_or(link: &HostLink, e: VmError) -> VmError {
    if link.file.host_gone() {
        VmError::HostGone
    } else {
        e
    }
}

/// What `vsva vm` does.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// The VM's index (names it in the output and in `--split` runs).
    pub index: usize,
    /// The demo's options: seed, processes, bytes per buffer.
    pub demo: DemoOptions,
    /// Where to pause for a test, if anywhere.
    pub pause_at: Option<Stage>,
    /// The uAPI the VMM reaches the host through.
    pub uapi: Uapi,
    /// Whether to take part in `vsva demo --split`'s cross-VM checks after the workload
    /// ([`cross_vm_phase`]).
    pub cross_vm: bool,
}

/// The per-VM part of the demo against the host at `path`: boots the VM, runs every
/// process's workload (bind, copy, fill of lazily mapped pages through page requests,
/// compares, munmap and the DMA that must fault), checks every source buffer is intact at
/// the end, and shuts down. `log` gets the VM's lines of the demo. The report's errors
/// are the failed checks; a host that went away is [`VmError::HostGone`].
pub fn run(
    path: &Path,
    opts: &VmOptions,
    log: &mut dyn FnMut(String),
) -> Result<VmReport, VmError> {
    opts.demo
        .validate()
        .map_err(|e| VmError::Options(e.to_string()))?;
    let vm = RemoteVm::connect(
        path,
        opts.index,
        demo::vm_ram(&opts.demo),
        opts.pause_at,
        opts.uapi,
    )?;
    let mut rng = StdRng::seed_from_u64(opts.demo.seed);
    let mut report = VmReport {
        vm: opts.index,
        ..VmReport::default()
    };
    let bar = demo::progress(&opts.demo, opts.demo.processes as u64);
    let len = demo::buffer_len(&opts.demo);
    let jobs = demo::vm_workload(
        &vm.vmm,
        opts.demo.processes,
        len,
        &mut rng,
        &mut report,
        &bar,
    );
    bar.finish_and_clear();
    for (n, job) in jobs.iter().enumerate() {
        match job.intact() {
            Ok(true) => {}
            Ok(false) => report
                .errors
                .push(format!("process {n}: its source buffer changed")),
            Err(e) => report.errors.push(format!("process {n}: {e}")),
        }
    }
    if opts.cross_vm {
        let targets: Vec<Target> = jobs.iter().map(|j| j.target(opts.index)).collect();
        cross_vm_phase(
            &vm.vmm,
            opts.uapi,
            &jobs,
            &targets,
            &mut std::io::stdin().lock(),
            &mut std::io::stdout(),
            &mut report,
        );
    }
    demo::vm_stats(&vm.vmm, &mut report, log);
    if vm.host_gone() {
        return Err(VmError::HostGone);
    }
    drop(jobs);
    vm.shutdown()?;
    Ok(report)
}

/// The prefix of the lines of the cross-VM phase on a VM's stdout.
pub(crate) const CROSS_VM: &str = "cross-vm ";

/// A VM's part in `vsva demo --split`'s cross-VM checks, after its workload (`vsva vm
/// --cross-vm`). The VM prints `cross-vm ready <targets>` (its `targets`, one per job of
/// `jobs`, as a JSON array of [`Target`]) on `output`, then follows one command a line
/// from `input`, each answered with one `cross-vm ...` line, until `end` or the end of
/// `input`:
/// - `mark N`: keeps a copy of job N's source buffer (`cross-vm marked`);
/// - `check N`: whether job N's buffer still holds that copy (`cross-vm unchanged
///   true|false`);
/// - `attack <target>`: the VM (over `uapi`) tries another VM's process ([`demo::attack`]:
///   over type1 its container is asked to bind, invalidate and free the PASID, each
///   counted in `report`; then its device DMAs with it) (`cross-vm attacked`);
/// - `judge true|false`: whether the victim's bytes were unchanged by the last attack,
///   which completes its check ([`demo::DeviceAttempt::judge`]) (`cross-vm judged`).
///
/// A command it cannot follow is an error of `report`, answered `cross-vm error ...`.
pub fn cross_vm_phase(
    vm: &Vmm,
    uapi: Uapi,
    jobs: &[demo::Job],
    targets: &[Target],
    input: &mut dyn BufRead,
    output: &mut dyn Write,
    report: &mut VmReport,
) {
    let mut say = |line: String| {
        let _ = writeln!(output, "{CROSS_VM}{line}");
        let _ = output.flush();
    };
    let listed = serde_json::to_string(targets).expect("serialisable targets");
    say(format!("ready {listed}"));
    let mut marks: Vec<Option<Vec<u8>>> = vec![None; jobs.len()];
    let mut pending = None;
    let mut line = String::new();
    loop {
        line.clear();
        if !matches!(input.read_line(&mut line), Ok(n) if n > 0) {
            break;
        }
        let (cmd, arg) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        let job = || arg.parse::<usize>().ok().filter(|&n| n < jobs.len());
        let answer = match (cmd, job()) {
            ("end", _) => break,
            ("mark", Some(n)) => jobs[n].snapshot().map(|b| {
                marks[n] = Some(b);
                "marked".to_string()
            }),
            ("check", Some(n)) => jobs[n].snapshot().map(|now| {
                let unchanged = marks[n].take().is_some_and(|before| before == now);
                format!("unchanged {unchanged}")
            }),
            ("attack", _) => match serde_json::from_str::<Target>(arg) {
                Ok(target) => {
                    pending = Some(demo::attack(vm, uapi, &target, report));
                    Ok("attacked".to_string())
                }
                Err(e) => Err(StackError::Guest(format!("a target: {e}"))),
            },
            ("judge", _) => match (arg.parse::<bool>(), pending.take()) {
                (Ok(unchanged), Some(attempt)) => {
                    attempt.judge(unchanged, report);
                    Ok("judged".to_string())
                }
                _ => Err(StackError::Guest("judge: no attack to judge".into())),
            },
            _ => Err(StackError::Guest(format!(
                "cross-VM command {:?} not understood",
                line.trim()
            ))),
        };
        match answer {
            Ok(a) => say(a),
            Err(e) => {
                report.errors.push(format!("cross-VM phase: {e}"));
                say(format!("error {e}"));
            }
        }
    }
}

/// How long `--split` waits for the host to release what a VM that exited held.
const SPLIT_WAIT: Duration = Duration::from_secs(10);

/// How long `--split` waits for one answer of a VM process: its workload, then each step
/// of the cross-VM checks (generous: a loaded machine runs many VMs on few cores).
const VM_STEP_WAIT: Duration = Duration::from_secs(600);

/// A `vsva vm` process of `vsva demo --split`, its stdout read line by line by a thread
/// of its own so that every wait for it is bounded.
struct VmProcess {
    index: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Its lines that are not answers of the cross-VM phase, in order.
    log: Vec<String>,
}

impl VmProcess {
    fn spawn(
        program: &Path,
        socket: &Path,
        opts: &DemoOptions,
        index: usize,
        cross_vm: bool,
        iommu: DemoIommu,
    ) -> std::io::Result<VmProcess> {
        let mut cmd = Command::new(program);
        cmd.arg("vm")
            .arg("--socket")
            .arg(socket)
            .args(["--index", &index.to_string()])
            .args(["--seed", &opts.seed.wrapping_add(index as u64).to_string()])
            .args(["--processes", &opts.processes.to_string()])
            .args(["--bytes", &opts.bytes.to_string()])
            .args([
                "--uapi",
                match opts.uapi {
                    Uapi::Type1 => "type1",
                    Uapi::Iommufd => "iommufd",
                },
            ])
            .arg("--json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if cross_vm {
            cmd.arg("--cross-vm");
        }
        if iommu == DemoIommu::Smmuv3 {
            cmd.args(["--iommu", "smmuv3"]);
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or(std::io::ErrorKind::BrokenPipe)?;
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("vsva-vm{index}-out"))
            .spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        Ok(VmProcess {
            index,
            child,
            stdin,
            lines,
            log: Vec::new(),
        })
    }

    /// The VM's next answer of the cross-VM phase (without its prefix); its other lines go
    /// to its log. `None` when it closed its stdout or did not answer in time.
    fn answer(&mut self) -> Option<String> {
        let deadline = Instant::now() + VM_STEP_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            match line.strip_prefix(CROSS_VM) {
                Some(answer) => return Some(answer.to_string()),
                None => self.log.push(line),
            }
        }
    }

    /// Sends `command` and waits for its answer, which must start with `want`; returns the
    /// rest of it.
    fn step(&mut self, command: &str, want: &str) -> Result<String, String> {
        let sent = self
            .stdin
            .as_mut()
            .map(|s| writeln!(s, "{command}").and_then(|()| s.flush()));
        if !matches!(sent, Some(Ok(()))) {
            return Err(format!("vm{}: could not send {command:?}", self.index));
        }
        match self.answer() {
            Some(a) => match a.strip_prefix(want) {
                Some(rest) => Ok(rest.trim().to_string()),
                None => Err(format!("vm{}: {command:?} answered {a:?}", self.index)),
            },
            None => Err(format!(
                "vm{}: no answer to {command:?} (exited or stuck)",
                self.index
            )),
        }
    }

    /// Closes its stdin (which ends its cross-VM phase), collects the rest of its output
    /// and waits for it to exit, killing it if it does not in time: its report (the last
    /// line, JSON) and its exit status.
    fn finish(mut self) -> (Vec<String>, Option<VmReport>, std::io::Result<ExitStatus>) {
        drop(self.stdin.take());
        let deadline = Instant::now() + VM_STEP_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    break;
                }
            }
        }
        let status = self.child.wait();
        let report = self
            .log
            .last()
            .and_then(|l| serde_json::from_str::<VmReport>(l).ok());
        if report.is_some() {
            self.log.pop();
        }
        (self.log, report, status)
    }
}

/// The cross-VM checks of `vsva demo --split`: every VM attacks each process of the next
/// VM (as the in-process demo's do). Per target the victim marks its buffer, the attacker
/// attacks, the victim checks its buffer and the attacker judges its attempt by that.
/// Fails with why the checks stopped.
fn split_cross_vm(vms: &mut [VmProcess]) -> Result<(), String> {
    let mut targets = Vec::new();
    for vm in vms.iter_mut() {
        let ready = vm.answer().ok_or_else(|| {
            format!(
                "vm{}: never reached the cross-VM checks (exited or stuck)",
                vm.index
            )
        })?;
        let listed = ready
            .strip_prefix("ready ")
            .and_then(|t| serde_json::from_str::<Vec<Target>>(t).ok())
            .ok_or_else(|| format!("vm{}: {ready:?} is not its targets", vm.index))?;
        targets.push(listed);
    }
    for attacker in 0..vms.len() {
        let victim = (attacker + 1) % vms.len();
        for (n, target) in targets[victim].iter().enumerate() {
            let target = serde_json::to_string(target).expect("a serialisable target");
            vms[victim].step(&format!("mark {n}"), "marked")?;
            vms[attacker].step(&format!("attack {target}"), "attacked")?;
            let unchanged = vms[victim].step(&format!("check {n}"), "unchanged")?;
            vms[attacker].step(&format!("judge {unchanged}"), "judged")?;
        }
    }
    Ok(())
}

/// The cross-VM checks of `vsva demo --split --iommu smmuv3`: each VM's container must
/// refuse a page response for each other VM's device (by its StreamID, which the VM lists
/// when ready; [`crate::smmu_demo::run_vm`]).
fn split_cross_vm_smmu(vms: &mut [VmProcess]) -> Result<(), String> {
    let mut sids = Vec::new();
    for vm in vms.iter_mut() {
        let ready = vm.answer().ok_or_else(|| {
            format!(
                "vm{}: never reached the cross-VM checks (exited or stuck)",
                vm.index
            )
        })?;
        let sid = ready
            .strip_prefix("ready ")
            .and_then(|t| t.parse::<u16>().ok())
            .ok_or_else(|| format!("vm{}: {ready:?} is not its StreamID", vm.index))?;
        sids.push(sid);
    }
    for (attacker, vm) in vms.iter_mut().enumerate() {
        for (victim, sid) in sids.iter().enumerate() {
            if victim != attacker {
                vm.step(&format!("refuse {sid}"), "refused")?;
            }
        }
    }
    Ok(())
}

/// `vsva demo --split`: the demo as one `vsva host --strict` process (`program host`, with
/// `--iommu smmuv3` for `iommu` SMMUv3) and one `vsva vm` process per VM (VM `i` with seed
/// `opts.seed + i`, over `opts.uapi`), all started at once.
/// The summary is computed from the VMs' reports and the host's own: every VM must exit
/// cleanly with no failed check, and once they have all exited, the host's STATE must be
/// what it was before they connected (nothing leaked) with no strict-mode violation (each
/// is a stale translation, an error) and its report must say nothing was left behind.
/// With two VMs or more, the cross-VM checks run between the workloads and the
/// shutdowns, across the VM processes ([`cross_vm_phase`]).
pub fn split_demo(
    program: &Path,
    opts: &DemoOptions,
    iommu: DemoIommu,
    log: &mut dyn FnMut(String),
) -> Result<DemoSummary, VmError> {
    opts.validate()
        .map_err(|e| VmError::Options(e.to_string()))?;
    let started = Instant::now();
    let memory = opts.host_memory.to_string();
    let mut host_args = vec!["--memory", memory.as_str(), "--strict"];
    if iommu == DemoIommu::Smmuv3 {
        host_args.extend(["--iommu", "smmuv3"]);
    }
    let host = HostProcess::start(program, "split", &host_args)
        .map_err(|e| VmError::Split(e.to_string()))?;
    let (probe, baseline) = host.probe().map_err(|e| VmError::Split(e.to_string()))?;
    let socket = host.socket();
    let cross_vm = opts.vms > 1;
    let mut vms = Vec::new();
    let mut errors = 0;
    let mut failed_vms = 0;
    for i in 0..opts.vms {
        match VmProcess::spawn(program, socket, opts, i, cross_vm, iommu) {
            Ok(vm) => vms.push(vm),
            Err(e) => {
                log(format!("vm{i}: error: vsva vm did not run: {e}"));
                failed_vms += 1;
            }
        }
    }
    let cross_vm_checked = cross_vm && failed_vms == 0 && {
        let checked = match iommu {
            DemoIommu::Vtd => split_cross_vm(&mut vms),
            DemoIommu::Smmuv3 => split_cross_vm_smmu(&mut vms),
        };
        match checked {
            Ok(()) => true,
            Err(e) => {
                log(format!("error: cross-VM checks: {e}"));
                errors += 1;
                false
            }
        }
    };
    let mut reports = Vec::new();
    for vm in vms {
        let i = vm.index;
        let (lines, report, status) = vm.finish();
        for line in lines {
            log(line);
        }
        match (report, status) {
            (Some(r), Ok(s)) if s.success() || r.error_count() > 0 => reports.push(r),
            (_, status) => {
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                log(format!("vm{i}: error: vsva vm exited with {status}"));
                failed_vms += 1;
            }
        }
    }
    // Every VM exited: the host must hold what it held before they connected, and its
    // strict mode must have found nothing.
    let deadline = Instant::now() + SPLIT_WAIT;
    let left = loop {
        match probe.host_state() {
            Ok(s) if s.holds_as(&baseline) => break Ok(s),
            Ok(s) if Instant::now() > deadline => break Ok(s),
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(e),
        }
    };
    drop(probe);
    let (left, stale_translations) = match left {
        Ok(s) => {
            let verdict = judge_host(&s, &baseline, log);
            errors += verdict.leaks;
            (verdict.left, verdict.stale_translations)
        }
        Err(e) => {
            log(format!("error: the host's STATE: {e}"));
            errors += 1;
            (HostHoldings::default(), 0)
        }
    };
    match host.stop() {
        Ok(exit) => {
            for line in exit.report.lines() {
                log(line.to_string());
            }
            if !exit.success() || !exit.nothing_left_behind() {
                log(format!("error: vsva host exited with {}", exit.status));
                errors += 1;
            }
        }
        Err(e) => {
            log(format!("error: {e}"));
            errors += 1;
        }
    }
    errors +=
        stale_translations + failed_vms + reports.iter().map(VmReport::error_count).sum::<usize>();
    Ok(DemoSummary {
        iommu,
        uapi: opts.uapi,
        vms: opts.vms,
        pasids: reports.iter().map(|r| r.pasids.len()).sum(),
        bytes_verified: reports.iter().map(|r| r.bytes_verified).sum(),
        page_requests_served: reports.iter().map(|r| r.page_requests_served).sum(),
        invalidations_forwarded: reports.iter().map(|r| r.invalidations_forwarded).sum(),
        host_errors: reports.iter().map(|r| r.host_errors).sum(),
        stale_translations,
        failed_shutdowns: failed_vms,
        left_after_shutdown: left,
        cross_vm_checked,
        wall_seconds: started.elapsed().as_secs_f64(),
        errors,
        per_vm: reports,
    })
}

/// What the host's `STATE` after every VM exited says of the run.
#[derive(Debug, PartialEq)]
struct HostVerdict {
    /// What it still holds beyond its baseline.
    left: HostHoldings,
    /// Leak errors: 1 if it holds anything beyond its baseline.
    leaks: usize,
    /// The stale translations its strict mode found (each an error of the summary).
    stale_translations: usize,
}

/// Judges the host's state `after` every VM exited against its `baseline`, logging each
/// error.
fn judge_host(after: &HostState, baseline: &HostState, log: &mut dyn FnMut(String)) -> HostVerdict {
    let stale_translations = after.strict_violations as usize;
    if stale_translations > 0 {
        log(format!(
            "error: the host's strict mode found {stale_translations} stale translations (its exit report lists them)"
        ));
    }
    if after.holds_as(baseline) {
        return HostVerdict {
            left: HostHoldings::default(),
            leaks: 0,
            stale_translations,
        };
    }
    log(format!(
        "error: the host still holds after every VM exited: {after:?} (before: {baseline:?})"
    ));
    HostVerdict {
        left: holdings_beyond(after, baseline),
        leaks: 1,
        stale_translations,
    }
}

/// What `after` holds beyond `before`, in the in-process demo's terms (the paging-structure
/// caches are not in the host's STATE).
fn holdings_beyond(after: &HostState, before: &HostState) -> HostHoldings {
    let d = |a: u64, b: u64| a.saturating_sub(b) as usize;
    HostHoldings {
        allocated_bytes: after.allocated_bytes.saturating_sub(before.allocated_bytes),
        domain_ids: d(after.domain_ids, before.domain_ids),
        devices: d(after.devices, before.devices),
        page_request_routes: d(after.page_request_routes, before.page_request_routes),
        page_request_sinks: d(after.page_request_sinks, before.page_request_sinks),
        pasids: d(after.pasids, before.pasids),
        iotlb: d(after.iotlb, before.iotlb),
        context_and_pasid_cache: (
            d(after.context_cache, before.context_cache),
            d(after.pasid_cache, before.pasid_cache),
        ),
        ..HostHoldings::default()
    }
}

/// What [`workload_loop`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopReport {
    /// Bind → DMA → verify → invalidate → unbind cycles completed.
    pub cycles: u64,
    /// Bytes the device copied and the CPU found right.
    pub bytes_verified: u64,
    /// Failed checks and failed calls.
    pub errors: u64,
}

/// One cycle of [`workload_loop`]: a new process maps two buffers of `pages` pages, binds,
/// has the device copy one to the other, checks the copy, unmaps the destination (the
/// guest's invalidation is forwarded to the host), checks DMA to it now faults, and
/// unbinds. Returns the bytes verified.
pub fn cycle(vm: &Vmm, rng: &mut StdRng, pages: u64) -> Result<u64, StackError> {
    let guest = |e: &dyn std::fmt::Display| StackError::Guest(e.to_string());
    let len = pages * 4096;
    let p = vm.spawn(FlPagingMode::FourLevel)?;
    let src = p.mmap(len, Prot::READ_WRITE).map_err(|e| guest(&e))?;
    let dst = p.mmap(len, Prot::READ_WRITE).map_err(|e| guest(&e))?;
    let record = p.mmap(4096, Prot::READ_WRITE).map_err(|e| guest(&e))?;
    let mut data = vec![0u8; len as usize];
    rng.fill_bytes(&mut data);
    p.write(src, &data).map_err(|e| guest(&e))?;
    let pasid = vm.bind(&p)?;
    let copy = Operation::Memmove {
        src: src.0,
        dst: dst.0,
        size: len as u32,
    };
    let checked = (|| {
        let rec = vm.run(&p, pasid, copy, record)?;
        let mut got = vec![0u8; len as usize];
        p.read(dst, &mut got).map_err(|e| guest(&e))?;
        if rec.status != CompletionStatus::Success || got != data {
            return Err(StackError::Guest(format!("copy not verified: {rec:?}")));
        }
        p.munmap(dst, len).map_err(|e| guest(&e))?;
        let rec = vm.run(&p, pasid, copy, record)?;
        if rec.status != CompletionStatus::PageResponseError || rec.fault_addr != dst.0 {
            return Err(StackError::Guest(format!(
                "DMA after munmap did not fault at {:#x}: {rec:?}",
                dst.0
            )));
        }
        Ok(len)
    })();
    let unbound = vm
        .driver
        .sva_unbind(GUEST_DEVICE_SID, pasid)
        .map_err(|e| guest(&e));
    let verified = checked?;
    unbound?;
    Ok(verified)
}

/// Runs [`cycle`] with buffers of 1 to `max_pages` pages (random, from `seed`) until
/// `duration` has passed; a failed cycle counts as an error and the loop goes on.
pub fn workload_loop(vm: &Vmm, seed: u64, duration: Duration, max_pages: u64) -> LoopReport {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = LoopReport::default();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let pages = rng.random_range(1..=max_pages.max(1));
        match cycle(vm, &mut rng, pages) {
            Ok(bytes) => {
                report.cycles += 1;
                report.bytes_verified += bytes;
            }
            Err(e) => {
                tracing::warn!("vm{}: cycle failed: {e}", vm.index);
                report.errors += 1;
            }
        }
    }
    report
}

/// RAM of a `vsva load` VM.
pub const LOAD_VM_RAM: u64 = 32 << 20;
/// The buffer a `vsva load` VM's device fills at its start and the VM checks at its end.
const KEEPER_LEN: u64 = 64 << 10;

/// A `vsva load` VM's keeper: a guest process with a bound PASID and a buffer its device
/// filled with one byte value.
struct Keeper {
    process: Arc<vsva_guest::process::Process>,
    buf: vsva_vtd::addr::Gva,
    byte: u8,
}

impl Keeper {
    fn start(vm: &Vmm, byte: u8) -> Result<Keeper, StackError> {
        let guest = |e: &dyn std::fmt::Display| StackError::Guest(e.to_string());
        let process = vm.spawn(FlPagingMode::FourLevel)?;
        let buf = process
            .mmap(KEEPER_LEN, Prot::READ_WRITE)
            .map_err(|e| guest(&e))?;
        let record = process
            .mmap(4096, Prot::READ_WRITE)
            .map_err(|e| guest(&e))?;
        let pasid = vm.bind(&process)?;
        let fill = Operation::Fill {
            pattern: u64::from_ne_bytes([byte; 8]),
            dst: buf.0,
            size: KEEPER_LEN as u32,
        };
        let rec = vm.run(&process, pasid, fill, record)?;
        if rec.status != CompletionStatus::Success {
            return Err(StackError::Guest(format!("the keeper fill: {rec:?}")));
        }
        let keeper = Keeper { process, buf, byte };
        keeper.check()?;
        Ok(keeper)
    }

    /// The bytes checked, or an error if one changed.
    fn check(&self) -> Result<u64, StackError> {
        let mut got = vec![0u8; KEEPER_LEN as usize];
        self.process
            .read(self.buf, &mut got)
            .map_err(|e| StackError::Guest(e.to_string()))?;
        if got.iter().any(|&b| b != self.byte) {
            return Err(StackError::Guest("the keeper buffer changed".into()));
        }
        Ok(KEEPER_LEN)
    }
}

/// `vsva load-worker`: one VM process of `vsva load`, the VM of `vsva vm` looping
/// [`cycle`]. Boots (with a keeper buffer its device fills), runs `load_loop` for
/// `duration` with buffers of 1 to `max_pages` pages, and shuts down. Returns the exit code: 0, or 1 when it could not start.
pub fn load_worker(socket: &Path, seed: u64, duration: Duration, max_pages: u64) -> i32 {
    let started = RemoteVm::connect(socket, 0, LOAD_VM_RAM, None, Uapi::Type1).and_then(|vm| {
        let keeper = Keeper::start(&vm.vmm, (seed as u8) | 1)?;
        Ok((vm, keeper))
    });
    let (vm, keeper) = match started {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vsva load worker: {e}");
            return 1;
        }
    };
    // Between cycles the VM holds the keeper's PASID, allocated and bound.
    load_loop(
        seed,
        duration,
        max_pages,
        &|| vm.host_gone(),
        &mut |rng, pages| cycle(&vm.vmm, rng, pages).map_err(|e| e.to_string()),
        &|| keeper.check().map_err(|e| e.to_string()),
        &|| vm.link().take_timings(),
        Held::load_vm(LOAD_VM_RAM, 1),
    );
    drop(keeper);
    match vm.shutdown() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vsva load worker: shutting down: {e}");
            2
        }
    }
}

/// The loop of a `vsva load` VM process, on either host IOMMU: prints `ready`, runs
/// `cycle` (which returns the bytes it verified) with 1 to `max_pages` pages (random, from
/// `seed`) until `duration` has passed or the host is gone, and checks the keeper buffer
/// with `keeper`; a failed cycle or check is an error in the report, and the loop goes
/// on. Then prints `report <json>`: a [`WorkerReport`] with the link's [`Timings`] and
/// what the VM holds on the host (`held`), and waits for stdin to close (the VM then
/// shuts down).
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_loop(
    seed: u64,
    duration: Duration,
    max_pages: u64,
    host_gone: &dyn Fn() -> bool,
    cycle: &mut dyn FnMut(&mut StdRng, u64) -> Result<u64, String>,
    keeper: &dyn Fn() -> Result<u64, String>,
    timings: &dyn Fn() -> Timings,
    held: Held,
) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = WorkerReport::default();
    let end = Instant::now() + duration;
    while Instant::now() < end && !host_gone() {
        let pages = rng.random_range(1..=max_pages.max(1));
        match cycle(&mut rng, pages) {
            Ok(bytes) => {
                report.cycles += 1;
                report.bytes_verified += bytes;
            }
            Err(e) => {
                report.errors += 1;
                if report.messages.len() < 5 {
                    report.messages.push(e);
                }
            }
        }
    }
    match keeper() {
        Ok(n) => report.keeper_bytes = n,
        Err(e) => {
            report.errors += 1;
            report.messages.push(e);
        }
    }
    let t = timings();
    report.fwd_inv_ns = t.fwd_inv;
    report.prq_ns = t.prq;
    report.held = held;
    let json = serde_json::to_string(&report).expect("a serialisable report");
    let _ = writeln!(out, "report {json}");
    let _ = out.flush();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{Host, Vm};

    #[test]
    fn the_split_demo_counts_the_host_s_strict_violations_and_leaks_as_errors() {
        let baseline = HostState {
            connections: 1,
            pasids: 3,
            ..HostState::default()
        };
        let mut lines = Vec::new();
        let mut log = |l: String| lines.push(l);
        let clean = judge_host(&baseline, &baseline, &mut log);
        assert_eq!((clean.leaks, clean.stale_translations), (0, 0));
        assert!(clean.left.is_empty());
        // Violations are counted, and are no leak: the holdings are the baseline's.
        let strict = HostState {
            strict_violations: 2,
            ..baseline
        };
        let v = judge_host(&strict, &baseline, &mut log);
        assert_eq!((v.leaks, v.stale_translations), (0, 2));
        assert!(v.left.is_empty());
        // A PASID left behind is a leak, named in the holdings.
        let leaked = HostState {
            pasids: 4,
            ..baseline
        };
        let v = judge_host(&leaked, &baseline, &mut log);
        assert_eq!((v.leaks, v.stale_translations, v.left.pasids), (1, 0, 1));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("strict mode found 2 stale translations"));
        assert!(lines[1].contains("still holds"));
    }

    #[test]
    fn the_loop_binds_copies_verifies_invalidates_and_unbinds_leaving_no_pasid() {
        let host = Host::new(1 << 30, true).unwrap();
        let vm = Vm::new(&host, 0, 64 << 20, vsva_host::pasid::DEFAULT_QUOTA).unwrap();
        let pasids = || host.pasids.lock().unwrap().total_allocated();
        let before = pasids();
        let r = workload_loop(&vm, 7, Duration::from_millis(200), 8);
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.cycles > 0 && r.bytes_verified >= r.cycles * 4096, "{r:?}");
        // Each cycle unbound its PASID, and every unmap was forwarded to the host.
        assert_eq!(pasids(), before);
        let s = vm.viommu.stats();
        assert_eq!((s.binds, s.unbinds, s.host_errors), (r.cycles, r.cycles, 0));
        assert!(s.invalidations_forwarded >= r.cycles, "{s:?}");
        assert!(host.iommu.take_stale_translations().is_empty());
        vm.shutdown().unwrap();
    }

    /// Runs `vm`'s cross-VM phase on `input`; its answers without the prefix.
    fn phase(
        vm: &Vmm,
        jobs: &[demo::Job],
        targets: &[Target],
        input: &str,
        report: &mut VmReport,
    ) -> Vec<String> {
        let mut out = Vec::new();
        cross_vm_phase(
            vm,
            Uapi::Type1,
            jobs,
            targets,
            &mut input.as_bytes(),
            &mut out,
            report,
        );
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| {
                l.strip_prefix(CROSS_VM)
                    .expect("every line is an answer")
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn the_cross_vm_phase_answers_each_command_and_refuses_what_it_cannot_follow() {
        let host = Host::new(1 << 30, true).unwrap();
        let a = Vm::new(&host, 0, 64 << 20, vsva_host::pasid::DEFAULT_QUOTA).unwrap();
        let b = Vm::new(&host, 1, 64 << 20, vsva_host::pasid::DEFAULT_QUOTA).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let bar = indicatif::ProgressBar::hidden();
        let (mut ra, mut rb) = (VmReport::default(), VmReport::default());
        let ja = demo::vm_workload(&a, 1, 4096, &mut rng, &mut ra, &bar);
        let jb = demo::vm_workload(&b, 1, 4096, &mut rng, &mut rb, &bar);
        assert!(
            ra.errors.is_empty() && rb.errors.is_empty(),
            "{ra:?} {rb:?}"
        );
        let ta: Vec<Target> = ja.iter().map(|j| j.target(0)).collect();
        let tb: Vec<Target> = jb.iter().map(|j| j.target(1)).collect();

        // The victim marks and checks its buffer; a check takes the mark with it.
        let got = phase(&b, &jb, &tb, "mark 0\ncheck 0\ncheck 0\n", &mut rb);
        let ready = format!("ready {}", serde_json::to_string(&tb).unwrap());
        assert_eq!(
            got,
            [&ready, "marked", "unchanged true", "unchanged false"],
            "{rb:?}"
        );
        assert!(rb.errors.is_empty(), "{rb:?}");

        // The attacker: over type1, three container refusals and the device's; then what
        // it cannot follow is an error each, and nothing after `end` is read.
        let attack = format!("attack {}", serde_json::to_string(&tb[0]).unwrap());
        let input =
            format!("{attack}\njudge true\nmark 9\njudge true\nattack {{\nfly\nend\nmark 0\n");
        let got = phase(&a, &ja, &ta, &input, &mut ra);
        assert_eq!(got.len(), 7, "{got:?}");
        assert_eq!(&got[1..3], ["attacked", "judged"]);
        assert!(got[3..].iter().all(|l| l.starts_with("error ")), "{got:?}");
        assert_eq!(ra.cross_vm_refusals, 4, "{ra:?}");
        assert_eq!(ra.errors.len(), 4, "{ra:?}");
        // The victim's bytes did not change.
        assert!(jb[0].intact().unwrap());

        drop((ja, jb));
        a.shutdown().unwrap();
        b.shutdown().unwrap();
    }
}
