//! The iommufd uAPI of the host against the kernel selftest's sequences
//! (`tools/testing/selftests/iommu/iommufd.c`) that need no mock driver, on the real host
//! VT-d driver and the physical IOMMU model, with a DMA engine as the device: argument size
//! rules (`iommufd/cmd_length`, `cmd_fail`), IOAS map/unmap/copy/IOVA ranges/allowed IOVAs
//! (`iommufd_ioas`), paging HWPTs with device attach, replace and EBUSY destroy
//! (`iommufd_mock_domain/alloc_hwpt`, `replace`), and isolation between two files.

use std::sync::Arc;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::driver::HostIommu;
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::iommufd::{IommufdFile, ObjectState};
use vsva_hw::dma::regs::{
    CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRIV_EN, REG_SWERR0, SWERR_OVERFLOW, SWERR_VALID,
};
use vsva_hw::dma::{CompletionRequest, Descriptor, DmaEngine, DmaEngineConfig, Operation};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{FrameAllocator, HostMemory};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{Errno, UapiFile};
use vsva_vtd::{Gpa, SourceId};

const PAGE: u64 = 4096;
const SID: SourceId = SourceId::from_rid(0x18);
const RAM: u64 = 1 << 20;
/// Where the scratch arrays the tests pass by pointer live in guest RAM.
const SCRATCH: u64 = RAM - 4 * PAGE;

struct Host {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hw: Arc<Iommu>,
    unit: Arc<HostIommu>,
}

impl Host {
    fn new() -> Host {
        let mem = HostMemory::new(16 << 20).unwrap();
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let hw = Iommu::new(mem.clone(), IommuConfig::default()).unwrap();
        let unit = HostIommu::new(hw.clone(), frames.clone()).unwrap();
        Host {
            mem,
            frames,
            hw,
            unit,
        }
    }

    fn ram(&self) -> Ram {
        let hpa = self.frames.alloc_range(RAM, 2 << 20).unwrap();
        let mem = self.mem.guest_memory(&[(Gpa(0), hpa, RAM)]).unwrap();
        let vaddr = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        Ram {
            host: self.mem.clone(),
            mem,
            hpa: hpa.0,
            vaddr,
        }
    }

    fn engine(&self, sid: SourceId) -> Arc<DmaEngine> {
        let engine = Arc::new(DmaEngine::new(DmaEngineConfig::new(sid), self.hw.clone()).unwrap());
        self.hw.attach_endpoint(engine.clone());
        engine
            .enable(CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRIV_EN)
            .unwrap();
        engine
    }
}

/// The VMM's memory: host memory at `hpa`, mapped at `vaddr` in this process.
struct Ram {
    host: Arc<HostMemory>,
    mem: GuestMemoryMmap,
    hpa: u64,
    vaddr: u64,
}

impl Drop for Ram {
    fn drop(&mut self) {
        self.host.release_guest_memory(&self.mem);
    }
}

impl Ram {
    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(off)).unwrap();
        b
    }
}

/// Fills `size` bytes at `dst` with `pattern` by DMA without PASID.
fn dma_fill(engine: &DmaEngine, dst: u64, size: u32, pattern: u64) {
    let desc = Descriptor {
        pasid: None,
        privileged: false,
        block_on_fault: false,
        completion: CompletionRequest::None,
        op: Operation::Fill { pattern, dst, size },
    };
    engine.portal_write(0, &desc.encode()).unwrap();
    engine.process();
    engine
        .mmio_write(REG_SWERR0, SWERR_VALID | SWERR_OVERFLOW)
        .unwrap();
}

/// `ioctl` with a structure in and out.
fn io<T: Wire>(f: &dyn UapiFile, cmd: u32, v: &T) -> Result<T, Errno> {
    let mut b = v.to_bytes();
    f.ioctl(cmd, &mut b)?;
    Ok(read_prefix(&b, b.len()))
}

fn ioas_alloc(f: &dyn UapiFile) -> Result<u32, Errno> {
    let c = IommuIoasAlloc {
        size: 12,
        ..Default::default()
    };
    Ok(io(f, IOMMU_IOAS_ALLOC, &c)?.out_ioas_id)
}

fn map(
    f: &dyn UapiFile,
    ioas: u32,
    flags: u32,
    user_va: u64,
    length: u64,
    iova: u64,
) -> Result<u64, Errno> {
    let c = IommuIoasMap {
        size: 40,
        flags,
        ioas_id: ioas,
        user_va,
        length,
        iova,
        ..Default::default()
    };
    Ok(io(f, IOMMU_IOAS_MAP, &c)?.iova)
}

const RW: u32 = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
const FIXED_RW: u32 = RW | IOMMU_IOAS_MAP_FIXED_IOVA;

fn unmap(f: &dyn UapiFile, ioas: u32, iova: u64, length: u64) -> Result<u64, Errno> {
    let c = IommuIoasUnmap {
        size: 24,
        ioas_id: ioas,
        iova,
        length,
    };
    Ok(io(f, IOMMU_IOAS_UNMAP, &c)?.length)
}

fn destroy(f: &dyn UapiFile, id: u32) -> Result<(), Errno> {
    io(f, IOMMU_DESTROY, &IommuDestroy { size: 8, id }).map(|_| ())
}

fn hwpt_alloc(f: &dyn UapiFile, dev_id: u32, pt_id: u32, flags: u32) -> Result<u32, Errno> {
    let c = IommuHwptAlloc {
        size: 48,
        flags,
        dev_id,
        pt_id,
        ..Default::default()
    };
    Ok(io(f, IOMMU_HWPT_ALLOC, &c)?.out_hwpt_id)
}

fn bind(dev: &VfioDeviceFile, fd: i32) -> Result<u32, Errno> {
    let c = VfioDeviceBindIommufd {
        argsz: 24,
        iommufd: fd,
        ..Default::default()
    };
    Ok(io(dev, VFIO_DEVICE_BIND_IOMMUFD, &c)?.out_devid)
}

fn attach(dev: &VfioDeviceFile, pt_id: u32) -> Result<u32, Errno> {
    let c = VfioDeviceAttachIommufdPt {
        argsz: 16,
        pt_id,
        ..Default::default()
    };
    Ok(io(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &c)?.pt_id)
}

fn detach(dev: &VfioDeviceFile) -> Result<(), Errno> {
    let c = VfioDeviceDetachIommufdPt {
        argsz: 12,
        ..Default::default()
    };
    io(dev, VFIO_DEVICE_DETACH_IOMMUFD_PT, &c).map(|_| ())
}

fn iova_ranges(
    f: &dyn UapiFile,
    ram: &Ram,
    ioas: u32,
    num: u32,
) -> (Result<(), Errno>, u32, Vec<(u64, u64)>) {
    let c = IommuIoasIovaRanges {
        size: 32,
        ioas_id: ioas,
        num_iovas: num,
        allowed_iovas: ram.vaddr + SCRATCH,
        ..Default::default()
    };
    let mut b = c.to_bytes();
    let r = f.ioctl(IOMMU_IOAS_IOVA_RANGES, &mut b).map(|_| ());
    let out: IommuIoasIovaRanges = read_prefix(&b, b.len());
    if r.is_ok() {
        assert_eq!(out.out_iova_alignment, PAGE);
    }
    let n = out.num_iovas.min(num) as usize;
    let bytes = ram.read(SCRATCH, n * 16);
    let ranges = bytes
        .chunks_exact(16)
        .map(|c| {
            let r: IommuIovaRange = read_prefix(c, 16);
            (r.start, r.last)
        })
        .collect();
    (r, out.num_iovas, ranges)
}

fn allow(f: &dyn UapiFile, ram: &Ram, ioas: u32, ranges: &[(u64, u64)]) -> Result<(), Errno> {
    let mut bytes = Vec::new();
    for &(start, last) in ranges {
        bytes.extend(IommuIovaRange { start, last }.to_bytes());
    }
    ram.mem.write_slice(&bytes, GuestAddress(SCRATCH)).unwrap();
    let c = IommuIoasAllowIovas {
        size: 24,
        ioas_id: ioas,
        num_iovas: ranges.len() as u32,
        allowed_iovas: ram.vaddr + SCRATCH,
        ..Default::default()
    };
    io(f, IOMMU_IOAS_ALLOW_IOVAS, &c).map(|_| ())
}

/// Asserts that a failing call fails with `errno` and changes no object of `file`.
fn refused<T: std::fmt::Debug>(
    file: &IommufdFile,
    errno: Errno,
    call: impl FnOnce() -> Result<T, Errno>,
) {
    let before = file.lock().objects();
    assert_eq!(call().unwrap_err(), errno);
    assert_eq!(
        file.lock().objects(),
        before,
        "a failed call changed the objects"
    );
}

#[test]
fn cmd_fail() {
    let host = Host::new();
    let f = IommufdFile::open(&host.unit);
    assert_eq!(destroy(&*f, 0).unwrap_err(), Errno::ENOENT);
    assert_eq!(f.ioctl(0x3b7f, &mut [0; 8]).unwrap_err(), Errno::ENOTTY);
    assert_eq!(f.ioctl(IOMMU_DESTROY, &mut []).unwrap_err(), Errno::EFAULT);
    assert_eq!(f.read(&mut [0; 8]).unwrap_err(), Errno::EINVAL);
}

/// `iommufd/cmd_length`: one byte below the minimum size EINVAL; one byte past the known
/// size non-zero E2BIG; zero: the same result as the exact size.
#[test]
fn cmd_length() {
    let host = Host::new();
    for u in [
        UCMD_DESTROY,
        UCMD_IOAS_ALLOC,
        UCMD_IOAS_ALLOW_IOVAS,
        UCMD_IOAS_COPY,
        UCMD_IOAS_IOVA_RANGES,
        UCMD_IOAS_MAP,
        UCMD_IOAS_UNMAP,
        UCMD_HWPT_ALLOC,
    ] {
        let f = IommufdFile::open(&host.unit);
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
        let exact = call(u.size, 0);
        let g = IommufdFile::open(&host.unit);
        let mut b = vec![0u8; u.size + 1];
        b[..4].copy_from_slice(&(u.size as u32 + 1).to_le_bytes());
        assert_eq!(g.ioctl(u.cmd, &mut b), exact, "{}", u.name);
    }
}

/// `iommufd_ioas`: map (fixed and allocated IOVA), the unmap rules, flags and overflow.
#[test]
fn ioas_map_unmap() {
    let host = Host::new();
    let ram = host.ram();
    let f = IommufdFile::open(&host.unit);
    let ioas = ioas_alloc(&*f).unwrap();
    let va = ram.vaddr;
    assert_eq!(
        map(&*f, ioas, FIXED_RW, va, 4 * PAGE, 0x10000).unwrap(),
        0x10000
    );
    refused(&f, Errno::EEXIST, || {
        map(&*f, ioas, FIXED_RW, va, PAGE, 0x12000)
    });
    refused(&f, Errno::EOPNOTSUPP, || {
        map(&*f, ioas, RW | 1 << 3, va, PAGE, 0)
    });
    refused(&f, Errno::EINVAL, || {
        map(&*f, ioas, IOMMU_IOAS_MAP_FIXED_IOVA, va, PAGE, 0)
    });
    refused(&f, Errno::EOVERFLOW, || map(&*f, ioas, RW, va, u64::MAX, 0));
    refused(&f, Errno::EINVAL, || {
        map(&*f, ioas, FIXED_RW, va, PAGE, 0x20001)
    });
    refused(&f, Errno::EFAULT, || {
        map(&*f, ioas, FIXED_RW, 0x1000, PAGE, 0x20000)
    });
    refused(&f, Errno::EFAULT, || {
        map(&*f, ioas, FIXED_RW, va, RAM + PAGE, 0x20000)
    });
    refused(&f, Errno::ENOENT, || {
        map(&*f, ioas + 7, FIXED_RW, va, PAGE, 0x20000)
    });
    let mut reserved = IommuIoasMap {
        size: 40,
        flags: RW,
        ioas_id: ioas,
        user_va: va,
        length: PAGE,
        ..Default::default()
    };
    reserved.__reserved = 1;
    refused(&f, Errno::EOPNOTSUPP, || io(&*f, IOMMU_IOAS_MAP, &reserved));

    // Without FIXED_IOVA the kernel picks a free IOVA aligned like the user address.
    let auto = map(&*f, ioas, RW, va + 0x20000, 2 * PAGE, 0).unwrap();
    assert_eq!(auto % (2 * PAGE), 0);
    assert!(auto + 2 * PAGE <= 0x10000 || auto >= 0x14000, "{auto:#x}");

    refused(&f, Errno::ENOENT, || unmap(&*f, ioas, 0x11000, PAGE));
    refused(&f, Errno::ENOENT, || unmap(&*f, ioas, 0x40_0000, PAGE));
    refused(&f, Errno::EINVAL, || unmap(&*f, ioas, 0x10000, 0));
    refused(&f, Errno::EOVERFLOW, || unmap(&*f, ioas, u64::MAX, PAGE));
    assert_eq!(unmap(&*f, ioas, 0x10000, 4 * PAGE).unwrap(), 4 * PAGE);
    assert_eq!(unmap(&*f, ioas, 0, u64::MAX).unwrap(), 2 * PAGE);
    assert_eq!(
        unmap(&*f, ioas, 0, u64::MAX).unwrap(),
        0,
        "unmap all of nothing"
    );
    assert_eq!(f.lock().objects()[&ioas], ObjectState::Ioas(vec![]));
    destroy(&*f, ioas).unwrap();
    assert_eq!(destroy(&*f, ioas).unwrap_err(), Errno::ENOENT);
}

/// `iommufd_ioas/iova_ranges` and `allow_iovas`: EMSGSIZE with the count needed, the
/// aperture of a HWPT narrows the ranges, allowed ranges steer the allocator and may not
/// cover a reserved range.
#[test]
fn ioas_iova_ranges_and_allow_iovas() {
    let host = Host::new();
    let ram = host.ram();
    let f = IommufdFile::open(&host.unit);
    let ioas = ioas_alloc(&*f).unwrap();
    let (r, num, _) = iova_ranges(&*f, &ram, ioas, 0);
    assert_eq!((r.unwrap_err(), num), (Errno::EMSGSIZE, 1));
    let (r, num, ranges) = iova_ranges(&*f, &ram, ioas, 4);
    r.unwrap();
    assert_eq!((num, ranges), (1, vec![(0, u64::MAX)]));

    refused(&f, Errno::EINVAL, || {
        allow(&*f, &ram, ioas, &[(0x2000, 0x1000)])
    });
    refused(&f, Errno::EINVAL, || {
        allow(&*f, &ram, ioas, &[(0, 0x1fff), (0x1000, 0x4fff)])
    });
    allow(&*f, &ram, ioas, &[(0x40_0000, 0x7f_ffff)]).unwrap();
    let iova = map(&*f, ioas, RW, ram.vaddr, 4 * PAGE, 0).unwrap();
    assert!((0x40_0000..0x80_0000).contains(&iova), "{iova:#x}");

    // A device's HWPT reserves what lies beyond its address width.
    let fds = Iommufds::new();
    let (fd, f2) = fds.open(&host.unit);
    let dev = VfioDeviceFile::open(SID, fds.clone());
    let dev_id = bind(&dev, fd).unwrap();
    let ioas2 = ioas_alloc(&*f2).unwrap();
    let hwpt = hwpt_alloc(&*f2, dev_id, ioas2, 0).unwrap();
    let (r, _, ranges) = iova_ranges(&*f2, &ram, ioas2, 4);
    r.unwrap();
    assert_eq!(ranges.len(), 1);
    let (start, last) = ranges[0];
    assert_eq!(start, 0);
    assert!(last < u64::MAX && (last + 1).is_power_of_two(), "{last:#x}");
    refused(&f2, Errno::EADDRINUSE, || {
        allow(&*f2, &ram, ioas2, &[(0, last + 1)])
    });
    refused(&f2, Errno::EINVAL, || {
        map(&*f2, ioas2, FIXED_RW, ram.vaddr, PAGE, last + 1)
    });
    destroy(&*f2, hwpt).unwrap();
    allow(&*f2, &ram, ioas2, &[(0, last + 1)]).unwrap();
    refused(&f2, Errno::EADDRINUSE, || {
        hwpt_alloc(&*f2, dev_id, ioas2, 0)
    });
}

/// `iommufd_ioas/copy_area`: the pages behind one IOAS's range mapped into another.
#[test]
fn ioas_copy() {
    let host = Host::new();
    let ram = host.ram();
    let f = IommufdFile::open(&host.unit);
    let (a, b) = (ioas_alloc(&*f).unwrap(), ioas_alloc(&*f).unwrap());
    map(&*f, a, FIXED_RW, ram.vaddr + 0x3000, 2 * PAGE, 0x10000).unwrap();
    map(&*f, a, FIXED_RW, ram.vaddr + 0x8000, PAGE, 0x12000).unwrap();
    let copy = |src_iova, length, flags, dst_iova| {
        let c = IommuIoasCopy {
            size: 40,
            flags,
            dst_ioas_id: b,
            src_ioas_id: a,
            length,
            dst_iova,
            src_iova,
        };
        io(&*f, IOMMU_IOAS_COPY, &c).map(|c| c.dst_iova)
    };
    assert_eq!(copy(0x11000, 2 * PAGE, FIXED_RW, 0x50000).unwrap(), 0x50000);
    let ObjectState::Ioas(areas) = &f.lock().objects()[&b] else {
        panic!()
    };
    assert_eq!(
        areas,
        &vec![
            (0x50000, PAGE, ram.hpa + 0x4000),
            (0x51000, PAGE, ram.hpa + 0x8000)
        ]
    );
    refused(&f, Errno::ENOENT, || {
        copy(0x12000, 2 * PAGE, FIXED_RW, 0x60000)
    });
    refused(&f, Errno::EEXIST, || copy(0x10000, PAGE, FIXED_RW, 0x51000));
    refused(&f, Errno::EOPNOTSUPP, || {
        copy(0x10000, PAGE, RW | 1 << 5, 0)
    });
    let auto = copy(0x10000, 2 * PAGE, RW, 0).unwrap();
    assert_eq!(auto % (2 * PAGE), 0);
}

/// `iommufd_mock_domain/alloc_hwpt` and `replace` on the real driver: a device attached to
/// paging HWPTs of an IOAS reaches exactly the IOAS's mappings; destroying what is in use
/// is EBUSY; replace moves it between HWPTs; closing everything leaves nothing behind.
#[test]
fn hwpt_paging_attach_replace_and_dma() {
    let host = Host::new();
    let ram = host.ram();
    let engine = host.engine(SID);
    let (dids, frames) = (host.unit.domain_ids_in_use(), host.frames.allocated_bytes());
    let fds = Iommufds::new();
    let (fd, f) = fds.open(&host.unit);
    let dev = VfioDeviceFile::open(SID, fds.clone());
    assert_eq!(bind(&dev, fd + 1).unwrap_err(), Errno::EBADF);
    let dev_id = bind(&dev, fd).unwrap();
    assert_eq!(bind(&dev, fd).unwrap_err(), Errno::EINVAL);
    let ioas = ioas_alloc(&*f).unwrap();
    map(&*f, ioas, FIXED_RW, ram.vaddr, 16 * PAGE, 0x10_0000).unwrap();

    refused(&f, Errno::EOPNOTSUPP, || {
        hwpt_alloc(&*f, dev_id, ioas, IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    });
    refused(&f, Errno::EOPNOTSUPP, || {
        hwpt_alloc(
            &*f,
            dev_id,
            ioas,
            IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_FAULT_ID_VALID,
        )
    });
    refused(&f, Errno::EOPNOTSUPP, || {
        hwpt_alloc(&*f, dev_id, ioas, 1 << 31)
    });
    refused(&f, Errno::ENOENT, || hwpt_alloc(&*f, dev_id, 99, 0));
    refused(&f, Errno::EINVAL, || hwpt_alloc(&*f, dev_id, dev_id, 0));
    refused(&f, Errno::ENOENT, || hwpt_alloc(&*f, 99, ioas, 0));
    let parent = hwpt_alloc(&*f, dev_id, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT).unwrap();
    let plain = hwpt_alloc(&*f, dev_id, ioas, 0).unwrap();

    assert_eq!(attach(&dev, parent).unwrap(), parent);
    refused(&f, Errno::EBUSY, || destroy(&*f, parent));
    refused(&f, Errno::EBUSY, || destroy(&*f, ioas));
    refused(&f, Errno::EBUSY, || destroy(&*f, dev_id));
    dma_fill(&engine, 0x10_0000, 64, 0x1111_1111_1111_1111);
    assert_eq!(ram.read(0, 8), vec![0x11; 8]);
    // A mapping made after the attach reaches the device too; an unmapped one does not.
    map(&*f, ioas, FIXED_RW, ram.vaddr + 0x20000, PAGE, 0x20_0000).unwrap();
    dma_fill(&engine, 0x20_0000, 8, 0x2222_2222_2222_2222);
    assert_eq!(ram.read(0x20000, 8), vec![0x22; 8]);
    unmap(&*f, ioas, 0x20_0000, PAGE).unwrap();
    dma_fill(&engine, 0x20_0000, 8, 0x3333_3333_3333_3333);
    assert_eq!(
        ram.read(0x20000, 8),
        vec![0x22; 8],
        "DMA after unmap reached memory"
    );

    // Replace: parent -> plain; the parent is free again.
    assert_eq!(attach(&dev, plain).unwrap(), plain);
    destroy(&*f, parent).unwrap();
    dma_fill(&engine, 0x10_1000, 8, 0x4444_4444_4444_4444);
    assert_eq!(ram.read(0x1000, 8), vec![0x44; 8]);
    // Attaching to the IOAS makes an automatic HWPT, which goes with the detach.
    let auto = attach(&dev, ioas).unwrap();
    assert!(auto != ioas && auto != plain);
    destroy(&*f, plain).unwrap();
    detach(&dev).unwrap();
    assert_eq!(destroy(&*f, auto).unwrap_err(), Errno::ENOENT);
    dma_fill(&engine, 0x10_2000, 8, 0x5555_5555_5555_5555);
    assert_eq!(
        ram.read(0x2000, 8),
        vec![0; 8],
        "DMA after detach reached memory"
    );

    attach(&dev, ioas).unwrap();
    drop(dev);
    assert!(!f
        .lock()
        .objects()
        .values()
        .any(|o| matches!(o, ObjectState::Device { .. })));
    fds.close(fd);
    drop(f);
    assert_eq!(host.unit.attached_devices(), 0);
    assert_eq!(host.unit.domain_ids_in_use(), dids);
    drop(ram);
    assert_eq!(host.frames.allocated_bytes(), frames);
}

/// Two files: one never reaches the other's objects; a device held by one cannot be
/// attached through the other.
#[test]
fn files_are_isolated() {
    let host = Host::new();
    let ram = host.ram();
    let fds = Iommufds::new();
    let (fd_a, a) = fds.open(&host.unit);
    let (fd_b, b) = fds.open(&host.unit);
    let dev_a = VfioDeviceFile::open(SID, fds.clone());
    let dev_b = VfioDeviceFile::open(SID, fds.clone());
    let id_a = bind(&dev_a, fd_a).unwrap();
    let ioas_a = ioas_alloc(&*a).unwrap();
    map(&*a, ioas_a, FIXED_RW, ram.vaddr, PAGE, 0).unwrap();
    attach(&dev_a, ioas_a).unwrap();
    refused(&b, Errno::ENOENT, || unmap(&*b, ioas_a, 0, PAGE));
    refused(&b, Errno::ENOENT, || destroy(&*b, ioas_a));
    let id_b = bind(&dev_b, fd_b).unwrap();
    let ioas_b = ioas_alloc(&*b).unwrap();
    let before = a.lock().objects();
    assert_eq!(attach(&dev_b, ioas_b).unwrap_err(), Errno::EBUSY);
    assert_eq!(a.lock().objects(), before);
    assert_eq!(
        b.lock().objects().get(&id_b),
        Some(&ObjectState::Device {
            sid: SID,
            rid: None
        })
    );
    assert_eq!(id_a, id_b, "each file has its own id space");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever bytes a VMM passes to whichever ioctl, nothing panics and a failed ioctl
    /// changes no object.
    #[test]
    fn arbitrary_ioctls_fail_cleanly(
        which in 0usize..8,
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        small_ids in any::<bool>(),
    ) {
        let host = Host::new();
        let f = IommufdFile::open(&host.unit);
        ioas_alloc(&*f).unwrap();
        let cmds = [
            IOMMU_DESTROY, IOMMU_IOAS_ALLOC, IOMMU_IOAS_ALLOW_IOVAS, IOMMU_IOAS_COPY,
            IOMMU_IOAS_IOVA_RANGES, IOMMU_IOAS_MAP, IOMMU_IOAS_UNMAP, IOMMU_HWPT_ALLOC,
        ];
        let mut arg = bytes.clone();
        if small_ids && arg.len() >= 12 {
            arg[8] %= 3;
            arg[4] %= 3;
        }
        let before = f.lock().objects();
        if f.ioctl(cmds[which], &mut arg).is_err() {
            prop_assert_eq!(f.lock().objects(), before);
        }
    }
}
