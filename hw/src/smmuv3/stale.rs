//! Strict mode: every configuration cache hit and TLB hit is checked against the tables
//! read afresh (without hardware updates), and a difference is reported with the command
//! that would have removed the stale entry. The model keeps using the stale entry either
//! way, as hardware does; the report is for the person debugging a driver.

use crate::memory::ReadOnly;
use std::fmt;

use vsva_smmuv3::explain::Fresh;
use vsva_smmuv3::lookup::Stage1Context;
use vsva_smmuv3::{
    cd::ContextDescriptor, cmd::Cmd, cmd::TlbiAddr, lookup::find_cd, lookup::ConfigFault, ste::Ste,
    walk::AccessRequest, walk::S1Start, walk::S2Config, walk::S2Start, walk::Translation,
    walk::WalkFault, walk::WalkObserver,
};

use super::config::CachedCd;
use super::s2walk::S2Stale;
use super::tlb::{TlbEntry, TlbTag};
use super::translate::{cd_index, fetch_ste, path_of, walk, Path, Stages};
use super::{Smmu, State};

/// The outcome of a walk, as strict mode compares it: its page, or its fault.
pub(super) fn outcome(r: &Result<Translation, WalkFault>) -> Fresh {
    match r {
        Ok(t) => Fresh::Page {
            base: t.page_base(),
            size: t.page_size,
        },
        Err(f) => Fresh::Walk(*f),
    }
}

/// The stale entry strict mode found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleKind {
    /// A cached STE differs from the stream table.
    Ste {
        /// The cached STE.
        cached: Ste,
        /// The stream table's now.
        now: Result<Ste, ConfigFault>,
    },
    /// A cached CD differs from the CD table.
    Cd {
        /// The SubstreamID of the transaction.
        ssid: Option<u32>,
        /// The cached CD.
        cached: ContextDescriptor,
        /// The CD table's now.
        now: Result<ContextDescriptor, ConfigFault>,
    },
    /// A TLB entry differs from a fresh walk.
    Tlb {
        /// The SubstreamID of the transaction.
        ssid: Option<u32>,
        /// The input address.
        addr: u64,
        /// The entry that served it.
        cached: TlbEntry,
        /// What a fresh walk gives.
        now: Fresh,
    },
    /// A stage-1 walk-cache entry led a walk to a table the tables no longer lead to.
    WalkCache {
        /// The SubstreamID of the transaction.
        ssid: Option<u32>,
        /// The input address.
        addr: u64,
        /// The cached start: the table's level and address.
        start: S1Start,
        /// What the walk from the cached start gave.
        cached: Fresh,
        /// What a walk from the top gives.
        now: Fresh,
    },
    /// A stage-2 walk-cache entry led a stage-2 walk to a table the tables no longer lead
    /// to.
    S2WalkCache {
        /// The SubstreamID of the transaction.
        ssid: Option<u32>,
        /// The transaction's input address.
        addr: u64,
        /// The IPA the stage-2 walk translated (the transaction's, a stage-1 table's or
        /// stage 1's output).
        ipa: u64,
        /// The cached start: the table's level and address.
        start: S2Start,
        /// What the walk from the cached start gave.
        cached: Fresh,
        /// What a walk from S2TTB gives.
        now: Fresh,
    },
}

/// A stale cached entry that served a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleTranslation {
    /// The StreamID of the transaction.
    pub sid: u32,
    /// What was stale.
    pub kind: StaleKind,
    /// The command that would have removed it.
    pub missing: Cmd,
}

impl fmt::Display for StaleTranslation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stale ")?;
        match &self.kind {
            StaleKind::Ste { cached, now } => {
                write!(f, "STE of sid {}: cached {cached}, table ", self.sid)?;
                match now {
                    Ok(ste) => write!(f, "{ste}")?,
                    Err(e) => write!(f, "{e}")?,
                }
            }
            StaleKind::Cd { ssid, cached, now } => write!(
                f,
                "CD of sid {} ssid {ssid:?}: cached ASID {} TTB0 {:#x}, table {now:?}",
                self.sid, cached.asid, cached.ttb0
            )?,
            StaleKind::Tlb {
                ssid,
                addr,
                cached,
                now,
            } => write!(
                f,
                "TLB entry: sid {} ssid {ssid:?} addr {addr:#x}: {:?} vmid {} gave page {:#x} \
                 ({:?}), tables say {now:?}",
                self.sid,
                cached.tag,
                cached.vmid,
                cached.translation.page_base(),
                cached.translation.page_size
            )?,
            StaleKind::WalkCache {
                ssid,
                addr,
                start,
                cached,
                now,
            } => write!(
                f,
                "stage-1 walk-cache entry: sid {} ssid {ssid:?} addr {addr:#x}: level {} table \
                 {:#x} gave {cached:?}, tables say {now:?}",
                self.sid, start.level, start.table
            )?,
            StaleKind::S2WalkCache {
                ssid,
                addr,
                ipa,
                start,
                cached,
                now,
            } => write!(
                f,
                "stage-2 walk-cache entry: sid {} ssid {ssid:?} addr {addr:#x} IPA {ipa:#x}: \
                 level {} table {:#x} gave {cached:?}, tables say {now:?}",
                self.sid, start.level, start.table
            )?,
        }
        write!(f, "; missing command: {:?}", self.missing)
    }
}

impl Smmu {
    fn report(&self, state: &mut State, stale: StaleTranslation) {
        tracing::warn!(%stale, "SMMU strict mode");
        state.stale.push(stale);
    }

    /// Checks a cached STE against the stream table.
    pub(super) fn check_ste(&self, state: &mut State, sid: u32, cached: &Ste) {
        let now = fetch_ste(self, state, &ReadOnly(&*self.mem), sid);
        if now != Ok(*cached) {
            let kind = StaleKind::Ste {
                cached: *cached,
                now,
            };
            let missing = Cmd::CfgiSte { sid, leaf: true };
            self.report(state, StaleTranslation { sid, kind, missing });
        }
    }

    /// Checks a cached CD against the CD table the (cached) STE points to.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check_cd(
        &self,
        state: &mut State,
        sid: u32,
        ste: &Ste,
        ssid: Option<u32>,
        s2: Option<&S2Config>,
        addr: u64,
        cached: &CachedCd,
    ) {
        let mem = ReadOnly(&*self.mem);
        let now = match find_cd(&mem, ste, &self.features, ssid, s2, addr, &mut ()) {
            Ok(Stage1Context::Cd { cd, .. }) => Ok(cd),
            // The cached STE selected this CD, so the lookup cannot bypass stage 1.
            Ok(Stage1Context::Bypass) => return,
            Err(e) => Err(e),
        };
        if now != Ok(cached.cd) {
            let kind = StaleKind::Cd {
                ssid,
                cached: cached.cd,
                now,
            };
            let missing = Cmd::CfgiCd {
                sid,
                ssid: cd_index(ste, ssid).unwrap_or(0),
                leaf: true,
            };
            self.report(state, StaleTranslation { sid, kind, missing });
        }
    }

    /// Checks a TLB hit against a walk from the tables (configuration read afresh too).
    pub(super) fn check_tlb_entry(
        &self,
        state: &mut State,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: AccessRequest,
        cached: &TlbEntry,
    ) {
        let now = self.fresh(state, sid, ssid, addr, access);
        let t = &cached.translation;
        let expected = Fresh::Page {
            base: t.page_base(),
            size: t.page_size,
        };
        if now == expected {
            return;
        }
        let operand = TlbiAddr {
            addr: cached.page,
            leaf: true,
            ..TlbiAddr::default()
        };
        let vmid = cached.vmid;
        let missing = match cached.tag {
            TlbTag::Stage1 { asid } | TlbTag::Nested { asid } => Cmd::TlbiNhVa {
                vmid,
                asid,
                addr: operand,
            },
            TlbTag::Stage2 => Cmd::TlbiS2Ipa {
                vmid,
                addr: operand,
            },
        };
        let kind = StaleKind::Tlb {
            ssid,
            addr,
            cached: *cached,
            now,
        };
        self.report(state, StaleTranslation { sid, kind, missing });
    }

    /// Checks a walk that started from the stage-1 walk cache (`start`, giving `got`)
    /// against a walk of the tables from the top; a difference is a walk-cache entry that
    /// CMD_TLBI_NH_VA without the Leaf hint should have removed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check_walk_cache(
        &self,
        state: &mut State,
        sid: u32,
        ssid: Option<u32>,
        vmid: u16,
        asid: u16,
        stages: &Stages,
        addr: u64,
        access: AccessRequest,
        start: S1Start,
        got: &Result<Translation, WalkFault>,
    ) {
        let cached = outcome(got);
        let now = outcome(&walk(&ReadOnly(&*self.mem), stages, addr, access, &mut ()));
        if now == cached {
            return;
        }
        let kind = StaleKind::WalkCache {
            ssid,
            addr,
            start,
            cached,
            now,
        };
        let missing = Cmd::TlbiNhVa {
            vmid,
            asid,
            addr: TlbiAddr {
                addr,
                leaf: false,
                ..TlbiAddr::default()
            },
        };
        self.report(state, StaleTranslation { sid, kind, missing });
    }

    /// Reports the stale stage-2 walk-cache entries a transaction's walks used, each with
    /// the CMD_TLBI_S2_IPA (Leaf = 0) of its IPA that would have removed it.
    pub(super) fn report_s2_walk_cache(
        &self,
        state: &mut State,
        sid: u32,
        ssid: Option<u32>,
        vmid: u16,
        addr: u64,
        found: &[S2Stale],
    ) {
        for s in found {
            let kind = StaleKind::S2WalkCache {
                ssid,
                addr,
                ipa: s.ipa,
                start: s.start,
                cached: s.cached,
                now: s.now,
            };
            let missing = Cmd::TlbiS2Ipa {
                vmid,
                addr: TlbiAddr {
                    addr: s.ipa & !0xfff,
                    leaf: false,
                    ..TlbiAddr::default()
                },
            };
            self.report(state, StaleTranslation { sid, kind, missing });
        }
    }

    fn fresh(
        &self,
        state: &State,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: AccessRequest,
    ) -> Fresh {
        self.resolve(state, sid, ssid, addr, access, &mut ()).2
    }

    /// The translation of a transaction from the tables alone (no cache used or changed,
    /// no hardware update made): the STE, the CD, and the outcome; `obs` sees every
    /// descriptor read (the stage-2 walks of CD fetches and of stage-1 tables included).
    pub(super) fn resolve<O: WalkObserver + ?Sized>(
        &self,
        state: &State,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: AccessRequest,
        obs: &mut O,
    ) -> (
        Result<Ste, ConfigFault>,
        Option<Result<ContextDescriptor, ConfigFault>>,
        Fresh,
    ) {
        let mem = ReadOnly(&*self.mem);
        let ste = fetch_ste(self, state, &mem, sid);
        let mut cd_found = None;
        let mut config = |ste: &Ste| -> Result<Path, ConfigFault> {
            let s2 = if ste.config.stage2() {
                Some(ste.s2_config(&self.features).map_err(ConfigFault::BadSte)?)
            } else {
                None
            };
            let cd = if ste.config.stage1() {
                let found = find_cd(&mem, ste, &self.features, ssid, s2.as_ref(), addr, obs);
                cd_found = match &found {
                    Ok(Stage1Context::Cd { cd, .. }) => Some(Ok(*cd)),
                    Ok(Stage1Context::Bypass) => None,
                    Err(e) => Some(Err(*e)),
                };
                match found? {
                    Stage1Context::Bypass => None,
                    Stage1Context::Cd { cd, s1, .. } => Some(CachedCd { cd, s1 }),
                }
            } else {
                None
            };
            Ok(path_of(ste, s2, cd))
        };
        let path = ste.as_ref().map_err(|e| *e).and_then(&mut config);
        let fresh = match path {
            Err(e) => Fresh::Config(e),
            Ok(Path::Abort) => Fresh::Abort,
            Ok(Path::Bypass) => Fresh::Bypass,
            Ok(Path::Walk { stages, .. }) => outcome(&walk(&mem, &stages, addr, access, obs)),
        };
        (ste, cd_found, fresh)
    }
}
