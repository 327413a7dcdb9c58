//! One physical VT-d remapping unit as the host kernel drives it (intel-iommu's
//! `struct intel_iommu`): set-up through its registers, the tables above the page tables,
//! queued invalidation, domain ids, and the fault and page request interrupts.
//!
//! Set-up follows `init_dmars` for scalable mode: read CAP/ECAP; enable queued
//! invalidation (IQT = 0, IQA with 256-bit descriptors, GCMD.QIE); set up the page request
//! queue (PQH = PQT = 0, PQA) and unmask the fault and page request events; latch a
//! scalable-mode root table (RTADDR.TTM = 01b, GCMD.SRTP); invalidate the context cache,
//! PASID cache and IOTLB globally; enable translation (GCMD.TE).
//!
//! Every table change is followed by the invalidations the spec asks for (§6.5.3.3,
//! "Guidance to Software for Invalidations"), submitted through the invalidation queue
//! and waited for. Where the spec asks for them only when CAP.CM is set (a not-present
//! entry made present), they are issued anyway: they cost one queue submission and keep
//! the driver correct on units that cache not-present entries.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use vsva_mem::PhysMem;

use vsva_hw::iommu::Iommu;
use vsva_hw::memory::FrameAllocator;
use vsva_vtd::inv_desc::{ContextCacheGranularity, PasidCacheGranularity};
use vsva_vtd::regs::layout::{event_control, gcmd, gsts, offset, pq};
use vsva_vtd::regs::{Cap, Ecap, EventSource, FaultRecord, Interrupt};
use vsva_vtd::{
    addr::DomainId, addr::Pasid, addr::SourceId, inv_desc::InvDesc, pasid::PasidEntry, pasid::Pgtt,
    root::Capabilities,
};
use vsva_vtd_driver::inv::{iotlb_domain, piotlb_pasid};
use vsva_vtd_driver::mask::WHOLE_SPACE;
use vsva_vtd_driver::PRO_RETRIES;
use vsva_vtd_driver::{take_fault_records, GlobalCommand, InvalidationQueue, Registers};

use super::device::DeviceInfo;
use super::did::DomainIdAllocator;
use super::dma_fault;
use super::error::DriverError;
use super::nested::SecondLevel;
use super::prq::{self, Dispatch, PageRequests};
use super::qi;
use super::regs::Mmio;
use super::tables::{self, ContextFeatures, Tables};
use crate::fault::FaultSink;
use crate::iommufd::device::OpenDevices;
use vsva_uapi::request::{PageRequest, PageResponse};

/// The PASID that requests without PASID are translated with (`PASID_RID2PASID`).
pub const RID_PASID: Pasid = match Pasid::new(0) {
    Ok(p) => p,
    Err(_) => panic!("PASID 0 is valid"),
};

#[derive(Debug)]
struct UnitState {
    tables: Option<Tables>,
    dids: DomainIdAllocator,
}

/// The IOTLB invalidation that follows clearing a PASID entry of type `pgtt` (VT-d 3.3
/// §6.5.3.3; Linux v5.10.y `intel_pasid_tear_down_entry` with "Fix incomplete cache flush
/// in intel_pasid_tear_down_entry()"): domain-selective for second-level and nested
/// entries, whose walks fill second-level paging-structure caches and mappings tagged
/// with the domain only, which a PASID-based invalidation leaves behind; PASID-selective
/// PASID-based for first-level and pass-through entries, which cache nothing of the
/// domain's second level.
fn teardown_iotlb(pgtt: Pgtt, did: DomainId, pasid: Pasid, cap: &Cap) -> InvDesc {
    match pgtt {
        Pgtt::SecondLevel | Pgtt::Nested => iotlb_domain(did, cap),
        Pgtt::FirstLevel | Pgtt::PassThrough => piotlb_pasid(did, pasid),
    }
}

/// How many of the unit's recorded faults [`HostIommu::take_faults`] keeps.
const FAULT_LOG_DEPTH: usize = 1024;

/// The host driver of one VT-d unit.
pub struct HostIommu {
    hw: Arc<Iommu>,
    frames: Arc<FrameAllocator>,
    cap: Cap,
    ecap: Ecap,
    caps: Capabilities,
    /// The enables software keeps set in GCMD_REG (TE, QIE), as `iommu->gcmd`.
    gcmd: GlobalCommand,
    qi: Mutex<Option<InvalidationQueue>>,
    state: Mutex<UnitState>,
    prq: PageRequests,
    faults: Mutex<Vec<FaultRecord>>,
    /// The devices a VFIO cdev has bound.
    open_devices: OpenDevices,
}

impl std::fmt::Debug for HostIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIommu")
            .field("cap", &self.cap)
            .field("ecap", &self.ecap)
            .field("prq", &self.prq)
            .finish_non_exhaustive()
    }
}

impl HostIommu {
    /// Takes over `hw` and sets it up for scalable-mode translation with tables from
    /// `frames`. The unit must support scalable mode, queued invalidation and
    /// second-level translation.
    pub fn new(hw: Arc<Iommu>, frames: Arc<FrameAllocator>) -> Result<Arc<Self>, DriverError> {
        let cap = Cap::from_raw(hw.mmio_read(offset::CAP, 8)?);
        let ecap = Ecap::from_raw(hw.mmio_read(offset::ECAP, 8)?);
        for (present, what) in [
            (ecap.smts, "scalable-mode translation"),
            (ecap.qi, "queued invalidation"),
            (ecap.slts, "second-level translation"),
        ] {
            if !present {
                return Err(DriverError::Unsupported(what));
            }
        }
        let qi = qi::alloc(&frames)?;
        let tables = match Tables::new(&frames) {
            Ok(t) => t,
            Err(e) => {
                qi::release(&frames, qi);
                return Err(e);
            }
        };
        let unit = Arc::new(HostIommu {
            caps: Capabilities::from_registers(&cap, &ecap),
            hw,
            frames,
            cap,
            ecap,
            gcmd: GlobalCommand::new(),
            qi: Mutex::new(Some(qi)),
            state: Mutex::new(UnitState {
                tables: Some(tables),
                dids: DomainIdAllocator::new(cap.domains()),
            }),
            prq: PageRequests::default(),
            faults: Mutex::new(Vec::new()),
            open_devices: OpenDevices::default(),
        });
        let weak = Arc::downgrade(&unit);
        unit.hw
            .set_interrupt_handler(Arc::new(move |irq: Interrupt| {
                if let Some(unit) = weak.upgrade() {
                    unit.on_interrupt(irq);
                }
            }));
        unit.enable()?;
        Ok(unit)
    }

    /// The register and global-command sequence of `init_dmars`.
    fn enable(&self) -> Result<(), DriverError> {
        let hw = &self.hw;
        let mmio = Mmio(hw);
        {
            let mut qi = self.qi_lock();
            let qi = qi
                .as_mut()
                .ok_or(DriverError::Unsupported("queued invalidation"))?;
            qi.reset();
            self.gcmd.enable_qi(&mmio, qi.iqa())?;
        }
        if self.ecap.prs {
            self.prq.init(hw, &self.frames)?;
            hw.mmio_write(offset::PECTL, 4, 0)?;
        }
        hw.mmio_write(offset::FECTL, 4, 0)?;
        let root = self.state_lock().tables.as_ref().map_or(0, |t| t.root().0);
        self.gcmd.set_root_table(&mmio, root)?;
        self.invalidate(&InvDesc::global_flush(self.cap.drd, self.cap.dwd))?;
        self.gcmd
            .set_enable(&mmio, gcmd::TE, gsts::TES, true, "translation enable")?;
        Ok(())
    }

    fn qi_lock(&self) -> MutexGuard<'_, Option<InvalidationQueue>> {
        self.qi
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn state_lock(&self) -> MutexGuard<'_, UnitState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The unit.
    pub fn hardware(&self) -> &Arc<Iommu> {
        &self.hw
    }

    /// The devices a VFIO cdev has bound.
    pub(crate) fn open_devices(&self) -> &OpenDevices {
        &self.open_devices
    }

    /// Where the driver's tables come from.
    pub fn frames(&self) -> &Arc<FrameAllocator> {
        &self.frames
    }

    /// CAP_REG as read at set-up.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// ECAP_REG as read at set-up.
    pub fn ecap(&self) -> Ecap {
        self.ecap
    }

    /// Queues `descs`, then an invalidation wait, and waits for the unit to complete them
    /// (`qi_submit_sync`).
    pub fn invalidate(&self, descs: &[InvDesc]) -> Result<(), DriverError> {
        self.submit(descs, false)
    }

    fn submit(&self, descs: &[InvDesc], drain_page_requests: bool) -> Result<(), DriverError> {
        let mut qi = self.qi_lock();
        let qi = qi
            .as_mut()
            .ok_or(DriverError::Unsupported("queued invalidation"))?;
        Ok(qi.submit(
            &Mmio(&self.hw),
            &**self.hw.memory(),
            descs,
            drain_page_requests,
        )?)
    }

    /// Like [`Self::invalidate`] on a path that cannot fail (a teardown): an error is
    /// logged, as intel-iommu logs and goes on.
    fn invalidate_logged(&self, descs: &[InvDesc], drain_page_requests: bool) {
        if let Err(e) = self.submit(descs, drain_page_requests) {
            tracing::error!("vt-d: invalidation failed: {e}");
        }
    }

    /// The faults the unit recorded since the last call, oldest first (at most the last
    /// 1024: a device that faults without end does not grow the log).
    pub fn take_faults(&self) -> Vec<FaultRecord> {
        std::mem::take(&mut self.faults.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Number of domain ids in use.
    pub fn domain_ids_in_use(&self) -> usize {
        self.state_lock().dids.in_use()
    }

    /// Whether `did` is in use.
    pub fn is_domain_id_allocated(&self, did: DomainId) -> bool {
        self.state_lock().dids.is_allocated(did)
    }

    /// Number of attached devices.
    pub fn attached_devices(&self) -> usize {
        self.state_lock()
            .tables
            .as_ref()
            .map_or(0, Tables::device_count)
    }

    /// The domain a device is attached to.
    pub fn device_domain(&self, sid: SourceId) -> Option<DomainId> {
        self.state_lock()
            .tables
            .as_ref()?
            .device(sid)
            .map(|d| d.did)
    }

    /// The present PASID entry of `pasid` for `sid`, as the unit would read it.
    pub fn pasid_entry(&self, sid: SourceId, pasid: Pasid) -> Option<PasidEntry> {
        let state = self.state_lock();
        let mem = &**self.hw.memory();
        let slot = state
            .tables
            .as_ref()?
            .existing_pasid_slot(mem, sid, pasid)?;
        tables::read_pasid_entry(mem, slot)
    }

    /// Number of (device, PASID) pairs whose page requests are routed to a domain.
    pub fn page_request_routes(&self) -> usize {
        self.prq.routes()
    }

    /// Number of domains whose page requests have a fault queue to go to.
    pub fn page_request_sinks(&self) -> usize {
        self.prq.sinks()
    }

    // ----- Domain-facing operations -----

    pub(crate) fn alloc_domain_id(&self) -> Result<DomainId, DriverError> {
        self.state_lock()
            .dids
            .alloc()
            .ok_or(DriverError::NoDomainId)
    }

    pub(crate) fn free_domain_id(&self, did: DomainId) {
        if !self.state_lock().dids.free(did) {
            tracing::error!("vt-d: freeing {did}, which is not allocated");
        }
    }

    /// The second-level-only PASID entry of RID_PASID for a domain
    /// (`intel_pasid_setup_second_level`): no SRE for RID_PASID, page snoop for a
    /// VFIO (unmanaged) domain when the unit has snoop control.
    fn second_level_entry(&self, sl: &SecondLevel) -> PasidEntry {
        PasidEntry {
            aw: sl.levels,
            slptptr: sl.root,
            pwsnp: self.ecap.smpwcs,
            pgsnp: self.ecap.sc,
            slade: sl.slade,
            ..PasidEntry::new(Pgtt::SecondLevel, sl.did)
        }
    }

    /// The record of attached device `sid`.
    pub(crate) fn device_info(&self, sid: SourceId) -> Option<DeviceInfo> {
        self.state_lock()
            .tables
            .as_ref()
            .and_then(|t| t.device(sid))
            .map(|d| d.info)
    }

    /// The whole device-TLB invalidation of `pasid` of `sid` (of requests without PASID
    /// for RID_PASID); none for a device without ATS enabled.
    fn device_tlb(&self, sid: SourceId, pasid: Pasid) -> Option<InvDesc> {
        let pasid = (pasid != RID_PASID).then_some(pasid);
        self.device_info(sid)?.dev_iotlb(pasid, 0, WHOLE_SPACE)
    }

    fn check_entry(&self, entry: &PasidEntry) -> Result<(), DriverError> {
        entry
            .validate(&self.caps)
            .map_err(|r| DriverError::invalid("PASID entry", format!("the unit would fault {r}")))
    }

    /// Attaches a device to the domain of `sl` (`domain_context_mapping_one` in scalable
    /// mode): reads the device's ATS, PRI and PASID capabilities ([`DeviceInfo`]), then
    /// PASID directory (sized as `intel_pasid_alloc_table` does: for the smaller of the
    /// device's and the unit's PASID widths, at least one page), RID_PASID entry for
    /// second-level translation, and a context entry
    /// with PASIDE as the unit supports it and DTE and PRE as the device's record allows
    /// (`info->ats_supported`, `info->pri_supported`); then context-cache
    /// (device-selective), PASID-cache (RID_PASID) and IOTLB (domain) invalidations.
    pub(crate) fn attach_device(&self, sid: SourceId, sl: &SecondLevel) -> Result<(), DriverError> {
        let entry = self.second_level_entry(sl);
        self.check_entry(&entry)?;
        let info = DeviceInfo::new(sid, self.hw.endpoint_capabilities(sid), &self.ecap);
        let features = ContextFeatures {
            dte: info.ats(),
            pre: info.pri(),
            paside: self.ecap.pasid,
        };
        let mem = &**self.hw.memory();
        {
            let mut state = self.state_lock();
            let tables = state
                .tables
                .as_mut()
                .ok_or(DriverError::Unsupported("translation"))?;
            tables.attach(
                mem,
                &self.frames,
                info,
                info.pasid_width()
                    .map_or(0, u32::from)
                    .min(self.ecap.pasid_bits()),
                features,
                &entry,
            )?;
        }
        let flushed = self.invalidate(&[
            InvDesc::ContextCache {
                granularity: ContextCacheGranularity::DeviceSelective,
                did: sl.did,
                sid,
                fm: 0,
            },
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::PasidSelective,
                did: sl.did,
                pasid: RID_PASID,
            },
            iotlb_domain(sl.did, &self.cap),
        ]);
        if let Err(e) = flushed {
            self.detach_device(sid);
            return Err(e);
        }
        Ok(())
    }

    /// Moves an attached device's requests without PASID to the domain of `sl` in one
    /// entry write, as `intel_pasid_replace_second_level` does for a domain replace (the
    /// context entry and the device's other PASID entries stay); see
    /// [`HostIommu::replace_pasid_entry`].
    pub(crate) fn replace_rid_domain(
        &self,
        sid: SourceId,
        sl: &SecondLevel,
    ) -> Result<(), DriverError> {
        self.replace_pasid_entry(sid, RID_PASID, &self.second_level_entry(sl))
    }

    /// Rewrites the present entry of `pasid` of `sid` whole with `entry`, as the
    /// `intel_pasid_replace_*` helpers do for an atomic domain replace, then invalidates
    /// the PASID cache, the IOTLB ([`teardown_iotlb`]) and the device TLB of the old
    /// entry. ENODEV when no entry is present; on failure the old entry is back.
    pub(crate) fn replace_pasid_entry(
        &self,
        sid: SourceId,
        pasid: Pasid,
        entry: &PasidEntry,
    ) -> Result<(), DriverError> {
        self.check_entry(entry)?;
        let mem = &**self.hw.memory();
        let (slot, old) = {
            let mut state = self.state_lock();
            let tables = state.tables.as_mut().ok_or(DriverError::NotAttached(sid))?;
            let slot = tables
                .existing_pasid_slot(mem, sid, pasid)
                .ok_or(DriverError::NotAttached(sid))?;
            let old = tables::read_pasid_entry(mem, slot).ok_or(DriverError::NotAttached(sid))?;
            tables::write_pasid_entry(mem, slot, entry)?;
            if pasid == RID_PASID {
                tables.set_device_domain(sid, entry.did);
            }
            (slot, old)
        };
        let devtlb = self.device_tlb(sid, pasid);
        let descs: Vec<InvDesc> = [
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::PasidSelective,
                did: old.did,
                pasid,
            },
            teardown_iotlb(old.pgtt, old.did, pasid, &self.cap),
        ]
        .into_iter()
        .chain(devtlb)
        .collect();
        let flushed = self.invalidate(&descs);
        if let Err(e) = flushed {
            let mut state = self.state_lock();
            if let Err(back) = tables::write_pasid_entry(mem, slot, &old) {
                tracing::error!("vt-d: restoring {pasid} of {sid}: {back}");
            }
            if let (Some(t), true) = (state.tables.as_mut(), pasid == RID_PASID) {
                t.set_device_domain(sid, old.did);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Detaches a device (`__dmar_remove_one_dev_info`): tears down the RID_PASID entry
    /// (PASID-cache, IOTLB, device-TLB invalidations), clears the context entry
    /// (device-selective context-cache and domain IOTLB invalidations), and only then
    /// frees the PASID tables, whose memory the unit can no longer reach. Other PASID
    /// entries must be torn down before.
    pub(crate) fn detach_device(&self, sid: SourceId) {
        let Some(did) = self.device_domain(sid) else {
            return;
        };
        self.remove_pasid_entry(sid, RID_PASID, false);
        let mem = &**self.hw.memory();
        let root_changed = {
            let mut state = self.state_lock();
            let Some(tables) = state.tables.as_mut() else {
                return;
            };
            if let Err(e) = tables.clear_context(mem, sid) {
                tracing::error!("vt-d: clearing the context entry of {sid}: {e}");
            }
            let descs = [
                InvDesc::ContextCache {
                    granularity: ContextCacheGranularity::DeviceSelective,
                    did,
                    sid,
                    fm: 0,
                },
                iotlb_domain(did, &self.cap),
            ];
            self.invalidate_logged(&descs, false);
            match tables.release_device(mem, &self.frames, sid) {
                Ok(changed) => changed,
                Err(e) => {
                    tracing::error!("vt-d: releasing the tables of {sid}: {e}");
                    false
                }
            }
        };
        if root_changed {
            self.invalidate_logged(
                &[InvDesc::ContextCache {
                    granularity: ContextCacheGranularity::Global,
                    did: DomainId(0),
                    sid: SourceId::from_rid(0),
                    fm: 0,
                }],
                false,
            );
        }
    }

    /// Makes `pasid`'s entry of `sid` present with `entry` (`intel_pasid_setup_*`), the
    /// PASID table allocated on first use; then PASID-cache and PASID-based IOTLB
    /// invalidations of the PASID (`pasid_flush_caches`; issued whatever CAP.CM says, so
    /// the driver stays right on a unit that caches not-present entries). No device-TLB
    /// invalidation, as Linux: no device can hold a translation through an entry that was
    /// not present (F11). A present entry is left alone (EBUSY).
    pub(crate) fn install_pasid_entry(
        &self,
        sid: SourceId,
        pasid: Pasid,
        entry: &PasidEntry,
    ) -> Result<(), DriverError> {
        self.check_entry(entry)?;
        let mem = &**self.hw.memory();
        let slot = {
            let mut state = self.state_lock();
            let tables = state.tables.as_mut().ok_or(DriverError::NotAttached(sid))?;
            if tables.device(sid).is_none() {
                return Err(DriverError::NotAttached(sid));
            }
            let slot = tables.pasid_entry_slot(mem, &self.frames, sid, pasid)?;
            if tables::read_pasid_entry(mem, slot).is_some() {
                return Err(DriverError::PasidBusy { sid, pasid });
            }
            tables::write_pasid_entry(mem, slot, entry)?;
            slot
        };
        let flushed = self.invalidate(&[
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::PasidSelective,
                did: entry.did,
                pasid,
            },
            piotlb_pasid(entry.did, pasid),
        ]);
        if let Err(e) = flushed {
            if let Err(clear) = tables::clear_pasid_entry(mem, slot) {
                tracing::error!("vt-d: clearing {pasid} of {sid}: {clear}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Tears down `pasid`'s entry of `sid` (`intel_pasid_tear_down_entry`): clears it, then
    /// invalidates the PASID cache (the entry's domain), the IOTLB as [`teardown_iotlb`]
    /// picks it and the device TLB (all of the PASID, or of requests without PASID for RID_PASID). With
    /// `drain`, for a device with PRI enabled, the wait drains page requests (PD) and the
    /// page request queue is then serviced, so no request of the PASID is left in flight;
    /// as `intel_svm_drain_prq` (v5.10), a device without PRI has none to drain, and the
    /// draining batch is submitted again while PRS.PRO is set after it (a request may have
    /// been lost to the overflow after the drain began), at most `PRO_RETRIES` times.
    pub(crate) fn remove_pasid_entry(&self, sid: SourceId, pasid: Pasid, drain: bool) {
        let mem = &**self.hw.memory();
        let drain = drain && self.device_info(sid).is_some_and(|d| d.pri());
        let old = {
            let state = self.state_lock();
            let Some(slot) = state
                .tables
                .as_ref()
                .and_then(|t| t.existing_pasid_slot(mem, sid, pasid))
            else {
                return;
            };
            let old = tables::read_pasid_entry(mem, slot);
            if let Err(e) = tables::clear_pasid_entry(mem, slot) {
                tracing::error!("vt-d: clearing {pasid} of {sid}: {e}");
            }
            old
        };
        let Some(old) = old else {
            return;
        };
        let iotlb = teardown_iotlb(old.pgtt, old.did, pasid, &self.cap);
        let devtlb = self.device_tlb(sid, pasid);
        let descs: Vec<InvDesc> = [
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::PasidSelective,
                did: old.did,
                pasid,
            },
            iotlb,
        ]
        .into_iter()
        .chain(devtlb)
        .collect();
        self.invalidate_logged(&descs, drain);
        if !drain {
            return;
        }
        let mut retries = 0;
        while self.page_request_overflow() {
            if retries == PRO_RETRIES {
                tracing::warn!("vt-d: {sid} {pasid}: page request queue still overflowing after {retries} drains");
                break;
            }
            retries += 1;
            // `prq_event_thread` empties the queue and clears PRO; then drain again.
            self.service_page_requests();
            self.invalidate_logged(&descs, true);
        }
        self.service_page_requests();
    }

    /// Whether PRS.PRO is set: the page request queue overflowed and a request was lost.
    fn page_request_overflow(&self) -> bool {
        Mmio(&self.hw)
            .read32(offset::PRS)
            .is_ok_and(|prs| prs & pq::PRO != 0)
    }

    /// Whether the unit tracks dirty pages in its second-level tables (ECAP.SLADS, VT-d
    /// 3.x §3.7.2): Linux's `ssads_supported`, which iommufd reports as
    /// `IOMMU_HW_CAP_DIRTY_TRACKING`.
    pub fn dirty_tracking_supported(&self) -> bool {
        self.ecap.slads
    }

    /// Sets or clears SLADE in the present PASID entry of `pasid` for `sid`
    /// (`intel_pasid_setup_dirty_tracking`): ENODEV without an entry, EOPNOTSUPP for an
    /// entry that is neither second-level nor nested, nothing when SLADE already has that
    /// value. Only the entry's first 64 bits change, in one write. Then, per the spec's
    /// guidance for a changed entry (§6.5.3.3): a PASID-selective PASID-cache invalidation,
    /// a domain-selective IOTLB invalidation (the walks of both entry types cache the
    /// domain's second level) and the device TLB (all of it for requests without PASID on
    /// RID_PASID, all of the PASID otherwise).
    pub(crate) fn set_pasid_slade(
        &self,
        sid: SourceId,
        pasid: Pasid,
        enable: bool,
    ) -> Result<(), DriverError> {
        if enable && !self.ecap.slads {
            return Err(DriverError::NotSupported("dirty tracking (ECAP.SLADS)"));
        }
        let mem = &**self.hw.memory();
        let did = {
            let state = self.state_lock();
            let slot = state
                .tables
                .as_ref()
                .and_then(|t| t.existing_pasid_slot(mem, sid, pasid))
                .ok_or(DriverError::NotAttached(sid))?;
            let entry = tables::read_pasid_entry(mem, slot).ok_or(DriverError::NotAttached(sid))?;
            if !matches!(entry.pgtt, Pgtt::SecondLevel | Pgtt::Nested) {
                return Err(DriverError::NotSupported(
                    "dirty tracking on an entry without a second level",
                ));
            }
            if entry.slade == enable {
                return Ok(());
            }
            let raw = PasidEntry {
                slade: enable,
                ..entry
            }
            .to_raw();
            mem.write_u64(slot, raw[0])?;
            entry.did
        };
        let devtlb = self.device_tlb(sid, pasid);
        let descs: Vec<InvDesc> = [
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::PasidSelective,
                did,
                pasid,
            },
            iotlb_domain(did, &self.cap),
        ]
        .into_iter()
        .chain(devtlb)
        .collect();
        self.invalidate(&descs)
    }

    // ----- Page requests -----

    /// Routes the page requests of `sid` on `pasid` to `did`'s fault queue.
    pub(crate) fn route_page_requests(&self, sid: SourceId, pasid: Pasid, did: DomainId) {
        self.prq.add_route(sid, pasid, did);
    }

    /// Stops routing the page requests of `sid` on `pasid`.
    pub(crate) fn unroute_page_requests(&self, sid: SourceId, pasid: Pasid) {
        self.prq.remove_route(sid, pasid);
    }

    /// Whether the page requests of `sid` on `pasid` go to `did`.
    pub fn page_requests_routed(&self, sid: SourceId, pasid: Pasid, did: DomainId) -> bool {
        self.prq.routed_to(sid, pasid, did)
    }

    /// Sets (or removes) the fault queue `did`'s page requests are reported to.
    pub fn set_page_request_sink(&self, did: DomainId, sink: Option<FaultSink>) {
        self.prq.set_sink(did, sink);
    }

    /// Answers the page request group `request` of device `sid` ends
    /// (`intel_svm_page_response`): queues the page group response descriptor (LPIG, the
    /// response's PASID and group index, the request's private data) and waits for it. The
    /// caller checks that the group was reported and is pending.
    pub fn page_response(
        &self,
        sid: SourceId,
        request: &PageRequest,
        resp: &PageResponse,
    ) -> Result<(), DriverError> {
        self.invalidate(&[prq::group_response(sid, request, resp)?])
    }

    /// A page request its domain's fault queue refused: answered when it needs an answer
    /// (out of line: rare, so the service path stays dense in the instruction cache).
    #[cold]
    #[inline(never)]
    fn refused(&self, sid: SourceId, e: &dyn std::fmt::Display, refuse: Option<InvDesc>) {
        tracing::debug!("vt-d: page request of {sid} refused: {e}");
        if let Some(desc) = refuse {
            self.invalidate_logged(&[desc], false);
        }
    }

    /// Services the page request queue (`prq_event_thread`): every queued request is
    /// reported to the fault queue of the domain that bound its PASID, or answered with
    /// Invalid Request when it needs a response and nobody takes it. Called from the page
    /// request interrupt.
    pub fn service_page_requests(&self) {
        let requests = match self.prq.drain(&self.hw) {
            Ok(r) => r,
            Err(e) => return prq_unreadable(&e),
        };
        for req in requests {
            match self.prq.dispatch(&req) {
                Dispatch::Report(sink, sid, request, refuse) => {
                    if let Err(e) = sink.report(sid, request) {
                        self.refused(sid, &e, refuse);
                    }
                }
                Dispatch::Refuse(desc) => self.invalidate_logged(&[desc], false),
                Dispatch::Drop => {}
            }
        }
    }

    // ----- Interrupts -----

    fn on_interrupt(&self, irq: Interrupt) {
        match irq.source {
            EventSource::Fault => self.drain_faults(),
            EventSource::PageRequest => self.service_page_requests(),
            EventSource::InvalidationCompletion => {}
        }
    }

    /// The fault event handler (`dmar_fault`): reads the fault recording registers from
    /// FSTS.FRI while F is set, clearing each, then clears FSTS.PFO. A first-level fault on
    /// a PASID a domain bound for a guest is also reported to that domain's container as
    /// an unrecoverable fault (`dma_fault`); nobody else's container sees it.
    fn drain_faults(&self) {
        if let Err(e) = self.read_fault_records() {
            tracing::error!("vt-d: reading fault records: {e}");
        }
    }

    fn read_fault_records(&self) -> Result<(), DriverError> {
        for record in take_fault_records(&Mmio(&self.hw), &self.cap)? {
            tracing::warn!(
                "vt-d: fault {:#x} from {} {:?} at {:#x}",
                record.reason,
                record.sid,
                record.pasid,
                record.fault_info
            );
            if let (Some(fault), Some(pasid)) = (dma_fault::guest_fault(&record), record.pasid) {
                if let Some(sink) = self.prq.owner(record.sid, pasid) {
                    if let Err(e) = sink.report_unrecoverable(record.sid, fault) {
                        tracing::debug!("vt-d: fault of {} not reported: {e}", record.sid);
                    }
                }
            }
            let mut log = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
            if log.len() == FAULT_LOG_DEPTH {
                log.remove(0);
            }
            log.push(record);
        }
        Ok(())
    }
}

impl Drop for HostIommu {
    /// Turns translation and queued invalidation off and frees every table and queue.
    /// Domains hold the unit, so none is left.
    fn drop(&mut self) {
        let mmio = Mmio(&self.hw);
        if let Err(e) =
            self.gcmd
                .set_enable(&mmio, gcmd::TE, gsts::TES, false, "translation disable")
        {
            tracing::error!("vt-d: {e}");
        }
        if self.ecap.prs {
            let _ = self
                .hw
                .mmio_write(offset::PECTL, 4, event_control::IM.into());
            let _ = self.hw.mmio_write(offset::PQA, 8, 0);
        }
        if let Err(e) = self.gcmd.disable_qi(&mmio) {
            tracing::error!("vt-d: {e}");
        }
        let frames = self.frames.clone();
        if let Some(queue) = self.qi_lock().take() {
            qi::release(&frames, queue);
        }
        self.prq.release(&frames);
        if let Some(tables) = self.state_lock().tables.take() {
            tables.release(&**self.hw.memory(), &frames);
        }
    }
}

/// The page request queue could not be read (out of line: rare).
#[cold]
#[inline(never)]
fn prq_unreadable(e: &dyn std::fmt::Display) {
    tracing::error!("vt-d: reading the page request queue: {e}");
}

#[cfg(test)]
mod tests {
    use vsva_vtd::inv_desc::{IotlbGranularity, PasidIotlbGranularity};

    use super::*;

    #[test]
    fn teardown_flushes_the_domain_for_second_level_and_nested_and_the_pasid_otherwise() {
        let cap = Cap::default();
        let (did, pasid) = (DomainId(7), Pasid::new(0x42).unwrap());
        for pgtt in [Pgtt::SecondLevel, Pgtt::Nested] {
            match teardown_iotlb(pgtt, did, pasid, &cap) {
                InvDesc::Iotlb {
                    granularity: IotlbGranularity::DomainSelective,
                    did: d,
                    ..
                } => assert_eq!(d, did),
                other => panic!("{pgtt:?}: {other:?}"),
            }
        }
        for pgtt in [Pgtt::FirstLevel, Pgtt::PassThrough] {
            match teardown_iotlb(pgtt, did, pasid, &cap) {
                InvDesc::PasidIotlb {
                    granularity: PasidIotlbGranularity::PasidSelective,
                    did: d,
                    pasid: p,
                    ..
                } => assert_eq!((d, p), (did, pasid)),
                other => panic!("{pgtt:?}: {other:?}"),
            }
        }
    }
}
