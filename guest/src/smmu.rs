//! The arm64 guest's SMMUv3 driver with shared virtual addressing, modelled on Linux's
//! arm-smmu-v3 (`drivers/iommu/arm/arm-smmu-v3/`, its SVA part `arm-smmu-v3-sva.c`): the
//! machinery (probe, reset, stream table, CD tables, command queue, event and PRI queues)
//! is `vsva_smmuv3_driver`, the same library the host's driver uses, as the VT-d side
//! shares `vsva_vtd_driver`; this module holds the guest kernel's policy.
//!
//! - [`SmmuSva::attach_device`]: the device's STE translates with stage 1 from a CD table
//!   of 2^[`SSID_BITS`] SubstreamIDs (transactions without one bypass stage 1, S1DSS), with
//!   ATS (EATS) so that it can send page requests.
//! - [`SmmuSva::bind`]: a process's address space gets a SubstreamID and an ASID; its CD
//!   points TTB0 at the process's AArch64 tables (`arm_smmu_sva_bind`,
//!   `arm_smmu_alloc_shared_cd`), and an mmu notifier invalidates the SMMU's TLB
//!   (CMD_TLBI_NH_VA per page, CMD_TLBI_NH_ASID for large ranges) and the device's ATC
//!   (CMD_ATC_INV) when the process's mappings change, each batch ending with CMD_SYNC
//!   (`arm_smmu_mm_invalidate_range`).
//! - [`SmmuSva::unbind`]: the CD cleared, the ASID's TLB entries and the SubstreamID's ATC
//!   entries invalidated, ASID and SubstreamID freed.
//! - [`SmmuSva::handle_page_requests`]: the PRI queue drained, each request resolved by the
//!   process's fault handler and each group answered with CMD_PRI_RESP (`iopf` in Linux).
//! - Stall-capable devices ([`SmmuSva::set_stall_capable`], the firmware's
//!   `dma-can-stall`) get CD.S in their CDs where the SMMU can stall, and every other
//!   device STE.S1STALLD where streams may choose (`arm_smmu_make_cdtable_ste`);
//!   [`SmmuSva::handle_events`] resolves a stall event by the process's fault handler and
//!   answers it with CMD_RESUME (`arm_smmu_handle_evt` to `iopf`, `arm_smmu_page_response`).
//!
//! The tables and queues come from a contiguous region of guest RAM the driver takes at
//! probe ([`DMA_REGION`] bytes) and gives back at [`SmmuSva::shutdown`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use vm_memory::GuestMemoryMmap;
use vsva_smmuv3::{
    cd::ContextDescriptor, cmd::Cmd, cmd::PriResp, cmd::ResumeAction, event::Event, features::Httu,
    features::StallModel, ste::Config, ste::Eats, ste::S1Dss, ste::Ste,
};
use vsva_smmuv3_driver::{CdTable, DmaAlloc, DriverConfig, Registers, SmmuDriver, TlbiStage};
use vsva_vtd::{addr::Gpa, addr::Gva};

use crate::frames::{FrameError, GuestFrames, FRAME_SIZE};
use crate::process::{MmuNotifier, NotifierId, Process, AARCH64_T0SZ};

/// SubstreamID bits of each device's CD table: a linear table of 1024 CDs (64 KiB).
pub const SSID_BITS: u8 = 10;
/// Bytes of guest RAM the driver's tables and queues come from.
pub const DMA_REGION: u64 = 1 << 20;
/// Above this many pages a range invalidation becomes CMD_TLBI_NH_ASID (Linux's
/// `CMDQ_MAX_TLBI_OPS` with 4 KiB pages).
const MAX_TLBI_OPS: u64 = 512;
/// MAIR_EL1 attribute 0: normal memory, inner and outer write-back (the index user pages
/// use).
const MAIR: u64 = 0xff;

/// A refused driver operation.
#[derive(Debug, thiserror::Error)]
pub enum SmmuSvaError {
    /// The driver library refused (probe, a table or queue update, a command).
    #[error(transparent)]
    Driver(#[from] vsva_smmuv3_driver::Error),
    /// No guest RAM for the driver's region.
    #[error(transparent)]
    Frames(#[from] FrameError),
    /// The device is attached already.
    #[error("StreamID {0:#x} is already attached")]
    AlreadyAttached(u32),
    /// The device is not attached.
    #[error("StreamID {0:#x} is not attached")]
    NotAttached(u32),
    /// No SubstreamID or ASID is free.
    #[error("no free {0}")]
    Exhausted(&'static str),
    /// No bond with this SubstreamID.
    #[error("SubstreamID {ssid} of StreamID {sid:#x} is not bound")]
    NotBound {
        /// StreamID.
        sid: u32,
        /// SubstreamID.
        ssid: u32,
    },
    /// A process whose tables are not AArch64 ones.
    #[error("the process's tables are not AArch64 tables")]
    NotAarch64,
}

/// A first-fit allocator over the driver's region.
#[derive(Debug)]
struct Region {
    start: u64,
    /// Free ranges: start to length.
    free: BTreeMap<u64, u64>,
}

impl DmaAlloc for Region {
    fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let (&at, &len, addr) = self.free.iter().find_map(|(at, len)| {
            let addr = at.checked_next_multiple_of(align)?;
            (addr.checked_add(size)? <= at + len).then_some((at, len, addr))
        })?;
        self.free.remove(&at);
        if addr > at {
            self.free.insert(at, addr - at);
        }
        if addr + size < at + len {
            self.free.insert(addr + size, at + len - addr - size);
        }
        Some(addr)
    }

    fn free(&mut self, addr: u64, size: u64) {
        let (mut start, mut len) = (addr, size);
        if let Some((&s, &l)) = self.free.range(..addr).next_back() {
            if s + l == addr {
                self.free.remove(&s);
                start = s;
                len += l;
            }
        }
        if let Some(l) = self.free.remove(&(addr + size)) {
            len += l;
        }
        self.free.insert(start, len);
    }
}

/// One process bound to a SubstreamID of a device.
struct Bond {
    process: Arc<Process>,
    asid: u16,
    notifier: NotifierId,
}

/// One attached device.
struct Device {
    table: CdTable,
    bonds: BTreeMap<u32, Bond>,
    /// Its faults stall (Linux's `master->stall_enabled`): its CDs set S.
    stall: bool,
}

struct Inner<R: Registers> {
    drv: SmmuDriver<R, Arc<GuestMemoryMmap>, Region>,
    devices: BTreeMap<u32, Device>,
    asids: BTreeSet<u16>,
    /// Page request groups with a request the process could not resolve.
    failed_groups: BTreeSet<(u32, Option<u32>, u16)>,
    /// StreamIDs of the devices that can stall (`dma-can-stall`).
    can_stall: BTreeSet<u32>,
}

/// What one pass over the PRI queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRequestStats {
    /// Requests read.
    pub requests: u64,
    /// Requests the process's fault handler resolved.
    pub resolved: u64,
    /// Groups answered Success.
    pub succeeded: u64,
    /// Groups answered Deny (a request was for no bound process or could not be resolved).
    pub denied: u64,
}

/// The guest's SMMUv3 driver with SVA.
pub struct SmmuSva<R: Registers> {
    inner: Mutex<Inner<R>>,
    frames: Arc<GuestFrames>,
    region: Gpa,
    me: Weak<Self>,
}

impl<R: Registers> std::fmt::Debug for SmmuSva<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmmuSva")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// The notifier of one bond: invalidations for the SMMU's TLB and the device's ATC.
struct BondNotifier<R: Registers> {
    driver: Weak<SmmuSva<R>>,
    sid: u32,
    ssid: u32,
    asid: u16,
}

impl<R: Registers + Send + 'static> MmuNotifier for BondNotifier<R> {
    fn invalidate_range(&self, start: Gva, end: Gva) {
        let Some(d) = self.driver.upgrade() else {
            return;
        };
        let size = end.0.saturating_sub(start.0);
        let mut inner = d.lock();
        let stage = TlbiStage::Stage1 {
            vmid: 0,
            asid: self.asid,
        };
        let r = if size.div_ceil(FRAME_SIZE) > MAX_TLBI_OPS {
            inner.drv.tlbi_asid(0, self.asid)
        } else {
            inner
                .drv
                .tlbi_range(stage, start.0, size, FRAME_SIZE, false)
        }
        .and_then(|()| inner.drv.atc_inv(self.sid, Some(self.ssid), start.0, size));
        if let Err(e) = r {
            tracing::error!(%e, "guest SMMU: invalidating {:#x}..{:#x}", start.0, end.0);
        }
    }
}

impl<R: Registers + Send + 'static> SmmuSva<R> {
    /// Probes, resets and enables the SMMU behind `regs`, with its tables and queues in a
    /// region of [`DMA_REGION`] bytes from `frames`.
    pub fn new(
        regs: R,
        mem: Arc<GuestMemoryMmap>,
        frames: Arc<GuestFrames>,
    ) -> Result<Arc<Self>, SmmuSvaError> {
        let region = frames.alloc_contiguous(DMA_REGION / FRAME_SIZE)?;
        let alloc = Region {
            start: region.0,
            free: BTreeMap::from([(region.0, DMA_REGION)]),
        };
        let drv = match SmmuDriver::new(regs, mem, alloc, DriverConfig::default()) {
            Ok(d) => d,
            Err(e) => {
                let _ = frames.free(region);
                return Err(e.into());
            }
        };
        Ok(Arc::new_cyclic(|me| SmmuSva {
            inner: Mutex::new(Inner {
                drv,
                devices: BTreeMap::new(),
                asids: BTreeSet::new(),
                failed_groups: BTreeSet::new(),
                can_stall: BTreeSet::new(),
            }),
            frames,
            region,
            me: me.clone(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner<R>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the device with StreamID `sid` a CD table and an STE that translates with
    /// stage 1 (`arm_smmu_attach_dev` of an SVA-capable device).
    pub fn attach_device(&self, sid: u32) -> Result<(), SmmuSvaError> {
        let mut inner = self.lock();
        if inner.devices.contains_key(&sid) {
            return Err(SmmuSvaError::AlreadyAttached(sid));
        }
        let f = *inner.drv.features();
        let stall = match f.stall_model {
            StallModel::ForceStall => true,
            StallModel::StallAndTerminate => inner.can_stall.contains(&sid),
            StallModel::Terminate => false,
        };
        let table = inner.drv.alloc_cd_table(SSID_BITS.min(f.ssid_bits))?;
        let ste = Ste {
            s1_context_ptr: table.base(),
            s1cdmax: table.s1cdmax(),
            s1fmt: table.s1fmt(),
            s1dss: S1Dss::Bypass,
            s1cir: 1,
            s1cor: 1,
            s1csh: 3,
            eats: if f.ats { Eats::Full } else { Eats::Abort },
            // Where streams may choose, a device that cannot stall never does.
            s1stalld: f.stall_model == StallModel::StallAndTerminate && !stall,
            ..Ste::new(Config::S1Trans)
        };
        if let Err(e) = inner.drv.write_ste(sid, Some(&ste)) {
            inner.drv.free_cd_table(table);
            return Err(e.into());
        }
        inner.devices.insert(
            sid,
            Device {
                table,
                bonds: BTreeMap::new(),
                stall,
            },
        );
        Ok(())
    }

    /// Unbinds every process of the device, makes its STE abort and frees its CD table.
    pub fn detach_device(&self, sid: u32) -> Result<(), SmmuSvaError> {
        let ssids: Vec<u32> = {
            let inner = self.lock();
            let d = inner
                .devices
                .get(&sid)
                .ok_or(SmmuSvaError::NotAttached(sid))?;
            d.bonds.keys().copied().collect()
        };
        for ssid in ssids {
            self.unbind(sid, ssid)?;
        }
        let mut inner = self.lock();
        inner.drv.write_ste(sid, None)?;
        if let Some(d) = inner.devices.remove(&sid) {
            inner.drv.free_cd_table(d.table);
        }
        Ok(())
    }

    /// Binds `process`'s address space to the device `sid`: the lowest free SubstreamID
    /// (from 1: SubstreamID 0 is the device's own), a new ASID, the CD written, the mmu
    /// notifier registered. Returns the SubstreamID the device tags its requests with.
    pub fn bind(&self, sid: u32, process: &Arc<Process>) -> Result<u32, SmmuSvaError> {
        if process.arch() != crate::process::Arch::Aarch64 {
            return Err(SmmuSvaError::NotAarch64);
        }
        let mut inner = self.lock();
        let f = *inner.drv.features();
        let max_asid: u16 = if f.asid16 { u16::MAX } else { 0xff };
        let asid = (1..=max_asid)
            .find(|a| !inner.asids.contains(a))
            .ok_or(SmmuSvaError::Exhausted("ASID"))?;
        let Inner { drv, devices, .. } = &mut *inner;
        let dev = devices
            .get_mut(&sid)
            .ok_or(SmmuSvaError::NotAttached(sid))?;
        let ssid = (1..1u32 << dev.table.s1cdmax())
            .find(|s| !dev.bonds.contains_key(s))
            .ok_or(SmmuSvaError::Exhausted("SubstreamID"))?;
        let (ha, hd) = (f.httu != Httu::None, f.httu == Httu::AccessDirty);
        let cd = ContextDescriptor {
            ir0: 1,
            or0: 1,
            sh0: 3,
            ha,
            hd,
            mair: MAIR,
            s: dev.stall,
            ..ContextDescriptor::new(process.cr3().0, AARCH64_T0SZ, asid)
        };
        drv.write_cd(&mut dev.table, &[sid], ssid, Some(&cd))?;
        let notifier = process.register_notifier(Arc::new(BondNotifier {
            driver: self.me.clone(),
            sid,
            ssid,
            asid,
        }));
        dev.bonds.insert(
            ssid,
            Bond {
                process: process.clone(),
                asid,
                notifier,
            },
        );
        inner.asids.insert(asid);
        Ok(ssid)
    }

    /// Undoes a bind: notifier removed, CD cleared, the ASID's TLB entries and the
    /// SubstreamID's ATC entries invalidated, ASID and SubstreamID free again.
    pub fn unbind(&self, sid: u32, ssid: u32) -> Result<(), SmmuSvaError> {
        let mut inner = self.lock();
        let Inner {
            drv,
            devices,
            asids,
            ..
        } = &mut *inner;
        let dev = devices
            .get_mut(&sid)
            .ok_or(SmmuSvaError::NotAttached(sid))?;
        let bond = dev
            .bonds
            .remove(&ssid)
            .ok_or(SmmuSvaError::NotBound { sid, ssid })?;
        bond.process.unregister_notifier(bond.notifier);
        let r = drv
            .write_cd(&mut dev.table, &[sid], ssid, None)
            .and_then(|()| drv.tlbi_asid(0, bond.asid))
            .and_then(|()| drv.atc_inv(sid, Some(ssid), 0, 0));
        asids.remove(&bond.asid);
        Ok(r?)
    }

    /// The SubstreamIDs bound on the device `sid`, with their ASIDs.
    pub fn bonds(&self, sid: u32) -> Vec<(u32, u16)> {
        self.lock()
            .devices
            .get(&sid)
            .map(|d| d.bonds.iter().map(|(&s, b)| (s, b.asid)).collect())
            .unwrap_or_default()
    }

    /// Drains the event queue.
    pub fn read_events(&self) -> Result<Vec<Event>, SmmuSvaError> {
        Ok(self.lock().drv.read_events()?.records)
    }

    /// Declares whether the device `sid` can stall its transactions (the firmware's
    /// `dma-can-stall`), for the attaches that follow.
    pub fn set_stall_capable(&self, sid: u32, can_stall: bool) {
        let mut inner = self.lock();
        if can_stall {
            inner.can_stall.insert(sid);
        } else {
            inner.can_stall.remove(&sid);
        }
    }

    /// Drains the event queue: each stall event (Stall = 1) goes to the fault handler of
    /// the process bound to its SubstreamID and is answered with CMD_RESUME, Retry when
    /// it resolved the fault, Abort otherwise; the other events are returned. The stats
    /// count stalls as requests and their answers as groups.
    pub fn handle_events(&self) -> Result<(Vec<Event>, PageRequestStats), SmmuSvaError> {
        let events = self.lock().drv.read_events()?.records;
        let mut stats = PageRequestStats::default();
        let mut others = Vec::new();
        for e in events {
            if !e.stall {
                others.push(e);
                continue;
            }
            stats.requests += 1;
            let process = e.ssid.and_then(|ssid| {
                let inner = self.lock();
                let dev = inner.devices.get(&e.sid).filter(|d| d.stall)?;
                dev.bonds.get(&ssid).map(|b| b.process.clone())
            });
            // The fault handler runs without the driver's lock: it may invalidate.
            let resolved = process.is_some_and(|p| p.handle_fault(Gva(e.input_addr), !e.rnw));
            let action = if resolved {
                stats.resolved += 1;
                stats.succeeded += 1;
                ResumeAction::Retry
            } else {
                stats.denied += 1;
                ResumeAction::Abort
            };
            self.resume(e.sid, e.stag, action)?;
        }
        Ok((others, stats))
    }

    /// Ends the stalled transaction `stag` of the device `sid` with CMD_RESUME `action`,
    /// then CMD_SYNC (`arm_smmu_page_response` for a stall-capable master).
    pub fn resume(&self, sid: u32, stag: u16, action: ResumeAction) -> Result<(), SmmuSvaError> {
        Ok(self
            .lock()
            .drv
            .issue(&[Cmd::Resume { sid, action, stag }])?)
    }

    /// Drains the PRI queue: each request goes to the fault handler of the process bound
    /// to its SubstreamID; the last request of each group is answered with CMD_PRI_RESP,
    /// Success when every request of the group was resolved, Deny otherwise.
    pub fn handle_page_requests(&self) -> Result<PageRequestStats, SmmuSvaError> {
        let requests = self.lock().drv.read_page_requests()?.records;
        let mut stats = PageRequestStats::default();
        for req in requests {
            stats.requests += 1;
            let process = req.ssid.and_then(|ssid| {
                let inner = self.lock();
                let dev = inner.devices.get(&req.sid)?;
                dev.bonds.get(&ssid).map(|b| b.process.clone())
            });
            // The fault handler runs without the driver's lock: it may invalidate.
            let resolved = process.is_some_and(|p| p.handle_fault(Gva(req.addr), req.write));
            let group = (req.sid, req.ssid, req.prg_index);
            let mut inner = self.lock();
            if resolved {
                stats.resolved += 1;
            } else {
                inner.failed_groups.insert(group);
            }
            if req.last {
                let ok = !inner.failed_groups.remove(&group);
                let resp = if ok { PriResp::Success } else { PriResp::Deny };
                inner.drv.pri_resp(req.sid, req.ssid, req.prg_index, resp)?;
                if ok {
                    stats.succeeded += 1;
                } else {
                    stats.denied += 1;
                }
            }
        }
        Ok(stats)
    }

    /// Detaches every device, disables the SMMU and gives the region back.
    pub fn shutdown(self: Arc<Self>) -> Result<(), SmmuSvaError> {
        let sids: Vec<u32> = self.lock().devices.keys().copied().collect();
        for sid in sids {
            self.detach_device(sid)?;
        }
        let me = Arc::try_unwrap(self).map_err(|_| {
            SmmuSvaError::Driver(vsva_smmuv3_driver::Error::Unsupported(
                "shutdown while the driver is shared",
            ))
        })?;
        let inner = me.inner.into_inner().unwrap_or_else(|e| e.into_inner());
        let region = inner.drv.shutdown();
        debug_assert_eq!(region.free.get(&region.start), Some(&DMA_REGION));
        let _ = me.frames.free(me.region);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_allocates_aligned_and_merges_what_is_freed() {
        let mut r = Region {
            start: 0x10_0000,
            free: BTreeMap::from([(0x10_0000, 0x1_0000)]),
        };
        let a = r.alloc(0x800, 0x800).unwrap();
        let b = r.alloc(0x2000, 0x2000).unwrap();
        assert_eq!((a, b), (0x10_0000, 0x10_2000));
        // The gap below `b` serves a smaller block.
        assert_eq!(r.alloc(0x1000, 0x1000), Some(0x10_1000));
        assert_eq!(r.alloc(0x1_0000, 0x1000), None, "no room left");
        r.free(0x10_1000, 0x1000);
        r.free(a, 0x800);
        r.free(b, 0x2000);
        assert_eq!(r.free, BTreeMap::from([(0x10_0000, 0x1_0000)]));
    }
}
