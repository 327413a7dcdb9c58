//! The iommufd uAPI of the host against the kernel selftest's sequences
//! (`tools/testing/selftests/iommu/iommufd.c`) that need no mock driver, on the real host
//! VT-d driver and the physical IOMMU model, with a DMA engine as the device: argument size
//! rules (`iommufd/cmd_length`, `cmd_fail`), IOAS map/unmap/copy/IOVA ranges/allowed IOVAs
//! (`iommufd_ioas`), paging HWPTs with device attach, replace and EBUSY destroy
//! (`iommufd_mock_domain/alloc_hwpt`, `replace`), and isolation between two files.

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::container::{Container, SharedPasidAllocator};
use vsva_host::driver::{HostIommu, VtdDomain};
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::iommufd::{IommufdFile, ObjectState};
use vsva_host::pasid::PasidAllocator;
use vsva_hw::dma::port::{DmaAccess, DmaPort, PageRequestMessage};
use vsva_hw::dma::regs::{
    CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRIV_EN, CTRL_PRI_EN, REG_SWERR0, SWERR_OVERFLOW, SWERR_VALID,
};
use vsva_hw::dma::{CompletionRequest, Descriptor, DmaEngine, DmaEngineConfig, Operation};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory};
use vsva_uapi::iommufd::*;
use vsva_uapi::request::DmaMap;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{
    error::Errno, file::HwptData, file::IommuModel, file::IommufdIoctls, file::UapiFile,
    file::UserArray, file::VfioIoctls,
};
use vsva_vtd::{
    addr::Gpa, addr::Iova, addr::Pasid, addr::SourceId, builder::FrameSource, builder::MapFlags,
    builder::PageTableBuilder, builder::TableFormat, flpte::FlPagingMode, walk::PageSize,
};

const PAGE: u64 = 4096;
const FEATURES: u64 = CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRIV_EN;
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

/// What a failed ioctl must leave as it was: the file's objects, and in the driver the
/// domain ids, attached devices and table frames.
#[derive(Debug, PartialEq)]
struct Snap {
    objects: std::collections::BTreeMap<u32, ObjectState>,
    dids: usize,
    devices: usize,
    frames: u64,
}

impl Host {
    fn snap(&self, file: &IommufdFile) -> Snap {
        Snap {
            objects: file.lock().objects(),
            dids: self.unit.domain_ids_in_use(),
            devices: self.unit.attached_devices(),
            frames: self.frames.allocated_bytes(),
        }
    }

    /// Asserts that a failing call fails with `errno` and changes nothing of `file` or of
    /// the driver.
    fn refused<T: std::fmt::Debug>(
        &self,
        file: &IommufdFile,
        errno: Errno,
        call: impl FnOnce() -> Result<T, Errno>,
    ) {
        let before = self.snap(file);
        assert_eq!(call().unwrap_err(), errno);
        assert_eq!(self.snap(file), before, "a failed call changed something");
    }

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

    fn engine(&self, sid: SourceId, features: u64) -> Arc<DmaEngine> {
        let engine = Arc::new(DmaEngine::new(DmaEngineConfig::new(sid), self.hw.clone()).unwrap());
        self.hw.attach_endpoint(engine.clone());
        engine.enable(features).unwrap();
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
/// The set-up most tests share, as a VMM does it: an open iommufd, the device `SID`'s cdev
/// bound to it, and an IOAS mapping all of guest RAM at IOVA 0 (read and write).
struct Opened {
    fds: Arc<Iommufds>,
    fd: i32,
    f: Arc<IommufdFile>,
    dev: VfioDeviceFile,
    dev_id: u32,
    ioas: u32,
}

impl Host {
    fn open(&self, ram: &Ram) -> Opened {
        let fds = Iommufds::new();
        let (fd, f) = fds.open(&self.unit);
        let dev = VfioDeviceFile::open(SID, fds.clone());
        let dev_id = bind(&dev, fd).unwrap();
        let ioas = ioas_alloc(&*f).unwrap();
        map(&*f, ioas, FIXED_RW, ram.vaddr, RAM, 0).unwrap();
        Opened {
            fds,
            fd,
            f,
            dev,
            dev_id,
            ioas,
        }
    }
}

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
    f.ioas_alloc()
}

fn map(
    f: &dyn UapiFile,
    ioas: u32,
    flags: u32,
    user_va: u64,
    length: u64,
    iova: u64,
) -> Result<u64, Errno> {
    f.ioas_map(ioas, flags, user_va, length, iova)
}

const RW: u32 = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
const FIXED_RW: u32 = RW | IOMMU_IOAS_MAP_FIXED_IOVA;

fn unmap(f: &dyn UapiFile, ioas: u32, iova: u64, length: u64) -> Result<u64, Errno> {
    f.ioas_unmap(ioas, iova, length)
}

fn destroy(f: &dyn UapiFile, id: u32) -> Result<(), Errno> {
    f.destroy(id)
}

fn hwpt_alloc(f: &dyn UapiFile, dev_id: u32, pt_id: u32, flags: u32) -> Result<u32, Errno> {
    f.hwpt_alloc(dev_id, pt_id, flags, HwptData::NONE, 0)
}

fn bind(dev: &VfioDeviceFile, fd: i32) -> Result<u32, Errno> {
    dev.device_bind_iommufd(fd)
}

fn attach(dev: &VfioDeviceFile, pt_id: u32) -> Result<u32, Errno> {
    dev.device_attach_pt(pt_id, None)
}

fn detach(dev: &VfioDeviceFile) -> Result<(), Errno> {
    dev.device_detach_pt(None)
}

fn iova_ranges(
    f: &dyn UapiFile,
    ram: &Ram,
    ioas: u32,
    num: u32,
) -> (Result<(), Errno>, u32, Vec<(u64, u64)>) {
    let (r, out) = f.ioas_iova_ranges(ioas, num, ram.vaddr + SCRATCH);
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
    f.ioas_allow_iovas(ioas, ranges.len() as u32, ram.vaddr + SCRATCH)
}

#[test]
fn cmd_fail() {
    let host = Host::new();
    let f = IommufdFile::open(&host.unit);
    assert_eq!(destroy(&*f, 0).unwrap_err(), Errno::ENOENT);
    assert_eq!(f.ioctl(0x3b7f, &mut [0; 8]).unwrap_err(), Errno::ENOTTY);
    assert_eq!(f.ioctl(IOMMU_DESTROY, &mut []).unwrap_err(), Errno::EFAULT);
    assert_eq!(f.read(&mut [0; 8]).unwrap_err(), Errno::EINVAL);
    // The ioctls the host does not serve (README's uAPI table), with a full-size argument.
    for cmd in [
        IOMMU_OPTION,
        IOMMU_VFIO_IOAS,
        IOMMU_VIOMMU_ALLOC,
        IOMMU_VDEVICE_ALLOC,
    ] {
        let mut arg = [0u8; 64];
        arg[..4].copy_from_slice(&64u32.to_le_bytes());
        assert_eq!(
            f.ioctl(cmd, &mut arg).unwrap_err(),
            Errno::ENOTTY,
            "{cmd:#x}"
        );
    }
}

/// One VFIO path at a time (`vfio_device_block_group`): while a type1 container holds the
/// device, `VFIO_DEVICE_BIND_IOMMUFD` is EBUSY and changes nothing (the container keeps
/// the device and its DMA); once the container lets it go, a cdev binds it; while the cdev
/// has it bound, attached or not, the container's attach (`VFIO_GROUP_SET_CONTAINER`,
/// `vfio_group_fops_open`) is EBUSY and changes nothing; once the cdev closes, a container
/// takes it again, and closing that container lets a cdev bind it.
#[test]
fn a_device_is_used_through_a_type1_container_or_a_cdev_not_both() {
    let host = Host::new();
    let ram = host.ram();
    let engine = host.engine(SID, 0);
    let alloc: SharedPasidAllocator = Arc::new(Mutex::new(PasidAllocator::new()));
    let mut c = Container::new(alloc.clone(), 4, VtdDomain::new(&host.unit).unwrap()).unwrap();
    c.set_iommu(IommuModel::Type1v2).unwrap();
    c.attach_device(SID).unwrap();
    c.map_dma(&DmaMap {
        vaddr: ram.vaddr,
        iova: Iova(0),
        size: RAM,
        read: true,
        write: true,
    })
    .unwrap();

    let fds = Iommufds::new();
    let (fd, f) = fds.open(&host.unit);
    let dev = VfioDeviceFile::open(SID, fds.clone());
    host.refused(&f, Errno::EBUSY, || bind(&dev, fd));
    assert_eq!(dev.dev_id(), None);
    assert_eq!(c.devices(), vec![SID], "the container keeps the device");
    dma_fill(&engine, 0x3000, 64, 0x1111_1111_1111_1111);
    assert_eq!(ram.read(0x3000, 64), [0x11; 64], "and its DMA");

    c.detach_device(SID).unwrap();
    let dev_id = bind(&dev, fd).unwrap();
    let refused_container = |c: &mut Container<VtdDomain>| {
        let devices = host.unit.attached_devices();
        let e = c.attach_device(SID).unwrap_err();
        assert_eq!(e.errno(), -libc::EBUSY, "{e}");
        assert!(c.devices().is_empty());
        assert_eq!(host.unit.attached_devices(), devices);
    };
    refused_container(&mut c);
    let ioas = ioas_alloc(&*f).unwrap();
    map(&*f, ioas, FIXED_RW, ram.vaddr, RAM, 0).unwrap();
    attach(&dev, ioas).unwrap();
    refused_container(&mut c);
    let mut other = Container::new(alloc.clone(), 4, VtdDomain::new(&host.unit).unwrap()).unwrap();
    refused_container(&mut other);
    dma_fill(&engine, 0x5000, 64, 0x2222_2222_2222_2222);
    assert_eq!(ram.read(0x5000, 64), [0x22; 64], "the iommufd keeps it");
    assert_eq!(dev.dev_id(), Some(dev_id));

    drop(dev);
    other.attach_device(SID).unwrap();
    let again = VfioDeviceFile::open(SID, fds.clone());
    host.refused(&f, Errno::EBUSY, || bind(&again, fd));
    drop(other);
    bind(&again, fd).unwrap();
}

/// Bytes of each memfd `IOMMU_IOAS_MAP_FILE` is given.
const FILE: u64 = 64 << 10;

/// A memfd of [`FILE`] bytes; with `sealing`, one that can take seals.
fn memfd(sealing: bool) -> std::fs::File {
    let flags = libc::MFD_CLOEXEC | if sealing { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: the name is a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vsva-map-file".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor this test owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(FILE).unwrap();
    f
}

fn map_file(
    f: &dyn UapiFile,
    ioas: u32,
    flags: u32,
    fd: i32,
    (start, length): (u64, u64),
    iova: u64,
) -> Result<IommuIoasMapFile, Errno> {
    let c = IommuIoasMapFile {
        size: 40,
        flags,
        ioas_id: ioas,
        fd,
        start,
        length,
        iova,
    };
    io(f, IOMMU_IOAS_MAP_FILE, &c)
}

/// `IOMMU_IOAS_MAP_FILE` on the host's own file: a memfd's range is mapped in place (the
/// device's DMA lands in the file, beside what the file held), the same file again holds
/// the pages of its new range, and the kernel's refusals (unknown flags EOPNOTSUPP, U64_MAX
/// EOVERFLOW, no access EINVAL, unknown IOAS ENOENT, no open fd EBADF, a wrapping range
/// EOVERFLOW, a range beyond the file, unaligned or empty, a file that is not a memfd or
/// cannot be sealed (the host memory's own file among them) EINVAL, an IOVA in use
/// EEXIST) change nothing and hold no pages; unmapping and closing give everything back.
#[test]
fn map_file_maps_a_memfd_in_place() {
    let host = Host::new();
    let ram = host.ram();
    let baseline = host.frames.allocated_bytes();
    let engine = host.engine(SID, 0);
    let o = host.open(&ram);
    attach(&o.dev, o.ioas).unwrap();
    let f = &*o.f;
    let file = memfd(true);
    file.write_all_at(&[0x5a; 128], 0x3000).unwrap();
    let iova = 8 << 20;
    let out = map_file(
        f,
        o.ioas,
        FIXED_RW,
        file.as_raw_fd(),
        (0x2000, 0x4000),
        iova,
    )
    .unwrap();
    assert_eq!(
        (out.fd, out.start, out.length, out.iova),
        (file.as_raw_fd(), 0x2000, 0x4000, iova),
        "the caller gets its own fields back"
    );
    dma_fill(&engine, iova + 0x1000, 64, 0x2222_2222_2222_2222);
    let mut got = [0u8; 128];
    file.read_exact_at(&mut got, 0x3000).unwrap();
    assert_eq!(got[..64], [0x22; 64], "the DMA landed in the file");
    assert_eq!(
        got[64..],
        [0x5a; 64],
        "the file's own bytes are what is mapped"
    );
    // The same file again (the same leaf table): each map holds the page of its own range.
    let frames = host.frames.allocated_bytes();
    let out = map_file(f, o.ioas, RW, file.as_raw_fd(), (0x8000, 0x1000), 0).unwrap();
    assert_ne!(out.iova, 0, "an IOVA was allocated");
    assert_eq!(host.frames.allocated_bytes(), frames + 0x1000);
    map_file(
        f,
        o.ioas,
        FIXED_RW,
        file.as_raw_fd(),
        (0xa000, 0x1000),
        iova + 0x10000,
    )
    .unwrap();
    assert_eq!(host.frames.allocated_bytes(), frames + 0x2000);

    let fd = file.as_raw_fd();
    let at = (0, 0x1000);
    let spare = iova + (1 << 20);
    let refused = |errno: Errno, flags: u32, ioas: u32, fd: i32, range: (u64, u64), iova: u64| {
        host.refused(f, errno, || map_file(f, ioas, flags, fd, range, iova));
    };
    refused(Errno::EOPNOTSUPP, FIXED_RW | 1 << 7, o.ioas, fd, at, spare);
    refused(Errno::EOVERFLOW, FIXED_RW, o.ioas, fd, at, u64::MAX);
    refused(Errno::EOVERFLOW, FIXED_RW, o.ioas, fd, (0, u64::MAX), spare);
    refused(
        Errno::EINVAL,
        IOMMU_IOAS_MAP_FIXED_IOVA,
        o.ioas,
        fd,
        at,
        spare,
    );
    refused(Errno::ENOENT, FIXED_RW, 999, fd, at, spare);
    refused(Errno::EBADF, FIXED_RW, o.ioas, -1, at, spare);
    refused(Errno::EBADF, FIXED_RW, o.ioas, i32::MAX, at, spare);
    refused(
        Errno::EOVERFLOW,
        FIXED_RW,
        o.ioas,
        fd,
        (u64::MAX - 0xfff, 0x2000),
        spare,
    );
    refused(Errno::EINVAL, FIXED_RW, o.ioas, fd, (FILE, 0x1000), spare);
    refused(
        Errno::EINVAL,
        FIXED_RW,
        o.ioas,
        fd,
        (FILE - 0x1000, 0x2000),
        spare,
    );
    refused(Errno::EINVAL, FIXED_RW, o.ioas, fd, (0x800, 0x1000), spare);
    refused(Errno::EINVAL, FIXED_RW, o.ioas, fd, (0, 0), spare);
    let unsealable = memfd(false);
    refused(
        Errno::EINVAL,
        FIXED_RW,
        o.ioas,
        unsealable.as_raw_fd(),
        at,
        spare,
    );
    let hostmem = host.mem.file().as_raw_fd();
    refused(Errno::EINVAL, FIXED_RW, o.ioas, hostmem, at, spare);
    let exe = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
    refused(Errno::EINVAL, FIXED_RW, o.ioas, exe.as_raw_fd(), at, spare);
    // A fresh memfd whose map fails holds no pages (`refused` counts the frames).
    let fresh = memfd(true);
    refused(Errno::EEXIST, FIXED_RW, o.ioas, fresh.as_raw_fd(), at, iova);

    assert_eq!(unmap(f, o.ioas, 0, u64::MAX).unwrap(), RAM + 0x6000);
    drop(o);
    assert_eq!(host.frames.allocated_bytes(), baseline);
    file.read_exact_at(&mut got, 0x3000).unwrap();
    assert_eq!(got[..64], [0x22; 64], "the file keeps its bytes");
}

/// How many mappings of this process map the memfd named `name`.
fn mappings_of(name: &str) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = format!("/memfd:{name} ");
    maps.lines().filter(|l| l.contains(&name)).count()
}

/// `IOMMU_IOAS_MAP_FILE` holds what Linux pins (`iopt_alloc_file_pages`, 6.14): each map
/// the pages of its own range of the file only, even of a file mapped already;
/// `IOMMU_IOAS_COPY` of an area shares its pages; they go, and the host's hold on the file
/// with them, with the last area that maps them (an unmap, the IOAS's destruction); and a
/// map keeps working once the caller closes the fd it passed.
#[test]
fn map_file_holds_its_range_until_its_last_area_goes() {
    let host = Host::new();
    let ram = host.ram();
    let engine = host.engine(SID, 0);
    let o = host.open(&ram);
    attach(&o.dev, o.ioas).unwrap();
    let f = &*o.f;
    let name = format!("vsva-pin-{}", std::process::id());
    let cname = std::ffi::CString::new(name.clone()).unwrap();
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor this test owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(FILE).unwrap();
    // IOVAs in the leaf table RAM's mapping uses already: the frames the maps take are
    // the file's pages.
    let base = RAM;
    let held = |bytes: u64| host.frames.allocated_bytes() - bytes;
    let frames = host.frames.allocated_bytes();
    let passed = file.try_clone().unwrap();
    let fd = passed.as_raw_fd();
    map_file(f, o.ioas, FIXED_RW, fd, (0x4000, 0x2000), base).unwrap();
    assert_eq!(held(frames), 0x2000, "the range's pages, not the file's");
    map_file(f, o.ioas, FIXED_RW, fd, (0x4000, 0x1000), base + 0x4000).unwrap();
    assert_eq!(held(frames), 0x3000, "a second map holds pages of its own");
    drop(passed);
    assert_eq!(mappings_of(&name), 2);

    // The fd passed is closed: the maps work on.
    let mut got = [0u8; 64];
    dma_fill(&engine, base + 0x1000, 64, 0x3333_3333_3333_3333);
    file.read_exact_at(&mut got, 0x5000).unwrap();
    assert_eq!(got, [0x33; 64]);
    dma_fill(&engine, base + 0x4000, 64, 0x4444_4444_4444_4444);
    file.read_exact_at(&mut got, 0x4000).unwrap();
    assert_eq!(got, [0x44; 64]);

    // A copy shares the first map's pages: they stay while it maps them.
    let copy = IommuIoasCopy {
        size: 40,
        flags: FIXED_RW,
        dst_ioas_id: o.ioas,
        src_ioas_id: o.ioas,
        length: 0x2000,
        dst_iova: base + 0x8000,
        src_iova: base,
    };
    io(f, IOMMU_IOAS_COPY, &copy).unwrap();
    assert_eq!(held(frames), 0x3000, "a copy holds nothing more");
    assert_eq!(unmap(f, o.ioas, base, 0x2000).unwrap(), 0x2000);
    assert_eq!(held(frames), 0x3000, "the copy keeps the pages");
    dma_fill(&engine, base + 0x9000, 64, 0x5555_5555_5555_5555);
    file.read_exact_at(&mut got, 0x5000).unwrap();
    assert_eq!(got, [0x55; 64], "through the copy");
    assert_eq!(unmap(f, o.ioas, base + 0x8000, 0x2000).unwrap(), 0x2000);
    assert_eq!(held(frames), 0x1000, "the last area took them along");
    assert_eq!(mappings_of(&name), 1);
    assert_eq!(unmap(f, o.ioas, base + 0x4000, 0x1000).unwrap(), 0x1000);
    assert_eq!(held(frames), 0, "an unmap releases");
    assert_eq!(mappings_of(&name), 0, "and the host's hold on the file");

    // An IOAS destroyed with its areas releases theirs.
    let other = ioas_alloc(f).unwrap();
    map_file(f, other, FIXED_RW, file.as_raw_fd(), (0, 0x3000), 0).unwrap();
    assert_eq!(held(frames), 0x3000);
    destroy(f, other).unwrap();
    assert_eq!(held(frames), 0);
    assert_eq!(mappings_of(&name), 0);
    // Closing the iommufd releases what its IOASes still map.
    map_file(f, o.ioas, FIXED_RW, file.as_raw_fd(), (0, 0x1000), base).unwrap();
    assert_eq!(mappings_of(&name), 1);
    drop(o);
    assert_eq!(mappings_of(&name), 0);
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
        UCMD_HWPT_INVALIDATE,
        UCMD_GET_HW_INFO,
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
    host.refused(&f, Errno::EEXIST, || {
        map(&*f, ioas, FIXED_RW, va, PAGE, 0x12000)
    });
    host.refused(&f, Errno::EOPNOTSUPP, || {
        map(&*f, ioas, RW | 1 << 3, va, PAGE, 0)
    });
    host.refused(&f, Errno::EINVAL, || {
        map(&*f, ioas, IOMMU_IOAS_MAP_FIXED_IOVA, va, PAGE, 0)
    });
    host.refused(&f, Errno::EOVERFLOW, || map(&*f, ioas, RW, va, u64::MAX, 0));
    host.refused(&f, Errno::EINVAL, || {
        map(&*f, ioas, FIXED_RW, va, PAGE, 0x20001)
    });
    host.refused(&f, Errno::EFAULT, || {
        map(&*f, ioas, FIXED_RW, 0x1000, PAGE, 0x20000)
    });
    host.refused(&f, Errno::EFAULT, || {
        map(&*f, ioas, FIXED_RW, va, RAM + PAGE, 0x20000)
    });
    host.refused(&f, Errno::ENOENT, || {
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
    host.refused(&f, Errno::EOPNOTSUPP, || io(&*f, IOMMU_IOAS_MAP, &reserved));

    // Without FIXED_IOVA the kernel picks a free IOVA aligned like the user address.
    let auto = map(&*f, ioas, RW, va + 0x20000, 2 * PAGE, 0).unwrap();
    assert_eq!(auto % (2 * PAGE), 0);
    assert!(auto + 2 * PAGE <= 0x10000 || auto >= 0x14000, "{auto:#x}");

    host.refused(&f, Errno::ENOENT, || unmap(&*f, ioas, 0x11000, PAGE));
    host.refused(&f, Errno::ENOENT, || unmap(&*f, ioas, 0x40_0000, PAGE));
    host.refused(&f, Errno::EINVAL, || unmap(&*f, ioas, 0x10000, 0));
    host.refused(&f, Errno::EOVERFLOW, || unmap(&*f, ioas, u64::MAX, PAGE));
    assert_eq!(unmap(&*f, ioas, 0x10000, 4 * PAGE).unwrap(), 4 * PAGE);
    assert_eq!(unmap(&*f, ioas, 0, u64::MAX).unwrap(), 2 * PAGE);
    assert_eq!(
        unmap(&*f, ioas, 0, u64::MAX).unwrap(),
        0,
        "unmap all of nothing"
    );
    assert_eq!(f.lock().objects()[&ioas], ObjectState::Ioas(vec![]));
    // No room for an allocated IOVA in the allowed ranges: ENOSPC.
    allow(&*f, &ram, ioas, &[(0x100_0000, 0x100_1fff)]).unwrap();
    host.refused(&f, Errno::ENOSPC, || map(&*f, ioas, RW, va, 4 * PAGE, 0));
    assert_eq!(map(&*f, ioas, RW, va, 2 * PAGE, 0).unwrap(), 0x100_0000);
    assert_eq!(unmap(&*f, ioas, 0, u64::MAX).unwrap(), 2 * PAGE);
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

    host.refused(&f, Errno::EINVAL, || {
        allow(&*f, &ram, ioas, &[(0x2000, 0x1000)])
    });
    host.refused(&f, Errno::EINVAL, || {
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
    host.refused(&f2, Errno::EADDRINUSE, || {
        allow(&*f2, &ram, ioas2, &[(0, last + 1)])
    });
    host.refused(&f2, Errno::EINVAL, || {
        map(&*f2, ioas2, FIXED_RW, ram.vaddr, PAGE, last + 1)
    });
    destroy(&*f2, hwpt).unwrap();
    allow(&*f2, &ram, ioas2, &[(0, last + 1)]).unwrap();
    host.refused(&f2, Errno::EADDRINUSE, || {
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
    host.refused(&f, Errno::ENOENT, || {
        copy(0x12000, 2 * PAGE, FIXED_RW, 0x60000)
    });
    host.refused(&f, Errno::EEXIST, || copy(0x10000, PAGE, FIXED_RW, 0x51000));
    host.refused(&f, Errno::EOPNOTSUPP, || {
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
    let engine = host.engine(SID, FEATURES);
    let (dids, frames) = (host.unit.domain_ids_in_use(), host.frames.allocated_bytes());
    let fds = Iommufds::new();
    let (fd, f) = fds.open(&host.unit);
    let dev = VfioDeviceFile::open(SID, fds.clone());
    assert_eq!(bind(&dev, fd + 1).unwrap_err(), Errno::EBADF);
    let dev_id = bind(&dev, fd).unwrap();
    assert_eq!(bind(&dev, fd).unwrap_err(), Errno::EINVAL);
    let flagged = VfioDeviceBindIommufd {
        argsz: 24,
        flags: 1,
        iommufd: fd,
        ..Default::default()
    };
    let other = VfioDeviceFile::open(SourceId::from_rid(SID.rid() + 1), fds.clone());
    assert_eq!(
        io(&other, VFIO_DEVICE_BIND_IOMMUFD, &flagged).unwrap_err(),
        Errno::EINVAL
    );
    assert_eq!(bind(&other, -1).unwrap_err(), Errno::EINVAL);
    // An open fd that is not an iommufd (a fault queue's): EBADFD, as iommufd_ctx_from_fd.
    let queue = IommuFaultAlloc {
        size: 16,
        ..Default::default()
    };
    let queue = io(&*f, IOMMU_FAULT_QUEUE_ALLOC, &queue).unwrap();
    assert_eq!(
        bind(&other, queue.out_fault_fd as i32).unwrap_err(),
        Errno::EBADFD
    );
    assert_eq!(other.dev_id(), None);
    destroy(&*f, queue.out_fault_id).unwrap();
    fds.close(queue.out_fault_fd as i32);
    let ioas = ioas_alloc(&*f).unwrap();
    map(&*f, ioas, FIXED_RW, ram.vaddr, 16 * PAGE, 0x10_0000).unwrap();

    // The unit has ECAP.SLADS: a dirty-tracking HWPT is allocated (tests/iommufd_dirty.rs
    // has the rest, and the EOPNOTSUPP of a unit without it).
    let dirty = hwpt_alloc(&*f, dev_id, ioas, IOMMU_HWPT_ALLOC_DIRTY_TRACKING).unwrap();
    destroy(&*f, dirty).unwrap();
    host.refused(&f, Errno::EOPNOTSUPP, || {
        hwpt_alloc(
            &*f,
            dev_id,
            ioas,
            IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_FAULT_ID_VALID,
        )
    });
    host.refused(&f, Errno::EOPNOTSUPP, || {
        hwpt_alloc(&*f, dev_id, ioas, 1 << 31)
    });
    host.refused(&f, Errno::ENOENT, || hwpt_alloc(&*f, dev_id, 99, 0));
    host.refused(&f, Errno::EINVAL, || hwpt_alloc(&*f, dev_id, dev_id, 0));
    host.refused(&f, Errno::ENOENT, || hwpt_alloc(&*f, 99, ioas, 0));
    let parent = hwpt_alloc(&*f, dev_id, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT).unwrap();
    let plain = hwpt_alloc(&*f, dev_id, ioas, 0).unwrap();

    assert_eq!(attach(&dev, parent).unwrap(), parent);
    host.refused(&f, Errno::EBUSY, || destroy(&*f, parent));
    host.refused(&f, Errno::EBUSY, || destroy(&*f, ioas));
    host.refused(&f, Errno::EBUSY, || destroy(&*f, dev_id));
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

/// Two files: one never reaches the other's objects; a device bound to one through a cdev
/// is refused at the other's bind through a second cdev (EINVAL, as `vfio_df_open` lets one
/// cdev open a device at a time), which changes neither file; once the first cdev closes,
/// the second binds and attaches, and the first is refused in turn.
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
    host.refused(&b, Errno::ENOENT, || unmap(&*b, ioas_a, 0, PAGE));
    host.refused(&b, Errno::ENOENT, || destroy(&*b, ioas_a));
    let before = a.lock().objects();
    host.refused(&b, Errno::EINVAL, || bind(&dev_b, fd_b));
    assert_eq!(a.lock().objects(), before);
    assert_eq!(dev_b.dev_id(), None);
    // A refused bind leaves the cdev unbound: attach is EINVAL (not bound), nothing moves.
    host.refused(&b, Errno::EINVAL, || attach(&dev_b, ioas_a));
    let rid_a = host.unit.attached_devices();
    drop(dev_a);
    assert_eq!(host.unit.attached_devices(), rid_a - 1);
    let id_b = bind(&dev_b, fd_b).unwrap();
    let ioas_b = ioas_alloc(&*b).unwrap();
    let hwpt_b = attach(&dev_b, ioas_b).unwrap();
    assert_eq!(
        b.lock().objects().get(&id_b),
        Some(&ObjectState::Device {
            sid: SID,
            rid: Some(hwpt_b),
            pasids: vec![]
        })
    );
    assert_eq!(id_a, id_b, "each file has its own id space");
    // B's cdev has the device now: a new cdev is refused, on A as on B.
    let dev_a = VfioDeviceFile::open(SID, fds.clone());
    host.refused(&a, Errno::EINVAL, || bind(&dev_a, fd_a));
    host.refused(&b, Errno::EINVAL, || bind(&dev_a, fd_b));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever bytes a VMM passes to whichever ioctl or cdev call, on a file holding an
    /// IOAS with a mapping, a nest parent the device's RID is on, a nested HWPT with a fault
    /// queue at a PASID, nothing panics, and a failed call changes no object, no domain id,
    /// no attachment and no table frame; the device still reaches exactly what it did.
    #[test]
    fn arbitrary_ioctls_fail_cleanly(
        which in 0usize..13,
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        small_ids in any::<bool>(),
    ) {
        let host = Host::new();
        let ram = host.ram();
        let Opened { fds: _fds, f, dev, dev_id, ioas, .. } = host.open(&ram);
        let flags = IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID;
        let parent = hwpt_alloc(&*f, dev_id, ioas, flags).unwrap();
        attach(&dev, parent).unwrap();
        let guest = GuestTables::new(&ram, &[(GVA, 0x10000)]);
        let fault = io(&*f, IOMMU_FAULT_QUEUE_ALLOC, &IommuFaultAlloc { size: 16, ..Default::default() })
            .unwrap();
        let data = s1(guest.t.root(), 0).to_bytes();
        let c = IommuHwptAlloc {
            size: 48,
            flags: IOMMU_HWPT_ALLOC_PASID | IOMMU_HWPT_FAULT_ID_VALID,
            dev_id,
            pt_id: parent,
            data_type: IOMMU_HWPT_DATA_VTD_S1,
            data_len: data.len() as u32,
            data_uptr: scratch(&ram, &data),
            fault_id: fault.out_fault_id,
            ..Default::default()
        };
        let nested = io(&*f, IOMMU_HWPT_ALLOC, &c).unwrap().out_hwpt_id;
        attach_pasid(&dev, 5, nested).unwrap();
        let entry = host.unit.pasid_entry(SID, Pasid::new(5).unwrap());

        let cmds = [
            IOMMU_DESTROY, IOMMU_IOAS_ALLOC, IOMMU_IOAS_ALLOW_IOVAS, IOMMU_IOAS_COPY,
            IOMMU_IOAS_IOVA_RANGES, IOMMU_IOAS_MAP, IOMMU_IOAS_UNMAP, IOMMU_HWPT_ALLOC,
            IOMMU_HWPT_INVALIDATE, IOMMU_GET_HW_INFO, IOMMU_FAULT_QUEUE_ALLOC,
            VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_DEVICE_DETACH_IOMMUFD_PT,
        ];
        let mut arg = bytes.clone();
        if small_ids && arg.len() >= 16 {
            for at in [4, 8, 12] {
                arg[at] %= 8;
                arg[at + 1] = 0;
                arg[at + 2] = 0;
                arg[at + 3] = 0;
            }
        }
        let before = host.snap(&f);
        let file: &dyn UapiFile = if which >= 11 { &dev } else { &*f };
        if file.ioctl(cmds[which], &mut arg).is_err() {
            prop_assert_eq!(host.snap(&f), before);
            prop_assert_eq!(host.unit.pasid_entry(SID, Pasid::new(5).unwrap()), entry);
        }
    }
}

// ----- Nested HWPTs, PASID attach, invalidation, hardware information -----

const GUEST_PT: (u64, u64) = (0x80000, 0xa0000);
const GVA: u64 = 0x4000_0000;

/// Guest page-table frames handed out from a range of guest RAM.
struct GuestFrames {
    next: u64,
    end: u64,
}

impl FrameSource for GuestFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        (self.next < self.end).then(|| {
            self.next += PAGE;
            self.next - PAGE
        })
    }

    fn free_table(&mut self, _frame: u64) {}
}

/// A guest process's first-level tables in guest RAM mapping each `(gva, gpa)` page.
struct GuestTables {
    t: PageTableBuilder,
    f: GuestFrames,
}

impl GuestTables {
    fn new(ram: &Ram, pages: &[(u64, u64)]) -> GuestTables {
        let mut f = GuestFrames {
            next: GUEST_PT.0,
            end: GUEST_PT.1,
        };
        let t = PageTableBuilder::new(
            TableFormat::FirstLevel(FlPagingMode::FourLevel),
            &ram.mem,
            &mut f,
        )
        .unwrap();
        let mut g = GuestTables { t, f };
        for &(gva, gpa) in pages {
            g.map(ram, gva, gpa);
        }
        g
    }

    fn map(&mut self, ram: &Ram, gva: u64, gpa: u64) {
        let flags = MapFlags::READ | MapFlags::WRITE | MapFlags::USER;
        self.t
            .map(&ram.mem, &mut self.f, gva, gpa, PageSize::Size4K, flags)
            .unwrap();
    }

    fn unmap(&mut self, ram: &Ram, gva: u64) {
        self.t.unmap(&ram.mem, gva, PageSize::Size4K).unwrap();
    }
}

fn dma_fill_pasid(engine: &DmaEngine, pasid: u32, dst: u64, size: u32, pattern: u64) {
    let desc = Descriptor {
        pasid: Some(Pasid::new(pasid).unwrap()),
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

/// Puts `bytes` in the scratch area of guest RAM; returns their user address.
fn scratch(ram: &Ram, bytes: &[u8]) -> u64 {
    ram.mem.write_slice(bytes, GuestAddress(SCRATCH)).unwrap();
    ram.vaddr + SCRATCH
}

fn s1(pgtbl_addr: u64, flags: u64) -> IommuHwptVtdS1 {
    IommuHwptVtdS1 {
        flags,
        pgtbl_addr,
        addr_width: 48,
        __reserved: 0,
    }
}

/// `IOMMU_HWPT_ALLOC` of a nested HWPT for `(dev_id, parent)` with `data` bytes at
/// `data_uptr` (or those given).
fn nested_alloc(
    f: &dyn UapiFile,
    ram: &Ram,
    (dev_id, parent): (u32, u32),
    flags: u32,
    data_type: u32,
    data: &[u8],
    data_uptr: Option<u64>,
) -> Result<u32, Errno> {
    let uptr = scratch(ram, data);
    let data = HwptData {
        data_type,
        len: data.len() as u32,
        uptr: data_uptr.unwrap_or(uptr),
    };
    f.hwpt_alloc(dev_id, parent, flags, data, u32::MAX)
}

/// `IOMMU_HWPT_INVALIDATE`: the result and `entry_num` written back.
fn invalidate(
    f: &dyn UapiFile,
    ram: &Ram,
    hwpt: u32,
    data_type: u32,
    entry_len: u32,
    entries: &[IommuHwptVtdS1Invalidate],
    data_uptr: Option<u64>,
) -> (Result<(), Errno>, u32) {
    let mut bytes = Vec::new();
    for e in entries {
        let mut b = e.to_bytes();
        b.resize(entry_len as usize, 0);
        bytes.extend(b);
    }
    let uptr = scratch(ram, &bytes);
    let array = UserArray {
        data_type,
        entry_len,
        entry_num: entries.len() as u32,
        data_uptr: data_uptr.unwrap_or(uptr),
    };
    f.hwpt_invalidate(hwpt, array)
}

fn inv(addr: u64, npages: u64, flags: u32) -> IommuHwptVtdS1Invalidate {
    IommuHwptVtdS1Invalidate {
        addr,
        npages,
        flags,
        __reserved: 0,
    }
}

fn attach_pasid(dev: &VfioDeviceFile, pasid: u32, pt_id: u32) -> Result<u32, Errno> {
    dev.device_attach_pt(pt_id, Some(pasid))
}

fn detach_pasid(dev: &VfioDeviceFile, pasid: u32) -> Result<(), Errno> {
    dev.device_detach_pt(Some(pasid))
}

const VTD_S1_LEN: usize = std::mem::size_of::<IommuHwptVtdS1>();
const INV_LEN: u32 = std::mem::size_of::<IommuHwptVtdS1Invalidate>() as u32;

/// `iommufd_ioas/alloc_hwpt_nested` without the mock driver: the allocation errors, the
/// nest-parent rules, EBUSY while referenced, and the invalidation error matrix with
/// partial success.
#[test]
fn alloc_hwpt_nested() {
    let host = Host::new();
    let ram = host.ram();
    let Opened {
        fds: _fds,
        f,
        dev: _dev,
        dev_id,
        ioas,
        ..
    } = host.open(&ram);
    let parent = hwpt_alloc(&*f, dev_id, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT).unwrap();
    let not_parent = hwpt_alloc(&*f, dev_id, ioas, 0).unwrap();
    let data = s1(GUEST_PT.0, 0).to_bytes();
    let vtd = IOMMU_HWPT_DATA_VTD_S1;
    let na = |pt, flags, ty, data: &[u8], uptr| {
        nested_alloc(&*f, &ram, (dev_id, pt), flags, ty, data, uptr)
    };

    host.refused(&f, Errno::EINVAL, || {
        na(parent, 0, IOMMU_HWPT_DATA_NONE, &data, None)
    });
    host.refused(&f, Errno::EOPNOTSUPP, || na(parent, 0, 99, &data, None));
    host.refused(&f, Errno::EINVAL, || {
        na(parent, 0, vtd, &data[..VTD_S1_LEN - 1], None)
    });
    host.refused(&f, Errno::EFAULT, || na(parent, 0, vtd, &data, Some(0)));
    host.refused(&f, Errno::EOPNOTSUPP, || {
        na(parent, IOMMU_HWPT_ALLOC_NEST_PARENT, vtd, &data, None)
    });
    host.refused(&f, Errno::EINVAL, || na(not_parent, 0, vtd, &data, None));
    host.refused(&f, Errno::ENOENT, || {
        na(parent, IOMMU_HWPT_FAULT_ID_VALID, vtd, &data, None)
    });
    host.refused(&f, Errno::EOPNOTSUPP, || {
        na(parent, 0, vtd, &s1(GUEST_PT.0, 1 << 3).to_bytes(), None)
    });
    let mut long = data.clone();
    long.push(1);
    host.refused(&f, Errno::E2BIG, || na(parent, 0, vtd, &long, None));
    long[VTD_S1_LEN] = 0;
    let n0 = na(parent, 0, vtd, &long, None).unwrap();
    let n1 = na(parent, 0, vtd, &data, None).unwrap();
    host.refused(&f, Errno::EINVAL, || na(n0, 0, vtd, &data, None));
    host.refused(&f, Errno::EBUSY, || destroy(&*f, parent));

    // The invalidation matrix (entry_num written back 0 on each refusal).
    let ok = [inv(0, 1, 0)];
    let hv = IOMMU_HWPT_INVALIDATE_DATA_VTD_S1;
    assert_eq!(
        invalidate(&*f, &ram, parent, hv, INV_LEN, &ok, None).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        invalidate(&*f, &ram, n0, hv, INV_LEN, &[], None),
        (Ok(()), 0)
    );
    assert_eq!(
        invalidate(&*f, &ram, n0, 9, INV_LEN, &ok, None),
        (Err(Errno::EINVAL), 0)
    );
    assert_eq!(
        invalidate(&*f, &ram, n0, hv, 1, &ok, None),
        (Err(Errno::EINVAL), 0)
    );
    assert_eq!(
        invalidate(&*f, &ram, n0, hv, 0, &ok, None),
        (Err(Errno::EINVAL), 0)
    );
    assert_eq!(
        invalidate(&*f, &ram, n0, hv, INV_LEN, &ok, Some(0)),
        (Err(Errno::EINVAL), 0)
    );
    assert_eq!(
        invalidate(&*f, &ram, n0, hv, INV_LEN, &[inv(0, 1, 1 << 1)], None),
        (Err(Errno::EOPNOTSUPP), 0)
    );
    assert_eq!(
        invalidate(&*f, &ram, n0, hv, INV_LEN, &[inv(0x800, 1, 0)], None),
        (Err(Errno::EINVAL), 0)
    );
    assert_eq!(
        invalidate(&*f, &ram, n0, hv, INV_LEN, &[inv(PAGE, u64::MAX, 0)], None),
        (Err(Errno::EINVAL), 0)
    );
    assert_eq!(
        invalidate(
            &*f,
            &ram,
            n0,
            hv,
            INV_LEN,
            &[inv(0, 1, 0), inv(0, 1, 1 << 4)],
            None
        ),
        (Err(Errno::EOPNOTSUPP), 1),
        "partial success reports the entries handled"
    );
    assert_eq!(
        invalidate(
            &*f,
            &ram,
            n0,
            hv,
            INV_LEN + 8,
            &[inv(0, 2, IOMMU_VTD_INV_FLAGS_LEAF), inv(0, u64::MAX, 0)],
            None
        ),
        (Ok(()), 2)
    );
    // An array running past the end of the VMM's memory: the entries before the first
    // that does not lie in it are handled (the reads go a chunk at a time).
    assert_eq!(
        invalidate(
            &*f,
            &ram,
            n0,
            hv,
            INV_LEN,
            &[inv(0, 1, 0); 4],
            Some(ram.vaddr + RAM - 2 * u64::from(INV_LEN))
        ),
        (Err(Errno::EFAULT), 2)
    );
    // Entries longer than a chunk: their tails are checked all the way.
    let big = 5000;
    assert_eq!(
        invalidate(&*f, &ram, n0, hv, big, &[inv(0, 1, 0); 3], None),
        (Ok(()), 3)
    );
    // The same array, its second entry's last byte set.
    ram.mem
        .write_slice(&[1], GuestAddress(SCRATCH + 2 * u64::from(big) - 1))
        .unwrap();
    let mut c = IommuHwptInvalidate {
        size: 32,
        hwpt_id: n0,
        data_uptr: ram.vaddr + SCRATCH,
        data_type: hv,
        entry_len: big,
        entry_num: 3,
        __reserved: 0,
    }
    .to_bytes();
    assert_eq!(
        f.ioctl(IOMMU_HWPT_INVALIDATE, &mut c).map(|_| ()),
        Err(Errno::E2BIG)
    );
    assert_eq!(
        read_prefix::<IommuHwptInvalidate>(&c, c.len()).entry_num,
        1,
        "the entry before the one with a non-zero tail is handled"
    );
    assert_eq!(
        invalidate(&*f, &ram, 1000, hv, INV_LEN, &ok, None).0,
        Err(Errno::ENOENT)
    );

    destroy(&*f, n0).unwrap();
    destroy(&*f, n1).unwrap();
    destroy(&*f, parent).unwrap();
}

/// `iommufd_device_pasid/pasid_attach` without the mock driver, and a device that DMAs
/// through a nested HWPT attached at a PASID: the guest's table over the IOAS, replaced
/// mappings reached only after `IOMMU_HWPT_INVALIDATE`, nothing after the detach.
#[test]
fn pasid_attach_and_nested_dma() {
    let host = Host::new();
    let ram = host.ram();
    let engine = host.engine(SID, FEATURES);
    let dids = host.unit.domain_ids_in_use();
    let Opened {
        fds,
        fd,
        f,
        dev,
        dev_id,
        ioas,
    } = host.open(&ram);
    let parent = hwpt_alloc(
        &*f,
        dev_id,
        ioas,
        IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID,
    )
    .unwrap();
    let no_pasid = hwpt_alloc(&*f, dev_id, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT).unwrap();
    let mut guest = GuestTables::new(&ram, &[(GVA, 0x10000), (GVA + PAGE, 0x11000)]);
    let root = guest.t.root();
    let vtd = IOMMU_HWPT_DATA_VTD_S1;
    let na = |pt, flags, data: IommuHwptVtdS1| {
        nested_alloc(&*f, &ram, (dev_id, pt), flags, vtd, &data.to_bytes(), None)
    };
    let n0 = na(parent, IOMMU_HWPT_ALLOC_PASID, s1(root, 0)).unwrap();
    let n1 = na(parent, IOMMU_HWPT_ALLOC_PASID, s1(root, IOMMU_VTD_S1_WPE)).unwrap();
    let n_nopasid = na(parent, 0, s1(root, 0)).unwrap();

    detach_pasid(&dev, 5).unwrap();
    host.refused(&f, Errno::EINVAL, || attach_pasid(&dev, 5, n0));
    attach(&dev, no_pasid).unwrap();
    host.refused(&f, Errno::EINVAL, || attach_pasid(&dev, 5, n0));
    attach(&dev, parent).unwrap();
    host.refused(&f, Errno::EINVAL, || attach_pasid(&dev, 5, ioas));
    host.refused(&f, Errno::EINVAL, || attach_pasid(&dev, 5, parent));
    host.refused(&f, Errno::EINVAL, || attach_pasid(&dev, 5, n_nopasid));
    host.refused(&f, Errno::EINVAL, || attach_pasid(&dev, 0, n0));
    host.refused(&f, Errno::EINVAL, || attach_pasid(&dev, 1 << 20, n0));
    host.refused(&f, Errno::ENOENT, || attach_pasid(&dev, 5, 1000));
    let p5 = Pasid::new(5).unwrap();
    assert_eq!(host.unit.pasid_entry(SID, p5), None);

    assert_eq!(attach_pasid(&dev, 5, n0).unwrap(), n0);
    let e0 = host.unit.pasid_entry(SID, p5).unwrap();
    assert_eq!((e0.flptptr, e0.wpe), (root, false));
    dma_fill_pasid(&engine, 5, GVA, 64, 0x5a5a_5a5a_5a5a_5a5a);
    assert_eq!(ram.read(0x10000, 8), vec![0x5a; 8]);

    host.refused(&f, Errno::EBUSY, || destroy(&*f, n0));
    host.refused(&f, Errno::EBUSY, || destroy(&*f, parent));
    host.refused(&f, Errno::EINVAL, || attach(&dev, no_pasid));
    host.refused(&f, Errno::EOPNOTSUPP, || attach(&dev, n1));
    host.refused(&f, Errno::EBUSY, || detach(&dev));

    // The guest moves GVA to another page: reached after the invalidation.
    guest.unmap(&ram, GVA);
    guest.map(&ram, GVA, 0x12000);
    let hv = IOMMU_HWPT_INVALIDATE_DATA_VTD_S1;
    assert_eq!(
        invalidate(&*f, &ram, n0, hv, INV_LEN, &[inv(GVA, 1, 0)], None),
        (Ok(()), 1)
    );
    dma_fill_pasid(&engine, 5, GVA, 64, 0x6b6b_6b6b_6b6b_6b6b);
    assert_eq!(ram.read(0x12000, 8), vec![0x6b; 8]);
    assert_eq!(ram.read(0x10000, 8), vec![0x5a; 8]);

    // Replace n0 -> n1 at the PASID: one entry rewrite, WPE now set; n0 is free.
    assert_eq!(attach_pasid(&dev, 5, n1).unwrap(), n1);
    assert!(host.unit.pasid_entry(SID, p5).unwrap().wpe);
    destroy(&*f, n0).unwrap();
    dma_fill_pasid(&engine, 5, GVA + PAGE, 8, 0x7c7c_7c7c_7c7c_7c7c);
    assert_eq!(ram.read(0x11000, 8), vec![0x7c; 8]);
    // An invalidation of n1 reaches the PASID the replace moved to it.
    guest.unmap(&ram, GVA + PAGE);
    guest.map(&ram, GVA + PAGE, 0x13000);
    assert_eq!(
        invalidate(&*f, &ram, n1, hv, INV_LEN, &[inv(GVA + PAGE, 1, 0)], None),
        (Ok(()), 1)
    );
    dma_fill_pasid(&engine, 5, GVA + PAGE, 8, 0x3e3e_3e3e_3e3e_3e3e);
    assert_eq!(ram.read(0x13000, 8), vec![0x3e; 8]);
    assert_eq!(ram.read(0x11000, 8), vec![0x7c; 8]);

    detach_pasid(&dev, 5).unwrap();
    assert_eq!(host.unit.pasid_entry(SID, p5), None);
    dma_fill_pasid(&engine, 5, GVA + PAGE, 8, 0x0d0d_0d0d_0d0d_0d0d);
    assert_eq!(
        (ram.read(0x13000, 8), ram.read(0x11000, 8)),
        (vec![0x3e; 8], vec![0x7c; 8]),
        "DMA after the PASID detach reached memory"
    );

    attach_pasid(&dev, 7, n1).unwrap();
    drop(dev);
    fds.close(fd);
    drop(f);
    assert_eq!(host.unit.attached_devices(), 0);
    assert_eq!(host.unit.domain_ids_in_use(), dids);
}

/// `iommufd_ioas/get_hw_info`: the unit's own CAP/ECAP, exact, larger (tail zeroed),
/// smaller (truncated) and empty buffers, the input type rule, an unknown device.
#[test]
fn get_hw_info() {
    let host = Host::new();
    let ram = host.ram();
    let fds = Iommufds::new();
    let (fd, f) = fds.open(&host.unit);
    let dev = VfioDeviceFile::open(SID, fds.clone());
    let dev_id = bind(&dev, fd).unwrap();
    let cap = host.hw.mmio_read(0x08, 8).unwrap();
    let ecap = host.hw.mmio_read(0x10, 8).unwrap();
    let call = |flags, dev_id, data_type, data_len: u32| {
        ram.mem
            .write_slice(&[0xffu8; 64], GuestAddress(SCRATCH))
            .unwrap();
        let mut c = hw_info(40, flags, dev_id, data_type);
        c.data_len = data_len;
        c.data_uptr = ram.vaddr + SCRATCH;
        let out = io(&*f, IOMMU_GET_HW_INFO, &c)?;
        Ok::<_, Errno>((out, ram.read(SCRATCH, 64)))
    };
    let (out, buf) = call(0, dev_id, 0, 24).unwrap();
    assert_eq!(hw_info_data_type(&out), IOMMU_HW_INFO_TYPE_INTEL_VTD);
    assert_eq!(out.data_len, 24);
    let vtd: IommuHwInfoVtd = read_prefix(&buf, 24);
    assert_eq!((vtd.cap_reg, vtd.ecap_reg), (cap, ecap));
    assert_eq!(&buf[24..], &[0xff; 40][..], "past data_len untouched");
    assert!(out.out_max_pasid_log2 > 0 && out.out_max_pasid_log2 <= 20);
    let (_, buf) = call(0, dev_id, 0, 40).unwrap();
    assert_eq!(
        &buf[24..40],
        &[0; 16][..],
        "the tail of a larger buffer is zeroed"
    );
    let (_, buf) = call(0, dev_id, 0, 8).unwrap();
    assert_eq!(&buf[..8], &vtd.to_bytes()[..8]);
    assert_eq!(&buf[8..], &[0xff; 56][..]);
    call(0, dev_id, 0, 0).unwrap();
    call(
        IOMMU_HW_INFO_FLAG_INPUT_TYPE,
        dev_id,
        IOMMU_HW_INFO_TYPE_INTEL_VTD,
        24,
    )
    .unwrap();
    assert_eq!(
        call(IOMMU_HW_INFO_FLAG_INPUT_TYPE, dev_id, 2, 24).unwrap_err(),
        Errno::EOPNOTSUPP
    );
    assert_eq!(call(1 << 5, dev_id, 0, 24).unwrap_err(), Errno::EOPNOTSUPP);
    assert_eq!(call(0, dev_id + 1, 0, 24).unwrap_err(), Errno::ENOENT);
}

/// `alloc_hwpt_nested`'s fault steps and `pasid_attach`'s IOPF at a PASID, with a real
/// page request: a device faults on a guest page that is not present, the VMM reads one
/// whole group from the fault queue file, maps the page and answers with the cookie, and
/// the device's retried DMA lands. Unknown cookies and partial records are EINVAL.
#[test]
fn fault_queue_round_trip() {
    let host = Host::new();
    let ram = host.ram();
    let engine = host.engine(SID, FEATURES | CTRL_PRI_EN);
    let Opened {
        fds,
        f,
        dev,
        dev_id,
        ioas,
        ..
    } = host.open(&ram);
    let parent = hwpt_alloc(
        &*f,
        dev_id,
        ioas,
        IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID,
    )
    .unwrap();
    attach(&dev, parent).unwrap();
    let mut guest = GuestTables::new(&ram, &[(GVA, 0x10000)]);
    let root = guest.t.root();

    let alloc = IommuFaultAlloc {
        size: 16,
        ..Default::default()
    };
    assert_eq!(
        io(
            &*IommufdFile::open(&host.unit),
            IOMMU_FAULT_QUEUE_ALLOC,
            &alloc
        )
        .unwrap_err(),
        Errno::EMFILE
    );
    host.refused(&f, Errno::EOPNOTSUPP, || {
        io(
            &*f,
            IOMMU_FAULT_QUEUE_ALLOC,
            &IommuFaultAlloc { flags: 1, ..alloc },
        )
    });
    let out = io(&*f, IOMMU_FAULT_QUEUE_ALLOC, &alloc).unwrap();
    let queue = fds.fault(out.out_fault_fd as i32).unwrap();
    let data = s1(root, 0).to_bytes();
    let vtd = IOMMU_HWPT_DATA_VTD_S1;
    let iopf_flags = IOMMU_HWPT_ALLOC_PASID | IOMMU_HWPT_FAULT_ID_VALID;
    let alloc_iopf = |fault_id| {
        let uptr = scratch(&ram, &data);
        let c = IommuHwptAlloc {
            size: 48,
            flags: iopf_flags,
            dev_id,
            pt_id: parent,
            data_type: vtd,
            data_len: data.len() as u32,
            data_uptr: uptr,
            fault_id,
            ..Default::default()
        };
        io(&*f, IOMMU_HWPT_ALLOC, &c).map(|c| c.out_hwpt_id)
    };
    host.refused(&f, Errno::ENOENT, || alloc_iopf(u32::MAX));
    host.refused(&f, Errno::ENOENT, || alloc_iopf(parent));
    let iopf = alloc_iopf(out.out_fault_id).unwrap();
    host.refused(&f, Errno::EBUSY, || destroy(&*f, out.out_fault_id));
    attach_pasid(&dev, 9, iopf).unwrap();

    let mut rec = [0u8; 40];
    assert_eq!(queue.read(&mut rec).unwrap_err(), Errno::EAGAIN);
    // A write to a page the guest has not mapped: the device asks and waits.
    let missing = GVA + 4 * PAGE;
    let desc = Descriptor {
        pasid: Some(Pasid::new(9).unwrap()),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::None,
        op: Operation::Fill {
            pattern: 0x4242_4242_4242_4242,
            dst: missing,
            size: 8,
        },
    };
    engine.portal_write(0, &desc.encode()).unwrap();
    engine.process();
    host.unit.service_page_requests();
    assert_eq!(engine.waiting_for_page_response(), 1);
    assert_eq!(queue.read(&mut [0u8; 39]).unwrap_err(), Errno::EINVAL);
    assert_eq!(queue.read(&mut rec).unwrap(), 40);
    let fault: IommuHwptPgfault = read_prefix(&rec, 40);
    assert_eq!(
        (fault.dev_id, fault.pasid, fault.addr),
        (dev_id, 9, missing)
    );
    assert_eq!(
        fault.flags,
        IOMMU_PGFAULT_FLAGS_PASID_VALID | IOMMU_PGFAULT_FLAGS_LAST_PAGE
    );
    assert!(fault.perm & IOMMU_PGFAULT_PERM_WRITE != 0);
    assert_eq!(queue.read(&mut rec).unwrap_err(), Errno::EAGAIN);

    let response = |cookie, code| IommuHwptPageResponse { cookie, code }.to_bytes();
    assert_eq!(
        queue
            .write(&response(fault.cookie + 1, IOMMUFD_PAGE_RESP_SUCCESS))
            .unwrap_err(),
        Errno::EINVAL
    );
    assert_eq!(queue.write(&[0u8; 7]).unwrap_err(), Errno::EINVAL);
    assert_eq!(
        queue.write(&response(fault.cookie, 7)).unwrap_err(),
        Errno::EINVAL,
        "an unknown response code"
    );
    guest.map(&ram, missing, 0x20000);
    assert_eq!(
        queue
            .write(&response(fault.cookie, IOMMUFD_PAGE_RESP_SUCCESS))
            .unwrap(),
        8
    );
    engine.process();
    assert_eq!(engine.waiting_for_page_response(), 0);
    assert_eq!(ram.read(0x20000, 8), vec![0x42; 8]);
    assert_eq!(
        queue
            .write(&response(fault.cookie, IOMMUFD_PAGE_RESP_SUCCESS))
            .unwrap_err(),
        Errno::EINVAL,
        "a group is answered once"
    );

    // A group of two page requests is read whole: a buffer for one record is EINVAL.
    for (page, last) in [(8, false), (9, true)] {
        DmaPort::page_request(
            &**host.unit.hardware(),
            PageRequestMessage {
                sid: SID,
                pasid: Some(Pasid::new(9).unwrap()),
                addr: GVA + page * PAGE,
                access: DmaAccess {
                    read: true,
                    ..Default::default()
                },
                prgi: 7,
                last,
            },
        );
    }
    host.unit.service_page_requests();
    assert_eq!(queue.read(&mut rec).unwrap_err(), Errno::EINVAL);
    let mut two = [0u8; 80];
    assert_eq!(queue.read(&mut two).unwrap(), 80);
    let (first, second): (IommuHwptPgfault, IommuHwptPgfault) =
        (read_prefix(&two, 40), read_prefix(&two[40..], 40));
    assert_eq!(
        (first.addr, second.addr, first.cookie),
        (GVA + 8 * PAGE, GVA + 9 * PAGE, second.cookie)
    );
    assert_eq!(
        second.flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE,
        IOMMU_PGFAULT_FLAGS_LAST_PAGE
    );

    detach_pasid(&dev, 9).unwrap();
    destroy(&*f, iopf).unwrap();
    destroy(&*f, out.out_fault_id).unwrap();
}
