//! Queued invalidation (VT-d §6.5.2): what each descriptor does to the caches.
//!
//! IOTLB and PASID-based-IOTLB invalidations also reach the paging-structure caches; their
//! rules are in [`PagingStructureCaches`](super::pscache::PagingStructureCaches). Context-
//! and PASID-cache invalidations leave them alone: after changing a context or PASID entry,
//! software follows with the IOTLB or PASID-based-IOTLB invalidation that removes them
//! (§6.5.3).

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use vsva_vtd::inv_desc::{IotlbGranularity, PasidCacheGranularity, PasidIotlbGranularity};
use vsva_vtd::{AddrRange, InvDesc, MemError, PhysMem, SourceId};

use super::Iommu;
use crate::dma::port::{DevTlbInvalidation, PrgResponse};

/// What a processed descriptor asks of the queue processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    Done,
    /// An invalidation wait that asks for a completion interrupt (IF).
    WaitInterrupt,
}

impl Iommu {
    /// Carries out one invalidation descriptor.
    pub(crate) fn execute(&self, desc: &InvDesc) -> Result<Completion, MemError> {
        self.stats.descriptors.fetch_add(1, Ordering::Relaxed);
        match *desc {
            InvDesc::ContextCache {
                granularity,
                sid,
                fm,
                ..
            } => {
                let mut cache = self
                    .context_cache
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                self.entry_generation.fetch_add(1, Ordering::AcqRel);
                cache.retain(|&rid, _| !granularity.covers(sid, fm, SourceId::from_rid(rid)));
            }
            InvDesc::PasidCache {
                granularity,
                did,
                pasid,
            } => {
                let mut cache = self
                    .pasid_cache
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                self.entry_generation.fetch_add(1, Ordering::AcqRel);
                match granularity {
                    PasidCacheGranularity::Global => cache.clear(),
                    PasidCacheGranularity::DomainSelective => cache.retain(|_, pe| pe.did != did),
                    PasidCacheGranularity::PasidSelective => {
                        cache.retain(|&(_, p), pe| pe.did != did || p != pasid.raw())
                    }
                }
            }
            InvDesc::Iotlb {
                granularity,
                did,
                addr,
                ih,
                am,
                ..
            } => {
                match granularity {
                    IotlbGranularity::Global => {
                        self.iotlb.invalidate_all();
                        self.paging_caches.invalidate_all();
                    }
                    IotlbGranularity::DomainSelective => {
                        self.iotlb.invalidate_domain(did);
                        self.paging_caches.invalidate_domain(did);
                    }
                    IotlbGranularity::PageSelective => {
                        let r = AddrRange::from_address_mask(addr, am);
                        self.iotlb.invalidate_domain_range(did, r);
                        self.paging_caches.invalidate_domain_range(did, r, ih);
                    }
                };
            }
            InvDesc::PasidIotlb {
                granularity,
                did,
                pasid,
                addr,
                ih,
                am,
            } => {
                match granularity {
                    PasidIotlbGranularity::PasidSelective => {
                        self.iotlb.invalidate_pasid(did, pasid);
                        self.paging_caches.invalidate_pasid(did, pasid);
                    }
                    PasidIotlbGranularity::PageSelectiveWithinPasid => {
                        let r = AddrRange::from_address_mask(addr, am);
                        self.iotlb.invalidate_pasid_range(did, pasid, r);
                        self.paging_caches.invalidate_pasid_range(did, pasid, r, ih);
                    }
                };
            }
            InvDesc::DevIotlb {
                sid, addr, size, ..
            } => {
                if let Some(ep) = self.endpoint(sid) {
                    ep.invalidate_devtlb(DevTlbInvalidation::from_size_bit(
                        None, false, addr, size,
                    ));
                }
            }
            InvDesc::PasidDevIotlb {
                sid,
                pasid,
                addr,
                size,
                global,
                ..
            } => {
                if let Some(ep) = self.endpoint(sid) {
                    ep.invalidate_devtlb(DevTlbInvalidation::from_size_bit(
                        Some(pasid),
                        global,
                        addr,
                        size,
                    ));
                }
            }
            InvDesc::PageGroupResponse {
                rid,
                pasid_present,
                pasid,
                response,
                prg_index,
                ..
            } => {
                if let Some(ep) = self.endpoint(rid) {
                    ep.page_response(PrgResponse {
                        pasid: pasid_present.then_some(pasid),
                        prgi: prg_index,
                        code: response,
                    });
                }
            }
            InvDesc::InterruptEntryCache { .. } => {}
            InvDesc::InvWait {
                sw,
                interrupt,
                status_data,
                status_addr,
                ..
            } => {
                // The descriptors before it are complete once no request that used a
                // translation they removed is still moving bytes (§6.5.5 draining).
                self.drain.drain();
                if sw {
                    self.mem.write(status_addr, &status_data.to_le_bytes())?;
                }
                if interrupt {
                    return Ok(Completion::WaitInterrupt);
                }
            }
        }
        Ok(Completion::Done)
    }
}
