//! The scalable-mode structures above the page tables (VT-d §3.4.3): root table, context
//! tables, and each attached device's PASID directory and PASID tables, in host frames.
//!
//! As in intel-iommu, the PASID directory of a device is allocated when it is attached,
//! sized for every PASID the unit supports, and its PASID tables when a PASID of their
//! range is first used (`intel_pasid_get_entry`). Unlike intel-iommu, context tables are
//! freed when their last device goes ([`ContextTables::release`]), so that a detached unit
//! holds nothing but its root table. Entries are written with P last when made present and P first when cleared, so
//! hardware never reads a half-written present entry.

use foldhash::{HashMap, HashMapExt};
use vsva_mem::PhysMem;

use vsva_hw::{memory::FrameAllocator, memory::PAGE_SIZE};
use vsva_vtd::{
    addr::DomainId, addr::Hpa, addr::Pasid, addr::SourceId, context::ScalableContextEntry,
    pasid::PasidEntry,
};
use vsva_vtd_driver::tables::{clear_entry, write_entry, ContextTables, PasidTables, TableFrames};

use super::device::DeviceInfo;
use super::error::DriverError;

/// Context entry bits the driver sets for a device (§9.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ContextFeatures {
    /// DTE: the device may send translation requests (ATS).
    pub dte: bool,
    /// PRE: the device may send page requests (PRI).
    pub pre: bool,
    /// PASIDE: requests with PASID are translated.
    pub paside: bool,
}

/// The tables of one attached device.
#[derive(Debug)]
pub(crate) struct DeviceTables {
    pub did: DomainId,
    /// What the driver enabled of the device at attach.
    pub info: DeviceInfo,
    pasid_tables: PasidTables,
}

/// The root table and everything below it.
#[derive(Debug)]
pub(crate) struct Tables {
    root: Hpa,
    contexts: ContextTables,
    devices: HashMap<u16, DeviceTables>,
}

fn alloc(frames: &FrameAllocator, size: u64) -> Result<Hpa, DriverError> {
    frames
        .alloc_range(size, PAGE_SIZE)
        .map_err(|_| DriverError::OutOfMemory)
}

fn free(frames: &FrameAllocator, hpa: Hpa) {
    if let Err(e) = frames.free(hpa) {
        tracing::error!("vt-d: freeing table {hpa}: {e}");
    }
}

/// The host's frames as the shared table code allocates them.
struct HostFrames<'a>(&'a FrameAllocator);

impl TableFrames for HostFrames<'_> {
    type Error = DriverError;

    fn alloc_frame(&self) -> Result<u64, DriverError> {
        alloc(self.0, PAGE_SIZE).map(|h| h.0)
    }

    fn alloc_frames(&self, pages: u64) -> Result<u64, DriverError> {
        alloc(self.0, pages * PAGE_SIZE).map(|h| h.0)
    }

    fn free_frame(&self, addr: u64) {
        free(self.0, Hpa(addr));
    }
}

impl Tables {
    /// An empty root table.
    pub fn new(frames: &FrameAllocator) -> Result<Self, DriverError> {
        Ok(Tables {
            root: alloc(frames, PAGE_SIZE)?,
            contexts: ContextTables::default(),
            devices: HashMap::new(),
        })
    }

    /// The root table (RTADDR_REG.RTA).
    pub fn root(&self) -> Hpa {
        self.root
    }

    /// The tables of an attached device.
    pub fn device(&self, sid: SourceId) -> Option<&DeviceTables> {
        self.devices.get(&sid.rid())
    }

    /// Records that `sid`'s RID_PASID entry now belongs to domain `did`.
    pub fn set_device_domain(&mut self, sid: SourceId, did: DomainId) {
        if let Some(d) = self.devices.get_mut(&sid.rid()) {
            d.did = did;
        }
    }

    /// Number of attached devices.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Sets up a device: a PASID directory for `pasid_bits` bits of PASID, the PASID entry
    /// of RID_PASID (PASID 0) from `rid_pasid_entry`, then the present context entry (root
    /// entry and context table as needed). On failure nothing is left behind.
    pub fn attach(
        &mut self,
        mem: &impl PhysMem,
        frames: &FrameAllocator,
        info: DeviceInfo,
        pasid_bits: u32,
        features: ContextFeatures,
        rid_pasid_entry: &PasidEntry,
    ) -> Result<(), DriverError> {
        let sid = info.sid();
        if self.devices.contains_key(&sid.rid()) {
            return Err(DriverError::DeviceBusy(sid));
        }
        let pasid_tables = PasidTables::alloc(&HostFrames(frames), pasid_bits)?;
        self.devices.insert(
            sid.rid(),
            DeviceTables {
                did: rid_pasid_entry.did,
                info,
                pasid_tables,
            },
        );
        let result = self
            .pasid_entry_slot(mem, frames, sid, Pasid::RID_PASID)
            .and_then(|slot| Ok(write_entry(mem, slot, &rid_pasid_entry.to_raw())?))
            .and_then(|()| self.set_context(mem, frames, sid, pasid_tables, features));
        if result.is_err() {
            if let Some(dev) = self.devices.remove(&sid.rid()) {
                dev.pasid_tables.free(mem, &HostFrames(frames));
            }
        }
        result
    }

    fn set_context(
        &mut self,
        mem: &impl PhysMem,
        frames: &FrameAllocator,
        sid: SourceId,
        pasid_tables: PasidTables,
        features: ContextFeatures,
    ) -> Result<(), DriverError> {
        let slot = self
            .contexts
            .entry(mem, &HostFrames(frames), self.root.0, sid)?;
        let entry = ScalableContextEntry {
            fpd: false,
            dte: features.dte,
            paside: features.paside,
            pre: features.pre,
            pdts: pasid_tables.pdts(),
            pasiddirptr: pasid_tables.dir(),
            rid_pasid: Pasid::RID_PASID,
            rid_priv: false,
        };
        write_entry(mem, slot, &entry.to_raw())?;
        self.contexts.hold(sid);
        Ok(())
    }

    /// The address of `pasid`'s entry in `sid`'s PASID table, allocating the table (and
    /// making its directory entry present) on first use.
    pub fn pasid_entry_slot(
        &mut self,
        mem: &impl PhysMem,
        frames: &FrameAllocator,
        sid: SourceId,
        pasid: Pasid,
    ) -> Result<u64, DriverError> {
        let dev = self
            .devices
            .get(&sid.rid())
            .ok_or(DriverError::NotAttached(sid))?;
        dev.pasid_tables
            .entry(mem, &HostFrames(frames), pasid)?
            .ok_or_else(|| {
                DriverError::invalid("PASID", format!("{pasid} is beyond the PASID directory"))
            })
    }

    /// The address of `pasid`'s entry if its PASID table exists.
    pub fn existing_pasid_slot(
        &self,
        mem: &impl PhysMem,
        sid: SourceId,
        pasid: Pasid,
    ) -> Option<u64> {
        let dev = self.devices.get(&sid.rid())?;
        dev.pasid_tables.existing_entry(mem, pasid)
    }

    /// Clears the context entry of an attached device; its tables stay until
    /// [`Self::release_device`], after the caches that may hold them are invalidated.
    pub fn clear_context(&self, mem: &impl PhysMem, sid: SourceId) -> Result<(), DriverError> {
        if !self.devices.contains_key(&sid.rid()) {
            return Err(DriverError::NotAttached(sid));
        }
        let slot = self
            .contexts
            .existing_entry(sid)
            .ok_or(DriverError::NotAttached(sid))?;
        Ok(clear_entry(mem, slot, 4)?)
    }

    /// Frees the PASID tables and directory of a device whose context entry is clear, and
    /// its context table (clearing the root entry half) once no device uses it. Returns
    /// whether a root entry changed.
    pub fn release_device(
        &mut self,
        mem: &impl PhysMem,
        frames: &FrameAllocator,
        sid: SourceId,
    ) -> Result<bool, DriverError> {
        let dev = self
            .devices
            .remove(&sid.rid())
            .ok_or(DriverError::NotAttached(sid))?;
        dev.pasid_tables.free(mem, &HostFrames(frames));
        Ok(self
            .contexts
            .release(mem, &HostFrames(frames), self.root.0, sid)?)
    }

    /// Frees the root table; every device must be detached.
    pub fn release(self, mem: &impl PhysMem, frames: &FrameAllocator) {
        for (_, dev) in self.devices {
            dev.pasid_tables.free(mem, &HostFrames(frames));
        }
        self.contexts.free_all(&HostFrames(frames));
        free(frames, self.root);
    }
}

pub(crate) use vsva_vtd_driver::tables::{clear_pasid_entry, read_pasid_entry, write_pasid_entry};
