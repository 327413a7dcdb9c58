//! One physical SMMU under the host driver.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vsva_hw::smmuv3::Smmu;
use vsva_hw::{memory::FrameAllocator, memory::HostMemory, memory::PAGE_SIZE};
use vsva_smmuv3::{
    cmd::Cmd, cmd::PriResp, cmd::ResumeAction, event::Event, features::Features,
    features::StallModel, regs::RegError, ste::Ste,
};
use vsva_smmuv3_driver::{DmaAlloc, DriverConfig, Registers, SmmuDriver};
use vsva_uapi::request::{PageRequest, PageResponse, PageResponseCode};
use vsva_vtd::{addr::Hpa, addr::Pasid, addr::SourceId};

use super::irq::{self, Counters, IrqStats, IrqThread, MSI_DOORBELL};
use super::{driver_error, invalid};
use crate::error::HostError;
use crate::fault::FaultSink;
use crate::iommufd::device::OpenDevices;

/// The physical SMMU's register page.
#[derive(Clone, Debug)]
pub struct HwRegisters(pub Arc<Smmu>);

impl Registers for HwRegisters {
    fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        self.0.mmio_read(offset, size)
    }
    fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
        self.0.mmio_write(offset, size, value)
    }
}

/// The driver's tables and queues from the host's [`FrameAllocator`], in whole 4 KiB
/// frames.
#[derive(Clone, Debug)]
pub struct HostDma(pub Arc<FrameAllocator>);

impl DmaAlloc for HostDma {
    fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let size = size.next_multiple_of(PAGE_SIZE);
        self.0
            .alloc_range(size, align.max(PAGE_SIZE))
            .ok()
            .map(|h| h.0)
    }
    fn free(&mut self, addr: u64, _size: u64) {
        if let Err(e) = self.0.free(Hpa(addr)) {
            tracing::error!("smmuv3: freeing {addr:#x}: {e}");
        }
    }
}

/// The shared driver as the host instantiates it.
pub(crate) type Driver = SmmuDriver<HwRegisters, Arc<HostMemory>, HostDma>;

/// Where the events of a stream nested under a vIOMMU go (`struct arm_smmu_vmaster`).
pub(crate) trait VeventSink: Send + Sync + std::fmt::Debug {
    /// Reports an event record whose StreamID is already the vSID.
    fn report(&self, record: [u64; 4]);
}

/// What the SMMU's domains share.
#[derive(Debug, Default)]
struct HostState {
    /// VMIDs in use (0 is reserved, as Linux reserves it for bypass STEs).
    vmids: BTreeSet<u16>,
    /// The VMID of the domain holding each StreamID.
    owners: BTreeMap<u32, u16>,
    /// Each domain's fault sink, by VMID.
    sinks: BTreeMap<u16, FaultSink>,
    /// The fault sink of each stream attached to an iommufd HWPT with a fault queue: its
    /// page requests and stalls go there rather than to the domain's sink.
    stream_sinks: BTreeMap<u32, FaultSink>,
    /// The vIOMMU event sink and vSID of each stream nested under a vIOMMU.
    vmasters: BTreeMap<u32, (Arc<dyn VeventSink>, u32)>,
    /// Streams whose devices can stall (the firmware's `dma-can-stall`).
    can_stall: BTreeSet<u32>,
}

/// One physical SMMU.
#[derive(Debug)]
pub struct SmmuHost {
    hw: Arc<Smmu>,
    frames: Arc<FrameAllocator>,
    features: Features,
    driver: Mutex<Driver>,
    state: Mutex<HostState>,
    /// The interrupt thread, while the SMMU's interrupts are taken.
    irq: Mutex<Option<IrqThread>>,
    irq_counters: Arc<Counters>,
    /// The devices a VFIO cdev has bound.
    open_devices: OpenDevices,
}

impl SmmuHost {
    /// Probes, resets and enables the SMMU `hw`, its tables and queues from `frames`.
    pub fn new(hw: Arc<Smmu>, frames: Arc<FrameAllocator>) -> Result<Arc<Self>, HostError> {
        let driver = SmmuDriver::new(
            HwRegisters(hw.clone()),
            frames.memory().clone(),
            HostDma(frames.clone()),
            DriverConfig::default(),
        )
        .map_err(driver_error)?;
        let features = *driver.features();
        if !features.s2p {
            return Err(driver_error(vsva_smmuv3_driver::Error::Unsupported(
                "stage 2 (IDR0.S2P)",
            )));
        }
        Ok(Arc::new(SmmuHost {
            hw,
            frames,
            features,
            driver: Mutex::new(driver),
            state: Mutex::new(HostState::default()),
            irq: Mutex::new(None),
            irq_counters: Arc::default(),
            open_devices: OpenDevices::default(),
        }))
    }

    /// The physical SMMU.
    pub fn hardware(&self) -> &Arc<Smmu> {
        &self.hw
    }

    /// The devices a VFIO cdev has bound.
    pub(crate) fn open_devices(&self) -> &OpenDevices {
        &self.open_devices
    }

    /// Where stage-2 tables come from.
    pub fn frames(&self) -> &Arc<FrameAllocator> {
        &self.frames
    }

    /// The features the driver probed.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// The driver, locked.
    pub(crate) fn driver(&self) -> MutexGuard<'_, Driver> {
        self.driver.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self) -> MutexGuard<'_, HostState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A free VMID (`arm_smmu_bitmap_alloc` over IDR0.VMID16's width), `-ENOSPC` when
    /// none is left.
    pub(crate) fn alloc_vmid(&self) -> Result<u16, HostError> {
        let max: u32 = if self.features.vmid16 { 0xffff } else { 0xff };
        let mut s = self.state();
        let vmid = (1..=max)
            .map(|v| v as u16)
            .find(|v| !s.vmids.contains(v))
            .ok_or(HostError::Driver {
                errno: libc::ENOSPC,
                detail: "smmuv3: no free VMID".into(),
            })?;
        s.vmids.insert(vmid);
        Ok(vmid)
    }

    /// Gives a VMID back, with its fault sink.
    pub(crate) fn free_vmid(&self, vmid: u16) {
        let mut s = self.state();
        s.vmids.remove(&vmid);
        s.sinks.remove(&vmid);
    }

    /// Records that the domain of `vmid` holds stream `sid`: `-EBUSY` when another does.
    pub(crate) fn claim_stream(&self, sid: u32, vmid: u16) -> Result<(), HostError> {
        let mut s = self.state();
        match s.owners.get(&sid) {
            Some(&v) if v != vmid => Err(HostError::Driver {
                errno: libc::EBUSY,
                detail: format!("smmuv3: stream {sid:#x} belongs to another domain"),
            }),
            _ => {
                s.owners.insert(sid, vmid);
                Ok(())
            }
        }
    }

    /// Releases stream `sid`.
    pub(crate) fn release_stream(&self, sid: u32) {
        self.state().owners.remove(&sid);
    }

    /// Probes the StreamIDs `sids` of devices the platform may plug in later
    /// (`arm_smmu_init_sid_strtab` of each master's probe): each gets an aborting STE,
    /// which makes the level-2 stream tables holding them; they stay for the SMMU's
    /// lifetime, as Linux's do, so a device plugged in later allocates nothing.
    pub fn probe_streams(&self, sids: std::ops::Range<u32>) -> Result<(), HostError> {
        let mut drv = self.driver();
        for sid in sids {
            drv.write_ste(sid, None).map_err(driver_error)?;
        }
        Ok(())
    }

    /// Streams held by domains, for tests and diagnostics.
    pub fn owned_streams(&self) -> Vec<(u32, u16)> {
        self.state().owners.iter().map(|(&s, &v)| (s, v)).collect()
    }

    /// Declares whether the device of stream `sid` can stall its transactions (the
    /// firmware's `dma-can-stall` property, which Linux reads into `stall_enabled`): a
    /// platform device that waits while the SMMU holds a faulting transaction. It takes
    /// effect for the STEs written from then on, and only when the SMMU can stall
    /// (IDR0.STALL_MODEL 0b00 or 0b10).
    pub fn set_stall_capable(&self, sid: u32, can_stall: bool) {
        let mut s = self.state();
        if can_stall {
            s.can_stall.insert(sid);
        } else {
            s.can_stall.remove(&sid);
        }
    }

    /// Whether stream `sid`'s faults may stall (Linux's `master->stall_enabled`).
    pub(crate) fn stall_enabled(&self, sid: u32) -> bool {
        self.features.stall_model != StallModel::Terminate && self.state().can_stall.contains(&sid)
    }

    /// `ste` as stream `sid` gets it: when streams may choose (STALL_MODEL 0b00), STE.S1STALLD
    /// keeps the stage-1 faults of a device that cannot stall from stalling whatever the
    /// (guest's) CD.S says (`arm_smmu_write_strtab_ent`).
    pub(crate) fn stream_ste(&self, sid: u32, ste: Option<&Ste>) -> Option<Ste> {
        ste.map(|ste| Ste {
            s1stalld: ste.config.stage1()
                && self.features.stall_model == StallModel::StallAndTerminate
                && !self.stall_enabled(sid),
            ..*ste
        })
    }

    /// A stalled transaction's event (`arm_smmu_handle_evt` for a stall-enabled master):
    /// a stage-1 stall of a stream that may stall goes to the owning domain's container as
    /// an `iommu_fault` page request whose group id is the STAG, answered through
    /// [`page_response`](crate::container::IommuBackend::page_response) by CMD_RESUME; any other
    /// stall, or one nobody takes, is aborted at once. Whether it was delivered.
    fn stall_event(&self, drv: &mut Driver, e: &Event) -> bool {
        let sid = SourceId::from_rid(e.sid as u16);
        let request = PageRequest {
            pasid: e.ssid.and_then(|s| Pasid::new(s).ok()),
            grpid: e.stag as u32,
            read: e.rnw,
            write: !e.rnw,
            exec: e.ind,
            privileged: e.pnu,
            addr: e.input_addr & !0xfff,
            last_page: true,
            needs_pasid: e.ssid.is_some(),
            private_data: None,
        };
        let taken = !e.s2
            && e.sid <= u16::MAX as u32
            && self.stall_enabled(e.sid)
            && self
                .request_sink_of(e.sid)
                .is_some_and(|s| s.report(sid, request).is_ok());
        if !taken {
            let abort = Cmd::Resume {
                sid: e.sid,
                action: ResumeAction::Abort,
                stag: e.stag,
            };
            if let Err(err) = drv.issue(&[abort]) {
                tracing::error!("smmuv3: CMD_RESUME: {err}");
            }
        }
        taken
    }

    /// The STE of stream `sid` as the table holds it (`None` while it has none).
    pub fn ste(&self, sid: u32) -> Option<[u64; 8]> {
        self.driver().read_ste(sid).ok().flatten()
    }

    /// VMIDs in use.
    pub fn vmids(&self) -> Vec<u16> {
        self.state().vmids.iter().copied().collect()
    }

    /// Fault sinks registered: one per domain that has one (a container's fault queue),
    /// one per stream routed to an iommufd fault queue.
    pub fn fault_sinks(&self) -> usize {
        let s = self.state();
        s.sinks.len() + s.stream_sinks.len()
    }

    /// Streams whose page requests reach a fault sink: held by a domain that registered
    /// one, or routed to an iommufd fault queue.
    pub fn fault_routes(&self) -> usize {
        let s = self.state();
        s.owners
            .iter()
            .filter(|(sid, v)| s.sinks.contains_key(v) || s.stream_sinks.contains_key(sid))
            .count()
    }

    /// The fault sink of the domain holding stream `sid`.
    fn sink_of(&self, sid: u32) -> Option<FaultSink> {
        let s = self.state();
        s.owners.get(&sid).and_then(|v| s.sinks.get(v)).cloned()
    }

    /// Where stream `sid`'s page requests and stalls go: the iommufd fault queue of its
    /// HWPT, else its domain's sink (the domain's `iopf_handler`).
    fn request_sink_of(&self, sid: u32) -> Option<FaultSink> {
        let s = self.state();
        s.stream_sinks
            .get(&sid)
            .or_else(|| s.owners.get(&sid).and_then(|v| s.sinks.get(v)))
            .cloned()
    }

    /// Sets (or clears) the iommufd fault queue stream `sid`'s page requests and stalls go
    /// to (`iommufd_fault_domain_attach_dev`).
    pub(crate) fn set_stream_sink(&self, sid: u32, sink: Option<FaultSink>) {
        let mut s = self.state();
        match sink {
            Some(k) => s.stream_sinks.insert(sid, k),
            None => s.stream_sinks.remove(&sid),
        };
    }

    /// The response to a page request of stream `sid` (the nested series'
    /// `arm_smmu_page_response`): for a stream that may stall, CMD_RESUME of the stalled
    /// transaction whose STAG is the group id (Success → Retry, Invalid and Failure →
    /// Abort); otherwise CMD_PRI_RESP (Success, Invalid → Deny, Failure → Fail) of the
    /// group, with its SubstreamID when the request needs it back.
    pub(crate) fn page_response(
        &self,
        sid: u32,
        request: &PageRequest,
        response: &PageResponse,
    ) -> Result<(), HostError> {
        use vsva_smmuv3::cmd::PriResp as R;
        if self.stall_enabled(sid) {
            let stag = u16::try_from(request.grpid)
                .map_err(|_| invalid(format!("STAG {} is wider than 16 bits", request.grpid)))?;
            let action = match response.code {
                PageResponseCode::Success => ResumeAction::Retry,
                PageResponseCode::Invalid | PageResponseCode::Failure => ResumeAction::Abort,
            };
            return self
                .driver()
                .issue(&[Cmd::Resume { sid, action, stag }])
                .map_err(driver_error);
        }
        let resp = match response.code {
            PageResponseCode::Success => R::Success,
            PageResponseCode::Invalid => R::Deny,
            PageResponseCode::Failure => R::Fail,
        };
        let ssid = response.pasid.map(|p| p.raw());
        let grp = u16::try_from(request.grpid)
            .map_err(|_| invalid(format!("PRG index {} is wider than 9 bits", request.grpid)))?;
        self.driver()
            .pri_resp(sid, ssid, grp, resp)
            .map_err(driver_error)
    }

    /// Sets (or clears) where the events of stream `sid` go as a vIOMMU's, with its vSID
    /// (`arm_smmu_attach_commit_vmaster`).
    pub(crate) fn set_vmaster(&self, sid: u32, vmaster: Option<(Arc<dyn VeventSink>, u32)>) {
        let mut s = self.state();
        match vmaster {
            Some(v) => s.vmasters.insert(sid, v),
            None => s.vmasters.remove(&sid),
        };
    }

    fn vmaster_of(&self, sid: u32) -> Option<(Arc<dyn VeventSink>, u32)> {
        self.state().vmasters.get(&sid).cloned()
    }

    pub(crate) fn set_sink(&self, vmid: u16, sink: FaultSink) {
        self.state().sinks.insert(vmid, sink);
    }

    /// Serves both queues and GERROR once, as the interrupt thread does when all three
    /// MSIs arrived (for an owner that polls instead): the event queue handler
    /// (`arm_smmu_evtq_thread`): each record is logged; a stream nested under a vIOMMU
    /// gets its records that are not stage 2's in the vIOMMU's vEVENT queue, with its
    /// vSID; a stalled transaction goes to the container as a page request (see
    /// `stall_event`); otherwise the guest's own faults (see `event::guest_fault`) go to
    /// the container as `IOMMU_FAULT_DMA_UNRECOV` records; then
    /// global errors are handled; then the PRI queue handler (`arm_smmu_priq_thread` with
    /// the nested series' fault reporting): each page request of a stream a domain holds
    /// goes to that domain's container as an `iommu_fault` page request (PASID =
    /// SubstreamID); the last request of a group the container refuses, or of a stream no
    /// domain holds, is answered at once with CMD_PRI_RESP Deny. Returns how many page
    /// requests were delivered.
    pub fn handle_queues(&self) -> usize {
        self.evtq_irq();
        self.gerror_irq();
        self.priq_irq()
    }

    /// The event queue handler (see [`SmmuHost::handle_queues`]).
    pub(super) fn evtq_irq(&self) {
        let mut drv = self.driver();
        let events = match drv.read_events() {
            Ok(events) => events,
            Err(e) => {
                tracing::error!("smmuv3: event queue: {e}");
                return;
            }
        };
        self.irq_counters
            .events(events.records.len(), events.overflowed);
        for e in &events.records {
            tracing::debug!(?e, "smmuv3: event");
            if e.stall {
                let delivered = self.stall_event(&mut drv, e);
                self.irq_counters.stall(delivered);
                continue;
            }
            if !e.s2 {
                if let Some((sink, vsid)) = self.vmaster_of(e.sid) {
                    sink.report(vevent(e, vsid));
                    continue;
                }
            }
            let Some(fault) = super::event::guest_fault(e) else {
                continue;
            };
            let sid = SourceId::from_rid(e.sid as u16);
            if let Some(sink) = self.sink_of(e.sid) {
                if let Err(err) = sink.report_unrecoverable(sid, fault) {
                    tracing::debug!("smmuv3: fault of {sid} not reported: {err}");
                }
            }
        }
    }

    /// The global error handler (`arm_smmu_gerror_handler`): logs and acknowledges every
    /// active error in GERRORN, recovering a stopped command queue. Returns the errors
    /// that were active.
    pub(super) fn gerror_irq(&self) -> u32 {
        match self.driver().handle_gerror() {
            Ok((active, _)) => {
                self.irq_counters.gerror(active);
                active
            }
            Err(e) => {
                tracing::error!("smmuv3: GERROR: {e}");
                0
            }
        }
    }

    /// The PRI queue handler (see [`SmmuHost::handle_queues`]); returns how many page
    /// requests were delivered.
    pub(super) fn priq_irq(&self) -> usize {
        let mut drv = self.driver();
        let requests = match drv.read_page_requests() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("smmuv3: PRI queue: {e}");
                return 0;
            }
        };
        self.irq_counters
            .page_requests(requests.records.len(), requests.overflowed);
        let mut delivered = 0;
        for r in requests.records {
            let sink = self.request_sink_of(r.sid);
            let request = PageRequest {
                pasid: r.ssid.and_then(|s| Pasid::new(s).ok()),
                grpid: r.prg_index as u32,
                read: r.read,
                write: r.write,
                exec: r.exec,
                privileged: r.privileged,
                addr: r.addr & !0xfff,
                last_page: r.last,
                needs_pasid: r.ssid.is_some(),
                private_data: None,
            };
            let sid = SourceId::from_rid(r.sid as u16);
            let taken = sink.is_some_and(|s| s.report(sid, request).is_ok());
            if taken {
                delivered += 1;
            } else if r.last {
                if let Err(e) = drv.pri_resp(r.sid, r.ssid, r.prg_index, PriResp::Deny) {
                    tracing::error!("smmuv3: PRI response: {e}");
                }
            }
        }
        delivered
    }

    /// Takes the SMMU's interrupts (`arm_smmu_setup_irqs`): the platform's doorbell at
    /// [`MSI_DOORBELL`] wakes an interrupt thread, each source's MSI is programmed and
    /// enabled, and the thread serves once whatever was queued before. From then on the
    /// queues and GERROR are served without anyone calling [`SmmuHost::handle_queues`].
    /// Enabling them twice changes nothing.
    pub fn enable_interrupts(self: &Arc<Self>) -> Result<(), HostError> {
        let mut irq = self.irq.lock().unwrap_or_else(PoisonError::into_inner);
        if irq.is_some() {
            return Ok(());
        }
        let (thread, handler) = IrqThread::spawn(Arc::downgrade(self), self.irq_counters.clone())
            .map_err(|e| HostError::Driver {
            errno: libc::EAGAIN,
            detail: format!("smmuv3: interrupt thread: {e}"),
        })?;
        self.hw.set_msi_doorbell(MSI_DOORBELL, handler);
        if let Err(e) = self.driver().enable_msis(MSI_DOORBELL, irq::msi_data) {
            self.hw.clear_msi_doorbell();
            if !thread.stop() {
                tracing::error!("smmuv3: the interrupt thread did not stop");
            }
            return Err(driver_error(e));
        }
        thread.kick();
        *irq = Some(thread);
        Ok(())
    }

    /// Whether the interrupt thread runs.
    pub fn interrupts_enabled(&self) -> bool {
        self.irq
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Gives the interrupts back (`arm_smmu_device_disable`'s part): disabled in IRQ_CTRL,
    /// the doorbell disconnected, the thread stopped and joined, waiting at most
    /// [`IRQ_JOIN_TIMEOUT`](super::IRQ_JOIN_TIMEOUT) for the interrupt it serves (`-ETIMEDOUT` after that, the
    /// thread then ends by itself). The queues are then the caller's to drain.
    pub fn disable_interrupts(&self) -> Result<(), HostError> {
        let Some(thread) = self
            .irq
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return Ok(());
        };
        let disabled = self.driver().disable_msis();
        self.hw.clear_msi_doorbell();
        if std::thread::current().id() == thread.id() {
            thread.detach();
        } else if !thread.stop() {
            return Err(HostError::Driver {
                errno: libc::ETIMEDOUT,
                detail: "smmuv3: the interrupt thread did not stop".into(),
            });
        }
        disabled.map_err(driver_error)
    }

    /// What the interrupt path served so far.
    pub fn irq_stats(&self) -> IrqStats {
        self.irq_counters.snapshot()
    }
}

impl Drop for SmmuHost {
    /// Stops the interrupt thread, if it runs.
    fn drop(&mut self) {
        if let Err(e) = self.disable_interrupts() {
            tracing::error!("smmuv3: {e}");
        }
    }
}

/// The record a vIOMMU gets for `event` of one of its streams (`arm_vmaster_report_event`):
/// the StreamID replaced by the vSID. The fetch address of F_WALK_EABT and F_CD_FETCH is
/// a host physical address, which a VM must not learn: it goes out as zero.
fn vevent(event: &vsva_smmuv3::event::Event, vsid: u32) -> [u64; 4] {
    use vsva_smmuv3::event::EventType;
    let mut e = vsva_smmuv3::event::Event {
        sid: vsid,
        ..*event
    };
    if matches!(e.event_type, EventType::WalkEabt | EventType::CdFetch) {
        e.addr2 = 0;
    }
    e.encode()
}
