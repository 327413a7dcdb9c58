//! Strict mode: every IOTLB hit, and every walk that paging-structure-cache entries
//! shortened (see `cached_walk`), is checked against a fresh walk of the tables, and a
//! difference is reported with the invalidation descriptor that would have removed the
//! stale entry. Hardware keeps using the stale entry either way; the report is for the
//! person debugging a driver.

use crate::memory::ReadOnly;
use std::fmt;
use std::sync::PoisonError;
use vsva_mem::PhysMem;

use vsva_vtd::inv_desc::{IotlbGranularity, PasidCacheGranularity, PasidIotlbGranularity};
use vsva_vtd::pasid::lookup_pasid_entry;
use vsva_vtd::{
    addr::DomainId, addr::Pasid, addr::SourceId, fault::FaultReason, inv_desc::InvDesc,
    pasid::ValidPasidEntry, walk::AccessRequest,
};

use super::entry_cache::pasid_key;
use super::iotlb::{IotlbEntry, TranslationKind};
use super::Iommu;
use vsva_vtd::request::walk_pasid_entry;

/// A cached translation that no longer matches the tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleTranslation {
    /// Requester id of the request that used the stale translation.
    pub sid: SourceId,
    /// Its PASID.
    pub pasid: Pasid,
    /// The address it translated.
    pub addr: u64,
    /// What the IOTLB, or the walk through the paging-structure caches, returned (and the
    /// request used).
    pub cached: IotlbEntry,
    /// What the tables say now: the output page base and page shift, or the fault.
    pub now: Result<(u64, u8), FaultReason>,
    /// The descriptor that would have removed the cached entry.
    pub missing: InvDesc,
}

impl fmt::Display for StaleTranslation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stale translation: sid {} {} addr {:#x}: IOTLB gave page {:#x} ({:?}), tables say ",
            self.sid, self.pasid, self.addr, self.cached.output, self.cached.kind
        )?;
        match self.now {
            Ok((page, shift)) => write!(f, "page {page:#x} (2^{shift} bytes)")?,
            Err(reason) => write!(f, "fault {reason}")?,
        }
        write!(f, "; missing invalidation: {:?}", self.missing)
    }
}

/// A request strict mode checks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CheckedRequest {
    pub sid: SourceId,
    /// The PASID the request carried, if any.
    pub pasid: Option<Pasid>,
    /// The PASID it was translated with (its own, or RID_PASID).
    pub eff: Pasid,
    pub addr: u64,
    pub access: AccessRequest,
}

/// The page-selective IOTLB invalidation (§6.5.2.3) of the page holding `addr` in `did`.
pub(super) fn page_selective_iotlb(did: DomainId, addr: u64) -> InvDesc {
    InvDesc::Iotlb {
        granularity: IotlbGranularity::PageSelective,
        dr: true,
        dw: true,
        did,
        addr: addr & !0xfff,
        ih: false,
        am: 0,
    }
}

impl Iommu {
    /// What the tables `pe` selects say now for `addr`, read through `mem`: the output page
    /// base and page shift, or the fault.
    pub(super) fn page_now<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        pe: &ValidPasidEntry,
        addr: u64,
        access: AccessRequest,
    ) -> Result<(u64, u8), FaultReason> {
        walk_pasid_entry(mem, pe, self.formats(), addr, access, &mut ())
            .map(|t| (t.page_base(), t.page_size.shift() as u8))
            .map_err(|f| f.reason)
    }

    /// Logs the stale translation `cached` of `req`, which the tables now give as `now`
    /// and `missing` would have removed, and keeps it for
    /// [`Iommu::take_stale_translations`].
    pub(super) fn report_stale(
        &self,
        req: &CheckedRequest,
        cached: &IotlbEntry,
        now: Result<(u64, u8), FaultReason>,
        missing: InvDesc,
    ) {
        let event = StaleTranslation {
            sid: req.sid,
            pasid: req.eff,
            addr: req.addr,
            cached: *cached,
            now,
            missing,
        };
        tracing::warn!("{event}");
        self.stale
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }

    /// Compares an IOTLB hit for `req`, from the root table at `rta`, with a fresh walk;
    /// records a [`StaleTranslation`] on mismatch.
    pub(crate) fn check_stale(&self, rta: u64, req: &CheckedRequest, cached: &IotlbEntry) {
        let mem = ReadOnly(&*self.mem);
        let lookup = lookup_pasid_entry(&mem, rta, req.sid, req.pasid, &self.caps);
        let now = match &lookup {
            Err(f) => Err(f.reason),
            Ok(l) => self.page_now(&mem, &l.entry, req.addr, req.access),
        };
        if now == Ok((cached.output, cached.page_shift)) {
            return;
        }
        let cached_pe = self.pasid_cache.get(pasid_key(req.sid, req.eff));
        let entry_changed = match (&lookup, cached_pe) {
            (Ok(l), Some(pe)) => l.entry != pe,
            _ => true,
        };
        let missing = if entry_changed {
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::PasidSelective,
                did: cached.did,
                pasid: req.eff,
            }
        } else {
            match cached.kind {
                TranslationKind::SecondLevel | TranslationKind::PassThrough => {
                    page_selective_iotlb(cached.did, req.addr)
                }
                TranslationKind::FirstLevel | TranslationKind::Nested => InvDesc::PasidIotlb {
                    granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
                    did: cached.did,
                    pasid: req.eff,
                    addr: req.addr & !0xfff,
                    ih: false,
                    am: 0,
                },
            }
        };
        self.report_stale(req, cached, now, missing);
    }
}
