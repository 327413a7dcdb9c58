//! The guest's VT-d driver, modelled on Linux's intel-iommu (v5.10) in scalable mode.
//!
//! It programs a remapping unit through its registers ([`Mmio`]) and guest RAM, the way
//! the Linux driver does: it reads CAP/ECAP, sets up queued invalidation with 256-bit
//! descriptors, latches a scalable-mode root table, sets up the page request queue, and
//! enables translation ([`IommuDriver::init`]). Devices get a scalable-mode context entry
//! with their PASID directory ([`IommuDriver::attach_device`]). Shared virtual addressing
//! binds a [`Process`](crate::process::Process) to a PASID of a device with a first-level PASID
//! entry pointing at the process's page tables (`svm`), keeps the IOMMU and device TLBs
//! coherent with the process's tables through an mmu notifier, and serves the device's
//! page requests by faulting pages into the process (`prq`).
//!
//! Every invalidation is submitted as Linux's `qi_submit_sync` does: the descriptor, then
//! an invalidation wait descriptor whose status write the driver polls (`qi`). The queue,
//! its error recovery, the page request ring, entry writes and the register handshakes are
//! the host's too: `vsva_vtd_driver`; what is the guest's own is the SVA policy.
//!
//! The unit may be the physical IOMMU model (a guest on bare metal) or the vIOMMU.

mod prq;
mod qi;
mod svm;
#[cfg(test)]
mod tests;

use foldhash::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vsva_mem::MemError;
use vsva_mem::PhysMem;

use vm_memory::GuestMemoryMmap;
use vsva_vtd::inv_desc::{ContextCacheGranularity, InvDescError};
use vsva_vtd::regs::layout::{event_control, fsts, gcmd, gsts, offset, vcmd};
use vsva_vtd::regs::{Cap, Ecap, FaultRecord};
use vsva_vtd::{
    addr::DomainId, addr::Gpa, addr::Pasid, addr::SourceId, context::ScalableContextEntry,
    inv_desc::InvDesc, regs::RegError, slpte::SlLevels,
};
use vsva_vtd_driver::inv::{dev_iotlb, with_queue_depth, MAX_INVS_PEND};
use vsva_vtd_driver::tables::{clear_entry, write_entry, ContextTables, PasidTables, TableFrames};
use vsva_vtd_driver::{
    take_fault_records, GlobalCommand, InvalidationQueue, PageRequestRing, Registers,
};

use crate::frames::{FrameError, GuestFrames};
use svm::{PasidAllocator, Svm};

pub use svm::FLPT_DEFAULT_DID;

/// Register access to a remapping unit: 4- or 8-byte reads and writes at offsets of its
/// register page. Like real MMIO, an access cannot fail; a bad one reads as whatever the
/// unit returns.
pub trait Mmio: Send + Sync {
    /// Reads `size` bytes at `offset`.
    fn read(&self, offset: u64, size: usize) -> u64;
    /// Writes the low `size` bytes of `value` at `offset`.
    fn write(&self, offset: u64, size: usize, value: u64);
}

/// The unit's registers as the shared driver reaches them.
struct Regs<'a>(&'a dyn Mmio);

impl Registers for Regs<'_> {
    fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        Ok(self.0.read(offset, size))
    }

    fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
        self.0.write(offset, size, value);
        Ok(())
    }
}

/// The MSI address the driver programs for its event interrupts (the local APIC window).
pub const MSI_ADDRESS: u32 = 0xfee0_0000;
/// The vector (MSI data) of the fault event.
pub const FAULT_VECTOR: u32 = 0x40;
/// The vector of the page request event.
pub const PAGE_REQUEST_VECTOR: u32 = 0x41;

/// Why a driver operation failed. A failed operation leaves the unit and the tables as
/// they were, except where the variant says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestIommuError {
    /// The unit lacks a capability the operation needs.
    #[error("the remapping unit does not support {0}")]
    Unsupported(&'static str),
    /// The hardware did not complete a command (the named register never showed it).
    #[error("the remapping unit did not complete {0}")]
    Timeout(&'static str),
    /// The invalidation queue stopped on an error (FSTS.IQE, with IQERCD.IQEI); the driver
    /// replaced the offending descriptor and restarted the queue. The table change the
    /// invalidation was for has been made; the unit's caches may still hold old entries.
    #[error("invalidation queue error (IQEI {iqei})")]
    InvalidationQueue {
        /// IQERCD.IQEI: why the unit refused the descriptor (VT-d 10.4.33).
        iqei: u8,
    },
    /// A device did not complete a device-TLB invalidation (FSTS.ITE), on every
    /// resubmission of its batch.
    #[error("device-TLB invalidation timed out")]
    InvalidationTimeout,
    /// A descriptor could not be encoded.
    #[error(transparent)]
    Descriptor(#[from] InvDescError),
    /// The device is already attached.
    #[error("device {0} is already attached")]
    AlreadyAttached(SourceId),
    /// The device is not attached.
    #[error("device {0} is not attached")]
    NotAttached(SourceId),
    /// The device has PASIDs bound and cannot be detached.
    #[error("device {0} still has bound PASIDs")]
    Busy(SourceId),
    /// The device cannot issue requests with PASID (or the unit cannot take them).
    #[error("device {0} has no PASID support")]
    NoPasidSupport(SourceId),
    /// No PASID is left.
    #[error("no PASID available")]
    NoPasid,
    /// The virtual command interface answered with an unexpected status code.
    #[error("virtual command failed with status code {0}")]
    VirtualCommand(u8),
    /// The PASID does not fit the device's PASID directory.
    #[error("{pasid} is beyond the PASID directory of {sid}")]
    PasidOutOfRange {
        /// The device.
        sid: SourceId,
        /// The PASID.
        pasid: Pasid,
    },
    /// The PASID entry is already in use.
    #[error("the PASID entry of {pasid} on {sid} is already present")]
    PasidBusy {
        /// The device.
        sid: SourceId,
        /// The PASID.
        pasid: Pasid,
    },
    /// The device has no binding of that PASID.
    #[error("{pasid} is not bound on {sid}")]
    NotBound {
        /// The device.
        sid: SourceId,
        /// The PASID.
        pasid: Pasid,
    },
    /// Guest frames ran out.
    #[error(transparent)]
    Frames(#[from] FrameError),
    /// Guest RAM refused an access.
    #[error(transparent)]
    Memory(#[from] MemError),
    /// The shared driver machinery failed in a way with no variant of its own here.
    #[error(transparent)]
    Driver(vsva_vtd_driver::Error),
}

impl From<vsva_vtd_driver::Error> for GuestIommuError {
    fn from(e: vsva_vtd_driver::Error) -> Self {
        use vsva_vtd_driver::Error as E;
        match e {
            E::Memory(m) => GuestIommuError::Memory(m),
            E::Descriptor(d) => GuestIommuError::Descriptor(d),
            E::QueueError { iqei, .. } => GuestIommuError::InvalidationQueue { iqei: iqei as u8 },
            E::InvalidationTimeout => GuestIommuError::InvalidationTimeout,
            E::QueueTimeout => GuestIommuError::Timeout("invalidation wait status"),
            E::StatusTimeout(what) => GuestIommuError::Timeout(what),
            other @ (E::Register(_) | E::PageRequest(_)) => GuestIommuError::Driver(other),
        }
    }
}

/// What a device can do, from its PCI capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceConfig {
    /// The requester id.
    pub sid: SourceId,
    /// Max PASID width of the PASID capability; 0 without one.
    pub pasid_bits: u8,
    /// ATS capability (a device TLB).
    pub ats: bool,
    /// PRI capability (page requests).
    pub pri: bool,
    /// The ATS capability's Invalidate Queue Depth field (PCIe ATS; 0 means 32), which
    /// device-TLB invalidations carry as MIP.
    pub ats_queue_depth: u8,
}

/// The driver's work counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Invalidation descriptors submitted (context-cache, IOTLB, PASID-cache, PASID-based
    /// IOTLB and device-TLB), waits and page group responses not included.
    pub invalidations: u64,
    /// Of those, the ones asked for by mmu notifiers (munmap, mprotect).
    pub range_invalidations: u64,
    /// Invalidation wait descriptors submitted (one per synchronous submission).
    pub waits: u64,
    /// Page request descriptors taken from the page request queue.
    pub page_requests: u64,
    /// Of those, the ones answered with Success.
    pub page_requests_served: u64,
    /// Page group responses submitted.
    pub page_responses: u64,
}

/// Read at any time by [`IommuDriver::stats`]. `invalidations` and `waits` are written
/// with the queue's lock held, the page request counters with `prq_lock` held: one
/// writer at a time, counted by [`bump_held`]; `range_invalidations` with no lock.
#[derive(Default)]
struct Counters {
    invalidations: AtomicU64,
    range_invalidations: AtomicU64,
    waits: AtomicU64,
    page_requests: AtomicU64,
    page_requests_served: AtomicU64,
    page_responses: AtomicU64,
}

/// Adds `n` to a counter whose writers a lock the caller holds serialises (see
/// [`Counters`]): a load and a store, no locked add; readers see the value before or after.
fn bump_held(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// What the driver knows about an attached device (Linux's `device_domain_info` and
/// `pasid_table`).
#[derive(Clone, Copy, Debug)]
struct Device {
    config: DeviceConfig,
    /// PASIDE set in the context entry.
    pasid: bool,
    /// DTE set: the device's TLB must be invalidated.
    ats: bool,
    /// PRE set: the device sends page requests (`info->pri_enabled`).
    pri: bool,
    /// The PASID directory and the PASID tables under it.
    pasid_tables: PasidTables,
}

impl Device {
    /// The device-TLB invalidation of `2^order` pages at `addr` for requests with `pasid`
    /// (without PASID for `None`), as `qi_flush_dev_iotlb(_pasid)` builds it: PFSID as
    /// `pfsid` gives it, MIP the device's ATS Invalidate Queue Depth (0 from 32 up).
    fn dev_iotlb(&self, ecap: &Ecap, pasid: Option<Pasid>, addr: u64, order: u8) -> InvDesc {
        let qdep = match self.config.ats_queue_depth & 0x1f {
            0 => MAX_INVS_PEND,
            q => q,
        };
        with_queue_depth(dev_iotlb(self.config.sid, ecap, pasid, addr, order), qdep)
    }
}

/// foldhash maps: their keys are the driver's own requester ids and PASIDs, looked up on
/// every flush, so std's SipHash (resistance to chosen keys) buys nothing here.
struct State {
    devices: HashMap<u16, Device>,
    /// The context tables under the root table; kept until the unit goes, as intel-iommu
    /// keeps them.
    contexts: ContextTables,
    /// Bindings by PASID.
    svms: HashMap<u32, Svm>,
    pasids: PasidAllocator,
}

/// A scalable-mode VT-d driver for one remapping unit.
pub struct IommuDriver {
    mmio: Arc<dyn Mmio>,
    mem: Arc<GuestMemoryMmap>,
    frames: Arc<GuestFrames>,
    cap: Cap,
    ecap: Ecap,
    /// VCCAP_REG, when ECAP.VCS.
    vccap: u64,
    /// The second-level width the unit supports best (Linux's `iommu->agaw`).
    agaw: SlLevels,
    /// The enable bits the driver keeps set in GCMD (Linux's `iommu->gcmd`), which also
    /// serialises register commands (Linux's `register_lock`).
    gcmd: GlobalCommand,
    root: Gpa,
    qi: Mutex<InvalidationQueue>,
    /// The page request queue; `None` without ECAP.PRS.
    prq: Option<PageRequestRing>,
    prq_lock: Mutex<()>,
    prq_pending: AtomicBool,
    /// Serialises binds and unbinds (Linux's `pasid_mutex`).
    svm_lock: Mutex<()>,
    state: Mutex<State>,
    counters: Counters,
}

impl std::fmt::Debug for IommuDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuDriver")
            .field("root", &self.root)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Guest frames as the shared table code allocates them.
impl TableFrames for GuestFrames {
    type Error = GuestIommuError;

    fn alloc_frame(&self) -> Result<u64, GuestIommuError> {
        Ok(self.alloc()?.0)
    }

    fn alloc_frames(&self, pages: u64) -> Result<u64, GuestIommuError> {
        Ok(self.alloc_contiguous(pages)?.0)
    }

    fn free_frame(&self, addr: u64) {
        let _ = self.free(Gpa(addr));
    }
}

/// Frees `gpa` on drop unless disarmed: undoes allocations of a failed set-up.
struct FrameGuard<'a> {
    frames: &'a GuestFrames,
    gpa: Option<Gpa>,
}

impl<'a> FrameGuard<'a> {
    fn new(frames: &'a GuestFrames, gpa: Gpa) -> Self {
        FrameGuard {
            frames,
            gpa: Some(gpa),
        }
    }

    fn keep(mut self) -> Gpa {
        self.gpa.take().unwrap_or_default()
    }
}

impl Drop for FrameGuard<'_> {
    fn drop(&mut self) {
        if let Some(gpa) = self.gpa {
            let _ = self.frames.free(gpa);
        }
    }
}

impl IommuDriver {
    /// Brings up the unit as Linux's `init_dmars` and `intel_iommu_init` do: reads the
    /// capabilities, turns off translation and queued invalidation left on by a previous
    /// owner, enables queued invalidation (256-bit descriptors, 256 entries), latches a
    /// new scalable-mode root table, flushes the context cache and IOTLB globally, sets up
    /// the page request queue and the event interrupts, and enables translation.
    ///
    /// The unit must support scalable mode (ECAP.SMTS) and queued invalidation (ECAP.QI).
    pub fn init(
        mmio: Arc<dyn Mmio>,
        frames: Arc<GuestFrames>,
    ) -> Result<Arc<Self>, GuestIommuError> {
        let cap = Cap::from_raw(mmio.read(offset::CAP, 8));
        let ecap = Ecap::from_raw(mmio.read(offset::ECAP, 8));
        if !ecap.smts {
            return Err(GuestIommuError::Unsupported(
                "scalable-mode translation (ECAP.SMTS)",
            ));
        }
        if !ecap.qi {
            return Err(GuestIommuError::Unsupported(
                "queued invalidation (ECAP.QI)",
            ));
        }
        let agaw = [SlLevels::Five, SlLevels::Four, SlLevels::Three]
            .into_iter()
            .find(|l| cap.sagaw & (1 << l.aw()) != 0)
            .ok_or(GuestIommuError::Unsupported(
                "any second-level width (CAP.SAGAW)",
            ))?;
        let vccap = if ecap.vcs {
            mmio.read(offset::VCCAP, 8)
        } else {
            0
        };
        let mem = frames.memory().clone();

        let root = FrameGuard::new(&frames, frames.alloc()?);
        let queue = FrameGuard::new(&frames, frames.alloc_contiguous(qi::QUEUE_PAGES)?);
        let status = FrameGuard::new(&frames, frames.alloc()?);
        let prq = match ecap.prs {
            true => Some(FrameGuard::new(&frames, frames.alloc()?)),
            false => None,
        };
        let pasid_limit = 1u32 << ecap.pasid_bits().min(Pasid::BITS);
        // From here on the unit may reference the frames: a failure leaves them allocated.
        let driver = IommuDriver {
            mmio,
            mem,
            frames: frames.clone(),
            cap,
            ecap,
            vccap,
            agaw,
            gcmd: GlobalCommand::new(),
            root: root.keep(),
            qi: Mutex::new(InvalidationQueue::new(queue.keep().0, status.keep().0)),
            prq: prq.map(|g| PageRequestRing::new(g.keep().0)),
            prq_lock: Mutex::new(()),
            prq_pending: AtomicBool::new(false),
            svm_lock: Mutex::new(()),
            state: Mutex::new(State {
                devices: HashMap::default(),
                svms: HashMap::default(),
                contexts: ContextTables::default(),
                pasids: PasidAllocator::new(pasid_limit),
            }),
            counters: Counters::default(),
        };
        driver.bring_up()?;
        Ok(Arc::new(driver))
    }

    fn bring_up(&self) -> Result<(), GuestIommuError> {
        let regs = Regs(&*self.mmio);
        let status = self.gcmd.adopt(&regs)?;
        if status & gsts::TES != 0 {
            self.gcmd
                .set_enable(&regs, gcmd::TE, gsts::TES, false, "translation disable")?;
        }
        self.gcmd.disable_qi(&regs)?;
        self.enable_qi()?;
        self.gcmd.set_root_table(&regs, self.root.0)?;
        self.submit(&[InvDesc::ContextCache {
            granularity: ContextCacheGranularity::Global,
            did: DomainId(0),
            sid: SourceId::from_rid(0),
            fm: 0,
        }])?;
        self.submit(&[InvDesc::Iotlb {
            granularity: vsva_vtd::inv_desc::IotlbGranularity::Global,
            dr: self.cap.drd,
            dw: self.cap.dwd,
            did: DomainId(0),
            addr: 0,
            ih: false,
            am: 0,
        }])?;
        self.mmio.write(offset::FEDATA, 4, u64::from(FAULT_VECTOR));
        self.mmio.write(offset::FEADDR, 4, u64::from(MSI_ADDRESS));
        self.mmio.write(offset::FEUADDR, 4, 0);
        self.mmio.write(offset::FECTL, 4, 0);
        if let Some(prq) = &self.prq {
            prq.enable(&regs)?;
            self.mmio
                .write(offset::PEDATA, 4, u64::from(PAGE_REQUEST_VECTOR));
            self.mmio.write(offset::PEADDR, 4, u64::from(MSI_ADDRESS));
            self.mmio.write(offset::PEUADDR, 4, 0);
            self.mmio.write(offset::PECTL, 4, 0);
        }
        self.gcmd
            .set_enable(&regs, gcmd::TE, gsts::TES, true, "translation enable")?;
        Ok(())
    }

    fn read32(&self, offset: u64) -> u32 {
        self.mmio.read(offset, 4) as u32
    }

    /// The capability register as read at init.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// The extended capability register as read at init.
    pub fn ecap(&self) -> Ecap {
        self.ecap
    }

    /// The root table.
    pub fn root_table(&self) -> Gpa {
        self.root
    }

    /// Whether PASIDs come from the unit's virtual command interface (ECAP.VCS with
    /// VCCAP.PAS), as Linux registers its custom PASID allocator, rather than from the
    /// driver's own allocator.
    pub fn uses_virtual_commands(&self) -> bool {
        self.ecap.vcs && self.vccap & vcmd::VCCAP_PAS != 0
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DriverStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DriverStats {
            invalidations: get(&c.invalidations),
            range_invalidations: get(&c.range_invalidations),
            waits: get(&c.waits),
            page_requests: get(&c.page_requests),
            page_requests_served: get(&c.page_requests_served),
            page_responses: get(&c.page_responses),
        }
    }

    /// Attaches a device as Linux's `domain_context_mapping_one` does in scalable mode:
    /// allocates its PASID directory (sized for the PASIDs the device and the unit
    /// support), allocates the context table on first use of its bus half, and writes a
    /// present context entry with the directory, PDTS, RID_PASID 0, and DTE, PASIDE and
    /// PRE for what both the device and the unit support; then, in caching mode, a
    /// device-selective context-cache invalidation (else a write-buffer flush).
    pub fn attach_device(&self, config: DeviceConfig) -> Result<(), GuestIommuError> {
        let sid = config.sid;
        let mut st = lock(&self.state);
        if st.devices.contains_key(&sid.rid()) {
            return Err(GuestIommuError::AlreadyAttached(sid));
        }
        let pasid = config.pasid_bits > 0 && self.ecap.pasid;
        let ats = config.ats && self.ecap.dt;
        let pri = pasid && config.pri && self.ecap.prs && self.prq.is_some();
        // intel_pasid_alloc_table: 8 bytes per 64 PASIDs, at least one page.
        let pasid_bits = if pasid {
            u32::from(config.pasid_bits).min(self.ecap.pasid_bits())
        } else {
            0
        };
        let pasid_tables = PasidTables::alloc(&*self.frames, pasid_bits)?;
        // A new directory has no tables: freeing it frees the directory alone.
        let dir = FrameGuard::new(&self.frames, Gpa(pasid_tables.dir()));

        let ctx_addr = st
            .contexts
            .entry(&*self.mem, &*self.frames, self.root.0, sid)?;
        if self.mem.read_u64(ctx_addr)? & 1 != 0 {
            return Err(GuestIommuError::AlreadyAttached(sid));
        }
        let entry = ScalableContextEntry {
            fpd: false,
            dte: ats,
            paside: pasid,
            pre: pri,
            pdts: pasid_tables.pdts(),
            pasiddirptr: pasid_tables.dir(),
            rid_pasid: Pasid::RID_PASID,
            rid_priv: false,
        };
        write_entry(&*self.mem, ctx_addr, &entry.to_raw())?;
        dir.keep();
        st.devices.insert(
            sid.rid(),
            Device {
                config,
                pasid,
                ats,
                pri,
                pasid_tables,
            },
        );
        drop(st);
        if self.cap.cm {
            self.submit(&[InvDesc::ContextCache {
                granularity: ContextCacheGranularity::DeviceSelective,
                did: DomainId(0),
                sid,
                fm: 0,
            }])
        } else {
            Ok(self
                .gcmd
                .flush_write_buffer(&Regs(&*self.mmio), &self.cap)?)
        }
    }

    /// Detaches a device with no bound PASID: clears its context entry, invalidates the
    /// context cache for it (device-selective) and frees its PASID tables.
    pub fn detach_device(&self, sid: SourceId) -> Result<(), GuestIommuError> {
        let mut st = lock(&self.state);
        let dev = *st
            .devices
            .get(&sid.rid())
            .ok_or(GuestIommuError::NotAttached(sid))?;
        if st
            .svms
            .values()
            .any(|s| s.devices.iter().any(|d| d.sid == sid))
        {
            return Err(GuestIommuError::Busy(sid));
        }
        let ctx_addr = st
            .contexts
            .existing_entry(sid)
            .ok_or(GuestIommuError::NotAttached(sid))?;
        clear_entry(&*self.mem, ctx_addr, 4)?;
        st.devices.remove(&sid.rid());
        drop(st);
        let flushed = self.submit(&[InvDesc::ContextCache {
            granularity: ContextCacheGranularity::DeviceSelective,
            did: DomainId(0),
            sid,
            fm: 0,
        }]);
        dev.pasid_tables.free(&*self.mem, &*self.frames);
        flushed
    }

    /// The device's configuration as attached.
    pub fn device(&self, sid: SourceId) -> Option<DeviceConfig> {
        lock(&self.state).devices.get(&sid.rid()).map(|d| d.config)
    }

    /// Reads and clears the recorded faults, as Linux's `dmar_fault` does (the shared
    /// driver's [`take_fault_records`]): from FSTS.FRI while F is set, then FSTS.PFO.
    pub fn take_faults(&self) -> Vec<FaultRecord> {
        take_fault_records(&Regs(&*self.mmio), &self.cap).unwrap_or_default()
    }

    /// Whether the unit holds a fault event the driver has not seen (FECTL.IP).
    pub fn fault_pending(&self) -> bool {
        self.read32(offset::FECTL) & event_control::IP != 0
            || self.read32(offset::FSTS) & fsts::PPF != 0
    }
}
