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
use vsva_hw::dma::{DmaEngine, DmaEngineConfig};
use vsva_hw::smmuv3::{Smmu, SmmuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory};
use vsva_smmuv3::regs::{gerror, offset};
use vsva_smmuv3::{
    cd::ContextDescriptor, cmd::Cmd, cmd::SyncCs, cmd::TlbiAddr, regs::RegError, ste::Config,
    ste::Eats, ste::S1Dss, ste::Ste,
};
use vsva_smmuv3_driver::{DmaAlloc, DriverConfig, Registers, SmmuDriver};
use vsva_uapi::iommufd::{IommuDestroy, IOMMU_DESTROY};
use vsva_uapi::wire::Wire;
use vsva_uapi::{error::Errno, file::UapiFile};
use vsva_vmm::{
    HostCall, HostConfig, SmmuIommufd, SmmuIommufdDevice, UserBuffer, VSmmu, VSmmuConfig,
    VSmmuError,
};
use vsva_vtd::{addr::Gpa, addr::Hpa, addr::SourceId};

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
    _dev: Arc<DmaEngine>,
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
        let lookup = |n: i32| fds.veventq(n).map(|f| f as Arc<dyn UapiFile>);
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
            _dev: dev,
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
