//! Emulated devices (IHI 0070 §3.2): the vSMMU translates their transactions itself,
//! through the guest's STE (Config abort, bypass or stage 1), the CD its SubstreamID
//! selects (linear or 2-level CD table, S1DSS for transactions without one) and the
//! guest's AArch64 stage-1 tables in guest RAM, with the VMSAv8-64 permission rules
//! (`AP[2:1]`, UXN/PXN, AF, hardware A/D updates where the CD allows them). The output is
//! a guest physical address: the vSMMU has no stage 2.
//!
//! A terminated transaction is recorded in the guest's event queue as the SMMU records
//! it: configuration faults (C_BAD_STREAMID, F_STE_FETCH, C_BAD_STE, F_STREAM_DISABLED,
//! C_BAD_SUBSTREAMID, F_CD_FETCH, C_BAD_CD) always, stage-1 faults (F_TRANSLATION,
//! F_ADDR_SIZE, F_ACCESS, F_PERMISSION) when the CD's R bit asks for them and F_WALK_EABT
//! always; an STE that aborts (Config abort, or GBPA.ABORT while SMMUEN is clear) aborts
//! without a record. Emulated devices never stall: a fault CD.S would stall terminates.
//!
//! Each (StreamID, SubstreamID, privilege) is also a vm-memory `Iommu`
//! (`VSmmu::address_space`), whose IOTLB is a TLB of the vSMMU: its pages are tagged by
//! the ASID of the CD they came from and removed by the commands that cover them
//! (CMD_TLBI_NH_VA, NH_VAA, NH_ASID, NH_ALL, NSNH_ALL by the TLB rules of §4.4, including
//! global leaves; CMD_CFGI_STE, STE_RANGE, CD, CD_ALL and CFGI_ALL for the pages of the
//! streams and SubstreamIDs whose configuration they invalidate), and by nothing else
//! except a change of SMMUEN or GBPA, after which no cached translation applies.

use std::fmt;

use vsva_smmuv3::{
    cmd::Cmd, desc::TableFormat, event::Event, lookup::find_cd, lookup::ConfigFault,
    lookup::Stage1Context, ste::Config, walk::walk_stage1, walk::walk_stage1_from,
    walk::AccessRequest, walk::Direct, walk::FaultKind, walk::PageSize, walk::Permissions,
    walk::S1Config, walk::S1Start, walk::StepOutcome, walk::Translation, walk::WalkObserver,
    walk::WalkStep,
};

use super::stream::GuestSte;
use super::VSmmu;
use crate::space::{table_last, CachedPage, SpaceRun, SpaceScope, SpaceUnit, Spaces};

/// A transaction of an emulated device the vSMMU translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuGpa {
    /// The stage-1 translation; its output is a guest physical address.
    pub translation: Translation,
    /// The ASID of the CD that translated (`None`: stage 1 bypassed).
    pub asid: Option<u16>,
}

/// A transaction of an emulated device the vSMMU terminated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VSmmuFault {
    /// The event the fault raised (`None`: aborted by STE.Config or GBPA, with no event).
    pub event: Option<Event>,
    /// Whether the event was written to the guest's event queue.
    pub recorded: bool,
}

impl fmt::Display for VSmmuFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.event {
            None => f.write_str("aborted by the stream's configuration"),
            Some(e) => write!(
                f,
                "{:?} of StreamID {:#x} at {:#x}",
                e.event_type, e.sid, e.input_addr
            ),
        }
    }
}

/// A transaction that stage 1 does not translate: its address is the guest physical
/// address.
fn bypass(addr: u64) -> SmmuGpa {
    SmmuGpa {
        translation: Translation {
            output: addr,
            page_size: PageSize::Size4K,
            perms: Permissions::ALL,
            dirty: true,
            global: false,
        },
        asid: None,
    }
}

const ABORT: VSmmuFault = VSmmuFault {
    event: None,
    recorded: false,
};

impl VSmmu {
    /// Translates an access of `access` to `addr` by the emulated device with StreamID
    /// `sid`, with SubstreamID `ssid` when the transaction carries one, reading the guest's
    /// stream table, CD table and stage-1 tables afresh; a fault is recorded in the
    /// guest's event queue by the SMMU's rules (see the module).
    pub fn translate(
        &self,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: AccessRequest,
    ) -> Result<SmmuGpa, VSmmuFault> {
        self.translate_with(None, sid, ssid, addr, access)
    }

    /// [`VSmmu::translate`], which also gives `leaf` where its stage-1 walk, if it walked,
    /// read the leaf from.
    fn translate_with(
        &self,
        leaf: Option<&mut Option<LeafTable>>,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: AccessRequest,
    ) -> Result<SmmuGpa, VSmmuFault> {
        let config_fault =
            |f: ConfigFault| self.terminate(Event::from_config_fault(sid, ssid, access, &f), true);
        let ste = match self.guest_ste(sid) {
            GuestSte::Disabled { abort: true } => return Err(ABORT),
            GuestSte::Disabled { abort: false } => return Ok(bypass(addr)),
            GuestSte::Enabled(found) => found.map_err(config_fault)?,
        };
        match ste.config {
            Config::Bypass => return Ok(bypass(addr)),
            Config::S1Trans => {}
            // Stage 2 is not offered: decode refused the other Configs as ILLEGAL.
            _ => return Err(ABORT),
        }
        let mem = &*self.mem;
        let features = &self.config.features;
        let (cd, s1) = match find_cd(mem, &ste, features, ssid, None, addr, &mut ()) {
            Ok(Stage1Context::Bypass) => return Ok(bypass(addr)),
            Ok(Stage1Context::Cd { cd, s1, .. }) => (cd, s1),
            Err(f) => return Err(config_fault(f)),
        };
        let walked = match (leaf, s1.table_for(addr)) {
            (Some(slot), Some(table)) => {
                let mut found = LeafTable {
                    s1,
                    format: s1.format(table),
                    start: S1Start::of(table),
                };
                let walked = walk_stage1(mem, &s1, addr, access, &mut found);
                *slot = walked.is_ok().then_some(found);
                walked
            }
            _ => walk_stage1(mem, &s1, addr, access, &mut ()),
        };
        match walked {
            Ok(translation) => Ok(SmmuGpa {
                translation,
                asid: Some(cd.asid),
            }),
            Err(f) => {
                let record = cd.r || f.kind == FaultKind::WalkEabt;
                Err(self.terminate(Event::from_walk_fault(sid, ssid, access, &f), record))
            }
        }
    }

    /// Terminates a transaction with `event`, written to the event queue if `record`.
    fn terminate(&self, event: Event, record: bool) -> VSmmuFault {
        let mut irqs = Vec::new();
        let recorded = record && self.record_event(&event, &mut irqs);
        self.deliver(irqs);
        VSmmuFault {
            event: Some(event),
            recorded,
        }
    }
}

/// Where a stage-1 walk read its leaf from: the CD's stage-1 configuration and the leaf's
/// table with the controls of the table descriptors above it (what a walk cache entry
/// holds). As an observer, it follows the walk down to that table.
#[derive(Clone, Copy, Debug)]
struct LeafTable {
    s1: S1Config,
    format: TableFormat,
    start: S1Start,
}

impl WalkObserver for LeafTable {
    fn step(&mut self, step: WalkStep) {
        if let StepOutcome::Table(_) = step.outcome {
            self.start = self.start.below(self.format, step.entry);
        }
    }
}

/// What removes pages from the vSMMU's address spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SmmuScope {
    /// A TLB or configuration invalidation command.
    Command(Cmd),
    /// SMMUEN or GBPA changed: what was cached no longer applies.
    All,
}

impl SmmuScope {
    /// The scope of `cmd`, if it invalidates a TLB or configuration cache.
    pub(crate) fn of(cmd: &Cmd) -> Option<SmmuScope> {
        matches!(
            cmd,
            Cmd::TlbiNhAll { .. }
                | Cmd::TlbiNhAsid { .. }
                | Cmd::TlbiNhVa { .. }
                | Cmd::TlbiNhVaa { .. }
                | Cmd::TlbiNsnhAll
                | Cmd::CfgiSte { .. }
                | Cmd::CfgiSteRange { .. }
                | Cmd::CfgiCd { .. }
                | Cmd::CfgiCdAll { .. }
        )
        .then_some(SmmuScope::Command(*cmd))
    }
}

/// The TLB rules of IHI 0070 §4.4 for stage-1 entries (the vSMMU has no VMIDs: every
/// entry is of the one VM), and the configuration invalidations (§4.3) for the pages of
/// the streams and CDs they name.
impl SpaceScope for SmmuScope {
    /// StreamID, SubstreamID (`None`: transactions without one), PnU.
    type Key = (u32, Option<u32>, bool);
    /// The ASID of the CD.
    type Tag = u16;

    fn covers(&self, &(sid, ssid, _): &Self::Key, tag: Option<u16>, page: &CachedPage) -> bool {
        let SmmuScope::Command(cmd) = *self else {
            return true;
        };
        // RIL is not offered: an address operand names the page that holds the address.
        let holds = |addr: u64| page.start <= addr && addr <= page.last;
        let stage1 = tag.is_some();
        match cmd {
            Cmd::TlbiNhAll { .. } | Cmd::TlbiNsnhAll => stage1,
            // Global entries have no ASID: they survive NH_ASID.
            Cmd::TlbiNhAsid { asid, .. } => tag == Some(asid) && !page.global,
            Cmd::TlbiNhVa { asid, addr, .. } => {
                stage1 && (page.global || tag == Some(asid)) && holds(addr.addr)
            }
            Cmd::TlbiNhVaa { addr, .. } => stage1 && holds(addr.addr),
            Cmd::CfgiSte { sid: s, .. } => s == sid,
            Cmd::CfgiSteRange { sid: s, range } => {
                ((s ^ sid) as u64)
                    .checked_shr(range as u32 + 1)
                    .unwrap_or(0)
                    == 0
            }
            // A transaction without SubstreamID uses CD 0 (S1DSS substream 0).
            Cmd::CfgiCd {
                sid: s, ssid: i, ..
            } => s == sid && ssid.unwrap_or(0) == i,
            Cmd::CfgiCdAll { sid: s } => s == sid,
            _ => false,
        }
    }
}

impl SpaceUnit for VSmmu {
    type Scope = SmmuScope;

    /// The first page as [`VSmmu::translate`] translates it; when stage 1 walked, the run
    /// continues along the leaf table with walks from it, which check and update each
    /// descriptor (AF, DBM) as the page's own walk would.
    fn translate_run(
        &self,
        &(sid, ssid, privileged): &(u32, Option<u32>, bool),
        addr: u64,
        write: bool,
        last: u64,
    ) -> Result<SpaceRun<u16>, String> {
        let access = AccessRequest {
            write,
            instruction: false,
            privileged,
        };
        let mut leaf = None;
        let t = self
            .translate_with(Some(&mut leaf), sid, ssid, addr, access)
            .map_err(|f| f.to_string())?;
        let tag = t.asid;
        let page = |w: &Translation| SpaceRun {
            tag,
            global: w.global,
            size: w.page_size.bytes(),
            output: w.page_base(),
            writable: w.perms.write && w.dirty,
            len: w.page_size.bytes(),
        };
        let mut run = page(&t.translation);
        if tag.is_none() {
            // Stage 1 bypassed: the identity, which only configuration invalidations remove.
            run.grow(addr, last, |a| Some(page(&bypass(a).translation)));
        } else if let Some((found, table)) =
            leaf.and_then(|f| f.s1.table_for(addr).map(|table| (f, *table)))
        {
            // Entries of the leaf's size; the start table's resolve the rest of the range.
            let entry_shift = t.translation.page_size.shift();
            let index_bits = if found.start.level == table.start_level() {
                table.input_bits() - entry_shift
            } else {
                table.granule().stride()
            };
            let stop = last.min(table_last(addr, entry_shift, index_bits));
            run.grow(addr, stop, |a| {
                walk_stage1_from(
                    &*self.mem,
                    &found.s1,
                    &mut Direct,
                    found.start,
                    a,
                    access,
                    &mut (),
                )
                .ok()
                .map(|w| page(&w))
            });
        }
        Ok(run)
    }

    fn spaces(&self) -> &Spaces<SmmuScope> {
        &self.spaces
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsva_smmuv3::cmd::TlbiAddr;

    const PAGE: CachedPage = CachedPage {
        start: 0x20_0000,
        last: 0x3f_ffff,
        global: false,
    };

    fn va(addr: u64) -> TlbiAddr {
        TlbiAddr {
            addr,
            leaf: true,
            ttl: 0,
            ..TlbiAddr::default()
        }
    }

    /// Whether `cmd` removes `page` (tagged with ASID 7 unless untranslated) from the space
    /// of StreamID 0x12, SubstreamID 3.
    fn removes(cmd: Cmd, tag: Option<u16>, page: CachedPage) -> bool {
        SmmuScope::of(&cmd).is_some_and(|scope| scope.covers(&(0x12, Some(3), false), tag, &page))
    }

    #[test]
    fn commands_remove_the_pages_the_tlb_rules_name() {
        let global = CachedPage {
            global: true,
            ..PAGE
        };
        let t = Some(7);
        let asid = |asid| Cmd::TlbiNhAsid { vmid: 0, asid };
        let nh_va = |asid, addr| Cmd::TlbiNhVa {
            vmid: 0,
            asid,
            addr: va(addr),
        };
        // The address anywhere in a 2 MiB block names the whole block.
        assert!(removes(nh_va(7, 0x3f_f000), t, PAGE));
        assert!(!removes(nh_va(7, 0x40_0000), t, PAGE));
        // Another ASID's NH_VA leaves a non-global page, not a global one.
        assert!(!removes(nh_va(8, 0x20_0000), t, PAGE));
        assert!(removes(nh_va(8, 0x20_0000), t, global));
        // NH_ASID: the ASID's non-global pages only.
        assert!(removes(asid(7), t, PAGE));
        assert!(!removes(asid(8), t, PAGE));
        assert!(!removes(asid(7), t, global));
        let vaa = Cmd::TlbiNhVaa {
            vmid: 0,
            addr: va(0x21_0000),
        };
        assert!(removes(vaa, t, PAGE));
        assert!(removes(Cmd::TlbiNhAll { vmid: 0 }, t, global));
        assert!(removes(Cmd::TlbiNsnhAll, t, PAGE));
        // TLB invalidations leave untranslated (bypass) pages; configuration ones do not.
        assert!(!removes(Cmd::TlbiNsnhAll, None, PAGE));
        assert!(removes(
            Cmd::CfgiSte {
                sid: 0x12,
                leaf: true
            },
            None,
            PAGE
        ));
        assert!(!removes(
            Cmd::CfgiSte {
                sid: 0x13,
                leaf: true
            },
            t,
            PAGE
        ));
        // CFGI_STE_RANGE names 2^(range + 1) StreamIDs; range 31 all of them.
        let range = |sid, range| Cmd::CfgiSteRange { sid, range };
        assert!(removes(range(0x10, 1), t, PAGE));
        assert!(!removes(range(0x10, 0), t, PAGE));
        assert!(removes(Cmd::CFGI_ALL, t, PAGE));
        // CFGI_CD names one SubstreamID's CD.
        let cd = |sid, ssid| Cmd::CfgiCd {
            sid,
            ssid,
            leaf: true,
        };
        assert!(removes(cd(0x12, 3), t, PAGE));
        assert!(!removes(cd(0x12, 4), t, PAGE));
        assert!(!removes(cd(0x11, 3), t, PAGE));
        assert!(removes(Cmd::CfgiCdAll { sid: 0x12 }, t, PAGE));
        // Commands that invalidate no cache of the vSMMU's are no scope.
        assert!(SmmuScope::of(&Cmd::StallTerm { sid: 0x12 }).is_none());
    }
}
