//! The virtual SMMUv3 over iommufd on the host SMMUv3 (driven by the arm-smmu-v3 driver
//! library a guest kernel runs): the guest's STE becomes a nested HWPT under the VM's
//! vIOMMU attached to the device, the guest's invalidations between two CMD_SYNCs go down
//! as one `IOMMU_HWPT_INVALIDATE` array, a command the host refuses stops the guest's
//! queue at it with CERROR_ILL, another VM's vSID is refused, and teardown leaves the
//! host's file empty.

use std::collections::BTreeMap;
use std::mem::size_of;
use std::sync::Arc;
use vsva_mem::PhysMem;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::iommufd::smmu::{SmmuIommufdFile, SmmuObjectState};
use vsva_host::smmu::SmmuHost;
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN};
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DmaEngine, DmaEngineConfig,
    Operation,
};
use vsva_hw::smmuv3::{Smmu, SmmuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory};
use vsva_smmuv3::desc::Descriptor as D;
use vsva_smmuv3::regs::{gerror, offset};
use vsva_smmuv3::{
    builder::TableBuilder, cd::ContextDescriptor, cmd::Cmd, cmd::PriResp, cmd::SyncCs,
    cmd::TlbiAddr, features::Features, regs::RegError, ste::Config, ste::Eats, ste::S1Dss,
    ste::Ste, walk::PageSize,
};
use vsva_smmuv3_driver::{DmaAlloc, DriverConfig, Registers, SmmuDriver};
use vsva_uapi::iommufd::{IommuDestroy, IOMMU_DESTROY};
use vsva_uapi::wire::Wire;
use vsva_uapi::{error::Errno, file::UapiFile};
use vsva_vmm::{
    HostCall, HostConfig, PriOutcome, SmmuIommufd, SmmuIommufdDevice, UserBuffer, VSmmu,
    VSmmuConfig, VSmmuError, Vevent,
};
use vsva_vtd::{addr::Gpa, addr::Hpa, addr::Pasid, addr::SourceId};

const RAM: u64 = 32 << 20;
const SCRATCH: u64 = 16 << 10;
const SID: u32 = 0x10;
const ASID: u16 = 0x21;

struct Host {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hw: Arc<Smmu>,
    smmu: Arc<SmmuHost>,
}

fn host() -> Host {
    let mem = HostMemory::new(256 << 20).unwrap();
    let frames = Arc::new(FrameAllocator::new(mem.clone()));
    let cfg = SmmuConfig {
        strict: true,
        ..SmmuConfig::default()
    };
    let hw = Arc::new(Smmu::new(mem.clone(), cfg));
    let smmu = SmmuHost::new(hw.clone(), frames.clone()).unwrap();
    Host {
        mem,
        frames,
        hw,
        smmu,
    }
}

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
}

impl DmaAlloc for Bump {
    fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let at = self.next.max(1 << 20).next_multiple_of(align);
        self.next = at + size;
        (self.next <= 16 << 20).then_some(at)
    }
    fn free(&mut self, _addr: u64, _size: u64) {}
}

type GuestDriver = SmmuDriver<Mmio, Arc<GuestMemoryMmap>, Bump>;

/// One VM over iommufd: its RAM, the VMM's fd table and `/dev/iommu`, the device's cdev,
/// the vSMMU with the device attached (StreamID `SID`).
struct Vm {
    ram: Arc<GuestMemoryMmap>,
    file: Arc<SmmuIommufdFile>,
    fds: Arc<Iommufds>,
    fd: i32,
    iommufd: Option<Arc<SmmuIommufd>>,
    device: Option<Arc<SmmuIommufdDevice>>,
    cdev: Option<Arc<VfioDeviceFile>>,
    vsmmu: Arc<VSmmu>,
    dev: Arc<DmaEngine>,
}

impl Vm {
    fn new(host: &Host, rid: u16) -> Vm {
        let hpa: Hpa = host.frames.alloc_range(RAM, 2 << 20).unwrap();
        let ram = Arc::new(host.mem.guest_memory(&[(Gpa(0), hpa, RAM)]).unwrap());
        let vaddr = ram.get_host_address(GuestAddress(0)).unwrap() as u64;
        let scratch_hpa = host.frames.alloc_range(SCRATCH, 4096).unwrap();
        let scratch = Arc::new(
            host.mem
                .guest_memory(&[(Gpa(0), scratch_hpa, SCRATCH)])
                .unwrap(),
        );
        let host_sid = SourceId::from_rid(rid);
        let dev =
            Arc::new(DmaEngine::new(DmaEngineConfig::new(host_sid), host.hw.clone()).unwrap());
        host.hw.attach_endpoint(rid.into(), dev.clone());
        let fds = Iommufds::new();
        let (fd, file) = fds.open_smmu(&host.smmu);
        let iommufd =
            SmmuIommufd::open(file.clone(), fd, UserBuffer::new(scratch).unwrap()).unwrap();
        iommufd.map(vaddr, RAM, 0).unwrap();
        let cdev = Arc::new(VfioDeviceFile::open(host_sid, fds.clone()));
        let lookup = |n: i32| {
            fds.veventq(n)
                .map(|f| f as Arc<dyn UapiFile>)
                .or_else(|| fds.fault(n).map(|f| f as Arc<dyn UapiFile>))
        };
        let device = iommufd.attach_device(cdev.clone(), SID, &lookup).unwrap();
        let vsmmu = VSmmu::new(ram.clone(), VSmmuConfig::default()).unwrap();
        vsmmu.attach_iommufd(SID, host_sid, device.clone()).unwrap();
        Vm {
            ram,
            file,
            fds,
            fd,
            iommufd: Some(iommufd),
            device: Some(device),
            cdev: Some(cdev),
            vsmmu,
            dev,
        }
    }

    fn driver(&self) -> GuestDriver {
        SmmuDriver::new(
            Mmio(self.vsmmu.clone()),
            self.ram.clone(),
            Bump::default(),
            DriverConfig::default(),
        )
        .unwrap()
    }

    fn objects(&self) -> BTreeMap<u32, SmmuObjectState> {
        self.file.lock().objects()
    }

    fn nested_hwpts(&self) -> Vec<[u64; 2]> {
        self.objects()
            .values()
            .filter_map(|o| match o {
                SmmuObjectState::HwptNested { vste, .. } => Some(*vste),
                _ => None,
            })
            .collect()
    }

    /// Writes `raw` commands at CMDQ_PROD and publishes them; the CMDQ_CONS before.
    fn produce(&self, raw: &[[u64; 2]]) -> u32 {
        let cons = self.vsmmu.read(offset::CMDQ_CONS, 4).unwrap() as u32;
        let base = self.vsmmu.read(offset::CMDQ_BASE, 8).unwrap();
        let (at, log2) = (base & 0x000f_ffff_ffff_ffe0, base & 0x1f);
        let mut prod = self.vsmmu.read(offset::CMDQ_PROD, 4).unwrap() as u32;
        for c in raw {
            let slot = at + 16 * (prod & ((1 << log2) - 1)) as u64;
            self.ram.write_u64(slot, c[0]).unwrap();
            self.ram.write_u64(slot + 8, c[1]).unwrap();
            prod = (prod + 1) & ((2 << log2) - 1);
        }
        self.vsmmu.write(offset::CMDQ_PROD, 4, prod as u64).unwrap();
        cons
    }
}

/// The guest gives the device a CD table of 2^4 CDs with CD 1 live and a translating STE;
/// returns the table base.
fn translate(vm: &Vm, drv: &mut GuestDriver) -> u64 {
    let mut table = drv.alloc_cd_table(4).unwrap();
    drv.write_cd(
        &mut table,
        &[SID],
        1,
        Some(&ContextDescriptor::new(0x40_0000, 16, ASID)),
    )
    .unwrap();
    let ste = Ste {
        s1_context_ptr: table.base(),
        s1cdmax: 4,
        s1fmt: table.s1fmt(),
        s1dss: S1Dss::Bypass,
        eats: Eats::Full,
        ..Ste::new(Config::S1Trans)
    };
    drv.write_ste(SID, Some(&ste)).unwrap();
    assert!(matches!(
        vm.vsmmu.host_config(SID).unwrap(),
        HostConfig::Translate(_)
    ));
    table.base()
}

fn sync() -> [u64; 2] {
    Cmd::Sync {
        cs: SyncCs::None,
        msh: 0,
        msi_attr: 0,
        msi_data: 0,
        msi_addr: 0,
    }
    .encode()
}

fn tlbi_va(page: u64) -> [u64; 2] {
    Cmd::TlbiNhVa {
        vmid: 0,
        asid: ASID,
        addr: TlbiAddr {
            addr: 0x7f00_0000_0000 + page * 4096,
            leaf: true,
            ..TlbiAddr::default()
        },
    }
    .encode()
}

#[test]
fn guest_stes_become_nested_hwpts_attached_to_the_device() {
    let h = host();
    let vm = Vm::new(&h, 0x120);
    // After reset GBPA aborts: a nested HWPT with V = 0.
    assert_eq!(vm.nested_hwpts(), [[0, 0]]);
    let mut drv = vm.driver();
    let base = translate(&vm, &mut drv);
    // One nested HWPT (the one before it destroyed), carrying the guest's STE words.
    let hwpts = vm.nested_hwpts();
    assert_eq!(hwpts.len(), 1, "{:?}", vm.objects());
    let vste = hwpts[0];
    assert_eq!(vste[0] & 1, 1, "V");
    assert_eq!(vste[0] >> 1 & 0b111, Config::S1Trans as u64);
    assert_eq!(vste[0] & 0x000f_ffff_ffff_ffc0, base, "S1ContextPtr");
    assert_eq!(vste[0] >> 59, 4, "S1CDMax");
    let (hwpt, words) = vm.device.as_ref().unwrap().nested().unwrap();
    // The host keeps the words with EATS cleared (it sets EATS itself when it has ATS).
    assert_eq!(words[1] >> 28 & 0b11, 1, "EATS full asked");
    assert_eq!(words, [vste[0], vste[1] | 1 << 28]);
    let dev = vm.device.as_ref().unwrap().dev_id();
    assert!(matches!(
        vm.objects()[&dev],
        SmmuObjectState::Device { hwpt: Some(h), .. } if h == hwpt
    ));
    assert_eq!(vm.vsmmu.stats().table_attaches, 1);
    // A bypassing STE: a nested HWPT with Config bypass replaces it.
    drv.write_ste(SID, Some(&Ste::new(Config::Bypass))).unwrap();
    assert_eq!(vm.vsmmu.host_config(SID).unwrap(), HostConfig::Stage2);
    assert_eq!(vm.nested_hwpts(), [[1 | 0b100 << 1, 0]]);
    assert_eq!(vm.vsmmu.stats().host_errors, 0);
}

#[test]
fn invalidations_up_to_a_cmd_sync_are_one_hwpt_invalidate() {
    let h = host();
    let vm = Vm::new(&h, 0x121);
    let mut drv = vm.driver();
    translate(&vm, &mut drv);
    let before = vm.vsmmu.stats();
    let mut cmds: Vec<[u64; 2]> = (0..8).map(tlbi_va).collect();
    cmds.push(
        Cmd::CfgiCd {
            sid: SID,
            ssid: 1,
            leaf: true,
        }
        .encode(),
    );
    cmds.push(sync());
    let cons = vm.produce(&cmds);
    let after = vm.vsmmu.stats();
    assert_eq!(after.host_calls - before.host_calls, 1, "one array");
    assert_eq!(after.invalidations - before.invalidations, 9);
    assert_eq!(after.host_errors, 0);
    let now = vm.vsmmu.read(offset::CMDQ_CONS, 4).unwrap() as u32;
    assert_eq!(now, (cons + 10) & 0x1ff, "CMDQ_CONS passed the CMD_SYNC");
    // Two syncs: two arrays.
    let before = vm.vsmmu.stats();
    vm.produce(&[tlbi_va(1), sync(), tlbi_va(2), tlbi_va(3), sync()]);
    let after = vm.vsmmu.stats();
    assert_eq!(after.host_calls - before.host_calls, 2);
    assert_eq!(after.invalidations - before.invalidations, 3);
}

#[test]
fn a_command_the_host_refuses_stops_the_queue_at_it_with_cerror_ill() {
    let h = host();
    let vm = Vm::new(&h, 0x122);
    let mut drv = vm.driver();
    translate(&vm, &mut drv);
    // The VMM's vDEVICE goes behind the vSMMU's back: the host no longer knows the vSID.
    let vdevice = vm.device.as_ref().unwrap().vdevice();
    let mut arg = IommuDestroy {
        size: size_of::<IommuDestroy>() as u32,
        id: vdevice,
    }
    .to_bytes();
    vm.file.ioctl(IOMMU_DESTROY, &mut arg).unwrap();
    let cfgi = Cmd::CfgiCd {
        sid: SID,
        ssid: 1,
        leaf: true,
    }
    .encode();
    let before = vm.vsmmu.stats();
    let cons = vm.produce(&[tlbi_va(0), cfgi, tlbi_va(1), sync()]);
    let after = vm.vsmmu.stats();
    assert_eq!(
        after.invalidations - before.invalidations,
        1,
        "the TLBI before it"
    );
    let now = vm.vsmmu.read(offset::CMDQ_CONS, 4).unwrap() as u32;
    assert_eq!(now & 0x1ff, (cons + 1) & 0x1ff, "stopped at CMD_CFGI_CD");
    assert_eq!(now >> 24 & 0x7f, 1, "CERROR_ILL");
    let active = (vm.vsmmu.read(offset::GERROR, 4).unwrap()
        ^ vm.vsmmu.read(offset::GERRORN, 4).unwrap()) as u32;
    assert_eq!(active, gerror::CMDQ_ERR);
    assert_eq!(after.command_errors - before.command_errors, 1);
    let errors = vm.vsmmu.take_host_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].call, HostCall::ViommuInvalidate(cfgi));
    assert_eq!(errors[0].error, Errno::EIO);
}

#[test]
fn another_vms_vsid_is_refused_and_teardown_leaves_the_host_empty() {
    let h = host();
    let mut a = Vm::new(&h, 0x123);
    let b = Vm::new(&h, 0x124);
    let mut drv = a.driver();
    translate(&a, &mut drv);
    // VM A names VM B's device by its StreamID: no vDEVICE of A's vIOMMU has it.
    let other = Cmd::CfgiCdAll { sid: 0x124 }.encode();
    let fd = a.iommufd.as_ref().unwrap();
    assert_eq!(fd.invalidate(&[other]), Err((0, Errno::EIO)));
    // B's vIOMMU id is an id of B's file only.
    let b_viommu = b.iommufd.as_ref().unwrap().viommu_id().unwrap();
    assert!(b.objects().contains_key(&b_viommu));
    // Teardown: the guest driver, the vSMMU's stream, the device's objects, the vIOMMU's
    // and the IOAS, then the files.
    drv.shutdown();
    a.vsmmu.detach_passthrough(SID).unwrap();
    assert_eq!(a.vsmmu.stats().host_errors, 0);
    let veventq = fd.veventq_fd().unwrap();
    a.device = None;
    a.iommufd = None;
    let dev = a.objects().into_values().collect::<Vec<_>>();
    assert!(
        matches!(dev[..], [SmmuObjectState::Device { hwpt: None, .. }]),
        "only the bound device is left: {dev:?}"
    );
    a.fds.close(veventq);
    a.fds.close(a.fd);
    a.cdev = None;
    assert!(a.objects().is_empty());
    drop(b);
    assert!(h.smmu.vmids().is_empty());
    let (tlb, _, cds) = h.hw.cached_entries();
    assert_eq!((tlb, cds), (0, 0));
}

#[test]
fn events_the_host_lost_show_as_the_guest_event_queues_overflow() {
    let h = host();
    let vm = Vm::new(&h, 0x124);
    vm.dev.enable(CTRL_PASID_EN).unwrap();
    let mut drv = vm.driver();
    translate(&vm, &mut drv);
    // 65 reads through CD 1, whose stage 1 maps nothing: 65 F_TRANSLATION events for the
    // vIOMMU's queue of 64, which keeps 64 and says it lost the rest.
    for i in 0..65u64 {
        let d = Descriptor {
            pasid: Some(Pasid::new(1).unwrap()),
            privileged: false,
            block_on_fault: false,
            completion: CompletionRequest::None,
            op: Operation::Memmove {
                src: 0x7f00_0000_0000 + i * 4096,
                dst: 0x7f10_0000_0000,
                size: 64,
            },
        };
        vm.dev.portal_write(0, &d.encode()).unwrap();
        vm.dev.process();
    }
    h.smmu.handle_queues();
    let got = vm.iommufd.as_ref().unwrap().read_events().unwrap();
    assert_eq!(got.len(), 65);
    assert_eq!(got[64], Vevent::Lost);
    for e in got {
        match e {
            Vevent::Event(record) => assert!(vm.vsmmu.inject_vevent(record).unwrap()),
            Vevent::Lost => assert!(vm.vsmmu.inject_vevents_lost()),
        }
    }
    assert!(
        !vm.vsmmu.inject_vevents_lost(),
        "one overflow until acknowledged"
    );
    let prod = vm.vsmmu.read(offset::EVENTQ_PROD, 4).unwrap();
    let cons = vm.vsmmu.read(offset::EVENTQ_CONS, 4).unwrap();
    assert_ne!((prod ^ cons) & 1 << 31, 0, "EVENTQ_PROD.OVFLG toggled");
    // The guest driver finds the 64 events and the overflow, and acknowledges it; a later
    // loss shows again.
    let events = drv.read_events().unwrap();
    assert_eq!(events.records.len(), 64);
    assert!(events.overflowed);
    assert!(vm.vsmmu.inject_vevents_lost());
    assert_eq!(vm.vsmmu.stats().vevents_lost, 3);
    assert!(drv.read_events().unwrap().overflowed);
}

#[test]
fn a_guest_page_request_through_the_fault_queue_resolves_and_the_bytes_move() {
    const SRC_GVA: u64 = 0x7f00_0000_0000;
    const COMP_GVA: u64 = 0x7f00_0001_0000;
    const LAZY_GVA: u64 = 0x7f00_0002_0000;
    const SRC_GPA: u64 = 0x140_0000;
    const COMP_GPA: u64 = 0x141_0000;
    const DST_GPA: u64 = 0x142_0000;
    let h = host();
    let vm = Vm::new(&h, 0x125);
    vm.dev
        .enable(CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN)
        .unwrap();
    let mut drv = vm.driver();
    translate(&vm, &mut drv);
    // The guest process's stage 1 at CD 1's TTB0 (0x40_0000): its source and completion
    // pages, not the page it writes to.
    let cd = ContextDescriptor::new(0x40_0000, 16, ASID);
    let mut s1 = TableBuilder::stage1(&cd.s1_config(&Features::VSVA).unwrap());
    let mut next = 0x40_1000;
    let mut map = |s1: &mut TableBuilder, gva: u64, gpa: u64| {
        let mut alloc = || {
            let f = next;
            next += 4096;
            Some(f)
        };
        let attrs = D::AF | D::AP_EL0 | D::NG;
        s1.map(&*vm.ram, &mut alloc, gva, gpa, PageSize::Size4K, attrs)
            .unwrap();
    };
    map(&mut s1, SRC_GVA, SRC_GPA);
    map(&mut s1, COMP_GVA, COMP_GPA);
    let data: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(7) ^ 0x5a).collect();
    vm.ram.write(SRC_GPA, &data).unwrap();
    vm.ram.write(COMP_GPA, &[0; 32]).unwrap();
    let d = Descriptor {
        pasid: Some(Pasid::new(1).unwrap()),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::Always(COMP_GVA),
        op: Operation::Memmove {
            src: SRC_GVA,
            dst: LAZY_GVA + 8,
            size: 100,
        },
    };
    vm.dev.portal_write(0, &d.encode()).unwrap();
    vm.dev.process();
    assert_eq!(vm.dev.waiting_for_page_response(), 1);
    // Host: the PRI queue to the vIOMMU's fault queue; VMM: the group to the guest's PRI
    // queue.
    assert_eq!(h.smmu.handle_queues(), 1);
    let reqs = vm.iommufd.as_ref().unwrap().read_page_requests().unwrap();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let (host_sid, req) = reqs[0];
    assert_eq!(host_sid, SourceId::from_rid(0x125));
    assert_eq!(
        vm.vsmmu.inject_page_request(host_sid, &req),
        Ok(PriOutcome::Queued)
    );
    // Guest: its PRI queue names its StreamID, CD 1 and the address; it maps the page
    // and answers with CMD_PRI_RESP Success.
    let entries = drv.read_page_requests().unwrap().records;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = entries[0];
    assert_eq!((e.sid, e.ssid, e.addr & !0xfff), (SID, Some(1), LAZY_GVA));
    assert!(e.write && e.last);
    map(&mut s1, LAZY_GVA, DST_GPA);
    drv.pri_resp(e.sid, e.ssid, e.prg_index, PriResp::Success)
        .unwrap();
    // The response went down with the group's cookie: the device retries and the copy
    // lands in the page the guest mapped.
    vm.dev.process();
    assert_eq!(vm.dev.waiting_for_page_response(), 0);
    let rec = CompletionRecord::from_bytes(&{
        let mut b = [0u8; 32];
        vm.ram.read(COMP_GPA, &mut b).unwrap();
        b
    })
    .unwrap();
    assert_eq!(rec.status, CompletionStatus::Success, "{rec:?}");
    let mut got = vec![0u8; 100];
    vm.ram.read(DST_GPA + 8, &mut got).unwrap();
    assert_eq!(got, data);
    assert_eq!(
        vm.vsmmu.stats().host_errors,
        0,
        "{:?}",
        vm.vsmmu.take_host_errors()
    );
    // A second response for the group is refused by the host (no such cookie left).
    drv.pri_resp(e.sid, e.ssid, e.prg_index, PriResp::Success)
        .unwrap();
    assert_eq!(vm.vsmmu.stats().host_errors, 1);
}
