//! A domain: one VFIO container's address space on the unit (intel-iommu's
//! `dmar_domain` in nesting mode), and the [`IommuBackend`] the container drives.
//!
//! The domain has a domain id and a second-level page table built from `MAP_DMA`: the
//! VMM's memory, resolved to host physical memory as `pin_user_pages` does, mapped at the
//! IOVA (the guest physical address) with the largest pages alignment allows. Its
//! devices translate requests without PASID through that table (RID_PASID), and each
//! PASID bound for the guest through a nested entry: the guest's first-level table,
//! walked through the domain's second level, so the guest reaches nothing but what the
//! VMM mapped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use smallvec::SmallVec;

use vsva_vtd::regs::{Cap, Ecap};
use vsva_vtd::{
    addr::DomainId, addr::Hpa, addr::Iova, addr::Pasid, addr::SourceId, builder::FrameSource,
    builder::MapFlags, builder::PageTableBuilder, builder::TableFormat, inv_desc::InvDesc,
    slpte::SlLevels, walk::PageSize,
};
use vsva_vtd_driver::inv::iotlb_range;
use vsva_vtd_driver::mask::{covering_order, WHOLE_SPACE};

use super::device::DeviceInfo;
use super::dirty::{harvest, DirtyBitmap};
use super::error::DriverError;
use super::frames::HostFrames;
use super::nested::{cache_invalidation, nested_entry, SecondLevel};
use super::unit::{HostIommu, RID_PASID};
use crate::binds::GpasidBinds;
use crate::container::{BackendInfo, IommuBackend};
use crate::error::HostError;
use crate::fault::FaultSink;
use vsva_uapi::iommu::{IOMMU_NESTING_FEAT_BIND_PGTBL, IOMMU_NESTING_FEAT_CACHE_INVLD};
use vsva_uapi::request::{
    BindGpasid, CacheInvalidate, DmaMap, NestingInfo, NestingVendor, PageRequest, PageResponse,
};

/// The page sizes of a second level, largest first.
const PAGE_SIZES: [PageSize; 3] = [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K];

/// The deepest second level CAP.SAGAW offers (`iommu_calculate_agaw`, from 5-level down),
/// and the domain's address width (`gaw`): that level's input width, capped at CAP.MGAW + 1
/// (`cap_mgaw`), as `prepare_domain_attach_device` computes it.
fn second_level_depth(cap: &Cap) -> Result<(SlLevels, u32), DriverError> {
    [SlLevels::Five, SlLevels::Four, SlLevels::Three]
        .into_iter()
        .find(|l| cap.sagaw & (1 << l.aw()) != 0)
        .map(|l| (l, l.input_width().min(cap.guest_address_width())))
        .ok_or(DriverError::Unsupported("a second-level address width"))
}

/// Whether the second level can map pages of `size` (CAP.SLLPS).
fn supports(cap: &Cap, size: PageSize) -> bool {
    match size {
        PageSize::Size4K => true,
        PageSize::Size2M => cap.sllps & 1 != 0,
        PageSize::Size1G => cap.sllps & 2 != 0,
    }
}

/// One container's domain.
#[derive(Debug)]
pub struct VtdDomain {
    unit: Arc<HostIommu>,
    did: DomainId,
    levels: SlLevels,
    /// The address width IOVAs must fit in (`dmar_domain->gaw`).
    addr_width: u32,
    /// The second level; taken only when the domain is dropped.
    sl: Option<PageTableBuilder>,
    devices: BTreeSet<SourceId>,
    bound: GpasidBinds,
    /// The end of the highest mapping (`dmar_domain->max_addr`): raised to `iova + size`
    /// by a map above it, lowered to `iova` when the mapping ending there is unmapped, as
    /// `intel_iommu_map` and `intel_iommu_unmap` keep it. A bind's `gpgd` must not exceed it.
    max_addr: u64,
    /// The domain was allocated for dirty tracking (iommufd's
    /// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`, intel-iommu's `domain->dirty_ops`).
    dirty_ops: bool,
    /// SLADE is set in the domain's PASID entries (`dmar_domain->dirty_tracking`).
    dirty_tracking: bool,
    /// Nested PASID entries over this domain made through iommufd, with their domain ids:
    /// a second-level change flushes their IOTLB entries and device TLBs too
    /// (`parent_domain_flush`).
    nested: BTreeMap<(SourceId, Pasid), DomainId>,
}

impl VtdDomain {
    /// A new domain on `unit`: a domain id and an empty second level.
    pub fn new(unit: &Arc<HostIommu>) -> Result<Self, DriverError> {
        let cap = unit.cap();
        let (levels, addr_width) = second_level_depth(&cap)?;
        let did = unit.alloc_domain_id()?;
        let sl = PageTableBuilder::new(
            TableFormat::SecondLevel(levels),
            &**unit.hardware().memory(),
            &mut HostFrames(unit.frames()),
        );
        match sl {
            Ok(sl) => Ok(VtdDomain {
                unit: unit.clone(),
                did,
                levels,
                addr_width,
                sl: Some(sl),
                devices: BTreeSet::new(),
                bound: GpasidBinds::default(),
                max_addr: 0,
                dirty_ops: false,
                dirty_tracking: false,
                nested: BTreeMap::new(),
            }),
            Err(e) => {
                unit.free_domain_id(did);
                Err(e.into())
            }
        }
    }

    /// A new domain that can track dirty pages (`IOMMU_HWPT_ALLOC_DIRTY_TRACKING`):
    /// EOPNOTSUPP when the unit has no second-level A/D bits (ECAP.SLADS), as
    /// `iommufd_hwpt_paging_alloc` refuses a device without `IOMMU_CAP_DIRTY_TRACKING`.
    /// Tracking starts off.
    pub fn new_dirty_tracking(unit: &Arc<HostIommu>) -> Result<Self, DriverError> {
        if !unit.dirty_tracking_supported() {
            return Err(DriverError::NotSupported("dirty tracking (ECAP.SLADS)"));
        }
        let mut domain = Self::new(unit)?;
        domain.dirty_ops = true;
        Ok(domain)
    }

    /// The unit.
    pub fn unit(&self) -> &Arc<HostIommu> {
        &self.unit
    }

    /// The domain id.
    pub fn did(&self) -> DomainId {
        self.did
    }

    /// The depth of the second level.
    pub fn levels(&self) -> SlLevels {
        self.levels
    }

    /// The address width IOVAs must fit in: the second level's input width, capped at
    /// CAP.MGAW + 1.
    pub fn addr_width(&self) -> u32 {
        self.addr_width
    }

    /// The second level's root (SLPTPTR).
    pub fn second_level_root(&self) -> Hpa {
        Hpa(self.sl.as_ref().map_or(0, PageTableBuilder::root))
    }

    /// Frames the second level holds, root included.
    pub fn table_frames(&self) -> usize {
        self.sl.as_ref().map_or(0, PageTableBuilder::table_frames)
    }

    /// The attached devices.
    pub fn devices(&self) -> Vec<SourceId> {
        self.devices.iter().copied().collect()
    }

    /// The bound host PASIDs.
    pub fn bound_pasids(&self) -> Vec<Pasid> {
        self.bound.pasids().collect()
    }

    /// The host page and page size `iova` maps to in the second level.
    pub fn lookup(&self, iova: Iova) -> Option<(Hpa, PageSize)> {
        let sl = self.sl.as_ref()?;
        let m = sl
            .lookup(&**self.unit.hardware().memory(), iova.raw())
            .ok()??;
        Some((Hpa(m.page), m.size))
    }

    /// EINVAL for an empty range, one not 4 KiB aligned (IOVA, `addr` and size), or one
    /// with IOVAs beyond the domain's address width (`vfio_dma_do_map`'s aperture check).
    fn check_range(
        &self,
        what: &'static str,
        iova: u64,
        addr: u64,
        size: u64,
    ) -> Result<(), DriverError> {
        let page = PageSize::Size4K.bytes();
        if size == 0 || (iova | addr | size) % page != 0 {
            return Err(DriverError::invalid(what, "empty or not 4 KiB aligned"));
        }
        let end = iova.checked_add(size);
        if end.is_none_or(|e| e > 1u64 << self.addr_width) {
            return Err(DriverError::IovaOutOfRange {
                iova,
                size,
                width: self.addr_width,
            });
        }
        Ok(())
    }

    /// Maps `[iova, iova + size)` to host memory from `hpa` (readable and/or writable),
    /// as `iommu_map` does for a domain: the range checks of [`IommuBackend::map_dma`],
    /// the largest pages alignment allows, one IOTLB descriptor. Host memory the caller
    /// resolved (a pinned user range, a file's pages) is the caller's to keep.
    pub(crate) fn map_pages(
        &mut self,
        iova: u64,
        hpa: u64,
        size: u64,
        read: bool,
        write: bool,
    ) -> Result<(), DriverError> {
        const WHAT: &str = "map";
        if !read && !write {
            return Err(DriverError::invalid(WHAT, "neither readable nor writable"));
        }
        self.check_range(WHAT, iova, hpa, size)?;
        let mut flags = MapFlags::NONE;
        if read {
            flags = flags | MapFlags::READ;
        }
        if write {
            flags = flags | MapFlags::WRITE;
        }
        let last = iova + (size - 1);
        self.map_range(iova, hpa, size, flags)?;
        // Not-present entries made present: only a caching-mode unit (CAP.CM) needs an
        // invalidation; one IOTLB descriptor is issued anyway, and device TLBs, which
        // never cache a failed translation, are left alone.
        self.invalidate(&[iotlb_range(self.did, iova, last, &self.unit.cap())]);
        self.max_addr = self.max_addr.max(last + 1);
        Ok(())
    }

    /// The nested PASID entry of a guest stage-1 table over this domain for an iommufd
    /// nested HWPT with domain id `did` (`intel_pasid_setup_nested`): the checks of
    /// the type1 bind (nesting support, address width, table address, SRE/EAFE support),
    /// and WPE, which the type1 bind data lacks.
    pub(crate) fn nested_pasid_entry(
        &self,
        did: DomainId,
        bind: &BindGpasid,
        wpe: bool,
    ) -> Result<vsva_vtd::pasid::PasidEntry, DriverError> {
        let sl = SecondLevel {
            did,
            ..self.second_level()
        };
        let entry = nested_entry(bind, &sl, &self.unit.cap(), &self.unit.ecap())?;
        Ok(vsva_vtd::pasid::PasidEntry { wpe, ..entry })
    }

    /// Records (`Some(did)`) or forgets (`None`) a nested entry of `sid`'s `pasid` over
    /// this domain, whose domain id second-level flushes must cover.
    pub(crate) fn track_nested(&mut self, sid: SourceId, pasid: Pasid, did: Option<DomainId>) {
        match did {
            Some(d) => self.nested.insert((sid, pasid), d),
            None => self.nested.remove(&(sid, pasid)),
        };
    }

    fn second_level(&self) -> SecondLevel {
        SecondLevel {
            did: self.did,
            root: self.second_level_root().0,
            levels: self.levels,
            slade: self.dirty_tracking,
        }
    }

    /// Whether the domain was allocated for dirty tracking.
    pub fn dirty_tracking_capable(&self) -> bool {
        self.dirty_ops
    }

    /// Whether the domain tracks dirty pages now (SLADE set in its entries).
    pub fn dirty_tracking(&self) -> bool {
        self.dirty_tracking
    }

    /// Turns dirty tracking on or off (`IOMMU_HWPT_SET_DIRTY_TRACKING`): EOPNOTSUPP for a
    /// domain not allocated for it. Turning it on first clears every D bit of the second
    /// level, with the IOTLB flush that follows, so that no dirty page of an earlier round
    /// is reported (iommufd's `iopt_set_dirty_tracking`, also when it is on already). Then
    /// SLADE is set or cleared in the RID_PASID entry of every device and in every nested
    /// entry bound over the second level (`intel_iommu_set_dirty_tracking` with
    /// `parent_domain_set_dirty_tracking`), each change followed by its invalidations; if
    /// one fails, the entries changed so far go back and the domain keeps its old state.
    pub fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), DriverError> {
        if !self.dirty_ops {
            return Err(DriverError::NotSupported(
                "dirty tracking on a domain allocated without it",
            ));
        }
        if enable {
            self.clear_dirty()?;
        }
        if enable == self.dirty_tracking {
            return Ok(());
        }
        let entries: Vec<(SourceId, Pasid)> = self
            .devices
            .iter()
            .flat_map(|&sid| {
                std::iter::once(RID_PASID)
                    .chain(self.bound.pasids())
                    .map(move |p| (sid, p))
            })
            .collect();
        for (done, &(sid, pasid)) in entries.iter().enumerate() {
            if let Err(e) = self.unit.set_pasid_slade(sid, pasid, enable) {
                for &(sid, pasid) in &entries[..done] {
                    if let Err(undo) = self.unit.set_pasid_slade(sid, pasid, !enable) {
                        tracing::error!("vt-d: restoring SLADE of {pasid} of {sid}: {undo}");
                    }
                }
                return Err(e);
            }
        }
        self.dirty_tracking = enable;
        Ok(())
    }

    /// Reads the dirty pages of `bitmap`'s range into it (`IOMMU_HWPT_GET_DIRTY_BITMAP`,
    /// `intel_iommu_read_and_clear_dirty`): every present leaf of the second level that
    /// maps part of the range and has D set sets the bits of the pages it maps. Unless
    /// `no_clear` (`IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`), D is cleared in those leaves
    /// and the IOTLB and device TLBs are invalidated over the range they cover
    /// (`iommu_iotlb_sync` of the gathered range): a cached translation keeps the
    /// permission to write without setting D again, so without the flush the next write
    /// to the page would go unreported. EOPNOTSUPP for a domain not allocated for dirty
    /// tracking, EINVAL while tracking is off.
    pub fn read_and_clear_dirty(
        &self,
        bitmap: &mut DirtyBitmap<'_>,
        no_clear: bool,
    ) -> Result<u64, DriverError> {
        if !self.dirty_ops {
            return Err(DriverError::NotSupported(
                "dirty tracking on a domain allocated without it",
            ));
        }
        if !self.dirty_tracking {
            return Err(DriverError::invalid(
                "dirty bitmap",
                "dirty tracking is off",
            ));
        }
        let found = harvest(
            &**self.unit.hardware().memory(),
            self.second_level_root().0,
            self.levels,
            bitmap.iova(),
            bitmap.last(),
            !no_clear,
            &mut |iova, len| bitmap.record(iova, len),
        )?;
        if let Some((lo, hi)) = found.cleared {
            self.flush_range(lo, hi);
        }
        Ok(found.dirty)
    }

    /// Clears every D bit of the second level and flushes what they covered (the
    /// bitmap-less read iommufd's `iopt_clear_dirty_data` does).
    fn clear_dirty(&self) -> Result<(), DriverError> {
        let found = harvest(
            &**self.unit.hardware().memory(),
            self.second_level_root().0,
            self.levels,
            0,
            u64::MAX,
            true,
            &mut |_, _| {},
        )?;
        if let Some((lo, hi)) = found.cleared {
            self.flush_range(lo, hi);
        }
        Ok(())
    }

    fn nested_entry(&self, bind: &BindGpasid) -> Result<vsva_vtd::pasid::PasidEntry, DriverError> {
        nested_entry(
            bind,
            &self.second_level(),
            &self.unit.cap(),
            &self.unit.ecap(),
        )
    }

    /// The invalidations after second-level entries of `[start, last]` were removed: the
    /// IOTLB (page-selective with the covering mask, which also drops the domain's nested
    /// translations), the device TLBs of requests without PASID for the range, and, since
    /// device TLBs cache nested translations by first-level address, the whole device TLB
    /// of every bound PASID (`iommu_flush_iotlb_psi` with `iommu_flush_dev_iotlb`).
    fn flush_range(&self, start: u64, last: u64) {
        let cap = self.unit.cap();
        let order = covering_order(start, last);
        let mut descs: Vec<InvDesc> = vec![iotlb_range(self.did, start, last, &cap)];
        let nested_dids: BTreeSet<DomainId> = self.nested.values().copied().collect();
        descs.extend(
            nested_dids
                .iter()
                .map(|&d| iotlb_range(d, start, last, &cap)),
        );
        for &(sid, pasid) in self.nested.keys() {
            let info = self.unit.device_info(sid);
            descs.extend(info.and_then(|d| d.dev_iotlb(Some(pasid), 0, WHOLE_SPACE)));
        }
        for &sid in &self.devices {
            let Some(info) = self.unit.device_info(sid) else {
                continue;
            };
            descs.extend(info.dev_iotlb(None, start, order));
            for pasid in self.bound.pasids() {
                descs.extend(info.dev_iotlb(Some(pasid), 0, WHOLE_SPACE));
            }
        }
        self.invalidate(&descs);
    }

    fn invalidate(&self, descs: &[InvDesc]) {
        if let Err(e) = self.unit.invalidate(descs) {
            tracing::error!("vt-d: {}: second-level invalidation failed: {e}", self.did);
        }
    }

    /// Maps `[iova, iova + size)` to host memory from `hpa` in the largest pages the
    /// alignment of both and CAP.SLLPS allow. Empty tables left where a large page goes
    /// (by an earlier unmap) are unhooked first and freed after the invalidation that
    /// drops any paging-structure cache entry pointing at them, as `__domain_mapping`
    /// frees them for a superpage. On failure the pages mapped are removed.
    fn map_range(
        &mut self,
        iova: u64,
        hpa: u64,
        size: u64,
        flags: MapFlags,
    ) -> Result<(), DriverError> {
        let cap = self.unit.cap();
        let mem = &**self.unit.hardware().memory();
        let mut frames = HostFrames(self.unit.frames());
        let Some(sl) = self.sl.as_mut() else {
            return Err(DriverError::Unsupported("a second level"));
        };
        let mut done = 0;
        let mut unhooked = Vec::new();
        let mut result = Ok(());
        while done < size {
            let (va, pa) = (iova + done, hpa + done);
            let page = PAGE_SIZES
                .into_iter()
                .find(|s| {
                    let b = s.bytes();
                    supports(&cap, *s) && va % b == 0 && pa % b == 0 && size - done >= b
                })
                .unwrap_or(PageSize::Size4K);
            let mapped = match page {
                PageSize::Size4K => Ok(()),
                large => sl
                    .unhook_empty(mem, va, large.level())
                    .map(|tables| unhooked.extend(tables)),
            }
            .and_then(|()| sl.map(mem, &mut frames, va, pa, page, flags));
            if let Err(e) = mapped {
                result = Err(e.into());
                break;
            }
            done += page.bytes();
        }
        if !unhooked.is_empty() {
            self.flush_range(iova, iova + (size - 1));
            for t in unhooked {
                frames.free_table(t);
            }
        }
        if result.is_err() && done > 0 {
            self.unmap_range(iova, done);
        }
        result
    }

    /// Removes every page in `[iova, iova + size)` and invalidates.
    fn unmap_range(&mut self, iova: u64, size: u64) {
        let mem = &**self.unit.hardware().memory();
        let Some(sl) = self.sl.as_mut() else {
            return;
        };
        let end = iova.saturating_add(size);
        let mut at = iova;
        while at < end {
            match sl.lookup(mem, at) {
                Ok(Some(m)) => {
                    let page = at & !(m.size.bytes() - 1);
                    if let Err(e) = sl.unmap(mem, page, m.size) {
                        tracing::error!("vt-d: unmapping {page:#x}: {e}");
                    }
                    at = page + m.size.bytes();
                }
                Ok(None) => at += PageSize::Size4K.bytes(),
                Err(e) => {
                    tracing::error!("vt-d: walking the second level at {at:#x}: {e}");
                    at += PageSize::Size4K.bytes();
                }
            }
        }
        self.flush_range(iova, end - 1);
    }

    /// Binds `bind` for device `sid`; a device without 20-bit PASIDs is refused with
    /// EINVAL, as `intel_svm_bind_gpasid` refuses it (F15).
    fn install_binding(&self, sid: SourceId, bind: &BindGpasid) -> Result<(), DriverError> {
        let info = self
            .unit
            .device_info(sid)
            .ok_or(DriverError::NotAttached(sid))?;
        if !info.full_pasid_width() {
            return Err(DriverError::invalid(
                "bind",
                format!("{sid} does not take {}-bit PASIDs", Pasid::BITS),
            ));
        }
        self.unit
            .install_pasid_entry(sid, bind.hpasid, &self.nested_entry(bind)?)?;
        self.unit.route_page_requests(sid, bind.hpasid, self.did);
        Ok(())
    }

    fn remove_binding(&self, sid: SourceId, pasid: Pasid) {
        // Unroute first: a request the teardown's page-request drain finds for this PASID
        // is then answered Invalid by the unit, not reported to a container that no
        // longer has the PASID bound.
        self.unit.unroute_page_requests(sid, pasid);
        self.unit.remove_pasid_entry(sid, pasid, true);
    }

    /// Attaches a device: its context entry and RID_PASID entry translate through the
    /// domain's second level, and the PASIDs bound so far are bound for it too.
    pub(crate) fn attach(&mut self, sid: SourceId) -> Result<(), DriverError> {
        if self.devices.contains(&sid) {
            return Err(DriverError::DeviceBusy(sid));
        }
        self.unit.attach_device(sid, &self.second_level())?;
        let mut installed = Vec::new();
        for bind in self.bound.iter() {
            if let Err(e) = self.install_binding(sid, bind) {
                for &pasid in &installed {
                    self.remove_binding(sid, pasid);
                }
                self.unit.detach_device(sid);
                return Err(e);
            }
            installed.push(bind.hpasid);
        }
        self.devices.insert(sid);
        Ok(())
    }

    /// Takes device `sid` over from `from`, the domain its requests without PASID use now,
    /// by replacing its RID_PASID entry (its PASID entries stay). `from` must have no
    /// PASID bound (the iommufd path binds none there).
    pub(crate) fn replace_device(
        &mut self,
        sid: SourceId,
        from: &mut VtdDomain,
    ) -> Result<(), DriverError> {
        if !from.devices.contains(&sid) {
            return Err(DriverError::NotAttached(sid));
        }
        if self.devices.contains(&sid) {
            return Err(DriverError::DeviceBusy(sid));
        }
        self.unit.replace_rid_domain(sid, &self.second_level())?;
        from.devices.remove(&sid);
        self.devices.insert(sid);
        Ok(())
    }

    fn detach(&mut self, sid: SourceId) {
        if !self.devices.remove(&sid) {
            return;
        }
        for pasid in self.bound.pasids() {
            self.remove_binding(sid, pasid);
        }
        self.unit.detach_device(sid);
    }

    fn bind(&mut self, bind: &BindGpasid) -> Result<(), DriverError> {
        if self.bound.contains(bind.hpasid) {
            return Err(DriverError::invalid(
                "guest PASID bind",
                format!("{} is bound already", bind.hpasid),
            ));
        }
        self.nested_entry(bind)?;
        // `intel_svm_bind_gpasid`: a guest table pointer beyond the end of the highest
        // mapping cannot be guest memory the VMM mapped.
        if bind.gpgd.raw() > self.max_addr {
            return Err(DriverError::invalid(
                "guest PASID bind",
                format!(
                    "guest page table {} is beyond the mapped memory (up to {:#x})",
                    bind.gpgd, self.max_addr
                ),
            ));
        }
        // Inline for the usual few devices: a bind allocates no list of its own.
        let mut done: SmallVec<[SourceId; 4]> = SmallVec::new();
        for &sid in &self.devices {
            if let Err(e) = self.install_binding(sid, bind) {
                for &s in &done {
                    self.remove_binding(s, bind.hpasid);
                }
                return Err(e);
            }
            done.push(sid);
        }
        self.bound.insert(*bind);
        Ok(())
    }
}

impl IommuBackend for VtdDomain {
    /// The second level's page sizes (4 KiB and those of CAP.SLLPS) and, when the unit
    /// nests, the nesting capability of the seed's `iommu_nesting_info`: guest page-table
    /// bind and cache invalidation, the domain's address width, the unit's PASID bits and
    /// the first-level capabilities a guest needs (CAP.FL1GP/FL5LP; ECAP.PRS, ERS, SRS,
    /// EAFS, PASID).
    fn info(&self) -> BackendInfo {
        let cap = self.unit.cap();
        let ecap = self.unit.ecap();
        let iova_pgsizes = PAGE_SIZES
            .into_iter()
            .filter(|s| supports(&cap, *s))
            .fold(0, |acc, s| acc | s.bytes());
        let nesting = (ecap.nest && ecap.flts && ecap.pasid).then(|| NestingInfo {
            features: IOMMU_NESTING_FEAT_BIND_PGTBL | IOMMU_NESTING_FEAT_CACHE_INVLD,
            addr_width: self.addr_width as u16,
            pasid_bits: ecap.pasid_bits() as u16,
            vendor: NestingVendor::IntelVtd {
                cap_reg: Cap {
                    fl1gp: cap.fl1gp,
                    fl5lp: cap.fl5lp,
                    ..Cap::default()
                }
                .to_raw()
                .unwrap_or(0),
                ecap_reg: Ecap {
                    prs: ecap.prs,
                    ers: ecap.ers,
                    srs: ecap.srs,
                    eafs: ecap.eafs,
                    pasid: ecap.pasid,
                    ..Ecap::default()
                }
                .to_raw()
                .unwrap_or(0),
            },
        });
        BackendInfo {
            iova_pgsizes,
            nesting,
        }
    }

    /// Resolves the VMM's `vaddr` range to host memory and maps it at `iova` (readable
    /// and/or writable as asked). EINVAL for a mapping with
    /// neither right, not 4-KiB aligned, or with IOVAs beyond the domain's address width
    /// (`vfio_dma_do_map`'s aperture check); EFAULT for memory that is not host memory.
    fn map_dma(&mut self, map: &DmaMap) -> Result<(), HostError> {
        const WHAT: &str = "MAP_DMA";
        if !map.read && !map.write {
            return Err(DriverError::invalid(WHAT, "neither readable nor writable").into());
        }
        self.check_range(WHAT, map.iova.raw(), map.vaddr, map.size)?;
        let hpa = self
            .unit
            .hardware()
            .memory()
            .resolve_user(map.vaddr, map.size)
            .map_err(|_| DriverError::BadUserAddress {
                vaddr: map.vaddr,
                size: map.size,
            })?;
        Ok(self.map_pages(map.iova.raw(), hpa.0, map.size, map.read, map.write)?)
    }

    /// Removes the pages of an earlier mapping, then invalidates the IOTLB with one
    /// page-selective descriptor covering the range and the device TLBs (see
    /// [`VtdDomain`]'s `flush_range`).
    fn unmap_dma(&mut self, iova: Iova, size: u64) {
        if size > 0 {
            self.unmap_range(iova.raw(), size);
            if iova.raw().checked_add(size) == Some(self.max_addr) {
                self.max_addr = iova.raw();
            }
        }
    }

    /// Writes the nested PASID entry of `bind.hpasid` for every device of the domain
    /// (`intel_svm_bind_gpasid`), invalidates, and routes the PASID's page requests to
    /// the domain's sink with the guest PASID.
    fn bind_gpasid(&mut self, bind: &BindGpasid) -> Result<(), HostError> {
        Ok(self.bind(bind)?)
    }

    /// Tears the nested entry down on every device, drains the PASID's page requests and
    /// answers those still pending with Invalid Request (`intel_svm_unbind_gpasid`).
    fn unbind_gpasid(&mut self, bind: &BindGpasid) {
        if self.bound.remove(bind.hpasid).is_none() {
            return;
        }
        for &sid in &self.devices {
            self.remove_binding(sid, bind.hpasid);
        }
    }

    /// Carries out a guest's first-level invalidation in this domain only, for its
    /// devices (`intel_iommu_sva_invalidate`; see `cache_invalidation` for the table).
    fn cache_invalidate(&mut self, inv: &CacheInvalidate) -> Result<(), HostError> {
        // Held inline for the usual few devices: an invalidation allocates nothing.
        let devices: SmallVec<[DeviceInfo; 4]> = self
            .devices
            .iter()
            .filter_map(|&sid| self.unit.device_info(sid))
            .collect();
        let descs = cache_invalidation(inv, self.did, &devices, &self.unit.cap())?;
        Ok(self.unit.invalidate(&descs)?)
    }

    /// Attaches a device: its context entry and RID_PASID entry translate through the
    /// domain's second level, and the PASIDs bound so far are bound for it too. A device
    /// bound to an iommufd through its cdev is EBUSY (`vfio_group_fops_open`).
    fn attach_device(&mut self, sid: SourceId) -> Result<(), HostError> {
        let claimed = self.unit.open_devices().claim_for_container(sid)?;
        self.attach(sid).map_err(|e| {
            if claimed {
                self.unit.open_devices().release_from_container(sid);
            }
            e.into()
        })
    }

    /// Detaches a device: its bound PASIDs, RID_PASID entry, context entry and PASID
    /// tables go, with their invalidations; a cdev may bind it again.
    fn detach_device(&mut self, sid: SourceId) {
        self.detach(sid);
        self.unit.open_devices().release_from_container(sid);
    }

    /// Sends the domain's page requests to the container's fault queue: each request on
    /// a bound PASID of one of its devices. Requests the queue refuses, and any while no
    /// queue is set, are answered with Invalid Request.
    fn set_fault_sink(&mut self, sink: FaultSink) {
        self.unit.set_page_request_sink(self.did, Some(sink));
    }

    /// Answers a page request group of device `sid` reported to the container
    /// (`intel_svm_page_response`): the response must name a PASID (EINVAL) bound in this
    /// domain, for one of its devices (ENODEV otherwise). The response returns the
    /// request's private data.
    fn page_response(
        &mut self,
        sid: SourceId,
        request: &PageRequest,
        response: &PageResponse,
    ) -> Result<(), HostError> {
        let Some(pasid) = response.pasid else {
            return Err(DriverError::invalid("page response", "no PASID").into());
        };
        if !self.devices.contains(&sid) {
            return Err(DriverError::NotAttached(sid).into());
        }
        if !self.bound.contains(pasid) {
            return Err(DriverError::NotBound(pasid).into());
        }
        Ok(self.unit.page_response(sid, request, response)?)
    }
}

impl Drop for VtdDomain {
    /// Detaches every device, frees the second level and the domain id.
    fn drop(&mut self) {
        for sid in self.devices() {
            self.detach(sid);
        }
        self.bound = GpasidBinds::default();
        self.unit.set_page_request_sink(self.did, None);
        if let Some(sl) = self.sl.take() {
            sl.destroy(&mut HostFrames(self.unit.frames()));
        }
        self.unit.free_domain_id(self.did);
    }
}
