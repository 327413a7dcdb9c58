//! iommufd's dirty tracking through the ioctls, against the kernel selftest's
//! `iommufd_dirty_tracking` sequences (`enforce_dirty`, `set_dirty_tracking`,
//! `get_dirty_bitmap`, `get_dirty_bitmap_no_clear`) with a DMA engine as the device, on
//! the VT-d host (second-level D bits, SLADE) and on the SMMUv3 host (a stage-1 domain
//! whose CD has HA and HD, DBM leaves):
//! `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`, `IOMMU_HWPT_SET_DIRTY_TRACKING`,
//! `IOMMU_HWPT_GET_DIRTY_BITMAP` with the bitmap in the VMM's memory at page, unaligned
//! offsets and 2 KiB granularity, and their errnos.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::driver::HostIommu;
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::iommufd::smmu::SmmuIommufdFile;
use vsva_host::iommufd::IommufdFile;
use vsva_host::smmu::SmmuHost;
use vsva_hw::dma::regs::CTRL_ATS_EN;
use vsva_hw::dma::{CompletionRequest, Descriptor, DmaEngine, DmaEngineConfig, DmaPort, Operation};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::smmuv3::{Smmu, SmmuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory};
use vsva_mem::PhysMem;
use vsva_smmuv3::{cd::ContextDescriptor, features::Httu, ste::Config, ste::Ste};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{error::Errno, file::UapiFile};
use vsva_vtd::{addr::Gpa, addr::SourceId};

const PAGE: u64 = 4096;
const SID: SourceId = SourceId::from_rid(0x20);
/// VM memory: the first half mapped for the device, the second half holds bitmaps.
const RAM: u64 = 2 << 20;
const BUFFER: u64 = 1 << 20;
const BITMAPS: u64 = 1 << 20;

/// The host IOMMU under the file.
enum Unit {
    Vtd {
        hw: Arc<Iommu>,
        unit: Arc<HostIommu>,
    },
    Smmu {
        hw: Arc<Smmu>,
        host: Arc<SmmuHost>,
    },
}

struct Rig {
    mem: Arc<HostMemory>,
    unit: Unit,
    ram: GuestMemoryMmap,
    vaddr: u64,
}

impl Rig {
    /// A VT-d host, whose unit has ECAP.SLADS as `slads` says.
    fn new(slads: bool) -> Rig {
        let mem = HostMemory::new(32 << 20).unwrap();
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let mut config = IommuConfig::default();
        config.caps.slads = slads;
        let hw = Iommu::new(mem.clone(), config).unwrap();
        let unit = HostIommu::new(hw.clone(), frames.clone()).unwrap();
        Rig::with(mem, frames, Unit::Vtd { hw, unit })
    }

    /// An SMMUv3 host (strict mode) whose IDR0.HTTU is `httu`.
    fn smmu(httu: Httu) -> Rig {
        let mem = HostMemory::new(32 << 20).unwrap();
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let mut config = SmmuConfig {
            strict: true,
            ..SmmuConfig::default()
        };
        config.features.httu = httu;
        let hw = Arc::new(Smmu::new(mem.clone(), config));
        let host = SmmuHost::new(hw.clone(), frames.clone()).unwrap();
        Rig::with(mem, frames, Unit::Smmu { hw, host })
    }

    /// A VT-d host and an SMMUv3 host, both able to track dirty pages.
    fn both() -> [Rig; 2] {
        [Rig::new(true), Rig::smmu(Httu::AccessDirty)]
    }

    fn with(mem: Arc<HostMemory>, frames: Arc<FrameAllocator>, unit: Unit) -> Rig {
        let hpa = frames.alloc_range(RAM, 2 << 20).unwrap();
        let ram = mem.guest_memory(&[(Gpa(0), hpa, RAM)]).unwrap();
        let vaddr = ram.get_host_address(GuestAddress(0)).unwrap() as u64;
        Rig {
            mem,
            unit,
            ram,
            vaddr,
        }
    }

    fn is_smmu(&self) -> bool {
        matches!(self.unit, Unit::Smmu { .. })
    }

    /// `/dev/iommu` on the unit, in `fds`.
    fn open(&self, fds: &Arc<Iommufds>) -> (i32, Arc<dyn UapiFile>) {
        match &self.unit {
            Unit::Vtd { unit, .. } => {
                let (fd, f) = fds.open(unit);
                (fd, f)
            }
            Unit::Smmu { host, .. } => {
                let (fd, f) = fds.open_smmu(host);
                (fd, f)
            }
        }
    }

    /// `/dev/iommu` outside any fd table.
    fn open_alone(&self) -> Arc<dyn UapiFile> {
        match &self.unit {
            Unit::Vtd { unit, .. } => IommufdFile::open(unit),
            Unit::Smmu { host, .. } => SmmuIommufdFile::open(host),
        }
    }

    /// A DMA engine with `SID` on the unit's bus.
    fn plug(&self) -> Arc<DmaEngine> {
        let port: Arc<dyn DmaPort> = match &self.unit {
            Unit::Vtd { hw, .. } => hw.clone(),
            Unit::Smmu { hw, .. } => hw.clone(),
        };
        let engine = Arc::new(DmaEngine::new(DmaEngineConfig::new(SID), port).unwrap());
        match &self.unit {
            Unit::Vtd { hw, .. } => hw.attach_endpoint(engine.clone()),
            Unit::Smmu { hw, .. } => hw.attach_endpoint(u32::from(SID.rid()), engine.clone()),
        }
        engine
    }

    /// The SMMU stream's STE and the CD of its CD table (an SMMU rig only).
    fn smmu_ste_cd(&self) -> (Ste, ContextDescriptor) {
        let Unit::Smmu { host, .. } = &self.unit else {
            panic!("not an SMMU rig");
        };
        let f = host.features();
        let ste = Ste::decode(&host.ste(u32::from(SID.rid())).unwrap(), f).unwrap();
        let mut words = [0u64; 8];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self
                .mem
                .read_u64(ste.s1_context_ptr + 8 * i as u64)
                .unwrap();
        }
        (ste, ContextDescriptor::decode(&words, f).unwrap())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.mem.release_guest_memory(&self.ram);
    }
}

fn io<T: Wire>(f: &dyn UapiFile, cmd: u32, v: &T) -> Result<T, Errno> {
    let mut b = v.to_bytes();
    f.ioctl(cmd, &mut b)?;
    Ok(read_prefix(&b, b.len()))
}

/// A file with an IOAS mapping `[0, BUFFER)` of the VMM's memory at IOVA 0, the device
/// bound, and a paging HWPT allocated with `flags`, the device attached to it if it was.
struct Setup {
    f: Arc<dyn UapiFile>,
    _dev: VfioDeviceFile,
    dev_id: u32,
    ioas: u32,
    hwpt: Result<u32, Errno>,
    engine: Arc<DmaEngine>,
}

fn setup(rig: &Rig, flags: u32) -> Setup {
    setup_with(rig, flags, CTRL_ATS_EN)
}

/// As [`setup`], the device enabled with `ctrl`.
fn setup_with(rig: &Rig, flags: u32, ctrl: u64) -> Setup {
    let fds = Iommufds::new();
    let (fd, f) = rig.open(&fds);
    let dev = VfioDeviceFile::open(SID, fds.clone());
    let dev_id = io(
        &dev,
        VFIO_DEVICE_BIND_IOMMUFD,
        &VfioDeviceBindIommufd {
            argsz: 24,
            iommufd: fd,
            ..Default::default()
        },
    )
    .unwrap()
    .out_devid;
    let ioas = io(
        &*f,
        IOMMU_IOAS_ALLOC,
        &IommuIoasAlloc {
            size: 12,
            ..Default::default()
        },
    )
    .unwrap()
    .out_ioas_id;
    // 1 MiB: the second level maps it with 4 KiB pages.
    io(
        &*f,
        IOMMU_IOAS_MAP,
        &IommuIoasMap {
            size: 40,
            flags: IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_FIXED_IOVA,
            ioas_id: ioas,
            user_va: rig.vaddr,
            length: BUFFER,
            iova: 0,
            ..Default::default()
        },
    )
    .unwrap();
    // The device is on the bus before it is attached: the driver reads its ATS then.
    let engine = rig.plug();
    let hwpt = io(
        &*f,
        IOMMU_HWPT_ALLOC,
        &IommuHwptAlloc {
            size: 48,
            flags,
            dev_id,
            pt_id: ioas,
            ..Default::default()
        },
    )
    .map(|c| c.out_hwpt_id);
    if let Ok(id) = hwpt {
        io(
            &dev,
            VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            &VfioDeviceAttachIommufdPt {
                argsz: 16,
                pt_id: id,
                ..Default::default()
            },
        )
        .unwrap();
    }
    engine.enable(ctrl).unwrap();
    Setup {
        f,
        _dev: dev,
        dev_id,
        ioas,
        hwpt,
        engine,
    }
}

impl Setup {
    fn set(&self, hwpt: u32, flags: u32) -> Result<(), Errno> {
        io(
            &*self.f,
            IOMMU_HWPT_SET_DIRTY_TRACKING,
            &IommuHwptSetDirtyTracking {
                size: 16,
                flags,
                hwpt_id: hwpt,
                __reserved: 0,
            },
        )
        .map(|_| ())
    }

    fn get(&self, cmd: IommuHwptGetDirtyBitmap) -> Result<(), Errno> {
        io(&*self.f, IOMMU_HWPT_GET_DIRTY_BITMAP, &cmd).map(|_| ())
    }

    /// The device fills 8 bytes at the start of each page of `pages`.
    fn write(&self, pages: impl Iterator<Item = u64>) {
        for p in pages {
            let desc = Descriptor {
                pasid: None,
                privileged: false,
                block_on_fault: false,
                completion: CompletionRequest::None,
                op: Operation::Fill {
                    pattern: p,
                    dst: p * PAGE,
                    size: 8,
                },
            };
            self.engine.portal_write(0, &desc.encode()).unwrap();
            self.engine.process();
        }
    }
}

fn bitmap_cmd(
    hwpt: u32,
    flags: u32,
    length: u64,
    page_size: u64,
    data: u64,
) -> IommuHwptGetDirtyBitmap {
    IommuHwptGetDirtyBitmap {
        size: 48,
        hwpt_id: hwpt,
        flags,
        __reserved: 0,
        iova: 0,
        length,
        page_size,
        data,
    }
}

/// `device_dirty_capability` / `enforce_dirty`: on a unit without SLADS, or an SMMU
/// whose IDR0.HTTU lacks D updates (none, or A only), a dirty-tracking HWPT is EOPNOTSUPP
/// and GET_HW_INFO reports no capability; a HWPT allocated without the flag refuses
/// SET_DIRTY_TRACKING and GET_DIRTY_BITMAP with EOPNOTSUPP.
#[test]
fn enforce_dirty() {
    let caps = |s: &Setup| {
        io(&*s.f, IOMMU_GET_HW_INFO, &hw_info(40, 0, s.dev_id, 0))
            .unwrap()
            .out_capabilities
            & IOMMU_HW_CAP_DIRTY_TRACKING
    };
    for rig in [
        Rig::new(false),
        Rig::smmu(Httu::None),
        Rig::smmu(Httu::Access),
    ] {
        let s = setup(&rig, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
        assert_eq!(s.hwpt.unwrap_err(), Errno::EOPNOTSUPP);
        assert_eq!(caps(&s), 0);
    }
    for rig in Rig::both() {
        let s = setup(&rig, 0);
        assert_eq!(caps(&s), IOMMU_HW_CAP_DIRTY_TRACKING);
        let hwpt = s.hwpt.unwrap();
        assert_eq!(
            s.set(hwpt, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap_err(),
            Errno::EOPNOTSUPP
        );
        assert_eq!(
            s.get(bitmap_cmd(hwpt, 0, BUFFER, PAGE, rig.vaddr + BITMAPS))
                .unwrap_err(),
            Errno::EOPNOTSUPP
        );
    }
}

/// The flag combinations of `arm_smmu_domain_alloc_paging_flags` on the SMMU: DIRTY_TRACKING
/// with NEST_PARENT is EOPNOTSUPP (a nest parent is a stage 2, dirty tracking is stage
/// 1's), while VT-d takes it; DIRTY_TRACKING alone gives a stage-1 STE whose CD has HA
/// and HD, and a paging HWPT without it stays a stage 2.
#[test]
fn dirty_tracking_flags_smmu() {
    let both = IOMMU_HWPT_ALLOC_DIRTY_TRACKING | IOMMU_HWPT_ALLOC_NEST_PARENT;
    let rig = Rig::smmu(Httu::AccessDirty);
    assert_eq!(setup(&rig, both).hwpt.unwrap_err(), Errno::EOPNOTSUPP);
    let rig = Rig::new(true);
    setup(&rig, both).hwpt.unwrap();
    let rig = Rig::smmu(Httu::AccessDirty);
    let s = setup(&rig, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
    s.hwpt.unwrap();
    let (ste, cd) = rig.smmu_ste_cd();
    assert_eq!(ste.config, Config::S1Trans);
    assert!(cd.ha && cd.hd, "{cd:?}");
    drop(s);
    let s = setup(&rig, 0);
    s.hwpt.unwrap();
    let Unit::Smmu { host, .. } = &rig.unit else {
        unreachable!()
    };
    let words = host.ste(u32::from(SID.rid())).unwrap();
    let ste = Ste::decode(&words, host.features()).unwrap();
    assert_eq!(ste.config, Config::S2Trans);
}

/// `set_dirty_tracking`: enable, disable; unknown flags EOPNOTSUPP; an IOAS or device id
/// ENOENT. On VT-d the RID_PASID entry's SLADE follows; on the SMMU the CD keeps HA and HD
/// (the hardware always tracks, as in Linux) and enabling makes the pages written before
/// clean, so they are not reported.
#[test]
fn set_dirty_tracking() {
    for rig in Rig::both() {
        let s = setup(&rig, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
        let hwpt = s.hwpt.unwrap();
        let tracking = || match &rig.unit {
            Unit::Vtd { unit, .. } => {
                unit.pasid_entry(SID, vsva_host::driver::RID_PASID)
                    .unwrap()
                    .slade
            }
            Unit::Smmu { .. } => {
                let cd = rig.smmu_ste_cd().1;
                cd.ha && cd.hd
            }
        };
        s.write([1u64, 2].into_iter());
        s.set(hwpt, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
        assert!(tracking());
        let data = rig.vaddr + BITMAPS;
        rig.ram
            .write_slice(&[0u8; 8], GuestAddress(BITMAPS))
            .unwrap();
        s.get(bitmap_cmd(hwpt, 0, BUFFER, PAGE, data)).unwrap();
        let mut b = [0u8; 8];
        rig.ram.read_slice(&mut b, GuestAddress(BITMAPS)).unwrap();
        assert_eq!(b, [0; 8], "written before tracking was on");
        s.set(hwpt, 0).unwrap();
        assert_eq!(tracking(), rig.is_smmu());
        assert_eq!(s.set(hwpt, 1 << 1).unwrap_err(), Errno::EOPNOTSUPP);
        assert_eq!(s.set(s.ioas, 1).unwrap_err(), Errno::ENOENT);
        assert_eq!(s.set(s.dev_id, 1).unwrap_err(), Errno::ENOENT);
        assert_eq!(tracking(), rig.is_smmu());
    }
}

/// `get_dirty_bitmap` and `get_dirty_bitmap_no_clear`: the device writes every even page
/// of the buffer; the bitmap in the VMM's memory (at offset 0, a 2 KiB offset and an
/// unaligned offset, at 4 KiB and 2 KiB granularity) has exactly the even pages' bits and
/// its neighbours are untouched; a second read is empty, unless NO_CLEAR.
#[test]
fn get_dirty_bitmap() {
    for rig in Rig::both() {
        get_dirty_bitmap_on(&rig);
    }
}

fn get_dirty_bitmap_on(rig: &Rig) {
    let s = setup(rig, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
    let hwpt = s.hwpt.unwrap();
    // Tracking off: EINVAL on VT-d; the SMMU has no off state (Linux reads it anyway).
    let off = s.get(bitmap_cmd(hwpt, 0, BUFFER, PAGE, rig.vaddr + BITMAPS));
    if rig.is_smmu() {
        off.unwrap();
    } else {
        assert_eq!(off.unwrap_err(), Errno::EINVAL);
    }
    s.set(hwpt, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
    let pages = BUFFER / PAGE;
    for page_size in [PAGE, PAGE / 2] {
        for offset in [0u64, 2048, 0xff1] {
            for flags in [0, IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR] {
                s.write((0..pages).step_by(2));
                let bits = (BUFFER / page_size) as usize;
                let len = bits.div_ceil(64) * 8;
                let at = BITMAPS + offset;
                rig.ram
                    .write_slice(&vec![0xa5u8; len + 64], GuestAddress(at - 32))
                    .unwrap();
                rig.ram
                    .write_slice(&vec![0u8; len], GuestAddress(at))
                    .unwrap();
                let data = rig.vaddr + at;
                s.get(bitmap_cmd(hwpt, flags, BUFFER, page_size, data))
                    .unwrap();
                let mut got = vec![0u8; len + 64];
                rig.ram.read_slice(&mut got, GuestAddress(at - 32)).unwrap();
                assert!(got[..32].iter().all(|&b| b == 0xa5));
                assert!(got[32 + len..].iter().all(|&b| b == 0xa5));
                let per_page = (PAGE / page_size) as usize;
                for bit in 0..bits {
                    let set = got[32 + bit / 8] & (1 << (bit % 8)) != 0;
                    assert_eq!(
                        set,
                        (bit / per_page) % 2 == 0,
                        "bit {bit} {page_size} {offset}"
                    );
                }
                rig.ram
                    .write_slice(&vec![0u8; len], GuestAddress(at))
                    .unwrap();
                s.get(bitmap_cmd(hwpt, flags, BUFFER, page_size, data))
                    .unwrap();
                rig.ram
                    .read_slice(&mut got[..len], GuestAddress(at))
                    .unwrap();
                let set: u32 = got[..len].iter().map(|b| b.count_ones()).sum();
                if flags == 0 {
                    assert_eq!(set, 0, "read already");
                } else {
                    assert_eq!(set as u64, pages / 2 * per_page as u64, "NO_CLEAR");
                    s.get(bitmap_cmd(hwpt, 0, BUFFER, page_size, data)).unwrap();
                }
            }
        }
    }
}

/// The argument checks: unknown flags or reserved EOPNOTSUPP, an id that is not a paging
/// HWPT ENOENT, a wrapping range EOVERFLOW, unaligned ranges and page sizes EINVAL, a
/// bitmap outside the VMM's memory EFAULT; none of them clears a dirty bit.
#[test]
fn get_dirty_bitmap_refusals_clear_nothing() {
    for rig in Rig::both() {
        refusals_clear_nothing_on(&rig);
    }
}

fn refusals_clear_nothing_on(rig: &Rig) {
    let s = setup(rig, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
    let hwpt = s.hwpt.unwrap();
    s.set(hwpt, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
    s.write([3u64].into_iter());
    let data = rig.vaddr + BITMAPS;
    let ok = bitmap_cmd(hwpt, 0, BUFFER, PAGE, data);
    let cases = [
        (
            IommuHwptGetDirtyBitmap {
                flags: 1 << 1,
                ..ok
            },
            Errno::EOPNOTSUPP,
        ),
        (
            IommuHwptGetDirtyBitmap {
                __reserved: 1,
                ..ok
            },
            Errno::EOPNOTSUPP,
        ),
        (
            IommuHwptGetDirtyBitmap {
                hwpt_id: s.ioas,
                ..ok
            },
            Errno::ENOENT,
        ),
        (
            IommuHwptGetDirtyBitmap { hwpt_id: 999, ..ok },
            Errno::ENOENT,
        ),
        (
            IommuHwptGetDirtyBitmap {
                iova: u64::MAX - PAGE + 1,
                length: 2 * PAGE,
                ..ok
            },
            Errno::EOVERFLOW,
        ),
        (IommuHwptGetDirtyBitmap { iova: 0x800, ..ok }, Errno::EINVAL),
        (
            IommuHwptGetDirtyBitmap { page_size: 0, ..ok },
            Errno::EINVAL,
        ),
        (
            IommuHwptGetDirtyBitmap {
                page_size: 3 * PAGE,
                ..ok
            },
            Errno::EINVAL,
        ),
        (IommuHwptGetDirtyBitmap { length: 0, ..ok }, Errno::EINVAL),
        (IommuHwptGetDirtyBitmap { data: 0x10, ..ok }, Errno::EFAULT),
        (
            IommuHwptGetDirtyBitmap {
                data: rig.vaddr + RAM - 8,
                ..ok
            },
            Errno::EFAULT,
        ),
    ];
    for (cmd, errno) in cases {
        assert_eq!(s.get(cmd).unwrap_err(), errno, "{cmd:?}");
    }
    s.get(ok).unwrap();
    let mut b = [0u8; 1];
    rig.ram.read_slice(&mut b, GuestAddress(BITMAPS)).unwrap();
    assert_eq!(b[0], 1 << 3, "the page written is still reported");
}

/// `iommufd/cmd_length` for the two dirty ioctls.
#[test]
fn cmd_length() {
    for (rig, u) in Rig::both().into_iter().flat_map(|r| {
        let r = Arc::new(r);
        [UCMD_HWPT_SET_DIRTY_TRACKING, UCMD_HWPT_GET_DIRTY_BITMAP].map(|u| (r.clone(), u))
    }) {
        let f = rig.open_alone();
        let call = |size: usize, tail: u8| {
            let mut b = vec![0u8; u.size + 1];
            b[..4].copy_from_slice(&(size as u32).to_le_bytes());
            b[u.size] = tail;
            f.ioctl(u.cmd, &mut b)
        };
        assert_eq!(
            call(u.min_size - 1, 0).unwrap_err(),
            Errno::EINVAL,
            "{}",
            u.name
        );
        assert_eq!(call(u.size + 1, 1).unwrap_err(), Errno::E2BIG, "{}", u.name);
        assert_eq!(call(u.size + 1, 0), call(u.size, 0), "{}", u.name);
    }
}

/// A write after a harvest is reported in the next harvest, every round, with the device
/// translating through the IOMMU's TLB and through its own ATC (ATS): clearing the dirty
/// state must drop the cached translations that let writes through without marking the
/// page (the SMMU's writable-dirty TLB entries, the ATC's writable entries). NO_CLEAR
/// reads leave the page dirty and reported.
#[test]
fn write_after_harvest_is_reported() {
    for rig in Rig::both() {
        for ctrl in [0, CTRL_ATS_EN] {
            let s = setup_with(&rig, IOMMU_HWPT_ALLOC_DIRTY_TRACKING, ctrl);
            let hwpt = s.hwpt.unwrap();
            s.set(hwpt, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
            let read = |flags| {
                rig.ram
                    .write_slice(&[0u8; 8], GuestAddress(BITMAPS))
                    .unwrap();
                s.get(bitmap_cmd(
                    hwpt,
                    flags,
                    64 * PAGE,
                    PAGE,
                    rig.vaddr + BITMAPS,
                ))
                .unwrap();
                let mut b = [0u8; 8];
                rig.ram.read_slice(&mut b, GuestAddress(BITMAPS)).unwrap();
                u64::from_le_bytes(b)
            };
            for round in 0..4u64 {
                s.write([5u64, 9 + round].into_iter());
                let want = 1 << 5 | 1 << (9 + round);
                assert_eq!(read(IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR), want, "{round}");
                assert_eq!(read(0), want, "round {round}, ctrl {ctrl:#x}");
                assert_eq!(read(0), 0, "round {round}: cleared");
            }
        }
    }
}
