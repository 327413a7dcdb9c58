//! Queued invalidation (VT-d §6.5.2) on the model: how its caches and the devices behind it
//! carry out what [`vsva_vtd::invalidation::execute`] reads from each descriptor.
//!
//! IOTLB invalidations reach the paging-structure caches too; their rules are in
//! [`PagingStructureCaches`](super::pscache::PagingStructureCaches).
//!
//! IOTLB, PASID-based-IOTLB and device-TLB invalidations are gathered as the drain fetches
//! them ([`Pending`]) and carried out together before the next descriptor of another kind
//! (an invalidation wait, whose status write reports them complete, a context- or
//! PASID-cache invalidation, a page group response) and at the end of the drain: the
//! IOTLB and paging-structure-cache removals first, in queue order, those of one domain
//! and PASID in a row under one lock of each cache; then the device-TLB invalidations,
//! each device's requests in a row as one batch (one look-up of the device, one lock and
//! one drain of its TLB). Every device-TLB invalidation thus still follows the IOTLB
//! invalidations queued before it (§6.5.2.5: the device must not refill from a stale
//! IOTLB entry), and nothing is reported complete before it is done. Within one IOTLB
//! invalidation the paging-structure caches go before the IOTLB, for the same reason one
//! level down: the IOTLB must not refill from a stale paging-structure-cache entry.

use std::sync::atomic::Ordering;
use vsva_mem::MemError;

use vsva_vtd::inv_desc::{ContextCacheGranularity, PasidCacheGranularity, ResponseCode};
use vsva_vtd::invalidation::{self, Completion, InvalidationUnit, IotlbInvalidation};
use vsva_vtd::{addr::DomainId, addr::Pasid, addr::SourceId, inv_desc::InvDesc};

use super::entry_cache::{context_rid, pasid_owner};
use super::Iommu;
use crate::dma::port::{DevTlbInvalidation, PrgResponse};
use crate::memory::HostMemory;

/// Cache invalidations a drain fetched and has not carried out yet. Kept by the unit
/// between drains (under its drain lock), so that their buffers are allocated once.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// IOTLB and PASID-based-IOTLB invalidations, with the descriptor of each (strict
    /// mode names it), in queue order.
    iotlb: Vec<(IotlbInvalidation, InvDesc)>,
    /// Device-TLB invalidate requests, in queue order, and the device of each.
    devtlb: Vec<DevTlbInvalidation>,
    devtlb_sids: Vec<SourceId>,
    /// Descriptors carried out and not yet counted in [`IommuStats::descriptors`]: one
    /// shared counter update per batch, not per descriptor.
    ///
    /// [`IommuStats::descriptors`]: super::IommuStats::descriptors
    executed: u64,
}

impl Iommu {
    /// Carries out one descriptor, deferring its cache invalidations to
    /// `pending` (see the module's documentation); [`Iommu::carry_out`] completes them.
    pub(super) fn execute(
        &self,
        desc: &InvDesc,
        pending: &mut Pending,
    ) -> Result<Completion, MemError> {
        pending.executed += 1;
        invalidation::execute(
            &mut Invalidated {
                unit: self,
                pending,
                desc,
            },
            desc,
        )
    }

    /// Carries out the invalidations `pending` holds and empties it.
    pub(super) fn carry_out(&self, pending: &mut Pending) {
        let executed = std::mem::take(&mut pending.executed);
        if executed != 0 {
            // Written only here, with the drain lock held (`pending` is its data): one
            // writer at a time, so a load and a store, not a locked add.
            let descriptors = &self.stats.descriptors;
            descriptors.store(
                descriptors.load(Ordering::Relaxed) + executed,
                Ordering::Relaxed,
            );
        }
        let iotlb = &pending.iotlb;
        let mut i = 0;
        while i < iotlb.len() {
            let (inv, desc) = &iotlb[i];
            self.note_iotlb_invalidation(desc);
            match *inv {
                IotlbInvalidation::PasidPages { did, pasid, .. } => {
                    let run = iotlb[i..]
                        .iter()
                        .take_while(|(next, _)| {
                            matches!(*next, IotlbInvalidation::PasidPages { did: d, pasid: p, .. }
                                if d == did && p == pasid)
                        })
                        .count();
                    let pages = iotlb[i..i + run].iter().filter_map(|(inv, _)| match *inv {
                        IotlbInvalidation::PasidPages { range, ih, .. } => Some((range, ih)),
                        _ => None,
                    });
                    // Paging-structure caches first: see `invalidate_iotlb`.
                    self.paging_caches
                        .invalidate_pasid_ranges(did, pasid, pages.clone());
                    self.iotlb
                        .invalidate_pasid_ranges(did, pasid, pages.map(|(r, _)| r));
                    i += run;
                }
                inv => {
                    self.invalidate_iotlb(inv);
                    i += 1;
                }
            }
        }
        if !pending.iotlb.is_empty() {
            self.runs.drop_all();
        }
        pending.iotlb.clear();
        let (invs, sids) = (&pending.devtlb, &pending.devtlb_sids);
        let mut i = 0;
        while i < invs.len() {
            let sid = sids[i];
            let run = sids[i..].iter().take_while(|&&s| s == sid).count();
            if let Some(ep) = self.endpoint(sid) {
                ep.invalidate_devtlb_each(&invs[i..i + run]);
            }
            i += run;
        }
        pending.devtlb.clear();
        pending.devtlb_sids.clear();
    }

    /// One IOTLB or PASID-based-IOTLB invalidation, paging-structure caches included,
    /// and those first. A walk takes its IOTLB fill token before it looks at the
    /// paging-structure caches, so one that used an entry this removes from them took its
    /// token before the IOTLB's removal that follows, and its fill is either removed by it
    /// or refused. The other way round, a walk starting between the two removals would
    /// take a token after the IOTLB's, find the stale entry still in the paging-structure
    /// caches and cache a translation that nothing removes any more (a nested walk, its
    /// second-level mapping of a page `UNMAP_DMA` had just removed).
    fn invalidate_iotlb(&self, inv: IotlbInvalidation) {
        let (iotlb, paging) = (&self.iotlb, &self.paging_caches);
        match inv {
            IotlbInvalidation::Global => {
                paging.invalidate_all();
                iotlb.invalidate_all();
            }
            IotlbInvalidation::Domain(did) => {
                paging.invalidate_domain(did);
                iotlb.invalidate_domain(did);
            }
            IotlbInvalidation::DomainPages { did, range, ih } => {
                paging.invalidate_domain_range(did, range, ih);
                iotlb.invalidate_domain_range(did, range);
            }
            IotlbInvalidation::Pasid { did, pasid } => {
                paging.invalidate_pasid(did, pasid);
                iotlb.invalidate_pasid(did, pasid);
            }
            IotlbInvalidation::PasidPages {
                did,
                pasid,
                range,
                ih,
            } => {
                paging.invalidate_pasid_range(did, pasid, range, ih);
                iotlb.invalidate_pasid_range(did, pasid, range);
            }
        }
    }
}

/// The model as invalidations reach it: `desc` is the descriptor being carried out.
struct Invalidated<'a> {
    unit: &'a Iommu,
    pending: &'a mut Pending,
    desc: &'a InvDesc,
}

impl Invalidated<'_> {
    /// Completes the deferred invalidations before a descriptor of another kind.
    fn carry_out(&mut self) {
        self.unit.carry_out(self.pending);
    }
}

impl InvalidationUnit for Invalidated<'_> {
    type Mem = HostMemory;

    fn status_memory(&self) -> &HostMemory {
        &self.unit.mem
    }

    fn invalidate_context_cache(
        &mut self,
        granularity: ContextCacheGranularity,
        sid: SourceId,
        fm: u8,
    ) {
        self.carry_out();
        let unit = self.unit;
        unit.context_cache
            .invalidate(&unit.entry_generation, |tag| {
                granularity.covers(sid, fm, context_rid(tag))
            });
        unit.runs.drop_all();
    }

    fn invalidate_pasid_cache(
        &mut self,
        granularity: PasidCacheGranularity,
        did: DomainId,
        pasid: Pasid,
    ) {
        self.carry_out();
        let unit = self.unit;
        unit.pasid_cache.invalidate(&unit.entry_generation, |tag| {
            let (d, p) = pasid_owner(tag);
            match granularity {
                PasidCacheGranularity::Global => true,
                PasidCacheGranularity::DomainSelective => d == did,
                PasidCacheGranularity::PasidSelective => d == did && p == pasid.raw(),
            }
        });
        unit.runs.drop_all();
    }

    fn invalidate_iotlb(&mut self, inv: IotlbInvalidation) {
        self.pending.iotlb.push((inv, *self.desc));
    }

    fn invalidate_device_tlb(
        &mut self,
        sid: SourceId,
        pasid: Option<Pasid>,
        global: bool,
        addr: u64,
        size: bool,
    ) {
        let inv = DevTlbInvalidation::from_size_bit(pasid, global, addr, size);
        self.pending.devtlb.push(inv);
        self.pending.devtlb_sids.push(sid);
    }

    fn page_group_response(
        &mut self,
        rid: SourceId,
        pasid: Option<Pasid>,
        prg_index: u16,
        response: ResponseCode,
    ) {
        self.carry_out();
        if let Some(ep) = self.unit.endpoint(rid) {
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
        self.carry_out();
        self.unit.drain.drain();
    }
}
