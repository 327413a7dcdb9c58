//! The request pipeline of a remapping unit (VT-d §3.4 to §3.9, §6.2): one DMA request from
//! the root word through the IOTLB, the context entry, the PASID entry and the walk of the
//! tables it selects, to a cached translation or a fault.
//!
//! The steps and their order are here, once. A unit is a configuration of the pipeline
//! ([`RemappingUnit`]): where its tables live (a [`PhysMem`]) and the caches it keeps. The
//! physical IOMMU model (`vsva-hw`, tables in host memory, a lock-free IOTLB and
//! paging-structure caches, strict mode) and the vIOMMU (`vsva-vmm`, tables in guest RAM)
//! are the two configurations.

use std::fmt;

use crate::addr::{Pasid, SourceId};
use crate::context::{read_context_entry, ScalableContextEntry};
use crate::fault::FaultReason;
use crate::flpte::FlFormat;
use crate::pasid::{read_pasid_entry, Pgtt, ValidPasidEntry};
use crate::regs::{AddressType, FaultRecord, RegisterFile, RequestType, Ttm};
use crate::root::{EntryChecks, EntryFault};
use crate::slpte::SlFormat;
use crate::walk::{
    walk_first_level, walk_nested, walk_second_level, AccessRequest, PageSize, Permissions, Stage,
    Translation, WalkFault, WalkObserver,
};
use vsva_mem::PhysMem;

/// How requests are translated now: GSTS.TES and the root table RTADDR_REG latched (§10.4.5,
/// §10.4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootState {
    /// GSTS.TES clear: requests go to memory untranslated.
    Disabled,
    /// Translation enabled with a root table that is not in scalable mode (legacy, or a
    /// reserved TTM): every request faults (RTA.1, or RTA.2 with a PASID).
    NotScalable,
    /// Translation enabled, scalable-mode root table at this address.
    Scalable(u64),
}

impl RootState {
    /// Root word bit: GSTS.TES is set.
    const TES: u64 = 1;
    /// Root word bit: the latched root table is in scalable mode.
    const SCALABLE: u64 = 2;
    /// The low bits of a root word this type leaves to the unit for flags of its own (the
    /// root table address is 4-KiB aligned, and bits 0 and 1 are taken).
    pub const UNIT_FLAGS: u64 = 0xffc;

    /// The root word of `regs`: the latched root table address with the translation enable
    /// and the table mode in its low bits, so that a request reads its state in one load.
    pub fn word(regs: &RegisterFile) -> u64 {
        let rt = regs.root_table();
        let mut word = rt.addr & !0xfff;
        if rt.ttm == Ttm::Scalable {
            word |= Self::SCALABLE;
        }
        if regs.translation_enabled() {
            word |= Self::TES;
        }
        word
    }

    /// The state a root word holds (flags of the unit ignored).
    #[inline(always)]
    pub const fn from_word(word: u64) -> Self {
        if word & Self::TES == 0 {
            RootState::Disabled
        } else if word & Self::SCALABLE == 0 {
            RootState::NotScalable
        } else {
            RootState::Scalable(word & !0xfff)
        }
    }

    /// The latched scalable-mode root table of a root word, whether or not translation is
    /// enabled: where a unit reads the tables it shadows.
    pub const fn scalable_table(word: u64) -> Option<u64> {
        if word & Self::SCALABLE != 0 {
            Some(word & !0xfff)
        } else {
            None
        }
    }

    /// The fault of every request while the root table is not in scalable mode: RTA.2 for a
    /// request with PASID, RTA.1 without (§7.1.3).
    pub const fn not_scalable_fault(pasid: Option<Pasid>) -> FaultReason {
        if pasid.is_some() {
            FaultReason::Rta2
        } else {
            FaultReason::Rta1
        }
    }
}

/// A DMA request the remapping unit could not translate: the fault condition, and what
/// decides whether and how it is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub struct TranslationFault {
    /// The requester.
    pub sid: SourceId,
    /// The PASID the request carried, if any.
    pub pasid: Option<Pasid>,
    /// The address requested.
    pub addr: u64,
    /// The fault condition.
    pub reason: FaultReason,
    /// Fault processing disabled by an FPD field on the way: not recorded.
    pub fpd: bool,
    /// A first-level not-present or permission fault under a context entry with PRE set:
    /// a translation request may resolve it with a page request (§7.4).
    pub recoverable: bool,
}

impl TranslationFault {
    /// What primary fault logging records of this fault (§7.2.1, §10.4.14), for a request
    /// of `access` with address type `address_type`.
    pub fn record(&self, access: AccessRequest, address_type: AddressType) -> FaultRecord {
        FaultRecord {
            fault_info: self.addr,
            sid: self.sid,
            reason: self.reason.code(),
            pasid: self.pasid,
            exe: access.execute,
            privileged: access.supervisor,
            request: if access.write {
                RequestType::Write
            } else {
                RequestType::Read
            },
            address_type,
        }
    }
}

impl fmt::Display for TranslationFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {:#x} (sid {}, ", self.reason, self.addr, self.sid)?;
        match self.pasid {
            Some(p) => write!(f, "{p})"),
            None => write!(f, "no PASID)"),
        }
    }
}

/// A DMA request as the remapping unit receives it (an untranslated request, or the
/// translation request of a device TLB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The requester.
    pub sid: SourceId,
    /// The PASID of the request's PASID prefix, if any.
    pub pasid: Option<Pasid>,
    /// The address requested.
    pub addr: u64,
    /// The access requested.
    pub access: AccessRequest,
}

impl Request {
    /// A request from `sid` (with `pasid`, or without PASID) for `access` at `addr`.
    #[inline(always)]
    pub const fn new(
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: AccessRequest,
    ) -> Request {
        Request {
            sid,
            pasid,
            addr,
            access,
        }
    }
}

/// How the pipeline translated a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remapped<E> {
    /// Translation is disabled (GSTS.TES clear): the address goes to memory as is.
    Untranslated,
    /// An IOTLB entry served it, without reading any table.
    Cached {
        /// The entry.
        entry: E,
        /// The PASID the request was translated with (its own, or RID_PASID).
        pasid: Pasid,
    },
    /// A walk of the tables translated it.
    Walked {
        /// What the unit made of the walk for its IOTLB.
        entry: E,
        /// The PASID the request was translated with (its own, or RID_PASID).
        pasid: Pasid,
        /// The output address of the requested byte.
        output: u64,
    },
}

/// A remapping unit as the request pipeline sees it: where its tables live and the caches
/// it keeps (§6.2). Caches keep what they hold until the unit's invalidation handling
/// removes it; a fill token taken before a read and handed back to the insert lets a unit
/// refuse an entry read before an invalidation that ran meanwhile.
pub trait RemappingUnit {
    /// Where the root, context and PASID tables and the page tables live.
    type Mem: PhysMem;
    /// One cached translation in the unit's IOTLB.
    type IotlbEntry: Copy;
    /// What the unit gives for a translated request.
    type Output;

    /// The output of `req`, translated as `how` says. Called once per request, inlined
    /// into the pipeline, so that `how` is never stored.
    fn output(&self, req: &Request, how: Remapped<Self::IotlbEntry>) -> Self::Output;

    /// The root word ([`RootState::word`], with the unit's own flags).
    fn root_word(&self) -> u64;
    /// The memory the tables are read from.
    fn memory(&self) -> &Self::Mem;
    /// What decides which entries are valid: the unit's capabilities as entry checks,
    /// built when they were set.
    fn entry_checks(&self) -> &EntryChecks;

    /// A cached translation of `addr` for `sid` and `pasid` whose rights cover `access`.
    fn iotlb_lookup(
        &self,
        sid: SourceId,
        pasid: Pasid,
        addr: u64,
        access: AccessRequest,
    ) -> Option<Self::IotlbEntry>;
    /// Sees an IOTLB hit of a request with PASID before it is used, with the root word it
    /// was found under (strict mode of the physical IOMMU checks it against the tables).
    #[inline(always)]
    fn iotlb_hit(&self, _root_word: u64, _req: &Request, _entry: &Self::IotlbEntry) {}
    /// The fill token of a request's IOTLB insert and of the paging-structure-cache fills of
    /// its walk, taken before the context and PASID entries the walk starts from are read:
    /// an invalidation that runs after it and before a fill refuses the fill, whatever
    /// stage of the request it overtook (§6.5.2: when an invalidation completes, no
    /// translation cached from the entries it removed may be used).
    type Fill: Copy;
    /// Starts a request's fills (see [`RemappingUnit::Fill`]).
    fn begin_fill(&self) -> Self::Fill;
    /// Makes the IOTLB entry of a walk that translated `addr` for `sid` and `pasid` with
    /// the rights of `access`, and caches it unless an invalidation ran since `fill`.
    #[allow(clippy::too_many_arguments)]
    fn iotlb_insert(
        &self,
        fill: Self::Fill,
        sid: SourceId,
        pasid: Pasid,
        addr: u64,
        pe: &ValidPasidEntry,
        t: &Translation,
        access: AccessRequest,
    ) -> Self::IotlbEntry;

    /// The fill token of context- and PASID-cache inserts.
    fn entry_fill(&self) -> u64;
    /// The context cache's entry for `sid`.
    fn cached_context(&self, sid: SourceId) -> Option<ScalableContextEntry>;
    /// Caches a context entry read from the tables.
    fn cache_context(&self, fill: u64, sid: SourceId, ctx: &ScalableContextEntry);
    /// The PASID cache's entry for `sid` and `pasid`.
    fn cached_pasid_entry(&self, sid: SourceId, pasid: Pasid) -> Option<ValidPasidEntry>;
    /// Caches a PASID entry read from the tables (IOTLB entries of the same requester and
    /// PASID under another domain id are no longer found).
    fn cache_pasid_entry(&self, fill: u64, sid: SourceId, pasid: Pasid, pe: &ValidPasidEntry);

    /// Walks the tables `pe` selects for `req` (translated with `pasid` and the rights of
    /// `access`), through whatever paging-structure caches the unit keeps; they take what
    /// it reads unless an invalidation ran since `fill`.
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        fill: Self::Fill,
        rta: u64,
        req: &Request,
        pasid: Pasid,
        pe: &ValidPasidEntry,
        access: AccessRequest,
    ) -> Result<Translation, WalkFault>;
}

/// Translates `req` on `unit`: root word, IOTLB, context entry, PASID entry, walk.
///
/// An IOTLB hit serves the request without reading any table, whatever the tables say now:
/// a cached entry stays in use until invalidated, as on hardware. Inlined into the unit,
/// so that a hit is the root word, the IOTLB lookup and the rights check; the miss path is
/// out of line.
#[inline(always)]
pub fn translate<U: RemappingUnit + ?Sized>(
    unit: &U,
    req: Request,
) -> Result<U::Output, TranslationFault> {
    let word = unit.root_word();
    let rta = match RootState::from_word(word) {
        RootState::Scalable(rta) => rta,
        RootState::Disabled => return Ok(unit.output(&req, Remapped::Untranslated)),
        RootState::NotScalable => {
            return Err(fault(
                &req,
                RootState::not_scalable_fault(req.pasid),
                false,
                false,
            ))
        }
    };
    if let Some(p) = req.pasid {
        if let Some(entry) = unit.iotlb_lookup(req.sid, p, req.addr, req.access) {
            unit.iotlb_hit(word, &req, &entry);
            return Ok(unit.output(&req, Remapped::Cached { entry, pasid: p }));
        }
    }
    translate_miss(unit, rta, req)
}

/// The request's translation if the unit has it without reading any table: an IOTLB hit
/// (checked as [`translate`] checks one), or translation disabled; `None` otherwise. For a
/// unit looking ahead of a device's requests (a run of pages, see `DmaPort::remap_run` in
/// vsva-hw): it walks nothing, so it sets no Accessed/Dirty bit and records no fault for a
/// page the device may never reach.
#[inline(always)]
pub fn translate_cached<U: RemappingUnit + ?Sized>(unit: &U, req: Request) -> Option<U::Output> {
    let word = unit.root_word();
    match RootState::from_word(word) {
        RootState::Scalable(_) => {
            let p = req.pasid?;
            let entry = unit.iotlb_lookup(req.sid, p, req.addr, req.access)?;
            unit.iotlb_hit(word, &req, &entry);
            Some(unit.output(&req, Remapped::Cached { entry, pasid: p }))
        }
        RootState::Disabled => Some(unit.output(&req, Remapped::Untranslated)),
        RootState::NotScalable => None,
    }
}

fn fault(req: &Request, reason: FaultReason, fpd: bool, recoverable: bool) -> TranslationFault {
    TranslationFault {
        sid: req.sid,
        pasid: req.pasid,
        addr: req.addr,
        reason,
        fpd,
        recoverable,
    }
}

/// Everything after an IOTLB miss, out of line so that the hit path keeps a small frame.
#[inline(never)]
fn translate_miss<U: RemappingUnit + ?Sized>(
    unit: &U,
    rta: u64,
    req: Request,
) -> Result<U::Output, TranslationFault> {
    let fill = unit.begin_fill();
    // The entries are used where their steps left them, by reference (see `context_entry`).
    let ctx = context_entry(unit, rta, req.sid);
    let ctx = ctx
        .as_ref()
        .map_err(|f| fault(&req, f.reason, f.fpd, false))?;
    let pasid = ctx
        .pasid_for_request(req.pasid)
        .map_err(|r| fault(&req, r, ctx.fpd, false))?;
    // Requests without PASID are supervisor requests when the context entry says so.
    let access = AccessRequest {
        supervisor: req.access.supervisor || (req.pasid.is_none() && ctx.rid_priv),
        ..req.access
    };
    if req.pasid.is_none() {
        if let Some(entry) = unit.iotlb_lookup(req.sid, pasid, req.addr, access) {
            return Ok(unit.output(&req, Remapped::Cached { entry, pasid }));
        }
    }
    let pe = pasid_entry(unit, req.sid, ctx, pasid);
    let pe = pe
        .as_ref()
        .map_err(|f| fault(&req, f.reason, f.fpd, false))?;
    let walked = request_checks(pe, req.addr, access)
        .and_then(|()| unit.walk(fill, rta, &req, pasid, pe, access));
    let t = walked.map_err(|f| {
        let recoverable = ctx.pre && f.page_request_may_resolve();
        fault(&req, f.reason, ctx.fpd || pe.fpd(), recoverable)
    })?;
    let entry = unit.iotlb_insert(fill, req.sid, pasid, req.addr, pe, &t, access);
    let how = Remapped::Walked {
        entry,
        pasid,
        output: t.output,
    };
    Ok(unit.output(&req, how))
}

/// The context entry of `sid` under the root table at `rta`, from the unit's context cache
/// or the tables.
pub fn context_entry<U: RemappingUnit + ?Sized>(
    unit: &U,
    rta: u64,
    sid: SourceId,
) -> Result<ScalableContextEntry, EntryFault> {
    if let Some(c) = unit.cached_context(sid) {
        return Ok(c);
    }
    let fill = unit.entry_fill();
    // Cached where it was read, by reference: moving the entry out of the result (with `?`)
    // had the miss path copy it field by field, twice.
    let read = read_context_entry(unit.memory(), rta, sid, unit.entry_checks());
    if let Ok(c) = &read {
        unit.cache_context(fill, sid, c);
    }
    read
}

/// The PASID entry `pasid` of `sid`, from the unit's PASID cache or the tables `ctx`
/// points to.
pub fn pasid_entry<U: RemappingUnit + ?Sized>(
    unit: &U,
    sid: SourceId,
    ctx: &ScalableContextEntry,
    pasid: Pasid,
) -> Result<ValidPasidEntry, EntryFault> {
    if let Some(pe) = unit.cached_pasid_entry(sid, pasid) {
        return Ok(pe);
    }
    let fill = unit.entry_fill();
    // Cached where it was read, by reference (see `context_entry`).
    let read = read_pasid_entry(unit.memory(), ctx, pasid, unit.entry_checks());
    if let Ok(pe) = &read {
        unit.cache_pasid_entry(fill, sid, pasid, pe);
    }
    read
}

/// Walks the page tables a PASID entry selects, without caches (what a unit without
/// paging-structure caches does, what strict mode compares with, and what an explanation
/// records).
pub fn walk_pasid_entry<M, O>(
    mem: &M,
    pe: &ValidPasidEntry,
    formats: (FlFormat, SlFormat),
    addr: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    request_checks(pe, addr, access)?;
    match pe.pgtt() {
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
/// Supervisor requests need SRE (SPT.6), which the first-level walker and
/// [`pass_through`] check.
pub fn request_checks(
    pe: &ValidPasidEntry,
    addr: u64,
    access: AccessRequest,
) -> Result<(), WalkFault> {
    if access.execute && !pe.ere() {
        return Err(entry_fault(FaultReason::Spt5, addr));
    }
    Ok(())
}

/// Pass-through translation (PGTT=100b): the address is the output; supervisor requests
/// need SRE (SPT.6).
pub fn pass_through(
    pe: &ValidPasidEntry,
    addr: u64,
    access: AccessRequest,
) -> Result<Translation, WalkFault> {
    if access.supervisor && !pe.sre() {
        return Err(entry_fault(FaultReason::Spt6, addr));
    }
    Ok(Translation {
        output: addr,
        page_size: PageSize::Size4K,
        perms: Permissions::ALL,
        dirty: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::DomainId;
    use crate::context::context_entry_addr;
    use crate::pasid::{pasid_entry_addr, PasidDirEntry, PasidEntry};
    use crate::root::tests::{put, CHECKS};
    use crate::root::{root_entry_addr, ScalableRootEntry};
    use crate::testutil::TestMemory;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    const RTA: u64 = 0x1000;
    const CTP: u64 = 0x2000;
    const DIR: u64 = 0x3000;
    const TABLE: u64 = 0x4000;

    /// Requester id, PASID and page number.
    type IotlbKey = (u16, u32, u64);

    /// A unit with plain caches: an IOTLB by page, context and PASID caches, one
    /// generation that its "invalidations" advance, and counters.
    struct Unit {
        mem: TestMemory,
        word: u64,
        generation: Cell<u64>,
        iotlb: RefCell<HashMap<IotlbKey, (u64, DomainId)>>,
        contexts: RefCell<HashMap<u16, ScalableContextEntry>>,
        entries: RefCell<HashMap<(u16, u32), ValidPasidEntry>>,
        walks: Cell<u32>,
        /// An invalidation runs during the next walk.
        invalidate_in_walk: Cell<bool>,
        /// An invalidation runs when the next PASID entry is read from the tables.
        invalidate_in_entry_read: Cell<bool>,
        /// The fill token each walk was given.
        walk_fills: RefCell<Vec<u64>>,
    }

    impl Unit {
        /// Device 00:01.0 with PASIDs, RID_PASID 0, and PASID 0 and 5 in domain 7 with
        /// pass-through translation (the output is the input, no page tables).
        fn new() -> Self {
            let mem = TestMemory::new(0x10_0000);
            let root = ScalableRootEntry {
                lctp: Some(CTP),
                uctp: None,
            };
            put(&mem, root_entry_addr(RTA, 0), &root.to_raw());
            let ctx = ScalableContextEntry {
                paside: true,
                pasiddirptr: DIR,
                ..Default::default()
            };
            put(&mem, context_entry_addr(CTP, 0x08), &ctx.to_raw());
            let pde = PasidDirEntry {
                fpd: false,
                smptblptr: TABLE,
            };
            put(&mem, DIR, &[pde.to_raw()]);
            let pe = PasidEntry {
                ..PasidEntry::new(Pgtt::PassThrough, DomainId(7))
            };
            for p in [0, 5] {
                put(&mem, pasid_entry_addr(TABLE, pasid(p)), &pe.to_raw());
            }
            Unit {
                mem,
                word: RTA | RootState::TES | RootState::SCALABLE,
                generation: Cell::new(0),
                iotlb: RefCell::default(),
                contexts: RefCell::default(),
                entries: RefCell::default(),
                walks: Cell::new(0),
                invalidate_in_walk: Cell::new(false),
                invalidate_in_entry_read: Cell::new(false),
                walk_fills: RefCell::default(),
            }
        }

        fn request(
            &self,
            pasid: Option<Pasid>,
            addr: u64,
        ) -> Result<(u64, bool), TranslationFault> {
            let req = Request {
                sid: SourceId::new(0, 1, 0).unwrap(),
                pasid,
                addr,
                access: AccessRequest::READ,
            };
            translate(self, req)
        }
    }

    fn pasid(raw: u32) -> Pasid {
        Pasid::new(raw).unwrap()
    }

    impl RemappingUnit for Unit {
        type Mem = TestMemory;
        type IotlbEntry = (u64, DomainId);
        /// The output address, and whether the IOTLB served it.
        type Output = (u64, bool);

        fn output(&self, req: &Request, how: Remapped<(u64, DomainId)>) -> (u64, bool) {
            match how {
                Remapped::Untranslated => (req.addr, false),
                Remapped::Cached { entry, .. } => (entry.0 | (req.addr & 0xfff), true),
                Remapped::Walked { output, .. } => (output, false),
            }
        }
        fn root_word(&self) -> u64 {
            self.word
        }
        fn memory(&self) -> &TestMemory {
            &self.mem
        }
        fn entry_checks(&self) -> &EntryChecks {
            &CHECKS
        }
        fn iotlb_lookup(
            &self,
            sid: SourceId,
            pasid: Pasid,
            addr: u64,
            _access: AccessRequest,
        ) -> Option<(u64, DomainId)> {
            let key = (sid.rid(), pasid.raw(), addr >> 12);
            self.iotlb.borrow().get(&key).copied()
        }
        type Fill = u64;
        fn begin_fill(&self) -> u64 {
            self.generation.get()
        }
        fn iotlb_insert(
            &self,
            fill: u64,
            sid: SourceId,
            pasid: Pasid,
            addr: u64,
            pe: &ValidPasidEntry,
            t: &Translation,
            _access: AccessRequest,
        ) -> (u64, DomainId) {
            let entry = (t.page_base(), pe.did());
            if fill == self.generation.get() {
                let key = (sid.rid(), pasid.raw(), addr >> 12);
                self.iotlb.borrow_mut().insert(key, entry);
            }
            entry
        }
        fn entry_fill(&self) -> u64 {
            self.generation.get()
        }
        fn cached_context(&self, sid: SourceId) -> Option<ScalableContextEntry> {
            self.contexts.borrow().get(&sid.rid()).copied()
        }
        fn cache_context(&self, fill: u64, sid: SourceId, ctx: &ScalableContextEntry) {
            if fill == self.generation.get() {
                self.contexts.borrow_mut().insert(sid.rid(), *ctx);
            }
        }
        fn cached_pasid_entry(&self, sid: SourceId, pasid: Pasid) -> Option<ValidPasidEntry> {
            self.entries
                .borrow()
                .get(&(sid.rid(), pasid.raw()))
                .copied()
        }
        fn cache_pasid_entry(&self, fill: u64, sid: SourceId, pasid: Pasid, pe: &ValidPasidEntry) {
            if self.invalidate_in_entry_read.take() {
                self.generation.set(self.generation.get() + 1);
            }
            if fill == self.generation.get() {
                self.entries
                    .borrow_mut()
                    .insert((sid.rid(), pasid.raw()), *pe);
            }
        }
        fn walk(
            &self,
            fill: u64,
            _rta: u64,
            req: &Request,
            _pasid: Pasid,
            pe: &ValidPasidEntry,
            access: AccessRequest,
        ) -> Result<Translation, WalkFault> {
            self.walks.set(self.walks.get() + 1);
            self.walk_fills.borrow_mut().push(fill);
            if self.invalidate_in_walk.take() {
                self.generation.set(self.generation.get() + 1);
            }
            pass_through(pe, req.addr, access)
        }
    }

    #[test]
    fn a_hit_reads_no_table_and_a_miss_walks_once() {
        let u = Unit::new();
        assert_eq!(u.request(Some(pasid(5)), 0x12_3456), Ok((0x12_3456, false)));
        assert_eq!(u.walks.get(), 1);
        // The tables go; the IOTLB still serves the page, for the same PASID only.
        put(&u.mem, root_entry_addr(RTA, 0), &[0, 0]);
        assert_eq!(u.request(Some(pasid(5)), 0x12_3abc), Ok((0x12_3abc, true)));
        assert_eq!(u.walks.get(), 1);
        // Another PASID misses, and the cached context and PASID table pointer still
        // lead to its entry.
        assert_eq!(u.request(Some(pasid(0)), 0x5000), Ok((0x5000, false)));
        // A request without PASID is translated with RID_PASID (0), whose page is cached
        // now; a PASID not in the table faults in the PASID table (SPT.2).
        assert_eq!(u.request(None, 0x5008), Ok((0x5008, true)));
        let f = u.request(Some(pasid(6)), 0x5000).unwrap_err();
        assert_eq!(
            (f.reason, f.pasid, f.addr),
            (FaultReason::Spt2, Some(pasid(6)), 0x5000)
        );
        assert_eq!(u.walks.get(), 2);
    }

    #[test]
    fn a_walk_that_an_invalidation_overtook_is_used_but_not_cached() {
        let u = Unit::new();
        u.invalidate_in_walk.set(true);
        assert_eq!(u.request(Some(pasid(5)), 0x7000), Ok((0x7000, false)));
        assert!(u.iotlb.borrow().is_empty());
        assert_eq!(u.request(Some(pasid(5)), 0x7000), Ok((0x7000, false)));
        assert_eq!(u.request(Some(pasid(5)), 0x7000), Ok((0x7000, true)));
        assert_eq!(u.walks.get(), 2);
    }

    #[test]
    fn a_walk_fills_with_the_token_taken_before_its_entries_were_read() {
        let u = Unit::new();
        // An invalidation between the PASID-entry read and the walk: the walk's own
        // (paging-structure) fills must still see it, so they get the request's token.
        u.invalidate_in_entry_read.set(true);
        assert_eq!(u.request(Some(pasid(5)), 0x7000), Ok((0x7000, false)));
        assert_eq!(*u.walk_fills.borrow(), [0]);
        assert_ne!(u.generation.get(), 0);
        assert!(u.iotlb.borrow().is_empty() && u.entries.borrow().is_empty());
        assert_eq!(u.request(Some(pasid(5)), 0x7000), Ok((0x7000, false)));
        assert_eq!(*u.walk_fills.borrow(), [0, 1]);
        assert_eq!(u.request(Some(pasid(5)), 0x7000), Ok((0x7000, true)));
    }

    #[test]
    fn the_root_word_decides_before_any_cache() {
        let mut u = Unit::new();
        u.request(Some(pasid(5)), 0x7000).unwrap();
        u.word = RTA | RootState::TES;
        let f = u.request(Some(pasid(5)), 0x7000).unwrap_err();
        assert_eq!(
            (f.reason, f.fpd, f.recoverable),
            (FaultReason::Rta2, false, false)
        );
        assert_eq!(
            u.request(None, 0x7000).unwrap_err().reason,
            FaultReason::Rta1
        );
        u.word = RTA | RootState::SCALABLE;
        assert_eq!(u.request(Some(pasid(5)), 0x7000), Ok((0x7000, false)));
        assert_eq!(u.walks.get(), 1);
    }

    #[test]
    fn execute_requests_need_ere_before_the_walk() {
        let u = Unit::new();
        let req = Request {
            sid: SourceId::new(0, 1, 0).unwrap(),
            pasid: Some(pasid(5)),
            addr: 0x7000,
            access: AccessRequest {
                execute: true,
                ..AccessRequest::READ
            },
        };
        assert_eq!(translate(&u, req).unwrap_err().reason, FaultReason::Spt5);
        assert_eq!(u.walks.get(), 0);
    }

    #[test]
    fn the_root_word_holds_the_enable_the_mode_and_the_table() {
        assert_eq!(RootState::from_word(0), RootState::Disabled);
        // A latched scalable table is kept with translation off, for shadowing.
        let off = 0x5000 | RootState::SCALABLE;
        assert_eq!(RootState::from_word(off), RootState::Disabled);
        assert_eq!(RootState::scalable_table(off), Some(0x5000));
        let on = off | RootState::TES;
        assert_eq!(RootState::from_word(on), RootState::Scalable(0x5000));
        // Unit flags do not change the state.
        assert_eq!(
            RootState::from_word(on | RootState::UNIT_FLAGS),
            RootState::Scalable(0x5000)
        );
        let legacy = 0x5000 | RootState::TES;
        assert_eq!(RootState::from_word(legacy), RootState::NotScalable);
        assert_eq!(RootState::scalable_table(legacy), None);
        let p = Pasid::new(1).unwrap();
        assert_eq!(RootState::not_scalable_fault(Some(p)), FaultReason::Rta2);
        assert_eq!(RootState::not_scalable_fault(None), FaultReason::Rta1);
    }

    #[test]
    fn a_fault_names_the_reason_the_address_and_the_requester() {
        let f = TranslationFault {
            sid: SourceId::from_rid(0x18),
            pasid: None,
            addr: 0x1000,
            reason: FaultReason::Sfl2,
            fpd: false,
            recoverable: false,
        };
        assert!(f.to_string().contains("0x1000"), "{f}");
        assert!(f.to_string().ends_with("no PASID)"), "{f}");
        let r = f.record(AccessRequest::WRITE, AddressType::TranslationRequest);
        assert_eq!(
            (r.reason, r.request, r.exe),
            (0x71, RequestType::Write, false)
        );
        assert_eq!((r.sid, r.pasid, r.fault_info), (f.sid, None, 0x1000));
        assert_eq!(r.address_type, AddressType::TranslationRequest);
    }
}
