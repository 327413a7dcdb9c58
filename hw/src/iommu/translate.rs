//! DMA address translation (VT-d §3.4 to §3.9): IOTLB, then the walk from the root table
//! through the context and PASID caches down to the page tables the PASID entry selects,
//! which the paging-structure caches shorten (see `cached_walk`).

use vsva_vtd::walk::{Stage, WalkObserver};
use vsva_vtd::{
    walk_first_level, walk_nested, walk_second_level, AccessRequest, EntryFault, FaultReason,
    FlFormat, Pasid, PasidEntry, Pgtt, RootState, ScalableContextEntry, SlFormat, SourceId,
    Translation, TranslationFault, WalkFault,
};

use std::cell::Cell;
use std::sync::atomic::Ordering;

use vsva_vtd::{MemError, PhysMem};

use super::cached_walk::CacheUse;
use super::iotlb::{IotlbEntry, Perms, RequestMask, TranslationKind};
use super::stale::CheckedRequest;
use super::{Iommu, ROOT_STRICT};
use crate::memory::HostMemory;

/// Where a translation came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// An IOTLB hit.
    Iotlb,
    /// A page walk (after an IOTLB miss).
    Walk,
    /// Translation is disabled (GSTS.TES clear): the address is used as is.
    Untranslated,
}

/// A successful DMA translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMapping {
    /// Host physical address of the requested byte.
    pub hpa: u64,
    /// log2 of the translated page's size.
    pub page_shift: u8,
    /// Rights of the cached translation.
    pub perms: Perms,
    /// IOTLB hit or walk.
    pub source: Source,
}

impl DmaMapping {
    /// The host physical base of the translated page.
    pub fn page_base(&self) -> u64 {
        self.hpa & !((1u64 << self.page_shift) - 1)
    }
}

/// Walks the page tables a PASID entry selects.
pub(crate) fn walk_pasid_entry<M, O>(
    mem: &M,
    pe: &PasidEntry,
    formats: (FlFormat, SlFormat),
    addr: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: vsva_vtd::PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    request_checks(pe, addr, access)?;
    match pe.pgtt {
        Pgtt::FirstLevel => walk_first_level(mem, &pe.fl_config(formats.0), addr, access, obs),
        Pgtt::SecondLevel => walk_second_level(mem, &pe.sl_config(formats.1), addr, access, obs),
        Pgtt::Nested => walk_nested(
            mem,
            &pe.fl_config(formats.0),
            &pe.sl_config(formats.1),
            addr,
            access,
            obs,
        ),
        Pgtt::PassThrough => pass_through(pe, addr, access),
    }
}

/// A fault the PASID entry finds before any table is read.
fn entry_fault(reason: FaultReason, addr: u64) -> WalkFault {
    WalkFault {
        reason,
        stage: Stage::FirstLevel,
        level: 0,
        input: addr,
    }
}

/// What the PASID entry checks before any walk: execute requests need ERE (SPT.5).
pub(crate) fn request_checks(
    pe: &PasidEntry,
    addr: u64,
    access: AccessRequest,
) -> Result<(), WalkFault> {
    if access.execute && !pe.ere {
        return Err(entry_fault(FaultReason::Spt5, addr));
    }
    Ok(())
}

/// Pass-through translation (PGTT=100b): the address is the output; supervisor requests
/// need SRE (SPT.6).
pub(crate) fn pass_through(
    pe: &PasidEntry,
    addr: u64,
    access: AccessRequest,
) -> Result<Translation, WalkFault> {
    if access.supervisor && !pe.sre {
        return Err(entry_fault(FaultReason::Spt6, addr));
    }
    Ok(Translation {
        output: addr,
        page_size: vsva_vtd::PageSize::Size4K,
        perms: vsva_vtd::Permissions::ALL,
        dirty: true,
    })
}

pub(crate) fn kind_of(pgtt: Pgtt) -> TranslationKind {
    match pgtt {
        Pgtt::FirstLevel => TranslationKind::FirstLevel,
        Pgtt::SecondLevel => TranslationKind::SecondLevel,
        Pgtt::Nested => TranslationKind::Nested,
        Pgtt::PassThrough => TranslationKind::PassThrough,
    }
}

pub(crate) fn iotlb_entry(pe: &PasidEntry, t: &Translation, access: AccessRequest) -> IotlbEntry {
    IotlbEntry {
        did: pe.did,
        output: t.page_base(),
        page_shift: t.page_size.shift() as u8,
        perms: Perms::default()
            .with_if(Perms::READ, t.perms.read)
            .with_if(Perms::WRITE, t.perms.write)
            .with_if(Perms::EXECUTE, t.perms.execute)
            .with_if(Perms::USER, t.perms.user)
            .with_if(Perms::DIRTY, t.dirty)
            .with_if(Perms::SUPERVISOR, access.supervisor),
        kind: kind_of(pe.pgtt),
    }
}

impl Iommu {
    /// Translates a DMA request from `sid` (with `pasid`, or without PASID) to `addr`.
    ///
    /// An IOTLB hit serves the request without reading any table, whatever the tables say
    /// now: stale entries stay in use until invalidated, as on hardware; so do the
    /// paging-structure-cache entries a walk after a miss starts from. In strict mode a hit,
    /// or a walk that used cached entries, is checked against a fresh walk and a difference
    /// is reported as a [`StaleTranslation`](super::StaleTranslation).
    ///
    /// Inlined into its callers, which saves a hit the call, its frame and the spills of its
    /// arguments: the hit path is the root word, the IOTLB lookup and one mask compare; the
    /// miss path and strict mode's check are out of line.
    #[inline(always)]
    pub fn translate(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: AccessRequest,
    ) -> Result<DmaMapping, TranslationFault> {
        let root = self.root.load(Ordering::Acquire);
        let rta = match RootState::from_word(root) {
            RootState::Scalable(rta) => rta,
            RootState::Disabled => {
                return Ok(DmaMapping {
                    hpa: addr,
                    page_shift: 12,
                    perms: Perms::default(),
                    source: Source::Untranslated,
                })
            }
            RootState::NotScalable => {
                return Err(TranslationFault {
                    sid,
                    pasid,
                    addr,
                    reason: RootState::not_scalable_fault(pasid),
                    fpd: false,
                    recoverable: false,
                })
            }
        };
        if let Some(p) = pasid {
            if let Some(e) = self.iotlb.lookup(sid, p, addr) {
                if e.perms.allows(RequestMask::of(access)) {
                    if root & ROOT_STRICT != 0 {
                        let req = CheckedRequest {
                            sid,
                            pasid,
                            eff: p,
                            addr,
                            access,
                        };
                        self.check_hit(rta, req, e);
                    }
                    return Ok(hit(&e, addr));
                }
            }
        }
        self.translate_miss(rta, sid, pasid, addr, access)
    }

    /// Strict mode's check of an IOTLB hit, out of line: the entry is passed by value so
    /// that the hit path keeps it in registers instead of storing it for a reference.
    #[cold]
    #[inline(never)]
    fn check_hit(&self, rta: u64, req: CheckedRequest, e: IotlbEntry) {
        self.check_stale(rta, &req, &e);
    }

    /// Everything after an IOTLB miss (or a hit the rights do not cover), out of line so
    /// that the hit path keeps a small frame and no spills.
    #[inline(never)]
    fn translate_miss(
        &self,
        rta: u64,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: AccessRequest,
    ) -> Result<DmaMapping, TranslationFault> {
        let fail = |reason, fpd, recoverable| TranslationFault {
            sid,
            pasid,
            addr,
            reason,
            fpd,
            recoverable,
        };
        let ctx = self
            .context_entry(rta, sid)
            .map_err(|f| fail(f.reason, f.fpd, false))?;
        let eff = ctx
            .pasid_for_request(pasid)
            .map_err(|r| fail(r, ctx.fpd, false))?;
        let access = AccessRequest {
            supervisor: access.supervisor || (pasid.is_none() && ctx.rid_priv),
            ..access
        };
        if pasid.is_none() {
            if let Some(e) = self.iotlb.lookup(sid, eff, addr) {
                if e.perms.allows(RequestMask::of(access)) {
                    return Ok(hit(&e, addr));
                }
            }
        }
        let fill = self.iotlb.begin_fill();
        let pe = self
            .pasid_entry(sid, &ctx, eff)
            .map_err(|f| fail(f.reason, f.fpd, false))?;
        let mem = CountingReads {
            mem: &self.mem,
            reads: Cell::new(0),
        };
        let mut used = CacheUse::default();
        let walked = self.walk_cached(&mem, &pe, eff, addr, access, &mut used);
        self.stats.walks.fetch_add(1, Ordering::Relaxed);
        self.stats
            .table_reads
            .fetch_add(mem.reads.get(), Ordering::Relaxed);
        let t = walked.map_err(|f| {
            let recoverable = ctx.pre && f.page_request_may_resolve();
            fail(f.reason, ctx.fpd || pe.fpd, recoverable)
        })?;
        let entry = iotlb_entry(&pe, &t, access);
        if self.strict() && used.any() {
            let req = CheckedRequest {
                sid,
                pasid,
                eff,
                addr,
                access,
            };
            self.check_cached_walk(rta, &req, &pe, &entry, &used);
        }
        if pe.pgtt != Pgtt::PassThrough {
            self.iotlb.insert(fill, sid, eff, addr, entry);
        }
        Ok(DmaMapping {
            hpa: t.output,
            page_shift: entry.page_shift,
            perms: entry.perms,
            source: Source::Walk,
        })
    }

    /// The context entry of `sid`, from the context cache or the tables. An entry read
    /// while a context- or PASID-cache invalidation ran is used but not cached.
    pub(crate) fn context_entry(
        &self,
        rta: u64,
        sid: SourceId,
    ) -> Result<ScalableContextEntry, EntryFault> {
        if let Some(c) = self.context_cache.read().unwrap().get(&sid.rid()) {
            return Ok(*c);
        }
        let fill = self.entry_generation.load(Ordering::Acquire);
        let c = vsva_vtd::context::read_context_entry(&*self.mem, rta, sid, &self.caps)?;
        let mut cache = self.context_cache.write().unwrap();
        if self.entry_generation.load(Ordering::Acquire) == fill {
            cache.insert(sid.rid(), c);
        }
        Ok(c)
    }

    /// The PASID entry `pasid` of `sid`, from the PASID cache or the tables. An entry read
    /// afresh retags the IOTLB for its domain.
    pub(crate) fn pasid_entry(
        &self,
        sid: SourceId,
        ctx: &ScalableContextEntry,
        pasid: Pasid,
    ) -> Result<PasidEntry, EntryFault> {
        let key = (sid.rid(), pasid.raw());
        if let Some(pe) = self.pasid_cache.read().unwrap().get(&key) {
            return Ok(*pe);
        }
        let fill = self.entry_generation.load(Ordering::Acquire);
        let pe = vsva_vtd::pasid::read_pasid_entry(&*self.mem, ctx, pasid, &self.caps)?;
        self.iotlb.retag(sid, pasid, pe.did);
        let mut cache = self.pasid_cache.write().unwrap();
        if self.entry_generation.load(Ordering::Acquire) == fill {
            cache.insert(key, pe);
        }
        Ok(pe)
    }
}

/// Host memory that counts the table entries a walk reads, for [`IommuStats`].
///
/// [`IommuStats`]: super::IommuStats
struct CountingReads<'a> {
    mem: &'a HostMemory,
    reads: Cell<u64>,
}

impl PhysMem for CountingReads<'_> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.reads.set(self.reads.get() + 1);
        self.mem.read_u64(addr)
    }
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        self.mem.fetch_or_u64(addr, bits)
    }
    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        self.mem.compare_exchange_u64(addr, old, new)
    }
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
        self.mem.write_u64(addr, value)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.mem.write(addr, buf)
    }
}

fn hit(e: &IotlbEntry, addr: u64) -> DmaMapping {
    DmaMapping {
        hpa: e.output | (addr & ((1u64 << e.page_shift) - 1)),
        page_shift: e.page_shift,
        perms: e.perms,
        source: Source::Iotlb,
    }
}
