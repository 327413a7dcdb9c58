//! The driver against vsva's physical SMMUv3 model (strict mode: every cached entry the
//! driver failed to invalidate is reported).

use std::collections::BTreeMap;
use std::sync::Arc;
use vsva_mem::PhysMem;

use proptest::prelude::*;
use vsva_hw::memory::HostMemory;
use vsva_hw::smmuv3::{Smmu, SmmuConfig, SmmuFault};
use vsva_smmuv3::desc::Descriptor as D;
use vsva_smmuv3::regs::{cr0, offset};
use vsva_smmuv3::{
    builder::TableBuilder, cd::ContextDescriptor, event::EventType, features::Features,
    priq::PriqEntry, regs::RegError, ste::Config, ste::S1Dss, ste::Ste, walk::AccessRequest,
    walk::AddressSize, walk::PageSize, walk::S2Config, walk::S2Flags,
};

use super::*;

const RW_EL0: u64 = D::AF | D::AP_EL0 | D::NG;
const S2_RW: u64 = D::AF | D::S2AP_R | D::S2AP_W;

#[derive(Clone)]
struct Mmio(Arc<Smmu>);

impl Registers for Mmio {
    fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        self.0.mmio_read(offset, size)
    }
    fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
        self.0.mmio_write(offset, size, value)
    }
}

/// A bump allocator from 1 MiB that remembers what is live.
#[derive(Debug, Default)]
struct Bump {
    next: u64,
    live: BTreeMap<u64, u64>,
}

impl DmaAlloc for Bump {
    fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let at = self.next.max(1 << 20).next_multiple_of(align);
        self.next = at + size;
        (self.next <= 48 << 20).then(|| {
            self.live.insert(at, size);
            at
        })
    }
    fn free(&mut self, addr: u64, size: u64) {
        assert_eq!(self.live.remove(&addr), Some(size), "free of {addr:#x}");
    }
}

type Driver = SmmuDriver<Mmio, Arc<HostMemory>, Bump>;

struct Rig {
    mem: Arc<HostMemory>,
    smmu: Arc<Smmu>,
    drv: Driver,
    next_frame: u64,
}

impl Rig {
    fn with(features: Features, cfg: DriverConfig) -> Rig {
        let mem = HostMemory::new(64 << 20).unwrap();
        let smmu = Arc::new(Smmu::new(
            mem.clone(),
            SmmuConfig {
                features,
                strict: true,
                ..SmmuConfig::default()
            },
        ));
        let drv = SmmuDriver::new(Mmio(smmu.clone()), mem.clone(), Bump::default(), cfg).unwrap();
        Rig {
            mem,
            smmu,
            drv,
            next_frame: 56 << 20,
        }
    }

    fn new() -> Rig {
        Rig::with(Features::VSVA, DriverConfig::default())
    }

    fn map(&mut self, b: &mut TableBuilder, va: u64, pa: u64, attrs: u64) {
        let mut frames: Vec<u64> = (0..4)
            .map(|_| {
                self.next_frame += 0x1000;
                self.next_frame - 0x1000
            })
            .collect();
        let mut alloc = || frames.pop();
        b.map(&*self.mem, &mut alloc, va, pa, PageSize::Size4K, attrs)
            .unwrap();
    }

    fn read(&self, sid: u32, ssid: Option<u32>, va: u64) -> Result<u64, SmmuFault> {
        self.smmu
            .translate(sid, ssid, va, AccessRequest::READ)
            .map(|t| t.output)
    }

    fn assert_fresh(&self) {
        assert_eq!(self.smmu.take_stale(), []);
    }
}

fn s2_ste(vmid: u16, s2ttb: u64) -> Ste {
    Ste {
        s2vmid: vmid,
        s2t0sz: 25,
        s2sl0: 1,
        s2ps: AddressSize::Bits48,
        s2ttb,
        s2r: true,
        ..Ste::new(Config::S2Trans)
    }
}

fn s2_config(s2ttb: u64) -> S2Config {
    S2Config::new(s2ttb, 25, 1, AddressSize::Bits48, S2Flags::default()).unwrap()
}

#[test]
fn probe_reads_the_id_registers() {
    let rig = Rig::new();
    let caps = probe(rig.drv.registers()).unwrap();
    assert_eq!(caps.features, Features::VSVA);
    assert!(caps.two_level_strtab);
    assert_eq!(caps.queue_log2, [8, 8, 8]);
}

#[test]
fn reset_enables_everything_and_streams_abort() {
    for strtab in [StrtabFormat::Linear, StrtabFormat::TwoLevel] {
        let cfg = DriverConfig {
            strtab: Some(strtab),
            ..DriverConfig::default()
        };
        let rig = Rig::with(Features::VSVA, cfg);
        let ack = rig.smmu.mmio_read(offset::CR0ACK, 4).unwrap() as u32;
        let all = cr0::SMMUEN | cr0::CMDQEN | cr0::EVENTQEN | cr0::PRIQEN | cr0::ATSCHK;
        assert_eq!(ack, all, "{strtab:?}");
        // A linear table's STEs abort; a 2-level table has no level-2 table yet.
        let fault = rig.read(5, None, 0x1000).unwrap_err();
        match strtab {
            StrtabFormat::Linear => assert_eq!(fault, SmmuFault::Abort),
            StrtabFormat::TwoLevel => assert!(matches!(
                fault,
                SmmuFault::Event { event, .. } if event.event_type == EventType::BadStreamId
            )),
        }
        assert_eq!(
            rig.drv.read_ste(5).unwrap().is_some(),
            strtab == StrtabFormat::Linear
        );
    }
}

#[test]
fn stage2_ste_translates_and_tlbi_range_removes_stale_entries() {
    let mut rig = Rig::new();
    let s2ttb = 0x30_0000;
    let mut b2 = TableBuilder::stage2(&s2_config(s2ttb));
    rig.map(&mut b2, 0x3000, 0x70_0000, S2_RW);
    rig.drv.write_ste(0x123, Some(&s2_ste(7, s2ttb))).unwrap();
    // The level-2 table was made; its other STEs abort.
    assert_eq!(rig.read(0x124, None, 0x3000), Err(SmmuFault::Abort));
    assert_eq!(rig.read(0x123, None, 0x3010), Ok(0x70_0010));
    b2.unmap(&*rig.mem, 0x3000, PageSize::Size4K).unwrap();
    rig.map(&mut b2, 0x3000, 0x71_0000, S2_RW);
    // The TLB still holds the old page; strict mode reports it.
    assert_eq!(rig.read(0x123, None, 0x3010), Ok(0x70_0010));
    assert_eq!(rig.smmu.take_stale().len(), 1);
    rig.drv
        .tlbi_range(TlbiStage::Stage2 { vmid: 7 }, 0x3000, 0x1000, 0x1000, true)
        .unwrap();
    assert_eq!(rig.read(0x123, None, 0x3010), Ok(0x71_0010));
    rig.assert_fresh();
}

#[test]
fn ste_transitions_leave_no_stale_configuration() {
    let mut rig = Rig::new();
    let sid = 9;
    let f = *rig.drv.features();
    // Stage 2 maps each page used (data, CD table, stage-1 tables) at IPA = PA.
    let s2ttb = 0x30_0000;
    let mut b2 = TableBuilder::stage2(&s2_config(s2ttb));
    for pa in [0x70_0000u64, 0x71_0000] {
        rig.map(&mut b2, pa, pa, S2_RW);
    }
    let mut cds = rig.drv.alloc_cd_table(4).unwrap();
    let cd_page = cds.base() & !0xfff;
    rig.map(&mut b2, cd_page, cd_page, S2_RW);
    let ttb0 = 0x71_0000;
    let s1 = ContextDescriptor::new(ttb0, 16, 3).s1_config(&f).unwrap();
    let mut b1 = TableBuilder::stage1(&s1);
    // Stage-1 tables at PAs the stage 2 maps one to one.
    let mut frames = vec![0x71_3000u64, 0x71_2000, 0x71_1000];
    for pa in [0x71_1000u64, 0x71_2000, 0x71_3000] {
        rig.map(&mut b2, pa, pa, S2_RW);
    }
    let mut alloc = || frames.pop();
    b1.map(
        &*rig.mem,
        &mut alloc,
        0x40_0000,
        0x70_0000,
        PageSize::Size4K,
        RW_EL0,
    )
    .unwrap();
    rig.drv
        .write_cd(
            &mut cds,
            &[sid],
            1,
            Some(&ContextDescriptor::new(ttb0, 16, 3)),
        )
        .unwrap();
    // Stage 2 alone, then nested over the same stage 2, then stage 2 again, then abort.
    let s2 = s2_ste(4, s2ttb);
    rig.drv.write_ste(sid, Some(&s2)).unwrap();
    assert_eq!(rig.read(sid, None, 0x70_0008), Ok(0x70_0008));
    let nested = Ste {
        config: Config::Nested,
        s1_context_ptr: cds.base(),
        s1cdmax: cds.s1cdmax(),
        s1fmt: cds.s1fmt(),
        s1dss: S1Dss::Bypass,
        ..s2
    };
    rig.drv.write_ste(sid, Some(&nested)).unwrap();
    assert_eq!(rig.read(sid, Some(1), 0x40_0008), Ok(0x70_0008));
    assert_eq!(rig.read(sid, None, 0x70_0008), Ok(0x70_0008));
    rig.assert_fresh();
    rig.drv.write_ste(sid, Some(&s2)).unwrap();
    assert!(rig.read(sid, Some(1), 0x40_0008).is_err());
    rig.assert_fresh();
    rig.drv.write_ste(sid, None).unwrap();
    assert_eq!(rig.read(sid, None, 0x70_0008), Err(SmmuFault::Abort));
    rig.assert_fresh();
    rig.drv.free_cd_table(cds);
}

#[test]
fn cd_updates_and_asid_invalidation() {
    let mut rig = Rig::new();
    let sid = 2;
    let f = *rig.drv.features();
    // A 2-level CD table (4096 SubstreamIDs) and a stage-1-only stream.
    let mut cds = rig.drv.alloc_cd_table(12).unwrap();
    assert_eq!(cds.s1fmt(), vsva_smmuv3::ste::S1Fmt::TwoLevel64K);
    let ttb0 = 0x60_0000;
    let cd = ContextDescriptor::new(ttb0, 16, 0x42);
    let mut b1 = TableBuilder::stage1(&cd.s1_config(&f).unwrap());
    rig.map(&mut b1, 0x1000, 0x70_0000, RW_EL0);
    let ste = Ste {
        s1_context_ptr: cds.base(),
        s1cdmax: cds.s1cdmax(),
        s1fmt: cds.s1fmt(),
        ..Ste::new(Config::S1Trans)
    };
    rig.drv.write_ste(sid, Some(&ste)).unwrap();
    rig.drv.write_cd(&mut cds, &[sid], 3000, Some(&cd)).unwrap();
    assert!(cds.cd_address(3000).is_some() && cds.cd_address(10).is_none());
    assert_eq!(rig.read(sid, Some(3000), 0x1008), Ok(0x70_0008));
    // A new ASID for the live CD: word 0 alone, then the old ASID's entries go.
    let cd2 = ContextDescriptor { asid: 0x43, ..cd };
    rig.drv
        .write_cd(&mut cds, &[sid], 3000, Some(&cd2))
        .unwrap();
    rig.drv.tlbi_asid(0, 0x42).unwrap();
    assert_eq!(rig.read(sid, Some(3000), 0x1008), Ok(0x70_0008));
    rig.assert_fresh();
    b1.unmap(&*rig.mem, 0x1000, PageSize::Size4K).unwrap();
    rig.map(&mut b1, 0x1000, 0x71_0000, RW_EL0);
    rig.drv
        .tlbi_range(
            TlbiStage::Stage1 {
                vmid: 0,
                asid: 0x43,
            },
            0x1000,
            0x1000,
            0x1000,
            true,
        )
        .unwrap();
    assert_eq!(rig.read(sid, Some(3000), 0x1008), Ok(0x71_0008));
    // Removing the CD.
    rig.drv.write_cd(&mut cds, &[sid], 3000, None).unwrap();
    rig.drv.tlbi_asid(0, 0x43).unwrap();
    assert!(rig.read(sid, Some(3000), 0x1008).is_err());
    rig.assert_fresh();
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut rig = Rig::new();
    let sid = 4;
    rig.drv.write_ste(sid, Some(&s2_ste(1, 0x30_0000))).unwrap();
    let before = rig.drv.read_ste(sid).unwrap();
    let prod = rig.smmu.mmio_read(offset::CMDQ_PROD, 4).unwrap();
    // S1CDMax beyond SSIDSIZE, a stream beyond the table, a VMID-less illegal command.
    let bad = Ste {
        s1cdmax: 21,
        config: Config::Nested,
        ..s2_ste(1, 0x30_0000)
    };
    assert!(matches!(
        rig.drv.write_ste(sid, Some(&bad)),
        Err(Error::BadSte(_))
    ));
    assert_eq!(
        rig.drv.write_ste(1 << 16, None),
        Err(Error::BadStreamId(1 << 16))
    );
    let ill = vsva_smmuv3::cmd::Cmd::TlbiEl2All;
    assert_eq!(rig.drv.issue(&[ill]), Err(Error::IllegalCommand(ill)));
    let bad_cd = ContextDescriptor {
        t0sz: 70,
        ..ContextDescriptor::new(0x60_0000, 16, 1)
    };
    let mut cds = rig.drv.alloc_cd_table(2).unwrap();
    assert!(matches!(
        rig.drv.write_cd(&mut cds, &[sid], 1, Some(&bad_cd)),
        Err(Error::BadCd(_))
    ));
    assert_eq!(
        rig.drv.write_cd(&mut cds, &[sid], 4, None),
        Err(Error::BadSubstreamId(4))
    );
    assert_eq!(rig.drv.read_ste(sid).unwrap(), before);
    assert_eq!(rig.smmu.mmio_read(offset::CMDQ_PROD, 4).unwrap(), prod);
    assert_eq!(rig.mem.read_u64(cds.base() + 64).unwrap(), 0);
    rig.drv.free_cd_table(cds);
}

#[test]
fn event_queue_reports_faults_and_overflow() {
    let cfg = DriverConfig {
        queue_log2: [8, 1, 8],
        ..DriverConfig::default()
    };
    let mut rig = Rig::with(Features::VSVA, cfg);
    rig.drv.write_ste(6, Some(&s2_ste(2, 0x30_0000))).unwrap();
    let _ = rig.read(6, None, 0x5000);
    let drained = rig.drv.read_events().unwrap();
    assert!(!drained.overflowed);
    assert_eq!(drained.records.len(), 1);
    let e = drained.records[0];
    assert_eq!(
        (e.event_type, e.sid, e.input_addr),
        (EventType::Translation, 6, 0x5000)
    );
    // Three faults into a queue of two: one is lost and the overflow reported once.
    for a in [0x1000, 0x2000, 0x3000] {
        let _ = rig.read(6, None, a);
    }
    let drained = rig.drv.read_events().unwrap();
    assert!(drained.overflowed);
    assert_eq!(drained.records.len(), 2);
    let _ = rig.read(6, None, 0x4000);
    let drained = rig.drv.read_events().unwrap();
    assert!(!drained.overflowed);
    assert_eq!(drained.records.len(), 1);
}

#[test]
fn msis_are_programmed_and_enabled_for_each_source() {
    use std::sync::Mutex;
    use vsva_smmuv3::regs::{irq_ctrl, offset, Irq};
    let mut rig = Rig::new();
    let bell = 0x8_0000_0001_0040;
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    rig.smmu
        .set_msi_doorbell(bell, Arc::new(move |d| sink.lock().unwrap().push(d)));
    assert_eq!(rig.drv.irq_sources(), [Irq::Gerror, Irq::Eventq, Irq::Priq]);
    let enabled = rig.drv.enable_msis(bell, |irq| 0x20 + irq as u32).unwrap();
    let all = irq_ctrl::GERROR_IRQEN | irq_ctrl::EVENTQ_IRQEN | irq_ctrl::PRIQ_IRQEN;
    assert_eq!(enabled, all);
    let reg = |off| rig.smmu.mmio_read(off, 4).unwrap();
    assert_eq!(reg(offset::IRQ_CTRLACK), all as u64);
    assert_eq!(
        rig.smmu.mmio_read(offset::EVENTQ_IRQ_CFG0, 8).unwrap(),
        bell
    );
    assert_eq!(reg(offset::PRIQ_IRQ_CFG1), 0x22);
    assert_eq!(reg(offset::GERROR_IRQ_CFG2), 1);
    // A fault's event arrives as the event queue's MSI.
    rig.drv.write_ste(6, Some(&s2_ste(2, 0x30_0000))).unwrap();
    let _ = rig.read(6, None, 0x5000);
    assert_eq!(*got.lock().unwrap(), [0x21]);
    assert_eq!(rig.drv.read_events().unwrap().records.len(), 1);
    // Disabled: no MSI, no address left.
    rig.drv.disable_msis().unwrap();
    assert_eq!(reg(offset::IRQ_CTRLACK), 0);
    assert_eq!(rig.smmu.mmio_read(offset::EVENTQ_IRQ_CFG0, 8).unwrap(), 0);
    let _ = rig.read(6, None, 0x6000);
    assert_eq!(got.lock().unwrap().len(), 1);
    assert_eq!(rig.drv.read_events().unwrap().records.len(), 1);
    // Without PRI there is no PRI queue interrupt.
    let no_pri = Features {
        pri: false,
        ..Features::VSVA
    };
    let mut rig = Rig::with(no_pri, DriverConfig::default());
    assert_eq!(rig.drv.irq_sources(), [Irq::Gerror, Irq::Eventq]);
    assert_eq!(
        rig.drv.enable_msis(bell, |_| 0).unwrap(),
        irq_ctrl::GERROR_IRQEN | irq_ctrl::EVENTQ_IRQEN
    );
}

#[test]
fn pri_queue_delivers_page_requests() {
    let mut rig = Rig::new();
    let ste = Ste {
        eats: vsva_smmuv3::ste::Eats::Full,
        ..s2_ste(2, 0x30_0000)
    };
    rig.drv.write_ste(8, Some(&ste)).unwrap();
    let req = PriqEntry {
        sid: 8,
        ssid: Some(5),
        privileged: false,
        exec: false,
        read: true,
        write: true,
        last: true,
        prg_index: 17,
        addr: 0x7000,
    };
    rig.smmu.page_request(&req).unwrap();
    let drained = rig.drv.read_page_requests().unwrap();
    assert_eq!(drained.records, [req]);
    rig.drv
        .pri_resp(8, Some(5), 17, vsva_smmuv3::cmd::PriResp::Success)
        .unwrap();
    assert!(rig.drv.read_page_requests().unwrap().records.is_empty());
}

#[test]
fn atc_span_follows_linux() {
    // (iova, size) -> (address, log2 pages): the naturally aligned span covering the range.
    assert_eq!(device::atc_span(0x1000, 0x1000), (0x1000, 0));
    assert_eq!(device::atc_span(0x1000, 0x2000), (0, 2));
    assert_eq!(device::atc_span(0x7000, 0x2000), (0, 4));
    assert_eq!(device::atc_span(0x40_0000, 0x20_0000), (0x40_0000, 9));
    assert_eq!(device::atc_span(0, 0), (0, 52));
}

#[test]
fn shutdown_disables_and_gives_every_table_back() {
    let mut rig = Rig::new();
    rig.drv
        .write_ste(0x300, Some(&s2_ste(1, 0x30_0000)))
        .unwrap();
    assert!(rig.drv.footprint() > 0);
    let Rig { smmu, drv, .. } = rig;
    let alloc = drv.shutdown();
    assert!(alloc.live.is_empty(), "{:#x?}", alloc.live);
    assert_eq!(smmu.mmio_read(offset::CR0ACK, 4).unwrap(), 0);
}

/// What a stream is configured to in the property below.
#[derive(Clone, Copy, Debug)]
enum Target {
    Abort,
    Bypass,
    /// Stage 2 of VMID 1 or 2.
    Stage2(u16),
    /// Nested over the stage 2 of VMID 1 or 2.
    Nested(u16),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        Just(Target::Abort),
        Just(Target::Bypass),
        (1u16..3).prop_map(Target::Stage2),
        (1u16..3).prop_map(Target::Nested),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any sequence of STE updates on two streams, each followed by translations through
    /// the model: every transaction sees exactly the configuration last written, and strict
    /// mode finds no stale STE, CD or TLB entry (the update order and its invalidations
    /// leave nothing behind, whatever the old and new configurations).
    #[test]
    fn ste_updates_take_effect_whatever_the_transition(
        steps in proptest::collection::vec((0u32..2, target()), 1..14)
    ) {
        let mut rig = Rig::new();
        let f = *rig.drv.features();
        // Stage 2 of VMID v maps IPA 0x7000 to PA 0x70_0000 + v * 0x1_0000, and the CD
        // table and stage-1 tables at IPA = PA.
        let mut cds = rig.drv.alloc_cd_table(2).unwrap();
        let ttb0 = 0x71_0000;
        let cd = ContextDescriptor::new(ttb0, 16, 5);
        rig.drv.write_cd(&mut cds, &[], 1, Some(&cd)).unwrap();
        let mut b1 = TableBuilder::stage1(&cd.s1_config(&f).unwrap());
        let mut frames = vec![0x71_3000u64, 0x71_2000, 0x71_1000];
        let mut alloc = || frames.pop();
        b1.map(&*rig.mem, &mut alloc, 0x40_0000, 0x7000, PageSize::Size4K, RW_EL0).unwrap();
        let mut stes = [None; 3];
        for vmid in 1u16..3 {
            let s2ttb = 0x30_0000 + vmid as u64 * 0x1_0000;
            let mut b2 = TableBuilder::stage2(&s2_config(s2ttb));
            rig.map(&mut b2, 0x7000, 0x70_0000 + vmid as u64 * 0x1_0000, S2_RW);
            for pa in [cds.base() & !0xfff, ttb0, 0x71_1000, 0x71_2000, 0x71_3000] {
                rig.map(&mut b2, pa, pa, S2_RW);
            }
            stes[vmid as usize] = Some(s2_ste(vmid, s2ttb));
        }
        for (sid, t) in steps {
            let ste = match t {
                Target::Abort => None,
                Target::Bypass => Some(Ste::new(Config::Bypass)),
                Target::Stage2(v) => stes[v as usize],
                Target::Nested(v) => stes[v as usize].map(|s2| Ste {
                    config: Config::Nested,
                    s1_context_ptr: cds.base(),
                    s1cdmax: cds.s1cdmax(),
                    s1fmt: cds.s1fmt(),
                    s1dss: S1Dss::Bypass,
                    ..s2
                }),
            };
            rig.drv.write_ste(sid, ste.as_ref()).unwrap();
            let pa = |v: u16| 0x70_0000 + v as u64 * 0x1_0000 + 0x8;
            let plain = rig.read(sid, None, 0x7008);
            let with_ssid = rig.read(sid, Some(1), 0x40_0008);
            match t {
                Target::Abort => prop_assert_eq!(plain, Err(SmmuFault::Abort)),
                Target::Bypass => prop_assert_eq!(plain, Ok(0x7008)),
                Target::Stage2(v) => {
                    prop_assert_eq!(plain, Ok(pa(v)));
                    prop_assert!(with_ssid.is_err());
                }
                Target::Nested(v) => {
                    prop_assert_eq!(plain, Ok(pa(v)));
                    prop_assert_eq!(with_ssid, Ok(pa(v)));
                }
            }
            prop_assert_eq!(rig.smmu.take_stale(), vec![]);
        }
    }
}
