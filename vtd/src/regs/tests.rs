use super::layout::{ccmd, event_control, fsts, gcmd, gsts, iotlb, iq, offset, pq, vcmd};
use super::*;
use crate::inv_desc::InvDescType;
use proptest::prelude::*;

const IRO: u64 = 0xf0;
const FRO: u64 = 0x220;
const QUEUE: u64 = 0x10_0000;

fn caps() -> (Cap, Ecap) {
    (
        Cap {
            nd: 6,
            rwbf: true,
            sagaw: 0b100,
            mgaw: 47,
            fro: (FRO / 16) as u16,
            nfr: 3,
            psi: true,
            mamv: 18,
            ..Cap::default()
        },
        Ecap {
            qi: true,
            dt: true,
            ir: true,
            eim: true,
            iro: (IRO / 16) as u16,
            nest: true,
            prs: true,
            srs: true,
            pss: 19,
            pasid: true,
            smts: true,
            vcs: true,
            slts: true,
            flts: true,
            ..Ecap::default()
        },
    )
}

fn regs() -> RegisterFile {
    let (cap, ecap) = caps();
    RegisterFile::new(cap, ecap).unwrap()
}

fn write(r: &mut RegisterFile, offset: u64, size: usize, value: u64) -> Vec<RegEffect> {
    let mut effects = RegEffects::new();
    r.write(offset, size, value, &mut effects).unwrap();
    assert!(
        !effects.spilled(),
        "a write allocated for {} effects",
        effects.len()
    );
    effects.to_vec()
}

fn read(r: &RegisterFile, offset: u64, size: usize) -> u64 {
    r.read(offset, size).unwrap()
}

fn fault(rid: u16, page: u64) -> FaultRecord {
    FaultRecord {
        fault_info: page,
        sid: SourceId::from_rid(rid),
        reason: 0x75,
        pasid: Pasid::new(3).ok(),
        exe: false,
        privileged: false,
        request: RequestType::Write,
        address_type: AddressType::Untranslated,
    }
}

/// Sets up a 256-bit invalidation queue of one page (128 descriptors) and enables it.
fn enable_qi(r: &mut RegisterFile) {
    write(r, offset::IQA, 8, QUEUE | iq::IQA_DW);
    write(r, offset::IQT, 8, 0);
    let effects = write(r, offset::GCMD, 4, gcmd::QIE as u64);
    assert_eq!(effects, vec![RegEffect::QueuedInvalidationEnabled(true)]);
}

fn unmask(r: &mut RegisterFile, ctl: u64, addr: u64, data: u64) {
    write(r, addr, 4, 0xfee0_0000);
    write(r, addr + 4, 4, 0x1);
    write(r, addr - 4, 4, data);
    assert!(write(r, ctl, 4, 0).is_empty());
}

#[test]
fn reset_state_and_read_only_registers() {
    let mut r = regs();
    let (cap, ecap) = caps();
    assert_eq!(r.size(), 0x1000);
    assert_eq!(read(&r, offset::VER, 4), 0x10);
    let cap_raw = cap.to_raw().unwrap();
    assert_eq!(read(&r, offset::CAP, 8), cap_raw);
    assert_eq!(read(&r, offset::CAP, 4), cap_raw & 0xffff_ffff);
    assert_eq!(read(&r, offset::CAP + 4, 4), cap_raw >> 32);
    assert_eq!(read(&r, offset::ECAP, 8), ecap.to_raw().unwrap());
    for ctl in [offset::FECTL, offset::IECTL, offset::PECTL] {
        assert_eq!(read(&r, ctl, 4), event_control::IM as u64);
    }
    assert_eq!(read(&r, offset::VCCAP, 8), vcmd::VCCAP_PAS);
    for (off, size) in [
        (offset::VER, 4),
        (offset::CAP, 8),
        (offset::ECAP + 4, 4),
        (offset::GSTS, 4),
        (offset::IQH, 8),
        (offset::IQERCD, 8),
        (offset::VCCAP, 8),
        (offset::VCRSP, 8),
        (FRO, 8),
    ] {
        let before = read(&r, off, size);
        let value = if size == 4 { 0xffff_ffff } else { u64::MAX };
        assert!(write(&mut r, off, size, value).is_empty());
        assert_eq!(read(&r, off, size), before, "offset {off:#x}");
    }
    // GCMD is write-only: it reads 0 even after a command.
    write(&mut r, offset::GCMD, 4, gcmd::TE as u64);
    assert_eq!(read(&r, offset::GCMD, 4), 0);
    assert_eq!(read(&r, offset::GSTS, 4), gsts::TES as u64);
}

#[test]
fn bad_accesses_are_errors_and_change_nothing() {
    let mut r = regs();
    write(&mut r, offset::RTADDR, 8, 0x5000);
    assert_eq!(r.read(offset::RTADDR, 2), Err(RegError::Width(2)));
    let mut none = RegEffects::new();
    assert_eq!(
        r.write(offset::RTADDR, 16, 0, &mut none),
        Err(RegError::Width(16))
    );
    assert_eq!(
        r.write(offset::RTADDR + 4, 8, 0, &mut none),
        Err(RegError::Unaligned {
            offset: offset::RTADDR + 4,
            size: 8
        })
    );
    assert_eq!(
        r.read(0x2, 4),
        Err(RegError::Unaligned { offset: 2, size: 4 })
    );
    assert_eq!(
        r.write(0x1000, 4, 0, &mut none),
        Err(RegError::OutOfRange {
            offset: 0x1000,
            size: 4,
            limit: 0x1000
        })
    );
    assert!(matches!(
        r.read(u64::MAX - 3, 4),
        Err(RegError::OutOfRange { .. })
    ));
    assert_eq!(
        r.write(offset::RTADDR, 4, 1 << 32, &mut none),
        Err(RegError::ValueWidth { value: 1 << 32 })
    );
    assert!(none.is_empty(), "a refused write asked for {none:?}");
    assert_eq!(read(&r, offset::RTADDR, 8), 0x5000);
}

#[test]
fn reserved_offsets_read_zero_and_ignore_writes() {
    let mut r = regs();
    for off in [0x30, 0x48, 0x100, 0x218, 0x300, 0xe08, 0xff8] {
        assert!(write(&mut r, off, 8, u64::MAX).is_empty());
        assert_eq!(read(&r, off, 8), 0, "offset {off:#x}");
    }
    // The registers of missing features are reserved too.
    let (cap, ecap) = caps();
    let ecap = Ecap {
        prs: false,
        vcs: false,
        ..ecap
    };
    let mut r = RegisterFile::new(cap, ecap).unwrap();
    for off in [offset::PQA, offset::VCMD, offset::VCCAP] {
        assert!(write(&mut r, off, 8, 0x1000).is_empty());
        assert_eq!(read(&r, off, 8), 0);
    }
    assert_eq!(r.page_request_queue(), None);
}

#[test]
fn rtaddr_is_latched_by_srtp() {
    let mut r = regs();
    write(&mut r, offset::RTADDR, 8, 0x1234_5000 | 1 << 10 | 0x3ff);
    assert_eq!(
        read(&r, offset::RTADDR, 8),
        0x1234_5400,
        "bits 9:0 are reserved"
    );
    assert_eq!(r.root_table(), RootTable::default());
    let effects = write(&mut r, offset::GCMD, 4, gcmd::SRTP as u64);
    let latched = RootTable {
        addr: 0x1234_5000,
        ttm: Ttm::Scalable,
    };
    assert_eq!(effects, vec![RegEffect::RootTableSet(latched)]);
    assert_eq!(r.gsts() & gsts::RTPS, gsts::RTPS);
    // A new RTADDR value only takes effect at the next SRTP; halves can be written apart.
    write(&mut r, offset::RTADDR + 4, 4, 0x1);
    write(&mut r, offset::RTADDR, 4, 0x9000);
    assert_eq!(read(&r, offset::RTADDR, 8), 0x1_0000_9000);
    assert_eq!(r.root_table(), latched);
    write(&mut r, offset::GCMD, 4, gcmd::SRTP as u64);
    assert_eq!(
        r.root_table(),
        RootTable {
            addr: 0x1_0000_9000,
            ttm: Ttm::Legacy
        }
    );
    // Without scalable mode (and abort-DMA mode) TTM cannot be written.
    let (cap, ecap) = caps();
    let mut legacy = RegisterFile::new(
        cap,
        Ecap {
            smts: false,
            ..ecap
        },
    )
    .unwrap();
    write(&mut legacy, offset::RTADDR, 8, 0x2000 | 3 << 10);
    assert_eq!(read(&legacy, offset::RTADDR, 8), 0x2000);
    let mut abort = RegisterFile::new(cap, Ecap { adms: true, ..ecap }).unwrap();
    write(&mut abort, offset::RTADDR, 8, 0x2000 | 3 << 10);
    write(&mut abort, offset::GCMD, 4, gcmd::SRTP as u64);
    assert_eq!(abort.root_table().ttm, Ttm::AbortDma);
}

#[test]
fn gcmd_commands_are_reflected_in_gsts() {
    let mut r = regs();
    // Linux's sequence: each write keeps the enables already on and adds one command.
    write(&mut r, offset::RTADDR, 8, 0x4000 | 1 << 10);
    write(&mut r, offset::GCMD, 4, gcmd::SRTP as u64);
    enable_qi(&mut r);
    let effects = write(&mut r, offset::GCMD, 4, (gcmd::QIE | gcmd::TE) as u64);
    assert_eq!(effects, vec![RegEffect::TranslationEnabled(true)]);
    assert_eq!(r.gsts(), gsts::RTPS | gsts::QIES | gsts::TES);
    assert!(r.translation_enabled() && r.qi_enabled());
    // Rewriting the same enables changes nothing.
    assert!(write(&mut r, offset::GCMD, 4, (gcmd::QIE | gcmd::TE) as u64).is_empty());
    let effects = write(&mut r, offset::GCMD, 4, (gcmd::QIE | gcmd::IRE) as u64);
    assert_eq!(
        effects,
        vec![
            RegEffect::InterruptRemappingEnabled(true),
            RegEffect::TranslationEnabled(false)
        ]
    );
    let effects = write(
        &mut r,
        offset::GCMD,
        4,
        (gcmd::QIE | gcmd::IRE | gcmd::CFI | gcmd::WBF | gcmd::SIRTP) as u64,
    );
    assert_eq!(
        effects,
        vec![
            RegEffect::InterruptRemapTableSet(0),
            RegEffect::WriteBufferFlush
        ]
    );
    assert_eq!(
        r.gsts(),
        gsts::RTPS | gsts::QIES | gsts::IRES | gsts::CFIS | gsts::IRTPS
    );
    // Several requests in one write are performed in order, SRTP before TE.
    let effects = write(&mut r, offset::GCMD, 4, (gcmd::SRTP | gcmd::TE) as u64);
    assert_eq!(
        effects,
        vec![
            RegEffect::RootTableSet(RootTable {
                addr: 0x4000,
                ttm: Ttm::Scalable
            }),
            RegEffect::QueuedInvalidationEnabled(false),
            RegEffect::InterruptRemappingEnabled(false),
            RegEffect::TranslationEnabled(true),
        ]
    );
    assert_eq!(r.gsts(), gsts::RTPS | gsts::IRTPS | gsts::TES);
    // A unit without queued invalidation or interrupt remapping ignores those commands.
    let (cap, ecap) = caps();
    let mut bare = RegisterFile::new(
        Cap { rwbf: false, ..cap },
        Ecap {
            qi: false,
            ir: false,
            ..ecap
        },
    )
    .unwrap();
    let all = gcmd::QIE | gcmd::IRE | gcmd::CFI | gcmd::SIRTP | gcmd::WBF;
    assert!(write(&mut bare, offset::GCMD, 4, all as u64).is_empty());
    assert_eq!(bare.gsts(), 0);
}

#[test]
fn invalidation_queue_is_processed_between_head_and_tail() {
    let mut r = regs();
    assert_eq!(r.inv_queue(), None);
    write(&mut r, offset::IQT, 8, 0x40);
    assert_eq!(r.next_inv_desc(), None, "queued invalidation is off");
    // IQA halves can be written apart while queued invalidation is off.
    write(&mut r, offset::IQA + 4, 4, 0x1);
    write(&mut r, offset::IQA, 4, 0x10_0000 | iq::IQA_DW | 0xff0);
    assert_eq!(
        read(&r, offset::IQA, 8),
        0x1_0010_0000 | iq::IQA_DW,
        "bits 10:3 are reserved"
    );
    enable_qi(&mut r);
    assert_eq!(
        r.inv_queue(),
        Some(InvQueue {
            base: QUEUE,
            desc_size: 32,
            entries: 128,
            head: 0,
            tail: 0
        })
    );
    // IQA cannot change under a running queue.
    write(&mut r, offset::IQA, 8, 0x20_0000);
    assert_eq!(read(&r, offset::IQA, 8), QUEUE | iq::IQA_DW);
    assert_eq!(
        write(&mut r, offset::IQT, 8, 2 * 32),
        vec![RegEffect::ProcessInvalidationQueue]
    );
    assert_eq!(r.next_inv_desc(), Some(QUEUE));
    r.advance_iqh().unwrap();
    assert_eq!(read(&r, offset::IQH, 8), 32);
    assert_eq!(r.next_inv_desc(), Some(QUEUE + 32));
    r.advance_iqh().unwrap();
    assert_eq!(r.next_inv_desc(), None);
    assert_eq!(r.advance_iqh(), Err(RegError::QueueIdle));
    // The head wraps at the end of the queue.
    assert_eq!(
        write(&mut r, offset::IQT, 8, 127 * 32),
        vec![RegEffect::ProcessInvalidationQueue]
    );
    assert_eq!(r.advance_iqh_by(124), 124);
    r.advance_iqh().unwrap();
    write(&mut r, offset::IQT, 8, 32);
    assert_eq!(r.next_inv_desc(), Some(QUEUE + 127 * 32));
    // Moving past more than is queued stops at the tail, across the wrap.
    assert_eq!(r.advance_iqh_by(5), 2);
    assert_eq!(read(&r, offset::IQH, 8), 32);
    assert_eq!(r.advance_iqh_by(1), 0);
    // Around the queue back to slot 0, then one descriptor pending there.
    write(&mut r, offset::IQT, 8, 0);
    assert_eq!(r.advance_iqh_by(u64::MAX), 127);
    assert_eq!(read(&r, offset::IQH, 8), 0);
    write(&mut r, offset::IQT, 8, 32);
    assert_eq!(r.advance_iqh_by(0), 0);
    assert_eq!(r.next_inv_desc(), Some(QUEUE));
    // Disabling is refused while descriptors are pending, and resets IQH once empty.
    assert!(write(&mut r, offset::GCMD, 4, 0).is_empty());
    assert!(r.qi_enabled());
    r.advance_iqh().unwrap();
    assert_eq!(
        write(&mut r, offset::GCMD, 4, 0),
        vec![RegEffect::QueuedInvalidationEnabled(false)]
    );
    assert_eq!((read(&r, offset::IQH, 8), r.qi_enabled()), (0, false));
    // A tail written before enabling is processed on enable.
    write(&mut r, offset::IQT, 8, 64);
    assert_eq!(
        write(&mut r, offset::GCMD, 4, gcmd::QIE as u64),
        vec![
            RegEffect::QueuedInvalidationEnabled(true),
            RegEffect::ProcessInvalidationQueue
        ]
    );
}

#[test]
fn legacy_queue_uses_128_bit_descriptors() {
    let (cap, ecap) = caps();
    let mut r = RegisterFile::new(
        cap,
        Ecap {
            smts: false,
            ..ecap
        },
    )
    .unwrap();
    write(&mut r, offset::IQA, 8, QUEUE | iq::IQA_DW | 1);
    assert_eq!(
        read(&r, offset::IQA, 8),
        QUEUE | 1,
        "DW needs scalable mode"
    );
    write(&mut r, offset::GCMD, 4, gcmd::QIE as u64);
    write(&mut r, offset::IQT, 8, 0x10);
    let q = r.inv_queue().unwrap();
    assert_eq!((q.desc_size, q.entries, q.tail), (16, 512, 1));
    assert_eq!(r.next_inv_desc(), Some(QUEUE));
}

#[test]
fn bad_tails_raise_invalidation_queue_errors() {
    let mut r = regs();
    unmask(&mut r, offset::FECTL, offset::FEADDR, 0x41);
    enable_qi(&mut r);
    let effects = write(&mut r, offset::IQT, 8, 0x10);
    let fault_event = RegEffect::Interrupt(Interrupt {
        source: EventSource::Fault,
        address: 0x1_fee0_0000,
        data: 0x41,
    });
    assert_eq!(effects, vec![fault_event]);
    assert_eq!(r.fsts() & fsts::IQE, fsts::IQE);
    assert_eq!(r.iqercd() & 0xf, Iqei::TailMisaligned as u64);
    assert_eq!(r.next_inv_desc(), None);
    // While IQE is set the queue stays stopped and no new interrupt condition arises.
    assert!(write(&mut r, offset::IQT, 8, 0x20).is_empty());
    assert_eq!(r.next_inv_desc(), None);
    // Clearing IQE restarts it.
    assert_eq!(
        write(&mut r, offset::FSTS, 4, fsts::IQE as u64),
        vec![RegEffect::ProcessInvalidationQueue]
    );
    assert_eq!(r.next_inv_desc(), Some(QUEUE));
    // A tail beyond the one-page queue.
    let effects = write(&mut r, offset::IQT, 8, 128 * 32);
    assert_eq!(effects, vec![fault_event]);
    assert_eq!(r.iqercd() & 0xf, Iqei::InvalidTail as u64);
}

#[test]
fn descriptor_errors_map_to_iqe_info() {
    let mut r = regs();
    enable_qi(&mut r);
    write(&mut r, offset::IQT, 8, 32);
    let unknown = InvDescError::UnknownType(0);
    let reserved = InvDescError::Reserved {
        kind: InvDescType::Iotlb,
        qword: 0,
        bits: 1 << 40,
    };
    assert_eq!(Iqei::from(&unknown), Iqei::InvalidType);
    assert_eq!(Iqei::from(&reserved), Iqei::ReservedField);
    // Masked: the interrupt is held pending.
    assert_eq!(r.set_iqe(Iqei::from(&reserved)), None);
    assert_eq!(r.iqercd() & 0xf, 4);
    assert_eq!(
        read(&r, offset::FECTL, 4),
        (event_control::IM | event_control::IP) as u64
    );
    // IQH still points at the offending descriptor, and a second error is not recorded.
    assert_eq!(read(&r, offset::IQH, 8), 0);
    assert_eq!(r.set_iqe(Iqei::InvalidType), None);
    assert_eq!(r.iqercd() & 0xf, 4);
    // Clearing the status drops the pending interrupt.
    write(&mut r, offset::FSTS, 4, fsts::IQE as u64);
    assert_eq!(read(&r, offset::FECTL, 4), event_control::IM as u64);
    assert!(write(&mut r, offset::FECTL, 4, 0).is_empty());
    // Device-TLB errors record the source id.
    let sid = SourceId::from_rid(0x0310);
    assert!(r.set_ite(sid).is_some());
    assert_eq!(r.set_ice(sid), None, "ITE is still set");
    assert_eq!(r.iqercd() >> 32, 0x0310_0310);
    assert_eq!(r.fsts() & (fsts::ITE | fsts::ICE), fsts::ITE | fsts::ICE);
}

#[test]
fn invalidation_wait_completion_event() {
    let mut r = regs();
    write(&mut r, offset::IEDATA, 4, 0x1234_0042);
    write(&mut r, offset::IEADDR, 4, 0xfee0_1003);
    assert_eq!(
        read(&r, offset::IEADDR, 4),
        0xfee0_1000,
        "bits 1:0 are reserved"
    );
    assert_eq!(r.set_iwc(), None);
    assert_eq!(r.ics(), ics::IWC);
    assert_eq!(
        read(&r, offset::IECTL, 4),
        (event_control::IM | event_control::IP) as u64
    );
    let effects = write(&mut r, offset::IECTL, 4, 0);
    assert_eq!(
        effects,
        vec![RegEffect::Interrupt(Interrupt {
            source: EventSource::InvalidationCompletion,
            address: 0xfee0_1000,
            data: 0x1234_0042,
        })]
    );
    assert_eq!(read(&r, offset::IECTL, 4), 0);
    // IWC still set: not a new interrupt condition.
    assert_eq!(r.set_iwc(), None);
    write(&mut r, offset::ICS, 4, 0);
    assert_eq!(r.ics(), ics::IWC, "writing 0 clears nothing");
    write(&mut r, offset::ICS, 4, 1);
    assert_eq!(r.ics(), 0);
    assert!(r.set_iwc().is_some());
}

#[test]
fn event_data_width_follows_eim() {
    let mut r = regs();
    write(&mut r, offset::FEDATA, 4, 0xffff_ffff);
    assert_eq!(read(&r, offset::FEDATA, 4), 0xffff_ffff);
    let (cap, ecap) = caps();
    let mut r = RegisterFile::new(cap, Ecap { eim: false, ..ecap }).unwrap();
    write(&mut r, offset::FEDATA, 4, 0xffff_ffff);
    assert_eq!(read(&r, offset::FEDATA, 4), 0xffff);
}

#[test]
fn faults_fill_the_recording_registers_then_overflow() {
    let mut r = regs();
    unmask(&mut r, offset::FECTL, offset::FEADDR, 0x40);
    let event = Interrupt {
        source: EventSource::Fault,
        address: 0x1_fee0_0000,
        data: 0x40,
    };
    assert_eq!(
        r.record_fault(&fault(1, 0x1000)),
        (FaultOutcome::Recorded(0), Some(event))
    );
    assert_eq!(r.fsts(), fsts::PPF);
    for i in 1..4 {
        assert_eq!(
            r.record_fault(&fault(1, 0x1000 * i)),
            (FaultOutcome::Recorded(i as usize), None)
        );
    }
    assert_eq!(
        r.record_fault(&fault(2, 0x9000)),
        (FaultOutcome::Overflow, None)
    );
    assert_eq!(r.fsts(), fsts::PPF | fsts::PFO);
    assert_eq!(
        r.record_fault(&fault(2, 0xa000)),
        (FaultOutcome::Dropped, None)
    );
    // The registers read back through MMIO, F in bit 127.
    let [low, high] = fault(1, 0x2000).to_raw();
    assert_eq!(read(&r, FRO + 2 * 16, 8), low);
    assert_eq!(read(&r, FRO + 2 * 16 + 8, 8), high | FRCD_F);
    assert_eq!(read(&r, FRO + 2 * 16 + 12, 4), (high | FRCD_F) >> 32);
    assert_eq!(r.fault_record(2), Some((fault(1, 0x2000), true)));
    assert_eq!(r.fault_record(4), None);
    // Software services record 0 (RW1C on F through the upper dword) and PFO.
    write(&mut r, FRO + 12, 4, 0x8000_0000);
    assert_eq!(r.fault_record(0).map(|(_, f)| f), Some(false));
    write(&mut r, offset::FSTS, 4, fsts::PFO as u64);
    assert_eq!(r.fsts(), fsts::PPF, "records 1-3 are still pending");
    // The index wrapped: the next fault goes to record 0, with no new interrupt.
    assert_eq!(
        r.record_fault(&fault(3, 0xb000)),
        (FaultOutcome::Recorded(0), None)
    );
    // Once every F is clear, the next fault is a new condition; FRI names its register.
    for i in 0..4 {
        write(&mut r, FRO + 16 * i + 8, 8, FRCD_F);
    }
    assert_eq!(r.fsts(), 0);
    assert_eq!(
        r.record_fault(&fault(4, 0xc000)),
        (FaultOutcome::Recorded(1), Some(event))
    );
    assert_eq!(r.fsts(), fsts::PPF | 1 << fsts::FRI_SHIFT);
}

#[test]
fn masked_fault_event_waits_for_unmask() {
    let mut r = regs();
    write(&mut r, offset::FEADDR, 4, 0xfee0_0000);
    assert_eq!(r.record_fault(&fault(1, 0x1000)).1, None);
    assert_eq!(
        read(&r, offset::FECTL, 4),
        (event_control::IM | event_control::IP) as u64
    );
    let effects = write(&mut r, offset::FECTL, 4, 0);
    assert!(matches!(
        effects.as_slice(),
        [RegEffect::Interrupt(Interrupt {
            source: EventSource::Fault,
            ..
        })]
    ));
    // Masked again: a pending condition disappears when software services the fault.
    write(&mut r, offset::FECTL, 4, event_control::IM as u64);
    write(&mut r, FRO + 8, 8, FRCD_F);
    assert_eq!(r.record_fault(&fault(1, 0x2000)).1, None);
    assert_eq!(
        read(&r, offset::FECTL, 4) as u32 & event_control::IP,
        event_control::IP
    );
    write(&mut r, FRO + 16 + 8, 8, FRCD_F);
    assert_eq!(read(&r, offset::FECTL, 4), event_control::IM as u64);
    assert!(write(&mut r, offset::FECTL, 4, 0).is_empty());
}

#[test]
fn fault_status_bits_are_write_one_to_clear() {
    let mut r = regs();
    r.set_iqe(Iqei::ReservedField);
    r.set_ite(SourceId::from_rid(1));
    r.record_fault(&fault(1, 0x1000));
    r.record_fault(&fault(1, 0x2000));
    let before = r.fsts();
    assert_eq!(before, fsts::IQE | fsts::ITE | fsts::PPF);
    // Writing zeros, PPF or FRI changes nothing: PPF and FRI are read-only.
    write(&mut r, offset::FSTS, 4, 0);
    write(&mut r, offset::FSTS, 4, (fsts::PPF | fsts::FRI) as u64);
    assert_eq!(r.fsts(), before);
    write(&mut r, offset::FSTS, 4, fsts::ITE as u64);
    assert_eq!(r.fsts(), fsts::IQE | fsts::PPF);
    // Writing 0 to F keeps the record.
    write(&mut r, FRO + 8, 8, 0);
    assert_eq!(r.fault_record(0).map(|(_, f)| f), Some(true));
}

#[test]
fn register_based_invalidation() {
    let mut r = regs();
    write(&mut r, IRO, 8, 0x7f00_5000 | iotlb::IVA_IH | 1);
    let cmd = iotlb::IVT | 3 << iotlb::IIRG_SHIFT | iotlb::DR | 7 << iotlb::DID_SHIFT;
    let effects = write(&mut r, IRO + 8, 8, cmd);
    assert_eq!(
        effects,
        vec![RegEffect::RegisterInvalidation(InvDesc::Iotlb {
            granularity: IotlbGranularity::PageSelective,
            dr: true,
            dw: false,
            did: DomainId(7),
            addr: 0x7f00_5000,
            ih: true,
            am: 1,
        })]
    );
    assert_eq!(
        read(&r, IRO + 8, 8),
        cmd & !iotlb::IVT | 3 << iotlb::IAIG_SHIFT
    );
    // An address mask above MAMV is performed domain-selective.
    write(&mut r, IRO, 8, 0x7f00_5000 | 19);
    let effects = write(&mut r, IRO + 8, 8, cmd);
    assert!(matches!(
        effects.as_slice(),
        [RegEffect::RegisterInvalidation(InvDesc::Iotlb {
            granularity: IotlbGranularity::DomainSelective,
            ..
        })]
    ));
    assert_eq!((read(&r, IRO + 8, 8) >> iotlb::IAIG_SHIFT) & 3, 2);
    // Context command written as two dwords, low first: acts on the upper one (ICC).
    let cmd =
        ccmd::ICC | 3 << ccmd::CIRG_SHIFT | 1 << ccmd::FM_SHIFT | 0x0108 << ccmd::SID_SHIFT | 9;
    assert!(write(&mut r, offset::CCMD, 4, cmd & 0xffff_ffff).is_empty());
    let effects = write(&mut r, offset::CCMD + 4, 4, cmd >> 32);
    assert_eq!(
        effects,
        vec![RegEffect::RegisterInvalidation(InvDesc::ContextCache {
            granularity: ContextCacheGranularity::DeviceSelective,
            did: DomainId(9),
            sid: SourceId::from_rid(0x0108),
            fm: 1,
        })]
    );
    assert_eq!(
        read(&r, offset::CCMD, 8),
        cmd & !ccmd::ICC | 3 << ccmd::CAIG_SHIFT
    );
    // A reserved granularity reports CAIG 0 and does nothing.
    assert!(write(&mut r, offset::CCMD, 8, ccmd::ICC).is_empty());
    assert_eq!(read(&r, offset::CCMD, 8), 0);
    // With queued invalidation on, register-based invalidation is refused.
    enable_qi(&mut r);
    assert!(write(&mut r, offset::CCMD, 8, ccmd::ICC | 1 << ccmd::CIRG_SHIFT).is_empty());
    assert_eq!(read(&r, offset::CCMD, 8), 1 << ccmd::CIRG_SHIFT);
    assert!(write(&mut r, IRO + 8, 8, iotlb::IVT | 1 << iotlb::IIRG_SHIFT).is_empty());
    assert_eq!(read(&r, IRO + 8, 8), 1 << iotlb::IIRG_SHIFT);
}

#[test]
fn page_selective_needs_psi() {
    let (cap, ecap) = caps();
    let mut r = RegisterFile::new(Cap { psi: false, ..cap }, ecap).unwrap();
    let effects = write(&mut r, IRO + 8, 8, iotlb::IVT | 3 << iotlb::IIRG_SHIFT);
    assert!(matches!(
        effects.as_slice(),
        [RegEffect::RegisterInvalidation(InvDesc::Iotlb {
            granularity: IotlbGranularity::DomainSelective,
            ..
        })]
    ));
}

#[test]
fn virtual_commands_allocate_and_free_pasids() {
    let mut r = regs();
    let effects = write(&mut r, offset::VCMD, 8, vcmd::ALLOC_PASID as u64);
    assert_eq!(
        effects,
        vec![RegEffect::VirtualCommand(VirtualCommand::AllocPasid)]
    );
    assert_eq!(read(&r, offset::VCRSP, 8), vcmd::VCRSP_IP);
    // A command while one is in progress is ignored.
    assert!(write(&mut r, offset::VCMD, 8, vcmd::FREE_PASID as u64).is_empty());
    r.complete_virtual_command(VcmdResponse::Allocated(Pasid::new(0x4_0001).unwrap()))
        .unwrap();
    assert_eq!(read(&r, offset::VCRSP, 8), 0x4_0001 << 8);
    assert_eq!(
        r.complete_virtual_command(VcmdResponse::Freed),
        Err(RegError::NoVirtualCommand)
    );
    let effects = write(
        &mut r,
        offset::VCMD,
        8,
        0x4_0001 << 8 | vcmd::FREE_PASID as u64,
    );
    assert_eq!(
        effects,
        vec![RegEffect::VirtualCommand(VirtualCommand::FreePasid(
            Pasid::new(0x4_0001).ok()
        ))]
    );
    r.complete_virtual_command(VcmdResponse::InvalidPasid)
        .unwrap();
    assert_eq!(read(&r, offset::VCRSP, 8), 2 << 1);
    let effects = write(&mut r, offset::VCMD, 8, 1 << 28 | vcmd::FREE_PASID as u64);
    assert_eq!(
        effects,
        vec![RegEffect::VirtualCommand(VirtualCommand::FreePasid(None))]
    );
    r.complete_virtual_command(VcmdResponse::NoPasidAvailable)
        .unwrap();
    assert_eq!(read(&r, offset::VCRSP, 8), 2 << 1);
    // A 4-byte write of the lower half issues the command with the operand it holds.
    let effects = write(&mut r, offset::VCMD, 4, 0x0100_0077);
    assert_eq!(
        effects,
        vec![RegEffect::VirtualCommand(VirtualCommand::Unknown {
            cmd: 0x77,
            operand: 0x1_0000
        })]
    );
    r.complete_virtual_command(VcmdResponse::InvalidCommand)
        .unwrap();
    assert_eq!(read(&r, offset::VCRSP, 8), 1 << 1);
    // Writing only the upper half stores the operand without issuing a command.
    assert!(write(&mut r, offset::VCMD + 4, 4, 0).is_empty());
}

#[test]
fn page_request_queue_fills_and_overflows() {
    let mut r = regs();
    unmask(&mut r, offset::PECTL, offset::PEADDR, 0x50);
    write(&mut r, offset::PQA, 8, 0x20_0000 | 0xff8);
    assert_eq!(
        read(&r, offset::PQA, 8),
        0x20_0000,
        "bits 11:3 are reserved"
    );
    let q = r.page_request_queue().unwrap();
    assert_eq!((q.base, q.entries, q.head, q.tail), (0x20_0000, 128, 0, 0));
    assert_eq!(r.pq_tail_slot(), Some(0x20_0000));
    let event = Interrupt {
        source: EventSource::PageRequest,
        address: 0x1_fee0_0000,
        data: 0x50,
    };
    assert_eq!(r.pq_advance_tail(), Ok(Some(event)));
    assert_eq!((r.prs(), read(&r, offset::PQT, 8)), (pq::PPR, 32));
    for _ in 1..127 {
        r.pq_tail_slot().unwrap();
        assert_eq!(r.pq_advance_tail(), Ok(None));
    }
    // 127 requests fill a 128-slot ring.
    assert_eq!(r.pq_tail_slot(), None);
    assert_eq!(r.pq_advance_tail(), Err(RegError::PageRequestQueueFull));
    assert_eq!(r.pq_overflow(), None, "PPR is still set");
    assert_eq!(r.prs(), pq::PPR | pq::PRO);
    // Software consumes two requests and clears the status.
    write(&mut r, offset::PQH, 8, 64);
    write(&mut r, offset::PRS, 4, (pq::PPR | pq::PRO) as u64);
    assert_eq!(r.prs(), 0);
    assert_eq!(r.pq_tail_slot(), Some(0x20_0000 + 127 * 32));
    assert_eq!(r.pq_advance_tail(), Ok(Some(event)));
    assert_eq!(read(&r, offset::PQT, 8), 0, "the tail wraps");
}

#[test]
fn layout_is_validated() {
    let (cap, ecap) = caps();
    assert_eq!(
        RegisterFile::new(Cap { fro: 2, ..cap }, ecap).err(),
        Some(RegError::Overlap {
            what: "fault recording",
            offset: 0x20
        })
    );
    assert_eq!(
        RegisterFile::new(cap, Ecap { iro: 0, ..ecap }).err(),
        Some(RegError::Overlap {
            what: "IOTLB",
            offset: 0
        })
    );
    assert!(
        RegisterFile::new(cap, Ecap { iro: 0x10, ..ecap }).is_err(),
        "MTRR range"
    );
    assert!(
        RegisterFile::new(cap, Ecap { iro: 0x23, ..ecap }).is_err(),
        "inside FRCD"
    );
    assert_eq!(
        RegisterFile::new(Cap { afl: true, ..cap }, ecap).err(),
        Some(RegError::Unsupported("AFL"))
    );
    assert!(matches!(
        RegisterFile::new(Cap { nd: 8, ..cap }, ecap),
        Err(RegError::FieldRange { field: "nd", .. })
    ));
    // 256 fault recording registers past the first page make the page two pages long.
    let big = RegisterFile::new(
        Cap {
            fro: 0x100,
            nfr: 255,
            ..cap
        },
        ecap,
    )
    .unwrap();
    assert_eq!(big.size(), 0x2000);
    assert_eq!(big.read(0x1ff8, 8), Ok(0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever software writes, the read-only registers keep their values, GSTS agrees
    /// with the accessors, and every effect is consistent with the state.
    #[test]
    fn arbitrary_writes_keep_invariants(
        writes in proptest::collection::vec((0u64..0x1000 / 4, any::<bool>(), any::<u64>()), 1..64),
    ) {
        let mut r = regs();
        let (cap, ecap) = caps();
        for (slot, wide, value) in writes {
            let (offset, size, value) = if wide {
                ((slot * 4) & !7, 8, value)
            } else {
                (slot * 4, 4, value & 0xffff_ffff)
            };
            let mut effects = RegEffects::new();
            r.write(offset, size, value, &mut effects).unwrap();
            prop_assert!(!effects.spilled());
            for effect in effects {
                match effect {
                    RegEffect::ProcessInvalidationQueue => prop_assert!(r.next_inv_desc().is_some()),
                    RegEffect::TranslationEnabled(on) => prop_assert_eq!(on, r.translation_enabled()),
                    RegEffect::VirtualCommand(_) => {
                        prop_assert_eq!(r.read(offset::VCRSP, 8).unwrap(), vcmd::VCRSP_IP);
                        r.complete_virtual_command(VcmdResponse::Freed).unwrap();
                    }
                    _ => {}
                }
            }
            if let Some(q) = r.inv_queue() {
                prop_assert!(q.head < q.entries);
            }
        }
        prop_assert_eq!(r.read(offset::VER, 4).unwrap(), 0x10);
        prop_assert_eq!(r.read(offset::CAP, 8).unwrap(), cap.to_raw().unwrap());
        prop_assert_eq!(r.read(offset::ECAP, 8).unwrap(), ecap.to_raw().unwrap());
        prop_assert_eq!(r.read(offset::GSTS, 4).unwrap() as u32, r.gsts());
        prop_assert_eq!(r.qi_enabled(), r.gsts() & gsts::QIES != 0);
        prop_assert_eq!(r.fsts() & fsts::PPF, 0, "software cannot create faults");
    }
}

#[test]
fn fixed_registers_index() {
    // The direct lookup gives, for every byte, the one fixed register whose span holds it.
    for offset in 0..FIXED_DWORDS as u64 * 4 + 64 {
        let mut holders = FIXED
            .iter()
            .enumerate()
            .filter(|(_, &(base, _, width))| (base..base + width).contains(&offset));
        let expected = holders.next().map_or(0, |(i, _)| i + 1);
        assert!(
            holders.next().is_none(),
            "fixed registers overlap at {offset:#x}"
        );
        let slot = FIXED_BY_DWORD
            .get((offset / 4) as usize)
            .copied()
            .unwrap_or(0);
        assert_eq!(slot as usize, expected, "offset {offset:#x}");
    }
}

#[test]
fn the_busiest_write_fits_inline() {
    // Every GCMD command bit at once, with a bad tail waiting for QIE: the most effects one
    // write has, and they stay inline.
    let mut r = regs();
    write(&mut r, offset::IQT, 8, 1 << 4);
    let mut effects = RegEffects::new();
    r.write(offset::GCMD, 8, u32::MAX as u64, &mut effects)
        .unwrap();
    assert!(!effects.spilled());
    assert_eq!(effects.len(), MAX_REG_EFFECTS, "{effects:?}");
}
