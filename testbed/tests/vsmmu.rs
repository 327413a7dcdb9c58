//! The virtual SMMUv3 driven by the arm-smmu-v3 driver library a guest kernel runs
//! (`vsva-smmuv3-driver`), over a host stand-in that records every call: guest STEs become
//! PASID table attaches and detaches, guest TLB, CD and ATC invalidations become cache
//! invalidations before their CMD_SYNC completes, host faults and page requests reach the
//! guest's queues, and a hostile guest gets CERROR_ILL, C_BAD_STE and C_BAD_STREAMID with
//! no host call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use vsva_mem::PhysMem;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vsva_smmuv3::regs::{cr0, gerror, offset, GBPA_UPDATE};
use vsva_smmuv3::{
    cd::ContextDescriptor, cmd::Cmd, cmd::PriResp, cmd::ResumeAction, cmd::SyncCs, cmd::TlbiAddr,
    event::Event, event::EventType, features::StallModel, lookup::L1Std, priq::PriqEntry,
    regs::RegError, ste::Config, ste::Eats, ste::S1Dss, ste::S1Fmt, ste::Ste,
};
use vsva_smmuv3_driver::{DmaAlloc, DriverConfig, Registers, SmmuDriver, TlbiStage, STRTAB_SPLIT};
use vsva_uapi::iommu::{
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_CACHE_INV_TYPE_PASID,
};
use vsva_uapi::{
    error::Errno, request::BindGpasid, request::CacheInvalidate, request::InvGranularity,
    request::PageRequest, request::PageResponse, request::PageResponseCode, request::PasidConfig,
    request::PasidTableConfig, request::UnrecoverableFault, request::UnrecoverableReason,
};
use vsva_vmm::{
    host_invalidation, HostCall, HostConfig, HostPasidTable, HostSva, PasidSource, PriOutcome,
    VSmmu, VSmmuConfig, VSmmuError,
};
use vsva_vtd::{addr::Gpa, addr::Pasid, addr::SourceId};

const RAM: u64 = 32 << 20;
const SID: u32 = 0x10;
const ASID: u16 = 0x21;

fn host_sid() -> SourceId {
    SourceId::new(0x3a, 0, 0).unwrap()
}

fn pasid(p: u32) -> Pasid {
    Pasid::new(p).unwrap()
}

/// What the host was asked, with CMDQ_CONS as it was at the call.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Attach(PasidTableConfig),
    Detach,
    Invalidate(CacheInvalidate),
    Response(SourceId, PageResponse),
}

#[derive(Default)]
struct MockHost {
    calls: Mutex<Vec<(Call, u32)>>,
    refuse_translate: AtomicBool,
    smmu: OnceLock<Weak<VSmmu>>,
}

impl MockHost {
    fn record(&self, call: Call) {
        let cons = self
            .smmu
            .get()
            .and_then(Weak::upgrade)
            .map_or(0, |s| s.read(offset::CMDQ_CONS, 4).unwrap() as u32);
        self.calls.lock().unwrap().push((call, cons));
    }

    fn take(&self) -> Vec<Call> {
        self.take_with_cons().into_iter().map(|(c, _)| c).collect()
    }

    fn take_with_cons(&self) -> Vec<(Call, u32)> {
        std::mem::take(&mut self.calls.lock().unwrap())
    }
}

impl PasidSource for MockHost {
    fn pasid_alloc(&self, _min: u32, _max: u32) -> Result<Pasid, Errno> {
        Err(Errno::ENODEV)
    }
    fn pasid_free(&self, _pasid: Pasid) -> Result<(), Errno> {
        Err(Errno::ENODEV)
    }
}

impl HostSva for MockHost {
    fn bind_gpasid(&self, _bind: &BindGpasid) -> Result<(), Errno> {
        panic!("the vSMMU never binds a PASID");
    }
    fn unbind_gpasid(&self, _bind: &BindGpasid) -> Result<(), Errno> {
        panic!("the vSMMU never unbinds a PASID");
    }
    fn cache_invalidate(&self, inv: &CacheInvalidate) -> Result<(), Errno> {
        self.record(Call::Invalidate(*inv));
        Ok(())
    }
    fn page_response(&self, host_sid: SourceId, resp: &PageResponse) -> Result<(), Errno> {
        self.record(Call::Response(host_sid, *resp));
        Ok(())
    }
}

impl HostPasidTable for MockHost {
    fn attach_pasid_table(&self, cfg: &PasidTableConfig) -> Result<(), Errno> {
        if self.refuse_translate.load(Ordering::Relaxed)
            && matches!(cfg.config, PasidConfig::Translate { .. })
        {
            return Err(Errno::EINVAL);
        }
        self.record(Call::Attach(*cfg));
        Ok(())
    }
    fn detach_pasid_table(&self) -> Result<(), Errno> {
        self.record(Call::Detach);
        Ok(())
    }
}

/// The guest kernel's register accessor: MMIO to the vSMMU.
struct Mmio(Arc<VSmmu>);

impl Registers for Mmio {
    fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        self.0.read(offset, size).map_err(reg_error)
    }
    fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
        self.0.write(offset, size, value).map_err(reg_error)
    }
}

fn reg_error(e: VSmmuError) -> RegError {
    match e {
        VSmmuError::Register(r) => r,
        e => panic!("a register access failed with {e}"),
    }
}

/// The guest kernel's coherent DMA memory: from 1 MiB up.
#[derive(Default)]
struct Bump {
    next: u64,
    live: BTreeMap<u64, u64>,
}

impl DmaAlloc for Bump {
    fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let at = self.next.max(1 << 20).next_multiple_of(align);
        self.next = at + size;
        (self.next <= 16 << 20).then(|| {
            self.live.insert(at, size);
            at
        })
    }
    fn free(&mut self, addr: u64, size: u64) {
        assert_eq!(self.live.remove(&addr), Some(size));
    }
}

type GuestDriver = SmmuDriver<Mmio, Arc<GuestMemoryMmap>, Bump>;

struct Vm {
    mem: Arc<GuestMemoryMmap>,
    smmu: Arc<VSmmu>,
    host: Arc<MockHost>,
}

impl Vm {
    /// A VM with one passthrough device (StreamID `SID`) before the guest driver runs.
    fn new() -> Vm {
        Vm::with_config(VSmmuConfig::default())
    }

    /// A VM whose vSMMU offers stalls (IDR0.STALL_MODEL 0b00) and whose device stalls.
    fn stalling() -> Vm {
        let mut config = VSmmuConfig::default();
        config.features.stall_model = StallModel::StallAndTerminate;
        let vm = Vm::with_config(config);
        vm.smmu.set_stall_capable(SID, true).unwrap();
        vm
    }

    fn with_config(config: VSmmuConfig) -> Vm {
        let mem =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
        let smmu = VSmmu::new(mem.clone(), config).unwrap();
        let host = Arc::new(MockHost::default());
        host.smmu.set(Arc::downgrade(&smmu)).unwrap();
        smmu.attach_passthrough(SID, host_sid(), host.clone())
            .unwrap();
        Vm { mem, smmu, host }
    }

    /// The guest driver probes, resets and enables the vSMMU.
    fn driver(&self) -> GuestDriver {
        SmmuDriver::new(
            Mmio(self.smmu.clone()),
            self.mem.clone(),
            Bump::default(),
            DriverConfig::default(),
        )
        .unwrap()
    }
}

/// The guest's STE for an SVA-capable device: stage 1 from `table`, ATS on.
fn s1_ste(base: u64, s1cdmax: u8, s1fmt: S1Fmt) -> Ste {
    Ste {
        s1_context_ptr: base,
        s1cdmax,
        s1fmt,
        s1dss: S1Dss::Bypass,
        eats: Eats::Full,
        ..Ste::new(Config::S1Trans)
    }
}

fn translate(base: u64, pasid_bits: u8, s1fmt: S1Fmt) -> PasidTableConfig {
    PasidTableConfig {
        base_ptr: Gpa(base),
        pasid_bits,
        config: PasidConfig::Translate {
            s1fmt: s1fmt as u8,
            s1dss: S1Dss::Bypass as u8,
        },
    }
}

const ABORT: PasidTableConfig = PasidTableConfig {
    base_ptr: Gpa(0),
    pasid_bits: 0,
    config: PasidConfig::Abort,
};

/// A VM whose guest has enabled the vSMMU and given the device a CD table of 2^4 CDs with
/// CD 1 live; returns the table base.
fn translating() -> (Vm, GuestDriver, u64) {
    translating_on(Vm::new())
}

fn translating_on(vm: Vm) -> (Vm, GuestDriver, u64) {
    let mut drv = vm.driver();
    let mut table = drv.alloc_cd_table(4).unwrap();
    drv.write_cd(
        &mut table,
        &[SID],
        1,
        Some(&ContextDescriptor::new(0x40_0000, 16, ASID)),
    )
    .unwrap();
    let base = table.base();
    drv.write_ste(SID, Some(&s1_ste(base, 4, table.s1fmt())))
        .unwrap();
    assert_eq!(
        vm.smmu.host_config(SID).unwrap(),
        HostConfig::Translate(translate(base, 4, table.s1fmt()))
    );
    vm.host.take();
    (vm, drv, base)
}

#[test]
fn reset_and_enable_make_the_device_abort_until_its_ste_translates() {
    let vm = Vm::new();
    // After reset GBPA aborts: the device's transactions abort on the host.
    assert_eq!(vm.host.take(), [Call::Attach(ABORT)]);
    assert_eq!(vm.smmu.host_config(SID).unwrap(), HostConfig::Abort);
    let mut drv = vm.driver();
    let idr0 = vm.smmu.read(offset::IDR0, 4).unwrap();
    assert_eq!(idr0 & 3, 0b10, "stage 1 only");
    assert_eq!(drv.caps().features, VSmmuConfig::default().features);
    assert_eq!(
        vm.smmu.read(offset::CR0ACK, 4).unwrap() as u32 & cr0::SMMUEN,
        cr0::SMMUEN
    );
    // Enabled with the device's STE absent (a 2-level table without its level-2 table):
    // the device still aborts, without another host call; no transaction has happened,
    // so no event either.
    assert_eq!(vm.host.take(), []);
    assert_eq!(drv.read_events().unwrap().records, []);
    // The guest invalidating that STE says it is ready: C_BAD_STREAMID.
    drv.issue(&[Cmd::CfgiSte {
        sid: SID,
        leaf: true,
    }])
    .unwrap();
    assert_eq!(
        drv.read_events().unwrap().records,
        [Event::new(EventType::BadStreamId, SID, None)]
    );
    assert_eq!(vm.host.take(), []);
    // The guest's CD table: the STE now hands it to the host.
    let mut table = drv.alloc_cd_table(4).unwrap();
    let cd = ContextDescriptor::new(0x40_0000, 16, ASID);
    drv.write_cd(&mut table, &[SID], 1, Some(&cd)).unwrap();
    assert_eq!(
        vm.host.take(),
        [],
        "no CD is the host's until the STE points at it"
    );
    drv.write_ste(SID, Some(&s1_ste(table.base(), 4, table.s1fmt())))
        .unwrap();
    let want = translate(table.base(), 4, table.s1fmt());
    assert_eq!(vm.host.take(), [Call::Attach(want)]);
    assert_eq!(
        vm.smmu.host_config(SID).unwrap(),
        HostConfig::Translate(want)
    );
    assert_eq!(drv.read_events().unwrap().records, []);
    assert_eq!(vm.smmu.take_host_errors(), []);
}

#[test]
fn ste_changes_attach_detach_and_abort() {
    let (vm, mut drv, base) = translating();
    // Another CD table: the host takes no stage-1 to stage-1 change, so detach first.
    let mut other = drv.alloc_cd_table(2).unwrap();
    drv.write_cd(
        &mut other,
        &[SID],
        0,
        Some(&ContextDescriptor::new(0x50_0000, 16, 7)),
    )
    .unwrap();
    drv.write_ste(SID, Some(&s1_ste(other.base(), 2, other.s1fmt())))
        .unwrap();
    let want = translate(other.base(), 2, other.s1fmt());
    let mut calls = vm.host.take();
    assert_eq!(
        calls.split_off(calls.len() - 2),
        [Call::Detach, Call::Attach(want)]
    );
    // Before the STE moved, the new table's CD writes invalidated CD 0 of the attached
    // table (the stream's SubstreamID 0), as CMD_CFGI_CD says.
    assert!(!calls.is_empty());
    for c in calls {
        assert_eq!(
            c,
            Call::Invalidate(CacheInvalidate {
                cache: IOMMU_CACHE_INV_TYPE_PASID,
                granularity: InvGranularity::Pasid {
                    pasid: Some(pasid(0)),
                    archid: None
                }
            })
        );
    }
    assert_ne!(base, other.base());
    // Bypass: stage 2 alone.
    drv.write_ste(SID, Some(&Ste::new(Config::Bypass))).unwrap();
    assert_eq!(vm.host.take(), [Call::Detach]);
    assert_eq!(vm.smmu.host_config(SID).unwrap(), HostConfig::Stage2);
    // An aborting STE (Linux's detach).
    drv.write_ste(SID, None).unwrap();
    assert_eq!(vm.host.take(), [Call::Attach(ABORT)]);
    // The same STE again changes nothing on the host.
    drv.issue(&[Cmd::CfgiSte {
        sid: SID,
        leaf: true,
    }])
    .unwrap();
    assert_eq!(vm.host.take(), []);
    // Disabling the SMMU with GBPA bypassing: stage 2 alone; aborting again: abort.
    vm.smmu.write(offset::GBPA, 4, GBPA_UPDATE as u64).unwrap();
    assert_eq!(vm.host.take(), []);
    let en = vm.smmu.read(offset::CR0, 4).unwrap();
    vm.smmu
        .write(offset::CR0, 4, en & !(cr0::SMMUEN as u64))
        .unwrap();
    assert_eq!(vm.host.take(), [Call::Detach]);
    drv.shutdown();
    assert_eq!(vm.host.take(), [Call::Attach(ABORT)]);
    // Detaching the device leaves the host with stage 2 alone.
    vm.smmu.detach_passthrough(SID).unwrap();
    assert_eq!(vm.host.take(), [Call::Detach]);
    assert!(matches!(
        vm.smmu.host_config(SID),
        Err(VSmmuError::NoStream(SID))
    ));
}

#[test]
fn invalidations_reach_the_host_before_cmd_sync_completes() {
    let (vm, mut drv, _) = translating();
    let cons_before = vm.smmu.read(offset::CMDQ_CONS, 4).unwrap() as u32;
    drv.tlbi_asid(0, ASID).unwrap();
    drv.tlbi_range(
        TlbiStage::Stage1 {
            vmid: 0,
            asid: ASID,
        },
        0x7f00_1234_5000,
        0x2000,
        0x1000,
        true,
    )
    .unwrap();
    drv.issue(&[Cmd::TlbiNhVaa {
        vmid: 0,
        addr: TlbiAddr {
            addr: 0x7f00_0000_0000,
            ..TlbiAddr::default()
        },
    }])
    .unwrap();
    drv.atc_inv(SID, Some(1), 0x7f00_1234_5000, 0x3000).unwrap();
    drv.issue(&[Cmd::CfgiCdAll { sid: SID }, Cmd::TlbiNhAll { vmid: 0 }])
        .unwrap();
    let iotlb = |granularity| {
        Call::Invalidate(CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity,
        })
    };
    let page = |archid, addr, leaf| InvGranularity::Addr {
        pasid: None,
        archid,
        addr,
        granule_size: 4096,
        nb_granules: 1,
        leaf,
    };
    let calls = vm.host.take_with_cons();
    let (got, cons): (Vec<Call>, Vec<u32>) = calls.into_iter().unzip();
    assert_eq!(
        got,
        [
            iotlb(InvGranularity::Pasid {
                pasid: None,
                archid: Some(ASID.into())
            }),
            iotlb(page(Some(ASID.into()), 0x7f00_1234_5000, true)),
            iotlb(page(Some(ASID.into()), 0x7f00_1234_6000, true)),
            iotlb(page(None, 0x7f00_0000_0000, false)),
            // 0x7f00_1234_5000..+0x3000 is inside the aligned span of 4 pages.
            Call::Invalidate(CacheInvalidate {
                cache: IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
                granularity: InvGranularity::Addr {
                    pasid: Some(pasid(1)),
                    archid: None,
                    addr: 0x7f00_1234_4000,
                    granule_size: 4096,
                    nb_granules: 4,
                    leaf: false
                }
            }),
            Call::Invalidate(CacheInvalidate {
                cache: IOMMU_CACHE_INV_TYPE_PASID,
                granularity: InvGranularity::Domain
            }),
            iotlb(InvGranularity::Domain),
        ]
    );
    // Each call came while its command was being consumed: CMDQ_CONS had not passed the
    // CMD_SYNC that followed it (one command, then CMD_SYNC, per issue; two in the last).
    let mut expect = cons_before;
    for (i, c) in cons.iter().enumerate() {
        let expect_at = match i {
            0 => expect,
            1 => expect + 2,
            2 => expect + 3,
            3 => expect + 5,
            4 => expect + 7,
            5 => expect + 9,
            _ => expect + 10,
        };
        assert_eq!(*c & 0xff, expect_at & 0xff, "call {i}");
    }
    expect += 12;
    assert_eq!(
        vm.smmu.read(offset::CMDQ_CONS, 4).unwrap() as u32 & 0x1ff,
        expect & 0x1ff
    );
    assert_eq!(vm.smmu.take_host_errors(), []);
}

#[test]
fn invalidations_of_streams_the_host_does_not_walk_stay_in_the_vm() {
    let vm = Vm::new();
    let mut drv = vm.driver();
    vm.host.take();
    drv.tlbi_asid(0, ASID).unwrap();
    drv.issue(&[Cmd::CfgiCdAll { sid: SID }, Cmd::TlbiNhAll { vmid: 0 }])
        .unwrap();
    // A CD invalidation naming another stream.
    let (vm2, mut drv2, _) = translating();
    drv2.issue(&[Cmd::CfgiCd {
        sid: SID + 1,
        ssid: 1,
        leaf: true,
    }])
    .unwrap();
    assert_eq!(vm.host.take(), []);
    assert_eq!(vm2.host.take(), []);
}

#[test]
fn host_invalidation_table() {
    // CMD_ATC_INV of the whole ATC (Size 52 and up) and Global.
    let atc = |ssid, global, size| {
        host_invalidation(&Cmd::AtcInv {
            sid: SID,
            ssid,
            global,
            addr: 0,
            size,
        })
        .unwrap()
        .granularity
    };
    assert_eq!(atc(None, false, 52), InvGranularity::Domain);
    assert_eq!(
        atc(Some(5), false, 63),
        InvGranularity::Pasid {
            pasid: Some(pasid(5)),
            archid: None
        }
    );
    assert_eq!(atc(Some(5), true, 63), InvGranularity::Domain);
    assert!(matches!(
        atc(None, false, 51),
        InvGranularity::Addr {
            nb_granules: 0x8_0000_0000_0000,
            ..
        }
    ));
    // Commands that invalidate nothing of the guest's stage 1.
    for cmd in [
        Cmd::CfgiSte { sid: 1, leaf: true },
        Cmd::PrefetchConfig { sid: 1, ssid: None },
        Cmd::StallTerm { sid: 1 },
    ] {
        assert_eq!(host_invalidation(&cmd), None);
    }
}

/// Writes `raw` commands at CMDQ_PROD and publishes them.
fn produce(vm: &Vm, raw: &[[u64; 2]]) {
    let q = {
        let base = vm.smmu.read(offset::CMDQ_BASE, 8).unwrap();
        (base & 0x000f_ffff_ffff_ffe0, base & 0x1f)
    };
    let mut prod = vm.smmu.read(offset::CMDQ_PROD, 4).unwrap() as u32;
    for c in raw {
        let index = prod & ((1 << q.1) - 1);
        let at = q.0 + 16 * index as u64;
        vm.mem.write_u64(at, c[0]).unwrap();
        vm.mem.write_u64(at + 8, c[1]).unwrap();
        prod = (prod + 1) & ((2 << q.1) - 1);
    }
    vm.smmu.write(offset::CMDQ_PROD, 4, prod as u64).unwrap();
}

#[test]
fn illegal_commands_stop_the_queue_with_cerror_ill_and_no_host_call() {
    // The guest driver is not used past set-up: the test produces commands itself.
    let (vm, _drv, _) = translating();
    let nsnh = Cmd::TlbiNsnhAll.encode();
    let features = VSmmuConfig::default().features;
    for (what, bad) in [
        ("unknown opcode", [0x7f, 0]),
        ("stage-2 command", Cmd::TlbiS12Vmall { vmid: 1 }.encode()),
        ("EL2 command", Cmd::TlbiEl2All.encode()),
        ("RES0 bit", [nsnh[0] | 1 << 40, 0]),
        ("reserved CMD_SYNC CS", [0x46 | 3 << 12, 0]),
        (
            "9-bit VMID",
            [Cmd::TlbiNhAll { vmid: 0x100 }.encode()[0], 0],
        ),
    ] {
        let cons = vm.smmu.read(offset::CMDQ_CONS, 4).unwrap() as u32;
        produce(&vm, &[bad, nsnh]);
        // Stopped at the illegal command: CERROR_ILL in CMDQ_CONS.ERR, GERROR.CMDQ_ERR.
        let after = vm.smmu.read(offset::CMDQ_CONS, 4).unwrap() as u32;
        assert_eq!(after & 0x1ff, cons & 0x1ff, "{what}");
        assert_eq!(after >> 24 & 0x7f, 1, "{what}: CERROR_ILL");
        let active = (vm.smmu.read(offset::GERROR, 4).unwrap()
            ^ vm.smmu.read(offset::GERRORN, 4).unwrap()) as u32;
        assert_eq!(active, gerror::CMDQ_ERR, "{what}");
        assert_eq!(vm.host.take(), [], "{what}");
        assert!(Cmd::decode(bad, &features).is_err());
        // Linux's recovery (a CMD_SYNC in place of the bad command, the error
        // acknowledged) resumes the queue: the command after it reaches the host.
        let base = vm.smmu.read(offset::CMDQ_BASE, 8).unwrap() & 0x000f_ffff_ffff_ffe0;
        let slot = base + 16 * (after & 0xff) as u64;
        let sync = Cmd::Sync {
            cs: SyncCs::None,
            msh: 0,
            msi_attr: 0,
            msi_data: 0,
            msi_addr: 0,
        }
        .encode();
        vm.mem.write_u64(slot, sync[0]).unwrap();
        vm.mem.write_u64(slot + 8, sync[1]).unwrap();
        let g = vm.smmu.read(offset::GERROR, 4).unwrap();
        vm.smmu.write(offset::GERRORN, 4, g).unwrap();
        assert_eq!(
            vm.host.take(),
            [Call::Invalidate(CacheInvalidate {
                cache: IOMMU_CACHE_INV_TYPE_IOTLB,
                granularity: InvGranularity::Domain
            })],
            "{what}"
        );
    }
    assert_eq!(vm.smmu.stats().command_errors, 6);
}

#[test]
fn an_unreadable_command_is_cerror_abt() {
    let vm = Vm::new();
    let _drv = vm.driver();
    // The guest moves its queue beyond its RAM.
    let en = vm.smmu.read(offset::CR0, 4).unwrap();
    vm.smmu
        .write(offset::CR0, 4, en & !(cr0::CMDQEN as u64))
        .unwrap();
    vm.smmu
        .write(offset::CMDQ_BASE, 8, 1 << 62 | (RAM + 0x1000) | 4)
        .unwrap();
    vm.smmu.write(offset::CMDQ_PROD, 4, 0).unwrap();
    vm.smmu.write(offset::CMDQ_CONS, 4, 0).unwrap();
    vm.smmu.write(offset::CR0, 4, en).unwrap();
    vm.host.take();
    vm.smmu.write(offset::CMDQ_PROD, 4, 1).unwrap();
    let cons = vm.smmu.read(offset::CMDQ_CONS, 4).unwrap() as u32;
    assert_eq!(cons, 2 << 24, "CERROR_ABT at entry 0");
    assert_eq!(vm.host.take(), []);
}

#[test]
fn illegal_stes_are_c_bad_ste_and_abort() {
    let (vm, mut drv, base) = translating();
    let addr = {
        // The live STE's address, through the guest's 2-level stream table.
        let words = drv.read_ste(SID).unwrap().unwrap();
        assert_eq!(words[0] & 1, 1);
        let strtab = vm.smmu.read(offset::STRTAB_BASE, 8).unwrap() & 0x000f_ffff_ffff_ffc0;
        let split = STRTAB_SPLIT as u64;
        let l1 = L1Std(vm.mem.read_u64(strtab + 8 * (SID as u64 >> split)).unwrap());
        let addr = l1.l2ptr() + 64 * (SID as u64 & ((1 << split) - 1));
        assert_eq!(vm.mem.read_u64(addr).unwrap(), words[0]);
        addr
    };
    let good = s1_ste(base, 4, S1Fmt::Linear).encode();
    for (what, patch) in [
        ("Config S2 (no stage 2)", (0, (good[0] & !0xe) | 0b110 << 1)),
        ("reserved Config", (0, (good[0] & !0xe) | 0b001 << 1)),
        ("S1CDMax beyond SSIDSIZE", (0, good[0] | 21 << 59)),
        ("RES0 bit in word 7", (7, 1)),
        ("STRW EL2 without Hyp", (1, good[1] | 2 << 30)),
    ] {
        // A good STE, then the bad one the guest writes over it.
        for (i, w) in good.iter().enumerate() {
            vm.mem.write_u64(addr + 8 * i as u64, *w).unwrap();
        }
        drv.issue(&[Cmd::CfgiSte {
            sid: SID,
            leaf: true,
        }])
        .unwrap();
        vm.host.take();
        vm.mem.write_u64(addr + 8 * patch.0, patch.1).unwrap();
        drv.issue(&[Cmd::CfgiSte {
            sid: SID,
            leaf: true,
        }])
        .unwrap();
        assert_eq!(vm.host.take(), [Call::Attach(ABORT)], "{what}");
        assert_eq!(
            drv.read_events().unwrap().records,
            [Event::new(EventType::BadSte, SID, None)],
            "{what}"
        );
    }
    // V = 0 aborts without an event.
    vm.mem.write_u64(addr, 0).unwrap();
    drv.issue(&[Cmd::CfgiSte {
        sid: SID,
        leaf: true,
    }])
    .unwrap();
    assert_eq!(vm.host.take(), []);
    assert_eq!(vm.smmu.host_config(SID).unwrap(), HostConfig::Abort);
    assert_eq!(drv.read_events().unwrap().records, []);
}

#[test]
fn a_refused_attach_leaves_the_device_aborting() {
    let vm = Vm::new();
    vm.host.refuse_translate.store(true, Ordering::Relaxed);
    let mut drv = vm.driver();
    let table = drv.alloc_cd_table(4).unwrap();
    vm.host.take();
    drv.write_ste(SID, Some(&s1_ste(table.base(), 4, table.s1fmt())))
        .unwrap();
    assert_eq!(vm.host.take(), []);
    assert_eq!(vm.smmu.host_config(SID).unwrap(), HostConfig::Abort);
    let errors = vm.smmu.take_host_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].call,
        HostCall::AttachPasidTable(translate(table.base(), 4, table.s1fmt()))
    );
    assert_eq!(errors[0].error, Errno::EINVAL);
}

#[test]
fn host_faults_become_guest_events() {
    let (vm, mut drv, _) = translating();
    let fault = |reason, addr| UnrecoverableFault {
        reason,
        pasid: Some(pasid(1)),
        read: false,
        write: true,
        exec: false,
        privileged: false,
        addr,
        fetch_addr: Some(0x1_2345_6000),
    };
    use UnrecoverableReason as R;
    for (reason, ty, input) in [
        (R::PteFetch, EventType::Translation, 0x7f00_1234_5000),
        (R::Permission, EventType::Permission, 0x7f00_1234_5000),
        (R::Access, EventType::Access, 0x7f00_1234_5000),
        (R::OorAddress, EventType::AddrSize, 0x7f00_1234_5000),
        (R::WalkEabt, EventType::WalkEabt, 0x7f00_1234_5000),
        (R::BadPasidEntry, EventType::BadCd, 0),
        (R::PasidInvalid, EventType::BadSubstreamId, 0),
        (R::PasidFetch, EventType::CdFetch, 0),
    ] {
        assert_eq!(
            vm.smmu
                .inject_host_fault(host_sid(), &fault(reason, Some(0x7f00_1234_5000))),
            Ok(true)
        );
        let events = drv.read_events().unwrap().records;
        let mut want = Event::new(ty, SID, Some(1));
        if input != 0 {
            want.input_addr = input;
        }
        assert_eq!(events.len(), 1, "{reason:?}");
        let got = events[0];
        assert_eq!(
            (got.event_type, got.sid, got.ssid, got.input_addr, got.addr2),
            (want.event_type, SID, Some(1), want.input_addr, 0),
            "{reason:?}: the host fetch address is not shown"
        );
        if input != 0 {
            assert!(!got.rnw, "a write");
        }
    }
    // Refused: no SubstreamID, no address, an unknown reason, a device not attached.
    let mut f = fault(R::PteFetch, Some(0x1000));
    f.pasid = None;
    assert!(vm.smmu.inject_host_fault(host_sid(), &f).is_err());
    assert!(vm
        .smmu
        .inject_host_fault(host_sid(), &fault(R::PteFetch, None))
        .is_err());
    assert!(vm
        .smmu
        .inject_host_fault(host_sid(), &fault(R::Unknown, Some(0)))
        .is_err());
    let other = SourceId::new(1, 2, 3).unwrap();
    assert_eq!(
        vm.smmu
            .inject_host_fault(other, &fault(R::PteFetch, Some(0))),
        Err(VSmmuError::NotAttached(other))
    );
    assert_eq!(drv.read_events().unwrap().records, []);
    // Without the guest's table on the host, its faults are the host's.
    drv.write_ste(SID, None).unwrap();
    assert!(vm
        .smmu
        .inject_host_fault(host_sid(), &fault(R::PteFetch, Some(0)))
        .is_err());
}

fn request(grpid: u32, last: bool) -> PageRequest {
    PageRequest {
        pasid: Some(pasid(1)),
        grpid,
        read: true,
        write: true,
        exec: false,
        privileged: false,
        addr: 0x7f00_1234_5000,
        last_page: last,
        needs_pasid: true,
        private_data: None,
    }
}

#[test]
fn page_requests_reach_the_pri_queue_and_responses_go_back() {
    let (vm, mut drv, _) = translating();
    assert_eq!(
        vm.smmu.inject_page_request(host_sid(), &request(5, true)),
        Ok(PriOutcome::Queued)
    );
    let entries = drv.read_page_requests().unwrap().records;
    assert_eq!(
        entries,
        [PriqEntry {
            sid: SID,
            ssid: Some(1),
            privileged: false,
            exec: false,
            read: true,
            write: true,
            last: true,
            prg_index: 5,
            addr: 0x7f00_1234_5000,
        }]
    );
    assert_eq!(vm.host.take(), []);
    drv.pri_resp(SID, Some(1), 5, PriResp::Success).unwrap();
    assert_eq!(
        vm.host.take(),
        [Call::Response(
            host_sid(),
            PageResponse {
                pasid: Some(pasid(1)),
                grpid: 5,
                code: PageResponseCode::Success
            }
        )]
    );
    // A group index beyond 9 bits is refused.
    assert!(vm
        .smmu
        .inject_page_request(host_sid(), &request(0x200, true))
        .is_err());
    // The queue fills (256 entries): the next request is discarded, overflow is flagged,
    // and the last of a group is answered Success; a request that is not last gets none.
    for i in 0..256 {
        assert_eq!(
            vm.smmu
                .inject_page_request(host_sid(), &request(i % 512, false)),
            Ok(PriOutcome::Queued)
        );
    }
    assert_eq!(
        vm.smmu.inject_page_request(host_sid(), &request(7, false)),
        Ok(PriOutcome::Overflow)
    );
    assert_eq!(
        vm.smmu.inject_page_request(host_sid(), &request(8, true)),
        Ok(PriOutcome::Overflow)
    );
    let prod = vm.smmu.read(offset::PRIQ_PROD, 4).unwrap() as u32;
    assert_ne!(prod & 1 << 31, 0, "PRIQ_PROD.OVFLG");
    assert_eq!(
        vm.host.take(),
        [Call::Response(
            host_sid(),
            PageResponse {
                pasid: Some(pasid(1)),
                grpid: 8,
                code: PageResponseCode::Success
            }
        )]
    );
    // The guest drains the queue and acknowledges: requests are queued again.
    assert_eq!(drv.read_page_requests().unwrap().records.len(), 256);
    assert_eq!(
        vm.smmu.inject_page_request(host_sid(), &request(9, true)),
        Ok(PriOutcome::Queued)
    );
    // An STE without ATS: the SMMU answers Failure itself.
    let base = match vm.smmu.host_config(SID).unwrap() {
        HostConfig::Translate(t) => t.base_ptr.raw(),
        c => panic!("{c:?}"),
    };
    drv.write_ste(
        SID,
        Some(&Ste {
            eats: Eats::Abort,
            ..s1_ste(base, 4, S1Fmt::Linear)
        }),
    )
    .unwrap();
    vm.host.take();
    assert_eq!(
        vm.smmu.inject_page_request(host_sid(), &request(10, true)),
        Ok(PriOutcome::NotEnabled)
    );
    assert_eq!(
        vm.host.take(),
        [Call::Response(
            host_sid(),
            PageResponse {
                pasid: Some(pasid(1)),
                grpid: 10,
                code: PageResponseCode::Failure
            }
        )]
    );
}

#[test]
fn host_stalls_become_stall_events_under_a_vstag_and_cmd_resume_goes_back() {
    let (vm, mut drv, base) = translating_on(Vm::stalling());
    // The host's STAG (the page request's group id) is 0xbeef; the guest sees the
    // vSMMU's own.
    assert_eq!(
        vm.smmu
            .inject_page_request(host_sid(), &request(0xbeef, true)),
        Ok(PriOutcome::Queued)
    );
    let events = drv.read_events().unwrap().records;
    assert_eq!(events.len(), 1, "{events:?}");
    let vstag = events[0].stag;
    assert_eq!(
        events[0],
        Event {
            stall: true,
            stag: vstag,
            rnw: false,
            input_addr: 0x7f00_1234_5000,
            ..Event::new(EventType::Translation, SID, Some(1))
        }
    );
    assert_ne!(vstag, 0xbeef);
    assert_eq!((vm.smmu.stalled(Some(SID)), vm.smmu.stats().stalls), (1, 1));
    // CMD_RESUME of the host's STAG, of the vSTAG under another StreamID: nothing.
    let resume = |sid, stag, action| Cmd::Resume { sid, action, stag };
    drv.issue(&[
        resume(SID, 0xbeef, ResumeAction::Retry),
        resume(SID + 1, vstag, ResumeAction::Retry),
    ])
    .unwrap();
    assert_eq!(vm.host.take(), []);
    assert_eq!(vm.smmu.stalled(Some(SID)), 1);
    // The vSTAG: the host's transaction is resumed (its STAG as the group id), once.
    let response = |grpid, code| {
        Call::Response(
            host_sid(),
            PageResponse {
                pasid: Some(pasid(1)),
                grpid,
                code,
            },
        )
    };
    drv.issue(&[resume(SID, vstag, ResumeAction::Retry)])
        .unwrap();
    assert_eq!(
        vm.host.take(),
        [response(0xbeef, PageResponseCode::Success)]
    );
    drv.issue(&[resume(SID, vstag, ResumeAction::Abort)])
        .unwrap();
    assert_eq!(vm.host.take(), [], "a vSTAG is answered once");
    // CMD_STALL_TERM aborts every stall of the stream.
    for g in [0x10, 0x11] {
        assert_eq!(
            vm.smmu.inject_page_request(host_sid(), &request(g, true)),
            Ok(PriOutcome::Queued)
        );
    }
    drv.issue(&[Cmd::StallTerm { sid: SID }]).unwrap();
    assert_eq!(
        vm.host.take(),
        [
            response(0x10, PageResponseCode::Failure),
            response(0x11, PageResponseCode::Failure)
        ]
    );
    assert_eq!(vm.smmu.stalled(None), 0);
    // A stall that is not a whole group, or whose STAG is wider than 16 bits: refused.
    for r in [request(1, false), request(0x1_0000, true)] {
        assert!(vm.smmu.inject_page_request(host_sid(), &r).is_err());
    }
    assert_eq!(vm.host.take(), []);
    // The guest's STE disables stage-1 stalls (S1STALLD): the stall ends at once and the
    // guest sees the fault it would have seen, without Stall.
    drv.read_events().unwrap();
    drv.write_ste(
        SID,
        Some(&Ste {
            s1stalld: true,
            ..s1_ste(base, 4, S1Fmt::Linear)
        }),
    )
    .unwrap();
    vm.host.take();
    assert_eq!(
        vm.smmu
            .inject_page_request(host_sid(), &request(0x20, true)),
        Ok(PriOutcome::Terminated)
    );
    assert_eq!(vm.host.take(), [response(0x20, PageResponseCode::Failure)]);
    let events = drv.read_events().unwrap().records;
    assert_eq!(events.len(), 1);
    assert!(!events[0].stall);
    // A stall held when the guest's STE stops translating ends with an Abort first.
    drv.write_ste(SID, Some(&s1_ste(base, 4, S1Fmt::Linear)))
        .unwrap();
    vm.host.take();
    assert_eq!(
        vm.smmu
            .inject_page_request(host_sid(), &request(0x30, true)),
        Ok(PriOutcome::Queued)
    );
    drv.write_ste(SID, None).unwrap();
    let calls = vm.host.take();
    let at = |c: &Call| calls.iter().position(|x| x == c);
    let (resp, abort) = (
        at(&response(0x30, PageResponseCode::Failure)),
        at(&Call::Attach(ABORT)),
    );
    assert!(resp.is_some() && resp < abort, "{calls:?}");
    assert_eq!(vm.smmu.stalled(None), 0);
    assert_eq!(vm.smmu.stats().stalls_aborted, 4);
    assert_eq!(vm.smmu.take_host_errors(), []);
}

#[test]
fn a_terminate_only_vsmmu_has_no_stalls() {
    let vm = Vm::new();
    assert!(vm.smmu.set_stall_capable(SID, true).is_err());
    let mut config = VSmmuConfig::default();
    config.features.stall_model = StallModel::ForceStall;
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
    assert!(VSmmu::new(mem, config).is_err());
}

#[test]
fn attach_refusals() {
    let vm = Vm::new();
    let host = Arc::new(MockHost::default());
    assert_eq!(
        vm.smmu
            .attach_passthrough(SID, SourceId::new(9, 0, 0).unwrap(), host.clone()),
        Err(VSmmuError::AlreadyAttached(SID))
    );
    assert_eq!(
        vm.smmu
            .attach_passthrough(SID + 1, host_sid(), host.clone()),
        Err(VSmmuError::HostDeviceAttached(host_sid()))
    );
    assert_eq!(
        vm.smmu
            .attach_passthrough(1 << 16, SourceId::new(9, 0, 0).unwrap(), host.clone()),
        Err(VSmmuError::BadStreamId(1 << 16))
    );
    assert_eq!(host.take(), []);
    let mut bad = VSmmuConfig::default();
    bad.features.s2p = true;
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
    assert!(VSmmu::new(mem, bad).is_err());
}
