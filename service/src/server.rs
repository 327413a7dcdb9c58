//! `vsva host`: the host as a service. One [`Service`] owns host memory, the IOMMU model
//! (VT-d, or SMMUv3 with its interrupt thread: [`IommuArch`]), its driver and the PASID
//! allocator; every connection is one open uAPI file, served on its own thread. Connections share no lock on the translation path: each file locks
//! only itself, and the IOMMU model and host memory are shared as they are in one process.
//!
//! A connection that closes, for whatever reason (exit, SIGKILL, a protocol error), loses
//! exactly what it held: its file is closed (the container unbinds, unmaps and frees its
//! PASIDs), then its memory windows return to the host.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vsva_host::driver::HostIommu;
use vsva_host::iommufd::map_file::{FilePages, Inode, MemoryFiles};
use vsva_host::iommufd::IommufdError;
use vsva_host::smmu::SmmuHost;
use vsva_host::{pasid::PasidAllocator, pasid::DEFAULT_QUOTA};
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN};
use vsva_hw::dma::{DmaEngine, DmaEngineConfig, DmaError, DmaPort};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::smmuv3::{Smmu, SmmuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory};
use vsva_uapi::error::Errno;
use vsva_vtd::{addr::Hpa, addr::SourceId};

use crate::fault::EventfdNotifier;
use crate::iommufd::IommufdKind;
use crate::kind::{Domains, FileArg, FileKind, Holdings, ServedFile, VfioContainerKind};
use crate::protocol::{
    decode_header, decode_request, host_doorbell, FrameError, HostState, Kind, Reply, Request,
    Welcome, CONNECTIONS_FULL, ERROR_REPLY, FILE_IOMMUFD, FILE_VFIO_CONTAINER, HEADER_LEN, MAGIC,
    MAX_IN_FLIGHT, MAX_PAYLOAD, RUN_RECORDS_MAX, VERSION, WELCOME_RING,
};
use crate::ring::{self, HostRing, Ring, RingError};
use crate::socket;

/// Bytes of one fault record of a container's `READ`.
const FAULT_RECORD: usize = std::mem::size_of::<vsva_uapi::vfio::VfioIommuType1Fault>();
// A `DEVICE_RUN` reply with its records fits the call ring's reply slot.
const _: () = assert!(HEADER_LEN + 8 + 8 + RUN_RECORDS_MAX * FAULT_RECORD <= ring::REPLY_MAX);

/// Per-connection limits, so that one client cannot exhaust the host for the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory files a connection may share.
    pub max_windows: u32,
    /// Bytes of memory a connection may share in all.
    pub max_window_bytes: u64,
    /// PASIDs a connection's container may hold.
    pub pasid_quota: u32,
    /// Malformed frames a connection may send before it is closed.
    pub max_bad_frames: u32,
    /// How long a reply may wait for a client that does not read before it is closed.
    pub send_timeout: Duration,
    /// How long a connection's thread polls for the client's next frame after a reply
    /// before it sleeps ([`socket::Poller`]); zero sleeps at once.
    pub spin: Duration,
    /// On a connection with a call ring, how long its thread spins on the ring for the
    /// next request after each reply before it sleeps on the socket ([`ring::SPIN`]).
    pub ring_spin: Duration,
    /// Connections the host serves at once; one more is refused with `EUSERS`.
    pub max_connections: u32,
    /// Connections one client process (by its peer credentials) may hold at once; one
    /// more is refused with `EUSERS`, so one process cannot take every connection.
    pub max_connections_per_process: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_windows: 8,
            max_window_bytes: 1 << 30,
            pasid_quota: DEFAULT_QUOTA,
            max_bad_frames: 64,
            send_timeout: Duration::from_secs(5),
            spin: socket::SPIN,
            ring_spin: ring::SPIN,
            max_connections: 256,
            max_connections_per_process: 64,
        }
    }
}

/// The host IOMMU `vsva host` serves on (`--iommu`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IommuArch {
    /// The physical VT-d model and the host intel-iommu driver; VFIO containers and
    /// iommufd.
    #[default]
    Vtd,
    /// The physical SMMUv3 model and the host arm-smmu-v3 driver with its interrupt
    /// thread; VFIO type1 containers (stage 2 from `MAP_DMA`, the guest's CD table from
    /// `VFIO_IOMMU_ATTACH_PASID_TABLE`) and iommufd (a nest parent, a vIOMMU, vDEVICEs,
    /// nested HWPTs carrying the guest's STEs, vEVENT queues).
    Smmuv3,
}

/// How the host is built.
#[derive(Clone, Copy, Debug)]
pub struct HostConfig {
    /// The host IOMMU.
    pub iommu: IommuArch,
    /// Bytes of (sparse) host memory.
    pub memory: u64,
    /// Per-connection limits.
    pub limits: Limits,
    /// The IOMMU model in strict mode (`vsva host --strict`): every IOTLB hit and every
    /// walk the paging-structure caches shortened is checked against the tables, and a
    /// difference (an invalidation the driver did not make) is a violation, counted in
    /// `STATE` and listed in the exit report.
    pub strict: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            iommu: IommuArch::Vtd,
            memory: 4 << 30,
            limits: Limits::default(),
            strict: false,
        }
    }
}

/// A failure to build the host or to serve.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Host memory could not be created.
    #[error("host memory: {0}")]
    Memory(#[from] vsva_hw::memory::HostMemoryError),
    /// The IOMMU model refused its configuration.
    #[error("IOMMU model: {0}")]
    Iommu(#[from] vsva_hw::iommu::IommuConfigError),
    /// The host VT-d driver failed to initialise.
    #[error("host driver: {0}")]
    Driver(#[from] vsva_host::driver::DriverError),
    /// The host SMMUv3 driver failed to initialise or to take its interrupts.
    #[error("host SMMUv3 driver: {0}")]
    SmmuDriver(#[from] vsva_host::error::HostError),
    /// The socket could not be set up or served.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket's path.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Another host already serves the socket's path.
    #[error("socket {0}: another host is serving it")]
    InUse(String),
}

#[derive(Default)]
struct Counters {
    served: AtomicU64,
    live: AtomicU64,
    peak: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    bad_frames: AtomicU64,
    closed_for_errors: AtomicU64,
    refused: AtomicU64,
    windows: AtomicU64,
    window_bytes: AtomicU64,
}

/// What a host served, reported at teardown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Connections accepted.
    pub connections: u64,
    /// Most connections open at once.
    pub peak_connections: u64,
    /// Requests answered.
    pub requests: u64,
    /// Requests answered with an errno.
    pub errors: u64,
    /// Malformed frames received.
    pub bad_frames: u64,
    /// Connections closed because of malformed traffic.
    pub closed_for_errors: u64,
    /// Connections refused because the host or their process held its limit.
    pub refused: u64,
    /// What the host held after every connection closed.
    pub left: HostState,
    /// What the host held before it served anyone.
    pub baseline: HostState,
    /// Whether the IOMMU model ran in strict mode.
    pub strict: bool,
    /// The strict-mode violations found, as the IOMMU model describes them (the first
    /// [`VIOLATIONS_KEPT`]; `left` counts them all).
    pub violations: Vec<String>,
    /// On an SMMUv3 host, what its interrupt thread served.
    pub smmu_irq: Option<vsva_host::smmu::IrqStats>,
}

impl Report {
    /// Whether the host held at the end what it held at the start (its violations
    /// aside), and strict mode found nothing.
    pub fn clean(&self) -> bool {
        self.left.holds_as(&self.baseline) && self.left.strict_violations == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let leaked = if self.left.holds_as(&self.baseline) {
            "nothing left behind".to_string()
        } else {
            format!(
                "LEFT BEHIND: {:?} (baseline {:?})",
                self.left, self.baseline
            )
        };
        write!(
            f,
            "vsva host: served {} connections (at most {} at once, {} refused), {} requests ({} errors), {} malformed frames ({} connections closed for them); {leaked}",
            self.connections,
            self.peak_connections,
            self.refused,
            self.requests,
            self.errors,
            self.bad_frames,
            self.closed_for_errors
        )?;
        if self.strict {
            match self.left.strict_violations {
                0 => write!(f, "; strict mode clean")?,
                n => write!(f, "; strict mode: {n} VIOLATIONS")?,
            }
            for v in &self.violations {
                write!(f, "\n  strict violation: {v}")?;
            }
            let more = self
                .left
                .strict_violations
                .saturating_sub(self.violations.len() as u64);
            if more > 0 {
                write!(f, "\n  ... and {more} more")?;
            }
        }
        if let Some(irq) = &self.smmu_irq {
            write!(
                f,
                "\nvsva host: SMMUv3 interrupt thread: {} MSIs, {} events, {} page requests, {} queue overflows, {} global errors",
                irq.msis,
                irq.events,
                irq.page_requests,
                irq.event_overflows + irq.priq_overflows,
                irq.gerrors
            )?;
        }
        Ok(())
    }
}

/// A live connection as the host keeps track of it.
struct Live {
    /// Its socket, to wake its thread at teardown.
    waker: OwnedFd,
    /// The client's process id, from the socket's peer credentials.
    pid: i32,
    /// The connection's file, once `HELLO` opened it.
    file: Option<Arc<dyn ServedFile>>,
}

/// The IOMMU model and its host driver.
enum Hardware {
    /// VT-d.
    Vtd {
        iommu: Arc<Iommu>,
        unit: Arc<HostIommu>,
    },
    /// SMMUv3.
    Smmu {
        smmu: Arc<Smmu>,
        host: Arc<SmmuHost>,
    },
}

/// The host: memory, the IOMMU model and its driver, the PASID space, and what it serves.
pub struct Service {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hw: Hardware,
    pasids: Arc<Mutex<PasidAllocator>>,
    kinds: Vec<Arc<dyn FileKind>>,
    limits: Limits,
    /// Shared with the memory file pages the connections' maps hold, which count down as
    /// they go.
    counters: Arc<Counters>,
    /// The live connections, by id.
    live: Mutex<HashMap<u64, Live>>,
    /// Requester ids handed to devices so far (on VT-d each device gets a new one).
    device_ids: AtomicU64,
    /// On an SMMUv3 host, the StreamIDs of [`SMMU_STREAMS`] plugged devices hold.
    streams: Mutex<std::collections::BTreeSet<u32>>,
    /// What strict mode found.
    violations: Mutex<Violations>,
    /// Set when the host stops serving: a connection whose client keeps its call ring
    /// busy (and so never sleeps on the socket the teardown shuts down) closes on it.
    stopping: AtomicBool,
}

/// The StreamIDs of the devices an SMMUv3 host plugs in (`DEVICE_ADD`), probed at start:
/// one level-2 stream table. A device takes the lowest free one and gives it back when its
/// connection closes; with all taken, `DEVICE_ADD` is `ENOSPC`.
pub const SMMU_STREAMS: std::ops::Range<u32> = 0x100..0x200;

/// Strict-mode violations kept for the exit report.
pub const VIOLATIONS_KEPT: usize = 64;

/// The strict-mode violations taken from the IOMMU model so far.
#[derive(Default)]
struct Violations {
    /// All of them.
    count: u64,
    /// The first [`VIOLATIONS_KEPT`], described.
    kept: Vec<String>,
}

impl Service {
    /// Builds the host: `config.memory` bytes of memory, the IOMMU model of
    /// `config.iommu` and its driver (on SMMUv3 with its interrupts taken by the interrupt
    /// thread), the PASID allocator, and the file kinds: VFIO container and iommufd.
    pub fn new(config: &HostConfig) -> Result<Arc<Service>, ServiceError> {
        let mem = HostMemory::new(config.memory)?;
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let pasids = Arc::new(Mutex::new(PasidAllocator::new()));
        let (hw, domains) = match config.iommu {
            IommuArch::Vtd => {
                let iommu = Iommu::new(
                    mem.clone(),
                    IommuConfig {
                        strict: config.strict,
                        ..IommuConfig::default()
                    },
                )?;
                let unit = HostIommu::new(iommu.clone(), frames.clone())?;
                let domains = Domains::Vtd(unit.clone());
                (Hardware::Vtd { iommu, unit }, domains)
            }
            IommuArch::Smmuv3 => {
                let smmu = Arc::new(Smmu::new(
                    mem.clone(),
                    SmmuConfig {
                        strict: config.strict,
                        ..SmmuConfig::default()
                    },
                ));
                let host = SmmuHost::new(smmu.clone(), frames.clone())?;
                host.probe_streams(SMMU_STREAMS)?;
                host.enable_interrupts()?;
                let domains = Domains::Smmu(host.clone());
                (Hardware::Smmu { smmu, host }, domains)
            }
        };
        let mut kinds: Vec<Arc<dyn FileKind>> = vec![Arc::new(VfioContainerKind {
            domains,
            pasids: pasids.clone(),
            quota: config.limits.pasid_quota,
        })];
        kinds.push(Arc::new(match &hw {
            Hardware::Vtd { unit, .. } => IommufdKind::Vtd(unit.clone()),
            Hardware::Smmu { host, .. } => IommufdKind::Smmu(host.clone()),
        }));
        Ok(Arc::new(Service {
            mem,
            frames,
            hw,
            pasids,
            kinds,
            limits: config.limits,
            counters: Arc::default(),
            live: Mutex::new(HashMap::new()),
            device_ids: AtomicU64::new(0),
            streams: Mutex::default(),
            violations: Mutex::default(),
            stopping: AtomicBool::new(false),
        }))
    }

    /// The host SMMUv3 driver, on an SMMUv3 host (for tests and diagnostics: its stream
    /// table, VMIDs and the model's caches).
    pub fn smmu(&self) -> Option<&Arc<SmmuHost>> {
        match &self.hw {
            Hardware::Smmu { host, .. } => Some(host),
            Hardware::Vtd { .. } => None,
        }
    }

    /// Whether the IOMMU model runs in strict mode.
    fn strict(&self) -> bool {
        match &self.hw {
            Hardware::Vtd { iommu, .. } => iommu.strict(),
            Hardware::Smmu { smmu, .. } => smmu.strict(),
        }
    }

    /// The IOMMU model as the DMA engines' port.
    fn dma_port(&self) -> Arc<dyn DmaPort> {
        match &self.hw {
            Hardware::Vtd { iommu, .. } => iommu.clone(),
            Hardware::Smmu { smmu, .. } => smmu.clone(),
        }
    }

    /// Connects a device to the IOMMU model (its ATS invalidations and page responses).
    fn attach_endpoint(&self, engine: &Arc<DmaEngine>) {
        match &self.hw {
            Hardware::Vtd { iommu, .. } => iommu.attach_endpoint(engine.clone()),
            Hardware::Smmu { smmu, .. } => {
                let sid = engine.config().sid;
                smmu.attach_endpoint(u32::from(sid.rid()), engine.clone())
            }
        }
    }

    /// The requester id (StreamID) of a device plugged in now: on VT-d a new one, bus 1
    /// onwards (0x100 + n, while a 16-bit requester id is left); on SMMUv3 the lowest free
    /// one of [`SMMU_STREAMS`]. `ENOSPC` when none is left.
    fn new_device_id(&self) -> Result<SourceId, Errno> {
        let rid = match &self.hw {
            Hardware::Vtd { .. } => {
                let n = self.device_ids.fetch_add(1, Ordering::AcqRel);
                u16::try_from(0x100 + n).map_err(|_| Errno::ENOSPC)?
            }
            Hardware::Smmu { .. } => {
                let mut taken = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
                let sid = SMMU_STREAMS
                    .clone()
                    .find(|s| !taken.contains(s))
                    .ok_or(Errno::ENOSPC)?;
                taken.insert(sid);
                sid as u16
            }
        };
        Ok(SourceId::from_rid(rid))
    }

    /// Gives the StreamID of an unplugged device back (on SMMUv3).
    fn release_device_id(&self, sid: SourceId) {
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&u32::from(sid.rid()));
    }

    /// Disconnects the device `sid` from the IOMMU model.
    fn detach_endpoint(&self, sid: SourceId) {
        match &self.hw {
            Hardware::Vtd { iommu, .. } => iommu.detach_endpoint(sid),
            Hardware::Smmu { smmu, .. } => smmu.detach_endpoint(u32::from(sid.rid())),
        }
    }

    /// Takes what strict mode found from the IOMMU model; the violations so far.
    fn violations(&self) -> std::sync::MutexGuard<'_, Violations> {
        let mut v = self
            .violations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let found: Vec<String> = match &self.hw {
            Hardware::Vtd { iommu, .. } => iommu
                .take_stale_translations()
                .iter()
                .map(ToString::to_string)
                .collect(),
            Hardware::Smmu { smmu, .. } => {
                smmu.take_stale().iter().map(ToString::to_string).collect()
            }
        };
        for stale in found {
            v.count += 1;
            if v.kept.len() < VIOLATIONS_KEPT {
                v.kept.push(stale);
            }
        }
        v
    }

    /// What the host holds now. On an SMMUv3 host the driver's and the model's fields
    /// are the SMMU's: `domain_ids` the VMIDs in use, `devices` the streams a domain
    /// holds, `page_request_routes` those of them whose domain registered a fault sink,
    /// `page_request_sinks` the sinks, `iotlb` the TLB entries, `context_cache` the
    /// configuration cache's STEs and `pasid_cache` its CDs.
    ///
    /// `connections` is read first: a closing connection releases what it held before it
    /// stops being counted, so a state that counts one connection holds nothing of a
    /// connection that was closing when it was read.
    pub fn state(&self) -> HostState {
        let connections = self.counters.live.load(Ordering::Acquire);
        let held = self.holdings();
        let (domain_ids, devices, routes, sinks, iotlb, context_cache, pasid_cache) = match &self.hw
        {
            Hardware::Vtd { iommu, unit } => {
                let (context, pasid) = iommu.cached_entries();
                (
                    unit.domain_ids_in_use(),
                    unit.attached_devices(),
                    unit.page_request_routes(),
                    unit.page_request_sinks(),
                    iommu.iotlb().len(),
                    context,
                    pasid,
                )
            }
            Hardware::Smmu { smmu, host } => {
                let (tlb, stes, cds) = smmu.cached_entries();
                (
                    host.vmids().len(),
                    host.owned_streams().len(),
                    host.fault_routes(),
                    host.fault_sinks(),
                    tlb,
                    stes,
                    cds,
                )
            }
        };
        HostState {
            connections,
            allocated_bytes: self.frames.allocated_bytes(),
            windows: self.counters.windows.load(Ordering::Acquire),
            window_bytes: self.counters.window_bytes.load(Ordering::Acquire),
            pasids: self
                .pasids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .total_allocated() as u64,
            domain_ids: domain_ids as u64,
            devices: devices as u64,
            page_request_routes: routes as u64,
            page_request_sinks: sinks as u64,
            iotlb: iotlb as u64,
            context_cache: context_cache as u64,
            pasid_cache: pasid_cache as u64,
            dma_mappings: held.dma_mappings,
            binds: held.binds,
            page_requests: held.page_requests,
            faults_unread: held.faults_unread,
            strict_violations: self.violations().count,
        }
    }

    /// What the open files hold, together. The files are asked under the lock of the live
    /// connections, so that a closing connection, which forgets its file under the same
    /// lock, is the last to hold it.
    fn holdings(&self) -> Holdings {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.values()
            .filter_map(|l| l.file.as_ref())
            .fold(Holdings::default(), |sum, f| {
                let h = f.holdings();
                Holdings {
                    dma_mappings: sum.dma_mappings + h.dma_mappings,
                    binds: sum.binds + h.binds,
                    page_requests: sum.page_requests + h.page_requests,
                    faults_unread: sum.faults_unread + h.faults_unread,
                }
            })
    }

    /// Records (or, with `None`, forgets) the file connection `id` opened.
    fn set_file(&self, id: u64, file: Option<Arc<dyn ServedFile>>) {
        if let Some(l) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&id)
        {
            l.file = file;
        }
    }

    /// Serves connections on `listener` until `stop` is set, then closes every
    /// connection (each loses what it held), waits for their threads and reports.
    pub fn serve(self: &Arc<Self>, listener: OwnedFd, stop: &AtomicBool) -> Report {
        let baseline = self.state();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut next = 0u64;
        // Refused connections wait here for their first frame, to answer it with EUSERS.
        let mut refused: Vec<(OwnedFd, Instant)> = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let mut fds = vec![rustix::event::PollFd::new(
                &listener,
                rustix::event::PollFlags::IN,
            )];
            fds.extend(
                refused
                    .iter()
                    .map(|(s, _)| rustix::event::PollFd::new(s, rustix::event::PollFlags::IN)),
            );
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            let polled = rustix::event::poll(&mut fds, Some(&timeout));
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop(fds);
            if ready.len() > 1 {
                let mut i = 0;
                refused.retain(|(sock, since)| {
                    i += 1;
                    if ready[i] {
                        refuse(sock);
                        return false;
                    }
                    since.elapsed() < REFUSAL_WAIT
                });
            }
            match polled {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) if !ready[0] => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!("polling the listening socket: {e}");
                    break;
                }
            }
            let sock = match rustix::net::accept_with(&listener, rustix::net::SocketFlags::CLOEXEC)
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            };
            threads.retain(|t| !t.is_finished());
            next += 1;
            let id = next;
            if let Err(e) = rustix::net::sockopt::set_socket_timeout(
                &sock,
                rustix::net::sockopt::Timeout::Send,
                Some(self.limits.send_timeout),
            ) {
                tracing::warn!("connection {id}: send timeout: {e}");
            }
            if !self.admit(id, &sock) {
                // At most so many wait for their answer; the others are closed at once.
                if refused.len() < MAX_REFUSED_WAITING {
                    refused.push((sock, Instant::now()));
                }
                continue;
            }
            let svc = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vsva-conn-{id}"))
                .spawn(move || svc.run_connection(id, sock));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::warn!("connection {id}: no thread: {e}");
                    self.forget(id);
                }
            }
        }
        self.stopping.store(true, Ordering::Release);
        for sock in self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            socket::shutdown(&sock.waker);
        }
        for t in threads {
            let _ = t.join();
        }
        let c = &self.counters;
        Report {
            connections: c.served.load(Ordering::Acquire),
            peak_connections: c.peak.load(Ordering::Acquire),
            requests: c.requests.load(Ordering::Acquire),
            errors: c.errors.load(Ordering::Acquire),
            bad_frames: c.bad_frames.load(Ordering::Acquire),
            closed_for_errors: c.closed_for_errors.load(Ordering::Acquire),
            refused: c.refused.load(Ordering::Acquire),
            left: self.state(),
            baseline,
            strict: self.strict(),
            violations: self.violations().kept.clone(),
            smmu_irq: self.smmu().map(|h| h.irq_stats()),
        }
    }

    /// Registers the new connection `id` if the host and the client's process are under
    /// their connection limits; whether it did.
    fn admit(&self, id: u64, sock: &OwnedFd) -> bool {
        let pid = match rustix::net::sockopt::socket_peercred(sock) {
            Ok(cred) => cred.pid.as_raw_nonzero().get(),
            Err(e) => {
                tracing::warn!("connection {id} refused: no peer credentials: {e}");
                return false;
            }
        };
        let waker = match sock.try_clone() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("connection {id} refused: {e}");
                return false;
            }
        };
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let of_process = live.values().filter(|l| l.pid == pid).count();
        let limits = &self.limits;
        if live.len() >= limits.max_connections as usize
            || of_process >= limits.max_connections_per_process as usize
        {
            drop(live);
            self.counters.refused.fetch_add(1, Ordering::AcqRel);
            tracing::info!(
                "connection {id} of process {pid} refused: {of_process} of its own, {} in all",
                self.counters.live.load(Ordering::Acquire)
            );
            return false;
        }
        live.insert(
            id,
            Live {
                waker,
                pid,
                file: None,
            },
        );
        true
    }

    fn forget(&self, id: u64) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    fn run_connection(self: Arc<Self>, id: u64, sock: OwnedFd) {
        let c = &self.counters;
        c.served.fetch_add(1, Ordering::AcqRel);
        let live = c.live.fetch_add(1, Ordering::AcqRel) + 1;
        c.peak.fetch_max(live, Ordering::AcqRel);
        let mut conn = Connection {
            id,
            svc: &self,
            file: None,
            kind: None,
            windows: Vec::new(),
            pinned: Arc::default(),
            device: None,
            bad_frames: 0,
            given: None,
            ring: None,
        };
        let why = conn.serve(sock.as_fd());
        tracing::debug!("connection {id} closed: {why}");
        drop(conn);
        c.live.fetch_sub(1, Ordering::AcqRel);
        self.forget(id);
    }
}

/// One of a connection's memory windows: a client memory file adopted as host memory.
struct Window {
    /// The client's user address of the window: where `ADD_MEMORY` said it maps the file.
    addr: u64,
    /// The file's device and inode, which find the window again for a file mapping.
    ino: (u64, u64),
    size: u64,
    hpa: Hpa,
    /// The address the host resolves for the window.
    user: u64,
}

/// The memory file pages a connection's file mappings hold (`IOMMU_IOAS_MAP_FILE`): how
/// many and their bytes.
#[derive(Default)]
struct Pinned {
    count: AtomicU64,
    bytes: AtomicU64,
}

struct Connection<'s> {
    id: u64,
    svc: &'s Service,
    file: Option<Arc<dyn ServedFile>>,
    /// The kind of `file`, which names the user addresses its ioctls carry.
    kind: Option<Arc<dyn FileKind>>,
    windows: Vec<Window>,
    /// The memory file pages its file mappings hold, counted in its window limits.
    pinned: Arc<Pinned>,
    /// The connection's passthrough device, if it added one.
    device: Option<Arc<DmaEngine>>,
    bad_frames: u32,
    /// The file descriptor the request being served gives the client.
    given: Option<OwnedFd>,
    /// The call ring the client offered with `HELLO`, if the host took it.
    ring: Option<HostRing>,
}

impl Connection<'_> {
    /// Serves frames until the client closes, the socket fails or the client sends too
    /// many malformed frames; returns why it stopped.
    fn serve(&mut self, sock: std::os::fd::BorrowedFd<'_>) -> String {
        let mut buf = socket::RecvBuffer::default();
        let mut poller = socket::Poller::new(self.svc.limits.spin);
        let mut spinner = ring::Spinner::new(self.svc.limits.ring_spin);
        loop {
            if self.ring.is_some() {
                if self.svc.stopping.load(Ordering::Acquire) {
                    return "the host stops".into();
                }
                match self.ring_request(&mut spinner) {
                    Ok(Some(frame)) => match self.serve_ring(sock, frame) {
                        Ok(()) => continue,
                        Err(why) => return why,
                    },
                    Ok(None) => {}
                    Err(e) => {
                        self.svc
                            .counters
                            .closed_for_errors
                            .fetch_add(1, Ordering::AcqRel);
                        return format!("call ring: {e}");
                    }
                }
            }
            // With a ring, the socket carries doorbells and the calls that pass file
            // descriptors: the ring was spun on already, so the thread sleeps at once.
            let received = match self.ring {
                Some(_) => socket::recv_into(sock, &mut buf),
                None => poller.recv(sock, &mut buf),
            };
            let received = match received {
                Ok(Some(r)) => r,
                Ok(None) => return "closed by the client".into(),
                Err(e) => return format!("receive: {e}"),
            };
            if self.ring.is_some() && is_doorbell(&received) {
                continue;
            }
            let reply = self.handle(received, false);
            // The file descriptor the request gives the client goes with the reply, and is
            // closed here once sent.
            let given = self.given.take();
            let c = &self.svc.counters;
            c.requests.fetch_add(1, Ordering::AcqRel);
            if reply.result.is_err() {
                c.errors.fetch_add(1, Ordering::AcqRel);
            }
            let fds: Vec<_> = given.iter().map(AsFd::as_fd).collect();
            if let Err(e) = socket::send(sock, &reply.encode(), &fds) {
                return format!("send: {e}");
            }
            if self.bad_frames > self.svc.limits.max_bad_frames {
                c.closed_for_errors.fetch_add(1, Ordering::AcqRel);
                return "too many malformed frames".into();
            }
        }
    }

    /// The next request on the call ring: the thread spins for it (bounded,
    /// [`Limits::ring_spin`], only while it can pay off: [`ring::Spinner`]) and, if none
    /// came, publishes that it sleeps and looks once more; `None` when the thread is to sleep on the socket until a doorbell or a frame.
    fn ring_request(&mut self, spinner: &mut ring::Spinner) -> Result<Option<Vec<u8>>, RingError> {
        let ring = self.ring.as_mut().expect("called with a ring");
        ring.set_sleeping(false);
        if let Some(taken) = spinner.wait(|| ring.take().transpose()) {
            return taken.map(Some);
        }
        ring.set_sleeping(true);
        let taken = ring.take()?;
        if taken.is_some() {
            ring.set_sleeping(false);
        }
        Ok(taken)
    }

    /// Serves one request taken from the call ring: its reply goes into the ring, with a
    /// doorbell on the socket if the client sleeps for it. `Err` says why the connection
    /// closes.
    fn serve_ring(
        &mut self,
        sock: std::os::fd::BorrowedFd<'_>,
        frame: Vec<u8>,
    ) -> Result<(), String> {
        let reply = self.handle(
            socket::Received {
                bytes: frame,
                truncated: false,
                fds: Vec::new(),
            },
            true,
        );
        if self.given.take().is_some() {
            tracing::error!("a call on the ring gave a file descriptor; it was closed");
        }
        let c = &self.svc.counters;
        c.requests.fetch_add(1, Ordering::AcqRel);
        if reply.result.is_err() {
            c.errors.fetch_add(1, Ordering::AcqRel);
        }
        let ring = self.ring.as_ref().expect("called with a ring");
        match ring.answer(&reply.encode()) {
            Ok(true) => {
                socket::send(sock, &host_doorbell(), &[]).map_err(|e| format!("send: {e}"))?
            }
            Ok(false) => {}
            Err(e) => return Err(format!("call ring reply: {e}")),
        }
        if self.bad_frames > self.svc.limits.max_bad_frames {
            c.closed_for_errors.fetch_add(1, Ordering::AcqRel);
            return Err("too many malformed frames".into());
        }
        Ok(())
    }

    /// Whether the connection's file is a VFIO container (whose `READ` gives fault records).
    fn is_container(&self) -> bool {
        self.kind
            .as_ref()
            .is_some_and(|k| k.id() == FILE_VFIO_CONTAINER)
    }

    /// Whether the ioctl `cmd` of the connection's file gives the client a file
    /// descriptor (which only a socket frame can carry).
    fn gives_fd(&self, cmd: u32) -> bool {
        self.kind.as_ref().is_some_and(|k| k.id() == FILE_IOMMUFD)
            && crate::iommufd::served(cmd).is_some_and(|s| s.fd_out.is_some())
    }

    fn bad(&mut self, kind: u16, id: u32, e: FrameError) -> Reply {
        self.bad_frames += 1;
        self.svc.counters.bad_frames.fetch_add(1, Ordering::AcqRel);
        tracing::debug!("malformed frame: {e}");
        Reply {
            kind,
            id,
            result: Err(e.errno()),
            data: Vec::new(),
        }
    }

    /// Serves one request frame; `on_ring` when it came through the call ring (and so
    /// carries no file descriptor, and its reply can carry none).
    fn handle(&mut self, received: socket::Received, on_ring: bool) -> Reply {
        let frame = &received.bytes;
        if received.truncated {
            let (kind, id) = reply_to(frame);
            return self.bad(kind, id, FrameError::Oversized);
        }
        let (header, request) = match decode_request(frame) {
            Ok(r) => r,
            Err(e) => {
                let (kind, id) = match e {
                    FrameError::UnknownKind(_) => (ERROR_REPLY, reply_to(frame).1),
                    _ => reply_to(frame),
                };
                return self.bad(kind, id, e);
            }
        };
        let reply = |result: Result<u64, Errno>, data: Vec<u8>| Reply {
            kind: header.kind,
            id: header.id,
            result,
            data,
        };
        let takes_fd = match request {
            Request::AddMemory { .. } | Request::SetEventfd => true,
            Request::Hello { ring, .. } => ring,
            Request::Ioctl { cmd, .. } => self.file_arg(cmd).is_some(),
            _ => false,
        };
        if !takes_fd && !received.fds.is_empty() {
            return reply(Err(Errno::EINVAL), Vec::new());
        }
        let file = match (&request, &self.file) {
            (Request::Hello { .. }, None) => None,
            (Request::Hello { .. }, Some(_)) => {
                return reply(Err(Errno::new(libc::EISCONN)), Vec::new())
            }
            (
                Request::DeviceWrite { .. }
                | Request::DeviceRun {
                    take_records: false,
                }
                | Request::DeviceRegRead { .. }
                | Request::DeviceRegWrite { .. },
                _,
            ) => None,
            (Request::State, _) => None,
            // A doorbell is only taken, unanswered, before a frame is handled; one that
            // comes here (without a ring, or on the ring itself) is malformed.
            (Request::Doorbell, _) => {
                return self.bad(
                    header.kind,
                    header.id,
                    FrameError::Payload {
                        kind: Kind::Doorbell,
                        len: 0,
                    },
                )
            }
            (Request::Ioctl { cmd, .. }, Some(_)) if on_ring && self.gives_fd(*cmd) => {
                return reply(Err(Errno::EINVAL), Vec::new())
            }
            (_, None) => return reply(Err(Errno::new(libc::ENOTCONN)), Vec::new()),
            (_, Some(f)) => Some(f.clone()),
        };
        match (request, file) {
            (
                Request::Hello {
                    min_version,
                    max_version,
                    file,
                    ring,
                },
                _,
            ) => match self.hello(min_version, max_version, file, ring, received.fds) {
                Ok(w) => reply(Ok(0), w.to_bytes()),
                Err(e) => reply(Err(e), Vec::new()),
            },
            (Request::State, _) => reply(Ok(0), self.svc.state().to_bytes()),
            (Request::Ioctl { cmd, arg }, Some(f)) => {
                let mut arg = arg.to_vec();
                let result = match self.file_arg(cmd) {
                    Some(_) => self.map_file(f.as_ref(), &mut arg, received.fds),
                    None => self.ioctl(f.as_ref(), cmd, &mut arg),
                };
                // A failed call gives its argument back too, as the call left it: an
                // ioctl may write it before it fails (HWPT_INVALIDATE's `entry_num`).
                match result {
                    Ok((n, given)) => {
                        self.given = given;
                        reply(Ok(n as u64), arg)
                    }
                    Err(e) => reply(Err(e), arg),
                }
            }
            (Request::Read { count }, Some(f)) => {
                let most = match on_ring {
                    true => ring::REPLY_MAX - HEADER_LEN - 8,
                    false => MAX_PAYLOAD - 8,
                };
                let mut buf = vec![0u8; (count as usize).min(most)];
                match f.read(&mut buf) {
                    Ok(n) => {
                        buf.truncate(n);
                        reply(Ok(n as u64), buf)
                    }
                    Err(e) => reply(Err(e), Vec::new()),
                }
            }
            (Request::Write(bytes), Some(f)) => reply(f.write(bytes).map(|n| n as u64), Vec::new()),
            (Request::AddMemory { addr, size }, Some(_)) => {
                let mut fds = received.fds;
                let result = match fds.len() {
                    1 => self.add_memory(addr, size, fds.remove(0)),
                    _ => Err(Errno::EINVAL),
                };
                reply(result.map(|_| 0), Vec::new())
            }
            (Request::SetEventfd, Some(f)) => {
                let mut fds = received.fds;
                let result = match fds.len() {
                    0 => {
                        f.set_event_notifier(None);
                        Ok(0)
                    }
                    1 => {
                        let fd = fds.remove(0);
                        if is_eventfd(&fd) {
                            f.set_event_notifier(Some(Arc::new(EventfdNotifier(fd))));
                            Ok(0)
                        } else {
                            Err(Errno::EINVAL)
                        }
                    }
                    _ => Err(Errno::EINVAL),
                };
                reply(result, Vec::new())
            }
            (Request::DeviceAdd, Some(f)) => match self.add_device(f.as_ref()) {
                Ok((rid, data)) => reply(Ok(rid), data),
                Err(e) => reply(Err(e), Vec::new()),
            },
            (Request::DeviceWrite { offset, descriptor }, _) => {
                let result = match &self.device {
                    None => Err(Errno::ENODEV),
                    Some(d) => d.portal_write(offset, descriptor).map(|()| 0).map_err(|e| {
                        tracing::debug!("portal write: {e}");
                        Errno::EINVAL
                    }),
                };
                reply(result, Vec::new())
            }
            (Request::DeviceRun { take_records }, file) => match &self.device {
                None => reply(Err(Errno::ENODEV), Vec::new()),
                Some(_) if take_records && !self.is_container() => {
                    reply(Err(Errno::EINVAL), Vec::new())
                }
                Some(d) => {
                    let done = d.process() as u64;
                    let waiting = d.waiting_for_page_response() as u64;
                    let mut data = done.to_le_bytes().to_vec();
                    if let Some(f) = file.filter(|_| take_records && waiting > 0) {
                        // As `READ` takes them; records the read leaves stay queued.
                        let mut records = vec![0u8; RUN_RECORDS_MAX * FAULT_RECORD];
                        if let Ok(n) = f.read(&mut records) {
                            data.extend_from_slice(&records[..n]);
                        }
                    }
                    reply(Ok(waiting), data)
                }
            },
            (Request::DeviceRegRead { offset }, _) => {
                match self.device.as_ref().map(|d| d.mmio_read(offset)) {
                    None => reply(Err(Errno::ENODEV), Vec::new()),
                    Some(Ok(value)) => reply(Ok(0), value.to_le_bytes().to_vec()),
                    Some(Err(e)) => reply(Err(register_errno(e)), Vec::new()),
                }
            }
            (Request::DeviceRegWrite { offset, value }, _) => {
                let result = match &self.device {
                    None => Err(Errno::ENODEV),
                    Some(d) => d
                        .mmio_write(offset, value)
                        .map(|()| 0)
                        .map_err(register_errno),
                };
                reply(result, Vec::new())
            }
            // A doorbell was answered as malformed above.
            (Request::Doorbell, _) | (_, None) => {
                reply(Err(Errno::new(libc::ENOTCONN)), Vec::new())
            }
        }
    }

    /// Plugs a PASID-capable DMA engine (ATS, PRI) into the host under a new requester id
    /// and attaches it to the file (a container's domain; bound, for an iommufd); returns
    /// the requester id and what the file says of the device.
    fn add_device(&mut self, file: &dyn ServedFile) -> Result<(u64, Vec<u8>), Errno> {
        if self.device.is_some() {
            return Err(Errno::EEXIST);
        }
        let sid = self.svc.new_device_id()?;
        let rid = sid.rid();
        let engine = Arc::new(
            DmaEngine::new(DmaEngineConfig::new(sid), self.svc.dma_port()).map_err(|_| {
                self.svc.release_device_id(sid);
                Errno::EINVAL
            })?,
        );
        if engine
            .enable(CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN)
            .is_err()
        {
            self.svc.release_device_id(sid);
            return Err(Errno::EINVAL);
        }
        self.svc.attach_endpoint(&engine);
        let data = match file.attach_device(sid) {
            Ok(d) => d,
            Err(e) => {
                self.svc.detach_endpoint(sid);
                self.svc.release_device_id(sid);
                return Err(e);
            }
        };
        self.device = Some(engine);
        Ok((u64::from(rid), data))
    }

    /// Opens the connection's file of kind `kind`; with `ring`, first maps the call ring
    /// file, the one fd in `fds` (`EINVAL`, and nothing opened, for anything but a memfd
    /// of [`ring::RING_BYTES`] that takes the seals against resizing).
    fn hello(
        &mut self,
        min: u16,
        max: u16,
        kind: u32,
        ring: bool,
        mut fds: Vec<OwnedFd>,
    ) -> Result<Welcome, Errno> {
        if !(min..=max).contains(&VERSION) {
            return Err(Errno::new(libc::EPROTONOSUPPORT));
        }
        let kind = self
            .svc
            .kinds
            .iter()
            .find(|k| k.id() == kind)
            .ok_or(Errno::ENODEV)?
            .clone();
        let ring = match (ring, fds.len()) {
            (false, _) => None,
            (true, 1) => Some(HostRing::new(Ring::adopt(fds.remove(0)).map_err(|e| {
                tracing::debug!("call ring refused: {e}");
                Errno::EINVAL
            })?)),
            (true, _) => return Err(Errno::EINVAL),
        };
        let file = kind.open()?;
        let flags = if ring.is_some() { WELCOME_RING } else { 0 };
        self.ring = ring;
        self.svc.set_file(self.id, Some(file.clone()));
        self.file = Some(file);
        self.kind = Some(kind);
        Ok(Welcome {
            version: VERSION,
            flags,
            max_payload: MAX_PAYLOAD as u32,
            max_in_flight: MAX_IN_FLIGHT,
            max_windows: self.svc.limits.max_windows,
            max_window_bytes: self.svc.limits.max_window_bytes,
        })
    }

    /// How the ioctl `cmd` names a memory file, if it does.
    fn file_arg(&self, cmd: u32) -> Option<FileArg> {
        self.kind.as_ref().and_then(|k| k.file_arg(cmd))
    }

    /// An ioctl, with the user address its argument carries (if any) translated from the
    /// client's windows to the host's; an address outside them is `EFAULT` and the file
    /// never sees it. The client gets its own address back.
    fn ioctl(
        &self,
        file: &dyn ServedFile,
        cmd: u32,
        arg: &mut [u8],
    ) -> Result<(usize, Option<OwnedFd>), Errno> {
        let kind = self.kind.as_ref().ok_or(Errno::new(libc::ENOTCONN))?;
        let range = kind.user_range(cmd, arg)?;
        let Some(range) = range else {
            return file.ioctl_giving_fd(cmd, arg);
        };
        let field = range.at..range.at + 8;
        let addr = u64::from_le_bytes(arg[field.clone()].try_into().expect("8 bytes"));
        let host = match self.translate(addr, range.len) {
            Some(host) => host,
            None if range.len == 0 && range.empty_ok => 0,
            None => return Err(Errno::EFAULT),
        };
        arg[field.clone()].copy_from_slice(&host.to_le_bytes());
        let result = file.ioctl_giving_fd(cmd, arg);
        arg[field].copy_from_slice(&addr.to_le_bytes());
        result
    }

    /// The host address of the client's `[addr, addr + len)`, when it lies in one window.
    fn translate(&self, addr: u64, len: u64) -> Option<u64> {
        self.windows.iter().find_map(|w| {
            let off = addr.checked_sub(w.addr)?;
            (off.checked_add(len)? <= w.size).then_some(w.user + off)
        })
    }

    fn add_memory(&mut self, addr: u64, size: u64, fd: OwnedFd) -> Result<(), Errno> {
        const PAGE: u64 = vsva_hw::memory::PAGE_SIZE;
        if size == 0 || size % PAGE != 0 || addr % PAGE != 0 || addr.checked_add(size).is_none() {
            return Err(Errno::EINVAL);
        }
        if self
            .windows
            .iter()
            .any(|w| addr < w.addr + w.size && w.addr < addr + size)
        {
            return Err(Errno::EEXIST);
        }
        self.adopt(addr, size, fd)
    }

    /// `ENOSPC` unless `size` more bytes in one more window fit the connection's window
    /// limits, with the memory file pages its file mappings hold.
    fn room_for(&self, size: u64) -> Result<(), Errno> {
        let limits = &self.svc.limits;
        let count = self.windows.len() as u64 + self.pinned.count.load(Ordering::Acquire);
        let used = self.windows.iter().map(|w| w.size).sum::<u64>()
            + self.pinned.bytes.load(Ordering::Acquire);
        if count >= u64::from(limits.max_windows)
            || used.saturating_add(size) > limits.max_window_bytes
        {
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }

    /// Adopts the first `size` bytes of the memory file `fd` as a window of host memory
    /// (its own pages, [`vsva_hw::memory::HostMemory::adopt_window`]), within the connection's
    /// window limits (`ENOSPC`); a file that is not a sealable memfd holding `size` bytes
    /// is `EINVAL`.
    fn adopt(&mut self, addr: u64, size: u64, fd: OwnedFd) -> Result<(), Errno> {
        const PAGE: u64 = vsva_hw::memory::PAGE_SIZE;
        self.room_for(size)?;
        let stat = rustix::fs::fstat(&fd).map_err(|_| Errno::EINVAL)?;
        let ino = (stat.st_dev as u64, stat.st_ino as u64);
        // Sealing the file against shrinking keeps it from being truncated under the host's
        // mapping; a file that cannot take the seal (not a memfd, or sealed shut without
        // it) is refused by the adoption below.
        let _ = rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::SHRINK);
        let file = File::from(fd);
        let hpa = self
            .svc
            .frames
            .alloc_range(size, PAGE)
            .map_err(|_| Errno::ENOMEM)?;
        match self.svc.mem.adopt_window(hpa, &file, 0, size) {
            Ok(user) => {
                self.windows.push(Window {
                    addr,
                    ino,
                    size,
                    hpa,
                    user,
                });
                let c = &self.svc.counters;
                c.windows.fetch_add(1, Ordering::AcqRel);
                c.window_bytes.fetch_add(size, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                tracing::debug!("memory window refused: {e}");
                if let Err(e) = self.svc.frames.free(hpa) {
                    tracing::error!("freeing a refused window's frames: {e}");
                }
                Err(Errno::EINVAL)
            }
        }
    }
}

impl Connection<'_> {
    /// Returns a window to host memory and frees its frames.
    fn release(&self, w: Window) {
        if let Err(e) = self.svc.mem.return_window(w.hpa, w.size) {
            tracing::error!("returning a window at {}: {e}", w.hpa);
            return;
        }
        if let Err(e) = self.svc.frames.free(w.hpa) {
            tracing::error!("freeing a window at {}: {e}", w.hpa);
        }
        let c = &self.svc.counters;
        c.windows.fetch_sub(1, Ordering::AcqRel);
        c.window_bytes.fetch_sub(w.size, Ordering::AcqRel);
    }

    /// A file mapping ioctl (`IOMMU_IOAS_MAP_FILE`): the host file maps the memory file
    /// the frame carries ([`ServedFile::map_file`], the in-process code), through the
    /// connection ([`MemoryFiles`]): a file the connection shared already (same inode) is
    /// found in its window; of another, the range mapped becomes host memory of its own,
    /// which lives until the mapping's last area is unmapped (or the connection closes),
    /// or goes at once if the map fails. More than one file is `EINVAL`.
    fn map_file(
        &mut self,
        file: &dyn ServedFile,
        arg: &mut [u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<(usize, Option<OwnedFd>), Errno> {
        let fd = match fds.len() {
            0 => None,
            1 => Some(fds.remove(0)),
            _ => return Err(Errno::EINVAL),
        };
        file.map_file(arg, fd, self).map(|n| (n, None))
    }
}

/// Where a file mapping of the connection finds its memory: in a window the client shared
/// with `ADD_MEMORY` (the same inode), or in pages of the file made host memory for the
/// mapping, which count in the connection's window limits (and the host's windows) until
/// the mapping's last area goes.
impl MemoryFiles for Connection<'_> {
    fn shared(&self, ino: Inode) -> Option<(u64, u64)> {
        self.windows
            .iter()
            .find(|w| w.ino == ino)
            .map(|w| (w.user, w.size))
    }

    fn pin(&mut self, file: &File, start: u64, length: u64) -> Result<FilePages, IommufdError> {
        self.room_for(length)
            .map_err(|_| IommufdError::NoSpace("memory windows"))?;
        let (pinned, counters) = (self.pinned.clone(), self.svc.counters.clone());
        let released = Box::new(move || {
            pinned.count.fetch_sub(1, Ordering::AcqRel);
            pinned.bytes.fetch_sub(length, Ordering::AcqRel);
            counters.windows.fetch_sub(1, Ordering::AcqRel);
            counters.window_bytes.fetch_sub(length, Ordering::AcqRel);
        });
        let pages = FilePages::adopt(&self.svc.frames, file, start, length, released)?;
        self.pinned.count.fetch_add(1, Ordering::AcqRel);
        self.pinned.bytes.fetch_add(length, Ordering::AcqRel);
        let c = &self.svc.counters;
        c.windows.fetch_add(1, Ordering::AcqRel);
        c.window_bytes.fetch_add(length, Ordering::AcqRel);
        Ok(pages)
    }
}

impl Drop for Connection<'_> {
    /// The client is gone: its file closes first (unbinding, unmapping and freeing what it
    /// set up), then its windows return to host memory and their frames are freed.
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            self.svc.set_file(self.id, None);
            file.set_event_notifier(None);
            if Arc::strong_count(&file) != 1 {
                tracing::error!("a closing connection's file is still referenced");
            }
            drop(file);
        }
        // The container detached the device as it closed; the engine leaves the bus.
        if let Some(engine) = self.device.take() {
            self.svc.detach_endpoint(engine.config().sid);
            self.svc.release_device_id(engine.config().sid);
        }
        for w in std::mem::take(&mut self.windows) {
            self.release(w);
        }
    }
}

/// The errno of a refused register access: `EBUSY` while the engine has work in progress,
/// `EINVAL` otherwise (no register there, read-only bits, a configuration the engine
/// refuses). The access changed nothing.
fn register_errno(e: DmaError) -> Errno {
    tracing::debug!("device register access: {e}");
    match e {
        DmaError::Busy => Errno::EBUSY,
        _ => Errno::EINVAL,
    }
}

/// The kind and id a reply to a malformed `frame` carries: the frame's own when it has a
/// whole header with the right magic, else [`ERROR_REPLY`] and 0.
fn reply_to(frame: &[u8]) -> (u16, u32) {
    match frame.get(..HEADER_LEN) {
        Some(h) if h[..4] == MAGIC.to_le_bytes() => (
            u16::from_le_bytes([h[6], h[7]]),
            u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")),
        ),
        _ => (ERROR_REPLY, 0),
    }
}

/// How long a refused connection's first frame is waited for.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);
/// Refused connections waiting for their first frame at once.
const MAX_REFUSED_WAITING: usize = 64;

/// Answers the first frame of a refused connection with [`CONNECTIONS_FULL`] (the
/// connection is closed when the caller drops it).
fn refuse(sock: &OwnedFd) {
    let Ok(Some(received)) = socket::recv_nowait(sock.as_fd()) else {
        return;
    };
    let (kind, id) = match decode_header(&received.bytes) {
        Ok(h) => (h.kind, h.id),
        Err(_) => (ERROR_REPLY, 0),
    };
    let refusal = Reply {
        kind,
        id,
        result: Err(CONNECTIONS_FULL),
        data: Vec::new(),
    };
    if let Err(e) = socket::send_nowait(sock.as_fd(), &refusal.encode()) {
        tracing::debug!("a refusal was not sent: {e}");
    }
}

/// Whether `received` is a client's doorbell (a well-formed `DOORBELL` without fds).
fn is_doorbell(received: &socket::Received) -> bool {
    received.fds.is_empty()
        && !received.truncated
        && matches!(decode_request(&received.bytes), Ok((_, Request::Doorbell)))
}

/// Whether `fd` is an eventfd (anything else, a pipe say, could block the thread that
/// reports a fault).
fn is_eventfd(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|p| p.as_os_str() == "anon_inode:[eventfd]")
}

/// Where `vsva host` listens: binds `path` (0600), refusing a path another host serves and
/// replacing a stale socket a dead host left.
pub fn bind_socket(path: &Path) -> Result<OwnedFd, ServiceError> {
    let err = |source| ServiceError::Socket {
        path: path.display().to_string(),
        source,
    };
    if path.exists() {
        if socket::connect(path).is_ok() {
            return Err(ServiceError::InUse(path.display().to_string()));
        }
        use std::os::unix::fs::FileTypeExt;
        let stale = std::fs::symlink_metadata(path).map_err(err)?;
        if !stale.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    socket::listen(path).map_err(err)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

/// Sets a flag on SIGTERM and SIGINT, and returns it.
pub fn stop_on_signals() -> &'static AtomicBool {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // sigaction structure is fully initialised (zeroed, then the handler set).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    &STOP
}

/// `vsva host`: builds the host, serves `path` until SIGTERM or SIGINT, tears down and
/// returns the report.
pub fn run(path: &Path, config: &HostConfig) -> Result<Report, ServiceError> {
    let stop = stop_on_signals();
    let service = Service::new(config)?;
    let listener = bind_socket(path)?;
    let report = service.serve(listener, stop);
    let _ = std::fs::remove_file(path);
    Ok(report)
}
