//! The iommufd core, whatever the IOMMU (`drivers/iommu/iommufd/main.c`, `ioas.c`,
//! `hw_pagetable.c`, `device.c`): one open `/dev/iommu` ([`IommufdCtx`]) with its object
//! table (ids from 1, references, EBUSY on destroy), the ioctl dispatch, IOASes and their
//! IOVA spaces, paging HWPTs, device bind and RID attach, and closing.
//!
//! What differs between IOMMUs sits behind [`IommuOps`] (Linux's `iommu_ops`,
//! `iommu_domain_ops` and `iommufd_viommu_ops`): the paging domain, the nested HWPT and
//! its data type, invalidation, `IOMMU_GET_HW_INFO`'s data, the vendor's own objects
//! (vIOMMU, vDEVICE, vEVENT queue) and which ioctls the file serves. The host's VT-d
//! unit ([`super::Vtd`]) and its SMMUv3 ([`super::smmu::Smmu`]) are two configurations.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use vsva_hw::memory::{FrameAllocator, HostMemory};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{error::Errno, error::UapiError, file::EventNotifier, file::UapiFile};
use vsva_vtd::{addr::Pasid, addr::SourceId};

use super::device::{BindTarget, Iommufds, OpenDevices};
use super::fault::{FaultFile, PageResponder};
use super::iopt::{self, Area, Iopt, IOVA_ALIGNMENT};
use super::map_file::{self, FilePages, FileWindows, MemoryFiles};
use super::user::{copy_from_user, copy_to_user};
use super::IommufdError;
use crate::driver::DirtyBitmap;

/// A paging domain as the core drives it (`iommu_domain_ops`): the stage 2 (second
/// level) a paging HWPT holds its IOAS's mappings in.
pub trait PagingDomain: Debug + Send {
    /// Maps `[iova, +length)` to host memory from `hpa`.
    fn map_area(
        &mut self,
        iova: u64,
        hpa: u64,
        length: u64,
        read: bool,
        write: bool,
    ) -> Result<(), IommufdError>;
    /// Unmaps `[iova, +length)`, with its TLB invalidation.
    fn unmap_area(&mut self, iova: u64, length: u64);
    /// The input address width: IOVAs from `1 << width` are reserved in the IOAS.
    fn iova_bits(&self) -> u32;
    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` (`set_dirty_tracking`).
    fn set_dirty(&mut self, enable: bool) -> Result<(), IommufdError>;
    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` (`read_and_clear_dirty`): the dirty pages' bits set.
    fn read_dirty(&mut self, bitmap: &mut DirtyBitmap, no_clear: bool) -> Result<(), IommufdError>;
}

/// What `IOMMU_GET_HW_INFO` reports of an IOMMU.
#[derive(Debug)]
pub struct HwInfo {
    /// The vendor structure's bytes (`iommu_hw_info_vtd`, `iommu_hw_info_arm_smmuv3`).
    pub data: Vec<u8>,
    /// `out_max_pasid_log2`.
    pub max_pasid_log2: u8,
    /// `out_capabilities`.
    pub capabilities: u64,
}

/// The vendor part of an iommufd (`iommu_ops` and `iommufd_viommu_ops`). Its functions
/// are called with the context locked; each checks before its first change.
pub trait IommuOps: Debug + Send + Sized + 'static {
    /// A paging HWPT's domain.
    type Domain: PagingDomain;
    /// A nested HWPT.
    type Nested: Debug + Send;
    /// The vendor's own objects (vIOMMU, vDEVICE, vEVENT queue).
    type Object: Debug + Send;
    /// An object as diagnostics and tests see it.
    type State;
    /// The ioctls the file serves: the argument's size and minimum size, and the handler.
    /// Adding an ioctl is one row here.
    const IOCTLS: &'static [IoctlOp<Self>];
    /// The `IOMMU_HWPT_ALLOC_*` flags a paging HWPT may be allocated with.
    const PAGING_FLAGS: u32;
    /// Whether a nest parent may track dirty pages (NEST_PARENT with DIRTY_TRACKING).
    const DIRTY_NEST_PARENT: bool;
    /// `IOMMU_GET_HW_INFO`'s data type.
    const HW_INFO_TYPE: u32;
    /// For diagnostics.
    const NAME: &'static str;

    /// The VMM's memory, where user pointers resolve.
    fn memory(&self) -> &Arc<HostMemory>;
    /// Where the IOMMU's tables, and the pages of the memory files mapped, come from.
    fn frames(&self) -> &Arc<FrameAllocator>;
    /// The devices of the IOMMU a cdev has bound.
    fn open_devices(&self) -> &OpenDevices;
    /// A new paging domain; with `dirty`, one that tracks dirty pages (EOPNOTSUPP when
    /// the IOMMU cannot).
    fn new_domain(&self, dirty: bool) -> Result<Self::Domain, IommufdError>;
    /// EOPNOTSUPP unless the IOMMU can nest a stage 1 over a paging HWPT.
    fn check_nest_parent(&self) -> Result<(), IommufdError>;
    /// `IOMMU_GET_HW_INFO`'s data, read from the hardware now.
    fn hw_info(&self) -> Result<HwInfo, IommufdError>;
    /// Where the page responses of the file's fault queues go.
    fn responder(&self) -> Arc<dyn PageResponder>;
    /// A vendor object's type name.
    fn kind(o: &Self::Object) -> &'static str;
    /// Whether nested HWPT `n` references object `id`.
    fn nested_refers(n: &Self::Nested, id: u32) -> bool;
    /// Whether vendor object `o` references object `id`.
    fn object_refers(o: &Self::Object, id: u32) -> bool;
    /// An object as [`IommufdCtx::objects`] shows it.
    fn state(o: &Object<Self>) -> Self::State;
    /// `IOMMU_HWPT_ALLOC` on `cmd.pt_id`, an object that is not an IOAS: a nested HWPT
    /// (or EINVAL/EOPNOTSUPP for an object that cannot be a parent); its id.
    fn alloc_hwpt_on(ctx: &mut IommufdCtx<Self>, cmd: &IommuHwptAlloc)
        -> Result<u32, IommufdError>;
    /// `IOMMU_HWPT_INVALIDATE` of `cmd.hwpt_id`, whose header the core checked; `done`
    /// counts the entries carried out.
    fn invalidate(
        ctx: &IommufdCtx<Self>,
        cmd: &IommuHwptInvalidate,
        done: &mut u32,
    ) -> Result<(), IommufdError>;
    /// The HWPT a device's RID attaches to for `pt_id`, an object that is not an IOAS.
    fn rid_target(ctx: &IommufdCtx<Self>, dev: &Device, pt_id: u32) -> Result<u32, IommufdError>;
    /// Points device `dev_id`'s RID from HWPT `old` to HWPT `hwpt` in the hardware; a
    /// refusal leaves it where it was.
    fn set_rid(
        ctx: &mut IommufdCtx<Self>,
        dev_id: u32,
        old: Option<u32>,
        hwpt: u32,
    ) -> Result<(), IommufdError>;
    /// Takes device `sid`'s RID out of HWPT `hwpt` (it blocks DMA then).
    fn release_rid(ctx: &mut IommufdCtx<Self>, sid: SourceId, hwpt: u32);
    /// After device `dev_id`'s RID moved.
    fn rid_changed(_ctx: &IommufdCtx<Self>, _dev_id: u32) {}
    /// Attaches (or replaces) `pasid` of device `dev_id` to `pt_id`; the HWPT id.
    fn attach_pasid(
        _ctx: &mut IommufdCtx<Self>,
        _dev_id: u32,
        _pasid: u32,
        _pt_id: u32,
    ) -> Result<u32, IommufdError> {
        Err(IommufdError::not_supported(
            "PASID attach",
            "the guest's CD table holds the SubstreamIDs",
        ))
    }
    /// Detaches `pasid` of device `dev_id`.
    fn detach_pasid(
        _ctx: &mut IommufdCtx<Self>,
        _dev_id: u32,
        _pasid: u32,
    ) -> Result<(), IommufdError> {
        Err(IommufdError::not_supported(
            "PASID detach",
            "the guest's CD table holds the SubstreamIDs",
        ))
    }
    /// Device `dev_id` is being unbound (detached already): what goes with it.
    fn unbound(_ctx: &mut IommufdCtx<Self>, _dev_id: u32) {}
    /// Object `o` was removed (destroyed, or gone with the file).
    fn removed(_ctx: &mut IommufdCtx<Self>, _o: Object<Self>) {}
}

/// A paging HWPT: a domain holding its IOAS's mappings.
#[derive(Debug)]
pub struct HwptPaging<D> {
    pub(crate) ioas: u32,
    pub(crate) domain: D,
    pub(crate) nest_parent: bool,
    /// `IOMMU_HWPT_ALLOC_PASID`: may serve a device whose PASIDs are attached.
    pub(crate) pasid: bool,
    /// Created by attaching a device to the IOAS itself; destroyed with its last device.
    pub(crate) auto: bool,
}

/// A device bound to the file (`struct iommufd_device`).
#[derive(Debug)]
pub struct Device {
    pub(crate) sid: SourceId,
    /// The HWPT its requests without PASID use.
    pub(crate) rid: Option<u32>,
    /// The HWPT of each attached PASID.
    pub(crate) pasids: BTreeMap<Pasid, u32>,
}

/// An object of the file.
#[derive(Debug)]
pub enum Object<V: IommuOps> {
    /// An IOAS: an IOVA space the VMM maps its memory into.
    Ioas(Iopt),
    /// A paging HWPT.
    HwptPaging(HwptPaging<V::Domain>),
    /// A nested HWPT.
    HwptNested(V::Nested),
    /// A bound device.
    Device(Device),
    /// A fault queue.
    Fault(Arc<FaultFile>),
    /// A vendor object.
    Vendor(V::Object),
}

impl<V: IommuOps> Object<V> {
    /// The type name, for errors.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Object::Ioas(_) => "IOAS",
            Object::HwptPaging(_) => "paging HWPT",
            Object::HwptNested(_) => "nested HWPT",
            Object::Device(_) => "device",
            Object::Fault(_) => "fault queue",
            Object::Vendor(o) => V::kind(o),
        }
    }

    /// Whether the object references object `id` (counts in its `users`).
    fn refers(&self, id: u32) -> bool {
        match self {
            Object::HwptPaging(h) => h.ioas == id,
            Object::HwptNested(n) => V::nested_refers(n, id),
            Object::Device(d) => d.rid == Some(id) || d.pasids.values().any(|&h| h == id),
            Object::Vendor(o) => V::object_refers(o, id),
            Object::Ioas(_) | Object::Fault(_) => false,
        }
    }
}

/// The handler of one ioctl: the context, the ioctl's argument description, the bytes.
pub type Handler<V> = fn(&mut IommufdCtx<V>, &Ucmd, &mut [u8]) -> Result<(), IommufdError>;

/// One row of the ioctl table (`struct iommufd_ioctl_op`).
#[derive(Debug)]
pub struct IoctlOp<V: IommuOps> {
    /// The number and sizes.
    pub ucmd: Ucmd,
    /// The handler.
    pub handler: Handler<V>,
}

/// EOPNOTSUPP for a reserved field that is not zero.
pub(crate) fn check_reserved(value: u64, what: &'static str) -> Result<(), IommufdError> {
    if value != 0 {
        return Err(IommufdError::not_supported(
            what,
            "reserved field is not zero",
        ));
    }
    Ok(())
}

/// One open `/dev/iommu`: its objects, on the IOMMU `V` drives.
#[derive(Debug)]
pub struct IommufdCtx<V: IommuOps> {
    pub(crate) ops: V,
    pub(crate) objects: BTreeMap<u32, Object<V>>,
    /// The fd table the file's queue files (fault, vEVENT) are installed in.
    pub(crate) fds: Weak<Iommufds>,
    /// The pages of memory files `IOMMU_IOAS_MAP_FILE` mapped, while an area of an IOAS
    /// maps them.
    pins: Vec<FilePages>,
}

impl<V: IommuOps> IommufdCtx<V> {
    /// Performs one ioctl on its argument bytes (ENOTTY for one the file does not serve).
    pub fn ioctl(&mut self, cmd: u32, arg: &mut [u8]) -> Result<(), IommufdError> {
        let op = V::IOCTLS
            .iter()
            .find(|op| op.ucmd.cmd == cmd)
            .ok_or(IommufdError::UnknownIoctl(cmd))?;
        (op.handler)(self, &op.ucmd, arg)
    }

    /// The objects, by id.
    pub fn objects(&self) -> BTreeMap<u32, V::State> {
        self.objects
            .iter()
            .map(|(&id, o)| (id, V::state(o)))
            .collect()
    }

    /// The lowest free id from 1 (`xa_alloc` with `XA_FLAGS_ALLOC1`).
    pub(crate) fn next_id(&self) -> Result<u32, IommufdError> {
        let mut id = 1u32;
        for &used in self.objects.keys() {
            if used != id {
                break;
            }
            id = id
                .checked_add(1)
                .ok_or(IommufdError::NoSpace("object ids"))?;
        }
        Ok(id)
    }

    pub(crate) fn iopt(&self, id: u32) -> Result<&Iopt, IommufdError> {
        match self.objects.get(&id) {
            Some(Object::Ioas(i)) => Ok(i),
            _ => Err(IommufdError::NoObject { id, want: "IOAS" }),
        }
    }

    fn iopt_mut(&mut self, id: u32) -> Result<&mut Iopt, IommufdError> {
        match self.objects.get_mut(&id) {
            Some(Object::Ioas(i)) => Ok(i),
            _ => Err(IommufdError::NoObject { id, want: "IOAS" }),
        }
    }

    pub(crate) fn device(&self, id: u32) -> Result<&Device, IommufdError> {
        match self.objects.get(&id) {
            Some(Object::Device(d)) => Ok(d),
            _ => Err(IommufdError::NoObject { id, want: "device" }),
        }
    }

    pub(crate) fn device_mut(&mut self, id: u32) -> Option<&mut Device> {
        match self.objects.get_mut(&id) {
            Some(Object::Device(d)) => Some(d),
            _ => None,
        }
    }

    pub(crate) fn paging(&self, id: u32) -> Option<&HwptPaging<V::Domain>> {
        match self.objects.get(&id) {
            Some(Object::HwptPaging(h)) => Some(h),
            _ => None,
        }
    }

    pub(crate) fn paging_mut(&mut self, id: u32) -> Option<&mut HwptPaging<V::Domain>> {
        match self.objects.get_mut(&id) {
            Some(Object::HwptPaging(h)) => Some(h),
            _ => None,
        }
    }

    /// The paging HWPTs built from IOAS `ioas`.
    fn hwpts_of(&self, ioas: u32) -> Vec<u32> {
        self.objects
            .iter()
            .filter_map(|(&id, o)| match o {
                Object::HwptPaging(h) if h.ioas == ioas => Some(id),
                _ => None,
            })
            .collect()
    }

    /// How many objects reference `id` (the kernel's `users` count of an object).
    pub(crate) fn users(&self, id: u32) -> usize {
        self.objects.values().filter(|o| o.refers(id)).count()
    }

    /// Maps `areas` into every domain of `ioas`, all or nothing.
    fn map_into_domains(&mut self, ioas: u32, areas: &[Area]) -> Result<(), IommufdError> {
        let hwpts = self.hwpts_of(ioas);
        let mut done: Vec<(u32, Area)> = Vec::new();
        let mut result = Ok(());
        'all: for &h in &hwpts {
            for a in areas {
                let Some(hwpt) = self.paging_mut(h) else {
                    continue;
                };
                if let Err(e) = hwpt
                    .domain
                    .map_area(a.iova, a.hpa, a.length, a.read, a.write)
                {
                    result = Err(e);
                    break 'all;
                }
                done.push((h, *a));
            }
        }
        if result.is_err() {
            for (h, a) in done {
                if let Some(hwpt) = self.paging_mut(h) {
                    hwpt.domain.unmap_area(a.iova, a.length);
                }
            }
        }
        result
    }

    /// Adds `areas` to IOAS `ioas` and its domains.
    fn add_areas(&mut self, ioas: u32, areas: &[Area]) -> Result<(), IommufdError> {
        self.map_into_domains(ioas, areas)?;
        let i = self.iopt_mut(ioas)?;
        for a in areas {
            i.insert(*a);
        }
        Ok(())
    }

    // ----- Handlers -----

    /// `IOMMU_DESTROY`: ENOENT for an unknown id, EBUSY for an object referenced by
    /// another (an IOAS with HWPTs, a HWPT with devices) or a device (its cdev owns it).
    pub(crate) fn do_destroy(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let cmd: IommuDestroy = u.copy_in(arg)?;
        let id = cmd.id;
        match self.objects.get(&id) {
            None => return Err(IommufdError::NoObject { id, want: "object" }),
            Some(Object::Device(_)) => {
                return Err(IommufdError::Busy(
                    "a device is destroyed by closing its cdev",
                ))
            }
            Some(_) if self.users(id) > 0 => {
                return Err(IommufdError::Busy("the object is in use"))
            }
            Some(_) => {}
        }
        self.remove_object(id);
        Ok(())
    }

    /// Removes an object no other references (a paging HWPT's domain and reservation go
    /// with it, an IOAS's areas and the memory file pages only they mapped; the vendor's
    /// part of others as [`IommuOps::removed`] says).
    pub(crate) fn remove_object(&mut self, id: u32) {
        match self.objects.remove(&id) {
            Some(Object::HwptPaging(h)) => {
                if let Ok(iopt) = self.iopt_mut(h.ioas) {
                    iopt.unreserve(id);
                }
            }
            Some(Object::Ioas(_)) => self.unpin_unused(),
            Some(o) => V::removed(self, o),
            None => {}
        }
    }

    /// Drops the memory file pages no area of an IOAS maps any more (`iopt_release_pages`
    /// with the last area of an `iopt_pages`).
    fn unpin_unused(&mut self) {
        let objects = &self.objects;
        self.pins.retain(|p| {
            objects.values().any(|o| match o {
                Object::Ioas(i) => i.areas().any(|a| p.used_by(a)),
                _ => false,
            })
        });
    }

    /// `IOMMU_FAULT_QUEUE_ALLOC`: flags must be 0 (EOPNOTSUPP); a fault queue object and
    /// its file, installed in the process's fd table (`out_fault_id`, `out_fault_fd`;
    /// EMFILE for a file opened outside one), answering through [`IommuOps::responder`].
    pub(crate) fn do_fault_queue_alloc(
        &mut self,
        u: &Ucmd,
        arg: &mut [u8],
    ) -> Result<(), IommufdError> {
        let mut cmd: IommuFaultAlloc = u.copy_in(arg)?;
        if cmd.flags != 0 {
            return Err(IommufdError::not_supported("iommu_fault_alloc", "flags"));
        }
        let fds = self.fds.upgrade().ok_or(IommufdError::NoFd)?;
        let id = self.next_id()?;
        let file = FaultFile::new(self.ops.responder());
        let fd = fds.install_fault(file.clone());
        self.objects.insert(id, Object::Fault(file));
        cmd.out_fault_id = id;
        cmd.out_fault_fd = fd as u32;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_IOAS_ALLOC`: flags must be 0 (EOPNOTSUPP).
    pub(crate) fn do_ioas_alloc(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasAlloc = u.copy_in(arg)?;
        if cmd.flags != 0 {
            return Err(IommufdError::not_supported("iommu_ioas_alloc", "flags"));
        }
        let id = self.next_id()?;
        self.objects.insert(id, Object::Ioas(Iopt::default()));
        cmd.out_ioas_id = id;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_IOAS_MAP`: the area [`iopt::map_area`] checks, mapped into every domain of
    /// the IOAS (all or none); the IOVA written back.
    pub(crate) fn do_ioas_map(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasMap = u.copy_in(arg)?;
        cmd.iova = self.map_user(&cmd)?;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// Maps what `cmd` names; the IOVA.
    fn map_user(&mut self, cmd: &IommuIoasMap) -> Result<u64, IommufdError> {
        let area = iopt::map_area(self.iopt(cmd.ioas_id)?, self.ops.memory(), cmd)?;
        self.add_areas(cmd.ioas_id, &[area])?;
        Ok(area.iova)
    }

    /// `IOMMU_IOAS_MAP_FILE` on the host's own file: the fd is one of this process
    /// (`fget`), its window one of the file's.
    pub(crate) fn do_ioas_map_file(
        &mut self,
        u: &Ucmd,
        arg: &mut [u8],
    ) -> Result<(), IommufdError> {
        let cmd: IommuIoasMapFile = u.copy_in(arg)?;
        let file = map_file::dup_fd(cmd.fd);
        let mut windows = FileWindows(self.ops.frames().clone());
        self.map_file(arg, file, &mut windows)
    }

    /// `IOMMU_IOAS_MAP_FILE` (`iommufd_ioas_map_file`) of `file`, the file the caller's
    /// `fd` names (`None`: nothing is open there), the pages of `[start, +length)` of it
    /// made host memory by `files`: flags beyond the map flags EOPNOTSUPP, an IOVA or
    /// length of `U64_MAX` EOVERFLOW, neither readable nor writeable EINVAL, an unknown
    /// IOAS ENOENT; then the file's rules (`map_file::pages_of`: EBADF, EOVERFLOW,
    /// EINVAL) and `IOMMU_IOAS_MAP`'s of the pages' address. The IOVA is written back. The
    /// file keeps the pages until no area maps them; a failed map drops them at once.
    pub fn map_file(
        &mut self,
        arg: &mut [u8],
        file: Option<OwnedFd>,
        files: &mut dyn MemoryFiles,
    ) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_ioas_map_file";
        let u = &UCMD_IOAS_MAP_FILE;
        let mut cmd: IommuIoasMapFile = u.copy_in(arg)?;
        iopt::check_map(WHAT, cmd.flags, cmd.iova, cmd.length)?;
        self.iopt(cmd.ioas_id)?;
        let (user_va, pages) = map_file::pages_of(files, cmd.fd, file, cmd.start, cmd.length)?;
        let map = IommuIoasMap {
            size: std::mem::size_of::<IommuIoasMap>() as u32,
            flags: cmd.flags,
            ioas_id: cmd.ioas_id,
            __reserved: 0,
            user_va,
            length: cmd.length,
            iova: cmd.iova,
        };
        cmd.iova = self.map_user(&map)?;
        self.pins.extend(pages);
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_IOAS_COPY`: maps the memory behind `[src_iova, +length)` of one IOAS (which
    /// must be mapped without a hole, ENOENT) into another, with the given flags, at
    /// `dst_iova` or an allocated IOVA written back.
    pub(crate) fn do_ioas_copy(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_ioas_copy";
        let mut cmd: IommuIoasCopy = u.copy_in(arg)?;
        if cmd.flags & !IOMMU_IOAS_MAP_FLAGS != 0 {
            return Err(IommufdError::not_supported(WHAT, "unknown flags"));
        }
        if cmd.length == u64::MAX || cmd.src_iova == u64::MAX || cmd.dst_iova == u64::MAX {
            return Err(IommufdError::Overflow(WHAT));
        }
        if cmd.flags & (IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE) == 0 {
            return Err(IommufdError::invalid(
                WHAT,
                "neither readable nor writeable",
            ));
        }
        let pieces = self
            .iopt(cmd.src_ioas_id)?
            .pages(cmd.src_iova, cmd.length)?;
        let dst = self.iopt(cmd.dst_ioas_id)?;
        let iova = if cmd.flags & IOMMU_IOAS_MAP_FIXED_IOVA != 0 {
            dst.check_fixed(cmd.dst_iova, cmd.length)?;
            cmd.dst_iova
        } else {
            dst.alloc_iova(cmd.length, pieces.first().map(|p| p.hpa))?
        };
        let mut at = iova;
        let areas: Vec<Area> = pieces
            .iter()
            .map(|p| {
                let a = Area {
                    iova: at,
                    length: p.length,
                    hpa: p.hpa,
                    read: cmd.flags & IOMMU_IOAS_MAP_READABLE != 0,
                    write: cmd.flags & IOMMU_IOAS_MAP_WRITEABLE != 0,
                };
                at += p.length;
                a
            })
            .collect();
        self.add_areas(cmd.dst_ioas_id, &areas)?;
        cmd.dst_iova = iova;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_IOAS_UNMAP`: every area inside `[iova, +length)` (ENOENT for none or for a
    /// cut one), `0, U64_MAX` every area, removed from every domain with its TLB
    /// invalidation, and the memory file pages no area maps any more released; `length`
    /// returns the bytes unmapped.
    pub(crate) fn do_ioas_unmap(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasUnmap = u.copy_in(arg)?;
        let all = cmd.iova == 0 && cmd.length == u64::MAX;
        if !all && (cmd.iova == u64::MAX || cmd.length == u64::MAX) {
            return Err(IommufdError::Overflow("iommu_ioas_unmap"));
        }
        let plan = self.iopt(cmd.ioas_id)?.unmap_plan(cmd.iova, cmd.length)?;
        let hwpts = self.hwpts_of(cmd.ioas_id);
        let mut unmapped = 0u64;
        for a in &plan {
            for &h in &hwpts {
                if let Some(hwpt) = self.paging_mut(h) {
                    hwpt.domain.unmap_area(a.iova, a.length);
                }
            }
            self.iopt_mut(cmd.ioas_id)?.remove(a.iova);
            unmapped += a.length;
        }
        self.unpin_unused();
        cmd.length = unmapped;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_IOAS_IOVA_RANGES`: the usable ranges into the user array, as many as
    /// `num_iovas` allows; `num_iovas` returns how many there are (EMSGSIZE, after the
    /// write back, when that is more than the array holds) and `out_iova_alignment` 4 KiB.
    pub(crate) fn do_ioas_iova_ranges(
        &mut self,
        u: &Ucmd,
        arg: &mut [u8],
    ) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasIovaRanges = u.copy_in(arg)?;
        check_reserved(cmd.__reserved.into(), "iommu_ioas_iova_ranges")?;
        let ranges = self.iopt(cmd.ioas_id)?.iova_ranges();
        let max = cmd.num_iovas as usize;
        let mut out = Vec::new();
        for &(start, last) in ranges.iter().take(max) {
            out.extend(IommuIovaRange { start, last }.to_bytes());
        }
        copy_to_user(self.ops.memory(), cmd.allowed_iovas, &out)?;
        cmd.num_iovas = ranges.len() as u32;
        cmd.out_iova_alignment = IOVA_ALIGNMENT;
        u.respond(&cmd, arg);
        if ranges.len() > max {
            return Err(IommufdError::MsgSize("iommu_ioas_iova_ranges"));
        }
        Ok(())
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS`: replaces the ranges the IOVA allocator may use.
    pub(crate) fn do_ioas_allow_iovas(
        &mut self,
        u: &Ucmd,
        arg: &mut [u8],
    ) -> Result<(), IommufdError> {
        let cmd: IommuIoasAllowIovas = u.copy_in(arg)?;
        check_reserved(cmd.__reserved.into(), "iommu_ioas_allow_iovas")?;
        self.iopt(cmd.ioas_id)?;
        let len = (cmd.num_iovas as usize) * std::mem::size_of::<IommuIovaRange>();
        let bytes = copy_from_user(self.ops.memory(), cmd.allowed_iovas, len)?;
        let ranges: Vec<(u64, u64)> = bytes
            .chunks_exact(std::mem::size_of::<IommuIovaRange>())
            .map(|c| {
                let r: IommuIovaRange = read_prefix(c, c.len());
                (r.start, r.last)
            })
            .collect();
        self.iopt_mut(cmd.ioas_id)?.set_allowed(&ranges)
    }

    /// `IOMMU_HWPT_ALLOC`. With an IOAS as `pt_id`, a paging HWPT; on another object as
    /// [`IommuOps::alloc_hwpt_on`] says (a nested HWPT). `__reserved` must be zero
    /// (EOPNOTSUPP), `data_type` and `data_len` agree (EINVAL), the device be bound
    /// (ENOENT).
    pub(crate) fn do_hwpt_alloc(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hwpt_alloc";
        let mut cmd: IommuHwptAlloc = u.copy_in(arg)?;
        check_reserved(cmd.__reserved.into(), WHAT)?;
        if (cmd.data_type == IOMMU_HWPT_DATA_NONE) != (cmd.data_len == 0) {
            return Err(IommufdError::invalid(
                WHAT,
                "data_type and data_len disagree",
            ));
        }
        self.device(cmd.dev_id)?;
        let id = match self.objects.get(&cmd.pt_id) {
            None => {
                return Err(IommufdError::NoObject {
                    id: cmd.pt_id,
                    want: "page table",
                })
            }
            Some(Object::Ioas(_)) => self.alloc_paging(cmd.pt_id, cmd.flags, cmd.data_type)?,
            Some(_) => V::alloc_hwpt_on(self, &cmd)?,
        };
        cmd.out_hwpt_id = id;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// A paging HWPT: flags of [`IommuOps::PAGING_FLAGS`] only and no data (EOPNOTSUPP);
    /// NEST_PARENT as [`IommuOps::check_nest_parent`] allows; DIRTY_TRACKING a domain
    /// that tracks dirty pages, with NEST_PARENT only as [`IommuOps::DIRTY_NEST_PARENT`]
    /// allows (EOPNOTSUPP).
    fn alloc_paging(&mut self, ioas: u32, flags: u32, data_type: u32) -> Result<u32, IommufdError> {
        const WHAT: &str = "paging HWPT";
        if flags & !V::PAGING_FLAGS != 0 {
            return Err(IommufdError::not_supported(
                WHAT,
                format!("flags {flags:#x}"),
            ));
        }
        if data_type != IOMMU_HWPT_DATA_NONE {
            return Err(IommufdError::not_supported(WHAT, "driver data"));
        }
        let nest_parent = flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0;
        if nest_parent {
            self.ops.check_nest_parent()?;
        }
        let dirty = flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0;
        if nest_parent && dirty && !V::DIRTY_NEST_PARENT {
            return Err(IommufdError::not_supported(
                WHAT,
                "a nest parent that tracks dirty pages",
            ));
        }
        let id = self.build_paging(ioas, false, dirty)?;
        if let Some(h) = self.paging_mut(id) {
            h.nest_parent = nest_parent;
            h.pasid = flags & IOMMU_HWPT_ALLOC_PASID != 0;
        }
        Ok(id)
    }

    /// A new paging HWPT of `ioas`: a domain, the IOVAs beyond its width reserved in the
    /// IOAS (EADDRINUSE when mapped or allowed), the IOAS's mappings replayed; on failure
    /// nothing is left.
    pub(crate) fn build_paging(
        &mut self,
        ioas: u32,
        auto: bool,
        dirty: bool,
    ) -> Result<u32, IommufdError> {
        let id = self.next_id()?;
        let mut domain = self.ops.new_domain(dirty)?;
        let width = domain.iova_bits();
        let iopt = self.iopt_mut(ioas)?;
        if width < 64 {
            iopt.reserve(id, 1u64 << width, u64::MAX)?;
        }
        let areas: Vec<Area> = iopt.areas().copied().collect();
        for (n, a) in areas.iter().enumerate() {
            if let Err(e) = domain.map_area(a.iova, a.hpa, a.length, a.read, a.write) {
                for d in &areas[..n] {
                    domain.unmap_area(d.iova, d.length);
                }
                if let Ok(i) = self.iopt_mut(ioas) {
                    i.unreserve(id);
                }
                return Err(e);
            }
        }
        self.objects.insert(
            id,
            Object::HwptPaging(HwptPaging {
                ioas,
                domain,
                nest_parent: false,
                pasid: false,
                auto,
            }),
        );
        Ok(id)
    }

    /// The driver data of a nested `IOMMU_HWPT_ALLOC`, structure `T` (`what`): at least
    /// its size (EINVAL), read from `data_uptr` (EFAULT) with the copy rules of a
    /// structure (a longer one's tail zero, E2BIG).
    pub(crate) fn hwpt_data<T: Wire>(
        &self,
        cmd: &IommuHwptAlloc,
        what: &'static str,
    ) -> Result<T, IommufdError> {
        let known = std::mem::size_of::<T>();
        let len = cmd.data_len as usize;
        if len < known {
            return Err(IommufdError::invalid(
                what,
                "data_len below the driver structure",
            ));
        }
        let bytes = copy_from_user(self.ops.memory(), cmd.data_uptr, len)?;
        if bytes[known..].iter().any(|&b| b != 0) {
            return Err(UapiError::TrailingBytes {
                what,
                size: cmd.data_len,
                known,
            }
            .into());
        }
        Ok(read_prefix(&bytes, known))
    }

    /// `IOMMU_HWPT_INVALIDATE`: `__reserved` zero (EOPNOTSUPP), entries with a pointer
    /// and a length (EINVAL), then as [`IommuOps::invalidate`] says; `entry_num` is
    /// written back on every outcome past the copy-in with the number of entries carried
    /// out, as the kernel does.
    pub(crate) fn do_hwpt_invalidate(
        &mut self,
        u: &Ucmd,
        arg: &mut [u8],
    ) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hwpt_invalidate";
        let mut cmd: IommuHwptInvalidate = u.copy_in(arg)?;
        let mut done = 0u32;
        let result = check_reserved(cmd.__reserved.into(), WHAT)
            .and_then(|()| {
                if cmd.entry_num != 0 && (cmd.data_uptr == 0 || cmd.entry_len == 0) {
                    return Err(IommufdError::invalid(
                        WHAT,
                        "entries without a pointer or length",
                    ));
                }
                Ok(())
            })
            .and_then(|()| V::invalidate(self, &cmd, &mut done));
        cmd.entry_num = done;
        u.respond(&cmd, arg);
        result
    }

    /// `IOMMU_GET_HW_INFO` of a bound device (ENOENT): flags INPUT_TYPE only and
    /// `__reserved` zero, an input type DEFAULT or the IOMMU's own (EOPNOTSUPP); the
    /// vendor data ([`IommuOps::hw_info`]) copied into the user buffer up to `data_len`
    /// (the rest of a larger buffer zeroed; `data_len` returns the kernel's length), the
    /// type, `out_max_pasid_log2` and `out_capabilities` written back.
    pub(crate) fn do_get_hw_info(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hw_info";
        let cmd: IommuHwInfo = u.copy_in(arg)?;
        if cmd.flags & !IOMMU_HW_INFO_FLAG_INPUT_TYPE != 0 || cmd.__reserved != [0; 3] {
            return Err(IommufdError::not_supported(WHAT, "flags or reserved"));
        }
        self.device(cmd.dev_id)?;
        let asked = hw_info_data_type(&cmd);
        if cmd.flags & IOMMU_HW_INFO_FLAG_INPUT_TYPE != 0
            && asked != IOMMU_HW_INFO_TYPE_DEFAULT
            && asked != V::HW_INFO_TYPE
        {
            return Err(IommufdError::not_supported(
                WHAT,
                format!("data type {asked}"),
            ));
        }
        let info = self.ops.hw_info()?;
        let mut out = vec![0u8; cmd.data_len as usize];
        let n = out.len().min(info.data.len());
        out[..n].copy_from_slice(&info.data[..n]);
        copy_to_user(self.ops.memory(), cmd.data_uptr, &out)?;
        let mut back = hw_info(cmd.size, cmd.flags, cmd.dev_id, V::HW_INFO_TYPE);
        back.data_uptr = cmd.data_uptr;
        back.data_len = info.data.len() as u32;
        back.out_max_pasid_log2 = info.max_pasid_log2;
        back.out_capabilities = info.capabilities;
        u.respond(&back, arg);
        Ok(())
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` (`iommufd_hwpt_set_dirty_tracking`): flags other
    /// than ENABLE are EOPNOTSUPP, an id that is not a paging HWPT ENOENT; then
    /// [`PagingDomain::set_dirty`] (EOPNOTSUPP for a HWPT not allocated with
    /// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`).
    pub(crate) fn do_hwpt_set_dirty_tracking(
        &mut self,
        u: &Ucmd,
        arg: &mut [u8],
    ) -> Result<(), IommufdError> {
        let cmd: IommuHwptSetDirtyTracking = u.copy_in(arg)?;
        if cmd.flags & !IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0 {
            return Err(IommufdError::not_supported(
                "iommu_hwpt_set_dirty_tracking",
                format!("flags {:#x}", cmd.flags),
            ));
        }
        let h = self.paging_mut(cmd.hwpt_id).ok_or(IommufdError::NoObject {
            id: cmd.hwpt_id,
            want: "paging HWPT",
        })?;
        h.domain
            .set_dirty(cmd.flags & IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0)
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` (`iommufd_hwpt_get_dirty_bitmap`): flags other than
    /// NO_CLEAR, or a non-zero `__reserved`, are EOPNOTSUPP; an id that is not a paging
    /// HWPT ENOENT; the range is checked as `iommufd_check_iova_range` checks it
    /// (EOVERFLOW, EINVAL) before the bitmap at `data` is touched (EFAULT unless it lies
    /// in the VMM's memory); then [`PagingDomain::read_dirty`] sets the bits of the dirty
    /// pages in it, leaving the others as they were.
    pub(crate) fn do_hwpt_get_dirty_bitmap(
        &mut self,
        u: &Ucmd,
        arg: &mut [u8],
    ) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hwpt_get_dirty_bitmap";
        let cmd: IommuHwptGetDirtyBitmap = u.copy_in(arg)?;
        if cmd.flags & !IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 || cmd.__reserved != 0 {
            return Err(IommufdError::not_supported(
                WHAT,
                "unknown flags or reserved",
            ));
        }
        let mem = self.ops.memory().clone();
        let h = self.paging_mut(cmd.hwpt_id).ok_or(IommufdError::NoObject {
            id: cmd.hwpt_id,
            want: "paging HWPT",
        })?;
        let needed = DirtyBitmap::check_range(cmd.iova, cmd.length, cmd.page_size)?;
        let len = usize::try_from(needed).map_err(|_| IommufdError::Fault("bitmap"))?;
        let mut bytes = copy_from_user(&mem, cmd.data, len)?;
        let mut bitmap = DirtyBitmap::new(cmd.iova, cmd.length, cmd.page_size, &mut bytes)?;
        h.domain.read_dirty(
            &mut bitmap,
            cmd.flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0,
        )?;
        copy_to_user(&mem, cmd.data, &bytes)
    }

    // ----- Devices (called by the device cdev) -----

    /// Binds device `sid` (`iommufd_device_bind`): a new device object, its id returned.
    /// EINVAL while the device is bound, to this file or another (`vfio_df_open` lets one
    /// cdev open a device at a time).
    pub(crate) fn bind_device(&mut self, sid: SourceId) -> Result<u32, IommufdError> {
        let id = self.next_id()?;
        self.ops.open_devices().open(sid)?;
        self.objects.insert(
            id,
            Object::Device(Device {
                sid,
                rid: None,
                pasids: BTreeMap::new(),
            }),
        );
        Ok(id)
    }

    /// Unbinds a device: detached from everything, what goes with it
    /// ([`IommuOps::unbound`]) and its object removed.
    pub(crate) fn unbind_device(&mut self, dev_id: u32) {
        let pasids: Vec<Pasid> = match self.objects.get(&dev_id) {
            Some(Object::Device(d)) => d.pasids.keys().copied().collect(),
            _ => Vec::new(),
        };
        for p in pasids {
            let _ = V::detach_pasid(self, dev_id, p.raw());
        }
        let _ = self.detach_rid(dev_id);
        V::unbound(self, dev_id);
        if let Some(Object::Device(d)) = self.objects.remove(&dev_id) {
            self.ops.open_devices().close(d.sid);
        }
    }

    /// Attaches (or replaces) device `dev_id`'s RID to `pt_id`: an IOAS (an automatic
    /// paging HWPT of it is found or made), or the HWPT [`IommuOps::rid_target`] takes.
    /// Returns the HWPT id. A failed attach or replace leaves the device where it was.
    pub(crate) fn attach_rid(&mut self, dev_id: u32, pt_id: u32) -> Result<u32, IommufdError> {
        let dev = self.device(dev_id)?;
        let old = dev.rid;
        let mut made = None;
        let hwpt = match self.objects.get(&pt_id) {
            None => {
                return Err(IommufdError::NoObject {
                    id: pt_id,
                    want: "page table",
                })
            }
            Some(Object::Ioas(_)) => {
                let found = self.objects.iter().find_map(|(&id, o)| match o {
                    Object::HwptPaging(h) if h.ioas == pt_id && h.auto => Some(id),
                    _ => None,
                });
                match found {
                    Some(id) => id,
                    None => {
                        let id = self.build_paging(pt_id, true, false)?;
                        made = Some(id);
                        id
                    }
                }
            }
            Some(_) => V::rid_target(self, dev, pt_id)?,
        };
        if let Err(e) = V::set_rid(self, dev_id, old, hwpt) {
            if let Some(id) = made {
                self.remove_object(id);
            }
            return Err(e);
        }
        if let Some(d) = self.device_mut(dev_id) {
            d.rid = Some(hwpt);
        }
        V::rid_changed(self, dev_id);
        if let Some(o) = old.filter(|&o| o != hwpt) {
            self.drop_auto(o);
        }
        Ok(hwpt)
    }

    /// Destroys an automatic HWPT no device uses any more.
    pub(crate) fn drop_auto(&mut self, id: u32) {
        let auto = matches!(self.objects.get(&id), Some(Object::HwptPaging(h)) if h.auto);
        if auto && self.users(id) == 0 {
            self.remove_object(id);
        }
    }

    /// Detaches device `dev_id`'s RID (ENOENT for an unknown device, EBUSY while PASIDs
    /// of it are attached; a device not attached is left alone): its DMA blocked.
    pub(crate) fn detach_rid(&mut self, dev_id: u32) -> Result<(), IommufdError> {
        let dev = self.device(dev_id)?;
        let (sid, rid) = (dev.sid, dev.rid);
        let Some(h) = rid else {
            return Ok(());
        };
        if !dev.pasids.is_empty() {
            return Err(IommufdError::Busy("PASIDs of the device are attached"));
        }
        V::release_rid(self, sid, h);
        if let Some(d) = self.device_mut(dev_id) {
            d.rid = None;
        }
        V::rid_changed(self, dev_id);
        self.drop_auto(h);
        Ok(())
    }
}

impl<V: IommuOps> Drop for IommufdCtx<V> {
    /// Closing the file destroys every object: devices detach, then the rest goes (each
    /// domain invalidates its tag and frees its tables as it drops).
    fn drop(&mut self) {
        let devices: Vec<u32> = self
            .objects
            .iter()
            .filter_map(|(&id, o)| matches!(o, Object::Device(_)).then_some(id))
            .collect();
        for d in devices {
            self.unbind_device(d);
        }
        // The domains go before the memory file pages they map.
        self.objects.clear();
        self.pins.clear();
    }
}

/// One open `/dev/iommu` on the IOMMU `V` drives.
#[derive(Debug)]
pub struct File<V: IommuOps> {
    ctx: Mutex<IommufdCtx<V>>,
}

impl<V: IommuOps> File<V> {
    /// A file on `ops`, installing its queue files in `fds`.
    pub(crate) fn new(ops: V, fds: Weak<Iommufds>) -> Arc<Self> {
        Arc::new(File {
            ctx: Mutex::new(IommufdCtx {
                ops,
                objects: BTreeMap::new(),
                fds,
                pins: Vec::new(),
            }),
        })
    }

    /// `IOMMU_IOAS_MAP_FILE` of `file` through `files` (the service's connection, whose
    /// client sent the file): [`IommufdCtx::map_file`].
    pub fn map_file(
        &self,
        arg: &mut [u8],
        file: Option<OwnedFd>,
        files: &mut dyn MemoryFiles,
    ) -> Result<(), Errno> {
        self.lock().map_file(arg, file, files).map_err(|e| {
            tracing::debug!("{} IOMMU_IOAS_MAP_FILE: {e}", V::NAME);
            Errno::from(&e)
        })
    }

    /// The context, for the host side (device cdevs, diagnostics, tests).
    pub fn lock(&self) -> MutexGuard<'_, IommufdCtx<V>> {
        self.ctx.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<V: IommuOps> BindTarget for File<V> {
    fn bind_device(&self, sid: SourceId) -> Result<u32, IommufdError> {
        self.lock().bind_device(sid)
    }

    fn unbind_device(&self, dev_id: u32) {
        self.lock().unbind_device(dev_id);
    }

    fn attach(&self, dev_id: u32, pasid: Option<u32>, pt_id: u32) -> Result<u32, IommufdError> {
        let mut ctx = self.lock();
        match pasid {
            Some(p) => V::attach_pasid(&mut ctx, dev_id, p, pt_id),
            None => ctx.attach_rid(dev_id, pt_id),
        }
    }

    fn detach(&self, dev_id: u32, pasid: Option<u32>) -> Result<(), IommufdError> {
        let mut ctx = self.lock();
        match pasid {
            Some(p) => V::detach_pasid(&mut ctx, dev_id, p),
            None => ctx.detach_rid(dev_id),
        }
    }
}

impl<V: IommuOps> UapiFile for File<V> {
    fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
        self.lock().ioctl(cmd, arg).map(|()| 0).map_err(|e| {
            tracing::debug!("{} ioctl: {e}", V::NAME);
            Errno::from(&e)
        })
    }

    /// `/dev/iommu` has no `read`.
    fn read(&self, _buf: &mut [u8]) -> Result<usize, Errno> {
        Err(Errno::EINVAL)
    }

    /// `/dev/iommu` has no `write`.
    fn write(&self, _buf: &[u8]) -> Result<usize, Errno> {
        Err(Errno::EINVAL)
    }

    /// Nothing is ever queued on `/dev/iommu` itself (fault and vEVENT queues are files
    /// of their own).
    fn set_event_notifier(&self, _notifier: Option<Arc<dyn EventNotifier>>) {}
}
