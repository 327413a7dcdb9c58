//! Queued invalidation (VT-d §6.5.2) on the model: how its caches and the devices behind it
//! carry out what [`vsva_vtd::invalidation::execute`] reads from each descriptor.
//!
//! IOTLB invalidations reach the paging-structure caches too; their rules are in
//! [`PagingStructureCaches`](super::pscache::PagingStructureCaches).

use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use vsva_mem::MemError;

use vsva_vtd::inv_desc::{ContextCacheGranularity, PasidCacheGranularity, ResponseCode};
use vsva_vtd::invalidation::{self, Completion, InvalidationUnit, IotlbInvalidation};
use vsva_vtd::{addr::DomainId, addr::Pasid, addr::SourceId, inv_desc::InvDesc};

use super::Iommu;
use crate::dma::port::{DevTlbInvalidation, PrgResponse};
use crate::memory::HostMemory;

impl Iommu {
    /// Carries out one invalidation descriptor.
    pub(crate) fn execute(&self, desc: &InvDesc) -> Result<Completion, MemError> {
        self.stats.descriptors.fetch_add(1, Ordering::Relaxed);
        if matches!(desc, InvDesc::Iotlb { .. } | InvDesc::PasidIotlb { .. }) {
            self.note_iotlb_invalidation(desc);
        }
        invalidation::execute(&mut Invalidated(self), desc)
    }
}

/// The model as invalidations reach it.
struct Invalidated<'a>(&'a Iommu);

impl InvalidationUnit for Invalidated<'_> {
    type Mem = HostMemory;

    fn status_memory(&self) -> &HostMemory {
        &self.0.mem
    }

    fn invalidate_context_cache(
        &mut self,
        granularity: ContextCacheGranularity,
        sid: SourceId,
        fm: u8,
    ) {
        let unit = self.0;
        let mut cache = unit
            .context_cache
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        unit.entry_generation.fetch_add(1, Ordering::AcqRel);
        cache.retain(|&rid, _| !granularity.covers(sid, fm, SourceId::from_rid(rid)));
    }

    fn invalidate_pasid_cache(
        &mut self,
        granularity: PasidCacheGranularity,
        did: DomainId,
        pasid: Pasid,
    ) {
        let unit = self.0;
        let mut cache = unit
            .pasid_cache
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        unit.entry_generation.fetch_add(1, Ordering::AcqRel);
        match granularity {
            PasidCacheGranularity::Global => cache.clear(),
            PasidCacheGranularity::DomainSelective => cache.retain(|_, pe| pe.did != did),
            PasidCacheGranularity::PasidSelective => {
                cache.retain(|&(_, p), pe| pe.did != did || p != pasid.raw())
            }
        }
    }

    fn invalidate_iotlb(&mut self, inv: IotlbInvalidation) {
        let (iotlb, paging) = (&self.0.iotlb, &self.0.paging_caches);
        match inv {
            IotlbInvalidation::Global => {
                iotlb.invalidate_all();
                paging.invalidate_all();
            }
            IotlbInvalidation::Domain(did) => {
                iotlb.invalidate_domain(did);
                paging.invalidate_domain(did);
            }
            IotlbInvalidation::DomainPages { did, range, ih } => {
                iotlb.invalidate_domain_range(did, range);
                paging.invalidate_domain_range(did, range, ih);
            }
            IotlbInvalidation::Pasid { did, pasid } => {
                iotlb.invalidate_pasid(did, pasid);
                paging.invalidate_pasid(did, pasid);
            }
            IotlbInvalidation::PasidPages {
                did,
                pasid,
                range,
                ih,
            } => {
                iotlb.invalidate_pasid_range(did, pasid, range);
                paging.invalidate_pasid_range(did, pasid, range, ih);
            }
        }
    }

    fn invalidate_device_tlb(
        &mut self,
        sid: SourceId,
        pasid: Option<Pasid>,
        global: bool,
        addr: u64,
        size: bool,
    ) {
        if let Some(ep) = self.0.endpoint(sid) {
            ep.invalidate_devtlb(DevTlbInvalidation::from_size_bit(pasid, global, addr, size));
        }
    }

    fn page_group_response(
        &mut self,
        rid: SourceId,
        pasid: Option<Pasid>,
        prg_index: u16,
        response: ResponseCode,
    ) {
        if let Some(ep) = self.0.endpoint(rid) {
            ep.page_response(PrgResponse {
                pasid,
                prgi: prg_index,
                code: response,
            });
        }
    }

    /// The descriptors before a wait are complete once no request that used a translation
    /// they removed is still moving bytes (§6.5.5 draining).
    fn drain(&mut self) {
        self.0.drain.drain();
    }
}
