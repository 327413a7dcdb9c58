//! Tests of the physical SMMUv3 model through its registers, queues and real tables.

use std::sync::{Arc, Mutex};
use vsva_mem::PhysMem;

use proptest::prelude::*;
use vsva_smmuv3::desc::Descriptor as D;
use vsva_smmuv3::explain::Fresh;
use vsva_smmuv3::regs::{gerror, offset::*, OVERFLOW};
use vsva_smmuv3::{
    builder::TableBuilder, cd::ContextDescriptor, cmd::Cmd, cmd::CmdError, cmd::PriResp,
    cmd::SyncCs, cmd::TlbiAddr, event::Event, event::EventType, priq::PriqEntry, ste::Config,
    ste::Eats, ste::S1Dss, ste::S1Fmt, ste::Ste, walk::AccessRequest, walk::AddressSize,
    walk::PageSize, walk::S1Config, walk::S2Config, walk::S2Flags,
};

use super::*;
use crate::dma::port::{
    AtsCapability, AtsEndpoint, DevTlbInvalidation, DmaAccess, DmaPort, PageRequestMessage,
    PcieCapabilities, PrgResponse,
};
use crate::memory::HostMemory;
use vsva_vtd::{addr::Hpa, addr::Pasid, addr::SourceId};

const STRTAB: u64 = 0x1_0000;
const CMDQ: u64 = 0x2_0000;
const EVENTQ: u64 = 0x2_1000;
const PRIQ: u64 = 0x2_2000;
const CD_TABLE: u64 = 0x3_0000;
const TTB0: u64 = 0x4_0000;
const S2TTB: u64 = 0x5_0000;
const MSI: u64 = 0x6_0000;
const SID: u32 = 1;
const ASID: u16 = 5;
const VMID: u16 = 3;
/// A user page as Linux maps it: AF, EL0 read/write, not global (ASID-tagged).
const RW_EL0: u64 = D::AF | D::AP_EL0 | D::NG;
const S2_RW: u64 = D::AF | D::S2AP_R | D::S2AP_W;

/// An enabled SMMU over 16 MiB: a linear stream table of 64 STEs, a command queue of 8
/// entries, an event queue of 2 and a PRI queue of 4.
struct Rig {
    mem: Arc<HostMemory>,
    smmu: Arc<Smmu>,
    next_frame: u64,
}

impl Rig {
    fn new() -> Self {
        Rig::with_strict(true)
    }

    fn with_strict(strict: bool) -> Self {
        Rig::with_config(SmmuConfig {
            strict,
            ..SmmuConfig::default()
        })
    }

    fn with_config(cfg: SmmuConfig) -> Self {
        let mem = HostMemory::new(16 << 20).unwrap();
        let smmu = Arc::new(Smmu::new(mem.clone(), cfg));
        let w = |off, size, v| smmu.mmio_write(off, size, v).unwrap();
        w(STRTAB_BASE, 8, STRTAB);
        w(STRTAB_BASE_CFG, 4, 6);
        w(CMDQ_BASE, 8, CMDQ | 3);
        w(EVENTQ_BASE, 8, EVENTQ | 1);
        w(PRIQ_BASE, 8, PRIQ | 2);
        w(CR0, 4, 0xf);
        assert_eq!(smmu.mmio_read(CR0ACK, 4).unwrap(), 0xf);
        Rig {
            mem,
            smmu,
            next_frame: 0x10_0000,
        }
    }

    fn frame(&mut self) -> u64 {
        self.next_frame += 0x1000;
        self.next_frame - 0x1000
    }

    fn write_ste(&self, sid: u32, ste: &Ste) {
        self.write_words(STRTAB + sid as u64 * 64, &ste.encode());
    }

    fn write_words(&self, addr: u64, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            self.mem.write_u64(addr + i as u64 * 8, *w).unwrap();
        }
    }

    /// Produces `cmds` and writes CMDQ_PROD once.
    fn submit(&self, cmds: &[Cmd]) {
        let mut raw = Vec::new();
        for c in cmds {
            raw.push(c.encode());
        }
        self.submit_raw(&raw);
    }

    fn submit_raw(&self, cmds: &[[u64; 2]]) {
        let mut prod = self.smmu.mmio_read(CMDQ_PROD, 4).unwrap() as u32;
        for c in cmds {
            self.write_words(CMDQ + (prod as u64 & 7) * 16, c);
            prod = (prod + 1) & 0xf;
        }
        self.smmu.mmio_write(CMDQ_PROD, 4, prod as u64).unwrap();
    }

    fn cons(&self) -> u32 {
        self.smmu.mmio_read(CMDQ_CONS, 4).unwrap() as u32
    }

    /// Stage-1 STE for `sid` over the linear CD table of 4 CDs, CD 0 (ASID 5) with a
    /// 48-bit VA range at TTB0; returns the stage-1 builder.
    fn stage1(&mut self, sid: u32) -> (TableBuilder, S1Config) {
        let cd = ContextDescriptor::new(TTB0, 16, ASID);
        self.write_words(CD_TABLE, &cd.encode());
        let ste = Ste {
            s1_context_ptr: CD_TABLE,
            s1cdmax: 2,
            s1fmt: S1Fmt::Linear,
            s1dss: S1Dss::Substream0,
            s2vmid: 0,
            ..Ste::new(Config::S1Trans)
        };
        self.write_ste(sid, &ste);
        let s1 = cd.s1_config(&Features::VSVA).unwrap();
        (TableBuilder::stage1(&s1), s1)
    }

    fn map(&mut self, b: &mut TableBuilder, va: u64, pa: u64, attrs: u64) {
        let mut frames: Vec<u64> = (0..4).map(|_| self.frame()).collect();
        let mut alloc = || frames.pop();
        b.map(&*self.mem, &mut alloc, va, pa, PageSize::Size4K, attrs)
            .unwrap();
    }

    fn remap(&mut self, b: &mut TableBuilder, va: u64, pa: u64, attrs: u64) {
        b.unmap(&*self.mem, va, PageSize::Size4K).unwrap();
        self.map(b, va, pa, attrs);
    }

    fn read(&self, sid: u32, ssid: Option<u32>, va: u64) -> Result<u64, SmmuFault> {
        self.smmu
            .translate(sid, ssid, va, AccessRequest::READ)
            .map(|t| t.output)
    }

    fn missing(&self) -> Vec<Cmd> {
        self.smmu.take_stale().iter().map(|s| s.missing).collect()
    }

    fn event(&self, index: u64) -> Event {
        let mut w = [0; 4];
        for (i, x) in w.iter_mut().enumerate() {
            *x = self
                .mem
                .read_u64(EVENTQ + index * 32 + i as u64 * 8)
                .unwrap();
        }
        Event::decode(w).unwrap()
    }
}

mod stall;

/// A stage-1 STE over the CD table at [`CD_TABLE`] with ATS enabled (EATS full), whose
/// transactions without a substream use CD 0.
fn ats_ste() -> Ste {
    Ste {
        s1_context_ptr: CD_TABLE,
        s1cdmax: 2,
        s1dss: S1Dss::Substream0,
        eats: Eats::Full,
        ..Ste::new(Config::S1Trans)
    }
}

fn va_operand(addr: u64) -> TlbiAddr {
    TlbiAddr {
        addr,
        leaf: true,
        ..TlbiAddr::default()
    }
}

#[test]
fn stage1_entry_survives_until_the_right_tlbi() {
    let mut rig = Rig::new();
    let (mut b, _) = rig.stage1(SID);
    rig.map(&mut b, 0x1000, 0x40_0000, RW_EL0);
    assert_eq!(rig.read(SID, None, 0x1234), Ok(0x40_0234));
    let hit = rig
        .smmu
        .translate(SID, None, 0x1234, AccessRequest::READ)
        .unwrap();
    assert!(hit.tlb_hit);
    rig.remap(&mut b, 0x1000, 0x50_0000, RW_EL0);
    let right = Cmd::TlbiNhVa {
        vmid: 0,
        asid: ASID,
        addr: va_operand(0x1000),
    };
    // Commands of another ASID, VMID, address, level or stage leave the entry.
    for wrong in [
        Cmd::TlbiNhVa {
            vmid: 0,
            asid: ASID + 1,
            addr: va_operand(0x1000),
        },
        Cmd::TlbiNhVa {
            vmid: 1,
            asid: ASID,
            addr: va_operand(0x1000),
        },
        Cmd::TlbiNhVa {
            vmid: 0,
            asid: ASID,
            addr: va_operand(0x2000),
        },
        Cmd::TlbiNhAsid {
            vmid: 0,
            asid: ASID + 1,
        },
        Cmd::TlbiNhAll { vmid: 1 },
        Cmd::TlbiS2Ipa {
            vmid: 0,
            addr: va_operand(0x1000),
        },
        Cmd::TlbiS12Vmall { vmid: 1 },
        Cmd::CfgiSte {
            sid: SID,
            leaf: false,
        },
        Cmd::CfgiCdAll { sid: SID },
    ] {
        rig.submit(&[wrong]);
        assert_eq!(rig.read(SID, None, 0x1234), Ok(0x40_0234), "{wrong:?}");
        assert_eq!(rig.missing(), [right], "{wrong:?}");
    }
    rig.submit(&[right]);
    assert_eq!(rig.read(SID, None, 0x1234), Ok(0x50_0234));
    assert_eq!(rig.read(SID, None, 0x1234), Ok(0x50_0234));
    assert!(rig.missing().is_empty());
}

/// Real threads (§3.21.1 CMD_SYNC): one translates a page in a loop while another moves
/// the page to a new frame, then submits TLBI_NH_VA and CMD_SYNC, again and again. A
/// translation that began after the CMD_SYNC of version `v` was consumed gives the frame of
/// version `v` or a later one: an older frame is a walk that raced the TLBI and was cached
/// after it. Bounded to half a second.
/// TLBI + CMD_SYNC rounds, and translations checked, that the race below runs at least.
const RACE_ROUNDS: u64 = 100_000;

#[test]
fn translations_after_cmd_sync_never_give_a_frame_a_tlbi_removed() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    const FRAMES: u64 = 64;
    const VA: u64 = 0x1000;
    const OA: u64 = 0x0000_ffff_ffff_f000;
    let mut rig = Rig::with_strict(false);
    let (mut b, _) = rig.stage1(SID);
    let frame = |version: u64| 0x80_0000 + (version % FRAMES) * 0x1000;
    rig.map(&mut b, VA, frame(0), RW_EL0);
    let leaf = b.descriptor_address(&*rig.mem, VA, 3).unwrap().unwrap();
    let attrs = rig.mem.read_u64(leaf).unwrap() & !OA;
    let tlbi = [
        Cmd::TlbiNhVa {
            vmid: 0,
            asid: ASID,
            addr: va_operand(VA),
        },
        Cmd::Sync {
            cs: SyncCs::None,
            msh: 0,
            msi_attr: 0,
            msi_data: 0,
            msi_addr: 0,
        },
    ];
    let published = AtomicU64::new(0);
    let checked = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let rig = &rig;
    let versions = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                let before = published.load(Ordering::Acquire);
                let t = rig
                    .smmu
                    .translate(SID, None, VA, AccessRequest::READ)
                    .unwrap();
                let after = published.load(Ordering::Acquire);
                // Too many versions in between to tell apart by frame: not checked.
                if after + 2 - before >= FRAMES {
                    continue;
                }
                assert!(
                    (before..=after + 1).any(|v| t.output == frame(v)),
                    "translation began after CMD_SYNC {before} and gave {:#x} (TLB hit: {}); \
                     expected a frame of versions {before}..={}",
                    t.output,
                    t.tlb_hit,
                    after + 1
                );
                checked.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Until enough of both, however the threads are scheduled (the time limit is only a
        // safety net for a stalled machine).
        let start = Instant::now();
        let mut version = 0;
        while (version < RACE_ROUNDS || checked.load(Ordering::Relaxed) < RACE_ROUNDS)
            && start.elapsed() < Duration::from_secs(120)
            && !reader.is_finished()
        {
            version += 1;
            rig.mem.write_u64(leaf, attrs | frame(version)).unwrap();
            rig.submit(&tlbi);
            published.store(version, Ordering::Release);
        }
        stop.store(true, Ordering::Release);
        reader.join().unwrap();
        version
    });
    let checked = checked.into_inner();
    eprintln!("{checked} translations checked against {versions} TLBI + CMD_SYNC");
    assert!(
        checked >= RACE_ROUNDS && versions >= RACE_ROUNDS,
        "{checked} {versions}"
    );
}

#[test]
fn every_stage1_tlbi_scope_removes_the_entry() {
    for cmd in [
        Cmd::TlbiNhVaa {
            vmid: 0,
            addr: va_operand(0x1000),
        },
        Cmd::TlbiNhAsid {
            vmid: 0,
            asid: ASID,
        },
        Cmd::TlbiNhAll { vmid: 0 },
        Cmd::TlbiS12Vmall { vmid: 0 },
        Cmd::TlbiNsnhAll,
    ] {
        let mut rig = Rig::new();
        let (mut b, _) = rig.stage1(SID);
        rig.map(&mut b, 0x1000, 0x40_0000, RW_EL0);
        assert_eq!(rig.read(SID, None, 0x1000), Ok(0x40_0000));
        rig.remap(&mut b, 0x1000, 0x50_0000, RW_EL0);
        assert_eq!(rig.read(SID, None, 0x1000), Ok(0x40_0000));
        assert_eq!(rig.missing().len(), 1);
        rig.submit(&[cmd]);
        assert_eq!(rig.read(SID, None, 0x1000), Ok(0x50_0000), "{cmd:?}");
        assert!(rig.missing().is_empty(), "{cmd:?}");
    }
}

#[test]
fn ttl_hint_limits_nh_va_to_its_level() {
    let mut tlb = tlb::Tlb::default();
    let t = vsva_smmuv3::walk::Translation {
        output: 0x40_0000,
        page_size: PageSize::Size4K,
        perms: vsva_smmuv3::walk::Permissions::ALL,
        dirty: true,
        global: false,
    };
    let tag = tlb::TlbTag::Stage1 { asid: ASID };
    let level2 = Cmd::TlbiNhVa {
        vmid: 0,
        asid: ASID,
        addr: TlbiAddr {
            tg: 1,
            ttl: 2,
            ..va_operand(0x1000)
        },
    };
    tlb.insert(0, tag, false, 0x1000, t);
    assert_eq!(tlb.invalidate(&level2), 0);
    let level3 = Cmd::TlbiNhVa {
        vmid: 0,
        asid: ASID,
        addr: TlbiAddr {
            tg: 1,
            ttl: 3,
            ..va_operand(0x0)
        },
    };
    // A range of one page from 0 (NUM 0, SCALE 0) leaves the page at 0x1000; a range of
    // two pages (NUM 1) covers it.
    assert_eq!(tlb.invalidate(&level3), 0);
    let Cmd::TlbiNhVa { addr, .. } = level3 else {
        unreachable!()
    };
    let two_pages = Cmd::TlbiNhVa {
        vmid: 0,
        asid: ASID,
        addr: TlbiAddr { num: 1, ..addr },
    };
    assert_eq!(tlb.invalidate(&two_pages), 1);
    // A huge SCALE covers everything and does not overflow.
    tlb.insert(0, tag, false, 0xffff_f000, t);
    let all = Cmd::TlbiNhVa {
        vmid: 0,
        asid: ASID,
        addr: TlbiAddr {
            tg: 1,
            scale: 31,
            num: 31,
            ..va_operand(0)
        },
    };
    assert_eq!(tlb.invalidate(&all), 1);
    assert!(tlb.is_empty());
}

#[test]
fn cached_ste_and_cd_survive_until_cfgi() {
    let mut rig = Rig::new();
    let (mut b, _) = rig.stage1(SID);
    rig.map(&mut b, 0x1000, 0x40_0000, RW_EL0);
    assert_eq!(rig.read(SID, None, 0x1000), Ok(0x40_0000));
    // The CD moves to another ASID: the cached CD keeps ASID 5 until CMD_CFGI_CD.
    let cd = ContextDescriptor::new(TTB0, 16, ASID + 1);
    rig.write_words(CD_TABLE, &cd.encode());
    assert_eq!(rig.read(SID, None, 0x1000), Ok(0x40_0000));
    let cfgi_cd = Cmd::CfgiCd {
        sid: SID,
        ssid: 0,
        leaf: true,
    };
    assert!(rig.missing().contains(&cfgi_cd));
    rig.submit(&[
        Cmd::CfgiCd {
            sid: SID,
            ssid: 1,
            leaf: true,
        },
        Cmd::CfgiCdAll { sid: SID + 1 },
    ]);
    assert_eq!(rig.read(SID, None, 0x1000), Ok(0x40_0000));
    assert!(rig.missing().contains(&cfgi_cd));
    rig.submit(&[cfgi_cd]);
    // A walk under the new ASID (a new TLB entry), nothing stale.
    let t = rig
        .smmu
        .translate(SID, None, 0x1000, AccessRequest::READ)
        .unwrap();
    assert!(!t.tlb_hit);
    assert!(rig.missing().is_empty());
    // The STE now aborts: the cached STE keeps translating until CMD_CFGI_STE.
    rig.write_ste(SID, &Ste::new(Config::Abort));
    assert_eq!(rig.read(SID, None, 0x1000), Ok(0x40_0000));
    let cfgi_ste = Cmd::CfgiSte {
        sid: SID,
        leaf: true,
    };
    assert!(rig.missing().contains(&cfgi_ste));
    rig.submit(&[
        Cmd::CfgiSte {
            sid: SID + 1,
            leaf: true,
        },
        // Range 0 covers StreamIDs 2 and 3.
        Cmd::CfgiSteRange {
            sid: SID + 2,
            range: 0,
        },
    ]);
    assert_eq!(rig.read(SID, None, 0x1000), Ok(0x40_0000));
    rig.missing();
    // Range 1 covers StreamIDs 0 to 3.
    rig.submit(&[Cmd::CfgiSteRange { sid: 2, range: 1 }]);
    assert_eq!(rig.read(SID, None, 0x1000), Err(SmmuFault::Abort));
    assert!(rig.missing().is_empty());
    // CMD_CFGI_ALL drops every STE and CD.
    assert_ne!(rig.smmu.cached_entries().1, 0);
    rig.submit(&[Cmd::CfgiSteRange { sid: 0, range: 31 }]);
    let (_, stes, cds) = rig.smmu.cached_entries();
    assert_eq!((stes, cds), (0, 0));
}

/// Nested: stage 2 (VMID 3) maps IPA 0x8000_0000.. to PA 0x80_0000..; the CD table, the
/// stage-1 tables and the data are at IPAs.
#[test]
fn nested_translation_through_real_tables() {
    let mut rig = Rig::new();
    let f = Features::VSVA;
    let s2 = S2Config::new(S2TTB, 25, 1, AddressSize::Bits48, S2Flags::default()).unwrap();
    let mut b2 = TableBuilder::stage2(&s2);
    let ipa = |pa: u64| 0x8000_0000 + pa - 0x80_0000;
    // IPA pages 0..16 of the window map PA 0x80_0000.. (guest RAM).
    for i in 0..16 {
        rig.map(
            &mut b2,
            ipa(0x80_0000 + i * 0x1000),
            0x80_0000 + i * 0x1000,
            S2_RW,
        );
    }
    // The guest's CD table at PA 0x80_0000 (IPA 0x8000_0000), TTB0 at IPA 0x8000_1000.
    let cd = ContextDescriptor::new(ipa(0x80_1000), 16, ASID);
    rig.write_words(0x80_0000 + 64, &cd.encode());
    let ste = Ste {
        s1_context_ptr: ipa(0x80_0000),
        s1cdmax: 4,
        s2vmid: VMID,
        s2t0sz: 25,
        s2sl0: 1,
        s2ps: AddressSize::Bits48,
        s2ttb: S2TTB,
        s2r: true,
        ..Ste::new(Config::Nested)
    };
    rig.write_ste(SID, &ste);
    // Stage 1, built through a view of guest RAM: table frames at IPAs 0x8000_2000...
    let s1 = cd.s1_config(&f).unwrap();
    let guest_mem = rig.mem.clone();
    let guest = GuestView(&guest_mem);
    let mut b1 = TableBuilder::stage1(&s1);
    let mut frames = (2..8)
        .map(|i| ipa(0x80_0000 + i * 0x1000))
        .rev()
        .collect::<Vec<_>>();
    let mut alloc = || frames.pop();
    b1.map(
        &guest,
        &mut alloc,
        0x7f00_0000,
        ipa(0x80_9000),
        PageSize::Size4K,
        RW_EL0,
    )
    .unwrap();
    assert_eq!(rig.read(SID, Some(1), 0x7f00_0123), Ok(0x80_9123));
    // Stage 2 moves the data page: S2_IPA does not remove the combined entry.
    rig.remap(&mut b2, ipa(0x80_9000), 0xa0_0000, S2_RW);
    rig.submit(&[Cmd::TlbiS2Ipa {
        vmid: VMID,
        addr: va_operand(ipa(0x80_9000)),
    }]);
    assert_eq!(rig.read(SID, Some(1), 0x7f00_0123), Ok(0x80_9123));
    assert_eq!(
        rig.missing(),
        [Cmd::TlbiNhVa {
            vmid: VMID,
            asid: ASID,
            addr: va_operand(0x7f00_0000)
        }]
    );
    rig.submit(&[Cmd::TlbiS12Vmall { vmid: VMID + 1 }]);
    assert_eq!(rig.read(SID, Some(1), 0x7f00_0123), Ok(0x80_9123));
    rig.missing();
    rig.submit(&[Cmd::TlbiS12Vmall { vmid: VMID }]);
    assert_eq!(rig.read(SID, Some(1), 0x7f00_0123), Ok(0xa0_0123));
    assert!(rig.missing().is_empty());
    // A VA stage 1 does not map: F_TRANSLATION at stage 1, recorded (CD.R).
    let Err(SmmuFault::Event { event, recorded }) =
        rig.smmu
            .translate(SID, Some(1), 0x1000, AccessRequest::WRITE)
    else {
        panic!("expected a fault");
    };
    assert!(recorded);
    assert_eq!(
        (event.event_type, event.s2, event.rnw),
        (EventType::Translation, false, false)
    );
    assert_eq!(
        (event.sid, event.ssid, event.input_addr),
        (SID, Some(1), 0x1000)
    );
    assert_eq!(rig.event(0), event);
    // A stage-1 leaf pointing at an IPA stage 2 does not map: a stage-2 fault, CLASS IN.
    b1.map(
        &guest,
        &mut alloc,
        0x7f00_1000,
        0xc000_0000,
        PageSize::Size4K,
        RW_EL0,
    )
    .unwrap();
    let Err(SmmuFault::Event { event, .. }) =
        rig.smmu
            .translate(SID, Some(1), 0x7f00_1008, AccessRequest::READ)
    else {
        panic!("expected a fault");
    };
    assert_eq!(
        (event.event_type, event.s2, event.addr2),
        (EventType::Translation, true, 0xc000_0000)
    );
    // Explain: STE, CD, the stage-2 walk of the CD fetch, then each stage-1 step with
    // its stage-2 lookups; the caches do not change.
    let cached = rig.smmu.cached_entries();
    let e = rig
        .smmu
        .explain(SID, Some(1), 0x7f00_0123, AccessRequest::READ);
    assert_eq!(e.ste, Ok(ste));
    assert_eq!(e.cd, Some(Ok(cd)));
    assert_eq!(
        e.result,
        Fresh::Page {
            base: 0xa0_0000,
            size: PageSize::Size4K
        }
    );
    let s1_steps = e
        .walk
        .steps
        .iter()
        .filter(|s| s.stage == vsva_smmuv3::walk::Stage::Stage1)
        .count();
    assert_eq!(s1_steps, 4);
    // Stage 2 maps 4 KiB pages from level 1: 3 steps for the CD, 3 for each of the 4
    // stage-1 tables, 3 for the output.
    assert_eq!(e.walk.steps.len() - s1_steps, 3 + 4 * 3 + 3);
    assert_eq!(rig.smmu.cached_entries(), cached);
    let text = e.to_string();
    assert!(
        text.contains("CD: ASID 5") && text.contains("S2 L3"),
        "{text}"
    );
}

/// Guest RAM seen at IPAs 0x8000_0000.. (PA 0x80_0000..), for building stage-1 tables.
struct GuestView<'a>(&'a HostMemory);

impl GuestView<'_> {
    fn pa(addr: u64) -> u64 {
        addr - 0x8000_0000 + 0x80_0000
    }
}

impl PhysMem for GuestView<'_> {
    fn read_u64(&self, addr: u64) -> Result<u64, vsva_mem::MemError> {
        self.0.read_u64(Self::pa(addr))
    }
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, vsva_mem::MemError> {
        self.0.fetch_or_u64(Self::pa(addr), bits)
    }
    fn compare_exchange_u64(
        &self,
        addr: u64,
        old: u64,
        new: u64,
    ) -> Result<u64, vsva_mem::MemError> {
        self.0.compare_exchange_u64(Self::pa(addr), old, new)
    }
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), vsva_mem::MemError> {
        self.0.write_u64(Self::pa(addr), value)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), vsva_mem::MemError> {
        self.0.read(Self::pa(addr), buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), vsva_mem::MemError> {
        self.0.write(Self::pa(addr), buf)
    }
}

#[test]
fn stage2_entries_follow_s2_ipa_per_vmid() {
    let mut rig = Rig::new();
    let s2 = S2Config::new(S2TTB, 25, 1, AddressSize::Bits48, S2Flags::default()).unwrap();
    let mut b2 = TableBuilder::stage2(&s2);
    rig.map(&mut b2, 0x3000, 0x70_0000, S2_RW);
    rig.write_ste(
        SID,
        &Ste {
            s2vmid: VMID,
            s2t0sz: 25,
            s2sl0: 1,
            s2ps: AddressSize::Bits48,
            s2ttb: S2TTB,
            ..Ste::new(Config::S2Trans)
        },
    );
    assert_eq!(rig.read(SID, None, 0x3010), Ok(0x70_0010));
    rig.remap(&mut b2, 0x3000, 0x71_0000, S2_RW);
    let right = Cmd::TlbiS2Ipa {
        vmid: VMID,
        addr: va_operand(0x3000),
    };
    for wrong in [
        Cmd::TlbiS2Ipa {
            vmid: VMID + 1,
            addr: va_operand(0x3000),
        },
        Cmd::TlbiNhAll { vmid: VMID },
        Cmd::TlbiNhVaa {
            vmid: VMID,
            addr: va_operand(0x3000),
        },
    ] {
        rig.submit(&[wrong]);
        assert_eq!(rig.read(SID, None, 0x3010), Ok(0x70_0010), "{wrong:?}");
        assert_eq!(rig.missing(), [right]);
    }
    rig.submit(&[right]);
    assert_eq!(rig.read(SID, None, 0x3010), Ok(0x71_0010));
    // Stage-2 faults are recorded only with S2R; this STE has it clear.
    let Err(SmmuFault::Event { event, recorded }) =
        rig.smmu.translate(SID, None, 0x9000, AccessRequest::READ)
    else {
        panic!("expected a fault");
    };
    assert!(!recorded);
    assert_eq!((event.event_type, event.s2), (EventType::Translation, true));
}

fn sync(data: u32) -> Cmd {
    Cmd::Sync {
        cs: SyncCs::Irq,
        msh: 0,
        msi_attr: 0,
        msi_data: data,
        msi_addr: MSI,
    }
}

fn msi_value(rig: &Rig) -> u32 {
    let mut b = [0; 4];
    rig.mem.read(MSI, &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn command_queue_wraps() {
    let rig = Rig::new();
    // 3 batches of 5 commands through an 8-entry queue: the wrap bit flips.
    for batch in 0..3u32 {
        let cmds: Vec<Cmd> = (0..5).map(|i| sync(batch * 10 + i)).collect();
        rig.submit(&cmds);
        assert_eq!(rig.cons(), rig.smmu.mmio_read(CMDQ_PROD, 4).unwrap() as u32);
        assert_eq!(msi_value(&rig), batch * 10 + 4);
    }
    // 15 commands consumed: index 7, wrap bit 1.
    assert_eq!(rig.cons(), 0x8 | 7);
    assert_eq!(
        rig.smmu
            .stats()
            .commands
            .load(std::sync::atomic::Ordering::Relaxed),
        15
    );
    // CS=SEV and CS=NONE complete without an MSI write.
    rig.submit(&[
        Cmd::Sync {
            cs: SyncCs::Sev,
            msh: 0,
            msi_attr: 0,
            msi_data: 99,
            msi_addr: MSI,
        },
        Cmd::Sync {
            cs: SyncCs::None,
            msh: 0,
            msi_attr: 0,
            msi_data: 98,
            msi_addr: MSI,
        },
    ]);
    assert_eq!(msi_value(&rig), 24);
    assert_eq!(rig.cons(), 1);
}

#[test]
fn illegal_command_stops_the_queue_until_acknowledged() {
    let rig = Rig::new();
    rig.submit(&[sync(1)]);
    // An unknown opcode, then a CMD_SYNC that must wait.
    rig.submit_raw(&[[0xff, 0], sync(2).encode()]);
    let cons = rig.cons();
    assert_eq!(cons & 0xf, 1, "CONS points at the illegal command");
    assert_eq!(cons >> 24 & 0x7f, CmdError::Ill.code() as u32);
    let gerror_now = rig.smmu.mmio_read(GERROR, 4).unwrap();
    assert_ne!(gerror_now as u32 & gerror::CMDQ_ERR, 0);
    assert_eq!(msi_value(&rig), 1);
    // More commands are not consumed while CMDQ_ERR is active.
    rig.submit(&[sync(3)]);
    assert_eq!(rig.cons() & 0xf, 1);
    // Software replaces the command and acknowledges the error: consumption resumes.
    rig.write_words(CMDQ + 16, &Cmd::TlbiNsnhAll.encode());
    rig.smmu.mmio_write(GERRORN, 4, gerror_now).unwrap();
    assert_eq!(rig.cons(), 4);
    assert_eq!(msi_value(&rig), 3);
    // A command RES0 bit is CERROR_ILL too.
    rig.submit_raw(&[[0x46 | 1 << 14, 0]]);
    assert_eq!(rig.cons() >> 24 & 0x7f, 1);
}

#[test]
fn event_queue_overflow_drops_and_flags() {
    let mut rig = Rig::new();
    let (_b, _) = rig.stage1(SID);
    for va in [0x1000, 0x2000, 0x3000] {
        assert!(matches!(
            rig.read(SID, None, va),
            Err(SmmuFault::Event { .. })
        ));
    }
    let prod = rig.smmu.mmio_read(EVENTQ_PROD, 4).unwrap() as u32;
    let cons = rig.smmu.mmio_read(EVENTQ_CONS, 4).unwrap() as u32;
    // Two records fit; the third was lost and the overflow flag toggled.
    assert_eq!(prod & 0x3, 2);
    assert_ne!((prod ^ cons) & OVERFLOW, 0);
    assert_eq!(
        (rig.event(0).input_addr, rig.event(1).input_addr),
        (0x1000, 0x2000)
    );
    assert_eq!(
        rig.smmu
            .stats()
            .events_lost
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Software consumes both and acknowledges the overflow: the next event is written.
    rig.smmu
        .mmio_write(EVENTQ_CONS, 4, ((prod & OVERFLOW) | (prod & 0x3)) as u64)
        .unwrap();
    let Err(SmmuFault::Event { recorded, .. }) = rig.read(SID, None, 0x4000) else {
        panic!("expected a fault");
    };
    assert!(recorded);
    assert_eq!(rig.event(0).input_addr, 0x4000);
}

/// Interrupts go to the platform's MSI doorbell with their IRQ_CFG1 data while IRQ_CTRL
/// enables them; an MSI that aborts activates its GERROR.MSI_*_ABT_ERR, and GERROR's own
/// MSI tells software.
#[test]
fn msis_reach_the_doorbell_and_an_aborted_msi_is_a_global_error() {
    let mut rig = Rig::new();
    let (_b, _) = rig.stage1(SID);
    let bell = 0x8_0000_0001_0040u64;
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    rig.smmu
        .set_msi_doorbell(bell, Arc::new(move |data| sink.lock().unwrap().push(data)));
    let w = |off, size, v| rig.smmu.mmio_write(off, size, v).unwrap();
    w(GERROR_IRQ_CFG0, 8, bell);
    w(GERROR_IRQ_CFG1, 4, 10);
    w(EVENTQ_IRQ_CFG0, 8, bell);
    w(EVENTQ_IRQ_CFG1, 4, 11);
    // Disabled in IRQ_CTRL: nothing is sent.
    assert!(rig.read(SID, None, 0x1000).is_err());
    assert!(got.lock().unwrap().is_empty());
    w(IRQ_CTRL, 4, 0x7);
    let consume = |rig: &Rig| {
        let prod = rig.smmu.mmio_read(EVENTQ_PROD, 4).unwrap();
        rig.smmu.mmio_write(EVENTQ_CONS, 4, prod).unwrap();
    };
    consume(&rig);
    assert!(rig.read(SID, None, 0x2000).is_err());
    assert_eq!(*got.lock().unwrap(), [11]);
    // The event queue's MSI address is beyond memory: the record is written, its MSI
    // aborts, GERROR.MSI_EVENTQ_ABT_ERR becomes active and GERROR's MSI is sent.
    consume(&rig);
    w(EVENTQ_IRQ_CFG0, 8, 0x1_0000_0000);
    assert!(rig.read(SID, None, 0x3000).is_err());
    assert_eq!(rig.event(0).input_addr, 0x3000);
    let active = |rig: &Rig| {
        (rig.smmu.mmio_read(GERROR, 4).unwrap() ^ rig.smmu.mmio_read(GERRORN, 4).unwrap()) as u32
    };
    assert_eq!(active(&rig), gerror::MSI_EVENTQ_ABT_ERR);
    assert_eq!(*got.lock().unwrap(), [11, 10]);
    // Still active: a second abort raises nothing new.
    consume(&rig);
    assert!(rig.read(SID, None, 0x4000).is_err());
    assert_eq!(got.lock().unwrap().len(), 2);
    // Acknowledged, the error can be raised again.
    let g = rig.smmu.mmio_read(GERROR, 4).unwrap();
    w(GERRORN, 4, g);
    assert_eq!(active(&rig), 0);
    consume(&rig);
    assert!(rig.read(SID, None, 0x5000).is_err());
    assert_eq!(*got.lock().unwrap(), [11, 10, 10]);
    // GERROR's own MSI aborting only records MSI_GERROR_ABT_ERR.
    let g = rig.smmu.mmio_read(GERROR, 4).unwrap();
    w(GERRORN, 4, g);
    w(GERROR_IRQ_CFG0, 8, 0x1_0000_0000);
    consume(&rig);
    assert!(rig.read(SID, None, 0x6000).is_err());
    assert_eq!(
        active(&rig),
        gerror::MSI_EVENTQ_ABT_ERR | gerror::MSI_GERROR_ABT_ERR
    );
    assert_eq!(got.lock().unwrap().len(), 3);
    // Without the doorbell, an MSI is a memory write again.
    rig.smmu.clear_msi_doorbell();
    w(EVENTQ_IRQ_CFG0, 8, MSI);
    consume(&rig);
    assert!(rig.read(SID, None, 0x7000).is_err());
    assert_eq!(msi_value(&rig), 11);
    assert_eq!(got.lock().unwrap().len(), 3);
}

#[derive(Default)]
struct Device {
    calls: Mutex<Vec<String>>,
}

impl AtsEndpoint for Device {
    fn source_id(&self) -> SourceId {
        SourceId::from_rid(SID as u16)
    }
    fn pcie_capabilities(&self) -> PcieCapabilities {
        PcieCapabilities {
            ats: Some(AtsCapability {
                invalidate_queue_depth: 0,
            }),
            pri: true,
            pasid_width: Some(20),
        }
    }
    fn invalidate_devtlb(&self, inv: DevTlbInvalidation) -> usize {
        let pasid = inv.pasid.map(Pasid::raw);
        self.calls.lock().unwrap().push(format!(
            "inv {pasid:?} {} {:#x}..={:#x}",
            inv.global, inv.range.start, inv.range.last
        ));
        0
    }
    fn page_response(&self, resp: PrgResponse) {
        let pasid = resp.pasid.map(Pasid::raw);
        self.calls
            .lock()
            .unwrap()
            .push(format!("resp {pasid:?} {} {:?}", resp.prgi, resp.code));
    }
}

#[test]
fn atc_inv_pri_resp_and_page_requests() {
    let mut rig = Rig::new();
    let dev = Arc::new(Device::default());
    rig.smmu.attach_endpoint(SID, dev.clone());
    rig.submit(&[
        Cmd::AtcInv {
            sid: SID,
            ssid: Some(4),
            global: false,
            addr: 0x7000,
            size: 1,
        },
        // Another StreamID: not this device.
        Cmd::AtcInv {
            sid: SID + 1,
            ssid: None,
            global: true,
            addr: 0,
            size: 0,
        },
        Cmd::PriResp {
            sid: SID,
            ssid: Some(4),
            prg_index: 9,
            resp: PriResp::Success,
        },
        sync(7),
    ]);
    assert_eq!(
        *dev.calls.lock().unwrap(),
        [
            "inv Some(4) false 0x6000..=0x7fff",
            "resp Some(4) 9 Success"
        ]
    );
    assert_eq!(msi_value(&rig), 7);
    // Page requests need an STE allowing ATS.
    let req = PriqEntry {
        sid: SID,
        ssid: Some(4),
        privileged: false,
        exec: false,
        read: true,
        write: true,
        last: true,
        prg_index: 9,
        addr: 0x7000,
    };
    let (_b, _) = rig.stage1(SID);
    assert_eq!(rig.smmu.page_request(&req), Err(PriRefused::NotEnabled));
    let ste = Ste {
        s1_context_ptr: CD_TABLE,
        s1cdmax: 2,
        eats: Eats::Full,
        ..Ste::new(Config::S1Trans)
    };
    rig.write_ste(SID, &ste);
    rig.submit(&[Cmd::CfgiSte {
        sid: SID,
        leaf: true,
    }]);
    assert_eq!(rig.smmu.page_request(&req), Ok(()));
    let got = [
        rig.mem.read_u64(PRIQ).unwrap(),
        rig.mem.read_u64(PRIQ + 8).unwrap(),
    ];
    assert_eq!(PriqEntry::decode(got), req);
    assert_eq!(rig.smmu.mmio_read(PRIQ_PROD, 4).unwrap() & 0x7, 1);
    rig.smmu.detach_endpoint(SID);
    rig.submit(&[Cmd::AtcInv {
        sid: SID,
        ssid: None,
        global: true,
        addr: 0,
        size: 0,
    }]);
    assert_eq!(dev.calls.lock().unwrap().len(), 2);
}

/// HTTU (CD.HA and HD) with a writable-clean leaf (DBM, `AP[2]` set): a read, or an ATS
/// read request, leaves it clean and an ATS completion for reading grants no write; a
/// write marks it dirty (`AP[2]` cleared) and an ATS write request is granted W. Software
/// making it clean again must invalidate the TLB entry: until CMD_TLBI_NH_VA the cached
/// writable-dirty entry serves writes and the leaf stays clean.
#[test]
fn dirty_state_under_httu_with_the_tlb_and_ats() {
    let mut rig = Rig::new();
    let dev = Arc::new(Device::default());
    rig.smmu.attach_endpoint(SID, dev.clone());
    let rid = SourceId::from_rid(SID as u16);
    let (mut b, _) = rig.stage1(SID);
    let cd = ContextDescriptor {
        ha: true,
        hd: true,
        ..ContextDescriptor::new(TTB0, 16, ASID)
    };
    rig.write_words(CD_TABLE, &cd.encode());
    rig.write_ste(SID, &ats_ste());
    rig.map(&mut b, 0x5000, 0x60_0000, RW_EL0 | D::DBM | D::AP_RO);
    let leaf = b.descriptor_address(&*rig.mem, 0x5000, 3).unwrap().unwrap();
    let clean = |rig: &Rig| rig.mem.read_u64(leaf).unwrap() & D::AP_RO != 0;
    let c = rig
        .smmu
        .ats_translate(rid, None, 0x5000, DmaAccess::READ)
        .unwrap();
    assert!(c.perm.read && !c.perm.write, "{c:?}");
    assert!(clean(&rig));
    assert_eq!(rig.read(SID, None, 0x5008), Ok(0x60_0008));
    assert!(clean(&rig));
    let c = rig
        .smmu
        .ats_translate(rid, None, 0x5000, DmaAccess::WRITE)
        .unwrap();
    assert!(c.perm.write, "{c:?}");
    assert!(!clean(&rig));
    // Software makes it clean; the TLB's writable-dirty entry hides the next write.
    let d = rig.mem.read_u64(leaf).unwrap();
    rig.mem.write_u64(leaf, d | D::AP_RO).unwrap();
    let w = rig
        .smmu
        .translate(SID, None, 0x5010, AccessRequest::WRITE)
        .unwrap();
    assert!(w.tlb_hit && clean(&rig));
    rig.submit(&[Cmd::TlbiNhVa {
        vmid: 0,
        asid: ASID,
        addr: va_operand(0x5000),
    }]);
    let w = rig
        .smmu
        .translate(SID, None, 0x5010, AccessRequest::WRITE)
        .unwrap();
    assert!(!w.tlb_hit && !clean(&rig));
}

#[test]
fn configuration_errors_become_events() {
    let mut rig = Rig::new();
    let kind = |r: Result<u64, SmmuFault>| match r {
        Err(SmmuFault::Event { event, .. }) => event.event_type,
        other => panic!("{other:?}"),
    };
    // An invalid STE (V clear), a StreamID beyond the table.
    assert_eq!(kind(rig.read(SID, None, 0)), EventType::BadSte);
    assert_eq!(kind(rig.read(64, None, 0)), EventType::BadStreamId);
    // A CD with a RES0 bit set; a SubstreamID beyond S1CDMax.
    let (_b, _) = rig.stage1(SID + 1);
    let mut cd = ContextDescriptor::new(TTB0, 16, ASID).encode();
    cd[7] |= 1;
    rig.write_words(CD_TABLE + 64, &cd);
    assert_eq!(kind(rig.read(SID + 1, Some(1), 0)), EventType::BadCd);
    assert_eq!(
        kind(rig.read(SID + 1, Some(4), 0)),
        EventType::BadSubstreamId
    );
    // Nothing invalid was cached: STE 1 becomes valid and is used at once.
    rig.write_ste(SID, &Ste::new(Config::Bypass));
    assert_eq!(rig.read(SID, None, 0x1234), Ok(0x1234));
    // With SMMUEN clear, GBPA decides: abort at reset.
    rig.smmu.mmio_write(CR0, 4, 0xe).unwrap();
    assert_eq!(rig.read(SID, None, 0x1234), Err(SmmuFault::Abort));
}

/// The DMA engine's view: requests tagged with the requester id as StreamID and the PASID
/// as SubstreamID; ATS and PRI as STE.EATS allows.
#[test]
fn dma_port_tags_requests_with_streamid_and_substreamid() {
    let mut rig = Rig::new();
    let dev = Arc::new(Device::default());
    rig.smmu.attach_endpoint(SID, dev.clone());
    let rid = SourceId::from_rid(SID as u16);
    let pasid = Pasid::new(1).unwrap();
    // CD 1 (ASID 9) maps 0x5000; CD 0 (ASID 5) maps nothing there.
    let (_b0, _) = rig.stage1(SID);
    let cd1 = ContextDescriptor::new(TTB0 + 0x1000, 16, 9);
    rig.write_words(CD_TABLE + 64, &cd1.encode());
    let mut b1 = TableBuilder::stage1(&cd1.s1_config(&Features::VSVA).unwrap());
    rig.map(&mut b1, 0x5000, 0x60_0000, RW_EL0);
    let t = rig
        .smmu
        .remap(rid, Some(pasid), 0x5abc, DmaAccess::WRITE)
        .unwrap();
    assert_eq!((t.hpa().raw(), t.size()), (0x60_0000, 0x1000));
    // Without PASID (S1DSS substream 0): CD 0, a stage-1 translation fault, reported
    // with its event type; not recoverable since the STE does not enable ATS.
    let f = rig
        .smmu
        .remap(rid, None, 0x5abc, DmaAccess::READ)
        .unwrap_err();
    assert_eq!(
        (f.reason, f.recoverable),
        (EventType::Translation as u8, false)
    );
    // ATS and translated requests need STE.EATS.
    assert!(rig
        .smmu
        .ats_translate(rid, Some(pasid), 0x5000, DmaAccess::READ)
        .is_err());
    assert!(rig
        .smmu
        .check_translated(rid, Hpa(0x60_0000), 8, DmaAccess::READ)
        .is_err());
    // Both refusals are recorded: the remap fault and F_BAD_ATS_TREQ fill the 2-entry
    // queue (F_TRANSL_FORBIDDEN is lost); once software consumes them, the next one is
    // written.
    assert_eq!(rig.event(1).event_type, EventType::BadAtsTreq);
    let prod = rig.smmu.mmio_read(EVENTQ_PROD, 4).unwrap();
    rig.smmu.mmio_write(EVENTQ_CONS, 4, prod).unwrap();
    assert!(rig
        .smmu
        .check_translated(rid, Hpa(0x60_0000), 8, DmaAccess::READ)
        .is_err());
    assert_eq!(
        (rig.event(0).event_type, rig.event(0).input_addr),
        (EventType::TranslForbidden, 0x60_0000)
    );
    rig.write_ste(SID, &ats_ste());
    rig.submit(&[Cmd::CfgiSte {
        sid: SID,
        leaf: true,
    }]);
    let c = rig
        .smmu
        .ats_translate(rid, Some(pasid), 0x5000, DmaAccess::READ)
        .unwrap();
    assert_eq!(c.page.hpa().raw(), 0x60_0000);
    assert!(c.perm.read && c.perm.write);
    assert!(rig
        .smmu
        .check_translated(rid, Hpa(0x60_0000), 8, DmaAccess::READ)
        .is_ok());
    let f = rig
        .smmu
        .remap(rid, Some(pasid), 0x9000, DmaAccess::READ)
        .unwrap_err();
    assert!(f.recoverable);
    // A page request reaches the PRI queue with the StreamID and SubstreamID.
    let req = PageRequestMessage {
        sid: rid,
        pasid: Some(pasid),
        addr: 0x9000,
        access: DmaAccess::READ,
        prgi: 3,
        last: true,
    };
    DmaPort::page_request(&*rig.smmu, req);
    let got = PriqEntry::decode([
        rig.mem.read_u64(PRIQ).unwrap(),
        rig.mem.read_u64(PRIQ + 8).unwrap(),
    ]);
    assert_eq!(
        (got.sid, got.ssid, got.addr, got.prg_index),
        (SID, Some(1), 0x9000, 3)
    );
    // A stream without ATS gets Response Failure at once.
    let other = SourceId::from_rid(SID as u16 + 1);
    rig.smmu.attach_endpoint(SID + 1, dev.clone());
    DmaPort::page_request(&*rig.smmu, PageRequestMessage { sid: other, ..req });
    assert_eq!(
        dev.calls.lock().unwrap().last().unwrap(),
        "resp Some(1) 3 ResponseFailure"
    );
}

proptest! {
    /// Hostile STEs and CDs: valid nested structures with random bits flipped, or random
    /// words. Every translation ends with a translation or a fault, never a panic, and a
    /// second lookup (through the caches) agrees with the first.
    #[test]
    fn hostile_structures_never_panic(
        flips in proptest::collection::vec((0usize..16, 0u32..64), 0..4),
        random in proptest::option::of(proptest::array::uniform16(any::<u64>())),
        ssid in proptest::option::of(0u32..8),
        va in 0u64..0x4000,
    ) {
        let mut rig = Rig::new();
        let (mut b, _) = rig.stage1(SID);
        rig.map(&mut b, 0x1000, 0x40_0000, RW_EL0);
        let mut words = [0u64; 16];
        words[..8].copy_from_slice(&Ste {
            s1_context_ptr: CD_TABLE,
            s1cdmax: 2,
            s1dss: S1Dss::Substream0,
            ..Ste::new(Config::S1Trans)
        }.encode());
        words[8..].copy_from_slice(&ContextDescriptor::new(TTB0, 16, ASID).encode());
        if let Some(r) = random {
            words = r;
        }
        for (w, bit) in flips {
            words[w] ^= 1 << bit;
        }
        rig.write_words(STRTAB + 64 * SID as u64, &words[..8]);
        rig.write_words(CD_TABLE, &words[8..]);
        let first = rig.smmu.translate(SID, ssid, va, AccessRequest::READ);
        let second = rig.smmu.translate(SID, ssid, va, AccessRequest::READ);
        prop_assert_eq!(first.map(|t| t.output), second.map(|t| t.output));
        // Strict mode finds nothing stale: the tables did not change.
        prop_assert!(rig.smmu.take_stale().is_empty());
    }
}

/// A stage-1 leaf with nG = 0 is global: its TLB entry serves every ASID of the VMID;
/// TLBI_NH_VA of any ASID and TLBI_NH_VAA remove it, TLBI_NH_ASID does not (IHI 0070 §4.4,
/// Arm ARM D8 global entries). A non-global entry is the walking ASID's alone.
#[test]
fn global_entries_are_shared_by_asids_and_survive_nh_asid() {
    let t = |global| vsva_smmuv3::walk::Translation {
        output: 0x40_0000,
        page_size: PageSize::Size4K,
        perms: vsva_smmuv3::walk::Permissions::ALL,
        dirty: true,
        global,
    };
    let as_of = |asid| tlb::TlbTag::Stage1 { asid };
    let nested = |asid| tlb::TlbTag::Nested { asid };
    let fresh = || {
        let mut tlb = tlb::Tlb::default();
        tlb.insert(VMID, as_of(1), false, 0x1000, t(true));
        tlb.insert(VMID, nested(1), false, 0x1000, t(true));
        tlb.insert(VMID, as_of(1), false, 0x2000, t(false));
        tlb
    };
    let tlb = fresh();
    // Another ASID of the VMID hits the global entries, not the non-global one.
    assert!(tlb.lookup(VMID, as_of(2), false, 0x1234).is_some());
    assert!(tlb.lookup(VMID, nested(9), false, 0x1234).is_some());
    assert!(tlb.lookup(VMID, as_of(2), false, 0x2000).is_none());
    assert!(tlb.lookup(VMID, as_of(1), false, 0x2000).is_some());
    // Not another VMID, stage, or privilege.
    assert!(tlb.lookup(VMID + 1, as_of(1), false, 0x1000).is_none());
    assert!(tlb
        .lookup(VMID, tlb::TlbTag::Stage2, false, 0x1000)
        .is_none());
    assert!(tlb.lookup(VMID, as_of(1), true, 0x1000).is_none());
    let va = |addr| va_operand(addr);
    let cases = [
        // NH_ASID removes the ASID's non-global entry only.
        (
            Cmd::TlbiNhAsid {
                vmid: VMID,
                asid: 1,
            },
            1,
        ),
        // NH_VA of another ASID removes the global entries of the page (both stages).
        (
            Cmd::TlbiNhVa {
                vmid: VMID,
                asid: 7,
                addr: va(0x1000),
            },
            2,
        ),
        // ... and not another ASID's non-global entry.
        (
            Cmd::TlbiNhVa {
                vmid: VMID,
                asid: 7,
                addr: va(0x2000),
            },
            0,
        ),
        (
            Cmd::TlbiNhVa {
                vmid: VMID,
                asid: 1,
                addr: va(0x2000),
            },
            1,
        ),
        (
            Cmd::TlbiNhVaa {
                vmid: VMID,
                addr: va(0x1000),
            },
            2,
        ),
        (Cmd::TlbiNhAll { vmid: VMID }, 3),
        (
            Cmd::TlbiNhVa {
                vmid: VMID + 1,
                asid: 1,
                addr: va(0x1000),
            },
            0,
        ),
    ];
    for (cmd, removed) in cases {
        let mut tlb = fresh();
        assert_eq!(tlb.invalidate(&cmd), removed, "{cmd:?}");
    }
    let mut tlb = fresh();
    tlb.invalidate(&Cmd::TlbiNhAsid {
        vmid: VMID,
        asid: 1,
    });
    assert!(tlb.lookup(VMID, as_of(1), false, 0x1000).is_some());
}

/// Through the model: a page mapped global by one CD serves a second CD with another ASID
/// over the same tables from the TLB; strict mode names TLBI_NH_VA when it goes stale and
/// TLBI_NH_ASID of either ASID does not cure it.
#[test]
fn global_page_serves_another_asid_until_nh_va() {
    let mut rig = Rig::new();
    let (mut b, _) = rig.stage1(SID);
    // CD 1: the same tables, ASID 6.
    let cd1 = ContextDescriptor::new(TTB0, 16, ASID + 1);
    rig.write_words(CD_TABLE + 64, &cd1.encode());
    rig.map(&mut b, 0x1000, 0x40_0000, D::AF | D::AP_EL0);
    assert_eq!(rig.read(SID, Some(0), 0x1010), Ok(0x40_0010));
    let other = rig
        .smmu
        .translate(SID, Some(1), 0x1010, AccessRequest::READ)
        .unwrap();
    assert!(other.tlb_hit, "the global entry serves ASID {}", ASID + 1);
    rig.remap(&mut b, 0x1000, 0x50_0000, D::AF | D::AP_EL0);
    for asid in [ASID, ASID + 1] {
        rig.submit(&[Cmd::TlbiNhAsid { vmid: 0, asid }]);
        assert_eq!(rig.read(SID, Some(1), 0x1010), Ok(0x40_0010));
        assert_eq!(rig.missing().len(), 1);
    }
    rig.submit(&[Cmd::TlbiNhVa {
        vmid: 0,
        asid: ASID + 1,
        addr: va_operand(0x1000),
    }]);
    assert_eq!(rig.read(SID, Some(0), 0x1010), Ok(0x50_0010));
    assert!(rig.missing().is_empty());
}

/// The stage-1 walk cache: after a walk, a table descriptor above the leaf changes (the
/// level-2 entry now points to a new level-3 table). A walk of another page under it starts
/// from the cached level-3 table and finds the old page; strict mode names CMD_TLBI_NH_VA
/// without the Leaf hint. Each command that must remove the entry does, the others (Leaf
/// set, another ASID, VMID or span, stage 2, configuration) do not.
#[test]
fn stage1_walk_cache_entry_survives_until_a_non_leaf_tlbi() {
    let right = |leaf| Cmd::TlbiNhVa {
        vmid: 0,
        asid: ASID,
        addr: TlbiAddr {
            leaf,
            ..va_operand(0x2000)
        },
    };
    let cures = [
        right(false),
        Cmd::TlbiNhVaa {
            vmid: 0,
            addr: TlbiAddr {
                leaf: false,
                ..va_operand(0x1f_f000)
            },
        },
        Cmd::TlbiNhAsid {
            vmid: 0,
            asid: ASID,
        },
        Cmd::TlbiNhAll { vmid: 0 },
        Cmd::TlbiS12Vmall { vmid: 0 },
        Cmd::TlbiNsnhAll,
    ];
    let keeps = [
        right(true),
        Cmd::TlbiNhVaa {
            vmid: 0,
            addr: va_operand(0x2000),
        },
        Cmd::TlbiNhVa {
            vmid: 0,
            asid: ASID + 1,
            addr: TlbiAddr {
                leaf: false,
                ..va_operand(0x2000)
            },
        },
        Cmd::TlbiNhVa {
            vmid: 1,
            asid: ASID,
            addr: TlbiAddr {
                leaf: false,
                ..va_operand(0x2000)
            },
        },
        // Another 2 MiB span: not the cached level-3 table's.
        Cmd::TlbiNhVa {
            vmid: 0,
            asid: ASID,
            addr: TlbiAddr {
                leaf: false,
                ..va_operand(0x20_0000)
            },
        },
        Cmd::TlbiS2Ipa {
            vmid: 0,
            addr: TlbiAddr {
                leaf: false,
                ..va_operand(0x2000)
            },
        },
        Cmd::CfgiCdAll { sid: SID },
    ];
    for (i, cmd) in cures.iter().enumerate() {
        let mut rig = Rig::new();
        let (mut b, _) = rig.stage1(SID);
        rig.map(&mut b, 0x1000, 0x40_0000, RW_EL0);
        rig.map(&mut b, 0x2000, 0x41_0000, RW_EL0);
        assert_eq!(rig.read(SID, None, 0x1000), Ok(0x40_0000));
        // A new level-3 table for the first 2 MiB, mapping 0x2000 elsewhere.
        let l3 = rig.frame();
        let slot = b.descriptor_address(&*rig.mem, 0x2000, 2).unwrap().unwrap();
        rig.mem
            .write_u64(l3 + 2 * 8, D::leaf(0x42_0000, PageSize::Size4K, RW_EL0).0)
            .unwrap();
        rig.mem.write_u64(slot, D::table(l3, 0).0).unwrap();
        if i == 0 {
            for wrong in keeps {
                rig.submit(&[wrong]);
                assert_eq!(rig.read(SID, None, 0x2000), Ok(0x41_0000), "{wrong:?}");
                assert_eq!(rig.missing(), [right(false)], "{wrong:?}");
                // The walk cached the page: drop it so the next read walks again.
                rig.submit(&[right(true)]);
            }
        } else {
            assert_eq!(rig.read(SID, None, 0x2000), Ok(0x41_0000));
            assert_eq!(rig.missing(), [right(false)]);
            rig.submit(&[right(true)]);
        }
        rig.submit(&[*cmd]);
        assert_eq!(rig.read(SID, None, 0x2000), Ok(0x42_0000), "{cmd:?}");
        assert!(rig.missing().is_empty(), "{cmd:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// With the TLB and the stage-1 walk cache in play, every translation of unchanging
    /// tables equals a walk of the tables from the top, and strict mode finds nothing; after
    /// one level-3 table is replaced under its level-2 descriptor and TLBI_NH_VA without
    /// the Leaf hint is issued for its span, translations follow the new table.
    #[test]
    fn cached_walks_equal_walks_from_the_top(
        pages in proptest::collection::vec((0u64..3, 0u64..16, 0u64..64), 1..12),
        probes in proptest::collection::vec((0u64..3, 0u64..16, 0u64..0x1000), 1..24),
        replace in 0usize..12,
    ) {
        let mut rig = Rig::new();
        let (mut b, s1) = rig.stage1(SID);
        // Pages in three 2 MiB spans of two 1 GiB regions.
        let va_of = |r: u64, p: u64| [0, 0x20_0000, 0x4000_0000][r as usize] + p * 0x1000;
        let mut mapped = Vec::new();
        for &(r, p, frame) in &pages {
            let va = va_of(r, p);
            if !mapped.contains(&va) {
                rig.map(&mut b, va, 0x80_0000 + frame * 0x1000, RW_EL0);
                mapped.push(va);
            }
        }
        let check = |rig: &Rig| -> Result<(), TestCaseError> {
            for &(r, p, off) in &probes {
                let va = va_of(r, p) + (off & !7);
                let model = rig.read(SID, None, va).ok();
                let tables = vsva_smmuv3::walk::walk_stage1(&*rig.mem, &s1, va, AccessRequest::READ, &mut ())
                    .ok()
                    .map(|t| t.output);
                prop_assert_eq!(model, tables, "va {:#x}", va);
            }
            prop_assert!(rig.smmu.take_stale().is_empty());
            Ok(())
        };
        check(&rig)?;
        check(&rig)?;
        // A new level-3 table for the span of one mapped page, mapping it elsewhere.
        let va = mapped[replace % mapped.len()];
        let l3 = rig.frame();
        let slot = b.descriptor_address(&*rig.mem, va, 2).unwrap().unwrap();
        let index = (va >> 12) & 0x1ff;
        rig.mem
            .write_u64(l3 + index * 8, D::leaf(0x70_0000, PageSize::Size4K, RW_EL0).0)
            .unwrap();
        rig.mem.write_u64(slot, D::table(l3, 0).0).unwrap();
        rig.submit(&[Cmd::TlbiNhVa {
            vmid: 0,
            asid: ASID,
            addr: TlbiAddr {
                leaf: false,
                ..va_operand(va)
            },
        }]);
        // The TLB entries of the span's other pages are still there (NH_VA names one
        // page): drop them with the Leaf hint, which leaves the walk cache alone.
        for &other in mapped.iter().filter(|&&o| o >> 21 == va >> 21) {
            rig.submit(&[Cmd::TlbiNhVa {
                vmid: 0,
                asid: ASID,
                addr: va_operand(other),
            }]);
        }
        prop_assert_eq!(rig.read(SID, None, va), Ok(0x70_0000));
        check(&rig)?;
    }
}

/// A stage-2-only stream (VMID 3) whose IPAs 0x1000 and 0x2000 map through one level-3
/// stage-2 table; returns the stage-2 builder.
fn stage2_stream(rig: &mut Rig) -> TableBuilder {
    let s2 = S2Config::new(S2TTB, 25, 1, AddressSize::Bits48, S2Flags::default()).unwrap();
    let mut b2 = TableBuilder::stage2(&s2);
    rig.map(&mut b2, 0x1000, 0x40_0000, S2_RW);
    rig.map(&mut b2, 0x2000, 0x41_0000, S2_RW);
    rig.write_ste(
        SID,
        &Ste {
            s2vmid: VMID,
            s2t0sz: 25,
            s2sl0: 1,
            s2ps: AddressSize::Bits48,
            s2ttb: S2TTB,
            ..Ste::new(Config::S2Trans)
        },
    );
    b2
}

/// Replaces the level-3 stage-2 table of the first 2 MiB of IPA by one mapping IPA 0x2000
/// to PA 0x42_0000.
fn replace_stage2_table(rig: &mut Rig, b2: &TableBuilder) {
    let l3 = rig.frame();
    let slot = b2
        .descriptor_address(&*rig.mem, 0x2000, 2)
        .unwrap()
        .unwrap();
    rig.mem
        .write_u64(l3 + 2 * 8, D::leaf(0x42_0000, PageSize::Size4K, S2_RW).0)
        .unwrap();
    rig.mem.write_u64(slot, D::table(l3, 0).0).unwrap();
}

#[test]
fn stage2_walk_cache_entry_survives_until_a_non_leaf_s2_ipa() {
    let ipa = |addr, leaf| TlbiAddr {
        leaf,
        ..va_operand(addr)
    };
    let right = |leaf| Cmd::TlbiS2Ipa {
        vmid: VMID,
        addr: ipa(0x2000, leaf),
    };
    let cures = [
        right(false),
        Cmd::TlbiS12Vmall { vmid: VMID },
        Cmd::TlbiNsnhAll,
    ];
    let keeps = [
        right(true),
        Cmd::TlbiS2Ipa {
            vmid: VMID + 1,
            addr: ipa(0x2000, false),
        },
        // Another 2 MiB span: not the cached level-3 table's.
        Cmd::TlbiS2Ipa {
            vmid: VMID,
            addr: ipa(0x20_0000, false),
        },
        Cmd::TlbiS12Vmall { vmid: VMID + 1 },
        Cmd::TlbiNhAll { vmid: VMID },
        Cmd::TlbiNhVaa {
            vmid: VMID,
            addr: ipa(0x2000, false),
        },
        Cmd::CfgiSte {
            sid: SID,
            leaf: false,
        },
    ];
    for (i, cmd) in cures.iter().enumerate() {
        let mut rig = Rig::new();
        let b2 = stage2_stream(&mut rig);
        assert_eq!(rig.read(SID, None, 0x1010), Ok(0x40_0010));
        assert_eq!(rig.smmu.lock().s2_walk_cache.len(), 2);
        replace_stage2_table(&mut rig, &b2);
        let stale = |rig: &Rig| {
            assert_eq!(rig.read(SID, None, 0x2000), Ok(0x41_0000));
            let found = rig.smmu.take_stale();
            assert_eq!(found.len(), 1);
            assert!(
                matches!(found[0].kind, StaleKind::S2WalkCache { ipa: 0x2000, .. }),
                "{}",
                found[0]
            );
            assert_eq!(found[0].missing, right(false));
            // The walk cached the page: drop it so the next read walks again.
            rig.submit(&[right(true)]);
        };
        if i == 0 {
            for wrong in keeps {
                rig.submit(&[wrong]);
                stale(&rig);
            }
        } else {
            stale(&rig);
        }
        rig.submit(&[*cmd]);
        assert_eq!(rig.read(SID, None, 0x2000), Ok(0x42_0000), "{cmd:?}");
        assert!(rig.missing().is_empty(), "{cmd:?}");
    }
}

#[test]
fn stage2_walk_cache_ranges_are_num_plus_one_times_two_to_the_scale_pages() {
    let mut rig = Rig::new();
    let mut b2 = stage2_stream(&mut rig);
    rig.map(&mut b2, 0x4000_1000, 0x43_0000, S2_RW);
    assert_eq!(rig.read(SID, None, 0x1010), Ok(0x40_0010));
    assert_eq!(rig.read(SID, None, 0x4000_1010), Ok(0x43_0010));
    let range = |addr, num, scale| Cmd::TlbiS2Ipa {
        vmid: VMID,
        addr: TlbiAddr {
            addr,
            leaf: false,
            tg: 1,
            num,
            scale,
            ..TlbiAddr::default()
        },
    };
    let mut state = rig.smmu.lock();
    let cache = &mut state.s2_walk_cache;
    // Entries: the level-2 tables of IPA [0, 1 GiB) and [1 GiB, 2 GiB), the level-3
    // tables of their first 2 MiB.
    assert_eq!(cache.len(), 4);
    // (NUM + 1) * 2^SCALE = 3 * 2^1 pages from 1 GiB - 24 KiB end at 1 GiB: only the
    // first level-2 table's span.
    assert_eq!(cache.invalidate(&range(0x4000_0000 - 0x6000, 2, 1)), 1);
    // 2^9 pages from 1 GiB + 2 MiB reach the second level-2 table's span only.
    assert_eq!(cache.invalidate(&range(0x4020_0000, 0, 9)), 1);
    // One page just below 2 MiB is in the first level-3 table's span.
    assert_eq!(cache.invalidate(&range(0x1f_f000, 0, 0)), 1);
    assert_eq!(cache.invalidate(&range(0x3fff_f000, 0, 0)), 0);
    assert_eq!(cache.invalidate(&range(0x4000_0000, 0, 0)), 1);
    assert!(cache.is_empty());
}

#[test]
fn nested_stage1_table_walks_use_the_stage2_walk_cache() {
    let mut rig = Rig::new();
    let f = Features::VSVA;
    let s2 = S2Config::new(S2TTB, 25, 1, AddressSize::Bits48, S2Flags::default()).unwrap();
    let mut b2 = TableBuilder::stage2(&s2);
    let ipa = |pa: u64| 0x8000_0000 + pa - 0x80_0000;
    for i in 0..16 {
        rig.map(
            &mut b2,
            ipa(0x80_0000 + i * 0x1000),
            0x80_0000 + i * 0x1000,
            S2_RW,
        );
    }
    let cd = ContextDescriptor::new(ipa(0x80_1000), 16, ASID);
    rig.write_words(0x80_0000, &cd.encode());
    rig.write_ste(
        SID,
        &Ste {
            s1_context_ptr: ipa(0x80_0000),
            s2vmid: VMID,
            s2t0sz: 25,
            s2sl0: 1,
            s2ps: AddressSize::Bits48,
            s2ttb: S2TTB,
            ..Ste::new(Config::Nested)
        },
    );
    let s1 = cd.s1_config(&f).unwrap();
    let guest_mem = rig.mem.clone();
    let guest = GuestView(&guest_mem);
    let mut b1 = TableBuilder::stage1(&s1);
    let mut frames = (2..8)
        .map(|i| ipa(0x80_0000 + i * 0x1000))
        .rev()
        .collect::<Vec<_>>();
    let mut alloc = || frames.pop();
    for (va, page) in [(0x7f00_0000, 0x80_9000), (0x7f00_1000, 0x80_a000)] {
        b1.map(&guest, &mut alloc, va, ipa(page), PageSize::Size4K, RW_EL0)
            .unwrap();
    }
    assert_eq!(rig.read(SID, None, 0x7f00_0010), Ok(0x80_9010));
    // Every stage-2 walk (four stage-1 tables, the output) went through the level-1
    // table of IPA 0x8000_0000 and its level-2 table: one walk-cache entry each.
    assert_eq!(rig.smmu.lock().s2_walk_cache.len(), 2);
    // The host moves the guest's level-3 stage-1 table to another frame and changes stage 2
    // by a new level-3 stage-2 table (a copy that maps that IPA to the new frame).
    let l3_ipa = b1
        .descriptor_address(&guest, 0x7f00_1000, 3)
        .unwrap()
        .unwrap()
        & !0xfff;
    let moved = rig.frame();
    let mut page = [0u8; 4096];
    rig.mem.read(GuestView::pa(l3_ipa), &mut page).unwrap();
    rig.mem.write(moved, &page).unwrap();
    // The moved table maps 0x7f00_1000 to another guest page (IPA of PA 0x80_b000).
    rig.mem
        .write_u64(
            moved + 8,
            D::leaf(ipa(0x80_b000), PageSize::Size4K, RW_EL0).0,
        )
        .unwrap();
    let s2_l3 = rig.frame();
    let slot = b2
        .descriptor_address(&*rig.mem, l3_ipa, 2)
        .unwrap()
        .unwrap();
    let old_l3 = D(rig.mem.read_u64(slot).unwrap()).address(s2.format());
    for i in 0..512 {
        let d = rig.mem.read_u64(old_l3 + i * 8).unwrap();
        rig.mem.write_u64(s2_l3 + i * 8, d).unwrap();
    }
    let index = (l3_ipa >> 12) & 0x1ff;
    rig.mem
        .write_u64(s2_l3 + index * 8, D::leaf(moved, PageSize::Size4K, S2_RW).0)
        .unwrap();
    rig.mem.write_u64(slot, D::table(s2_l3, 0).0).unwrap();
    // The stage-1 walk cache holds the level-3 table (an IPA) and the TLB nothing for
    // 0x7f00_1000: the stage-2 walk of that table's IPA uses the stale level-3 stage-2
    // table, which still leads to the old frame.
    assert_eq!(rig.read(SID, None, 0x7f00_1010), Ok(0x80_a010));
    let found = rig.smmu.take_stale();
    assert_eq!(found.len(), 1, "{found:?}");
    let StaleKind::S2WalkCache { ipa: at, addr, .. } = found[0].kind else {
        panic!("{}", found[0]);
    };
    assert_eq!((at, addr), (l3_ipa + 8, 0x7f00_1010));
    let cure = Cmd::TlbiS2Ipa {
        vmid: VMID,
        addr: TlbiAddr {
            leaf: false,
            ..va_operand(l3_ipa)
        },
    };
    assert_eq!(found[0].missing, cure);
    // A CMD_TLBI_NH_* leaves stage-2 walk-cache entries: NH_VA drops the combined entry,
    // and the walk reaches the stale table again.
    let nh_va = Cmd::TlbiNhVa {
        vmid: VMID,
        asid: ASID,
        addr: va_operand(0x7f00_1000),
    };
    rig.submit(&[nh_va]);
    assert_eq!(rig.read(SID, None, 0x7f00_1010), Ok(0x80_a010));
    assert_eq!(rig.missing(), [cure]);
    rig.submit(&[cure, nh_va]);
    assert_eq!(rig.read(SID, None, 0x7f00_1010), Ok(0x80_b010));
    assert!(rig.missing().is_empty());
}

/// A CD fetch's stage-2 walk goes through the stage-2 walk cache (§16.2: a walk-cache
/// entry serves every stage-2 walk of its VMID, CD fetches included): after the host
/// replaces the level-3 stage-2 table under the CD table's IPA, the refetched CD still
/// comes from the old frame until a CMD_TLBI_S2_IPA without the Leaf hint (or one of
/// wider scope) removes the entry; CMD_CFGI_CD alone, or the TLBI with Leaf = 1, does
/// not. Strict mode names the missing command.
#[test]
fn cd_fetches_walk_stage2_through_the_stage2_walk_cache() {
    let ipa = |pa: u64| 0x8000_0000 + pa - 0x80_0000;
    let s2 = S2Config::new(S2TTB, 25, 1, AddressSize::Bits48, S2Flags::default()).unwrap();
    let cd_ipa = ipa(0x80_0000);
    let s2_ipa = |leaf| Cmd::TlbiS2Ipa {
        vmid: VMID,
        addr: TlbiAddr {
            leaf,
            ..va_operand(cd_ipa)
        },
    };
    let cfgi = Cmd::CfgiCd {
        sid: SID,
        ssid: 0,
        leaf: true,
    };
    // Two CDs of the guest: the one at the CD table's frame, and its copy in another frame
    // whose ASID differs (so the TLB never mixes their translations).
    let old_cd = ContextDescriptor::new(ipa(0x80_1000), 16, ASID);
    let new_cd = ContextDescriptor::new(ipa(0x80_1000), 16, ASID + 1);
    let setup = || {
        let mut rig = Rig::new();
        let mut b2 = TableBuilder::stage2(&s2);
        for i in 0..16 {
            let pa = 0x80_0000 + i * 0x1000;
            rig.map(&mut b2, ipa(pa), pa, S2_RW);
        }
        rig.write_words(0x80_0000, &old_cd.encode());
        rig.write_ste(
            SID,
            &Ste {
                s1_context_ptr: cd_ipa,
                s2vmid: VMID,
                s2t0sz: 25,
                s2sl0: 1,
                s2ps: AddressSize::Bits48,
                s2ttb: S2TTB,
                ..Ste::new(Config::Nested)
            },
        );
        // The first transaction fetches the CD: no stage-1 table is mapped, so it faults
        // at stage 1 after the fetch, which cached the stage-2 tables of the CD's IPA.
        assert!(matches!(
            rig.read(SID, None, 0x7f00_0000),
            Err(SmmuFault::Event { event, .. }) if event.event_type == EventType::Translation
        ));
        assert_eq!(rig.smmu.lock().config.cds(), 1);
        assert_eq!(rig.smmu.lock().s2_walk_cache.len(), 2);
        assert!(rig.missing().is_empty());
        // The host moves the CD table's IPA to another frame through a new level-3
        // stage-2 table; the frame holds the other CD.
        let moved = rig.frame();
        rig.write_words(moved, &new_cd.encode());
        let slot = b2
            .descriptor_address(&*rig.mem, cd_ipa, 2)
            .unwrap()
            .unwrap();
        let old_l3 = D(rig.mem.read_u64(slot).unwrap()).address(s2.format());
        let l3 = rig.frame();
        for i in 0..512 {
            let d = rig.mem.read_u64(old_l3 + i * 8).unwrap();
            rig.mem.write_u64(l3 + i * 8, d).unwrap();
        }
        let index = (cd_ipa >> 12) & 0x1ff;
        rig.mem
            .write_u64(l3 + index * 8, D::leaf(moved, PageSize::Size4K, S2_RW).0)
            .unwrap();
        rig.mem.write_u64(slot, D::table(l3, 0).0).unwrap();
        rig
    };
    let fetched_asid = |rig: &Rig| {
        let _ = rig.read(SID, None, 0x7f00_0000);
        let state = rig.smmu.lock();
        state.config.cd(SID, 0).map(|c| c.cd.asid)
    };
    // CMD_CFGI_CD drops the cached CD, but the refetch's stage-2 walk starts from the
    // cached level-3 table: the old CD, and strict mode names the missing TLBI.
    for keep in [
        vec![cfgi],
        vec![s2_ipa(true), cfgi],
        vec![Cmd::TlbiNhAll { vmid: VMID }, cfgi],
        vec![Cmd::TlbiS12Vmall { vmid: VMID + 1 }, cfgi],
    ] {
        let rig = setup();
        rig.submit(&keep);
        assert_eq!(fetched_asid(&rig), Some(ASID), "{keep:?}");
        let found = rig.smmu.take_stale();
        assert_eq!(found.len(), 1, "{keep:?}: {found:?}");
        let StaleKind::S2WalkCache { ipa: at, addr, .. } = found[0].kind else {
            panic!("{}", found[0]);
        };
        assert_eq!((at, addr), (cd_ipa, 0x7f00_0000));
        assert_eq!(found[0].missing, s2_ipa(false));
    }
    // The entry removed, the refetch walks from S2TTB and finds the new CD.
    for cure in [
        s2_ipa(false),
        Cmd::TlbiS12Vmall { vmid: VMID },
        Cmd::TlbiNsnhAll,
    ] {
        let rig = setup();
        rig.submit(&[cure, cfgi]);
        assert_eq!(fetched_asid(&rig), Some(ASID + 1), "{cure:?}");
        assert!(rig.missing().is_empty(), "{cure:?}");
    }
    // Without CMD_CFGI_CD the configuration cache keeps the old CD whatever the TLBI, and
    // strict mode names CMD_CFGI_CD.
    let rig = setup();
    rig.submit(&[s2_ipa(false)]);
    assert_eq!(fetched_asid(&rig), Some(ASID));
    let found = rig.smmu.take_stale();
    assert!(
        found.iter().any(|f| matches!(
            f.missing,
            Cmd::CfgiCd {
                sid: SID,
                ssid: 0,
                ..
            }
        )),
        "{found:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// With the TLB and the stage-2 walk cache in play, every translation of a stage-2-only
    /// stream over unchanging tables equals a walk of the tables from S2TTB, and strict mode
    /// finds nothing; after one level-3 table is replaced under its level-2 descriptor and
    /// CMD_TLBI_S2_IPA without the Leaf hint is issued for its span, translations follow
    /// the new table.
    #[test]
    fn cached_stage2_walks_equal_walks_from_the_top(
        pages in proptest::collection::vec((0u64..3, 0u64..16, 0u64..64), 1..12),
        probes in proptest::collection::vec((0u64..3, 0u64..16, 0u64..0x1000), 1..24),
        replace in 0usize..12,
    ) {
        let mut rig = Rig::new();
        let s2 = S2Config::new(S2TTB, 25, 1, AddressSize::Bits48, S2Flags::default()).unwrap();
        let mut b2 = TableBuilder::stage2(&s2);
        rig.write_ste(
            SID,
            &Ste {
                s2vmid: VMID,
                s2t0sz: 25,
                s2sl0: 1,
                s2ps: AddressSize::Bits48,
                s2ttb: S2TTB,
                ..Ste::new(Config::S2Trans)
            },
        );
        // Pages in three 2 MiB spans of two 1 GiB regions.
        let ipa_of = |r: u64, p: u64| [0, 0x20_0000, 0x4000_0000][r as usize] + p * 0x1000;
        let mut mapped = Vec::new();
        for &(r, p, frame) in &pages {
            let ipa = ipa_of(r, p);
            if !mapped.contains(&ipa) {
                rig.map(&mut b2, ipa, 0x80_0000 + frame * 0x1000, S2_RW);
                mapped.push(ipa);
            }
        }
        let check = |rig: &Rig| -> Result<(), TestCaseError> {
            for &(r, p, off) in &probes {
                let ipa = ipa_of(r, p) + (off & !7);
                let model = rig.read(SID, None, ipa).ok();
                let tables = vsva_smmuv3::walk::walk_stage2(&*rig.mem, &s2, ipa, AccessRequest::READ, &mut ())
                    .ok()
                    .map(|t| t.output);
                prop_assert_eq!(model, tables, "ipa {:#x}", ipa);
            }
            prop_assert!(rig.smmu.take_stale().is_empty());
            Ok(())
        };
        check(&rig)?;
        check(&rig)?;
        let ipa = mapped[replace % mapped.len()];
        let l3 = rig.frame();
        let slot = b2.descriptor_address(&*rig.mem, ipa, 2).unwrap().unwrap();
        let index = (ipa >> 12) & 0x1ff;
        rig.mem
            .write_u64(l3 + index * 8, D::leaf(0x70_0000, PageSize::Size4K, S2_RW).0)
            .unwrap();
        rig.mem.write_u64(slot, D::table(l3, 0).0).unwrap();
        rig.submit(&[Cmd::TlbiS2Ipa {
            vmid: VMID,
            addr: TlbiAddr {
                leaf: false,
                ..va_operand(ipa)
            },
        }]);
        // The TLB entries of the span's other pages are still there (S2_IPA names one
        // page): drop them with the Leaf hint, which leaves the walk cache alone.
        for &other in mapped.iter().filter(|&&o| o >> 21 == ipa >> 21) {
            rig.submit(&[Cmd::TlbiS2Ipa {
                vmid: VMID,
                addr: va_operand(other),
            }]);
        }
        prop_assert_eq!(rig.read(SID, None, ipa), Ok(0x70_0000));
        check(&rig)?;
    }
}
