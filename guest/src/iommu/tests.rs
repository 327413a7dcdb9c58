//! The driver against a register-level fake unit: the vtd register file, a queue
//! processor that logs every descriptor and performs status writes, and a virtual command
//! PASID allocator. What the driver writes is checked descriptor by descriptor and entry
//! by entry.

use std::sync::atomic::{AtomicBool, AtomicU32};

use super::*;
use crate::frames::tests::ram_and_frames;
use crate::process::{Process, Prot};
use proptest::prelude::*;
use vsva_vtd::context::read_context_entry;
use vsva_vtd::inv_desc::{
    IotlbGranularity, PasidCacheGranularity, PasidIotlbGranularity, ResponseCode,
};
use vsva_vtd::pasid::read_pasid_entry;
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::regs::{
    Iqei, RegEffect, RegEffects, RegisterFile, Ttm, VcmdResponse, VirtualCommand,
};
use vsva_vtd::{
    addr::Gva, flpte::FlPagingMode, inv_desc::AddrRange, inv_desc::InvDescType, pasid::PasidEntry,
    pasid::Pgtt, root::Capabilities, root::EntryChecks,
};

/// A remapping unit reduced to its registers and queue.
struct FakeUnit {
    regs: Mutex<RegisterFile>,
    mem: Arc<GuestMemoryMmap>,
    log: Mutex<Vec<InvDesc>>,
    next_pasid: Mutex<u32>,
    freed: Mutex<Vec<Pasid>>,
    /// Stop the queue once at the next descriptor of this type.
    reject: Mutex<Option<InvDescType>>,
    /// Never complete invalidation waits.
    stuck: AtomicBool,
    /// Time out this many device-TLB invalidations (ITE, aborting the pending waits).
    time_outs: AtomicU32,
    /// Overflow the page request queue (PRO) while this many page-request-draining waits
    /// run, as a device sending requests into a full queue during the drain.
    overflow_in_drains: AtomicU32,
}

fn cap() -> Cap {
    Cap {
        nd: 6,
        sagaw: 0b0100,
        mgaw: 47,
        fro: 0x40,
        psi: true,
        nfr: 7,
        mamv: 9,
        fl1gp: true,
        fl5lp: true,
        ..Cap::default()
    }
}

fn ecap() -> Ecap {
    Ecap {
        qi: true,
        dt: true,
        iro: 0x50,
        prs: true,
        srs: true,
        pss: 19,
        pasid: true,
        smts: true,
        vcs: true,
        flts: true,
        slts: true,
        nest: true,
        smpwcs: true,
        ..Ecap::default()
    }
}

const CAPS: Capabilities = Capabilities {
    haw: 48,
    sagaw: 0b0100,
    fl5lp: true,
    flts: true,
    slts: true,
    nest: true,
    pt: false,
    pasid: true,
    dt: true,
    prs: true,
    srs: true,
    ers: false,
    slads: false,
    eafs: false,
    sc: false,
    smpwc: true,
    mts: false,
};
const CHECKS: EntryChecks = EntryChecks::new(&CAPS);

impl FakeUnit {
    fn new(mem: Arc<GuestMemoryMmap>, cap: Cap, ecap: Ecap) -> Arc<Self> {
        Arc::new(FakeUnit {
            regs: Mutex::new(RegisterFile::new(cap, ecap).unwrap()),
            mem,
            log: Mutex::new(Vec::new()),
            next_pasid: Mutex::new(100),
            freed: Mutex::new(Vec::new()),
            reject: Mutex::new(None),
            stuck: AtomicBool::new(false),
            time_outs: AtomicU32::new(0),
            overflow_in_drains: AtomicU32::new(0),
        })
    }

    fn take_log(&self) -> Vec<InvDesc> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// The log without the waits, checking that each descriptor was followed by one.
    fn take_synced(&self) -> Vec<InvDesc> {
        let log = self.take_log();
        let mut out = Vec::new();
        let mut waiting = false;
        for d in log {
            if let InvDesc::InvWait { sw, .. } = d {
                assert!(sw, "every submission ends in a status-write wait");
                waiting = false;
            } else {
                assert!(!waiting, "{d:?} submitted without its own wait");
                out.push(d);
                waiting = true;
            }
        }
        assert!(!waiting);
        out
    }

    fn process_queue(&self) {
        loop {
            let mut regs = self.regs.lock().unwrap();
            let Some(addr) = regs.next_inv_desc() else {
                return;
            };
            let mut raw = [0u64; 4];
            for (i, q) in raw.iter_mut().enumerate() {
                *q = self.mem.read_u64(addr + 8 * i as u64).unwrap();
            }
            let desc = InvDesc::decode(raw).unwrap();
            let mut reject = self.reject.lock().unwrap();
            if *reject == Some(desc.desc_type()) {
                *reject = None;
                regs.set_iqe(Iqei::InvalidType);
                return;
            }
            let device_tlb = matches!(
                desc.desc_type(),
                InvDescType::DevIotlb | InvDescType::PasidDevIotlb
            );
            if device_tlb && self.time_outs.load(Ordering::SeqCst) > 0 {
                self.time_outs.fetch_sub(1, Ordering::SeqCst);
                // §6.5.2.10: the time-out is reported and every pending wait aborted.
                regs.set_ite(SID);
                while regs.next_inv_desc().is_some() {
                    regs.advance_iqh().unwrap();
                }
                return;
            }
            if let InvDesc::InvWait { pd: true, .. } = desc {
                let left = self.overflow_in_drains.load(Ordering::SeqCst);
                if left > 0 {
                    self.overflow_in_drains.store(left - 1, Ordering::SeqCst);
                    let _ = regs.pq_overflow();
                }
            }
            if let InvDesc::InvWait {
                sw: true,
                status_data,
                status_addr,
                ..
            } = desc
            {
                if self.stuck.load(Ordering::SeqCst) {
                    return;
                }
                self.mem
                    .write(status_addr, &status_data.to_le_bytes())
                    .unwrap();
            }
            self.log.lock().unwrap().push(desc);
            regs.advance_iqh().unwrap();
        }
    }

    /// Queues a page request as the unit does when a device sends one.
    fn page_request(&self, desc: &PageRequestDesc) {
        let mut regs = self.regs.lock().unwrap();
        let slot = regs.pq_tail_slot().unwrap();
        for (i, q) in desc.encode().iter().enumerate() {
            self.mem.write_u64(slot + 8 * i as u64, *q).unwrap();
        }
        regs.pq_advance_tail().unwrap();
    }
}

impl Mmio for FakeUnit {
    fn read(&self, offset: u64, size: usize) -> u64 {
        self.regs.lock().unwrap().read(offset, size).unwrap_or(!0)
    }

    fn write(&self, offset: u64, size: usize, value: u64) {
        let mut effects = RegEffects::new();
        self.regs
            .lock()
            .unwrap()
            .write(offset, size, value, &mut effects)
            .unwrap();
        for e in effects {
            match e {
                RegEffect::ProcessInvalidationQueue => self.process_queue(),
                RegEffect::VirtualCommand(cmd) => {
                    let rsp = match cmd {
                        VirtualCommand::AllocPasid => {
                            let mut next = self.next_pasid.lock().unwrap();
                            *next += 1;
                            VcmdResponse::Allocated(Pasid::new(*next - 1).unwrap())
                        }
                        VirtualCommand::FreePasid(Some(p)) => {
                            self.freed.lock().unwrap().push(p);
                            VcmdResponse::Freed
                        }
                        _ => VcmdResponse::InvalidCommand,
                    };
                    self.regs
                        .lock()
                        .unwrap()
                        .complete_virtual_command(rsp)
                        .unwrap();
                }
                _ => {}
            }
        }
    }
}

const SID: SourceId = SourceId::from_rid(0x0310);

fn device() -> DeviceConfig {
    DeviceConfig {
        sid: SID,
        pasid_bits: 20,
        ats: true,
        pri: true,
        // 0: 32, so device-TLB invalidations carry MIP 0.
        ats_queue_depth: 0,
    }
}

struct Setup {
    mem: Arc<GuestMemoryMmap>,
    frames: Arc<GuestFrames>,
    unit: Arc<FakeUnit>,
    driver: Arc<IommuDriver>,
}

fn setup_with(cap: Cap, ecap: Ecap) -> Setup {
    let (mem, frames) = ram_and_frames();
    let unit = FakeUnit::new(mem.clone(), cap, ecap);
    let driver = IommuDriver::init(unit.clone(), frames.clone()).unwrap();
    unit.take_log();
    Setup {
        mem,
        frames,
        unit,
        driver,
    }
}

fn setup() -> Setup {
    setup_with(cap(), ecap())
}

impl Setup {
    fn process(&self) -> Arc<Process> {
        Arc::new(
            Process::new(
                self.mem.clone(),
                self.frames.clone(),
                FlPagingMode::FourLevel,
            )
            .unwrap(),
        )
    }

    fn pasid_entry(&self, pasid: Pasid) -> Result<PasidEntry, vsva_vtd::root::EntryFault> {
        let ctx = read_context_entry(&*self.mem, self.driver.root_table().0, SID, &CHECKS)?;
        read_pasid_entry(&*self.mem, &ctx, pasid, &CHECKS).map(|e| e.decode())
    }
}

fn regs(unit: &FakeUnit) -> std::sync::MutexGuard<'_, RegisterFile> {
    unit.regs.lock().unwrap()
}

#[test]
fn init_programs_the_unit_as_linux_does() {
    let (mem, frames) = ram_and_frames();
    let unit = FakeUnit::new(mem.clone(), cap(), ecap());
    let driver = IommuDriver::init(unit.clone(), frames.clone()).unwrap();
    let r = regs(&unit);
    assert_eq!(
        r.gsts() & (gsts::TES | gsts::QIES | gsts::RTPS),
        gsts::TES | gsts::QIES | gsts::RTPS
    );
    let rt = r.root_table();
    assert_eq!((rt.addr, rt.ttm), (driver.root_table().0, Ttm::Scalable));
    let iqa = r.read(offset::IQA, 8).unwrap();
    assert_eq!(iqa & 0xfff, vsva_vtd::regs::layout::iq::IQA_DW | 1);
    let q = r.inv_queue().unwrap();
    assert_eq!((q.desc_size, q.entries), (32, 256));
    let prq = r.page_request_queue().unwrap();
    assert_eq!((prq.entries, prq.head, prq.tail), (128, 0, 0));
    assert_ne!(prq.base, 0);
    assert_eq!(r.read(offset::PECTL, 4).unwrap(), 0);
    assert_eq!(
        r.read(offset::PEDATA, 4).unwrap(),
        u64::from(PAGE_REQUEST_VECTOR)
    );
    drop(r);
    // Global context-cache and IOTLB flushes after the root table, each waited for.
    let log = unit.take_synced();
    assert!(matches!(
        log[..],
        [
            InvDesc::ContextCache {
                granularity: ContextCacheGranularity::Global,
                ..
            },
            InvDesc::Iotlb {
                granularity: IotlbGranularity::Global,
                ..
            }
        ]
    ));
    assert!(driver.uses_virtual_commands());
    // Root table, queue (2 pages), status page, page request queue.
    assert_eq!(frames.allocated_frames(), 5);
}

#[test]
fn init_refuses_units_without_scalable_mode_or_qi() {
    let (mem, frames) = ram_and_frames();
    for (e, what) in [
        (
            Ecap {
                smts: false,
                ..ecap()
            },
            "scalable-mode translation (ECAP.SMTS)",
        ),
        (
            Ecap {
                qi: false,
                ..ecap()
            },
            "queued invalidation (ECAP.QI)",
        ),
    ] {
        let unit = FakeUnit::new(mem.clone(), cap(), e);
        assert_eq!(
            IommuDriver::init(unit.clone(), frames.clone()).unwrap_err(),
            GuestIommuError::Unsupported(what)
        );
        assert_eq!(regs(&unit).gsts(), 0);
    }
    assert_eq!(frames.allocated_frames(), 0);
}

#[test]
fn a_stuck_unit_is_reported_not_waited_for_forever() {
    let (mem, frames) = ram_and_frames();
    let unit = FakeUnit::new(mem, cap(), ecap());
    unit.stuck.store(true, Ordering::SeqCst);
    assert_eq!(
        IommuDriver::init(unit, frames).unwrap_err(),
        GuestIommuError::Timeout("invalidation wait status")
    );
}

#[test]
fn attach_writes_the_context_entry() {
    let s = setup();
    s.driver.attach_device(device()).unwrap();
    let ctx = read_context_entry(&*s.mem, s.driver.root_table().0, SID, &CHECKS).unwrap();
    assert!(ctx.paside && ctx.pre && ctx.dte && !ctx.fpd);
    // 2^20 PASIDs: a 128 KiB directory, PDTS 7.
    assert_eq!(ctx.pdts, 7);
    assert_eq!(ctx.rid_pasid, Pasid::RID_PASID);
    // Not caching mode: no context-cache invalidation needed.
    assert!(s.unit.take_log().is_empty());
    assert_eq!(
        s.driver.attach_device(device()),
        Err(GuestIommuError::AlreadyAttached(SID))
    );

    // A device without ATS and PRI, on the upper context table, with 8 PASID bits.
    let other = SourceId::from_rid(0x0388);
    s.driver
        .attach_device(DeviceConfig {
            sid: other,
            pasid_bits: 8,
            ats: false,
            pri: false,
            ats_queue_depth: 0,
        })
        .unwrap();
    let ctx = read_context_entry(&*s.mem, s.driver.root_table().0, other, &CHECKS).unwrap();
    assert!(ctx.paside && !ctx.pre && !ctx.dte);
    assert_eq!(ctx.pdts, 2);
}

#[test]
fn caching_mode_flushes_the_context_cache_on_attach() {
    let s = setup_with(Cap { cm: true, ..cap() }, ecap());
    s.driver.attach_device(device()).unwrap();
    assert_eq!(
        s.unit.take_synced(),
        vec![InvDesc::ContextCache {
            granularity: ContextCacheGranularity::DeviceSelective,
            did: DomainId(0),
            sid: SID,
            fm: 0
        }]
    );
}

#[test]
fn bind_writes_a_first_level_entry_then_flushes_in_linux_order() {
    // Without CAP.CM, `pasid_flush_caches` flushes only the write buffer: no descriptor.
    let s = setup();
    s.driver.attach_device(device()).unwrap();
    s.unit.take_log();
    let p = s.process();
    s.driver.sva_bind(SID, &p).unwrap();
    assert!(s.unit.take_log().is_empty());
    assert_eq!(s.driver.stats().invalidations, 2);

    // With CM, the PASID cache and the PASID's IOTLB, and no device TLB (F16).
    let s = setup_with(Cap { cm: true, ..cap() }, ecap());
    s.driver.attach_device(device()).unwrap();
    s.unit.take_log();
    let p = s.process();
    let pasid = s.driver.sva_bind(SID, &p).unwrap();
    // From the unit's virtual command interface.
    assert_eq!(pasid.raw(), 100);
    let e = s.pasid_entry(pasid).unwrap();
    assert_eq!(e.pgtt, Pgtt::FirstLevel);
    assert_eq!(e.flptptr, p.cr3().0);
    assert_eq!(e.flpm, FlPagingMode::FourLevel);
    assert_eq!(e.did, FLPT_DEFAULT_DID);
    assert_eq!(e.aw, SlLevels::Four);
    assert!(e.nxe && e.pwsnp && !e.sre && !e.fpd && !e.wpe);
    assert_eq!(
        s.unit.take_synced(),
        vec![
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::PasidSelective,
                did: FLPT_DEFAULT_DID,
                pasid
            },
            InvDesc::PasidIotlb {
                granularity: PasidIotlbGranularity::PasidSelective,
                did: FLPT_DEFAULT_DID,
                pasid,
                addr: 0,
                ih: false,
                am: 0
            },
        ]
    );
    // After the two of init and attach's context-cache flush (CM).
    assert_eq!(s.driver.stats().invalidations, 2 + 1 + 2);
    assert_eq!(s.driver.stats().waits, 2 + 1 + 2);
    assert_eq!(s.driver.bound_pasids(), vec![(pasid, p.cr3())]);

    // Binding again: the same PASID, nothing written.
    assert_eq!(s.driver.sva_bind(SID, &p).unwrap(), pasid);
    assert!(s.unit.take_log().is_empty());
    // Another process gets another PASID.
    let q = s.process();
    assert_eq!(s.driver.sva_bind(SID, &q).unwrap().raw(), 101);

    // Unbinding with CM: no device-TLB invalidation in the teardown (F16); the drain
    // still has its own.
    s.unit.take_log();
    s.driver.sva_unbind(SID, pasid).unwrap();
    s.driver.sva_unbind(SID, pasid).unwrap();
    let kinds: Vec<InvDescType> = s.unit.take_log().iter().map(InvDesc::desc_type).collect();
    use InvDescType::*;
    assert_eq!(
        kinds,
        [
            PasidCache,
            InvWait,
            PasidIotlb,
            InvWait,
            InvWait,
            PasidIotlb,
            PasidDevIotlb,
            InvWait
        ]
    );
}

#[test]
fn local_pasids_without_virtual_commands() {
    let s = setup_with(
        cap(),
        Ecap {
            vcs: false,
            ..ecap()
        },
    );
    assert!(!s.driver.uses_virtual_commands());
    s.driver.attach_device(device()).unwrap();
    let (a, b) = (s.process(), s.process());
    let pa = s.driver.sva_bind(SID, &a).unwrap();
    let pb = s.driver.sva_bind(SID, &b).unwrap();
    assert_eq!((pa.raw(), pb.raw()), (1, 2));
    s.driver.sva_unbind(SID, pa).unwrap();
    let c = s.process();
    assert_eq!(s.driver.sva_bind(SID, &c).unwrap().raw(), 1);
}

#[test]
fn bind_refusals() {
    let s = setup();
    let p = s.process();
    assert_eq!(
        s.driver.sva_bind(SID, &p),
        Err(GuestIommuError::NotAttached(SID))
    );
    s.driver
        .attach_device(DeviceConfig {
            pasid_bits: 0,
            ..device()
        })
        .unwrap();
    assert_eq!(
        s.driver.sva_bind(SID, &p),
        Err(GuestIommuError::NoPasidSupport(SID))
    );
    let five =
        Arc::new(Process::new(s.mem.clone(), s.frames.clone(), FlPagingMode::FiveLevel).unwrap());
    let no5 = setup_with(
        Cap {
            fl5lp: false,
            ..cap()
        },
        ecap(),
    );
    no5.driver.attach_device(device()).unwrap();
    assert_eq!(
        no5.driver.sva_bind(SID, &five),
        Err(GuestIommuError::Unsupported(
            "5-level first-level paging (CAP.FL5LP)"
        ))
    );
    assert!(s.unit.freed.lock().unwrap().is_empty());
    assert_eq!(
        s.driver.sva_unbind(SID, Pasid::new(5).unwrap()),
        Err(GuestIommuError::NotBound {
            sid: SID,
            pasid: Pasid::new(5).unwrap()
        })
    );
}

/// With ECAP.DIT the device-TLB invalidations name the physical function (the device
/// itself: no VFs), as Linux's `info->pfsid`; without it the field is 0 (F6).
#[test]
fn device_tlb_invalidations_carry_the_pfsid_only_with_dit() {
    for (dit, want) in [(true, SID), (false, SourceId::from_rid(0))] {
        let s = setup_with(cap(), Ecap { dit, ..ecap() });
        s.driver.attach_device(device()).unwrap();
        let p = s.process();
        let va = p.mmap(4096, Prot::READ_WRITE).unwrap();
        s.driver.sva_bind(SID, &p).unwrap();
        s.unit.take_log();
        p.munmap(va, 4096).unwrap();
        let pfsids: Vec<SourceId> = s
            .unit
            .take_synced()
            .iter()
            .filter_map(|d| match d {
                InvDesc::PasidDevIotlb { pfsid, .. } => Some(*pfsid),
                _ => None,
            })
            .collect();
        assert_eq!(pfsids, [want], "DIT {dit}");
    }
}

#[test]
fn munmap_and_mprotect_invalidate_the_range() {
    let s = setup();
    s.driver.attach_device(device()).unwrap();
    let p = s.process();
    let va = p.mmap(16 * 4096, Prot::READ_WRITE).unwrap();
    let pasid = s.driver.sva_bind(SID, &p).unwrap();
    s.unit.take_log();

    // Pages 3..6 of an area at a 64 KiB boundary: the aligned block 0..8 (AM 3).
    p.munmap(Gva(va.0 + 3 * 4096), 3 * 4096).unwrap();
    let log = s.unit.take_synced();
    assert_eq!(
        log,
        vec![
            InvDesc::PasidIotlb {
                granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
                did: FLPT_DEFAULT_DID,
                pasid,
                addr: va.0,
                ih: false,
                am: 3
            },
            InvDesc::PasidDevIotlb {
                sid: SID,
                // No ECAP.DIT: the field is reserved (F6).
                pfsid: SourceId::from_rid(0),
                pasid,
                max_invs_pend: 0,
                addr: va.0 | 0x3000,
                size: true,
                global: false
            },
        ]
    );
    for d in &log {
        let r = d.range().unwrap();
        assert!(r.contains(va.0 + 3 * 4096) && r.contains(va.0 + 6 * 4096 - 1));
    }
    // One page: no size bit.
    p.mprotect(Gva(va.0 + 9 * 4096), 4096, Prot::READ).unwrap();
    let log = s.unit.take_synced();
    assert!(matches!(
        log[..],
        [
            InvDesc::PasidIotlb { am: 0, .. },
            InvDesc::PasidDevIotlb { size: false, .. }
        ]
    ));
    assert_eq!(
        log[0].range(),
        Some(AddrRange::from_address_mask(va.0 + 9 * 4096, 0))
    );
    assert_eq!(s.driver.stats().range_invalidations, 4);

    // Beyond CAP.MAMV (9): the whole PASID.
    let big = p.mmap_lazy(2048 * 4096, Prot::READ).unwrap();
    p.munmap(big, 2048 * 4096).unwrap();
    assert!(matches!(
        s.unit.take_synced()[0],
        InvDesc::PasidIotlb {
            granularity: PasidIotlbGranularity::PasidSelective,
            ..
        }
    ));
}

#[test]
fn page_requests_fault_pages_in_and_are_answered() {
    let s = setup();
    s.driver.attach_device(device()).unwrap();
    let p = s.process();
    let lazy = p.mmap_lazy(4 * 4096, Prot::READ_WRITE).unwrap();
    let ro = p.mmap_lazy(4096, Prot::READ).unwrap();
    let pasid = s.driver.sva_bind(SID, &p).unwrap();
    s.unit.take_log();
    let req = |addr: u64, write: bool, prgi: u16| PageRequestDesc {
        rid: SID,
        pasid: Some(pasid),
        exe: false,
        pm: false,
        read: !write,
        write,
        lpig: true,
        prg_index: prgi,
        addr,
        private_data: None,
    };
    s.unit.page_request(&req(lazy.0 + 4096, true, 7));
    s.unit.page_request(&req(ro.0, true, 8));
    s.unit.page_request(&PageRequestDesc {
        pasid: None,
        ..req(lazy.0, false, 9)
    });
    s.unit.page_request(&PageRequestDesc {
        pasid: Some(Pasid::new(999).unwrap()),
        ..req(lazy.0, false, 10)
    });
    // Not the last of its group, with private data: answered because of the data.
    s.unit.page_request(&PageRequestDesc {
        lpig: false,
        private_data: Some([0x1234, 0x5678]),
        ..req(lazy.0 + 2 * 4096, false, 11)
    });
    // Not the last, no data: served, not answered.
    s.unit.page_request(&PageRequestDesc {
        lpig: false,
        ..req(lazy.0 + 3 * 4096, false, 12)
    });

    assert_eq!(s.driver.handle_page_requests(), 6);
    assert_eq!(p.resident_pages(), 3);
    assert!(p.translate(Gva(lazy.0 + 4096)).is_some());
    let responses: Vec<(u16, ResponseCode, bool, [u64; 2])> = s
        .unit
        .take_synced()
        .into_iter()
        .map(|d| match d {
            InvDesc::PageGroupResponse {
                rid,
                prg_index,
                response,
                private_data_present,
                private_data,
                ..
            } => {
                assert_eq!(rid, SID);
                (prg_index, response, private_data_present, private_data)
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        responses,
        vec![
            (7, ResponseCode::Success, false, [0, 0]),
            (8, ResponseCode::InvalidRequest, false, [0, 0]),
            (9, ResponseCode::InvalidRequest, false, [0, 0]),
            (10, ResponseCode::InvalidRequest, false, [0, 0]),
            (11, ResponseCode::Success, true, [0x1234, 0x5678]),
        ]
    );
    let r = regs(&s.unit);
    let q = r.page_request_queue().unwrap();
    assert_eq!(q.head, q.tail);
    assert_eq!(r.prs(), 0);
    drop(r);
    let st = s.driver.stats();
    assert_eq!(
        (st.page_requests, st.page_requests_served, st.page_responses),
        (6, 3, 5)
    );
    // Responses are not invalidations: init's two only (bind without CM flushes the write
    // buffer).
    assert_eq!(st.invalidations, 2);
    assert_eq!(s.driver.handle_page_requests(), 0);
}

#[test]
fn unbind_clears_flushes_drains_and_frees() {
    let s = setup();
    s.driver.attach_device(device()).unwrap();
    let p = s.process();
    let va = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let pasid = s.driver.sva_bind(SID, &p).unwrap();
    s.driver.sva_bind(SID, &p).unwrap();
    s.unit.take_log();
    // The first unbind only drops a user.
    s.driver.sva_unbind(SID, pasid).unwrap();
    assert!(s.unit.take_log().is_empty());
    assert!(s.pasid_entry(pasid).is_ok());

    s.driver.sva_unbind(SID, pasid).unwrap();
    assert_eq!(
        s.pasid_entry(pasid).unwrap_err().reason,
        vsva_vtd::fault::FaultReason::Spt2
    );
    let log = s.unit.take_log();
    let kinds: Vec<InvDescType> = log.iter().map(InvDesc::desc_type).collect();
    use InvDescType::*;
    assert_eq!(
        kinds,
        vec![
            PasidCache,
            InvWait,
            PasidIotlb,
            InvWait,
            PasidDevIotlb,
            InvWait,
            // The drain: fenced wait, IOTLB, device TLB, wait with page-request drain.
            InvWait,
            PasidIotlb,
            PasidDevIotlb,
            InvWait,
        ]
    );
    assert!(matches!(log[6], InvDesc::InvWait { fence: true, .. }));
    assert!(matches!(
        log[9],
        InvDesc::InvWait {
            pd: true,
            sw: true,
            ..
        }
    ));
    assert_eq!(*s.unit.freed.lock().unwrap(), vec![pasid]);
    assert!(s.driver.bound_pasids().is_empty());
    // The notifier is gone: unmapping invalidates nothing.
    p.munmap(va, 4096).unwrap();
    assert!(s.unit.take_log().is_empty());
    assert_eq!(
        s.driver.sva_unbind(SID, pasid),
        Err(GuestIommuError::NotBound { sid: SID, pasid })
    );
}

#[test]
fn detach_gives_back_every_frame() {
    let s = setup();
    let base = s.frames.allocated_frames();
    s.driver.attach_device(device()).unwrap();
    let p = s.process();
    let pasid = s.driver.sva_bind(SID, &p).unwrap();
    assert_eq!(s.driver.detach_device(SID), Err(GuestIommuError::Busy(SID)));
    s.driver.sva_unbind(SID, pasid).unwrap();
    drop(p);
    s.driver.detach_device(SID).unwrap();
    // The context table stays, as in Linux.
    assert_eq!(s.frames.allocated_frames(), base + 1);
    assert_eq!(
        read_context_entry(&*s.mem, s.driver.root_table().0, SID, &CHECKS)
            .unwrap_err()
            .reason,
        vsva_vtd::fault::FaultReason::Sct2
    );
    assert_eq!(
        s.driver.detach_device(SID),
        Err(GuestIommuError::NotAttached(SID))
    );
}

#[test]
fn a_queue_error_is_reported_and_the_queue_recovers() {
    // CM: bind flushes the PASID cache.
    let s = setup_with(Cap { cm: true, ..cap() }, ecap());
    s.driver.attach_device(device()).unwrap();
    let p = s.process();
    *s.unit.reject.lock().unwrap() = Some(InvDescType::PasidCache);
    assert_eq!(
        s.driver.sva_bind(SID, &p),
        Err(GuestIommuError::InvalidationQueue {
            iqei: Iqei::InvalidType as u8
        })
    );
    assert_eq!(regs(&s.unit).fsts() & fsts::IQE, 0);
    // The queue runs again.
    let q = s.process();
    s.driver.sva_bind(SID, &q).unwrap();
}

/// A device-TLB time-out (FSTS.ITE) aborts the wait; as Linux's `qi_submit_sync` the
/// driver clears ITE and submits the batch again. The host driver shares this queue.
#[test]
fn a_device_tlb_time_out_is_resubmitted() {
    use InvDescType::*;
    let s = setup();
    s.driver.attach_device(device()).unwrap();
    let p = s.process();
    let va = p.mmap(4096, Prot::READ_WRITE).unwrap();
    let pasid = s.driver.sva_bind(SID, &p).unwrap();
    s.unit.take_log();
    s.unit.time_outs.store(1, Ordering::SeqCst);
    p.munmap(va, 4096).unwrap();
    let kinds: Vec<InvDescType> = s.unit.take_log().iter().map(InvDesc::desc_type).collect();
    assert_eq!(kinds, [PasidIotlb, InvWait, PasidDevIotlb, InvWait]);
    assert_eq!(regs(&s.unit).fsts() & fsts::ITE, 0);
    // A device that never completes fails the flush; the queue still works afterwards.
    s.unit.time_outs.store(u32::MAX, Ordering::SeqCst);
    assert_eq!(
        s.driver.sva_unbind(SID, pasid),
        Err(GuestIommuError::InvalidationTimeout)
    );
    assert_eq!(regs(&s.unit).fsts() & fsts::ITE, 0);
    s.unit.time_outs.store(0, Ordering::SeqCst);
    s.driver.sva_bind(SID, &s.process()).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The invalidations of any munmap cover the whole range: the device-TLB one with the
    /// smallest naturally aligned block that holds it, the IOTLB one with the same block,
    /// or the whole PASID when the block needs an address mask above CAP.MAMV.
    #[test]
    fn range_invalidations_cover_the_range(first in 0u64..4096, pages in 1u64..600) {
        let s = setup();
        s.driver.attach_device(device()).unwrap();
        let p = s.process();
        let start = 0x10_0000_0000u64 + first * 4096;
        p.mmap_fixed(Gva(start), pages * 4096, Prot::READ, false).unwrap();
        s.driver.sva_bind(SID, &p).unwrap();
        s.unit.take_log();
        p.munmap(Gva(start), pages * 4096).unwrap();
        let log = s.unit.take_synced();
        prop_assert_eq!(log.len(), 2);
        let end = start + pages * 4096 - 1;
        let dev = log[1].range().unwrap();
        prop_assert!(dev.contains(start) && dev.contains(end));
        let size = dev.last - dev.start + 1;
        // Minimal: each half of the block misses one end of the range.
        prop_assert!(size == 4096 || (start - dev.start) / (size / 2) != (end - dev.start) / (size / 2));
        match log[0] {
            InvDesc::PasidIotlb { granularity: PasidIotlbGranularity::PasidSelective, .. } => {
                prop_assert!(size > 4096 << 9);
            }
            d => prop_assert_eq!(d.range(), Some(dev)),
        }
    }
}

/// F12: the unbind's page-request drain (`intel_svm_drain_prq`) is submitted again, the
/// queue served in between, while PRS.PRO is set after it (a request overflowed the queue
/// during the drain); at most `PRO_RETRIES` times; and not at all for a device without PRI.
#[test]
fn the_unbind_drain_repeats_while_pro_is_set_and_needs_pri() {
    let bound = vsva_vtd_driver::PRO_RETRIES as u32;
    for (pri, overflows, drains) in [
        (true, 0, 1),
        (true, 1, 2),
        (true, 3, 4),
        (true, bound + 5, bound as usize + 1),
        (false, 1, 0),
    ] {
        let s = setup();
        s.driver
            .attach_device(DeviceConfig { pri, ..device() })
            .unwrap();
        let p = s.process();
        let pasid = s.driver.sva_bind(SID, &p).unwrap();
        s.unit.take_log();
        s.unit.overflow_in_drains.store(overflows, Ordering::SeqCst);
        s.driver.sva_unbind(SID, pasid).unwrap();
        let pd_waits = s
            .unit
            .take_log()
            .iter()
            .filter(|d| matches!(d, InvDesc::InvWait { pd: true, .. }))
            .count();
        assert_eq!(pd_waits, drains, "PRI {pri}, {overflows} overflows");
    }
}

/// F7: device-TLB invalidations carry the device's ATS Invalidate Queue Depth as MIP,
/// 0 for a depth of 32 (the capability field's 0).
#[test]
fn device_tlb_invalidations_carry_the_queue_depth() {
    for (ats_queue_depth, want) in [(5, 5), (31, 31), (0, 0)] {
        let s = setup();
        s.driver
            .attach_device(DeviceConfig {
                ats_queue_depth,
                ..device()
            })
            .unwrap();
        let p = s.process();
        let va = p.mmap(4096, Prot::READ_WRITE).unwrap();
        s.driver.sva_bind(SID, &p).unwrap();
        s.unit.take_log();
        p.munmap(va, 4096).unwrap();
        let mips: Vec<u8> = s
            .unit
            .take_synced()
            .iter()
            .filter_map(|d| match d {
                InvDesc::PasidDevIotlb { max_invs_pend, .. } => Some(*max_invs_pend),
                _ => None,
            })
            .collect();
        assert_eq!(mips, [want], "queue depth field {ats_queue_depth}");
    }
}
