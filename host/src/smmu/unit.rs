//! One physical SMMU under the host driver.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vsva_hw::smmuv3::Smmu;
use vsva_hw::{FrameAllocator, HostMemory, PAGE_SIZE};
use vsva_smmuv3::{Features, PriResp, RegError};
use vsva_smmuv3_driver::{DmaAlloc, DriverConfig, Registers, SmmuDriver};
use vsva_uapi::request::PageRequest;
use vsva_vtd::{Hpa, Pasid, SourceId};

use super::driver_error;
use crate::error::HostError;
use crate::fault::FaultSink;

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

/// What the SMMU's domains share.
#[derive(Debug, Default)]
struct HostState {
    /// VMIDs in use (0 is reserved, as Linux reserves it for bypass STEs).
    vmids: BTreeSet<u16>,
    /// The VMID of the domain holding each StreamID.
    owners: BTreeMap<u32, u16>,
    /// Each domain's fault sink, by VMID.
    sinks: BTreeMap<u16, FaultSink>,
}

/// One physical SMMU.
#[derive(Debug)]
pub struct SmmuHost {
    hw: Arc<Smmu>,
    frames: Arc<FrameAllocator>,
    features: Features,
    driver: Mutex<Driver>,
    state: Mutex<HostState>,
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
        }))
    }

    /// The physical SMMU.
    pub fn hardware(&self) -> &Arc<Smmu> {
        &self.hw
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

    /// Streams held by domains, for tests and diagnostics.
    pub fn owned_streams(&self) -> Vec<(u32, u16)> {
        self.state().owners.iter().map(|(&s, &v)| (s, v)).collect()
    }

    /// The STE of stream `sid` as the table holds it (`None` while it has none).
    pub fn ste(&self, sid: u32) -> Option<[u64; 8]> {
        self.driver().read_ste(sid).ok().flatten()
    }

    /// VMIDs in use.
    pub fn vmids(&self) -> Vec<u16> {
        self.state().vmids.iter().copied().collect()
    }

    /// The fault sink of the domain holding stream `sid`.
    fn sink_of(&self, sid: u32) -> Option<FaultSink> {
        let s = self.state();
        s.owners.get(&sid).and_then(|v| s.sinks.get(v)).cloned()
    }

    pub(crate) fn set_sink(&self, vmid: u16, sink: FaultSink) {
        self.state().sinks.insert(vmid, sink);
    }

    /// The PRI queue handler (`arm_smmu_priq_thread` with the nested series' fault
    /// reporting): each page request of a stream a domain holds goes to that domain's
    /// container as an `iommu_fault` page request (PASID = SubstreamID); the last request
    /// of a group the container refuses, or of a stream no domain holds, is answered at
    /// once with CMD_PRI_RESP Deny. Before that, the event queue handler
    /// (`arm_smmu_evtq_thread`): each record is logged, and the guest's own faults (see
    /// `event::guest_fault`) go to the container as `IOMMU_FAULT_DMA_UNRECOV` records; then
    /// global errors are handled. Returns how many page requests were delivered.
    pub fn handle_queues(&self) -> usize {
        let mut drv = self.driver();
        match drv.read_events() {
            Ok(events) => {
                for e in &events.records {
                    tracing::debug!(?e, "smmuv3: event");
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
            Err(e) => tracing::error!("smmuv3: event queue: {e}"),
        }
        if let Err(e) = drv.handle_gerror() {
            tracing::error!("smmuv3: GERROR: {e}");
        }
        let requests = match drv.read_page_requests() {
            Ok(d) => d.records,
            Err(e) => {
                tracing::error!("smmuv3: PRI queue: {e}");
                return 0;
            }
        };
        let mut delivered = 0;
        for r in requests {
            let sink = self.sink_of(r.sid);
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
}
