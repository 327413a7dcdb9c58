//! Shared virtual addressing: binding a process's address space to a PASID of a device
//! (Linux's `intel_svm_bind_mm` and `intel_pasid_setup_first_level`), unbinding
//! (`intel_pasid_tear_down_entry`, `intel_svm_drain_prq`), and the mmu-notifier range
//! invalidations (`intel_invalidate_range`).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use smallvec::SmallVec;
use vsva_mem::PhysMem;

use vsva_vtd::inv_desc::PasidCacheGranularity;
use vsva_vtd::regs::layout::{offset, pq, vcmd};
use vsva_vtd::{
    addr::DomainId, addr::Gpa, addr::Gva, addr::Pasid, addr::SourceId, flpte::FlPagingMode,
    inv_desc::InvDesc, pasid::PasidEntry, pasid::Pgtt,
};
use vsva_vtd_driver::inv::{piotlb_pages, piotlb_pasid};
use vsva_vtd_driver::mask::{covering_block, WHOLE_SPACE};
use vsva_vtd_driver::tables::{clear_pasid_entry, write_pasid_entry};
use vsva_vtd_driver::POLL_LIMIT;
use vsva_vtd_driver::PRO_RETRIES;

use super::{lock, Device, GuestIommuError, IommuDriver, Regs};
use crate::process::{MmuNotifier, NotifierId, Process};

/// The domain id Linux gives every first-level-only PASID entry of SVA
/// (`FLPT_DEFAULT_DID`).
pub const FLPT_DEFAULT_DID: DomainId = DomainId(1);

/// The lowest PASID SVA hands out (`PASID_MIN`); 0 is RID_PASID.
const PASID_MIN: u32 = 1;

/// PASIDs the driver allocates itself when the unit has no virtual command interface
/// (Linux's default ioasid allocator): the lowest free one.
#[derive(Debug)]
pub(super) struct PasidAllocator {
    limit: u32,
    used: BTreeSet<u32>,
}

impl PasidAllocator {
    pub(super) fn new(limit: u32) -> Self {
        PasidAllocator {
            limit,
            used: BTreeSet::new(),
        }
    }

    fn alloc(&mut self) -> Option<Pasid> {
        let mut candidate = PASID_MIN;
        for &u in self.used.range(PASID_MIN..) {
            if u != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.limit {
            return None;
        }
        self.used.insert(candidate);
        Pasid::new(candidate).ok()
    }

    fn free(&mut self, pasid: Pasid) {
        self.used.remove(&pasid.raw());
    }
}

/// One device bound to an [`Svm`].
#[derive(Clone, Copy, Debug)]
pub(super) struct SvmDevice {
    pub(super) sid: SourceId,
    /// Binds of this device not yet unbound.
    users: u32,
}

/// A process's address space shared through one PASID (Linux's `intel_svm`).
pub(super) struct Svm {
    pub(super) pasid: Pasid,
    pub(super) process: Arc<Process>,
    notifier: NotifierId,
    /// Inline for one: a PASID is mostly bound to one device.
    pub(super) devices: SmallVec<[SvmDevice; 1]>,
}

/// The mmu notifier an [`Svm`] registers with its process.
struct SvmNotifier {
    driver: Weak<IommuDriver>,
    pasid: Pasid,
}

impl MmuNotifier for SvmNotifier {
    fn invalidate_range(&self, start: Gva, end: Gva) {
        if let Some(driver) = self.driver.upgrade() {
            if let Err(e) = driver.flush_svm_range(self.pasid, start.0, end.0) {
                tracing::error!(%e, pasid = %self.pasid, "range invalidation failed");
            }
        }
    }
}

impl IommuDriver {
    /// Allocates a PASID: through the virtual command interface when the unit offers it
    /// (`vcmd_alloc_pasid`), else from the driver's own space.
    fn alloc_pasid(&self) -> Result<Pasid, GuestIommuError> {
        if !self.uses_virtual_commands() {
            return lock(&self.state)
                .pasids
                .alloc()
                .ok_or(GuestIommuError::NoPasid);
        }
        let rsp = self.virtual_command(u64::from(vcmd::ALLOC_PASID))?;
        match (rsp >> vcmd::VCRSP_SC_SHIFT) & 3 {
            0 => {
                let raw = ((rsp >> vcmd::VCRSP_RESULT_SHIFT) & 0xf_ffff) as u32;
                Pasid::new(raw).map_err(|_| GuestIommuError::NoPasid)
            }
            2 => Err(GuestIommuError::NoPasid),
            sc => Err(GuestIommuError::VirtualCommand(sc as u8)),
        }
    }

    /// Frees a PASID where it came from (`vcmd_free_pasid`).
    fn free_pasid(&self, pasid: Pasid) -> Result<(), GuestIommuError> {
        if !self.uses_virtual_commands() {
            lock(&self.state).pasids.free(pasid);
            return Ok(());
        }
        let cmd = u64::from(pasid.raw()) << vcmd::OPERAND_SHIFT | u64::from(vcmd::FREE_PASID);
        let rsp = self.virtual_command(cmd)?;
        match (rsp >> vcmd::VCRSP_SC_SHIFT) & 3 {
            0 => Ok(()),
            sc => Err(GuestIommuError::VirtualCommand(sc as u8)),
        }
    }

    /// Writes VCMD and polls VCRSP until IP clears; returns VCRSP.
    fn virtual_command(&self, cmd: u64) -> Result<u64, GuestIommuError> {
        self.gcmd.serialised(|| {
            self.mmio.write(offset::VCMD, 8, cmd);
            for _ in 0..POLL_LIMIT {
                let rsp = self.mmio.read(offset::VCRSP, 8);
                if rsp & vcmd::VCRSP_IP == 0 {
                    return Ok(rsp);
                }
                std::thread::yield_now();
            }
            Err(GuestIommuError::Timeout("virtual command response"))
        })
    }

    /// Binds `process`'s address space to `sid` (Linux's `intel_svm_bind_mm` for a user
    /// mm) and returns the PASID the device must use. A process already bound to some
    /// device keeps its PASID; binding the same device again only counts a user.
    ///
    /// The PASID entry is first-level only: FLPTR = the process's CR3, FLPM for its
    /// paging mode, DID [`FLPT_DEFAULT_DID`], AW the unit's width, PWSNP as ECAP.SMPWC,
    /// NXE set, SRE clear (user addresses only). Then, each followed by an invalidation
    /// wait: a PASID-selective PASID-cache invalidation, a PASID-selective PASID-based
    /// IOTLB invalidation and, for a device with ATS, a PASID-based device-TLB
    /// invalidation of the whole address space.
    pub fn sva_bind(
        self: &Arc<Self>,
        sid: SourceId,
        process: &Arc<Process>,
    ) -> Result<Pasid, GuestIommuError> {
        if !self.ecap.flts {
            return Err(GuestIommuError::Unsupported(
                "first-level translation (ECAP.FLTS)",
            ));
        }
        if process.paging_mode() == FlPagingMode::FiveLevel && !self.cap.fl5lp {
            return Err(GuestIommuError::Unsupported(
                "5-level first-level paging (CAP.FL5LP)",
            ));
        }
        let _bind = lock(&self.svm_lock);
        let dev = self.pasid_device(sid)?;
        let existing = {
            let mut st = lock(&self.state);
            let svm = st
                .svms
                .values_mut()
                .find(|s| Arc::ptr_eq(&s.process, process));
            match svm {
                Some(svm) => {
                    if let Some(d) = svm.devices.iter_mut().find(|d| d.sid == sid) {
                        d.users += 1;
                        return Ok(svm.pasid);
                    }
                    Some(svm.pasid)
                }
                None => None,
            }
        };
        let pasid = match existing {
            Some(p) => p,
            None => self.alloc_pasid()?,
        };
        if let Err(e) = self.setup_first_level(&dev, pasid, process) {
            if existing.is_none() {
                let _ = self.free_pasid(pasid);
            }
            return Err(e);
        }
        {
            let mut st = lock(&self.state);
            let device = SvmDevice { sid, users: 1 };
            match st.svms.get_mut(&pasid.raw()) {
                Some(svm) => svm.devices.push(device),
                None => {
                    let notifier = process.register_notifier(Arc::new(SvmNotifier {
                        driver: Arc::downgrade(self),
                        pasid,
                    }));
                    st.svms.insert(
                        pasid.raw(),
                        Svm {
                            pasid,
                            process: process.clone(),
                            notifier,
                            devices: smallvec::smallvec![device],
                        },
                    );
                }
            }
        }
        self.flush_new_pasid(pasid)?;
        Ok(pasid)
    }

    /// The attached device `sid`, which must have PASIDs enabled.
    fn pasid_device(&self, sid: SourceId) -> Result<Device, GuestIommuError> {
        let st = lock(&self.state);
        let dev = *st
            .devices
            .get(&sid.rid())
            .ok_or(GuestIommuError::NotAttached(sid))?;
        if !dev.pasid {
            return Err(GuestIommuError::NoPasidSupport(sid));
        }
        Ok(dev)
    }

    /// The address of `pasid`'s PASID table entry for `dev`, allocating the PASID table
    /// on first use (`intel_pasid_get_entry`).
    fn pasid_entry_slot(&self, dev: &Device, pasid: Pasid) -> Result<u64, GuestIommuError> {
        let sid = dev.config.sid;
        dev.pasid_tables
            .entry(&*self.mem, &*self.frames, pasid)?
            .ok_or(GuestIommuError::PasidOutOfRange { sid, pasid })
    }

    /// `intel_pasid_setup_first_level` for a user address space.
    fn setup_first_level(
        &self,
        dev: &Device,
        pasid: Pasid,
        process: &Process,
    ) -> Result<(), GuestIommuError> {
        let sid = dev.config.sid;
        let _st = lock(&self.state);
        let slot = self.pasid_entry_slot(dev, pasid)?;
        if self.mem.read_u64(slot)? & 1 != 0 {
            return Err(GuestIommuError::PasidBusy { sid, pasid });
        }
        let entry = PasidEntry {
            aw: self.agaw,
            pwsnp: self.ecap.smpwcs,
            flpm: process.paging_mode(),
            // v5.10 `intel_pasid_setup_first_level` leaves NXE clear; set on purpose (F16):
            // the process's tables use XD as the CPU does with EFER.NXE, and with NXE clear
            // the unit would take XD as a reserved bit (SFL.3) on every such page.
            nxe: true,
            flptptr: process.cr3().0,
            ..PasidEntry::new(Pgtt::FirstLevel, FLPT_DEFAULT_DID)
        };
        // Present (qword 0) last, so the unit never sees a half-written entry.
        Ok(write_pasid_entry(&*self.mem, slot, &entry)?)
    }

    /// The flushes after a PASID entry became present (v5.10 `pasid_flush_caches`): with
    /// CAP.CM the unit may cache not-present entries, so the PASID cache and the PASID's
    /// IOTLB are invalidated, each with its wait; without CM only the write buffer is
    /// flushed. No device TLB can hold a translation through an entry that was not
    /// present, so none is invalidated (F16).
    fn flush_new_pasid(&self, pasid: Pasid) -> Result<(), GuestIommuError> {
        if !self.cap.cm {
            return Ok(self
                .gcmd
                .flush_write_buffer(&Regs(&*self.mmio), &self.cap)?);
        }
        self.submit(&[InvDesc::PasidCache {
            granularity: PasidCacheGranularity::PasidSelective,
            did: FLPT_DEFAULT_DID,
            pasid,
        }])?;
        self.submit(&[piotlb_pasid(FLPT_DEFAULT_DID, pasid)])
    }

    /// The flushes after a PASID entry was cleared (v5.10 `intel_pasid_tear_down_entry`):
    /// the PASID cache and the PASID's IOTLB, each with its wait, then the device TLB of a
    /// device with ATS, but only without CAP.CM (F16): with CM the unit is a virtual one
    /// whose PASID-cache invalidation already reaches the device TLB on the host.
    fn flush_cleared_pasid(&self, dev: &Device, pasid: Pasid) -> Result<(), GuestIommuError> {
        self.submit(&[InvDesc::PasidCache {
            granularity: PasidCacheGranularity::PasidSelective,
            did: FLPT_DEFAULT_DID,
            pasid,
        }])?;
        self.submit(&[piotlb_pasid(FLPT_DEFAULT_DID, pasid)])?;
        if dev.ats && !self.cap.cm {
            self.submit(&[dev.dev_iotlb(&self.ecap, Some(pasid), 0, WHOLE_SPACE)])?;
        }
        Ok(())
    }

    /// Unbinds `pasid` from `sid` (Linux's `intel_svm_unbind_mm`). When the last bind of
    /// the device goes: the PASID entry is cleared, the PASID cache, IOTLB and device TLB
    /// flushed for it, and the page requests in flight drained. When the last device goes:
    /// the notifier is unregistered and the PASID freed.
    pub fn sva_unbind(&self, sid: SourceId, pasid: Pasid) -> Result<(), GuestIommuError> {
        let not_bound = GuestIommuError::NotBound { sid, pasid };
        let _unbind = lock(&self.svm_lock);
        let dev = self.pasid_device(sid).map_err(|_| not_bound)?;
        {
            let mut st = lock(&self.state);
            let svm = st.svms.get_mut(&pasid.raw()).ok_or(not_bound)?;
            let d = svm
                .devices
                .iter_mut()
                .find(|d| d.sid == sid)
                .ok_or(not_bound)?;
            if d.users > 1 {
                d.users -= 1;
                return Ok(());
            }
            let slot = self.pasid_entry_slot(&dev, pasid)?;
            clear_pasid_entry(&*self.mem, slot)?;
        }
        let flushed = self.flush_cleared_pasid(&dev, pasid);
        let drained = self.drain_page_requests(&dev, pasid);
        let last = {
            let mut st = lock(&self.state);
            match st.svms.get_mut(&pasid.raw()) {
                Some(svm) => {
                    svm.devices.retain(|d| d.sid != sid);
                    if svm.devices.is_empty() {
                        st.svms.remove(&pasid.raw())
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        if let Some(svm) = last {
            svm.process.unregister_notifier(svm.notifier);
            self.free_pasid(pasid)?;
        }
        flushed.and(drained)
    }

    /// `intel_svm_drain_prq`: serves the page requests of `pasid` already in the queue,
    /// then submits a fenced invalidation wait, a PASID-based IOTLB and a device-TLB
    /// invalidation with a page-request drain, so that no request of the PASID is left
    /// in the unit or the device; submitted again, after serving the queue, while PRS.PRO
    /// is set after it (at most `PRO_RETRIES` times). Nothing for a device without PRI
    /// enabled (`info->pri_enabled`).
    fn drain_page_requests(&self, dev: &Device, pasid: Pasid) -> Result<(), GuestIommuError> {
        if self.prq.is_none() || !dev.pri {
            return Ok(());
        }
        self.handle_page_requests();
        let mut descs: SmallVec<[InvDesc; 3]> = smallvec::smallvec![
            InvDesc::InvWait {
                sw: false,
                interrupt: false,
                fence: true,
                pd: false,
                status_data: 0,
                status_addr: 0,
            },
            piotlb_pasid(FLPT_DEFAULT_DID, pasid),
        ];
        if dev.ats {
            descs.push(dev.dev_iotlb(&self.ecap, Some(pasid), 0, WHOLE_SPACE));
        }
        self.submit_sync(&descs, true)?;
        let mut retries = 0;
        while self.read32(offset::PRS) & pq::PRO != 0 {
            if retries == PRO_RETRIES {
                tracing::warn!(%pasid, "page request queue still overflowing after {retries} drains");
                break;
            }
            retries += 1;
            self.handle_page_requests();
            self.submit_sync(&descs, true)?;
        }
        Ok(())
    }

    /// Invalidates the translations of `[start, end)` in `pasid` on every device bound to
    /// it (Linux's `intel_flush_svm_range_dev`): a page-selective PASID-based IOTLB
    /// invalidation of the smallest aligned block holding the range (PASID-selective when
    /// the block exceeds CAP.MAMV), then for devices with ATS a device-TLB invalidation
    /// of the same block, each followed by a wait.
    pub(super) fn flush_svm_range(
        &self,
        pasid: Pasid,
        start: u64,
        end: u64,
    ) -> Result<(), GuestIommuError> {
        let devices: SmallVec<[Device; 2]> = {
            let st = lock(&self.state);
            let Some(svm) = st.svms.get(&pasid.raw()) else {
                return Ok(());
            };
            svm.devices
                .iter()
                .filter_map(|d| st.devices.get(&d.sid.rid()).copied())
                .collect()
        };
        let (addr, order) = covering_block(start, end.max(start + 1) - 1);
        let iotlb = piotlb_pages(FLPT_DEFAULT_DID, pasid, addr, order, false, &self.cap);
        for dev in devices {
            self.submit(&[iotlb])?;
            self.counters
                .range_invalidations
                .fetch_add(1, Ordering::Relaxed);
            if dev.ats {
                self.submit(&[dev.dev_iotlb(&self.ecap, Some(pasid), addr, order)])?;
                self.counters
                    .range_invalidations
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The PASIDs bound now, with their process's CR3.
    pub fn bound_pasids(&self) -> Vec<(Pasid, Gpa)> {
        let st = lock(&self.state);
        let mut v: Vec<_> = st
            .svms
            .values()
            .map(|s| (s.pasid, s.process.cr3()))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_pasids_are_lowest_free() {
        let mut a = PasidAllocator::new(4);
        let p: Vec<u32> = (0..3).map(|_| a.alloc().unwrap().raw()).collect();
        assert_eq!(p, [1, 2, 3]);
        assert_eq!(a.alloc(), None);
        a.free(Pasid::new(2).unwrap());
        assert_eq!(a.alloc().unwrap().raw(), 2);
    }
}
