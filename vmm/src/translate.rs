//! Translation for emulated devices: the vIOMMU is a configuration of the VT-d request
//! pipeline ([`vsva_vtd::request`]) that walks the guest's first-level tables over guest RAM
//! itself (§3.6), through its own context cache, PASID cache and IOTLB (see `caches`),
//! which keep what they hold until the guest invalidates it, as hardware does.

use std::cell::Cell;
use std::sync::atomic::Ordering;

use vsva_vtd::invalidation::IotlbInvalidation;
use vsva_vtd::regs::AddressType;
use vsva_vtd::request::{self, Remapped, RemappingUnit, Request};
use vsva_vtd::{
    addr::DomainId, addr::Gpa, addr::Pasid, addr::SourceId, context::ScalableContextEntry,
    pasid::ValidPasidEntry, request::TranslationFault, root::EntryChecks, root::EntryFault,
    walk::walk_first_level, walk::walk_first_level_from, walk::AccessRequest, walk::Direct,
    walk::FlConfig, walk::FlStart, walk::PageSize, walk::Permissions, walk::StepOutcome,
    walk::Translation, walk::WalkFault, walk::WalkObserver, walk::WalkStep,
};

use crate::caches::{IotlbEntry, IotlbScope};
use crate::space::{table_last, CachedPage, SpaceRun, SpaceScope, SpaceUnit, Spaces};
use crate::stats::Counters;
use crate::viommu::{GuestRam, VIommu};

/// A successful translation of a DMA address to guest physical.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpaTranslation {
    /// The guest physical address of the requested byte.
    pub gpa: Gpa,
    /// The size of the translated page.
    pub page_size: PageSize,
    /// The rights granted to requests of the translated request's privilege.
    pub perms: Permissions,
    /// The leaf has D set: the page may be written without another walk.
    pub dirty: bool,
    /// The domain id of the PASID entry used (`None` when translation is disabled).
    pub did: Option<DomainId>,
    /// The PASID the request was translated with (its own, or RID_PASID).
    pub pasid: Option<Pasid>,
    /// Served by the IOTLB without reading any table.
    pub cached: bool,
}

impl GpaTranslation {
    /// The guest physical base of the translated page.
    pub fn page_base(&self) -> Gpa {
        Gpa(self.gpa.raw() & !(self.page_size.bytes() - 1))
    }
}

impl VIommu {
    /// Translates a DMA request of an emulated device from `sid` (with `pasid`, or without
    /// PASID) to `addr`, as a remapping unit does for an untranslated request, through the
    /// request pipeline ([`request::translate`]); a fault is recorded in the fault
    /// recording registers unless an FPD field disables it.
    ///
    /// A translation the IOTLB holds stays in use, with no table read, until the guest
    /// invalidates it, whatever its tables say meanwhile.
    pub fn translate(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: AccessRequest,
    ) -> Result<GpaTranslation, TranslationFault> {
        self.translate_with(None, sid, pasid, addr, access)
    }

    /// [`VIommu::translate`], which also gives `leaf` where its walk, if it walked, read
    /// the leaf from.
    fn translate_with(
        &self,
        leaf: Option<&LeafSlot>,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: AccessRequest,
    ) -> Result<GpaTranslation, TranslationFault> {
        let req = Request::new(sid, pasid, addr, access);
        let result = request::translate(&Unit(self, leaf), req);
        if let Err(fault) = &result {
            if !fault.fpd {
                self.record_fault(fault, access);
            }
        }
        result
    }

    /// The context entry of `sid` under the root table at `rta`, from the context cache or
    /// the tables (cached then, as a translation's read is, §6.2.1).
    pub(crate) fn context_entry(
        &self,
        rta: u64,
        sid: SourceId,
    ) -> Result<ScalableContextEntry, EntryFault> {
        request::context_entry(&Unit(self, None), rta, sid)
    }

    /// Records a fault in the fault recording registers (primary fault logging, §7.2.1).
    fn record_fault(&self, fault: &TranslationFault, access: AccessRequest) {
        let record = fault.record(access, AddressType::Untranslated);
        Counters::bump(&self.counters.faults_recorded);
        let (_, irq) = self.regs.lock().record_fault(&record);
        self.deliver(irq);
    }

    /// Removes what an IOTLB or PASID-based IOTLB invalidation covers from the IOTLB and
    /// from the IOTLBs of the vm-memory address spaces.
    ///
    /// The vIOMMU caches first-level translations only, so a page-selective IOTLB
    /// invalidation removes every entry of its domain (§6.5.2.3).
    pub(crate) fn invalidate_iotlb(&self, inv: IotlbInvalidation) {
        let scope = match inv {
            IotlbInvalidation::Global => IotlbScope::All,
            IotlbInvalidation::Domain(did) | IotlbInvalidation::DomainPages { did, .. } => {
                IotlbScope::Domain(did)
            }
            IotlbInvalidation::Pasid { did, pasid } => IotlbScope::Pasid(did, pasid),
            IotlbInvalidation::PasidPages {
                did, pasid, range, ..
            } => IotlbScope::Range(did, pasid, range),
        };
        self.caches.invalidate_iotlb(scope);
        self.spaces.invalidate(scope);
    }
}

/// Where a first-level walk read its leaf from: the PASID entry's first-level
/// configuration and the leaf's table with the rights of the entries above it (what a
/// paging-structure cache entry holds, §6.2.5).
type LeafSlot = Cell<Option<(FlConfig, FlStart)>>;

/// Follows a first-level walk down to the table it reads the leaf from.
struct LeafTable(FlStart);

impl WalkObserver for LeafTable {
    fn step(&mut self, step: WalkStep) {
        if let StepOutcome::Table(_) = step.outcome {
            self.0 = self.0.below(step.entry);
        }
    }
}

/// The vIOMMU's caches and guest RAM, as the request pipeline uses them. One epoch covers
/// every cache: an invalidation of any of them drops the fills of walks in flight.
/// (A view of the vIOMMU, so that its cache types stay private.) A walk tells the slot,
/// if there is one, where it read the leaf from.
struct Unit<'a>(&'a VIommu, Option<&'a LeafSlot>);

impl RemappingUnit for Unit<'_> {
    type Mem = GuestRam;
    type IotlbEntry = IotlbEntry;
    type Output = GpaTranslation;

    fn output(&self, req: &Request, how: Remapped<IotlbEntry>) -> GpaTranslation {
        let addr = req.addr;
        match how {
            Remapped::Untranslated => GpaTranslation {
                gpa: Gpa(addr),
                page_size: PageSize::Size4K,
                perms: Permissions::ALL,
                dirty: true,
                did: None,
                pasid: None,
                cached: false,
            },
            Remapped::Cached { entry, pasid } => GpaTranslation {
                gpa: Gpa(entry.page | (addr & (entry.page_size.bytes() - 1))),
                page_size: entry.page_size,
                perms: entry.perms,
                dirty: entry.dirty,
                did: Some(entry.did),
                pasid: Some(pasid),
                cached: true,
            },
            Remapped::Walked {
                entry,
                pasid,
                output,
            } => GpaTranslation {
                gpa: Gpa(output),
                page_size: entry.page_size,
                perms: entry.perms,
                dirty: entry.dirty,
                did: Some(entry.did),
                pasid: Some(pasid),
                cached: false,
            },
        }
    }

    fn root_word(&self) -> u64 {
        self.0.root.load(Ordering::Acquire)
    }

    fn memory(&self) -> &GuestRam {
        &self.0.mem
    }

    fn entry_checks(&self) -> &EntryChecks {
        &self.0.entry_checks
    }

    fn iotlb_lookup(
        &self,
        sid: SourceId,
        pasid: Pasid,
        addr: u64,
        access: AccessRequest,
    ) -> Option<IotlbEntry> {
        self.0
            .caches
            .lookup(sid, pasid, addr)
            .filter(|e| e.allows(access))
    }

    type Fill = u64;

    fn begin_fill(&self) -> u64 {
        self.0.caches.epoch()
    }

    fn iotlb_insert(
        &self,
        fill: u64,
        sid: SourceId,
        pasid: Pasid,
        addr: u64,
        pe: &ValidPasidEntry,
        t: &Translation,
        access: AccessRequest,
    ) -> IotlbEntry {
        let entry = IotlbEntry {
            did: pe.did(),
            page: t.page_base(),
            page_size: t.page_size,
            perms: t.perms,
            dirty: t.dirty,
            supervisor: access.supervisor,
        };
        self.0.caches.insert(fill, sid, pasid, addr, entry);
        entry
    }

    fn entry_fill(&self) -> u64 {
        self.0.caches.epoch()
    }

    fn cached_context(&self, sid: SourceId) -> Option<ScalableContextEntry> {
        self.0.caches.context(sid)
    }

    fn cache_context(&self, fill: u64, sid: SourceId, ctx: &ScalableContextEntry) {
        self.0.caches.insert_context(fill, sid, *ctx);
    }

    fn cached_pasid_entry(&self, sid: SourceId, pasid: Pasid) -> Option<ValidPasidEntry> {
        self.0.caches.pasid_entry(sid, pasid)
    }

    fn cache_pasid_entry(&self, fill: u64, sid: SourceId, pasid: Pasid, pe: &ValidPasidEntry) {
        self.0.caches.insert_pasid_entry(fill, sid, pasid, *pe);
    }

    /// The vIOMMU offers first-level translation only: every PASID entry it accepts has
    /// PGTT=001b, and it keeps no paging-structure caches.
    fn walk(
        &self,
        _fill: u64,
        _rta: u64,
        req: &Request,
        _pasid: Pasid,
        pe: &ValidPasidEntry,
        access: AccessRequest,
    ) -> Result<Translation, WalkFault> {
        Counters::bump(&self.0.counters.walks);
        let cfg = pe.fl_config(self.0.fl_format);
        let Some(slot) = self.1 else {
            return walk_first_level(&self.0.mem, &cfg, req.addr, access, &mut ());
        };
        let mut leaf = LeafTable(FlStart::top(&cfg));
        let t = walk_first_level(&self.0.mem, &cfg, req.addr, access, &mut leaf)?;
        slot.set(Some((cfg, leaf.0)));
        Ok(t)
    }
}

/// The vIOMMU's invalidations as its address spaces see them: a page tagged with the domain
/// id and PASID of its PASID entry goes when the IOTLB invalidation covers that tag and
/// the page's input bytes; untranslated pages only with a global invalidation.
impl SpaceScope for IotlbScope {
    /// Requester id, PASID (`None`: requests without PASID), supervisor privilege.
    type Key = (SourceId, Option<Pasid>, bool);
    type Tag = (DomainId, Pasid);

    fn covers(&self, _key: &Self::Key, tag: Option<Self::Tag>, page: &CachedPage) -> bool {
        match tag {
            Some((did, pasid)) => IotlbScope::covers(self, did, pasid, page.start, page.last),
            None => *self == IotlbScope::All,
        }
    }
}

impl SpaceUnit for VIommu {
    type Scope = IotlbScope;

    /// The first page through the request pipeline; when that walked, the run continues
    /// along the leaf table with walks from it (as from a PDE-cache entry, §6.2.5), which
    /// check and update each entry as the page's own walk would. A page the IOTLB served
    /// is a run of one: the page after it is a request of its own.
    fn translate_run(
        &self,
        &(sid, pasid, supervisor): &(SourceId, Option<Pasid>, bool),
        addr: u64,
        write: bool,
        last: u64,
    ) -> Result<SpaceRun<(DomainId, Pasid)>, String> {
        let access = AccessRequest {
            write,
            execute: false,
            supervisor,
        };
        let leaf = LeafSlot::default();
        let t = self
            .translate_with(Some(&leaf), sid, pasid, addr, access)
            .map_err(|f| f.to_string())?;
        let tag = t.did.zip(t.pasid);
        let page = |size: PageSize, output: u64, writable: bool| SpaceRun {
            tag,
            global: false,
            size: size.bytes(),
            output,
            writable,
            len: size.bytes(),
        };
        let mut run = page(t.page_size, t.page_base().raw(), t.perms.write && t.dirty);
        match (tag, leaf.get()) {
            // Untranslated pages are the identity, and go only with every cached page.
            (None, _) => run.grow(addr, last, |a| Some(page(PageSize::Size4K, a, true))),
            (Some(_), Some((cfg, start))) => {
                // 512 entries of the leaf's size.
                let stop = last.min(table_last(addr, t.page_size.shift(), 9));
                run.grow(addr, stop, |a| {
                    walk_first_level_from(&self.mem, &cfg, &mut Direct, start, a, access, &mut ())
                        .ok()
                        .map(|w| page(w.page_size, w.page_base(), w.perms.write && w.dirty))
                });
            }
            (Some(_), None) => {}
        }
        Ok(run)
    }

    fn spaces(&self) -> &Spaces<IotlbScope> {
        &self.spaces
    }
}
