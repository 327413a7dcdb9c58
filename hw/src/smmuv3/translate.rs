//! Translating a transaction (IHI 0070 §3.2): the SMMU's global bypass, the STE of its
//! StreamID, the CD of its SubstreamID, then the TLB or a walk of stage 1, stage 2 or
//! both; every fault other than an STE abort becomes an event record.

use vsva_mem::PhysMem;
use vsva_smmuv3::lookup::Stage1Context;
use vsva_smmuv3::regs::{cr0, offset, GBPA_ABORT};
use vsva_smmuv3::{
    event::Event, lookup::find_cd, lookup::find_cd_with, lookup::ConfigFault, ste::Config,
    ste::S1Dss, ste::Ste, walk::walk_nested, walk::walk_stage1, walk::walk_stage1_from,
    walk::walk_stage2, walk::AccessRequest, walk::Direct, walk::FaultKind, walk::FaultStage,
    walk::PageSize, walk::Permissions, walk::S1Config, walk::S1Start, walk::S2Config,
    walk::Translation, walk::WalkFault, walk::WalkObserver,
};

use std::sync::Arc;

use super::config::CachedCd;
use super::s2walk::{CachedS2, S2Stale};
use super::stall::{Outcome, Stalled};
use super::tlb::TlbTag;
use super::walkcache::TableSteps;
use super::{Smmu, State};
use vsva_smmuv3::walk::Stage;

/// A translated transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuTranslation {
    /// The physical address.
    pub output: u64,
    /// The size of the page the translation holds for.
    pub page_size: PageSize,
    /// The rights granted for accesses of the transaction's privilege.
    pub perms: Permissions,
    /// Whether writes need no hardware dirty-state update: every leaf is writable-dirty
    /// (or the page is not writable). A writable-clean page (DBM under HD) is writable
    /// only through the SMMU, which marks it dirty first.
    pub dirty: bool,
    /// Whether the TLB served it.
    pub tlb_hit: bool,
}

/// A terminated transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmmuFault {
    /// Aborted without a record: STE.Config abort, or GBPA.ABORT while SMMUEN is clear.
    Abort,
    /// Terminated with the event `event`; `recorded` tells whether it reached the event
    /// queue (the CD's R or the STE's S2R can suppress fault records, and a full or
    /// disabled queue loses them).
    Event {
        /// The record.
        event: Event,
        /// Whether it was written to the event queue.
        recorded: bool,
    },
}

/// The stages a stream's configuration walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stages {
    S1(S1Config),
    S2(S2Config),
    Nested(S1Config, S2Config),
}

/// What a stream's configuration makes of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    Abort,
    Bypass,
    Walk {
        vmid: u16,
        tag: TlbTag,
        stages: Stages,
        /// CD.R: stage-1 faults are recorded.
        record_s1: bool,
        /// STE.S2R: stage-2 faults are recorded.
        record_s2: bool,
        /// CD.S with STE.S1STALLD clear: stage-1 faults stall.
        stall_s1: bool,
        /// STE.S2S: stage-2 faults stall.
        stall_s2: bool,
    },
}

/// Why one translation of a transaction did not complete.
enum Stop {
    /// Terminated.
    Fault(SmmuFault),
    /// Stalled, with the record `event` (Stall = 1, its STAG) written.
    Stalled(Event, Arc<Stalled>),
}

/// The CD index a transaction's SubstreamID selects when it selects one (the cases in
/// which `find_cd` reads a CD); other cases are not cached.
pub(super) fn cd_index(ste: &Ste, ssid: Option<u32>) -> Option<u32> {
    match (ste.s1cdmax, ssid) {
        (0, None) => Some(0),
        (0, Some(_)) => None,
        (max, Some(s)) => ((s as u64) >> max == 0).then_some(s),
        (_, None) => (ste.s1dss == S1Dss::Substream0).then_some(0),
    }
}

/// The walk of `addr` along `stages`.
pub(super) fn walk<M: PhysMem + ?Sized, O: WalkObserver + ?Sized>(
    mem: &M,
    stages: &Stages,
    addr: u64,
    access: AccessRequest,
    obs: &mut O,
) -> Result<Translation, WalkFault> {
    match stages {
        Stages::S1(s1) => walk_stage1(mem, s1, addr, access, obs),
        Stages::S2(s2) => walk_stage2(mem, s2, addr, access, obs),
        Stages::Nested(s1, s2) => walk_nested(mem, s1, s2, addr, access, obs),
    }
}

/// The STE of `sid` read from the stream table in `mem`.
pub(super) fn fetch_ste<M: PhysMem + ?Sized>(
    smmu: &Smmu,
    state: &State,
    mem: &M,
    sid: u32,
) -> Result<Ste, ConfigFault> {
    let table = state
        .regs
        .stream_table()
        .map_err(|_| ConfigFault::BadStreamId)?;
    table.find_ste(mem, &smmu.features, sid)
}

impl Smmu {
    /// Translates an access of `access` to `addr` by the device with StreamID `sid`, with
    /// SubstreamID `ssid` when the transaction carries one.
    ///
    /// A fault the stream's configuration stalls holds the transaction: this call waits,
    /// without the SMMU's state lock, until CMD_RESUME Retry (it translates again),
    /// CMD_RESUME Abort/Terminate or CMD_STALL_TERM (the fault is returned, its record
    /// showing Stall = 1).
    pub fn translate(
        &self,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: AccessRequest,
    ) -> Result<SmmuTranslation, SmmuFault> {
        loop {
            let (event, slot) = match self.translate_once(sid, ssid, addr, access, true) {
                Ok(t) => return Ok(t),
                Err(Stop::Fault(f)) => return Err(f),
                Err(Stop::Stalled(event, slot)) => (event, slot),
            };
            let outcome = slot.wait(self.stall_timeout).unwrap_or_else(|| {
                // Timed out: terminate it unless a command resolved it meanwhile.
                self.lock().stalls.release(sid, event.stag, &slot);
                if slot.resolve(Outcome::Terminate) {
                    Smmu::count(&self.stats.stalls_terminated);
                    tracing::warn!(sid, stag = event.stag, "SMMU stall timed out");
                }
                slot.outcome().unwrap_or(Outcome::Terminate)
            });
            match outcome {
                Outcome::Retry => Smmu::count(&self.stats.stalls_retried),
                Outcome::Terminate => {
                    return Err(SmmuFault::Event {
                        event,
                        recorded: true,
                    })
                }
            }
        }
    }

    /// Translates as [`Smmu::translate`] does, but a fault never stalls: a request that
    /// needs an answer at once (a PCIe ATS translation request, §3.12.2) is terminated.
    pub fn translate_terminating(
        &self,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: AccessRequest,
    ) -> Result<SmmuTranslation, SmmuFault> {
        self.translate_once(sid, ssid, addr, access, false)
            .map_err(|stop| match stop {
                Stop::Fault(f) => f,
                // Unreachable by construction; terminate rather than hold it.
                Stop::Stalled(event, slot) => {
                    self.lock().stalls.release(sid, event.stag, &slot);
                    slot.resolve(Outcome::Terminate);
                    SmmuFault::Event {
                        event,
                        recorded: true,
                    }
                }
            })
    }

    /// One translation of the transaction; a stalling fault is recorded and left for
    /// [`Smmu::translate`] to wait on.
    fn translate_once(
        &self,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: AccessRequest,
        may_stall: bool,
    ) -> Result<SmmuTranslation, Stop> {
        let mut state = self.lock();
        if state.regs.cr0ack() & cr0::SMMUEN == 0 {
            let gbpa = state.regs.read(offset::GBPA, 4).unwrap_or(0) as u32;
            return if gbpa & GBPA_ABORT != 0 {
                Err(Stop::Fault(SmmuFault::Abort))
            } else {
                Ok(identity(addr))
            };
        }
        let path = match self.path(&mut state, sid, ssid, addr) {
            Ok(p) => p,
            Err(f) => {
                let event = Event::from_config_fault(sid, ssid, access, &f);
                let recorded = self.record_event(&mut state, &event);
                return Err(Stop::Fault(SmmuFault::Event { event, recorded }));
            }
        };
        let Path::Walk {
            vmid,
            tag,
            stages,
            record_s1,
            record_s2,
            stall_s1,
            stall_s2,
        } = path
        else {
            return match path {
                Path::Bypass => Ok(identity(addr)),
                _ => Err(Stop::Fault(SmmuFault::Abort)),
            };
        };
        if let Some(e) = state.tlb.lookup(vmid, tag, access.privileged, addr) {
            let t = e.translation;
            if t.perms.allow(access) && (!access.write || t.dirty) {
                if self.strict {
                    self.check_tlb_entry(&mut state, sid, ssid, addr, access, &e);
                }
                return Ok(SmmuTranslation {
                    output: e.output(addr),
                    page_size: t.page_size,
                    perms: t.perms,
                    dirty: t.dirty,
                    tlb_hit: true,
                });
            }
        }
        Smmu::count(&self.stats.walks);
        let walked = match (tag.asid(), &stages) {
            (Some(asid), &Stages::S1(s1) | &Stages::Nested(s1, _)) => self.walk_stage1_cached(
                &mut state, sid, ssid, vmid, asid, &stages, &s1, addr, access,
            ),
            (_, Stages::S2(s2)) => {
                let State { s2_walk_cache, .. } = &mut *state;
                let mut stage = CachedS2::new(&*self.mem, s2, vmid, s2_walk_cache, self.strict);
                let r = stage.translate(addr, access, &mut ());
                let stale = stage.stale;
                self.report_s2_walk_cache(&mut state, sid, ssid, vmid, addr, &stale);
                r
            }
            _ => walk(&*self.mem, &stages, addr, access, &mut ()),
        };
        match walked {
            Ok(t) => {
                state.tlb.insert(vmid, tag, access.privileged, addr, t);
                Ok(SmmuTranslation {
                    output: t.output,
                    page_size: t.page_size,
                    perms: t.perms,
                    dirty: t.dirty,
                    tlb_hit: false,
                })
            }
            Err(f) => {
                let mut event = Event::from_walk_fault(sid, ssid, access, &f);
                // CD.S and STE.S2S choose the stall model for the translation-related
                // faults (§3.12.2); external aborts terminate.
                let (record, stall) = match (f.kind, f.stage) {
                    (FaultKind::WalkEabt, _) => (true, false),
                    (_, FaultStage::Stage1) => (record_s1, stall_s1),
                    (_, FaultStage::Stage2 { .. }) => (record_s2, stall_s2),
                };
                if stall && may_stall {
                    // A stalled fault is recorded whatever CD.R or STE.S2R say: software
                    // needs its STAG to resume it.
                    match state.stalls.hold(sid, self.stall_limit) {
                        Some((stag, slot)) => {
                            event.stall = true;
                            event.stag = stag;
                            if self.record_event(&mut state, &event) {
                                Smmu::count(&self.stats.stalls);
                                return Err(Stop::Stalled(event, slot));
                            }
                            // Nobody can learn the STAG: terminate it.
                            state.stalls.release(sid, stag, &slot);
                            slot.resolve(Outcome::Terminate);
                            Smmu::count(&self.stats.stalls_refused);
                            return Err(Stop::Fault(SmmuFault::Event {
                                event,
                                recorded: false,
                            }));
                        }
                        None => Smmu::count(&self.stats.stalls_refused),
                    }
                }
                let recorded = record && self.record_event(&mut state, &event);
                Err(Stop::Fault(SmmuFault::Event { event, recorded }))
            }
        }
    }

    /// The walk of `addr` along `stages`, whose stage 1 is `s1` with `asid`, from the deepest
    /// table the stage-1 walk cache knows (and in nested translation each stage-2 walk from
    /// the deepest table the stage-2 walk cache knows); the tables it reads below those are
    /// cached. In strict mode a stage-2 walk that started from the cache is checked against
    /// a walk from S2TTB, and, when none was stale, a walk that started from the stage-1
    /// cache against a full walk.
    #[allow(clippy::too_many_arguments)]
    fn walk_stage1_cached(
        &self,
        state: &mut State,
        sid: u32,
        ssid: Option<u32>,
        vmid: u16,
        asid: u16,
        stages: &Stages,
        s1: &S1Config,
        addr: u64,
        access: AccessRequest,
    ) -> Result<Translation, WalkFault> {
        let top = s1.table_for(addr).map_or(S1Start::top(s1), S1Start::of);
        let start = state.walk_cache.lookup(vmid, asid, s1, addr).unwrap_or(top);
        let mem = &*self.mem;
        let mut steps = TableSteps::new(Stage::Stage1);
        let mut s2_stale: Vec<S2Stale> = Vec::new();
        let r = match stages {
            Stages::Nested(_, s2) => {
                let mut nested =
                    CachedS2::new(mem, s2, vmid, &mut state.s2_walk_cache, self.strict);
                let r = walk_stage1_from(mem, s1, &mut nested, start, addr, access, &mut steps);
                s2_stale = nested.stale;
                r
            }
            _ => walk_stage1_from(mem, s1, &mut Direct, start, addr, access, &mut steps),
        };
        state.walk_cache.fill(vmid, asid, s1, addr, start, &steps);
        if !s2_stale.is_empty() {
            // The stage-2 entries explain the difference a full walk would show.
            self.report_s2_walk_cache(state, sid, ssid, vmid, addr, &s2_stale);
        } else if self.strict && start != top {
            self.check_walk_cache(
                state, sid, ssid, vmid, asid, stages, addr, access, start, &r,
            );
        }
        r
    }

    /// The cached (or fetched and cached) STE of `sid`.
    pub(super) fn ste_for(&self, state: &mut State, sid: u32) -> Result<Ste, ConfigFault> {
        if let Some(ste) = state.config.ste(sid) {
            if self.strict {
                self.check_ste(state, sid, &ste);
            }
            return Ok(ste);
        }
        let ste = fetch_ste(self, state, &*self.mem, sid)?;
        state.config.insert_ste(sid, ste);
        Ok(ste)
    }

    /// What the cached configuration of `sid` makes of a transaction with `ssid` to
    /// `addr`, fetching and caching the STE and CD it needs.
    fn path(
        &self,
        state: &mut State,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
    ) -> Result<Path, ConfigFault> {
        let ste = self.ste_for(state, sid)?;
        let s2 = if ste.config.stage2() {
            Some(ste.s2_config(&self.features).map_err(ConfigFault::BadSte)?)
        } else {
            None
        };
        let cd = if ste.config.stage1() {
            self.cd_for(state, sid, &ste, ssid, s2.as_ref(), addr)?
        } else {
            None
        };
        Ok(path_of(&ste, s2, cd))
    }

    /// The CD of the transaction, `None` when S1DSS bypasses stage 1 for it.
    fn cd_for(
        &self,
        state: &mut State,
        sid: u32,
        ste: &Ste,
        ssid: Option<u32>,
        s2: Option<&S2Config>,
        addr: u64,
    ) -> Result<Option<CachedCd>, ConfigFault> {
        let index = cd_index(ste, ssid);
        if let Some(cd) = index.and_then(|i| state.config.cd(sid, i)) {
            if self.strict {
                self.check_cd(state, sid, ste, ssid, s2, addr, &cd);
            }
            return Ok(Some(cd));
        }
        let found = match s2 {
            None => find_cd(&*self.mem, ste, &self.features, ssid, None, addr, &mut ()),
            Some(s2) => {
                // The fetches' stage-2 walks go through the stage-2 walk cache as the
                // transaction's own do; strict mode reports a stale entry one used.
                let vmid = ste.s2vmid;
                let mut stage =
                    CachedS2::new(&*self.mem, s2, vmid, &mut state.s2_walk_cache, self.strict);
                let mut to_pa = |ipa: u64| stage.cd_fetch(ipa, addr).map_err(ConfigFault::Stage2);
                let found = find_cd_with(&*self.mem, ste, &self.features, ssid, &mut to_pa);
                let stale = stage.stale;
                self.report_s2_walk_cache(state, sid, ssid, vmid, addr, &stale);
                found
            }
        }?;
        Ok(match found {
            Stage1Context::Bypass => None,
            Stage1Context::Cd { index, cd, s1, .. } => {
                let cd = CachedCd { cd, s1 };
                state.config.insert_cd(sid, index, cd);
                Some(cd)
            }
        })
    }
}

/// The path of a transaction through `ste` (stage 2 `s2` when it translates) and its CD.
pub(super) fn path_of(ste: &Ste, s2: Option<S2Config>, cd: Option<CachedCd>) -> Path {
    let vmid = ste.s2vmid;
    let walk = |tag, stages, cd: Option<&CachedCd>| Path::Walk {
        vmid,
        tag,
        stages,
        record_s1: cd.is_some_and(|cd| cd.cd.r),
        record_s2: ste.s2r,
        stall_s1: cd.is_some_and(|cd| cd.cd.s) && !ste.s1stalld,
        stall_s2: ste.s2s,
    };
    match (ste.config, cd, s2) {
        (Config::Abort, ..) => Path::Abort,
        (Config::Bypass, ..) | (Config::S1Trans, None, _) => Path::Bypass,
        (Config::S1Trans, Some(cd), _) => walk(
            TlbTag::Stage1 { asid: cd.cd.asid },
            Stages::S1(cd.s1),
            Some(&cd),
        ),
        (Config::Nested, Some(cd), Some(s2)) => walk(
            TlbTag::Nested { asid: cd.cd.asid },
            Stages::Nested(cd.s1, s2),
            Some(&cd),
        ),
        (Config::S2Trans | Config::Nested, _, Some(s2)) => {
            walk(TlbTag::Stage2, Stages::S2(s2), None)
        }
        // Stage 2 translates for these Configs, so `s2` is present.
        (Config::S2Trans | Config::Nested, _, None) => Path::Abort,
    }
}

fn identity(addr: u64) -> SmmuTranslation {
    SmmuTranslation {
        output: addr,
        page_size: PageSize::Size4K,
        perms: Permissions::ALL,
        dirty: true,
        tlb_hit: false,
    }
}
