//! iommufd's dirty tracking through the ioctls, against the kernel selftest's
//! `iommufd_dirty_tracking` sequences (`enforce_dirty`, `set_dirty_tracking`,
//! `get_dirty_bitmap`, `get_dirty_bitmap_no_clear`) with a DMA engine as the device:
//! `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`, `IOMMU_HWPT_SET_DIRTY_TRACKING`,
//! `IOMMU_HWPT_GET_DIRTY_BITMAP` with the bitmap in the VMM's memory at page, unaligned
//! offsets and 2 KiB granularity, and their errnos.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::driver::HostIommu;
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::iommufd::IommufdFile;
use vsva_hw::dma::regs::CTRL_ATS_EN;
use vsva_hw::dma::{CompletionRequest, Descriptor, DmaEngine, DmaEngineConfig, Operation};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory};
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

struct Rig {
    mem: Arc<HostMemory>,
    hw: Arc<Iommu>,
    unit: Arc<HostIommu>,
    ram: GuestMemoryMmap,
    vaddr: u64,
}

impl Rig {
    fn new(slads: bool) -> Rig {
        let mem = HostMemory::new(32 << 20).unwrap();
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let mut config = IommuConfig::default();
        config.caps.slads = slads;
        let hw = Iommu::new(mem.clone(), config).unwrap();
        let unit = HostIommu::new(hw.clone(), frames.clone()).unwrap();
        let hpa = frames.alloc_range(RAM, 2 << 20).unwrap();
        let ram = mem.guest_memory(&[(Gpa(0), hpa, RAM)]).unwrap();
        let vaddr = ram.get_host_address(GuestAddress(0)).unwrap() as u64;
        Rig {
            mem,
            hw,
            unit,
            ram,
            vaddr,
        }
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
    f: Arc<IommufdFile>,
    _dev: VfioDeviceFile,
    dev_id: u32,
    ioas: u32,
    hwpt: Result<u32, Errno>,
    engine: Arc<DmaEngine>,
}

fn setup(rig: &Rig, flags: u32) -> Setup {
    let fds = Iommufds::new();
    let (fd, f) = fds.open(&rig.unit);
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
    let engine = Arc::new(DmaEngine::new(DmaEngineConfig::new(SID), rig.hw.clone()).unwrap());
    rig.hw.attach_endpoint(engine.clone());
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
    engine.enable(CTRL_ATS_EN).unwrap();
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

/// `device_dirty_capability` / `enforce_dirty`: on a unit without SLADS a dirty-tracking
/// HWPT is EOPNOTSUPP; a HWPT allocated without the flag refuses SET_DIRTY_TRACKING and
/// GET_DIRTY_BITMAP with EOPNOTSUPP.
#[test]
fn enforce_dirty() {
    let caps = |s: &Setup| {
        io(&*s.f, IOMMU_GET_HW_INFO, &hw_info(40, 0, s.dev_id, 0))
            .unwrap()
            .out_capabilities
            & IOMMU_HW_CAP_DIRTY_TRACKING
    };
    let rig = Rig::new(false);
    let s = setup(&rig, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
    assert_eq!(s.hwpt.unwrap_err(), Errno::EOPNOTSUPP);
    assert_eq!(caps(&s), 0);
    let rig = Rig::new(true);
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

/// `set_dirty_tracking`: enable, disable; unknown flags EOPNOTSUPP; an IOAS or device id
/// ENOENT; the RID_PASID entry follows.
#[test]
fn set_dirty_tracking() {
    let rig = Rig::new(true);
    let s = setup(&rig, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
    let hwpt = s.hwpt.unwrap();
    let slade = || {
        rig.unit
            .pasid_entry(SID, vsva_host::driver::RID_PASID)
            .unwrap()
            .slade
    };
    s.set(hwpt, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
    assert!(slade());
    s.set(hwpt, 0).unwrap();
    assert!(!slade());
    assert_eq!(s.set(hwpt, 1 << 1).unwrap_err(), Errno::EOPNOTSUPP);
    assert_eq!(s.set(s.ioas, 1).unwrap_err(), Errno::ENOENT);
    assert_eq!(s.set(s.dev_id, 1).unwrap_err(), Errno::ENOENT);
    assert!(!slade());
}

/// `get_dirty_bitmap` and `get_dirty_bitmap_no_clear`: the device writes every even page
/// of the buffer; the bitmap in the VMM's memory (at offset 0, a 2 KiB offset and an
/// unaligned offset, at 4 KiB and 2 KiB granularity) has exactly the even pages' bits and
/// its neighbours are untouched; a second read is empty, unless NO_CLEAR.
#[test]
fn get_dirty_bitmap() {
    let rig = Rig::new(true);
    let s = setup(&rig, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
    let hwpt = s.hwpt.unwrap();
    // Tracking off: EINVAL.
    assert_eq!(
        s.get(bitmap_cmd(hwpt, 0, BUFFER, PAGE, rig.vaddr + BITMAPS))
            .unwrap_err(),
        Errno::EINVAL
    );
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
    let rig = Rig::new(true);
    let s = setup(&rig, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
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
    let rig = Rig::new(true);
    for u in [UCMD_HWPT_SET_DIRTY_TRACKING, UCMD_HWPT_GET_DIRTY_BITMAP] {
        let f = IommufdFile::open(&rig.unit);
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
