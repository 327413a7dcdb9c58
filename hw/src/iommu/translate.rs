//! The physical IOMMU as a configuration of the VT-d request pipeline
//! ([`vsva_vtd::request`]): tables in host memory; a lock-free IOTLB, context and PASID
//! caches and paging-structure caches (see `cached_walk`) that keep entries until an
//! invalidation descriptor removes them (see `qi`); strict mode (see `stale`).

use vsva_vtd::request::{self, Remapped, RemappingUnit, Request};
use vsva_vtd::{
    addr::Pasid, addr::SourceId, context::ScalableContextEntry, pasid::Pgtt,
    pasid::ValidPasidEntry, request::TranslationFault, root::EntryChecks, root::EntryFault,
    walk::AccessRequest, walk::Translation, walk::WalkFault,
};

use std::cell::Cell;
use std::sync::atomic::Ordering;

use {vsva_mem::MemError, vsva_mem::PhysMem};

use super::cached_walk::CacheUse;
use super::entry_cache::{context_tag, pasid_key, pasid_tag};
use super::iotlb::{IotlbEntry, PackedEntry, Perms, RequestMask, TranslationKind};
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

pub(crate) fn kind_of(pgtt: Pgtt) -> TranslationKind {
    match pgtt {
        Pgtt::FirstLevel => TranslationKind::FirstLevel,
        Pgtt::SecondLevel => TranslationKind::SecondLevel,
        Pgtt::Nested => TranslationKind::Nested,
        Pgtt::PassThrough => TranslationKind::PassThrough,
    }
}

pub(crate) fn iotlb_entry(
    pe: &ValidPasidEntry,
    t: &Translation,
    access: AccessRequest,
) -> IotlbEntry {
    IotlbEntry {
        did: pe.did(),
        output: t.page_base(),
        page_shift: t.page_size.shift() as u8,
        perms: Perms::default()
            .with_if(Perms::READ, t.perms.read)
            .with_if(Perms::WRITE, t.perms.write)
            .with_if(Perms::EXECUTE, t.perms.execute)
            .with_if(Perms::USER, t.perms.user)
            .with_if(Perms::DIRTY, t.dirty)
            .with_if(Perms::SUPERVISOR, access.supervisor),
        kind: kind_of(pe.pgtt()),
    }
}

impl Iommu {
    /// Translates a DMA request from `sid` (with `pasid`, or without PASID) to `addr`,
    /// through the request pipeline ([`request::translate`]).
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
        let req = Request::new(sid, pasid, addr, access);
        request::translate(self, req)
    }

    /// The translation of a request if the IOMMU has it without walking: an IOTLB hit
    /// (checked in strict mode) or translation disabled ([`request::translate_cached`]).
    #[inline(always)]
    pub(crate) fn translate_cached(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: AccessRequest,
    ) -> Option<DmaMapping> {
        let req = Request::new(sid, pasid, addr, access);
        request::translate_cached(self, req)
    }

    /// Strict mode's check of an IOTLB hit, out of line: the entry is passed by value so
    /// that the hit path keeps it in registers instead of storing it for a reference, and
    /// decoded here.
    #[cold]
    #[inline(never)]
    fn check_hit(&self, rta: u64, req: CheckedRequest, e: PackedEntry) {
        self.check_stale(rta, &req, &e.entry());
    }

    /// The context entry of `sid`, from the context cache or the tables.
    pub(crate) fn context_entry(
        &self,
        rta: u64,
        sid: SourceId,
    ) -> Result<ScalableContextEntry, EntryFault> {
        request::context_entry(self, rta, sid)
    }
}

/// A request's fill tokens: of the IOTLB and of the paging-structure caches, taken
/// before its context and PASID entries are read.
#[derive(Clone, Copy, Debug)]
pub struct Fill {
    iotlb: u64,
    paging: u64,
}

/// The physical IOMMU's caches and memory, as the request pipeline uses them.
impl RemappingUnit for Iommu {
    type Mem = HostMemory;
    type IotlbEntry = PackedEntry;
    type Output = DmaMapping;

    #[inline(always)]
    fn output(&self, req: &Request, how: Remapped<PackedEntry>) -> DmaMapping {
        match how {
            Remapped::Cached { entry, .. } => hit(entry, req.addr),
            Remapped::Walked { entry, output, .. } => DmaMapping {
                hpa: output,
                page_shift: entry.page_shift(),
                perms: entry.perms(),
                source: Source::Walk,
            },
            Remapped::Untranslated => DmaMapping {
                hpa: req.addr,
                page_shift: 12,
                perms: Perms::default(),
                source: Source::Untranslated,
            },
        }
    }

    #[inline(always)]
    fn root_word(&self) -> u64 {
        self.root.load(Ordering::Acquire)
    }

    fn memory(&self) -> &HostMemory {
        &self.mem
    }

    fn entry_checks(&self) -> &EntryChecks {
        &self.entry_checks
    }

    #[inline(always)]
    fn iotlb_lookup(
        &self,
        sid: SourceId,
        pasid: Pasid,
        addr: u64,
        access: AccessRequest,
    ) -> Option<PackedEntry> {
        let e = self.iotlb.lookup(sid, pasid, addr)?;
        e.perms().allows(RequestMask::of(access)).then_some(e)
    }

    /// Strict mode: the hit is checked against the tables, out of line.
    #[inline(always)]
    fn iotlb_hit(&self, root_word: u64, req: &Request, entry: &PackedEntry) {
        if root_word & ROOT_STRICT != 0 {
            if let Some(eff) = req.pasid {
                let checked = CheckedRequest {
                    sid: req.sid,
                    pasid: req.pasid,
                    eff,
                    addr: req.addr,
                    access: req.access,
                };
                self.check_hit(root_word & !0xfff, checked, *entry);
            }
        }
    }

    type Fill = Fill;

    fn begin_fill(&self) -> Fill {
        Fill {
            iotlb: self.iotlb.begin_fill(),
            paging: self.paging_caches.begin_fill(),
        }
    }

    /// Pass-through translations are not cached. In strict mode a fill an invalidation
    /// overtook is recorded ([`OvertakenFill`](super::OvertakenFill)).
    fn iotlb_insert(
        &self,
        fill: Fill,
        sid: SourceId,
        pasid: Pasid,
        addr: u64,
        pe: &ValidPasidEntry,
        t: &Translation,
        access: AccessRequest,
    ) -> PackedEntry {
        // Encoded once: the words the IOTLB keeps are those the request is answered with.
        let entry = PackedEntry::new(sid, pasid, addr, &iotlb_entry(pe, t, access));
        if pe.pgtt() != Pgtt::PassThrough {
            if self.iotlb.insert_packed(fill.iotlb, addr, entry) {
                self.retag_filter.filled(pasid_tag(sid, pasid, pe));
            } else if self.strict() {
                self.report_overtaken_fill(fill.iotlb, sid, pasid, addr, entry.entry());
            }
        }
        entry
    }

    fn entry_fill(&self) -> u64 {
        self.entry_generation.load(Ordering::Acquire)
    }

    fn cached_context(&self, sid: SourceId) -> Option<ScalableContextEntry> {
        self.context_cache.get(context_tag(sid))
    }

    /// An entry read while a context- or PASID-cache invalidation ran is used but not
    /// cached.
    fn cache_context(&self, fill: u64, sid: SourceId, ctx: &ScalableContextEntry) {
        self.context_cache
            .fill(&self.entry_generation, fill, context_tag(sid), ctx);
    }

    fn cached_pasid_entry(&self, sid: SourceId, pasid: Pasid) -> Option<ValidPasidEntry> {
        self.pasid_cache.get(pasid_key(sid, pasid))
    }

    /// An entry read afresh retags the IOTLB for its domain, unless every IOTLB entry filled
    /// for its requester and PASID since the last retag has its domain id (`RetagFilter`).
    fn cache_pasid_entry(&self, fill: u64, sid: SourceId, pasid: Pasid, pe: &ValidPasidEntry) {
        let tag = pasid_tag(sid, pasid, pe);
        if self.retag_filter.read_needs_retag(tag) && self.iotlb.retag(sid, pasid, pe.did()) > 0 {
            self.runs.drop_all();
        }
        self.pasid_cache.fill(&self.entry_generation, fill, tag, pe);
    }

    /// Through the paging-structure caches; counts the walk and the entries it read. In
    /// strict mode a walk that used cached entries is checked against the tables.
    fn walk(
        &self,
        fill: Fill,
        rta: u64,
        req: &Request,
        pasid: Pasid,
        pe: &ValidPasidEntry,
        access: AccessRequest,
    ) -> Result<Translation, WalkFault> {
        let mem = CountingReads {
            mem: &self.mem,
            reads: Cell::new(0),
        };
        let mut used = CacheUse::default();
        let walked = self.walk_cached(&mem, fill.paging, pe, pasid, req.addr, access, &mut used);
        self.stats.walks.add(1);
        self.stats.table_reads.add(mem.reads.get());
        if let Ok(t) = &walked {
            if self.strict() && used.any() {
                let checked = CheckedRequest {
                    sid: req.sid,
                    pasid: req.pasid,
                    eff: pasid,
                    addr: req.addr,
                    access,
                };
                self.check_cached_walk(rta, &checked, pe, &iotlb_entry(pe, t, access), &used);
            }
        }
        walked
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

fn hit(e: PackedEntry, addr: u64) -> DmaMapping {
    DmaMapping {
        hpa: e.output() | (addr & ((1u64 << e.page_shift()) - 1)),
        page_shift: e.page_shift(),
        perms: e.perms(),
        source: Source::Iotlb,
    }
}
