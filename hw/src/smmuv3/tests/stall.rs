//! The stall fault model (IHI 0070 §3.12.2) through real tables, the command queue and
//! the event queue: stalled transactions wait on their own threads, and every wait here
//! is bounded.

use std::time::{Duration, Instant};

use vsva_smmuv3::{cmd::ResumeAction, features::StallModel};

use super::*;
use crate::dma::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DmaEngine, DmaEngineConfig,
    Operation,
};

/// A stall-capable SMMU (IDR0.STALL_MODEL 0b00).
fn stall_rig(cfg: SmmuConfig) -> Rig {
    Rig::with_config(SmmuConfig {
        features: Features {
            stall_model: StallModel::StallAndTerminate,
            ..Features::VSVA
        },
        strict: true,
        ..cfg
    })
}

/// The stage-1 stream of [`Rig::stage1`] with CD 0's S (stall) bit set, and STE.S1STALLD
/// as `s1stalld`.
fn stall_stream(rig: &mut Rig, sid: u32, s1stalld: bool) -> TableBuilder {
    let (b, _) = rig.stage1(sid);
    let cd = ContextDescriptor {
        s: true,
        ..ContextDescriptor::new(TTB0, 16, ASID)
    };
    rig.write_words(CD_TABLE, &cd.encode());
    let ste = Ste {
        s1_context_ptr: CD_TABLE,
        s1cdmax: 2,
        s1fmt: S1Fmt::Linear,
        s1dss: S1Dss::Substream0,
        s1stalld,
        ..Ste::new(Config::S1Trans)
    };
    rig.write_ste(sid, &ste);
    b
}

/// Waits (at most a minute) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Rig {
    /// The records software has not consumed, consumed.
    fn take_events(&self) -> Vec<Event> {
        let prod = self.smmu.mmio_read(EVENTQ_PROD, 4).unwrap() as u32;
        let mut cons = self.smmu.mmio_read(EVENTQ_CONS, 4).unwrap() as u32 & 3;
        let mut events = Vec::new();
        while cons != prod & 3 {
            events.push(self.event(cons as u64 & 1));
            cons = (cons + 1) & 3;
        }
        self.smmu.mmio_write(EVENTQ_CONS, 4, prod as u64).unwrap();
        events
    }

    /// Waits until `sid` has `n` stalled transactions and returns the new stall records.
    fn stalls(&self, sid: u32, n: usize) -> Vec<Event> {
        wait_until("the stall", || self.smmu.stalled(Some(sid)) == n);
        self.take_events()
    }

    fn resume(&self, sid: u32, stag: u16, action: ResumeAction) {
        self.submit(&[Cmd::Resume { sid, action, stag }, sync(0)]);
    }
}

fn stat(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn a_stalled_read_completes_after_resume_retry() {
    let mut rig = stall_rig(SmmuConfig::default());
    let mut b = stall_stream(&mut rig, SID, false);
    let smmu = rig.smmu.clone();
    let waiter = std::thread::spawn(move || smmu.translate(SID, None, 0x7234, AccessRequest::READ));
    let events = rig.stalls(SID, 1);
    let [e] = events[..] else {
        panic!("one stall record: {events:?}")
    };
    assert_eq!(
        (e.event_type, e.stall, e.sid, e.input_addr, e.rnw),
        (EventType::Translation, true, SID, 0x7234, true)
    );
    // Software makes the page present, then retries the transaction.
    rig.map(&mut b, 0x7000, 0x48_0000, RW_EL0);
    rig.resume(SID, e.stag, ResumeAction::Retry);
    let t = waiter.join().unwrap().unwrap();
    assert_eq!(t.output, 0x48_0234);
    assert_eq!(rig.smmu.stalled(None), 0);
    assert_eq!(stat(&rig.smmu.stats().stalls_retried), 1);
    assert!(rig.missing().is_empty());
}

#[test]
fn resume_abort_and_terminate_end_the_transaction_with_its_stall_record() {
    for action in [ResumeAction::Abort, ResumeAction::Terminate] {
        let mut rig = stall_rig(SmmuConfig::default());
        stall_stream(&mut rig, SID, false);
        let smmu = rig.smmu.clone();
        let waiter =
            std::thread::spawn(move || smmu.translate(SID, None, 0x7000, AccessRequest::WRITE));
        let e = rig.stalls(SID, 1)[0];
        rig.resume(SID, e.stag, action);
        let f = waiter.join().unwrap().unwrap_err();
        assert_eq!(
            f,
            SmmuFault::Event {
                event: e,
                recorded: true
            },
            "{action:?}"
        );
        assert_eq!(rig.smmu.stalled(None), 0);
        // The device sees a fault it may not resolve with a page request.
        let rid = SourceId::from_rid(SID as u16);
        let smmu = rig.smmu.clone();
        let waiter = std::thread::spawn(move || smmu.remap(rid, None, 0x7000, DmaAccess::READ));
        let e = rig.stalls(SID, 1)[0];
        rig.resume(SID, e.stag, action);
        let f = waiter.join().unwrap().unwrap_err();
        assert_eq!(
            (f.reason, f.recoverable),
            (EventType::Translation as u8, false)
        );
    }
}

#[test]
fn unknown_stags_are_ignored_and_stall_term_ends_only_its_stream() {
    let mut rig = stall_rig(SmmuConfig::default());
    stall_stream(&mut rig, SID, false);
    stall_stream(&mut rig, SID + 1, false);
    let read = |sid: u32, va: u64| {
        let smmu = rig.smmu.clone();
        std::thread::spawn(move || smmu.translate(sid, None, va, AccessRequest::READ))
    };
    let a1 = read(SID, 0x1000);
    let e1 = rig.stalls(SID, 1)[0];
    let a2 = read(SID, 0x2000);
    let e2 = rig.stalls(SID, 2)[0];
    let b1 = read(SID + 1, 0x3000);
    let f1 = rig.stalls(SID + 1, 1)[0];
    assert_ne!(e1.stag, e2.stag);
    // A STAG nobody stalled, and another stream's STAG: ignored, nothing resumed.
    let unknown = (0..=u16::MAX)
        .find(|t| ![e1.stag, e2.stag, f1.stag].contains(t))
        .unwrap();
    rig.resume(SID, unknown, ResumeAction::Abort);
    rig.resume(SID + 2, f1.stag, ResumeAction::Abort);
    if f1.stag != e1.stag && f1.stag != e2.stag {
        rig.resume(SID, f1.stag, ResumeAction::Abort);
    }
    assert_eq!(
        rig.cons() & 0x7fff_ffff,
        rig.smmu.mmio_read(CMDQ_PROD, 4).unwrap() as u32
    );
    assert_eq!(
        (rig.smmu.stalled(Some(SID)), rig.smmu.stalled(Some(SID + 1))),
        (2, 1)
    );
    rig.submit(&[Cmd::StallTerm { sid: SID }, sync(0)]);
    for (t, e) in [(a1, e1), (a2, e2)] {
        assert_eq!(
            t.join().unwrap(),
            Err(SmmuFault::Event {
                event: e,
                recorded: true
            })
        );
    }
    assert_eq!(rig.smmu.stalled(None), 1);
    // Resuming a terminated transaction's STAG finds nothing.
    rig.resume(SID, e1.stag, ResumeAction::Retry);
    assert_eq!(rig.smmu.stalled(None), 1);
    rig.resume(SID + 1, f1.stag, ResumeAction::Terminate);
    assert!(b1.join().unwrap().is_err());
    assert_eq!(rig.smmu.stalled(None), 0);
    assert_eq!(stat(&rig.smmu.stats().stalls_terminated), 3);
}

#[test]
fn disabling_the_smmu_or_invalidating_the_ste_terminates_stalls() {
    for how in ["smmuen", "cfgi_ste", "cfgi_all"] {
        let mut rig = stall_rig(SmmuConfig::default());
        stall_stream(&mut rig, SID, false);
        let smmu = rig.smmu.clone();
        let waiter =
            std::thread::spawn(move || smmu.translate(SID, None, 0x5000, AccessRequest::READ));
        rig.stalls(SID, 1);
        match how {
            "smmuen" => rig.smmu.mmio_write(CR0, 4, 0xe).unwrap(),
            "cfgi_ste" => rig.submit(&[Cmd::CfgiSte {
                sid: SID,
                leaf: false,
            }]),
            _ => rig.submit(&[Cmd::CFGI_ALL]),
        }
        assert!(
            matches!(waiter.join().unwrap(), Err(SmmuFault::Event { event, .. }) if event.stall),
            "{how}"
        );
        assert_eq!(rig.smmu.stalled(None), 0, "{how}");
    }
}

#[test]
fn stalls_beyond_the_limit_or_without_a_record_terminate_at_once() {
    let mut rig = stall_rig(SmmuConfig {
        stall_limit: 1,
        ..SmmuConfig::default()
    });
    stall_stream(&mut rig, SID, false);
    let smmu = rig.smmu.clone();
    let waiter = std::thread::spawn(move || smmu.translate(SID, None, 0x5000, AccessRequest::READ));
    let e = rig.stalls(SID, 1)[0];
    // The limit is reached: the next fault terminates, recorded without Stall.
    let f = rig.read(SID, None, 0x6000).unwrap_err();
    let SmmuFault::Event { event, recorded } = f else {
        panic!("{f:?}")
    };
    assert!(recorded && !event.stall);
    assert_eq!(stat(&rig.smmu.stats().stalls_refused), 1);
    rig.resume(SID, e.stag, ResumeAction::Abort);
    assert!(waiter.join().unwrap().is_err());
    // A full event queue cannot take a stall record: terminated, nothing held.
    let mut rig = stall_rig(SmmuConfig::default());
    stall_stream(&mut rig, SID, false);
    rig.smmu.mmio_write(CR0, 4, 0xb).unwrap(); // EVENTQEN off: the record is lost.
    let f = rig.read(SID, None, 0x6000).unwrap_err();
    assert!(
        matches!(
            f,
            SmmuFault::Event {
                recorded: false,
                ..
            }
        ),
        "{f:?}"
    );
    assert_eq!(rig.smmu.stalled(None), 0);
    assert_eq!(stat(&rig.smmu.stats().stalls_refused), 1);
}

#[test]
fn only_configured_faults_of_untranslated_requests_stall() {
    let mut rig = stall_rig(SmmuConfig::default());
    // S1STALLD disables stage-1 stalls whatever CD.S says.
    stall_stream(&mut rig, SID, true);
    let f = rig.read(SID, None, 0x6000).unwrap_err();
    assert!(matches!(f, SmmuFault::Event { event, .. } if !event.stall));
    // A request that needs an answer at once never stalls.
    stall_stream(&mut rig, SID, false);
    rig.submit(&[Cmd::CfgiSte {
        sid: SID,
        leaf: false,
    }]);
    let f = rig
        .smmu
        .translate_terminating(SID, None, 0x6000, AccessRequest::READ)
        .unwrap_err();
    assert!(matches!(f, SmmuFault::Event { event, .. } if !event.stall));
    // STE.S2S stalls stage-2 faults.
    let mut rig = stall_rig(SmmuConfig::default());
    let mut b2 = stage2_stream(&mut rig);
    let ste = Ste {
        s2vmid: VMID,
        s2t0sz: 25,
        s2sl0: 1,
        s2ps: AddressSize::Bits48,
        s2ttb: S2TTB,
        s2s: true,
        ..Ste::new(Config::S2Trans)
    };
    rig.write_ste(SID, &ste);
    let smmu = rig.smmu.clone();
    let waiter = std::thread::spawn(move || smmu.translate(SID, None, 0x3008, AccessRequest::READ));
    let e = rig.stalls(SID, 1)[0];
    assert!(e.stall && e.s2 && e.event_type == EventType::Translation);
    rig.map(&mut b2, 0x3000, 0x43_0000, S2_RW);
    rig.resume(SID, e.stag, ResumeAction::Retry);
    assert_eq!(waiter.join().unwrap().map(|t| t.output), Ok(0x43_0008));
}

#[test]
fn a_stall_nobody_resumes_times_out_and_holds_nothing() {
    let mut rig = stall_rig(SmmuConfig {
        stall_timeout: Duration::from_millis(20),
        ..SmmuConfig::default()
    });
    stall_stream(&mut rig, SID, false);
    let f = rig.read(SID, None, 0x6000).unwrap_err();
    let SmmuFault::Event { event, recorded } = f else {
        panic!("{f:?}")
    };
    assert!(recorded && event.stall);
    assert_eq!(rig.smmu.stalled(None), 0);
    // A late resume of its STAG is ignored.
    rig.resume(SID, event.stag, ResumeAction::Retry);
    assert_eq!(stat(&rig.smmu.stats().stalls_terminated), 1);
    assert_eq!(stat(&rig.smmu.stats().stalls_retried), 0);
}

/// What a DMA engine's descriptor writes, read from host memory.
fn record_at(rig: &Rig, pa: u64) -> CompletionRecord {
    let mut b = [0u8; 32];
    rig.mem.read(pa, &mut b).unwrap();
    CompletionRecord::from_bytes(&b).unwrap()
}

#[test]
fn another_streams_dma_proceeds_while_one_is_stalled() {
    let mut rig = stall_rig(SmmuConfig::default());
    let mut b = stall_stream(&mut rig, SID, false);
    stall_stream(&mut rig, SID + 1, false);
    // Both streams share CD 0's address space: the completion records at 0x1000 (stream
    // SID) and 0x2000 (SID + 1), sources at 0x3000 and 0x4000, destinations at 0x5000
    // and 0x6000; stream SID's source page 0x3000 is not mapped yet.
    for (va, pa) in [
        (0x1000, 0x60_1000),
        (0x2000, 0x60_2000),
        (0x4000, 0x60_4000),
        (0x5000, 0x60_5000),
        (0x6000, 0x60_6000),
    ] {
        rig.map(&mut b, va, pa, RW_EL0);
    }
    let src: Vec<u8> = (0..0x1000u32).map(|i| (i * 7 + 3) as u8).collect();
    rig.mem.write(0x60_3000, &src).unwrap();
    rig.mem.write(0x60_4000, &src).unwrap();
    let engine = |sid: u32| {
        let cfg = DmaEngineConfig::new(SourceId::from_rid(sid as u16));
        let port: Arc<dyn DmaPort> = rig.smmu.clone();
        let dev = Arc::new(DmaEngine::new(cfg, port).unwrap());
        dev.enable(0).unwrap();
        dev
    };
    let copy = |dev: &DmaEngine, comp: u64, src: u64, dst: u64| {
        let d = Descriptor {
            pasid: None,
            privileged: false,
            block_on_fault: false,
            completion: CompletionRequest::Always(comp),
            op: Operation::Memmove {
                src,
                dst,
                size: 0x1000,
            },
        };
        dev.portal_write(0, &d.encode()).unwrap();
    };
    let (a, b_dev) = (engine(SID), engine(SID + 1));
    copy(&a, 0x1000, 0x3000, 0x5000);
    let runner = {
        let a = a.clone();
        std::thread::spawn(move || a.process())
    };
    let e = rig.stalls(SID, 1)[0];
    assert_eq!(e.input_addr, 0x3000);
    // Stream SID + 1 copies a page, and a CMD_SYNC completes, while SID is stalled.
    copy(&b_dev, 0x2000, 0x4000, 0x6000);
    assert_eq!(b_dev.process(), 1);
    assert_eq!(record_at(&rig, 0x60_2000).status, CompletionStatus::Success);
    let mut got = vec![0u8; 0x1000];
    rig.mem.read(0x60_6000, &mut got).unwrap();
    assert_eq!(got, src);
    rig.submit(&[sync(0)]);
    assert_eq!(rig.smmu.stalled(Some(SID)), 1);
    assert!(!a.is_idle());
    // The fault is resolved: stream SID's copy completes with the bytes.
    rig.map(&mut b, 0x3000, 0x60_3000, RW_EL0);
    rig.resume(SID, e.stag, ResumeAction::Retry);
    assert_eq!(runner.join().unwrap(), 1);
    assert_eq!(record_at(&rig, 0x60_1000).status, CompletionStatus::Success);
    rig.mem.read(0x60_5000, &mut got).unwrap();
    assert_eq!(got, src);
    assert_eq!(rig.smmu.stalled(None), 0);
}
