//! iommufd on the host SMMUv3 against the physical SMMUv3 model (strict mode) and the DMA
//! engine: `IOMMU_GET_HW_INFO` with the SMMU's ID registers, a nest-parent stage 2, a
//! vIOMMU and vDEVICE, a nested HWPT carrying the guest's STE, guest commands through
//! `IOMMU_HWPT_INVALIDATE` on the vIOMMU; real bytes move at guest virtual addresses
//! through the guest's CD table and stage 1 nested over stage 2; every refused call gives
//! Linux's errno and changes nothing; closing leaves nothing.

use std::collections::BTreeMap;
use std::mem::size_of;
use std::sync::Arc;
use vsva_mem::PhysMem;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::container::Container;
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::iommufd::smmu::{SmmuIommufdFile, SmmuObjectState};
use vsva_host::pasid::PasidAllocator;
use vsva_host::smmu::{SmmuDomain, SmmuHost};
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN};
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DmaEngine, DmaEngineConfig,
    Operation,
};
use vsva_hw::smmuv3::{Smmu, SmmuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory, memory::PAGE_SIZE};
use vsva_smmuv3::desc::Descriptor as D;
use vsva_smmuv3::regs::offset;
use vsva_smmuv3::{
    builder::TableBuilder, cd::ContextDescriptor, cmd::Cmd, cmd::TlbiAddr, event::Event,
    event::EventType, features::Features, features::StallModel, walk::PageSize,
};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::Wire;
use vsva_uapi::{
    error::Errno, file::arm_smmuv3_commands, file::HwptData, file::IommuModel, file::IommufdIoctls,
    file::UapiFile, file::UserArray, file::VfioIoctls,
};
use vsva_vtd::{addr::Gpa, addr::Hpa, addr::Pasid, addr::SourceId};

/// Guest RAM: 32 MiB at GPA 0, mapped at IOVA (IPA) 0.
const RAM: u64 = 32 << 20;
/// The guest's CD table (16 CDs, linear), its stage-1 tables, a second stage-1 table.
const CD_GPA: u64 = 0x8_0000;
const PT_GPA: u64 = 0x10_0000;
const PT2_GPA: u64 = 0x20_0000;
const SRC_GPA: u64 = 0x100_0000;
const DST_GPA: u64 = 0x140_0000;
const NEW_DST_GPA: u64 = 0x180_0000;
const COMP_GPA: u64 = 0x1c0_0000;
/// VMM scratch memory for ioctl data (inside the RAM window, never DMA'd).
const SCRATCH_GPA: u64 = 0x1e0_0000;
const SRC_GVA: u64 = 0x7f00_1234_0000;
const DST_GVA: u64 = 0x7f00_5678_0000;
const COMP_GVA: u64 = 0x7f00_9abc_0000;
const SSID: u32 = 3;
const ASID: u16 = 0x21;
const ASID2: u16 = 0x22;
const VSID: u64 = 0x99;
const RW_EL0: u64 = D::AF | D::AP_EL0 | D::NG;

struct Host {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hw: Arc<Smmu>,
    smmu: Arc<SmmuHost>,
}

fn host() -> Host {
    host_with(SmmuConfig::default().features)
}

/// A host whose SMMU (strict mode) has `features`.
fn host_with(features: Features) -> Host {
    let mem = HostMemory::new(256 << 20).unwrap();
    let frames = Arc::new(FrameAllocator::new(mem.clone()));
    let cfg = SmmuConfig {
        strict: true,
        features,
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

/// A VMM with one VM: its RAM, an SMMU iommufd with the RAM mapped in an IOAS, one DMA
/// engine bound through its cdev, and a guest process's stage-1 tables and CD.
struct Vm {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hpa: Hpa,
    ram: GuestMemoryMmap,
    vaddr: u64,
    file: Arc<SmmuIommufdFile>,
    fds: Arc<Iommufds>,
    cdev: Option<VfioDeviceFile>,
    dev: Arc<DmaEngine>,
    sid: u32,
    dev_id: u32,
    ioas: u32,
    /// The guest process's stage-1 table (taken while it is changed).
    s1: Option<TableBuilder>,
    next_pt: u64,
}

fn arg<T: Wire>(v: &T) -> Vec<u8> {
    v.to_bytes()
}

impl Vm {
    fn new(host: &Host, rid: SourceId) -> Vm {
        Vm::with(host, rid, CTRL_PASID_EN)
    }

    /// A VM whose device is enabled with `ctrl`.
    fn with(host: &Host, rid: SourceId, ctrl: u64) -> Vm {
        let hpa = host.frames.alloc_range(RAM, 2 << 20).unwrap();
        let ram = host.mem.guest_memory(&[(Gpa(0), hpa, RAM)]).unwrap();
        let vaddr = ram.get_host_address(GuestAddress(0)).unwrap() as u64;
        let fds = Iommufds::new();
        let (fd, file) = fds.open_smmu(&host.smmu);
        let dev = Arc::new(DmaEngine::new(DmaEngineConfig::new(rid), host.hw.clone()).unwrap());
        host.hw.attach_endpoint(u32::from(rid.rid()), dev.clone());
        dev.enable(ctrl).unwrap();
        let cdev = VfioDeviceFile::open(rid, fds.clone());
        let dev_id = cdev.device_bind_iommufd(fd).unwrap();
        let mut vm = Vm {
            mem: host.mem.clone(),
            frames: host.frames.clone(),
            hpa,
            ram,
            vaddr,
            file,
            fds,
            cdev: Some(cdev),
            dev,
            sid: u32::from(rid.rid()),
            dev_id,
            ioas: 0,
            s1: None,
            next_pt: PT_GPA + PAGE_SIZE,
        };
        vm.ioas = vm.file.ioas_alloc().unwrap();
        vm.file
            .ioas_map(vm.ioas, IOMMU_IOAS_MAP_FLAGS, vaddr, RAM, 0)
            .unwrap();
        // The guest process: stage 1 at PT_GPA, its CD at SSID of the CD table.
        let mut s1 =
            TableBuilder::stage1(&Self::cd(PT_GPA, ASID).s1_config(&Features::VSVA).unwrap());
        for (gva, gpa, n) in [
            (SRC_GVA, SRC_GPA, 4),
            (DST_GVA, DST_GPA, 4),
            (COMP_GVA, COMP_GPA, 1),
        ] {
            vm.map(&mut s1, gva, gpa, n);
        }
        vm.s1 = Some(s1);
        vm.write_cd(Self::cd(PT_GPA, ASID));
        vm
    }

    fn cd(ttb0: u64, asid: u16) -> ContextDescriptor {
        ContextDescriptor::new(ttb0, 16, asid)
    }

    fn write_cd(&self, cd: ContextDescriptor) {
        for (i, w) in cd.encode().iter().enumerate() {
            self.write(CD_GPA + SSID as u64 * 64 + 8 * i as u64, &w.to_le_bytes());
        }
    }

    fn phys(&self) -> vsva_mem::MemWindow<Arc<HostMemory>> {
        vsva_mem::MemWindow::new(self.mem.clone(), self.hpa.0, RAM)
    }

    fn map(&mut self, s1: &mut TableBuilder, gva: u64, gpa: u64, pages: u64) {
        let phys = self.phys();
        for i in 0..pages {
            let mut next = self.next_pt;
            let mut alloc = || {
                let f = next;
                next += PAGE_SIZE;
                Some(f)
            };
            s1.map(
                &phys,
                &mut alloc,
                gva + i * PAGE_SIZE,
                gpa + i * PAGE_SIZE,
                PageSize::Size4K,
                RW_EL0,
            )
            .unwrap();
            self.next_pt = next;
        }
    }

    /// Points `gva` at another page, as the guest kernel does, without invalidating.
    fn remap(&mut self, gva: u64, gpa: u64) {
        let mut s1 = self.s1.take().unwrap();
        s1.unmap(&self.phys(), gva, PageSize::Size4K).unwrap();
        self.map(&mut s1, gva, gpa, 1);
        self.s1 = Some(s1);
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        PhysMem::write(&*self.mem, self.hpa.0 + gpa, bytes).unwrap();
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        PhysMem::read(&*self.mem, self.hpa.0 + gpa, &mut b).unwrap();
        b
    }

    /// Puts `bytes` in the VMM's scratch memory; their user address.
    fn user(&self, bytes: &[u8]) -> u64 {
        self.write(SCRATCH_GPA, bytes);
        self.vaddr + SCRATCH_GPA
    }

    /// An iommufd ioctl on `v`, which gets what the kernel wrote back.
    fn call<T: Wire>(&self, cmd: u32, v: &mut T) -> Result<(), Errno> {
        let mut bytes = arg(v);
        let r = self.file.ioctl(cmd, &mut bytes);
        *v = T::read(&bytes);
        r.map(|_| ())
    }

    fn objects(&self) -> BTreeMap<u32, SmmuObjectState> {
        self.file.lock().objects()
    }

    fn attach(&self, pt_id: u32) -> Result<(), Errno> {
        let cdev = self.cdev.as_ref().unwrap();
        cdev.device_attach_pt(pt_id, None).map(drop)
    }

    fn hwpt_alloc(&self, flags: u32, pt_id: u32, data: Option<&[u8]>) -> Result<u32, Errno> {
        self.hwpt_alloc_fault(flags, pt_id, data, 0)
    }

    /// `IOMMU_HWPT_ALLOC` with `fault_id`.
    fn hwpt_alloc_fault(
        &self,
        flags: u32,
        pt_id: u32,
        data: Option<&[u8]>,
        fault_id: u32,
    ) -> Result<u32, Errno> {
        let data = data.map_or(HwptData::NONE, |d| HwptData {
            len: d.len() as u32,
            ..HwptData::arm_smmuv3(self.user(d))
        });
        self.file
            .hwpt_alloc(self.dev_id, pt_id, flags, data, fault_id)
    }

    fn nested(&self, viommu: u32, vste: [u64; 2]) -> Result<u32, Errno> {
        let data = IommuHwptArmSmmuv3 { ste: vste }.to_bytes();
        self.hwpt_alloc(0, viommu, Some(&data))
    }

    fn viommu(&self, hwpt_id: u32, type_: u32) -> Result<u32, Errno> {
        self.file.viommu_alloc(self.dev_id, hwpt_id, type_)
    }

    fn vdevice(&self, viommu_id: u32, virt_id: u64) -> Result<u32, Errno> {
        self.file.vdevice_alloc(viommu_id, self.dev_id, virt_id)
    }

    fn destroy(&self, id: u32) -> Result<(), Errno> {
        self.file.destroy(id)
    }

    /// `IOMMU_HWPT_INVALIDATE` of `cmds` through `viommu`: the result and `entry_num`.
    fn invalidate(&self, viommu: u32, cmds: &[[u64; 2]]) -> (Result<(), Errno>, u32) {
        let uptr = self.user(&arm_smmuv3_commands(cmds));
        self.file
            .hwpt_invalidate(viommu, UserArray::arm_smmuv3(uptr, cmds.len() as u32))
    }

    /// A memmove of `len` bytes by the device, with `pasid`, at device addresses; the
    /// completion status (the record is at `comp`, guest physical `comp_gpa`).
    fn memmove(
        &self,
        pasid: Option<u32>,
        src: u64,
        dst: u64,
        len: u32,
        comp: (u64, u64),
    ) -> CompletionStatus {
        self.write(comp.1, &[0; 32]);
        let d = Descriptor {
            pasid: pasid.map(|p| Pasid::new(p).unwrap()),
            privileged: false,
            block_on_fault: false,
            completion: CompletionRequest::Always(comp.0),
            op: Operation::Memmove {
                src,
                dst,
                size: len,
            },
        };
        self.dev.portal_write(0, &d.encode()).unwrap();
        self.dev.process();
        CompletionRecord::from_bytes(&self.read(comp.1, 32).try_into().unwrap())
            .map_or(CompletionStatus::None, |r| r.status)
    }

    /// A copy at guest virtual addresses, SubstreamID SSID; whether it succeeded.
    fn copy_gva(&self, data: &[u8]) -> bool {
        self.write(SRC_GPA, data);
        self.memmove(
            Some(SSID),
            SRC_GVA,
            DST_GVA,
            data.len() as u32,
            (COMP_GVA, COMP_GPA),
        ) == CompletionStatus::Success
    }

    /// A copy at guest physical addresses, without SubstreamID; whether it succeeded.
    fn copy_gpa(&self, data: &[u8]) -> bool {
        self.write(SRC_GPA, data);
        self.memmove(
            None,
            SRC_GPA,
            DST_GPA,
            data.len() as u32,
            (COMP_GPA, COMP_GPA),
        ) == CompletionStatus::Success
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.cdev = None;
        self.mem.release_guest_memory(&self.ram);
        self.frames.free(self.hpa).unwrap();
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn rid(dev: u8) -> SourceId {
    SourceId::new(0, dev, 0).unwrap()
}

/// The guest's STE words: stage 1 through the CD table at CD_GPA (16 CDs, linear),
/// S1DSS bypass, write-back cacheable inner shareable table walks.
fn vste_s1() -> [u64; 2] {
    [
        1 | 0b101 << 1 | CD_GPA | 4 << 59,
        1 | 1 << 2 | 1 << 4 | 3 << 6,
    ]
}

fn tlbi_nh_va(vmid: u16, asid: u16, va: u64) -> [u64; 2] {
    Cmd::TlbiNhVa {
        vmid,
        asid,
        addr: TlbiAddr {
            addr: va,
            leaf: true,
            ..TlbiAddr::default()
        },
    }
    .encode()
}

fn errno(e: i32) -> Result<(), Errno> {
    Err(Errno::new(e))
}

/// One VFIO path at a time on the SMMU too (`vfio_device_block_group`): while the cdev
/// has the device bound (and attached), a type1 container's attach is EBUSY and leaves the
/// device's DMA where it was; once the cdev closes, the container takes it, and a cdev
/// bind is EBUSY and changes nothing of the iommufd; when the container lets it go, a cdev
/// binds it again.
#[test]
fn a_device_is_used_through_a_type1_container_or_a_cdev_not_both() {
    let host = host();
    let mut vm = Vm::new(&host, rid(6));
    let alloc = Arc::new(std::sync::Mutex::new(PasidAllocator::new()));
    let mut c = Container::new(alloc, 4, SmmuDomain::new(&host.smmu).unwrap()).unwrap();
    c.set_iommu(IommuModel::Type1v2).unwrap();
    vm.attach(vm.ioas).unwrap();
    let e = c.attach_device(rid(6)).unwrap_err();
    assert_eq!(e.errno(), -libc::EBUSY, "{e}");
    assert!(c.devices().is_empty());
    let data = pattern(64, 9);
    assert!(
        vm.copy_gpa(&data),
        "the iommufd keeps the device and its DMA"
    );
    assert_eq!(vm.read(DST_GPA, 64), data);

    vm.cdev = None;
    c.attach_device(rid(6)).unwrap();
    let (fd, other) = vm.fds.open_smmu(&host.smmu);
    let cdev = VfioDeviceFile::open(rid(6), vm.fds.clone());
    let before = other.lock().objects();
    assert_eq!(cdev.device_bind_iommufd(fd), Err(Errno::EBUSY));
    assert_eq!(other.lock().objects(), before);
    assert_eq!(cdev.dev_id(), None);
    assert_eq!(c.devices(), vec![rid(6)], "the container keeps the device");

    c.detach_device(rid(6)).unwrap();
    let dev_id = cdev.device_bind_iommufd(fd).unwrap();
    assert_eq!(cdev.dev_id(), Some(dev_id));
}

#[test]
fn hw_info_gives_the_smmu_id_registers_and_a_nest_parent_is_stage_2() {
    let host = host();
    let vm = Vm::new(&host, rid(3));
    // GET_HW_INFO: iommu_hw_info_arm_smmuv3 with IDR0..5 as the registers read.
    let want: Vec<u32> = (0..6)
        .map(|i| host.hw.mmio_read(offset::IDR0 + 4 * i, 4).unwrap() as u32)
        .collect();
    let info_at = |len: u32, flags: u32, ty: u32| {
        vm.write(SCRATCH_GPA, &[0xa5; 64]);
        let r = vm
            .file
            .get_hw_info(vm.dev_id, flags, ty, len, vm.vaddr + SCRATCH_GPA);
        (r, vm.read(SCRATCH_GPA, 64))
    };
    let (r, buf) = info_at(48, 0, 0);
    let i = r.unwrap();
    assert_eq!(hw_info_data_type(&i), IOMMU_HW_INFO_TYPE_ARM_SMMUV3);
    assert_eq!(i.data_len, 40);
    assert_eq!(i.out_max_pasid_log2, host.smmu.features().ssid_bits);
    let data = IommuHwInfoArmSmmuv3::read(&buf);
    assert_eq!(data.idr.to_vec(), want);
    assert_ne!(data.idr[0], 0);
    assert_eq!(&buf[40..48], &[0; 8], "a larger buffer's tail is zeroed");
    assert_eq!(&buf[48..], &[0xa5; 16]);
    // A smaller buffer gets the head; the type can be asked for; VT-d's cannot.
    let (r, buf) = info_at(
        12,
        IOMMU_HW_INFO_FLAG_INPUT_TYPE,
        IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
    );
    r.unwrap();
    assert_eq!(&buf[8..12], &want[0].to_le_bytes());
    assert_eq!(&buf[12..16], &[0xa5; 4]);
    let (r, _) = info_at(
        40,
        IOMMU_HW_INFO_FLAG_INPUT_TYPE,
        IOMMU_HW_INFO_TYPE_INTEL_VTD,
    );
    assert_eq!(r.map(drop), errno(libc::EOPNOTSUPP));
    assert_eq!(
        vm.file.get_hw_info(77, 0, 0, 0, 0).map(drop),
        errno(libc::ENOENT)
    );

    // HWPT_ALLOC on the IOAS: NEST_PARENT is a stage-2 domain with a VMID of its own;
    // with dirty tracking (stage 1's, never a nest parent's) or the PASID flag it is
    // EOPNOTSUPP, nothing made.
    let before = vm.objects();
    for flags in [
        IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
        IOMMU_HWPT_ALLOC_PASID,
        1 << 31,
    ] {
        assert_eq!(
            vm.hwpt_alloc(flags | IOMMU_HWPT_ALLOC_NEST_PARENT, vm.ioas, None),
            Err(Errno::new(libc::EOPNOTSUPP))
        );
    }
    assert_eq!(vm.objects(), before);
    assert!(host.smmu.vmids().is_empty());
    let parent = vm
        .hwpt_alloc(IOMMU_HWPT_ALLOC_NEST_PARENT, vm.ioas, None)
        .unwrap();
    let Some(SmmuObjectState::HwptPaging {
        nest_parent: true,
        vmid,
        ..
    }) = vm.objects().get(&parent).cloned()
    else {
        panic!("{:?}", vm.objects());
    };
    assert_eq!(host.smmu.vmids(), [vmid]);
    // Before the attach, the stream has no STE: DMA fails. Attached: stage 2 serves GPAs.
    assert!(!vm.copy_gpa(&pattern(64, 1)));
    vm.attach(parent).unwrap();
    let ste = host.smmu.ste(vm.sid).unwrap();
    assert_eq!((ste[0] >> 1) & 7, 0b110, "Config stage 2 alone");
    assert_eq!(ste[2] & 0xffff, u64::from(vmid));
    let data = pattern(8192, 2);
    assert!(vm.copy_gpa(&data));
    assert_eq!(vm.read(DST_GPA, 8192), data);
    // No stage 1: a request with a SubstreamID is refused.
    assert!(!vm.copy_gva(&pattern(64, 3)));
    // The attached parent cannot be destroyed.
    assert_eq!(vm.destroy(parent), errno(libc::EBUSY));
    // A stage-2 unmap reaches the device: the page is gone, with its TLB entries.
    assert_eq!(vm.file.ioas_unmap(vm.ioas, 0, u64::MAX), Ok(RAM));
    assert!(!vm.copy_gpa(&pattern(64, 4)));
    assert_eq!(host.hw.take_stale(), []);
}

#[test]
fn a_nested_hwpt_translates_the_guests_substreams_through_its_cd_table() {
    let host = host();
    let vm = Vm::new(&host, rid(4));
    let parent = vm
        .hwpt_alloc(IOMMU_HWPT_ALLOC_NEST_PARENT, vm.ioas, None)
        .unwrap();
    let plain = vm.hwpt_alloc(0, vm.ioas, None).unwrap();
    vm.attach(parent).unwrap();

    // VIOMMU_ALLOC: refusals change nothing.
    let before = vm.objects();
    assert_eq!(
        vm.viommu(parent, IOMMU_VIOMMU_TYPE_DEFAULT),
        Err(Errno::new(libc::EOPNOTSUPP))
    );
    assert_eq!(vm.viommu(parent, 2), Err(Errno::new(libc::EOPNOTSUPP)));
    assert_eq!(
        vm.viommu(0, IOMMU_VIOMMU_TYPE_ARM_SMMUV3),
        Err(Errno::new(libc::ENOENT))
    );
    assert_eq!(
        vm.viommu(vm.ioas, IOMMU_VIOMMU_TYPE_ARM_SMMUV3),
        Err(Errno::new(libc::ENOENT))
    );
    assert_eq!(
        vm.viommu(plain, IOMMU_VIOMMU_TYPE_ARM_SMMUV3),
        Err(Errno::new(libc::EINVAL))
    );
    assert_eq!(vm.objects(), before);
    let viommu = vm.viommu(parent, IOMMU_VIOMMU_TYPE_ARM_SMMUV3).unwrap();

    // Nested HWPT allocation: the guest STE's fields are checked (EIO), the data rules
    // (EINVAL, EOPNOTSUPP, E2BIG), nothing made by a refused one.
    let before = vm.objects();
    let s1 = vste_s1();
    let bad_vstes = [
        // A stage-2 field in word 0's reserved bits, S2 fields in word 1 (STRW, SHCFG).
        [s1[0] | 1 << 55, s1[1]],
        [s1[0], s1[1] | 1 << 30],
        [s1[0], s1[1] | 1 << 44],
        // Config stage 2 or nested: the host's.
        [(s1[0] & !0xe) | 0b110 << 1, s1[1]],
        [(s1[0] & !0xe) | 0b111 << 1, s1[1]],
        // EATS split-stage.
        [s1[0], s1[1] | 2 << 28],
        // S1CDMax beyond the SMMU's SSIDSIZE: the STE would be C_BAD_STE.
        [(s1[0] & !(0x1f << 59)) | 31 << 59, s1[1]],
    ];
    for v in bad_vstes {
        assert_eq!(vm.nested(viommu, v), Err(Errno::new(libc::EIO)), "{v:#x?}");
    }
    let data = IommuHwptArmSmmuv3 { ste: s1 }.to_bytes();
    assert_eq!(
        vm.hwpt_alloc(0, viommu, Some(&data[..8])),
        Err(Errno::new(libc::EINVAL))
    );
    let mut long = data.clone();
    long.extend([0, 0, 0, 1]);
    assert_eq!(
        vm.hwpt_alloc(0, viommu, Some(&long)),
        Err(Errno::new(libc::E2BIG))
    );
    assert_eq!(
        vm.hwpt_alloc(IOMMU_HWPT_ALLOC_NEST_PARENT, viommu, Some(&data)),
        Err(Errno::new(libc::EOPNOTSUPP))
    );
    assert_eq!(
        vm.hwpt_alloc(0, parent, Some(&data)),
        Err(Errno::new(libc::EOPNOTSUPP))
    );
    let mut vtd = IommuHwptAlloc {
        size: size_of::<IommuHwptAlloc>() as u32,
        dev_id: vm.dev_id,
        pt_id: viommu,
        data_type: IOMMU_HWPT_DATA_VTD_S1,
        data_len: 24,
        data_uptr: vm.user(&[0; 24]),
        ..Default::default()
    };
    assert_eq!(vm.call(IOMMU_HWPT_ALLOC, &mut vtd), errno(libc::EOPNOTSUPP));
    assert_eq!(vm.objects(), before);
    let nested = vm.nested(viommu, s1).unwrap();

    // A translating nested HWPT needs the device's vDEVICE first (ENOENT), and the
    // refused attach leaves the stage-2 STE.
    let ste = host.smmu.ste(vm.sid);
    assert_eq!(vm.attach(nested), errno(libc::ENOENT));
    assert_eq!(host.smmu.ste(vm.sid), ste);
    let vdev = vm.vdevice(viommu, VSID).unwrap();
    assert_eq!(vm.vdevice(viommu, VSID), Err(Errno::new(libc::EEXIST)));
    assert_eq!(vm.vdevice(viommu, VSID + 1), Err(Errno::new(libc::EEXIST)));
    assert_eq!(vm.vdevice(parent, VSID + 1), Err(Errno::new(libc::ENOENT)));
    vm.attach(nested).unwrap();
    let ste = host.smmu.ste(vm.sid).unwrap();
    assert_eq!((ste[0] >> 1) & 7, 0b111, "Config nested");
    assert_eq!(
        ste[0] & ((1 << 52) - 64),
        CD_GPA,
        "S1ContextPtr: the guest's IPA"
    );

    // Real bytes at guest virtual addresses through the CD table and stage 1, every table
    // and the output through stage 2; without a SubstreamID, S1DSS bypass: GPAs.
    let data = pattern(3 * 4096 + 100, 7);
    assert!(vm.copy_gva(&data));
    assert_eq!(vm.read(DST_GPA, data.len()), data);
    let data = pattern(512, 8);
    assert!(vm.copy_gpa(&data));
    assert_eq!(vm.read(DST_GPA, 512), data);

    // Everything in use is EBUSY to destroy; the vDEVICE is not referenced.
    for id in [parent, viommu, nested] {
        assert_eq!(vm.destroy(id), errno(libc::EBUSY), "{id}");
    }
    assert_eq!(vm.destroy(vm.dev_id), errno(libc::EBUSY));

    // The guest turns its STE to bypass, then abort: a replace each, no vDEVICE needed.
    let bypass = vm.nested(viommu, [1 | 0b100 << 1, 0]).unwrap();
    let abort = vm.nested(viommu, [1, 0]).unwrap();
    let invalid = vm.nested(viommu, [0, 0]).unwrap();
    vm.attach(bypass).unwrap();
    assert!(vm.copy_gpa(&pattern(64, 9)));
    assert!(!vm.copy_gva(&pattern(64, 10)));
    for stop in [abort, invalid] {
        vm.attach(stop).unwrap();
        assert_eq!(
            host.smmu.ste(vm.sid).unwrap()[0] & 0xf,
            1,
            "V=1, Config abort"
        );
        assert!(!vm.copy_gpa(&pattern(64, 11)));
    }
    // Back to stage 1, then to the plain stage 2 of another domain, and back again.
    vm.attach(nested).unwrap();
    assert!(vm.copy_gva(&pattern(64, 12)));
    vm.attach(plain).unwrap();
    assert!(vm.copy_gpa(&pattern(64, 13)));
    assert!(!vm.copy_gva(&pattern(64, 14)));
    vm.attach(nested).unwrap();
    let data = pattern(64, 15);
    assert!(vm.copy_gva(&data));
    assert_eq!(vm.read(DST_GPA, 64), data);
    vm.destroy(vdev).unwrap();
    for id in [bypass, abort, invalid] {
        vm.destroy(id).unwrap();
    }
    assert_eq!(host.hw.take_stale(), []);
}

#[test]
fn guest_commands_through_the_viommu_reach_only_its_vmid_and_streams() {
    let host = host();
    let mut vm = Vm::new(&host, rid(5));
    let parent = vm
        .hwpt_alloc(IOMMU_HWPT_ALLOC_NEST_PARENT, vm.ioas, None)
        .unwrap();
    let viommu = vm.viommu(parent, IOMMU_VIOMMU_TYPE_ARM_SMMUV3).unwrap();
    let vdev = vm.vdevice(viommu, VSID).unwrap();
    let nested = vm.nested(viommu, vste_s1()).unwrap();
    vm.attach(nested).unwrap();
    let one = pattern(256, 1);
    assert!(vm.copy_gva(&one));
    assert_eq!(vm.read(DST_GPA, 256), one);

    // The guest moves DST_GVA and does not invalidate yet: the TLB sends bytes to the old
    // page and strict mode names the missing CMD_TLBI_NH_VA.
    vm.remap(DST_GVA, NEW_DST_GPA);
    let two = pattern(256, 2);
    assert!(vm.copy_gva(&two));
    assert_eq!(vm.read(DST_GPA, 256), two);
    assert!(!host.hw.take_stale().is_empty());

    // The array's rules: a probe, then refusals with entry_num 0 and nothing issued.
    let inv = |hwpt_id: u32, data_type: u32, entry_len: u32, num: u32| {
        let mut i = IommuHwptInvalidate {
            size: size_of::<IommuHwptInvalidate>() as u32,
            hwpt_id,
            data_uptr: vm.user(&[0; 64]),
            data_type,
            entry_len,
            entry_num: num,
            __reserved: 0,
        };
        let r = vm.call(IOMMU_HWPT_INVALIDATE, &mut i);
        (r, i.entry_num)
    };
    let ty = IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3;
    assert_eq!(inv(viommu, ty, 16, 0), (Ok(()), 0));
    assert_eq!(
        inv(viommu, IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, 16, 1),
        (errno(libc::EINVAL), 0)
    );
    assert_eq!(inv(viommu, ty, 8, 1), (errno(libc::EINVAL), 0));
    assert_eq!(inv(viommu, ty, 0, 1), (errno(libc::EINVAL), 0));
    assert_eq!(inv(nested, ty, 16, 1), (errno(libc::EOPNOTSUPP), 0));
    assert_eq!(inv(parent, ty, 16, 1), (errno(libc::EINVAL), 0));
    assert_eq!(inv(77, ty, 16, 1), (errno(libc::ENOENT), 0));
    // Commands a VM may not send: EIO, none issued, the stale entry still there.
    let other_vmid = 0x55;
    let refused = [
        Cmd::CfgiSte {
            sid: VSID as u32,
            leaf: true,
        }
        .encode(),
        Cmd::TlbiS12Vmall { vmid: other_vmid }.encode(),
        Cmd::TlbiS2Ipa {
            vmid: other_vmid,
            addr: TlbiAddr::default(),
        }
        .encode(),
        Cmd::CFGI_ALL.encode(),
        // A vSID no vDEVICE has.
        Cmd::CfgiCdAll { sid: 0x98 }.encode(),
        // A bit outside the command's fields.
        {
            let mut c = tlbi_nh_va(0, ASID, DST_GVA);
            c[0] |= 1 << 20;
            c
        },
    ];
    for c in refused {
        assert_eq!(
            vm.invalidate(viommu, &[c]),
            (errno(libc::EIO), 0),
            "{c:#x?}"
        );
    }
    assert!(vm.copy_gva(&pattern(256, 3)));
    assert_ne!(vm.read(NEW_DST_GPA, 256), pattern(256, 3));
    assert!(!host.hw.take_stale().is_empty());

    // Partial success: TLBI_NH_VA, whatever VMID the guest wrote, runs under the VM's;
    // CMD_SYNC (the host's to issue) stops the array at index 1.
    let sync = Cmd::Sync {
        cs: vsva_smmuv3::cmd::SyncCs::None,
        msh: 0,
        msi_attr: 0,
        msi_data: 0,
        msi_addr: 0,
    }
    .encode();
    let (r, done) = vm.invalidate(viommu, &[tlbi_nh_va(other_vmid, ASID, DST_GVA), sync]);
    assert_eq!((r, done), (errno(libc::EIO), 1));
    let three = pattern(256, 4);
    assert!(vm.copy_gva(&three));
    assert_eq!(vm.read(NEW_DST_GPA, 256), three);
    assert_eq!(host.hw.take_stale(), []);

    // A new CD (another table, another ASID) at SSID: the SMMU keeps the cached CD until
    // CMD_CFGI_CD names the vSID, which the host turns into the device's StreamID.
    let mut s2 = TableBuilder::stage1(&Vm::cd(PT2_GPA, ASID2).s1_config(&Features::VSVA).unwrap());
    vm.next_pt = PT2_GPA + PAGE_SIZE;
    for (gva, gpa, n) in [
        (SRC_GVA, SRC_GPA, 4),
        (DST_GVA, DST_GPA + 0x10_0000, 1),
        (COMP_GVA, COMP_GPA, 1),
    ] {
        vm.map(&mut s2, gva, gpa, n);
    }
    vm.write_cd(Vm::cd(PT2_GPA, ASID2));
    let four = pattern(256, 5);
    assert!(vm.copy_gva(&four));
    assert_eq!(
        vm.read(NEW_DST_GPA, 256),
        four,
        "the cached CD still serves"
    );
    let stale = host.hw.take_stale();
    assert!(
        stale
            .iter()
            .any(|s| matches!(s.missing, Cmd::CfgiCd { sid, .. } if sid == vm.sid)),
        "{stale:?}"
    );
    let cfgi = Cmd::CfgiCd {
        sid: VSID as u32,
        ssid: SSID,
        leaf: true,
    }
    .encode();
    let asid = Cmd::TlbiNhAsid {
        vmid: 0,
        asid: ASID,
    }
    .encode();
    assert_eq!(vm.invalidate(viommu, &[cfgi, asid]), (Ok(()), 2));
    let five = pattern(256, 6);
    assert!(vm.copy_gva(&five));
    assert_eq!(vm.read(DST_GPA + 0x10_0000, 256), five);
    assert_eq!(host.hw.take_stale(), []);

    // Closing the device's cdev takes its vDEVICE with it (the kernel's tombstone): its
    // id is gone, its vSID no longer names a stream, and the stream aborts.
    vm.cdev = None;
    assert_eq!(vm.destroy(vdev), errno(libc::ENOENT));
    assert_eq!(vm.invalidate(viommu, &[cfgi]), (errno(libc::EIO), 0));
    assert_eq!(
        host.smmu.ste(vm.sid).unwrap()[0] & 0xf,
        1,
        "V=1, Config abort"
    );
    assert!(host.smmu.owned_streams().is_empty());
    for id in [nested, viommu, parent] {
        vm.destroy(id).unwrap();
    }
    assert!(host.smmu.vmids().is_empty());
}

#[test]
fn two_vms_on_one_smmu_stay_apart_and_closing_leaves_nothing() {
    let host = host();
    let baseline = host.frames.allocated_bytes();
    {
        let a = Vm::new(&host, rid(6));
        let b = Vm::new(&host, rid(7));
        let mut ids = Vec::new();
        for vm in [&a, &b] {
            let parent = vm
                .hwpt_alloc(IOMMU_HWPT_ALLOC_NEST_PARENT, vm.ioas, None)
                .unwrap();
            let viommu = vm.viommu(parent, IOMMU_VIOMMU_TYPE_ARM_SMMUV3).unwrap();
            vm.vdevice(viommu, VSID).unwrap();
            let nested = vm.nested(viommu, vste_s1()).unwrap();
            vm.attach(nested).unwrap();
            assert!(vm.copy_gva(&pattern(128, 1)));
            ids.push((parent, viommu, nested));
        }
        // B's ids name B's objects only: A's vIOMMU id in B is B's own, its commands run
        // under B's VMID, so A's stale entry stays until A invalidates.
        assert_eq!(host.smmu.vmids().len(), 2);
        let mut a = a;
        a.remap(DST_GVA, NEW_DST_GPA);
        let (_, viommu_b, _) = ids[1];
        assert_eq!(
            b.invalidate(viommu_b, &[tlbi_nh_va(0, ASID, DST_GVA)]),
            (Ok(()), 1)
        );
        let data = pattern(128, 2);
        assert!(a.copy_gva(&data));
        assert_eq!(a.read(DST_GPA, 128), data, "B's TLBI reached A's VMID");
        assert!(!host.hw.take_stale().is_empty());
        let (_, viommu_a, _) = ids[0];
        assert_eq!(
            a.invalidate(viommu_a, &[tlbi_nh_va(0, ASID, DST_GVA)]),
            (Ok(()), 1)
        );
        assert_eq!(host.hw.take_stale(), []);
        // A third file cannot bind A's device through a cdev of its own: the bind is
        // EINVAL (A's cdev has the device open, `vfio_df_open`), the third file and A's
        // STE are unchanged, and the unbound cdev cannot attach.
        let ste_a = host.smmu.ste(a.sid);
        let fds = Iommufds::new();
        let (fd, c) = fds.open_smmu(&host.smmu);
        let cdev = VfioDeviceFile::open(rid(6), fds);
        let mut bind = VfioDeviceBindIommufd {
            argsz: size_of::<VfioDeviceBindIommufd>() as u32,
            flags: 0,
            iommufd: fd,
            out_devid: 0,
            token_uuid_ptr: 0,
        }
        .to_bytes();
        let mut alloc = IommuIoasAlloc {
            size: size_of::<IommuIoasAlloc>() as u32,
            ..Default::default()
        }
        .to_bytes();
        c.ioctl(IOMMU_IOAS_ALLOC, &mut alloc).unwrap();
        let ioas = IommuIoasAlloc::read(&alloc).out_ioas_id;
        let before = c.lock().objects();
        assert_eq!(
            cdev.ioctl(VFIO_DEVICE_BIND_IOMMUFD, &mut bind),
            Err(Errno::EINVAL)
        );
        assert_eq!(cdev.dev_id(), None);
        let mut at = VfioDeviceAttachIommufdPt {
            argsz: size_of::<VfioDeviceAttachIommufdPt>() as u32,
            flags: 0,
            pt_id: ioas,
            pasid: 0,
        }
        .to_bytes();
        assert_eq!(
            cdev.ioctl(VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut at),
            Err(Errno::EINVAL)
        );
        assert_eq!(c.lock().objects(), before);
        assert_eq!(host.smmu.ste(a.sid), ste_a);
        assert_eq!(host.smmu.vmids().len(), 2);
        drop(cdev);
        drop(c);
        drop(b);
        assert_eq!(host.smmu.vmids().len(), 1);
        drop(a);
    }
    let (tlb, _, cds) = host.hw.cached_entries();
    assert_eq!((tlb, cds), (0, 0));
    assert!(host.smmu.owned_streams().is_empty());
    assert!(host.smmu.vmids().is_empty());
    // What stays is the level-2 stream table of each stream, kept as Linux keeps it.
    let l2 = 64u64 << vsva_smmuv3_driver::STRTAB_SPLIT;
    assert!(host.frames.allocated_bytes() <= baseline + 2 * l2);
}

/// `IOMMU_VEVENTQ_ALLOC` on a vIOMMU (depth 2).
fn veventq(vm: &Vm, viommu_id: u32, type_: u32, depth: u32) -> Result<(u32, i32), Errno> {
    vm.file.veventq_alloc(viommu_id, type_, depth)
}

/// The vEVENTs in `bytes`: (flags, sequence, event record or none).
fn vevents(bytes: &[u8]) -> Vec<(u32, u32, Option<Event>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let h = IommufdVeventHeader::read(&bytes[at..]);
        at += 8;
        if h.flags & IOMMU_VEVENTQ_FLAG_LOST_EVENTS != 0 {
            out.push((h.flags, h.sequence, None));
            continue;
        }
        let e = IommuVeventArmSmmuv3::read(&bytes[at..]);
        out.push((h.flags, h.sequence, Some(Event::decode(e.evt).unwrap())));
        at += 32;
    }
    out
}

#[test]
fn stage_1_faults_reach_the_vevent_queue_with_the_vsid() {
    let host = host();
    let mut vm = Vm::new(&host, rid(9));
    let parent = vm
        .hwpt_alloc(IOMMU_HWPT_ALLOC_NEST_PARENT, vm.ioas, None)
        .unwrap();
    let viommu = vm.viommu(parent, IOMMU_VIOMMU_TYPE_ARM_SMMUV3).unwrap();
    vm.vdevice(viommu, VSID).unwrap();
    let nested = vm.nested(viommu, vste_s1()).unwrap();
    vm.attach(nested).unwrap();

    // Refusals: nothing made, no fd installed.
    let before = vm.objects();
    let ty = IOMMU_VEVENTQ_TYPE_ARM_SMMUV3;
    assert_eq!(
        veventq(&vm, viommu, IOMMU_VEVENTQ_TYPE_DEFAULT, 2),
        Err(Errno::new(libc::EOPNOTSUPP))
    );
    assert_eq!(
        veventq(&vm, viommu, 2, 2),
        Err(Errno::new(libc::EOPNOTSUPP))
    );
    assert_eq!(veventq(&vm, viommu, ty, 0), Err(Errno::new(libc::EINVAL)));
    assert_eq!(veventq(&vm, parent, ty, 2), Err(Errno::new(libc::ENOENT)));
    assert_eq!(vm.objects(), before);
    let (qid, fd) = veventq(&vm, viommu, ty, 2).unwrap();
    assert_eq!(veventq(&vm, viommu, ty, 2), Err(Errno::new(libc::EEXIST)));
    let q = vm.fds.veventq(fd).unwrap();
    let mut buf = [0u8; 256];
    assert_eq!(q.read(&mut buf), Ok(0));

    // A guest process reads an address its stage 1 does not map: F_TRANSLATION, with
    // the vSID, its SubstreamID and address.
    let hole = 0x7f00_0000_0000;
    fault(&vm, &host, hole);
    let n = q.read(&mut buf).unwrap();
    let got = vevents(&buf[..n]);
    assert_eq!(got.len(), 1, "{got:?}");
    let (flags, seq, e) = &got[0];
    let e = e.unwrap();
    assert_eq!((*flags, *seq), (0, 0));
    assert_eq!(e.event_type, EventType::Translation);
    assert_eq!((e.sid, e.ssid, e.s2), (VSID as u32, Some(SSID), false));
    assert_eq!(e.input_addr, hole);

    // A stage-2 fault is the host's: the guest maps a GVA to an IPA the VMM never mapped.
    let outside = 0x7f00_0001_0000;
    let mut s1 = vm.s1.take().unwrap();
    vm.map(&mut s1, outside, RAM + 0x10_0000, 1);
    vm.s1 = Some(s1);
    fault(&vm, &host, outside);
    assert_eq!(q.read(&mut buf), Ok(0));

    // Depth 2: the third fault is lost, one header says so with its sequence; then room
    // again.
    for i in 0..3 {
        fault(&vm, &host, hole + (i + 1) * PAGE_SIZE);
    }
    let n = q.read(&mut buf).unwrap();
    let got = vevents(&buf[..n]);
    let seqs: Vec<(u32, u32, bool)> = got.iter().map(|(f, s, e)| (*f, *s, e.is_some())).collect();
    assert_eq!(
        seqs,
        [
            (0, 1, true),
            (0, 2, true),
            (IOMMU_VEVENTQ_FLAG_LOST_EVENTS, 3, false)
        ]
    );
    fault(&vm, &host, hole);
    let n = q.read(&mut buf).unwrap();
    assert_eq!(vevents(&buf[..n])[0].1, 4);

    // Detached (back on the parent's stage 2), the stream reports nothing to the vIOMMU;
    // the vEVENT queue object keeps its vIOMMU busy until destroyed.
    vm.attach(parent).unwrap();
    fault(&vm, &host, hole);
    assert_eq!(q.read(&mut buf), Ok(0));
    vm.destroy(nested).unwrap();
    assert_eq!(vm.destroy(viommu), errno(libc::EBUSY));
    vm.destroy(qid).unwrap();
    assert_eq!(host.hw.take_stale(), []);
}

/// A DMA read at `gva` (SubstreamID SSID) that faults, then the host serves its queues.
fn fault(vm: &Vm, host: &Host, gva: u64) {
    let st = vm.memmove(Some(SSID), gva, DST_GVA, 64, (COMP_GVA, COMP_GPA));
    assert_ne!(st, CompletionStatus::Success);
    host.smmu.handle_queues();
}

/// What `IOMMU_IOAS_IOVA_RANGES` gave: the result, `num_iovas`, the ranges written and
/// `out_iova_alignment`.
type IovaRanges = (Result<(), Errno>, u32, Vec<(u64, u64)>, u64);

impl Vm {
    fn ioas_alloc(&self) -> u32 {
        self.file.ioas_alloc().unwrap()
    }

    /// `IOMMU_IOAS_COPY` of `[src, +length)` of the VM's IOAS into `dst_ioas`, at `dst`
    /// with FIXED_IOVA or allocated; the IOVA written back.
    fn ioas_copy(
        &self,
        dst_ioas: u32,
        flags: u32,
        src: u64,
        length: u64,
        dst: u64,
    ) -> Result<u64, Errno> {
        self.file
            .ioas_copy(dst_ioas, self.ioas, flags, length, dst, src)
    }

    /// `IOMMU_IOAS_IOVA_RANGES` with room for `room` ranges: the result, `num_iovas`,
    /// the ranges written and `out_iova_alignment`.
    fn iova_ranges(&self, ioas: u32, room: u32) -> IovaRanges {
        self.write(SCRATCH_GPA, &[0xa5; 64]);
        let (res, r) = self
            .file
            .ioas_iova_ranges(ioas, room, self.vaddr + SCRATCH_GPA);
        let n = r.num_iovas.min(room) as usize;
        let bytes = self.read(SCRATCH_GPA, 16 * n);
        let ranges = bytes
            .chunks(16)
            .map(|c| {
                let r = IommuIovaRange::read(c);
                (r.start, r.last)
            })
            .collect();
        (res, r.num_iovas, ranges, r.out_iova_alignment)
    }

    fn allow_iovas(&self, ioas: u32, ranges: &[(u64, u64)]) -> Result<(), Errno> {
        let bytes: Vec<u8> = ranges
            .iter()
            .flat_map(|&(start, last)| IommuIovaRange { start, last }.to_bytes())
            .collect();
        self.file
            .ioas_allow_iovas(ioas, ranges.len() as u32, self.user(&bytes))
    }
}

/// IOAS_IOVA_RANGES, IOAS_ALLOW_IOVAS and IOAS_COPY on the SMMU file (the selftest's
/// `iommufd_ioas` sequences): a second IOAS gets pieces of the VM's by copy, and the
/// device attached to a stage 2 of it moves bytes exactly through the copied pages and
/// no others, with the copy's permissions.
#[test]
fn ioas_copy_ranges_and_allowed_iovas_serve_a_second_stage_2() {
    let host = host();
    let vm = Vm::new(&host, rid(6));
    let b = vm.ioas_alloc();

    // IOVA_RANGES: everything before a stage 2 exists; after, the IPA space (48 bits),
    // EMSGSIZE with the count written back when the array is too small.
    let (r, n, ranges, align) = vm.iova_ranges(b, 4);
    r.unwrap();
    assert_eq!((n, ranges, align), (1, vec![(0, u64::MAX)], PAGE_SIZE));
    let hwpt = vm.hwpt_alloc(0, b, None).unwrap();
    let (r, n, _, _) = vm.iova_ranges(b, 0);
    assert_eq!((r, n), (errno(libc::EMSGSIZE), 1));
    let (r, n, ranges, _) = vm.iova_ranges(b, 1);
    r.unwrap();
    assert_eq!((n, ranges), (1, vec![(0, (1 << 48) - 1)]));
    let (r, ..) = vm.iova_ranges(77, 1);
    assert_eq!(r, errno(libc::ENOENT));

    // ALLOW_IOVAS: a range in the reserved part EADDRINUSE, a bad or overlapping one
    // EINVAL, changing nothing; then the allocator uses only the allowed window.
    let window = (0x4000_0000, 0x4fff_ffff);
    assert_eq!(
        vm.allow_iovas(b, &[(1 << 48, (1 << 48) + 0xfff)]),
        errno(libc::EADDRINUSE)
    );
    assert_eq!(vm.allow_iovas(b, &[(0x5000, 0x4000)]), errno(libc::EINVAL));
    assert_eq!(
        vm.allow_iovas(b, &[window, (0x4800_0000, 0x5000_0000)]),
        errno(libc::EINVAL)
    );
    assert_eq!(vm.allow_iovas(77, &[window]), errno(libc::ENOENT));
    vm.allow_iovas(b, &[window]).unwrap();

    // COPY: refusals change nothing.
    let rw = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
    let fixed = IOMMU_IOAS_MAP_FIXED_IOVA;
    let before = vm.objects();
    let len = 4 * PAGE_SIZE;
    assert_eq!(
        vm.ioas_copy(b, rw | 1 << 20, SRC_GPA, len, 0),
        Err(Errno::new(libc::EOPNOTSUPP))
    );
    assert_eq!(
        vm.ioas_copy(b, 0, SRC_GPA, len, 0),
        Err(Errno::new(libc::EINVAL))
    );
    assert_eq!(
        vm.ioas_copy(b, rw, RAM, len, 0),
        Err(Errno::new(libc::ENOENT)),
        "a hole"
    );
    assert_eq!(
        vm.ioas_copy(77, rw, SRC_GPA, len, 0),
        Err(Errno::new(libc::ENOENT))
    );
    assert_eq!(
        vm.ioas_copy(b, rw | fixed, SRC_GPA, len, 1 << 48),
        Err(Errno::new(libc::EINVAL)),
        "beyond the stage 2's IPA size"
    );
    assert_eq!(vm.objects(), before);

    // An allocated IOVA lies in the allowed window; fixed ones are where asked. The
    // source at its own IPAs, the destination read-only at first, the completion page.
    let src_copy = vm.ioas_copy(b, rw, SRC_GPA, len, 0).unwrap();
    assert!(
        (window.0..=window.1 - len + 1).contains(&src_copy),
        "{src_copy:#x}"
    );
    assert_eq!(
        vm.ioas_copy(b, rw | fixed, SRC_GPA, len, SRC_GPA),
        Ok(SRC_GPA)
    );
    assert_eq!(
        vm.ioas_copy(b, IOMMU_IOAS_MAP_READABLE | fixed, DST_GPA, len, DST_GPA),
        Ok(DST_GPA)
    );
    assert_eq!(
        vm.ioas_copy(b, rw | fixed, DST_GPA, len, DST_GPA),
        Err(Errno::new(libc::EEXIST))
    );
    assert_eq!(
        vm.ioas_copy(b, rw | fixed, COMP_GPA, PAGE_SIZE, COMP_GPA),
        Ok(COMP_GPA)
    );

    // DMA through b's stage 2: a write to the read-only copy fails, nothing written.
    vm.attach(hwpt).unwrap();
    vm.write(DST_GPA, &[0; 4096]);
    assert!(!vm.copy_gpa(&pattern(4096, 7)));
    assert_eq!(vm.read(DST_GPA, 4096), vec![0; 4096]);
    // Made writable (unmapped and copied again): the bytes arrive; the allocated copy of
    // the source reads the same memory.
    assert_eq!(vm.file.ioas_unmap(b, DST_GPA, len), Ok(len));
    assert_eq!(
        vm.ioas_copy(b, rw | fixed, DST_GPA, len, DST_GPA),
        Ok(DST_GPA)
    );
    let data = pattern(3 * 4096, 8);
    assert!(vm.copy_gpa(&data));
    assert_eq!(vm.read(DST_GPA, data.len()), data);
    vm.write(DST_GPA, &[0; 4096]);
    vm.write(SRC_GPA, &pattern(4096, 9));
    assert_eq!(
        vm.memmove(None, src_copy, DST_GPA, 4096, (COMP_GPA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert_eq!(vm.read(DST_GPA, 4096), pattern(4096, 9));
    // A page b never got (mapped in the VM's IOAS) is not reachable.
    assert_ne!(
        vm.memmove(None, NEW_DST_GPA, DST_GPA, 64, (COMP_GPA, COMP_GPA)),
        CompletionStatus::Success
    );
    assert_eq!(vm.read(DST_GPA, 4096), pattern(4096, 9));
}

/// `IOMMU_FAULT_QUEUE_ALLOC` with `flags`: the object id and fd number.
fn fault_queue(vm: &Vm, flags: u32) -> Result<(u32, i32), Errno> {
    vm.file.fault_queue_alloc(flags)
}

/// The records in `bytes` read from a fault queue file.
fn pgfaults(bytes: &[u8]) -> Vec<IommuHwptPgfault> {
    bytes.chunks(40).map(IommuHwptPgfault::read).collect()
}

/// Writes one response to the fault queue file.
fn respond(q: &dyn UapiFile, cookie: u32, code: u32) -> Result<usize, Errno> {
    q.write(&IommuHwptPageResponse { cookie, code }.to_bytes())
}

/// The guest's STE words of [`vste_s1`] with EATS full: the device may use ATS and PRI.
fn vste_s1_ats() -> [u64; 2] {
    let [w0, w1] = vste_s1();
    [w0, w1 | 1 << 28]
}

/// Queues a 100-byte copy from SRC_GVA to `dst` (SubstreamID SSID) whose faults wait for
/// a page response.
fn copy_waiting_on_faults(vm: &Vm, dst: u64) {
    vm.write(COMP_GPA, &[0; 32]);
    let d = Descriptor {
        pasid: Some(Pasid::new(SSID).unwrap()),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::Always(COMP_GVA),
        op: Operation::Memmove {
            src: SRC_GVA,
            dst,
            size: 100,
        },
    };
    vm.dev.portal_write(0, &d.encode()).unwrap();
}

fn completion(vm: &Vm) -> CompletionStatus {
    CompletionRecord::from_bytes(&vm.read(COMP_GPA, 32).try_into().unwrap())
        .map_or(CompletionStatus::None, |r| r.status)
}

#[test]
fn a_fault_queue_on_a_nested_hwpt_takes_page_requests_and_answers_with_cmd_pri_resp() {
    let host = host();
    let mut vm = Vm::with(&host, rid(12), CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN);
    let parent = vm
        .hwpt_alloc(IOMMU_HWPT_ALLOC_NEST_PARENT, vm.ioas, None)
        .unwrap();
    let viommu = vm.viommu(parent, IOMMU_VIOMMU_TYPE_ARM_SMMUV3).unwrap();
    vm.vdevice(viommu, VSID).unwrap();

    // Refusals change nothing: flags on the queue, FAULT_ID_VALID naming no queue.
    let before = vm.objects();
    assert_eq!(fault_queue(&vm, 1), Err(Errno::new(libc::EOPNOTSUPP)));
    let data = IommuHwptArmSmmuv3 { ste: vste_s1_ats() }.to_bytes();
    for not_a_queue in [parent, viommu, 999] {
        assert_eq!(
            vm.hwpt_alloc_fault(IOMMU_HWPT_FAULT_ID_VALID, viommu, Some(&data), not_a_queue),
            Err(Errno::new(libc::ENOENT))
        );
    }
    assert_eq!(vm.objects(), before);

    let (fid, fd) = fault_queue(&vm, 0).unwrap();
    assert_eq!(vm.objects()[&fid], SmmuObjectState::Fault);
    let nested = vm
        .hwpt_alloc_fault(IOMMU_HWPT_FAULT_ID_VALID, viommu, Some(&data), fid)
        .unwrap();
    assert_eq!(vm.destroy(fid), errno(libc::EBUSY));
    vm.attach(nested).unwrap();
    assert_eq!(host.smmu.fault_routes(), 1);
    let q = vm.fds.fault(fd).unwrap();
    let mut buf = [0u8; 4 * 40];
    assert_eq!(q.read(&mut buf), Err(Errno::EAGAIN));

    // The device writes a page the guest process has not mapped yet: a PRI page request,
    // read as one record of a whole group with its cookie.
    let lazy = 0x7f00_dead_0000;
    let data = pattern(100, 5);
    vm.write(SRC_GPA, &data);
    copy_waiting_on_faults(&vm, lazy + 8);
    vm.dev.process();
    assert_eq!(vm.dev.waiting_for_page_response(), 1);
    assert_eq!(host.smmu.handle_queues(), 1);
    assert_eq!(q.read(&mut buf[..39]), Err(Errno::EINVAL));
    let n = q.read(&mut buf).unwrap();
    let recs = pgfaults(&buf[..n]);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = recs[0];
    assert_eq!(
        (r.flags, r.dev_id, r.pasid, r.addr, r.perm),
        (
            IOMMU_PGFAULT_FLAGS_PASID_VALID | IOMMU_PGFAULT_FLAGS_LAST_PAGE,
            vm.dev_id,
            SSID,
            lazy,
            IOMMU_PGFAULT_PERM_WRITE
        )
    );
    assert_eq!(q.read(&mut buf), Err(Errno::EAGAIN));

    // An unknown cookie or code is EINVAL and answers nothing.
    assert_eq!(
        respond(&*q, r.cookie + 1, IOMMUFD_PAGE_RESP_SUCCESS),
        Err(Errno::EINVAL)
    );
    assert_eq!(respond(&*q, r.cookie, 7), Err(Errno::EINVAL));
    vm.dev.process();
    assert_eq!(vm.dev.waiting_for_page_response(), 1);

    // The guest maps the page; SUCCESS goes down as CMD_PRI_RESP and the copy finishes.
    let mut s1 = vm.s1.take().unwrap();
    vm.map(&mut s1, lazy, NEW_DST_GPA, 1);
    vm.s1 = Some(s1);
    assert_eq!(respond(&*q, r.cookie, IOMMUFD_PAGE_RESP_SUCCESS), Ok(8));
    vm.dev.process();
    assert_eq!(completion(&vm), CompletionStatus::Success);
    assert_eq!(vm.read(NEW_DST_GPA + 8, 100), data);
    assert_eq!(
        respond(&*q, r.cookie, IOMMUFD_PAGE_RESP_SUCCESS),
        Err(Errno::EINVAL),
        "a group is answered once"
    );

    // A group read and not answered when the stream moves to a HWPT without the queue
    // is answered Invalid (CMD_PRI_RESP Deny): the device stops waiting and reports it.
    let lazy2 = lazy + 0x10_0000;
    copy_waiting_on_faults(&vm, lazy2);
    vm.dev.process();
    assert_eq!(host.smmu.handle_queues(), 1);
    let n = q.read(&mut buf).unwrap();
    let cookie = pgfaults(&buf[..n])[0].cookie;
    let plain = vm.nested(viommu, vste_s1_ats()).unwrap();
    vm.attach(plain).unwrap();
    assert_eq!(host.smmu.fault_routes(), 0);
    vm.dev.process();
    assert_eq!(vm.dev.waiting_for_page_response(), 0);
    assert_eq!(completion(&vm), CompletionStatus::PageResponseError);
    assert_eq!(
        respond(&*q, cookie, IOMMUFD_PAGE_RESP_SUCCESS),
        Err(Errno::EINVAL)
    );
    vm.destroy(nested).unwrap();
    vm.destroy(fid).unwrap();
    assert_eq!(host.smmu.fault_sinks(), 0);
    assert_eq!(host.hw.take_stale(), []);
}

/// Starts the queued descriptors on a thread of the device; the thread returns how many
/// completed.
fn process_on_a_thread(vm: &Vm) -> std::thread::JoinHandle<usize> {
    let dev = vm.dev.clone();
    std::thread::spawn(move || dev.process())
}

/// Waits until `cond` holds, at most 60 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn a_stalled_transaction_reaches_the_fault_queue_and_its_response_resumes_it() {
    let host = host_with(Features {
        stall_model: StallModel::StallAndTerminate,
        ..Features::VSVA
    });
    let rid = rid(13);
    let stream = u32::from(rid.rid());
    host.smmu.set_stall_capable(stream, true);
    let mut vm = Vm::new(&host, rid);
    // The guest driver sets CD.S: the process's faults stall.
    vm.write_cd(ContextDescriptor {
        s: true,
        ..Vm::cd(PT_GPA, ASID)
    });
    let parent = vm
        .hwpt_alloc(IOMMU_HWPT_ALLOC_NEST_PARENT, vm.ioas, None)
        .unwrap();
    let viommu = vm.viommu(parent, IOMMU_VIOMMU_TYPE_ARM_SMMUV3).unwrap();
    vm.vdevice(viommu, VSID).unwrap();
    let (fid, fd) = fault_queue(&vm, 0).unwrap();
    let vste = IommuHwptArmSmmuv3 { ste: vste_s1() }.to_bytes();
    let nested = vm
        .hwpt_alloc_fault(IOMMU_HWPT_FAULT_ID_VALID, viommu, Some(&vste), fid)
        .unwrap();
    vm.attach(nested).unwrap();
    assert_eq!(vm.destroy(fid), errno(libc::EBUSY));
    let q = vm.fds.fault(fd).unwrap();
    let data = pattern(100, 6);
    vm.write(SRC_GPA, &data);
    vm.write(COMP_GPA, &[0; 32]);
    let lazy = 0x7f00_beef_0000;
    let d = Descriptor {
        pasid: Some(Pasid::new(SSID).unwrap()),
        privileged: false,
        block_on_fault: false,
        completion: CompletionRequest::Always(COMP_GVA),
        op: Operation::Memmove {
            src: SRC_GVA,
            dst: lazy + 8,
            size: 100,
        },
    };
    vm.dev.portal_write(0, &d.encode()).unwrap();
    let dma = process_on_a_thread(&vm);
    wait_until("the stall", || host.hw.stalled(Some(stream)) == 1);
    host.smmu.handle_queues();
    assert_eq!(host.smmu.irq_stats().stalls, 1);
    let mut buf = [0u8; 40];
    let n = q.read(&mut buf).unwrap();
    let r = pgfaults(&buf[..n])[0];
    assert_eq!((r.dev_id, r.pasid, r.addr), (vm.dev_id, SSID, lazy));
    assert_ne!(r.flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE, 0);
    assert_eq!(host.hw.stalled(None), 1);
    // The guest maps the page; SUCCESS goes down as CMD_RESUME Retry.
    let mut s1 = vm.s1.take().unwrap();
    vm.map(&mut s1, lazy, NEW_DST_GPA, 1);
    vm.s1 = Some(s1);
    assert_eq!(respond(&*q, r.cookie, IOMMUFD_PAGE_RESP_SUCCESS), Ok(8));
    assert_eq!(dma.join().unwrap(), 1);
    assert_eq!(completion(&vm), CompletionStatus::Success);
    assert_eq!(vm.read(NEW_DST_GPA + 8, 100), data);
    assert_eq!(host.hw.stalled(None), 0);

    // Another stall, read and never answered: the VMM exits (its device cdev closes,
    // then its files), and the stalled transaction is aborted (CMD_RESUME Abort).
    let d = Descriptor {
        op: Operation::Memmove {
            src: SRC_GVA,
            dst: lazy + 0x10_0000,
            size: 100,
        },
        ..d
    };
    vm.write(COMP_GPA, &[0; 32]);
    vm.dev.portal_write(0, &d.encode()).unwrap();
    let dma = process_on_a_thread(&vm);
    wait_until("the second stall", || host.hw.stalled(Some(stream)) == 1);
    host.smmu.handle_queues();
    assert_eq!(q.read(&mut buf), Ok(40));
    drop(q);
    drop(vm);
    dma.join().unwrap();
    assert_eq!(host.hw.stalled(None), 0);
    assert_eq!(host.smmu.fault_sinks(), 0);
    assert!(host.smmu.owned_streams().is_empty());
}
