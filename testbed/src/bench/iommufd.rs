//! The iommufd uAPI's nested paths (issue 11), each call made through the byte-level
//! [`UapiFile`] ioctls of `/dev/iommu` and of a VFIO device cdev, on the host VT-d driver
//! and the physical IOMMU, with a DMA engine as the device:
//!
//! - [`NestedAttach`]: `IOMMU_HWPT_ALLOC` of a nested HWPT and its attach at a PASID
//!   (the detach and `IOMMU_DESTROY` that keep the loop steady are untimed); baseline
//!   [`HwInfoPair`], two `IOMMU_GET_HW_INFO` calls: the same number of ioctls with no
//!   hardware work.
//! - [`HwptInvalidate`]: `IOMMU_HWPT_INVALIDATE` of 1 and of 64 stage-1 entries, each
//!   against an IOTLB holding the pages it removes and others it must keep; the 64 are
//!   neighbouring pages (one block) or every other page (64 blocks: 128 descriptors).
//! - [`FaultRoundTrip`]: a device write to a page the guest has not mapped, read from the
//!   fault queue file, the page mapped and the response written, the retried write landed;
//!   baseline [`ResidentFill`], the same write to a mapped page.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_host::driver::HostIommu;
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::iommufd::fault::FaultFile;
use vsva_host::iommufd::IommufdFile;
use vsva_hw::dma::regs::{CTRL_ATS_EN, CTRL_PASID_EN, CTRL_PRI_EN};
use vsva_hw::dma::{CompletionRequest, Descriptor, DmaEngine, DmaEngineConfig, Operation};
use vsva_hw::iommu::{Iommu, IommuConfig, Source};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory, memory::PAGE_SIZE};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{error::Errno, file::UapiFile};
use vsva_vtd::{
    addr::Gpa, addr::Pasid, addr::SourceId, builder::FrameSource, builder::MapFlags,
    builder::PageTableBuilder, builder::TableFormat, flpte::FlPagingMode, walk::AccessRequest,
    walk::PageSize,
};

use super::translate::timer_overhead;
use super::{BenchError, Workload};

const SID: SourceId = SourceId::from_rid(0x0038);
/// The VM's RAM.
const RAM: u64 = 4 << 20;
/// Guest RAM the guest's first-level tables are taken from.
const GUEST_PT: (u64, u64) = (0x20_0000, 0x28_0000);
/// Where the arguments passed by pointer (stage-1 data, invalidation arrays) live.
const SCRATCH: u64 = RAM - 16 * PAGE_SIZE;
/// The guest's pages: GVA [`GVA`] + i pages maps GPA [`DATA`] + i pages.
const GVA: u64 = 0x4000_0000;
const DATA: u64 = 0x10_0000;
/// Pages the guest maps; the invalidations remove some, keep the rest.
const PAGES: u64 = 128;
/// The page the fault round trip writes: mapped only in answer to its fault.
const FAULT_GVA: u64 = GVA + PAGES * PAGE_SIZE;
const FAULT_GPA: u64 = DATA + PAGES * PAGE_SIZE;
/// The PASID the invalidation and fault workloads' nested HWPT is attached at; the attach
/// workload uses the next.
const PASID: u32 = 9;
/// Entries the batched invalidation carries.
pub const BATCH: u64 = 64;

fn errno(what: &'static str) -> impl Fn(Errno) -> BenchError {
    move |e| BenchError::Check(format!("{what}: {e:?}"))
}

/// `ioctl` with a structure in and out.
fn io<T: Wire>(f: &dyn UapiFile, cmd: u32, v: &T, what: &'static str) -> Result<T, BenchError> {
    let mut b = v.to_bytes();
    f.ioctl(cmd, &mut b).map_err(errno(what))?;
    Ok(read_prefix(&b, b.len()))
}

/// Guest page-table frames handed out from [`GUEST_PT`].
struct GuestFrames {
    next: u64,
}

impl FrameSource for GuestFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        (self.next < GUEST_PT.1).then(|| {
            self.next += PAGE_SIZE;
            self.next - PAGE_SIZE
        })
    }

    fn free_table(&mut self, _frame: u64) {}
}

/// A guest process's first-level tables, in guest RAM.
struct GuestTables {
    t: PageTableBuilder,
    f: GuestFrames,
}

impl GuestTables {
    fn map(&mut self, ram: &GuestMemoryMmap, gva: u64, gpa: u64) -> Result<(), BenchError> {
        let flags = MapFlags::READ | MapFlags::WRITE | MapFlags::USER;
        Ok(self
            .t
            .map(ram, &mut self.f, gva, gpa, PageSize::Size4K, flags)?)
    }

    /// Whether `gva` was mapped.
    fn unmap(&mut self, ram: &GuestMemoryMmap, gva: u64) -> Result<bool, BenchError> {
        Ok(self.t.unmap(ram, gva, PageSize::Size4K)?)
    }
}

/// A VMM on iommufd: its RAM mapped in an IOAS, a nest-parent HWPT its device is attached
/// to, and a nested HWPT over the guest's tables attached at `PASID`, its page requests
/// going to a fault queue.
pub struct IommufdVm {
    mem: Arc<HostMemory>,
    frames: Arc<FrameAllocator>,
    hw: Arc<Iommu>,
    unit: Arc<HostIommu>,
    ram: GuestMemoryMmap,
    ram_hpa: u64,
    vaddr: u64,
    engine: Arc<DmaEngine>,
    fds: Arc<Iommufds>,
    fd: i32,
    file: Arc<IommufdFile>,
    dev: Option<VfioDeviceFile>,
    dev_id: u32,
    parent: u32,
    nested: u32,
    queue: Arc<FaultFile>,
    guest: RefCell<GuestTables>,
    root: u64,
}

impl IommufdVm {
    /// Sets everything up and checks the device writes through the nested HWPT.
    pub fn new() -> Result<Self, BenchError> {
        let mem = HostMemory::new(32 << 20)?;
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let hw = Iommu::new(mem.clone(), IommuConfig::default())?;
        let unit =
            HostIommu::new(hw.clone(), frames.clone()).map_err(|e| BenchError::Host(e.into()))?;
        let ram_hpa = frames.alloc_range(RAM, 2 << 20)?;
        let ram = mem.guest_memory(&[(Gpa(0), ram_hpa, RAM)])?;
        let vaddr = ram
            .get_host_address(GuestAddress(0))
            .map_err(|e| BenchError::Check(e.to_string()))? as u64;
        let engine = Arc::new(DmaEngine::new(DmaEngineConfig::new(SID), hw.clone())?);
        hw.attach_endpoint(engine.clone());
        engine.enable(CTRL_PASID_EN | CTRL_ATS_EN | CTRL_PRI_EN)?;
        let mut f = GuestFrames { next: GUEST_PT.0 };
        let t = PageTableBuilder::new(
            TableFormat::FirstLevel(FlPagingMode::FourLevel),
            &ram,
            &mut f,
        )?;
        let mut guest = GuestTables { t, f };
        for i in 0..PAGES {
            guest.map(&ram, GVA + i * PAGE_SIZE, DATA + i * PAGE_SIZE)?;
        }

        let fds = Iommufds::new();
        let (fd, file) = fds.open(&unit);
        let dev = VfioDeviceFile::open(SID, fds.clone());
        let f: &dyn UapiFile = &*file;
        let bind = VfioDeviceBindIommufd {
            argsz: 24,
            iommufd: fd,
            ..Default::default()
        };
        let dev_id = io(&dev, VFIO_DEVICE_BIND_IOMMUFD, &bind, "bind")?.out_devid;
        let alloc = IommuIoasAlloc {
            size: 12,
            ..Default::default()
        };
        let ioas = io(f, IOMMU_IOAS_ALLOC, &alloc, "IOAS_ALLOC")?.out_ioas_id;
        let map = IommuIoasMap {
            size: 40,
            flags: IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_FIXED_IOVA,
            ioas_id: ioas,
            user_va: vaddr,
            length: RAM,
            iova: 0,
            ..Default::default()
        };
        io(f, IOMMU_IOAS_MAP, &map, "IOAS_MAP")?;
        let hwpt = IommuHwptAlloc {
            size: 48,
            flags: IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID,
            dev_id,
            pt_id: ioas,
            ..Default::default()
        };
        let parent = io(f, IOMMU_HWPT_ALLOC, &hwpt, "HWPT_ALLOC parent")?.out_hwpt_id;
        let attach = VfioDeviceAttachIommufdPt {
            argsz: 16,
            pt_id: parent,
            ..Default::default()
        };
        io(&dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach, "attach")?;
        let fault = IommuFaultAlloc {
            size: 16,
            ..Default::default()
        };
        let fault = io(f, IOMMU_FAULT_QUEUE_ALLOC, &fault, "FAULT_QUEUE_ALLOC")?;
        let queue = fds
            .fault(fault.out_fault_fd as i32)
            .ok_or_else(|| BenchError::Check("no fault queue file".into()))?;
        let mut vm = IommufdVm {
            mem,
            frames,
            hw,
            unit,
            ram,
            ram_hpa: ram_hpa.0,
            vaddr,
            engine,
            fds,
            fd,
            file,
            dev: Some(dev),
            dev_id,
            parent,
            nested: 0,
            queue,
            root: guest.t.root(),
            guest: RefCell::new(guest),
        };
        vm.nested = vm.nested_alloc(
            IOMMU_HWPT_ALLOC_PASID | IOMMU_HWPT_FAULT_ID_VALID,
            fault.out_fault_id,
        )?;
        vm.attach_pasid(PASID, vm.nested)?;
        vm.fill(GVA, 0x5a5a_5a5a_5a5a_5a5a)?;
        if vm.read(DATA)? != 0x5a5a_5a5a_5a5a_5a5a {
            return Err(BenchError::Check(
                "the device's write through the nested HWPT did not land".into(),
            ));
        }
        Ok(vm)
    }

    fn dev(&self) -> Result<&VfioDeviceFile, BenchError> {
        self.dev
            .as_ref()
            .ok_or_else(|| BenchError::Check("no device".into()))
    }

    /// Puts `bytes` in the scratch area; returns their user address.
    fn scratch(&self, bytes: &[u8]) -> Result<u64, BenchError> {
        self.ram
            .write_slice(bytes, GuestAddress(SCRATCH))
            .map_err(|e| BenchError::Check(e.to_string()))?;
        Ok(self.vaddr + SCRATCH)
    }

    fn read(&self, gpa: u64) -> Result<u64, BenchError> {
        self.ram
            .read_obj(GuestAddress(gpa))
            .map_err(|e| BenchError::Check(e.to_string()))
    }

    /// The `IOMMU_HWPT_ALLOC` argument of a nested HWPT over the guest's tables, its
    /// stage-1 data put in the scratch area.
    fn nested_arg(&self, flags: u32, fault_id: u32) -> Result<IommuHwptAlloc, BenchError> {
        let s1 = IommuHwptVtdS1 {
            flags: 0,
            pgtbl_addr: self.root,
            addr_width: 48,
            __reserved: 0,
        }
        .to_bytes();
        Ok(IommuHwptAlloc {
            size: 48,
            flags,
            dev_id: self.dev_id,
            pt_id: self.parent,
            data_type: IOMMU_HWPT_DATA_VTD_S1,
            data_len: s1.len() as u32,
            data_uptr: self.scratch(&s1)?,
            fault_id,
            ..Default::default()
        })
    }

    fn nested_alloc(&self, flags: u32, fault_id: u32) -> Result<u32, BenchError> {
        let arg = self.nested_arg(flags, fault_id)?;
        Ok(io(&*self.file, IOMMU_HWPT_ALLOC, &arg, "HWPT_ALLOC nested")?.out_hwpt_id)
    }

    fn attach_pasid(&self, pasid: u32, pt_id: u32) -> Result<(), BenchError> {
        let c = VfioDeviceAttachIommufdPt {
            argsz: 16,
            flags: VFIO_DEVICE_ATTACH_PASID,
            pt_id,
            pasid,
        };
        io(
            self.dev()?,
            VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            &c,
            "attach PASID",
        )?;
        Ok(())
    }

    fn detach_pasid(&self, pasid: u32) -> Result<(), BenchError> {
        let c = VfioDeviceDetachIommufdPt {
            argsz: 12,
            flags: VFIO_DEVICE_DETACH_PASID,
            pasid,
        };
        io(
            self.dev()?,
            VFIO_DEVICE_DETACH_IOMMUFD_PT,
            &c,
            "detach PASID",
        )?;
        Ok(())
    }

    fn destroy(&self, id: u32) -> Result<(), BenchError> {
        io(
            &*self.file,
            IOMMU_DESTROY,
            &IommuDestroy { size: 8, id },
            "DESTROY",
        )?;
        Ok(())
    }

    fn pasid(raw: u32) -> Result<Pasid, BenchError> {
        Pasid::new(raw).map_err(|e| BenchError::Check(format!("PASID {raw}: {e}")))
    }

    /// The device writes 8 bytes of `pattern` at `gva` with [`PASID`], waiting for a page
    /// response if it faults.
    fn portal_fill(&self, gva: u64, pattern: u64) -> Result<(), BenchError> {
        let desc = Descriptor {
            pasid: Some(Self::pasid(PASID)?),
            privileged: false,
            block_on_fault: true,
            completion: CompletionRequest::None,
            op: Operation::Fill {
                pattern,
                dst: gva,
                size: 8,
            },
        };
        self.engine.portal_write(0, &desc.encode())?;
        self.engine.process();
        Ok(())
    }

    fn fill(&self, gva: u64, pattern: u64) -> Result<(), BenchError> {
        self.portal_fill(gva, pattern)?;
        if self.engine.waiting_for_page_response() != 0 {
            return Err(BenchError::Check(format!("the fill of {gva:#x} faulted")));
        }
        Ok(())
    }

    /// Translates `gva` with [`PASID`] as the device would.
    fn translate(&self, gva: u64) -> Result<(u64, Source), BenchError> {
        let m = self
            .hw
            .translate(SID, Some(Self::pasid(PASID)?), gva, AccessRequest::READ)?;
        Ok((m.hpa, m.source))
    }

    /// `IOMMU_HWPT_INVALIDATE` argument bytes for `entries` put in the scratch area.
    fn invalidate_arg(&self, entries: &[IommuHwptVtdS1Invalidate]) -> Result<Vec<u8>, BenchError> {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_bytes()).collect();
        Ok(IommuHwptInvalidate {
            size: 32,
            hwpt_id: self.nested,
            data_uptr: self.scratch(&bytes)?,
            data_type: IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
            entry_len: std::mem::size_of::<IommuHwptVtdS1Invalidate>() as u32,
            entry_num: entries.len() as u32,
            __reserved: 0,
        }
        .to_bytes())
    }
}

impl Drop for IommufdVm {
    fn drop(&mut self) {
        self.dev = None;
        self.fds.close(self.fd);
        self.mem.release_guest_memory(&self.ram);
        if let Err(e) = self.frames.free(vsva_vtd::addr::Hpa(self.ram_hpa)) {
            tracing::error!("bench: freeing the iommufd VM's RAM: {e}");
        }
    }
}

/// One operation: `IOMMU_HWPT_ALLOC` of a nested HWPT over the guest's tables and its
/// attach at a PASID of the device (timed), then its detach and `IOMMU_DESTROY`
/// (untimed). Each attach is checked to have written the host PASID entry with the
/// guest's table, each detach to have cleared it, and the file's objects to be as before.
pub struct NestedAttach<'a> {
    vm: &'a IommufdVm,
    arg: Vec<u8>,
    overhead: Duration,
}

impl<'a> NestedAttach<'a> {
    /// Attaches at `PASID + 1`.
    pub fn new(vm: &'a IommufdVm) -> Result<Self, BenchError> {
        Ok(NestedAttach {
            vm,
            arg: vm.nested_arg(IOMMU_HWPT_ALLOC_PASID, 0)?.to_bytes(),
            overhead: timer_overhead(),
        })
    }
}

impl Workload for NestedAttach<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let vm = self.vm;
        let before = vm.file.lock().objects();
        let pasid = PASID + 1;
        let entry = || Ok::<_, BenchError>(vm.unit.pasid_entry(SID, IommufdVm::pasid(pasid)?));
        let dev = vm.dev()?;
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let mut alloc = self.arg.clone();
            let mut attach = VfioDeviceAttachIommufdPt {
                argsz: 16,
                flags: VFIO_DEVICE_ATTACH_PASID,
                pt_id: 0,
                pasid,
            }
            .to_bytes();
            let start = Instant::now();
            vm.file
                .ioctl(IOMMU_HWPT_ALLOC, &mut alloc)
                .map_err(errno("HWPT_ALLOC nested"))?;
            let id = read_prefix::<IommuHwptAlloc>(&alloc, alloc.len()).out_hwpt_id;
            attach[8..12].copy_from_slice(&id.to_le_bytes());
            dev.ioctl(VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut attach)
                .map_err(errno("attach PASID"))?;
            total += start.elapsed().saturating_sub(self.overhead);
            let root = vm.root;
            if entry()?.map(|e| e.flptptr) != Some(root) {
                return Err(BenchError::Check(format!(
                    "attaching HWPT {id} at PASID {pasid} did not write its entry with {root:#x}"
                )));
            }
            vm.detach_pasid(pasid)?;
            vm.destroy(id)?;
            if entry()?.is_some() {
                return Err(BenchError::Check(format!(
                    "detaching PASID {pasid} left its entry"
                )));
            }
        }
        if vm.file.lock().objects() != before {
            return Err(BenchError::Check(
                "the attach loop left objects behind".into(),
            ));
        }
        Ok(total)
    }
}

/// The baseline of [`NestedAttach`]: two `IOMMU_GET_HW_INFO` calls without data, the
/// uAPI path's cost for two ioctls (table dispatch, copy in, device look-up, copy out).
pub struct HwInfoPair<'a> {
    vm: &'a IommufdVm,
    arg: Vec<u8>,
    overhead: Duration,
}

impl<'a> HwInfoPair<'a> {
    /// Calls of `vm`'s file for its device.
    pub fn new(vm: &'a IommufdVm) -> Self {
        HwInfoPair {
            vm,
            arg: hw_info(40, 0, vm.dev_id, 0).to_bytes(),
            overhead: timer_overhead(),
        }
    }
}

impl Workload for HwInfoPair<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let (mut a, mut b) = (self.arg.clone(), self.arg.clone());
            let start = Instant::now();
            let r = self
                .vm
                .file
                .ioctl(IOMMU_GET_HW_INFO, &mut a)
                .and_then(|_| self.vm.file.ioctl(IOMMU_GET_HW_INFO, &mut b));
            total += start.elapsed().saturating_sub(self.overhead);
            r.map_err(errno("GET_HW_INFO"))?;
            let out: IommuHwInfo = read_prefix(&b, b.len());
            if hw_info_data_type(&out) != IOMMU_HW_INFO_TYPE_INTEL_VTD {
                return Err(BenchError::Check("GET_HW_INFO did not answer VT-d".into()));
            }
        }
        Ok(total)
    }
}

/// One operation: an `IOMMU_HWPT_INVALIDATE` of the nested HWPT carrying `n` entries,
/// one page each, every `stride`-th page from `GVA`, timed alone. Before each call
/// (untimed) every one of the `PAGES` pages is in the IOTLB; after it, each page it named
/// must walk again (to the same host address) and every other page must still hit.
pub struct HwptInvalidate<'a> {
    vm: &'a IommufdVm,
    entries: u64,
    stride: u64,
    arg: Vec<u8>,
    /// Every page's host address, from its first translation.
    hpa: Vec<u64>,
    overhead: Duration,
}

impl<'a> HwptInvalidate<'a> {
    /// `entries` entries, `stride` pages apart (all within the `PAGES` pages).
    pub fn new(vm: &'a IommufdVm, entries: u64, stride: u64) -> Result<Self, BenchError> {
        if entries == 0 || stride == 0 || (entries - 1).saturating_mul(stride) >= PAGES {
            return Err(BenchError::Check(format!(
                "{entries} entries {stride} pages apart do not fit in {PAGES} pages"
            )));
        }
        let list: Vec<_> = (0..entries)
            .map(|i| IommuHwptVtdS1Invalidate {
                addr: GVA + i * stride * PAGE_SIZE,
                npages: 1,
                flags: 0,
                __reserved: 0,
            })
            .collect();
        let hpa = (0..PAGES)
            .map(|i| vm.translate(GVA + i * PAGE_SIZE).map(|(h, _)| h))
            .collect::<Result<_, _>>()?;
        Ok(HwptInvalidate {
            vm,
            entries,
            stride,
            arg: vm.invalidate_arg(&list)?,
            hpa,
            overhead: timer_overhead(),
        })
    }

    /// Checks every page translates to its address, walking if it is one of the first
    /// `walked` pages named and hitting the IOTLB otherwise (which leaves every page
    /// cached).
    fn expect(&self, walked: u64) -> Result<(), BenchError> {
        for (i, &hpa) in (0..PAGES).zip(&self.hpa) {
            let gva = GVA + i * PAGE_SIZE;
            let want = if i % self.stride == 0 && i / self.stride < walked {
                Source::Walk
            } else {
                Source::Iotlb
            };
            let (got, source) = self.vm.translate(gva)?;
            if got != hpa || source != want {
                return Err(BenchError::Check(format!(
                    "{gva:#x} translated to {got:#x} from {source:?} after invalidating \
                     {} entries, expected {hpa:#x} from {want:?}",
                    self.entries
                )));
            }
        }
        Ok(())
    }
}

impl Workload for HwptInvalidate<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        // Every page cached: the walks put back what an earlier call removed.
        for i in 0..PAGES {
            self.vm.translate(GVA + i * PAGE_SIZE)?;
        }
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let mut arg = self.arg.clone();
            let start = Instant::now();
            let r = self.vm.file.ioctl(IOMMU_HWPT_INVALIDATE, &mut arg);
            total += start.elapsed().saturating_sub(self.overhead);
            r.map_err(errno("HWPT_INVALIDATE"))?;
            let done = read_prefix::<IommuHwptInvalidate>(&arg, arg.len()).entry_num;
            if u64::from(done) != self.entries {
                return Err(BenchError::Check(format!(
                    "HWPT_INVALIDATE handled {done} of {} entries",
                    self.entries
                )));
            }
            self.expect(self.entries)?;
        }
        Ok(total)
    }
}

/// One operation: the device writes a page the guest has not mapped and waits; the host
/// driver services its page request into the fault queue; the VMM reads the fault record
/// from the queue file, the guest maps the page, the VMM writes the page response with
/// the record's cookie, and the device's retried write lands. All of it is timed. Before
/// each (untimed) the page is unmapped again and invalidated; after each, the record and
/// the landed bytes are checked.
pub struct FaultRoundTrip<'a> {
    vm: &'a IommufdVm,
    unmap: Vec<u8>,
    pattern: u64,
}

impl<'a> FaultRoundTrip<'a> {
    /// Round trips on `vm`'s nested HWPT at `PASID`.
    pub fn new(vm: &'a IommufdVm) -> Result<Self, BenchError> {
        let unmap = vm.invalidate_arg(&[IommuHwptVtdS1Invalidate {
            addr: FAULT_GVA,
            npages: 1,
            flags: 0,
            __reserved: 0,
        }])?;
        Ok(FaultRoundTrip {
            vm,
            unmap,
            pattern: 0x0101_0101_0101_0101,
        })
    }

    /// Makes the fault page not present again (if mapped), in the tables and the IOTLB.
    fn unmap(&mut self) -> Result<(), BenchError> {
        let vm = self.vm;
        if vm.guest.borrow_mut().unmap(&vm.ram, FAULT_GVA)? {
            let mut arg = self.unmap.clone();
            vm.file
                .ioctl(IOMMU_HWPT_INVALIDATE, &mut arg)
                .map_err(errno("HWPT_INVALIDATE"))?;
        }
        Ok(())
    }
}

impl Workload for FaultRoundTrip<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let mut total = Duration::ZERO;
        let mut rec = [0u8; 40];
        for _ in 0..iters {
            self.unmap()?;
            self.pattern = self.pattern.wrapping_add(0x0101_0101_0101_0101);
            let pattern = self.pattern;
            let vm = self.vm;
            let start = Instant::now();
            vm.portal_fill(FAULT_GVA, pattern)?;
            vm.unit.service_page_requests();
            let read = vm.queue.read(&mut rec).map_err(errno("fault read"))?;
            let fault: IommuHwptPgfault = read_prefix(&rec, rec.len());
            vm.guest.borrow_mut().map(&vm.ram, FAULT_GVA, FAULT_GPA)?;
            let response = IommuHwptPageResponse {
                cookie: fault.cookie,
                code: IOMMUFD_PAGE_RESP_SUCCESS,
            }
            .to_bytes();
            vm.queue.write(&response).map_err(errno("page response"))?;
            vm.engine.process();
            total += start.elapsed();
            let landed = vm.read(FAULT_GPA)?;
            if read != rec.len()
                || (fault.dev_id, fault.pasid, fault.addr) != (vm.dev_id, PASID, FAULT_GVA)
                || vm.engine.waiting_for_page_response() != 0
                || landed != pattern
            {
                return Err(BenchError::Check(format!(
                    "fault round trip: record of {read} bytes for device {} PASID {} at \
                     {:#x}, {} requests waiting, {landed:#x} landed (expected {pattern:#x})",
                    fault.dev_id,
                    fault.pasid,
                    fault.addr,
                    vm.engine.waiting_for_page_response()
                )));
            }
        }
        Ok(total)
    }
}

/// The baseline of [`FaultRoundTrip`]: the same device write to a mapped page, whose
/// translation is cached.
pub struct ResidentFill<'a> {
    vm: &'a IommufdVm,
}

impl<'a> ResidentFill<'a> {
    /// Fills of `GVA`.
    pub fn new(vm: &'a IommufdVm) -> Self {
        ResidentFill { vm }
    }
}

impl Workload for ResidentFill<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let mut total = Duration::ZERO;
        for i in 0..iters {
            let start = Instant::now();
            self.vm.fill(GVA, i)?;
            total += start.elapsed();
            if self.vm.read(DATA)? != i {
                return Err(BenchError::Check("the resident fill did not land".into()));
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attach_leaves_nothing_and_its_baseline_answers() {
        let vm = IommufdVm::new().unwrap();
        let dids = vm.unit.domain_ids_in_use();
        NestedAttach::new(&vm).unwrap().run(3).unwrap();
        assert_eq!(vm.unit.domain_ids_in_use(), dids);
        HwInfoPair::new(&vm).run(2).unwrap();
    }

    #[test]
    fn invalidations_remove_exactly_their_pages() {
        let vm = IommufdVm::new().unwrap();
        let walks = || {
            vm.hw
                .stats()
                .walks
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        for (n, stride) in [(1, 1), (BATCH, 1), (BATCH, 2)] {
            let mut w = HwptInvalidate::new(&vm, n, stride).unwrap();
            w.run(1).unwrap();
            let before = walks();
            w.run(2).unwrap();
            assert_eq!(walks() - before, 2 * n);
        }
        assert!(HwptInvalidate::new(&vm, 0, 1).is_err());
        assert!(HwptInvalidate::new(&vm, BATCH, 3).is_err());
        // Claiming the 1-entry call removes two pages fails the check: the second hits.
        let mut w = HwptInvalidate::new(&vm, 1, 1).unwrap();
        w.run(1).unwrap();
        w.entries = 2;
        let e = w.expect(2).unwrap_err().to_string();
        assert!(e.contains("from Iotlb") && e.contains("expected"), "{e}");
    }

    #[test]
    fn fault_round_trips_land_and_the_baseline_fills() {
        let vm = IommufdVm::new().unwrap();
        {
            let mut w = FaultRoundTrip::new(&vm).unwrap();
            w.run(3).unwrap();
            // Without the unmap, the write hits a mapped page: no fault to read.
            let mut rec = [0u8; 40];
            w.vm.portal_fill(FAULT_GVA, 1).unwrap();
            w.vm.unit.service_page_requests();
            assert_eq!(w.vm.queue.read(&mut rec).unwrap_err(), Errno::EAGAIN);
        }
        ResidentFill::new(&vm).run(2).unwrap();
    }
}
