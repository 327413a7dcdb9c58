//! The page walk after an IOTLB miss, through the paging-structure caches (VT-d §6.2.5):
//! first-level and second-level walks start at the deepest cached table, and a nested walk
//! resolves first-level table pointers and its output through cached second-level mappings.
//! What the walk reads fills the caches: of its tables, those its deepest entries point to
//! (see `PagingStructureCaches::fill`). In strict mode a walk that used cached entries is
//! checked against the tables, as IOTLB hits are.

use vsva_mem::PhysMem;
use vsva_vtd::pasid::lookup_pasid_entry;
use vsva_vtd::request::pass_through;
use vsva_vtd::walk::{Stage, StepOutcome, WalkObserver, WalkStep};
use vsva_vtd::{
    addr::Pasid, pasid::Pgtt, pasid::ValidPasidEntry, walk::walk_first_level_from,
    walk::walk_second_level, walk::walk_second_level_from, walk::AccessRequest, walk::Direct,
    walk::FlConfig, walk::FlStage, walk::FlStart, walk::NestedStage, walk::SlConfig, walk::SlStart,
    walk::Translation, walk::WalkFault,
};

use super::iotlb::IotlbEntry;
use super::pscache::{FlTag, NestedStart, PagingStructureCaches, Pending, SlMapping, WalkFills};
use super::stale::{page_selective_iotlb, CheckedRequest};
use super::Iommu;
use crate::memory::ReadOnly;

/// Second-level resolutions in one nested walk: a read and an update of each of five
/// first-level tables, and the output.
const MAX_RESOLVED: usize = 11;

/// Second-level resolutions a nested walk took from cached entries: the guest physical
/// address, and the host page it resolved to with the access (only those written: every
/// walk makes one).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Resolved(Pending<u64, (u64, AccessRequest), MAX_RESOLVED>);

impl Resolved {
    fn push(&mut self, gpa: u64, page: u64, access: AccessRequest) {
        self.0.push(gpa, (page, access));
    }
}

/// The cached entries a walk used instead of reading tables.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CacheUse {
    /// The walk of the PASID entry's own table (first level, or second level for
    /// PGTT=010b) started below the top.
    pub tables: bool,
    /// Second-level resolutions of a nested walk served by cached entries.
    pub resolved: Resolved,
}

impl CacheUse {
    /// Whether any cached entry stood in for the tables.
    pub fn any(&self) -> bool {
        self.tables || !self.resolved.0.is_empty()
    }
}

/// Follows a first-level walk down from where it started: the deepest table it reached,
/// the one a fill caches (see `PagingStructureCaches::fill`).
struct FlFill {
    at: FlStart,
    moved: bool,
}

impl FlFill {
    fn new(start: FlStart) -> Self {
        FlFill {
            at: start,
            moved: false,
        }
    }

    /// The deepest table the walk went down to, if it went below its start.
    fn deepest(&self) -> &[FlStart] {
        if self.moved {
            std::slice::from_ref(&self.at)
        } else {
            &[]
        }
    }
}

impl WalkObserver for FlFill {
    #[inline(always)]
    fn step(&mut self, step: WalkStep) {
        let down = matches!(step.outcome, StepOutcome::Table(_));
        if step.stage == Stage::FirstLevel && step.level == self.at.level && down {
            self.at = self.at.below(step.entry);
            self.moved = true;
        }
    }
}

/// Follows a second-level walk down from where it started to the deepest table it
/// reached. That table is all a walk of a PASID entry's own second-level tables
/// (PGTT=010b) keeps, the only one of them a fill caches (see
/// `PagingStructureCaches::fill`): such a walk never looks up its own tables again. A
/// nested walk's resolutions also record each table on the way ([`SlFill`]).
struct SlDeepest<'c> {
    cfg: &'c SlConfig,
    at: SlStart,
    moved: bool,
}

impl SlDeepest<'_> {
    /// Moves down when `step` read the entry pointing to the next table from the deepest
    /// table so far; whether it did.
    #[inline(always)]
    fn follow(&mut self, step: &WalkStep) -> bool {
        let down = matches!(step.outcome, StepOutcome::Table(_));
        let goes = step.stage == Stage::SecondLevel && step.level == self.at.level && down;
        if goes {
            self.at = self.at.below(self.cfg, step.entry);
            self.moved = true;
        }
        goes
    }
}

impl WalkObserver for SlDeepest<'_> {
    #[inline(always)]
    fn step(&mut self, step: WalkStep) {
        self.follow(&step);
    }
}

/// Records in the walk's [`WalkFills`] each second-level table a walk of `gpa` goes down
/// to, from where it started, as it reads the entry pointing to it.
struct SlFill<'c> {
    path: SlDeepest<'c>,
    gpa: u64,
    fills: &'c mut WalkFills,
}

impl WalkObserver for SlFill<'_> {
    #[inline(always)]
    fn step(&mut self, step: WalkStep) {
        if self.path.follow(&step) {
            self.fills.second_level_table(self.gpa, self.path.at);
        }
    }
}

/// Nested translation through the caches: a guest physical address is resolved by a cached
/// second-level mapping that allows the access, else by a second-level walk from the
/// deepest cached second-level table. Second-level steps feed the second-level caches (by
/// way of the walk's [`WalkFills`]), not the first-level walk's observer.
struct CachedNested<'a, M: ?Sized> {
    stage: NestedStage<'a, M>,
    caches: &'a PagingStructureCaches,
    fills: &'a mut WalkFills,
    resolved: &'a mut Resolved,
}

impl<M: PhysMem + ?Sized> CachedNested<'_, M> {
    /// The second-level translation of `gpa` for `access`; with `keep`, a mapping it walks
    /// for is kept for the walk's fill.
    #[inline(always)]
    fn resolve(
        &mut self,
        gpa: u64,
        access: AccessRequest,
        keep: bool,
        walk: impl FnOnce(
            &NestedStage<'_, M>,
            SlStart,
            &mut SlFill<'_>,
        ) -> Result<Translation, WalkFault>,
    ) -> Result<Translation, WalkFault> {
        let sl = self.stage.sl;
        let top = sl.levels.levels();
        let start = match self.caches.nested_start(self.fills, gpa, access, top) {
            NestedStart::Mapped(m) => {
                self.resolved.push(gpa, m.output, access);
                return Ok(m.translate(gpa));
            }
            NestedStart::Walk(start) => start.unwrap_or(SlStart::top(sl)),
        };
        let mut fill = SlFill {
            path: SlDeepest {
                cfg: sl,
                at: start,
                moved: false,
            },
            gpa,
            fills: self.fills,
        };
        let t = walk(&self.stage, start, &mut fill)?;
        if keep {
            self.fills.mapping_of(gpa, SlMapping::of(&t));
        }
        if start.level < top {
            self.resolved.push(gpa, t.page_base(), access);
        }
        Ok(t)
    }
}

impl<M: PhysMem + ?Sized> FlStage for CachedNested<'_, M> {
    #[inline(always)]
    fn table_address<O>(
        &mut self,
        table: u64,
        root: bool,
        write: bool,
        _obs: &mut O,
    ) -> Result<u64, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        let access = AccessRequest {
            write,
            execute: false,
            supervisor: false,
        };
        self.resolve(table, access, true, |s, start, fill| {
            s.walk_table_from(start, table, root, write, fill)
        })
        .map(|t| t.output)
    }

    fn output<O>(
        &mut self,
        output: u64,
        access: AccessRequest,
        _obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        // The output's mapping is not cached: the IOTLB entry the walk fills holds the
        // translation through it, and another first-level page rarely maps the same guest
        // page.
        self.resolve(output, access, false, |s, start, fill| {
            s.walk_output_from(start, output, access, fill)
        })
    }
}

impl Iommu {
    /// Walks the tables `pe` selects for `addr` (a request of `pasid`, the effective PASID,
    /// that passed [`request_checks`](vsva_vtd::request::request_checks)) through the
    /// paging-structure caches, recording in `used` which cached entries stood
    /// in for tables. What it reads is cached when it ends, under one lock, unless an
    /// invalidation ran since `fill` (taken before `pe` was read).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn walk_cached<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        fill: u64,
        pe: &ValidPasidEntry,
        pasid: Pasid,
        addr: u64,
        access: AccessRequest,
        used: &mut CacheUse,
    ) -> Result<Translation, WalkFault> {
        let (fl_format, sl_format) = self.formats();
        let tag = |nested| FlTag {
            did: pe.did(),
            pasid,
            nested,
        };
        let mut fills = WalkFills::new(pe.did());
        let walked = match pe.pgtt() {
            Pgtt::FirstLevel => {
                let cfg = pe.fl_config(fl_format);
                let (t, starts) = self.first_level_cached(
                    mem,
                    &cfg,
                    &mut Direct,
                    tag(false),
                    addr,
                    access,
                    &mut used.tables,
                );
                fills.first_level(tag(false), addr, starts.deepest());
                t
            }
            Pgtt::Nested => {
                let fl = pe.fl_config(fl_format);
                let sl = pe.sl_config(sl_format);
                let mut stage = CachedNested {
                    stage: NestedStage { mem, sl: &sl },
                    caches: &self.paging_caches,
                    fills: &mut fills,
                    resolved: &mut used.resolved,
                };
                let (t, starts) = self.first_level_cached(
                    mem,
                    &fl,
                    &mut stage,
                    tag(true),
                    addr,
                    access,
                    &mut used.tables,
                );
                fills.first_level(tag(true), addr, starts.deepest());
                t
            }
            Pgtt::SecondLevel => {
                // One table to look up and at most one to fill: no pending fills.
                let cfg = pe.sl_config(sl_format);
                let top = cfg.levels.levels();
                let start = self
                    .paging_caches
                    .second_level_table(pe.did(), addr, top)
                    .unwrap_or(SlStart::top(&cfg));
                used.tables = start.level < top;
                let mut deepest = SlDeepest {
                    cfg: &cfg,
                    at: start,
                    moved: false,
                };
                let t = walk_second_level_from(mem, &cfg, start, addr, access, &mut deepest);
                if deepest.moved {
                    self.paging_caches
                        .fill_second_level(fill, pe.did(), addr, deepest.at);
                }
                return t;
            }
            Pgtt::PassThrough => pass_through(pe, addr, access),
        };
        self.paging_caches.fill(fill, &fills);
        walked
    }

    /// The first-level walk from the deepest cached table of `tag` for `addr`, and the
    /// tables it went down to.
    #[allow(clippy::too_many_arguments)]
    fn first_level_cached<M, S>(
        &self,
        mem: &M,
        cfg: &FlConfig,
        stage: &mut S,
        tag: FlTag,
        addr: u64,
        access: AccessRequest,
        below_top: &mut bool,
    ) -> (Result<Translation, WalkFault>, FlFill)
    where
        M: PhysMem + ?Sized,
        S: FlStage,
    {
        let top = cfg.mode.levels();
        let start = self
            .paging_caches
            .first_level_start(tag, addr, top)
            .unwrap_or(FlStart::top(cfg));
        *below_top = start.level < top;
        let mut starts = FlFill::new(start);
        let walked = walk_first_level_from(mem, cfg, stage, start, addr, access, &mut starts);
        (walked, starts)
    }

    /// Strict mode for a walk that used cached entries: compares its result with a walk of
    /// the tables and reports a difference with the invalidation that was missing. A stale
    /// second-level resolution of a nested walk names the page-selective IOTLB invalidation
    /// of its guest physical page; anything else is reported as for an IOTLB hit.
    pub(crate) fn check_cached_walk(
        &self,
        rta: u64,
        req: &CheckedRequest,
        pe: &ValidPasidEntry,
        cached: &IotlbEntry,
        used: &CacheUse,
    ) {
        let mem = ReadOnly(&*self.mem);
        let now = self.page_now(&mem, pe, req.addr, req.access);
        if now == Ok((cached.output, cached.page_shift)) {
            return;
        }
        let same_entry = lookup_pasid_entry(&mem, rta, req.sid, req.pasid, &self.caps)
            .is_ok_and(|l| l.entry == *pe);
        let sl = pe.sl_config(self.formats().1);
        let stale_gpa = used.resolved.0.iter().find(|&&(gpa, (page, a))| {
            walk_second_level(&mem, &sl, gpa, a, &mut ()).map(|t| t.page_base()) != Ok(page)
        });
        match stale_gpa {
            Some(&(gpa, _)) if same_entry => {
                self.report_stale(req, cached, now, page_selective_iotlb(pe.did(), gpa))
            }
            _ => self.check_stale(rta, req, cached),
        }
    }
}
