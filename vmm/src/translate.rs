//! Translation for emulated devices: the vIOMMU walks the guest's first-level tables over
//! guest RAM itself (§3.6), through its own context cache, PASID cache and IOTLB, which
//! keep what they hold until the guest invalidates it, as hardware does.

use vsva_vtd::context::read_context_entry;
use vsva_vtd::inv_desc::IotlbGranularity;
use vsva_vtd::pasid::read_pasid_entry;
use vsva_vtd::regs::{AddressType, FaultRecord, RequestType};
use vsva_vtd::{
    walk_first_level, AccessRequest, DomainId, EntryFault, Gpa, InvDesc, PageSize, Pasid,
    PasidEntry, Permissions, RootState, ScalableContextEntry, SourceId, TranslationFault,
};

use crate::caches::{IotlbEntry, IotlbScope};
use crate::stats::Counters;
use crate::viommu::{lock, VIommu};

/// A successful translation of a DMA address to guest physical.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaTranslation {
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

impl DmaTranslation {
    /// The guest physical base of the translated page.
    pub fn page_base(&self) -> Gpa {
        Gpa(self.gpa.raw() & !(self.page_size.bytes() - 1))
    }
}

impl VIommu {
    /// Translates a DMA request of an emulated device from `sid` (with `pasid`, or without
    /// PASID) to `addr`, as a remapping unit does for an untranslated request; a fault is
    /// recorded in the fault recording registers unless an FPD field disables it.
    ///
    /// An IOTLB hit serves the request without reading any table, whatever the tables say
    /// now: a translation stays in use until the guest invalidates it.
    pub fn translate(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: AccessRequest,
    ) -> Result<DmaTranslation, TranslationFault> {
        let result = self.translate_inner(sid, pasid, addr, access);
        if let Err(fault) = &result {
            if !fault.fpd {
                self.record_fault(fault, access);
            }
        }
        result
    }

    fn translate_inner(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: AccessRequest,
    ) -> Result<DmaTranslation, TranslationFault> {
        let fault = |reason, fpd, recoverable| TranslationFault {
            sid,
            pasid,
            addr,
            reason,
            fpd,
            recoverable,
        };
        let rta = match self.root_state() {
            RootState::Scalable(rta) => rta,
            RootState::Disabled => {
                return Ok(DmaTranslation {
                    gpa: Gpa(addr),
                    page_size: PageSize::Size4K,
                    perms: Permissions::ALL,
                    dirty: true,
                    did: None,
                    pasid: None,
                    cached: false,
                })
            }
            RootState::NotScalable => {
                return Err(fault(RootState::not_scalable_fault(pasid), false, false));
            }
        };
        if let Some(p) = pasid {
            if let Some(hit) = self.iotlb_hit(sid, p, addr, access) {
                return Ok(hit);
            }
        }
        let epoch = self.caches.epoch();
        let ctx = self
            .context_entry(epoch, rta, sid)
            .map_err(|f| fault(f.reason, f.fpd, false))?;
        let eff = ctx
            .pasid_for_request(pasid)
            .map_err(|r| fault(r, ctx.fpd, false))?;
        let access = AccessRequest {
            supervisor: access.supervisor || (pasid.is_none() && ctx.rid_priv),
            ..access
        };
        if pasid.is_none() {
            if let Some(hit) = self.iotlb_hit(sid, eff, addr, access) {
                return Ok(hit);
            }
        }
        let pe = self
            .pasid_entry(epoch, sid, &ctx, eff)
            .map_err(|f| fault(f.reason, f.fpd, false))?;
        let fpd = ctx.fpd || pe.fpd;
        pe.check_request(access.supervisor, access.execute)
            .map_err(|r| fault(r, fpd, false))?;
        let cfg = pe.fl_config(self.fl_format);
        Counters::bump(&self.counters.walks);
        let t = walk_first_level(&self.mem, &cfg, addr, access, &mut ())
            .map_err(|f| fault(f.reason, fpd, ctx.pre && f.page_request_may_resolve()))?;
        let entry = IotlbEntry {
            did: pe.did,
            page: t.page_base(),
            page_size: t.page_size,
            perms: t.perms,
            dirty: t.dirty,
            supervisor: access.supervisor,
        };
        self.caches.insert(epoch, sid, eff, addr, entry);
        Ok(DmaTranslation {
            gpa: Gpa(t.output),
            page_size: t.page_size,
            perms: t.perms,
            dirty: t.dirty,
            did: Some(pe.did),
            pasid: Some(eff),
            cached: false,
        })
    }

    fn iotlb_hit(
        &self,
        sid: SourceId,
        pasid: Pasid,
        addr: u64,
        access: AccessRequest,
    ) -> Option<DmaTranslation> {
        let e = self.caches.lookup(sid, pasid, addr)?;
        e.allows(access).then(|| DmaTranslation {
            gpa: Gpa(e.page | (addr & (e.page_size.bytes() - 1))),
            page_size: e.page_size,
            perms: e.perms,
            dirty: e.dirty,
            did: Some(e.did),
            pasid: Some(pasid),
            cached: true,
        })
    }

    /// The context entry of `sid`, from the context cache or the guest tables.
    fn context_entry(
        &self,
        epoch: u64,
        rta: u64,
        sid: SourceId,
    ) -> Result<ScalableContextEntry, EntryFault> {
        if let Some(c) = self.caches.context(sid) {
            return Ok(c);
        }
        let c = read_context_entry(&self.mem, rta, sid, &self.caps)?;
        self.caches.insert_context(epoch, sid, c);
        Ok(c)
    }

    /// The PASID entry of `pasid` for `sid`, from the PASID cache or the guest tables.
    fn pasid_entry(
        &self,
        epoch: u64,
        sid: SourceId,
        ctx: &ScalableContextEntry,
        pasid: Pasid,
    ) -> Result<PasidEntry, EntryFault> {
        if let Some(pe) = self.caches.pasid_entry(sid, pasid) {
            return Ok(pe);
        }
        let pe = read_pasid_entry(&self.mem, ctx, pasid, &self.caps)?;
        self.caches.insert_pasid_entry(epoch, sid, pasid, pe);
        Ok(pe)
    }

    /// Records a fault in the fault recording registers (primary fault logging, §7.2.1).
    fn record_fault(&self, fault: &TranslationFault, access: AccessRequest) {
        let record = FaultRecord {
            fault_info: fault.addr,
            sid: fault.sid,
            reason: fault.reason.code(),
            pasid: fault.pasid,
            exe: access.execute,
            privileged: access.supervisor,
            request: if access.write {
                RequestType::Write
            } else {
                RequestType::Read
            },
            address_type: AddressType::Untranslated,
        };
        Counters::bump(&self.counters.faults_recorded);
        let (_, irq) = lock(&self.regs).record_fault(&record);
        self.deliver(irq.into_iter().collect());
    }

    /// Removes what an IOTLB or PASID-based IOTLB invalidation covers from the IOTLB and
    /// from the IOTLBs of the vm-memory address spaces.
    ///
    /// An IOTLB invalidate descriptor (§6.5.2.3) in scalable mode removes every first-level
    /// entry of its domain even at page granularity; the vIOMMU caches first-level
    /// translations only.
    pub(crate) fn invalidate_iotlb(&self, desc: &InvDesc) {
        let scope = match *desc {
            InvDesc::Iotlb {
                granularity: IotlbGranularity::Global,
                ..
            } => IotlbScope::All,
            InvDesc::Iotlb { did, .. } => IotlbScope::Domain(did),
            InvDesc::PasidIotlb { did, pasid, .. } => match desc.range() {
                Some(range) => IotlbScope::Range(did, pasid, range),
                None => IotlbScope::Pasid(did, pasid),
            },
            _ => return,
        };
        self.caches.invalidate_iotlb(scope);
        self.invalidate_spaces(scope);
    }
}
